"""Session handshake: version check and mutual pre-shared-key authentication bound to the session.

Owns: the HELLO / CHALLENGE / AUTH / WELCOME exchange on the control connection and the LANE /
CHALLENGE / AUTH / WELCOME exchange on each data lane. Proofs are HMAC-SHA256 over both sides' fresh
nonces and the session id; a lane's proof also covers the lane index and a nonce the receiver draws
for that one connection, so no proof can be replayed on another session, lane or connection. Until
the peer has proven the key, control messages are read with ``preauth_limits`` (a few KiB at most).
TLS (``ssl.SSLContext``) wraps the sockets underneath and is configured by the caller. Must not know:
transfers or buffers.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from ..codec.frames import AUTH, CHALLENGE, ERROR, HELLO, LANE, VERSION, WELCOME, preauth_limits
from ..errors import AuthenticationError, ProtocolError
from .wire import Channel

NONCE = 16
CLIENT_HANDSHAKE_TIMEOUT = 10.0  # for a socket without a timeout of its own


def _proof(key: bytes, role: bytes, *parts: bytes) -> bytes:
    return hmac.new(key, role + b"|" + b"|".join(parts), hashlib.sha256).digest()


@dataclass(frozen=True)
class SessionKeys:
    session_id: bytes
    client_nonce: bytes
    server_nonce: bytes

    def lane_proof(self, key: bytes, lane: int, lane_nonce: bytes) -> bytes:
        """The proof for lane ``lane`` on the one connection whose receiver drew ``lane_nonce``."""
        return _proof(key, b"kvwire-lane", self.session_id, self.client_nonce, self.server_nonce,
                      lane.to_bytes(4, "little"), lane_nonce)


def _expect(ch: Channel, kind: str) -> dict[str, Any]:
    got, body = ch.read_control()
    if got == ERROR:
        raise AuthenticationError(f"peer refused: {body.get('reason', '?')}")
    if got != kind:
        raise ProtocolError(f"expected {kind!r}, got {got!r}")
    return body


def _bytes(body: dict[str, Any], key: str, n: int) -> bytes:
    v = body.get(key)
    if not isinstance(v, bytes) or len(v) != n:
        raise ProtocolError(f"field {key!r} must be {n} bytes")
    return v


def client_handshake(ch: Channel, key: bytes, lanes: int) -> tuple[SessionKeys, dict[str, Any]]:
    """Run on the client's control connection. Returns the session keys and the server's limits. The
    whole exchange ends within the socket's timeout, however slowly the server answers."""
    with _preauth(ch):
        nonce_c = os.urandom(NONCE)
        ch.send(HELLO, {"version": VERSION, "nonce": nonce_c, "lanes": lanes})
        body = _expect(ch, CHALLENGE)
        keys = SessionKeys(_bytes(body, "session", NONCE), nonce_c, _bytes(body, "nonce", NONCE))
        ch.send(AUTH, {"proof": _proof(key, b"kvwire-client", keys.session_id, nonce_c, keys.server_nonce)})
        body = _expect(ch, WELCOME)
        want = _proof(key, b"kvwire-server", keys.session_id, nonce_c, keys.server_nonce)
        if not hmac.compare_digest(_bytes(body, "proof", 32), want):
            raise AuthenticationError("server failed authentication (wrong pre-shared key?)")
    limits = body.get("limits", {})
    return keys, limits if isinstance(limits, dict) else {}


def client_lane(ch: Channel, key: bytes, keys: SessionKeys, lane: int) -> None:
    """Open lane ``lane`` of the session: name it, answer the receiver's fresh challenge (within the
    socket's timeout in all)."""
    with _preauth(ch):
        ch.send(LANE, {"session": keys.session_id, "lane": lane})
        nonce = _bytes(_expect(ch, CHALLENGE), "nonce", NONCE)
        ch.send(AUTH, {"proof": keys.lane_proof(key, lane, nonce)})
        _expect(ch, WELCOME)


@contextmanager
def _preauth(ch: Channel) -> Iterator[None]:
    """While the server is unproven: small control messages only, and one deadline for the exchange."""
    full, timeout = ch.limits, ch.sock.gettimeout()
    ch.limits = preauth_limits(full)
    ch.deadline = time.monotonic() + (timeout if timeout is not None else CLIENT_HANDSHAKE_TIMEOUT)
    try:
        yield
    finally:
        ch.limits, ch.deadline = full, None
        ch.sock.settimeout(timeout)


def server_hello(ch: Channel) -> tuple[str, dict[str, Any]]:
    """First frame on an accepted connection: HELLO (control) or LANE (data lane)."""
    kind, body = ch.read_control()
    if kind not in (HELLO, LANE):
        raise ProtocolError(f"connection must open with hello or lane, got {kind!r}")
    if kind == HELLO and body.get("version") != VERSION:
        raise AuthenticationError(f"client speaks version {body.get('version')!r}, server {VERSION}")
    return kind, body


def server_handshake(ch: Channel, key: bytes, hello: dict[str, Any], limits: dict[str, Any],
                     register: Callable[[SessionKeys], None]) -> SessionKeys:
    """Verify the client's proof, ``register`` the session (so its lanes find it), then WELCOME it."""
    keys = SessionKeys(os.urandom(NONCE), _bytes(hello, "nonce", NONCE), os.urandom(NONCE))
    ch.send(CHALLENGE, {"session": keys.session_id, "nonce": keys.server_nonce})
    body = _expect(ch, AUTH)
    want = _proof(key, b"kvwire-client", keys.session_id, keys.client_nonce, keys.server_nonce)
    if not hmac.compare_digest(_bytes(body, "proof", 32), want):
        ch.send(ERROR, {"reason": "authentication failed"})
        raise AuthenticationError("client failed authentication")
    register(keys)
    ch.send(WELCOME, {"proof": _proof(key, b"kvwire-server", keys.session_id, keys.client_nonce,
                                      keys.server_nonce), "limits": limits})
    return keys


def lane_index(body: dict[str, Any]) -> int:
    """The lane index a LANE message names."""
    lane = body.get("lane")
    if type(lane) is not int or not 0 <= lane < 1024:
        raise ProtocolError("lane index malformed")
    return lane


def server_lane(ch: Channel, key: bytes, keys: SessionKeys, lane: int) -> None:
    """Challenge a lane connection with a nonce drawn for it alone; raise unless its proof answers it."""
    nonce = os.urandom(NONCE)
    ch.send(CHALLENGE, {"nonce": nonce})
    body = _expect(ch, AUTH)
    if not hmac.compare_digest(_bytes(body, "proof", 32), keys.lane_proof(key, lane, nonce)):
        ch.send(ERROR, {"reason": "lane authentication failed"})
        raise AuthenticationError("lane failed authentication")
