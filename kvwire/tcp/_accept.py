"""The receiver's front door: listening, accepting, and the unauthenticated start of each connection.

Owns: the listening socket, the set of open connections and its bound (more are refused at once), the
``HandshakeGate`` (a bounded number of connections mid-handshake, each under a total deadline), TLS
wrapping, reading the first message (``HELLO`` for a control connection, a lane's ``JOIN``), and the
moment a connection counts as authenticated (it leaves the gate and gets full-size limits). Must not
know: sessions, transfers or what an authenticated connection carries: it hands each connection to the
owner's ``on_control`` or ``on_lane`` and closes it when they return.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import ssl
import threading
from collections.abc import Callable
from typing import Any

from ..codec import frames as F
from ..errors import AuthenticationError, KvwireError
from ._auth import server_hello
from ._gate import HandshakeGate, Ticket
from ._wire import Channel, host_port, listen, tune

log = logging.getLogger("kvwire.receiver")

#: ``fn(channel, first message body, authenticated)``: authenticate the connection, call
#: ``authenticated()`` once it has, then serve it; it is closed when this returns
Handler = Callable[[Channel, dict[str, Any], Callable[[], None]], None]


class Acceptor:
    """Listens on ``host:port`` at once; ``start()`` accepts, on threads started with ``spawn``."""

    def __init__(self, host: str, port: int, *, ssl_context: ssl.SSLContext | None, limits: F.Limits,
                 peer_timeout: float, handshake_timeout: float, max_handshakes: int, max_conns: int,
                 spawn: Callable[..., None], count: Callable[[str], None],
                 on_control: Callable[[Channel, dict[str, Any], str, Callable[[], None]], None],
                 on_lane: Handler) -> None:
        self.ssl_context = ssl_context
        self.limits = limits
        self.peer_timeout = peer_timeout
        self.handshake_timeout = handshake_timeout
        self.max_conns = max_conns
        self._spawn = spawn
        self._count = count
        self._on_control = on_control
        self._on_lane = on_lane
        # unauthenticated connections: bounded in number (per source too) and by a total deadline
        self.gate = HandshakeGate(max_handshakes, max(1, max_handshakes // 2), handshake_timeout)
        self._lock = threading.Lock()
        self.conns: set[socket.socket] = set()  # every open connection (raw socket), under _lock
        self._closed = threading.Event()
        self._listener = listen(host, port)
        self.address: tuple[str, int] = self._listener.getsockname()[:2]

    def start(self) -> None:
        self._spawn(self._accept_loop, "kvwire-accept")

    def close(self) -> None:
        """Stop accepting (wakes the blocked ``accept()``) and cut every handshake in progress."""
        self._closed.set()
        try:
            self._listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._listener.close()
        self.gate.close()

    def open_connections(self) -> int:
        """Connections open now, authenticated or not."""
        with self._lock:
            return len(self.conns)

    def cut_all(self) -> None:
        """Shut down every connection still open (their threads then end)."""
        with self._lock:
            conns = list(self.conns)
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _accept_loop(self) -> None:
        while not self._closed.is_set():
            try:
                sock, addr = self._listener.accept()
            except OSError:
                return
            with self._lock:
                over = len(self.conns) >= self.max_conns
                if not over:
                    self.conns.add(sock)
            if over:
                self._count("connections_refused")
                sock.close()
                continue
            # a new connection always gets a handshake slot: the gate cuts the oldest of the busiest source
            ticket = self.gate.admit(sock, addr[0])
            self._spawn(self._connection, f"kvwire-conn-{addr[1]}", sock, ticket, host_port(addr))

    def _connection(self, raw: socket.socket, ticket: Ticket, peer: str) -> None:
        ch: Channel | None = None
        sock = raw

        def authenticated() -> None:
            assert ch is not None
            self.gate.done(ticket)
            ch.limits = self.limits  # full-size control messages only from an authenticated peer

        try:
            tune(sock, self.peer_timeout)
            sock.settimeout(self.handshake_timeout)  # the gate's reap() enforces the total deadline
            if self.ssl_context is not None:
                # wrap without I/O first, so the gate can cut a TLS handshake that dribbles
                sock = ticket.sock = self.ssl_context.wrap_socket(sock, server_side=True,
                                                                  do_handshake_on_connect=False)
                sock.do_handshake()
            ch = Channel(sock, F.preauth_limits(self.limits))
            kind, body = server_hello(ch)
            if kind == F.HELLO:
                self._on_control(ch, body, peer, authenticated)
            else:
                self._on_lane(ch, body, authenticated)
        except (OSError, KvwireError, ValueError) as e:
            if isinstance(e, AuthenticationError):
                self._count("auth_failures")
            log.info("connection from %s ended: %s: %s", peer, type(e).__name__, e)
        finally:
            self.gate.done(ticket)
            if ch is not None:
                ch.close()
            else:
                sock.close()
            raw.close()
            with self._lock:
                self.conns.discard(raw)


def is_loopback(addr: str) -> bool:
    try:
        ip = ipaddress.ip_address(addr.split("%", 1)[0])
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)
    return bool((mapped or ip).is_loopback)


def verifies_clients(ctx: ssl.SSLContext | None) -> bool:
    return ctx is not None and ctx.verify_mode == ssl.CERT_REQUIRED
