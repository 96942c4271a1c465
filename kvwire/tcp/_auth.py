"""The session handshake's I/O: runs ``codec.handshake``'s sans-IO exchanges over a ``Channel``.

Owns: reading and writing the handshake's frames on a control connection and on each data lane, the
small read limits while the peer is unproven (``preauth_limits``: a few KiB at most), and one deadline for
the whole exchange on the client. What the messages say, the nonces, proofs, ``SessionKeys`` and the order
of messages are ``kvwire.codec.handshake``'s (names re-exported here). TLS (``ssl.SSLContext``) wraps the
sockets underneath and is configured by the caller. Must not know: transfers or buffers.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from ..codec.frames import preauth_limits
from ..codec.handshake import (
    NONCE,
    ClientHandshake,
    ClientLane,
    Refused,
    ServerHandshake,
    ServerLane,
    SessionKeys,
    lane_index,
    opening,
)
from ._wire import Channel

__all__ = ["CLIENT_HANDSHAKE_TIMEOUT", "NONCE", "SessionKeys", "client_handshake", "client_lane", "lane_index",
           "server_handshake", "server_hello", "server_lane"]

CLIENT_HANDSHAKE_TIMEOUT = 10.0  # for a socket without a timeout of its own


def client_handshake(ch: Channel, key: bytes, lanes: int,
                     peer_timeout: float | None = None) -> tuple[SessionKeys, dict[str, Any]]:
    """Run on the client's control connection. Returns the session keys and the server's limits. The
    whole exchange ends within the socket's timeout, however slowly the server answers. ``peer_timeout``:
    this end's, told to the server (which heartbeats within it)."""
    with _preauth(ch):
        hs = ClientHandshake(key, lanes, peer_timeout=peer_timeout)
        ch.send(*hs.hello())
        for _ in range(2):  # the challenge (answered with auth), then the welcome
            for kind, body in hs.receive(*ch.read_control()):
                ch.send(kind, body)
    return hs.keys, hs.limits


def client_lane(ch: Channel, key: bytes, keys: SessionKeys, lane: int) -> None:
    """Open lane ``lane`` of the session: name it, answer the receiver's fresh challenge (within the
    socket's timeout in all)."""
    with _preauth(ch):
        hs = ClientLane(key, keys, lane)
        ch.send(*hs.open())
        for _ in range(2):
            for kind, body in hs.receive(*ch.read_control()):
                ch.send(kind, body)


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
    opening(kind, body)  # hello or lane, else ProtocolError
    return kind, body


def server_handshake(ch: Channel, key: bytes, hello: dict[str, Any], limits: dict[str, Any],
                     register: Callable[[SessionKeys], None]) -> SessionKeys:
    """Verify the client's proof, ``register`` the session (so its lanes find it), then WELCOME it."""
    hs = ServerHandshake(key, hello)
    ch.send(*hs.challenge())
    try:
        keys = hs.receive(*ch.read_control())
    except Refused as e:
        ch.send(*e.reply)
        raise
    register(keys)
    ch.send(*hs.welcome(limits))
    return keys


def server_lane(ch: Channel, key: bytes, keys: SessionKeys, lane: int) -> None:
    """Challenge a lane connection with a nonce drawn for it alone; raise unless its proof answers it."""
    hs = ServerLane(key, keys, lane)
    ch.send(*hs.challenge())
    try:
        hs.receive(*ch.read_control())
    except Refused as e:
        ch.send(*e.reply)
        raise
