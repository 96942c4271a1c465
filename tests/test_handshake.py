"""The session handshake's messages alone (``kvwire.codec.handshake``), no sockets: both ends run against
each other, every message in every handshake state (legal ones handled, the rest a ProtocolError), refusals,
wrong keys, replayed proofs and malformed fields."""

from __future__ import annotations

from typing import Any

import pytest

from kvwire.codec import frames as F
from kvwire.codec.handshake import (
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
from kvwire.codec.rules import RECEIVER_RECEIVES, SENDER_RECEIVES, Conn
from kvwire.errors import AuthenticationError, ProtocolError

KEY = b"k" * 32
KINDS = sorted(F.CONTROL_KINDS)


def session(client_key: bytes = KEY, server_key: bytes = KEY) -> tuple[ClientHandshake, ServerHandshake]:
    """Run the control exchange to its end; returns both ends."""
    c = ClientHandshake(client_key, lanes=4)
    kind, hello = c.hello()
    assert kind == F.HELLO and opening(kind, hello) is Conn.CHALLENGED and hello["lanes"] == 4
    s = ServerHandshake(server_key, hello)
    ((auth_kind, auth),) = c.receive(*s.challenge())
    assert auth_kind == F.AUTH and c.state is Conn.AUTH_SENT
    keys = s.receive(auth_kind, auth)
    assert c.receive(*s.welcome({"max_chunk": 123})) == []
    assert c.state is s.state is Conn.OPEN and keys == c.keys
    return c, s


def test_both_ends_agree_on_the_session_and_the_receivers_limits() -> None:
    c, s = session()
    assert c.limits == {"max_chunk": 123}
    assert len(c.keys.session_id) == len(c.keys.client_nonce) == len(c.keys.server_nonce) == NONCE
    assert c.keys.client_nonce == c.nonce and c.keys != session()[0].keys  # fresh nonces each time


def test_a_wrong_key_is_refused_by_the_server_and_the_client_each() -> None:
    with pytest.raises(Refused, match="client failed authentication") as e:
        session(client_key=b"wrong")
    assert e.value.reply == (F.ERROR, {"reason": "authentication failed"})
    # a server without the key cannot forge its welcome: the client refuses it
    c = ClientHandshake(KEY, lanes=1)
    s = ServerHandshake(b"other", c.hello()[1])
    c.receive(*s.challenge())
    forged = (F.WELCOME, {"proof": SessionKeys(s.keys.session_id, c.nonce, s.keys.server_nonce).server_proof(b"other")})
    with pytest.raises(AuthenticationError, match="server failed authentication"):
        c.receive(*forged)
    with pytest.raises(ProtocolError, match="not complete"):
        _ = c.keys


def test_lanes_prove_the_key_for_their_session_lane_and_connection() -> None:
    c, _ = session()
    lane = ClientLane(KEY, c.keys, 3)
    kind, body = lane.open()
    assert opening(kind, body) is Conn.LANE_CHALLENGED and lane_index(body) == 3
    srv = ServerLane(KEY, c.keys, lane_index(body))
    ((k, auth),) = lane.receive(*srv.challenge())
    srv.receive(k, auth)
    assert lane.receive(*srv.welcome()) == [] and lane.state is srv.state is Conn.LANE_OPEN
    # the same proof on another connection (another nonce), another lane index or another session fails
    for other in (ServerLane(KEY, c.keys, 3), ServerLane(KEY, c.keys, 4), ServerLane(KEY, session()[0].keys, 3)):
        with pytest.raises(Refused, match="lane failed authentication") as e:
            other.receive(k, auth)
        assert e.value.reply == (F.ERROR, {"reason": "lane authentication failed"})
        with pytest.raises(ProtocolError):
            other.welcome()


def test_the_opening_message_and_its_version() -> None:
    for kind in KINDS:
        if kind in (F.HELLO, F.LANE):
            assert opening(kind, {"version": F.VERSION}) is RECEIVER_RECEIVES[Conn.AWAIT_HELLO][kind]
        else:
            with pytest.raises(ProtocolError, match="await_hello"):
                opening(kind, {})
    with pytest.raises(AuthenticationError, match="version 1"):
        opening(F.HELLO, {"version": 1})
    for bad in ({}, {"lane": -1}, {"lane": 1024}, {"lane": "1"}, {"lane": True}):
        with pytest.raises(ProtocolError, match="lane index"):
            lane_index(bad)


def _client_in(state: Conn) -> ClientHandshake | ClientLane:
    if state is Conn.LANE_SENT:
        return ClientLane(KEY, session()[0].keys, 0)
    c = ClientHandshake(KEY, 1)
    if state is Conn.AUTH_SENT:
        c.receive(F.CHALLENGE, {"session": b"s" * NONCE, "nonce": b"n" * NONCE})
    return c


@pytest.mark.parametrize("state", [Conn.HELLO_SENT, Conn.LANE_SENT, Conn.AUTH_SENT])
@pytest.mark.parametrize("kind", KINDS)
def test_every_message_in_every_client_handshake_state(state: Conn, kind: str) -> None:
    c = _client_in(state)
    assert c.state is state
    if kind == F.ERROR:
        with pytest.raises(AuthenticationError, match="peer refused: full"):
            c.receive(kind, {"reason": "full"})
    elif kind in SENDER_RECEIVES[state]:  # challenge or welcome: a malformed body is a typed error
        with pytest.raises(ProtocolError, match="must be"):
            c.receive(kind, {})
    else:
        with pytest.raises(ProtocolError, match=f"unexpected '{kind}'.*'{state.value}'"):
            c.receive(kind, {})


@pytest.mark.parametrize("state", [Conn.CHALLENGED, Conn.LANE_CHALLENGED])
@pytest.mark.parametrize("kind", KINDS)
def test_every_message_in_every_server_handshake_state(state: Conn, kind: str) -> None:
    hello = {"version": F.VERSION, "nonce": b"c" * NONCE}
    s: ServerHandshake | ServerLane = (ServerHandshake(KEY, hello) if state is Conn.CHALLENGED
                                       else ServerLane(KEY, session()[0].keys, 0))
    body: dict[str, Any] = {"proof": b"p" * 32, "reason": "gave up"}
    if kind == F.AUTH:
        with pytest.raises(Refused):
            s.receive(kind, body)
    elif kind == F.ERROR:
        with pytest.raises(AuthenticationError, match="peer refused: gave up"):
            s.receive(kind, body)
    else:
        with pytest.raises(ProtocolError, match=f"unexpected '{kind}'.*'{state.value}'"):
            s.receive(kind, body)
    assert set(RECEIVER_RECEIVES[state]) == {F.AUTH, F.ERROR}


def test_malformed_fields_are_protocol_errors() -> None:
    with pytest.raises(ProtocolError, match="'nonce' must be 16 bytes"):
        ServerHandshake(KEY, {"version": F.VERSION, "nonce": b"short"})
    s = ServerHandshake(KEY, {"version": F.VERSION, "nonce": b"c" * NONCE})
    with pytest.raises(ProtocolError, match="'proof' must be 32 bytes"):
        s.receive(F.AUTH, {"proof": "not bytes"})
    c = ClientHandshake(KEY, 1)
    with pytest.raises(ProtocolError, match="'session' must be 16 bytes"):
        c.receive(F.CHALLENGE, {"session": b"x", "nonce": b"n" * NONCE})
    with pytest.raises(ProtocolError, match="welcome before"):
        ServerHandshake(KEY, {"nonce": b"c" * NONCE}).welcome({})


def test_the_limits_a_client_reads_are_a_dict_or_nothing() -> None:
    c = ClientHandshake(KEY, 1)
    s = ServerHandshake(KEY, c.hello()[1])
    ((k, auth),) = c.receive(*s.challenge())
    s.receive(k, auth)
    kind, welcome = s.welcome({})
    c.receive(kind, {**welcome, "limits": [1, 2]})
    assert c.limits == {} and c.state is Conn.OPEN
    with pytest.raises(ProtocolError, match="'open'"):
        c.receive(kind, welcome)  # a second welcome
