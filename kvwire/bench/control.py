"""The bench's side channel: kvwire's own control framing, ``Channel`` and authentication, carrying bench messages.

Owns: ``BenchChannel`` (a ``kvwire.tcp._wire.Channel`` whose messages are ``APP`` control frames
``{"op": ..., ...}``; it reads the magic and version bytes first, so a peer that is not kvwire is named at
once), the handshake on top of ``kvwire.tcp._auth`` (the session handshake's mutual HMAC proofs over fresh
nonces; messages bounded by ``preauth_limits`` until the peer has proven the key; one deadline for the whole
exchange) whose ``welcome`` carries the bench's own announcement (``service``, ``bench`` protocol,
``data_port``, ``run`` ...), and the clear errors a client gets from a peer that is not a kvwire-bench
server. Must not know: kvwire sessions, layouts, payloads or reports. Nothing is pickled; every length read
from the peer is bounded (``codec.frames.Limits``) before it is used.

Handshake (client speaks first, so a silent or garbage-writing peer is caught by the client's deadline)::

    C: hello {version, nonce}        S: challenge {session, nonce}
    C: auth {proof}                  S: welcome {proof, limits: {service: "kvwire-bench", bench, data_port, run ...}}
    S: app {op: ok} | app {op: error, reason}
"""

from __future__ import annotations

import socket
import ssl
import time
from typing import Any

from ..codec import frames as F
from ..errors import AuthenticationError, ProtocolError
from ..sockopts import no_delay
from ..tcp import Channel, PeerClosed, client_handshake, recv_exact_into, server_hello
from ..tcp import server_handshake as kvwire_server_handshake
from .errors import PeerAuthFailed, PeerError, PeerGone
from .messages import read_reason, read_welcome

MAGIC = F.MAGIC
#: the bench's message set (the ops below the handshake); 2: carried in kvwire control frames
PROTOCOL = 2
SERVICE = "kvwire-bench"
HANDSHAKE_TIMEOUT = 2.0
_VERSION_AT = len(F.MAGIC)


class BenchChannel(Channel):
    """A control connection carrying bench messages: whole frames out under a lock, whole frames in by a
    deadline. ``limits`` are the pre-authentication ones until the handshake has authenticated the peer."""

    def __init__(self, sock: socket.socket, peer: str) -> None:
        super().__init__(sock, F.preauth_limits(F.DEFAULT_LIMITS))
        self.peer = peer
        self._head = bytearray(F.HEADER_SIZE)
        self.last_length = 0  # bytes of the last message's body on the wire
        #: set when this side shut the read side to stop a reader (``recv``'s PeerGone then says why instead
        #: of blaming the peer)
        self.shut_reason: str | None = None

    def read_header(self) -> F.Header:
        """The magic and version bytes first: a peer speaking something else is named without waiting for
        a whole header that may never come."""
        view = memoryview(self._head)
        recv_exact_into(self.sock, view[:_VERSION_AT + 1], self.deadline)
        if bytes(view[:_VERSION_AT]) != F.MAGIC:
            raise PeerError(f"{self.peer} is not a kvwire-bench peer: it sent {bytes(view[:_VERSION_AT + 1])!r}")
        if view[_VERSION_AT] != F.VERSION:
            raise PeerError(f"{self.peer} speaks kvwire protocol v{view[_VERSION_AT]}, this side speaks "
                            f"v{F.VERSION}: use the same kvwire version on both ends")
        recv_exact_into(self.sock, view[_VERSION_AT + 1:], self.deadline)
        h = F.unpack_header(self._head, self.limits)
        self.last_length = h.length
        return h

    def authenticated(self) -> None:
        """The peer has proven the key: full-size messages from now on, no handshake deadline."""
        self.limits = F.DEFAULT_LIMITS
        self.deadline = None

    def tell(self, op: str, **fields: Any) -> None:
        """Send one bench message (raises ``OSError`` when the connection is gone)."""
        self.send(F.APP, {"op": op, **fields})

    def recv(self, timeout: float | None = None, deadline: float | None = None) -> dict[str, Any]:
        """The next message within ``timeout`` s or by the monotonic ``deadline``. Raises PeerError (not
        our protocol), PeerGone (EOF) or TimeoutError."""
        if timeout is not None:
            deadline = time.monotonic() + timeout if deadline is None else min(deadline, time.monotonic() + timeout)
        if deadline is None:
            self.sock.settimeout(None)
        self.deadline = deadline
        try:
            kind, body = self.read_control()
        except PeerClosed:
            raise PeerGone(self.shut_reason or f"{self.peer} closed the connection") from None
        except ProtocolError as e:
            raise PeerError(f"{self.peer} broke the kvwire-bench control protocol: {e}") from None
        finally:
            self.deadline = None
        if kind != F.APP or not isinstance(body.get("op"), str):
            raise PeerError(f"{self.peer} sent a kvwire {kind!r} message where a kvwire-bench message belongs")
        return body


def expect(msg: dict[str, Any], op: str, peer: str, who: str = "server") -> dict[str, Any]:
    """``msg`` if it is ``op``; the peer's error reason, or a protocol complaint, otherwise (``who``: the
    peer's role, "server" or "client", for a BadMessage naming a field)."""
    if msg["op"] == "error":
        raise PeerError(f"{peer} refused: {read_reason(msg, who)}")
    if msg["op"] != op:
        raise PeerError(f"{peer} answered {msg['op']!r} where {op!r} was expected")
    return msg


def client_connect(host: str, port: int, key: bytes, ssl_context: ssl.SSLContext | None = None,
                   timeout: float = HANDSHAKE_TIMEOUT) -> tuple[BenchChannel, dict[str, Any]]:
    """Connect and authenticate both ways within ``timeout``; returns the channel and the server's welcome
    (``op`` "welcome" and what the server announced: ``data_port``, ``run``, ``server``, ``pool_bytes``, each
    checked: ``messages.read_welcome``; a BadMessage names a field that is not what it must be)."""
    peer = f"{host}:{port}"
    deadline = time.monotonic() + timeout
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except OSError as e:
        raise PeerError(f"cannot connect to a kvwire-bench server at {peer}: {e}") from None
    no_delay(sock)
    ch = BenchChannel(sock, peer)
    try:
        if ssl_context is not None:
            try:
                ch.sock = ssl_context.wrap_socket(sock, server_hostname=host)
            except ssl.SSLError as e:
                raise PeerError(f"TLS handshake with {peer} failed: {e.reason or e}") from None
        ch.sock.settimeout(max(0.001, deadline - time.monotonic()))  # the handshake's one deadline
        try:
            _, welcome = client_handshake(ch, key, 1)
        except AuthenticationError:
            raise PeerError(f"{peer} failed authentication: the pre-shared keys (--key) differ") from None
        except ProtocolError as e:
            raise PeerError(f"{peer} is not a kvwire-bench server: {e}") from None
        if welcome.get("service") != SERVICE:
            raise PeerError(f"{peer} is a kvwire receiver, not a kvwire-bench server (its data port?)")
        if welcome.get("bench") != PROTOCOL:
            raise PeerError(f"{peer} speaks kvwire-bench control protocol v{welcome.get('bench')}, this side "
                            f"speaks v{PROTOCOL}: use the same kvwire version on both ends")
        welcome = read_welcome(welcome)
        ch.authenticated()
        expect(ch.recv(deadline=deadline), "ok", peer)  # or the server's "busy"
        ch.sock.settimeout(None)
        return ch, {"op": "welcome", **welcome}
    except TimeoutError:
        ch.close()
        raise PeerError(f"no kvwire-bench answer from {peer} within {timeout:.1f} s: "
                        "not a kvwire-bench server (or it is stuck)") from None
    except (PeerClosed, PeerGone, ConnectionResetError):
        ch.close()
        raise PeerError(f"{peer} closed the connection during the handshake: not a kvwire-bench server, "
                        "a different version, or TLS/plain mismatch") from None
    except (OSError, PeerError):
        ch.close()
        raise


def server_handshake(ch: BenchChannel, key: bytes, welcome: dict[str, Any], deadline: float) -> None:
    """Answer a client's hello and check its proof by the monotonic ``deadline`` (the whole handshake,
    not each read); raises PeerError on any mismatch, PeerAuthFailed when the client's proof fails (its key
    differs; the client is told). The caller then sends ``ok`` (or ``error`` when it cannot run the test)."""
    ch.deadline = deadline
    try:
        kind, hello = server_hello(ch)
        if kind != F.HELLO:
            raise PeerError(f"{ch.peer}: a kvwire lane, not a kvwire-bench client")
        kvwire_server_handshake(ch, key, hello, {"service": SERVICE, "bench": PROTOCOL, **welcome},
                                lambda _keys: None)
    except AuthenticationError as e:
        raise PeerAuthFailed(f"{ch.peer}: {e}") from None
    except ProtocolError as e:
        raise PeerError(f"{ch.peer}: {e}") from None
    except PeerClosed:
        raise PeerGone(f"{ch.peer} closed the connection during the handshake") from None
    ch.authenticated()
