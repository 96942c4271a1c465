"""The session handshake, sans-IO: version check and mutual pre-shared-key authentication bound to the session.

Owns: the messages of the HELLO / CHALLENGE / AUTH / WELCOME exchange on a control connection and of the
LANE / CHALLENGE / AUTH / WELCOME exchange on each data lane, for both ends: the nonces, the proofs
(HMAC-SHA256 over both sides' fresh nonces and the session id; a lane's proof also covers the lane index
and a nonce the receiver draws for that one connection, so no proof can be replayed on another session,
lane or connection), ``SessionKeys``, checking every field of the peer's messages, and their order, by
``rules`` (an out-of-order message is a ``ProtocolError``; the peer's ERROR, or a wrong proof, an
``AuthenticationError``). Must not know: sockets, timeouts or read limits before authentication (the
driver, ``kvwire.tcp._auth``, owns those), transfers or buffers.

Each side is a small object fed the peer's messages; it returns the messages to send, as
``(kind, body)`` pairs. Nonces come from ``os.urandom`` unless given (tests give them).

Each end also says how long it waits for the other before it fails the session (``PEER_TIMEOUT_KEY``, in the
HELLO and in the WELCOME ``limits``); ``heartbeat_for`` is how often the other end then sends heartbeats on
an idle connection, so that two ends configured apart never fail a healthy idle session as silent. An end
that does not say (an older peer) gets heartbeats at the interval it was configured with.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import os
from dataclasses import dataclass
from typing import Any

from ..errors import AuthenticationError, ProtocolError
from .frames import AUTH, CHALLENGE, ERROR, HELLO, LANE, VERSION, WELCOME
from .rules import RECEIVER_RECEIVES, SENDER_RECEIVES, Conn, Table, advance, legal

NONCE = 16
PROOF = 32

Message = tuple[str, dict[str, Any]]

#: HELLO and WELCOME ``limits`` key: seconds of silence after which the end that says it fails the session
PEER_TIMEOUT_KEY = "peer_timeout"
#: heartbeats an idle end sends within the other end's ``peer_timeout``
HEARTBEATS_PER_PEER_TIMEOUT = 4
#: the shortest heartbeat interval a peer's ``peer_timeout`` can ask for
MIN_HEARTBEAT = 0.05


def heartbeat_for(own: float, peer_timeout: object) -> float:
    """Seconds between heartbeats toward a peer that said it fails the session after ``peer_timeout`` s of
    silence: ``own`` (the configured interval), shortened so that ``HEARTBEATS_PER_PEER_TIMEOUT`` fit in the
    peer's timeout, never below ``MIN_HEARTBEAT``. A ``peer_timeout`` that is not a finite positive number
    (absent, from an older peer, or malformed) leaves ``own``."""
    if isinstance(peer_timeout, bool) or not isinstance(peer_timeout, (int, float)):
        return own
    if not math.isfinite(peer_timeout) or peer_timeout <= 0:
        return own
    return min(own, max(MIN_HEARTBEAT, peer_timeout / HEARTBEATS_PER_PEER_TIMEOUT))


def proof(key: bytes, role: bytes, *parts: bytes) -> bytes:
    """HMAC-SHA256 of ``role`` and ``parts`` under the pre-shared ``key``."""
    return hmac.new(key, role + b"|" + b"|".join(parts), hashlib.sha256).digest()


@dataclass(frozen=True)
class SessionKeys:
    session_id: bytes
    client_nonce: bytes
    server_nonce: bytes

    def client_proof(self, key: bytes) -> bytes:
        return proof(key, b"kvwire-client", self.session_id, self.client_nonce, self.server_nonce)

    def server_proof(self, key: bytes) -> bytes:
        return proof(key, b"kvwire-server", self.session_id, self.client_nonce, self.server_nonce)

    def lane_proof(self, key: bytes, lane: int, lane_nonce: bytes) -> bytes:
        """The proof for lane ``lane`` on the one connection whose receiver drew ``lane_nonce``."""
        return proof(key, b"kvwire-lane", self.session_id, self.client_nonce, self.server_nonce,
                     lane.to_bytes(4, "little"), lane_nonce)


class Refused(AuthenticationError):
    """The peer failed authentication; ``reply`` is the ERROR to send it before closing."""

    def __init__(self, message: str, reply: Message) -> None:
        super().__init__(message)
        self.reply = reply


def field_bytes(body: dict[str, Any], key: str, n: int) -> bytes:
    v = body.get(key)
    if not isinstance(v, bytes) or len(v) != n:
        raise ProtocolError(f"field {key!r} must be {n} bytes")
    return v


def lane_index(body: dict[str, Any]) -> int:
    """The lane index a LANE message names."""
    lane = body.get("lane")
    if type(lane) is not int or not 0 <= lane < 1024:
        raise ProtocolError("lane index malformed")
    return lane


def _step(table: Table, state: Conn, kind: str, body: dict[str, Any], end: str) -> Conn:
    """The next state; the peer's ERROR (where legal: the handshake) is its refusal."""
    if kind == ERROR and ERROR in legal(table, state):
        raise AuthenticationError(f"peer refused: {body.get('reason', '?')}")
    return advance(table, state, kind, end)


def _nonce(given: bytes | None) -> bytes:
    return os.urandom(NONCE) if given is None else given


# ---------------------------------------------------------------- client (the sender)


class ClientHandshake:
    """The sender's control connection: ``hello()``, then ``receive`` the CHALLENGE (answer: AUTH) and
    the WELCOME (answer: nothing; ``keys`` and the receiver's ``limits`` are then known)."""

    def __init__(self, key: bytes, lanes: int, nonce: bytes | None = None,
                 peer_timeout: float | None = None) -> None:
        """``peer_timeout``: this end's, told in the HELLO (the receiver heartbeats within it)."""
        self.key, self.lanes, self.peer_timeout = key, lanes, peer_timeout
        self.nonce = _nonce(nonce)
        self.state = Conn.HELLO_SENT
        self._keys: SessionKeys | None = None
        self.limits: dict[str, Any] = {}

    def hello(self) -> Message:
        body: dict[str, Any] = {"version": VERSION, "nonce": self.nonce, "lanes": self.lanes}
        if self.peer_timeout is not None:
            body[PEER_TIMEOUT_KEY] = self.peer_timeout
        return HELLO, body

    @property
    def keys(self) -> SessionKeys:
        if self._keys is None or self.state is not Conn.OPEN:
            raise ProtocolError("the handshake is not complete")
        return self._keys

    def receive(self, kind: str, body: dict[str, Any]) -> list[Message]:
        nxt = _step(SENDER_RECEIVES, self.state, kind, body, "sender")
        if kind == CHALLENGE:
            self._keys = SessionKeys(field_bytes(body, "session", NONCE), self.nonce,
                                     field_bytes(body, "nonce", NONCE))
            self.state = nxt
            return [(AUTH, {"proof": self._keys.client_proof(self.key)})]
        assert self._keys is not None  # WELCOME is legal only after CHALLENGE
        if not hmac.compare_digest(field_bytes(body, "proof", PROOF), self._keys.server_proof(self.key)):
            raise AuthenticationError("server failed authentication (wrong pre-shared key?)")
        limits = body.get("limits", {})
        self.limits = limits if isinstance(limits, dict) else {}
        self.state = nxt
        return []


class ClientLane:
    """The sender opening lane ``lane`` of a session: ``open()``, then ``receive`` the lane's CHALLENGE
    (answer: AUTH) and its WELCOME (the lane is open)."""

    def __init__(self, key: bytes, keys: SessionKeys, lane: int) -> None:
        self.key, self.keys, self.lane = key, keys, lane
        self.state = Conn.LANE_SENT

    def open(self) -> Message:
        return LANE, {"session": self.keys.session_id, "lane": self.lane}

    def receive(self, kind: str, body: dict[str, Any]) -> list[Message]:
        nxt = _step(SENDER_RECEIVES, self.state, kind, body, "sender")
        self.state = Conn.LANE_OPEN if kind == WELCOME else nxt
        if kind == CHALLENGE:
            return [(AUTH, {"proof": self.keys.lane_proof(self.key, self.lane, field_bytes(body, "nonce", NONCE))})]
        return []


# ---------------------------------------------------------------- server (the receiver)


def opening(kind: str, body: dict[str, Any]) -> Conn:
    """The first message on an accepted connection: HELLO (a session: ``Conn.CHALLENGED`` next) or LANE
    (a data lane: ``Conn.LANE_CHALLENGED``). ``AuthenticationError`` for a HELLO of another version."""
    nxt = advance(RECEIVER_RECEIVES, Conn.AWAIT_HELLO, kind, "receiver")
    if kind == HELLO and body.get("version") != VERSION:
        raise AuthenticationError(f"client speaks version {body.get('version')!r}, server {VERSION}")
    return nxt


class ServerHandshake:
    """The receiver's side of a control connection that opened with ``hello``: ``challenge()``, then
    ``receive`` the AUTH (the session's keys, or ``Refused``), then ``welcome(limits)``."""

    def __init__(self, key: bytes, hello: dict[str, Any], session_id: bytes | None = None,
                 nonce: bytes | None = None) -> None:
        self.key = key
        self.keys = SessionKeys(_nonce(session_id), field_bytes(hello, "nonce", NONCE), _nonce(nonce))
        self.state = Conn.CHALLENGED

    def challenge(self) -> Message:
        return CHALLENGE, {"session": self.keys.session_id, "nonce": self.keys.server_nonce}

    def receive(self, kind: str, body: dict[str, Any]) -> SessionKeys:
        nxt = _step(RECEIVER_RECEIVES, self.state, kind, body, "receiver")
        if not hmac.compare_digest(field_bytes(body, "proof", PROOF), self.keys.client_proof(self.key)):
            self.state = Conn.CLOSED
            raise Refused("client failed authentication", (ERROR, {"reason": "authentication failed"}))
        self.state = nxt
        return self.keys

    def welcome(self, limits: dict[str, Any]) -> Message:
        if self.state is not Conn.OPEN:
            raise ProtocolError("welcome before the client proved the key")
        return WELCOME, {"proof": self.keys.server_proof(self.key), "limits": limits}


class ServerLane:
    """The receiver's side of a lane connection naming session ``keys`` and lane ``lane``: ``challenge()``
    with a nonce drawn for this connection alone, then ``receive`` the AUTH (``Refused`` unless its proof
    answers it), then ``welcome()``."""

    def __init__(self, key: bytes, keys: SessionKeys, lane: int, nonce: bytes | None = None) -> None:
        self.key, self.keys, self.lane = key, keys, lane
        self.nonce = _nonce(nonce)
        self.state = Conn.LANE_CHALLENGED

    def challenge(self) -> Message:
        return CHALLENGE, {"nonce": self.nonce}

    def receive(self, kind: str, body: dict[str, Any]) -> None:
        nxt = _step(RECEIVER_RECEIVES, self.state, kind, body, "receiver")
        if not hmac.compare_digest(field_bytes(body, "proof", PROOF),
                                   self.keys.lane_proof(self.key, self.lane, self.nonce)):
            self.state = Conn.CLOSED
            raise Refused("lane failed authentication", (ERROR, {"reason": "lane authentication failed"}))
        self.state = nxt

    def welcome(self) -> Message:
        if self.state is not Conn.LANE_OPEN:
            raise ProtocolError("welcome before the lane proved the key")
        return WELCOME, {}
