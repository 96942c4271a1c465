"""Which control message is legal in which state of a connection, for both ends: the rules as tables.

Owns: the connection states of a session's control connection and of a data lane, seen from each end,
and for each state the control messages the peer may send in it with the state each one leads to.
Anything not in a table is a protocol violation: ``advance`` raises ``ProtocolError`` naming the message,
the state and the end, and the connection is failed by whoever drives it. Must not know: what a message
carries (``messages.py`` parses bodies), transfers (their own machines are ``transfer.py``'s), sockets,
threads or clocks.

The rules (control connection, sender = client, receiver = server)::

    sender state     receiver sends                     next state
    HELLO_SENT       challenge                          AUTH_SENT      (sender answers with auth)
    AUTH_SENT        welcome                            OPEN
    OPEN             accept reject ack nack complete    OPEN
                     cancel error heartbeat             OPEN
                     bye                                CLOSED
    CLOSED           (nothing: the connection is gone)

    receiver state   sender sends                       next state
    AWAIT_HELLO      hello                              CHALLENGED     (receiver answers with challenge)
                     lane                               LANE_CHALLENGED (a data lane, not a session)
    CHALLENGED       auth                               OPEN           (receiver answers with welcome)
    OPEN             begin done cancel heartbeat        OPEN
                     bye                                CLOSED
    LANE_CHALLENGED  auth                               LANE_OPEN
    LANE_OPEN        bye                                CLOSED         (data frames are not control)
    CLOSED           (nothing)

A data lane seen from the sender: ``LANE_SENT`` --challenge--> ``AUTH_SENT`` --welcome--> ``LANE_OPEN``;
after its welcome the receiver never writes on a lane. ``error`` before ``OPEN`` (a refused key, too many
sessions) is legal in every handshake state and ends the connection: it is how a receiver says no (and,
after the challenge, how a sender gives up).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping

from ..errors import ProtocolError
from .frames import (
    ACCEPT,
    ACK,
    AUTH,
    BEGIN,
    BYE,
    CANCEL,
    CHALLENGE,
    COMPLETE,
    DONE,
    ERROR,
    HEARTBEAT,
    HELLO,
    LANE,
    NACK,
    REJECT,
    WELCOME,
)


class Conn(enum.Enum):
    """The state of one connection (control or lane), from one end's point of view."""

    # sender (client) side
    HELLO_SENT = "hello_sent"
    LANE_SENT = "lane_sent"
    AUTH_SENT = "auth_sent"
    # receiver (server) side
    AWAIT_HELLO = "await_hello"
    CHALLENGED = "challenged"
    LANE_CHALLENGED = "lane_challenged"
    # both
    OPEN = "open"
    LANE_OPEN = "lane_open"
    CLOSED = "closed"


Table = Mapping[Conn, Mapping[str, Conn]]

#: what the sender may receive from the receiver, by the state of the sender's connection
SENDER_RECEIVES: Table = {
    Conn.HELLO_SENT: {CHALLENGE: Conn.AUTH_SENT, ERROR: Conn.CLOSED},
    Conn.LANE_SENT: {CHALLENGE: Conn.AUTH_SENT, ERROR: Conn.CLOSED},
    Conn.AUTH_SENT: {WELCOME: Conn.OPEN, ERROR: Conn.CLOSED},
    Conn.OPEN: {ACCEPT: Conn.OPEN, REJECT: Conn.OPEN, ACK: Conn.OPEN, NACK: Conn.OPEN, COMPLETE: Conn.OPEN,
                CANCEL: Conn.OPEN, ERROR: Conn.OPEN, HEARTBEAT: Conn.OPEN, BYE: Conn.CLOSED},
    Conn.CLOSED: {},
}

#: what the receiver may receive from the sender, by the state of the receiver's connection
RECEIVER_RECEIVES: Table = {
    Conn.AWAIT_HELLO: {HELLO: Conn.CHALLENGED, LANE: Conn.LANE_CHALLENGED},
    Conn.CHALLENGED: {AUTH: Conn.OPEN, ERROR: Conn.CLOSED},
    Conn.OPEN: {BEGIN: Conn.OPEN, DONE: Conn.OPEN, CANCEL: Conn.OPEN, HEARTBEAT: Conn.OPEN, BYE: Conn.CLOSED},
    Conn.LANE_CHALLENGED: {AUTH: Conn.LANE_OPEN, ERROR: Conn.CLOSED},
    Conn.LANE_OPEN: {BYE: Conn.CLOSED},
    Conn.CLOSED: {},
}


def advance(table: Table, state: Conn, kind: str, end: str) -> Conn:
    """The state after the peer sent ``kind`` in ``state``; ``ProtocolError`` when the table forbids it.
    ``end``: "sender" or "receiver", the end receiving (named in the error)."""
    nxt = table.get(state, {}).get(kind)
    if nxt is None:
        raise ProtocolError(f"unexpected {kind!r} from the peer: the {end} is in state {state.value!r}"
                            f" (legal there: {', '.join(sorted(table.get(state, {}))) or 'nothing'})")
    return nxt


def legal(table: Table, state: Conn) -> frozenset[str]:
    """The messages the peer may send in ``state``."""
    return frozenset(table.get(state, {}))
