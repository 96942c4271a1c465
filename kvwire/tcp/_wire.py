"""Socket plumbing shared by both ends: exact reads into caller buffers, gathered writes, options.

Owns: ``recv_exact_into``, ``send_parts`` (``sendmsg`` over [header, views] with partial-send
handling, ``sendall`` per part on TLS), ``Channel`` (a socket with a write lock that reads and writes
whole control frames) and ``listen`` (IPv4, IPv6 or dual-stack by the address
given). Socket options are ``kvwire.sockopts``'s (``tune`` is re-exported here). Must not know:
transfers, sessions or layouts.
"""

from __future__ import annotations

import socket
import ssl
import threading
import time
from collections.abc import Sequence
from typing import Any

from ..codec.frames import (
    HEADER_SIZE,
    KIND_CONTROL,
    Header,
    Limits,
    decode_control,
    encode_control,
    unpack_header,
)
from ..errors import ProtocolError
from ..sockopts import tune as tune  # re-exported: the receiver's accept path tunes through the wire

Buffer = memoryview


def listen(host: str, port: int, backlog: int = 128) -> socket.socket:
    """A listening TCP socket on ``host``: an IPv4 or IPv6 literal, or a name (its first address).
    ``"::"`` or ``""`` listens on every interface, IPv6 and IPv4 both (dual-stack) where the platform
    allows, IPv4 only where it does not."""
    if host in ("", "::") and socket.has_dualstack_ipv6():
        return socket.create_server(("::", port), family=socket.AF_INET6, backlog=backlog, dualstack_ipv6=True)
    infos = socket.getaddrinfo(host or "0.0.0.0", port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, _, _, _, address = infos[0]
    return socket.create_server(address, family=family, backlog=backlog)


def host_port(address: tuple[Any, ...]) -> str:
    """``host:port`` of a socket address, the host bracketed when it is IPv6."""
    host, port = address[0], address[1]
    return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"


class PeerClosed(ConnectionError):
    """The peer closed the connection (EOF)."""


def recv_exact_into(sock: socket.socket, view: memoryview, deadline: float | None = None) -> None:
    """Fill ``view`` completely from ``sock`` (no intermediate copy), by the monotonic ``deadline`` if
    one is given (``TimeoutError`` then; the socket's timeout is left at what remained)."""
    got = 0
    n = len(view)
    while got < n:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("deadline passed")
            sock.settimeout(left)
        r = sock.recv_into(view[got:], n - got)
        if r == 0:
            raise PeerClosed("peer closed the connection")
        got += r


def drain(sock: socket.socket, nbytes: int, scratch: memoryview) -> None:
    """Read and drop ``nbytes`` through a bounded scratch buffer."""
    while nbytes:
        step = min(nbytes, len(scratch))
        recv_exact_into(sock, scratch[:step])
        nbytes -= step


def send_parts(sock: socket.socket, parts: Sequence[bytes | memoryview]) -> None:
    """Send every part, in order, without joining them. One ``sendmsg`` in the common case."""
    if isinstance(sock, ssl.SSLSocket):  # TLS has no sendmsg; it copies into records anyway
        for p in parts:
            sock.sendall(p)
        return
    views = [memoryview(p).cast("B") if not isinstance(p, bytes) else memoryview(p) for p in parts]
    total = sum(len(v) for v in views)
    while total:
        sent = sock.sendmsg(views)
        total -= sent
        if not total:
            return
        while sent:  # drop what went out, keep the rest
            if sent >= len(views[0]):
                sent -= len(views[0])
                views.pop(0)
            else:
                views[0] = views[0][sent:]
                sent = 0


class Channel:
    """A connection carrying control frames (and, on lanes, data frames): locked writes, bounded reads."""

    def __init__(self, sock: socket.socket, limits: Limits) -> None:
        self.sock = sock
        self.limits = limits
        self._wlock = threading.Lock()
        self._hdr = bytearray(HEADER_SIZE)
        self.closed = False
        #: when set (a handshake), reads of whole frames end by this monotonic time, however the peer dribbles
        self.deadline: float | None = None

    def send(self, kind: str, body: dict[str, Any] | None = None) -> None:
        frame = encode_control(kind, body)
        with self._wlock:
            self.sock.sendall(frame)

    def send_parts(self, parts: Sequence[bytes | memoryview]) -> None:
        with self._wlock:
            send_parts(self.sock, parts)

    def read_header(self) -> Header:
        view = memoryview(self._hdr)
        recv_exact_into(self.sock, view, self.deadline)
        return unpack_header(self._hdr, self.limits)

    def recv_into(self, view: memoryview) -> None:
        recv_exact_into(self.sock, view, self.deadline)

    def skip(self, nbytes: int, scratch: memoryview) -> None:
        drain(self.sock, nbytes, scratch)

    def read_control_body(self, h: Header) -> tuple[str, dict[str, Any]]:
        body = bytearray(h.length)  # bounded by limits.max_control in unpack_header
        recv_exact_into(self.sock, memoryview(body), self.deadline)
        return decode_control(h, body, self.limits)

    def read_control(self) -> tuple[str, dict[str, Any]]:
        h = self.read_header()
        if h.kind != KIND_CONTROL:
            raise ProtocolError("expected a control frame, got data")
        return self.read_control_body(h)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
