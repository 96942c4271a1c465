"""The bench's side channel: one TCP connection per test beside the kvwire session, msgpack frames.

Owns: the frame format (``"KVBN"``, protocol version u8, length u32, then a msgpack map with an ``"op"``),
bounded reads with deadlines, the mutual HMAC handshake over the pre-shared key (one total deadline,
messages of at most ``PREAUTH_BODY`` bytes until the peer has proven the key), and the clear errors a
client gets from a peer that is not a kvwire-bench server. Must not know: kvwire sessions, layouts,
payloads or reports. Nothing is pickled; every length read from the peer is bounded before it is used.

Handshake (client speaks first, so a silent or garbage-writing peer is caught by the client's deadline)::

    C: hello {v, nonce}      S: welcome {v, nonce, proof, data_port, run, server}
    C: auth {proof}          S: ok {} | error {reason}
"""

from __future__ import annotations

import hashlib
import hmac
import os
import socket
import ssl
import struct
import threading
import time
from typing import Any

import msgpack

from .errors import PeerError, PeerGone

MAGIC = b"KVBN"
PROTOCOL = 1
_HEADER = struct.Struct("<4sBI")
MAX_BODY = 4 * 1024 * 1024
#: the largest message read from a peer that has not authenticated (the handshake's are < 300 bytes)
PREAUTH_BODY = 4096
HANDSHAKE_TIMEOUT = 2.0


def _proof(key: bytes, role: bytes, nonce_c: bytes, nonce_s: bytes) -> bytes:
    return hmac.new(key, b"kvwire-bench|" + role + b"|" + nonce_c + b"|" + nonce_s, hashlib.sha256).digest()


class Channel:
    """A control connection: whole frames out under a lock, whole frames in with a deadline."""

    def __init__(self, sock: socket.socket, peer: str) -> None:
        self.sock = sock
        self.peer = peer
        self.max_body = PREAUTH_BODY  # raised to MAX_BODY once the handshake authenticated the peer
        self._wlock = threading.Lock()
        self._hdr = bytearray(_HEADER.size)
        self.closed = False

    def send(self, op: str, **fields: Any) -> None:
        body = msgpack.packb({"op": op, **fields}, use_bin_type=True)
        if len(body) > MAX_BODY:
            raise ValueError(f"control message {op!r} of {len(body)} bytes exceeds {MAX_BODY}")
        with self._wlock:
            self.sock.sendall(_HEADER.pack(MAGIC, PROTOCOL, len(body)) + body)

    def _read_exact(self, view: memoryview, deadline: float | None, what: str) -> None:
        got = 0
        while got < len(view):
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(what)
                self.sock.settimeout(left)
            n = self.sock.recv_into(view[got:])
            if n == 0:
                raise PeerGone(f"{self.peer} closed the connection{what}")
            got += n

    def recv(self, timeout: float | None = None, deadline: float | None = None) -> dict[str, Any]:
        """The next message within ``timeout`` s or by the monotonic ``deadline``. Raises PeerError (not
        our protocol), PeerGone (EOF) or socket.timeout."""
        if timeout is not None:
            deadline = time.monotonic() + timeout if deadline is None else min(deadline, time.monotonic() + timeout)
        if deadline is None:
            self.sock.settimeout(None)
        view = memoryview(self._hdr)
        self._read_exact(view, deadline, "")
        magic, version, length = _HEADER.unpack(self._hdr)
        if magic != MAGIC:
            raise PeerError(f"{self.peer} is not a kvwire-bench peer: it sent {bytes(self._hdr)!r}")
        if version != PROTOCOL:
            raise PeerError(f"{self.peer} speaks kvwire-bench control protocol v{version}, "
                            f"this side speaks v{PROTOCOL}: use the same kvwire version on both ends")
        if not 0 < length <= self.max_body:
            raise PeerError(f"{self.peer} sent a control frame of {length} bytes (limit {self.max_body})")
        body = bytearray(length)
        self._read_exact(memoryview(body), deadline, " in the middle of a message")
        try:
            msg = msgpack.unpackb(bytes(body), raw=False, strict_map_key=True, max_str_len=1 << 20,
                                  max_bin_len=1 << 16, max_array_len=1 << 20, max_map_len=1 << 16,
                                  max_ext_len=0)
        except Exception as e:  # msgpack raises many types on hostile input
            raise PeerError(f"{self.peer} sent an undecodable control message: {type(e).__name__}") from None
        if not isinstance(msg, dict) or not isinstance(msg.get("op"), str):
            raise PeerError(f"{self.peer} sent a control message without an op")
        return msg

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


def expect(msg: dict[str, Any], op: str, peer: str) -> dict[str, Any]:
    """``msg`` if it is ``op``; the peer's error reason, or a protocol complaint, otherwise."""
    if msg["op"] == "error":
        raise PeerError(f"{peer} refused: {msg.get('reason', '?')}")
    if msg["op"] != op:
        raise PeerError(f"{peer} answered {msg['op']!r} where {op!r} was expected")
    return msg


def client_connect(host: str, port: int, key: bytes, ssl_context: ssl.SSLContext | None = None,
                   timeout: float = HANDSHAKE_TIMEOUT) -> tuple[Channel, dict[str, Any]]:
    """Connect and authenticate both ways within ``timeout``; returns the channel and the server's welcome."""
    peer = f"{host}:{port}"
    deadline = time.monotonic() + timeout
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except OSError as e:
        raise PeerError(f"cannot connect to a kvwire-bench server at {peer}: {e}") from None
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    ch = Channel(sock, peer)
    try:
        if ssl_context is not None:
            try:
                ch.sock = ssl_context.wrap_socket(sock, server_hostname=host)
            except ssl.SSLError as e:
                raise PeerError(f"TLS handshake with {peer} failed: {e.reason or e}") from None
        nonce_c = os.urandom(16)
        ch.send("hello", v=PROTOCOL, nonce=nonce_c)
        welcome = expect(ch.recv(max(0.0, deadline - time.monotonic())), "welcome", peer)
        nonce_s = welcome.get("nonce")
        if not isinstance(nonce_s, bytes) or len(nonce_s) != 16:
            raise PeerError(f"{peer} sent a malformed welcome")
        proof = welcome.get("proof")
        want = _proof(key, b"server", nonce_c, nonce_s)
        if not isinstance(proof, bytes) or not hmac.compare_digest(proof, want):
            raise PeerError(f"{peer} failed authentication: the pre-shared keys (--key) differ")
        ch.send("auth", proof=_proof(key, b"client", nonce_c, nonce_s))
        expect(ch.recv(max(0.0, deadline - time.monotonic())), "ok", peer)
        ch.max_body = MAX_BODY
        ch.sock.settimeout(None)
        return ch, welcome
    except TimeoutError:
        ch.close()
        raise PeerError(f"no kvwire-bench answer from {peer} within {timeout:.1f} s: "
                        "not a kvwire-bench server (or it is stuck)") from None
    except PeerGone:
        ch.close()
        raise PeerError(f"{peer} closed the connection during the handshake: not a kvwire-bench server, "
                        "a different version, or TLS/plain mismatch") from None
    except (OSError, PeerError):
        ch.close()
        raise


def server_handshake(ch: Channel, key: bytes, welcome: dict[str, Any], deadline: float) -> None:
    """Answer a client's hello and check its proof by the monotonic ``deadline`` (the whole handshake,
    not each read); raises PeerError (after telling the client why) on any mismatch. The caller then
    sends ``ok`` (or ``error`` when it cannot run the test)."""
    hello = ch.recv(deadline=deadline)
    if hello["op"] != "hello" or hello.get("v") != PROTOCOL:
        ch.send("error", reason=f"expected hello v{PROTOCOL}, got {hello['op']!r} v{hello.get('v')!r}")
        raise PeerError(f"{ch.peer}: bad hello")
    nonce_c = hello.get("nonce")
    if not isinstance(nonce_c, bytes) or len(nonce_c) != 16:
        ch.send("error", reason="malformed hello")
        raise PeerError(f"{ch.peer}: malformed hello")
    nonce_s = os.urandom(16)
    ch.send("welcome", v=PROTOCOL, nonce=nonce_s, proof=_proof(key, b"server", nonce_c, nonce_s), **welcome)
    auth = ch.recv(deadline=deadline)
    proof = auth.get("proof")
    if (auth["op"] != "auth" or not isinstance(proof, bytes)
            or not hmac.compare_digest(proof, _proof(key, b"client", nonce_c, nonce_s))):
        ch.send("error", reason="authentication failed (wrong --key?)")
        raise PeerError(f"{ch.peer} failed authentication")
    ch.max_body = MAX_BODY
