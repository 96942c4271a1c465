"""Session handshake: version check and mutual pre-shared-key authentication bound to the session.

Owns: the HELLO / CHALLENGE / AUTH / WELCOME exchange on the control connection and the LANE proof on
each data lane. Proofs are HMAC-SHA256 over both sides' fresh nonces and the session id, so a proof
cannot be replayed on another session or lane. TLS (``ssl.SSLContext``) wraps the sockets underneath
and is configured by the caller. Must not know: transfers or buffers.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..codec.frames import AUTH, CHALLENGE, ERROR, HELLO, LANE, VERSION, WELCOME
from ..errors import AuthenticationError, ProtocolError
from .wire import Channel

NONCE = 16


def _proof(key: bytes, role: bytes, *parts: bytes) -> bytes:
    return hmac.new(key, role + b"|" + b"|".join(parts), hashlib.sha256).digest()


@dataclass(frozen=True)
class SessionKeys:
    session_id: bytes
    client_nonce: bytes
    server_nonce: bytes

    def lane_proof(self, key: bytes, lane: int) -> bytes:
        return _proof(key, b"kvwire-lane", self.session_id, self.client_nonce, self.server_nonce,
                      lane.to_bytes(4, "little"))


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
    """Run on the client's control connection. Returns the session keys and the server's limits."""
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
    ch.send(LANE, {"session": keys.session_id, "lane": lane, "proof": keys.lane_proof(key, lane)})
    _expect(ch, WELCOME)


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


def check_lane(key: bytes, keys: SessionKeys, body: dict[str, Any]) -> int:
    lane = body.get("lane")
    if not isinstance(lane, int) or not 0 <= lane < 1024:
        raise ProtocolError("lane index malformed")
    if not hmac.compare_digest(_bytes(body, "proof", 32), keys.lane_proof(key, lane)):
        raise AuthenticationError("lane failed authentication")
    return lane
