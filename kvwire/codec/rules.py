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

One transfer, inside an open session. A sender whose receiver advertised an early window in its WELCOME
``limits`` (``codec.early``) may put chunks of a transfer on the lanes after its BEGIN and before its
ACCEPT, up to that window; without one, not before ACCEPT. Lanes and the control connection are separate
TCP connections, so the receiver may see a chunk before the BEGIN, and the sender may read an answer to a
chunk (a lane's ACK) before the ACCEPT that the receiver's control thread has still to write::

    the transfer, at the sender   receiver sends about it               next
    OFFERED (BEGIN sent)          accept                                ACCEPTED
                                  ack, nack, nack held (after an         ACCEPTED  (it was activated:
                                    ACCEPT still on its way)                        the ACCEPT follows)
                                  nack lost (an early chunk dropped)     OFFERED   (send it again)
                                  reject cancel error complete           ended
    ACCEPTED                      accept (the late one) ack nack         ACCEPTED
                                  reject cancel error complete           ended

    a data chunk, at the receiver          the lane
    its transfer in flight                 reads it into the destination
    its transfer ended or refused          drains it
    no answer yet, early window            charges it to the window (past it: ProtocolError, the session
                                           fails), waits (bounded) for the answer, then reads or drains it;
                                           drained unanswered: nack lost
    no answer yet, no early window         ProtocolError (the lane closes)

The early charge of a transfer is released at the receiver when it sends ACCEPT or REJECT and at the sender
when it reads one of the messages that can only follow them (every one above but ``nack lost``), so the
receiver never counts more than the sender did.
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


class Offer(enum.Enum):
    """One transfer as its sender sees it: offered (BEGIN sent, no answer read yet) or accepted."""

    OFFERED = "offered"
    ACCEPTED = "accepted"


#: ``nack`` with ``lost: true``: a copy the receiver dropped (an early chunk it could not place in time, or
#: a re-send it drained while another copy broke off); the only answer that can precede an ACCEPT
NACK_LOST = "nack lost"

#: what a message of the receiver about one transfer does to it, by the transfer's state at the sender
#: (None: the transfer ends)
SENDER_TRANSFER: Mapping[Offer, Mapping[str, Offer | None]] = {
    Offer.OFFERED: {ACCEPT: Offer.ACCEPTED, ACK: Offer.ACCEPTED, NACK: Offer.ACCEPTED, NACK_LOST: Offer.OFFERED,
                    REJECT: None, CANCEL: None, ERROR: None, COMPLETE: None},
    Offer.ACCEPTED: {ACCEPT: Offer.ACCEPTED, ACK: Offer.ACCEPTED, NACK: Offer.ACCEPTED,
                     NACK_LOST: Offer.ACCEPTED, REJECT: None, CANCEL: None, ERROR: None, COMPLETE: None},
}


def answers(state: Offer, kind: str) -> bool:
    """``kind`` (``NACK_LOST`` for a lost NACK) read about a transfer in ``state`` means the receiver has
    activated or refused it: its early charge is released."""
    return state is Offer.OFFERED and SENDER_TRANSFER[state].get(kind, Offer.OFFERED) is not Offer.OFFERED


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
