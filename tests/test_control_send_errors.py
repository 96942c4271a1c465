"""An error that is not an ``OSError`` while a control frame is written (a frame that cannot be encoded, a
broken stream; injected here into the control stream's ``send``) fails the session naming it, and every
transfer on it ends in exactly one terminal state, promptly. Before, at the sender it propagated out of the
actions being performed: a cancelled handle's ``Ended`` was skipped (ACTIVE for good) and a heartbeat's killed
the monitor thread; at the receiver it killed the session's ``ControlOutbox`` writer without ``on_stuck``, so
the session was never cut and its transfers waited for their timeouts. Over real loopback sockets.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from helpers import payload, send_verified, wait_until

from kvwire import Receiver, RequestSpec, Session, TransferCancelled, TransferFailed, connect
from kvwire.codec import frames as F
from kvwire.codec.transfer import State
from kvwire.tcp._wire import Channel
from kvwire.testing.fixtures import load_fixture

LAYOUT = load_fixture("tiny-qwen3-next")
REQ = RequestSpec("r", 300, 299)


def _inject(monkeypatch: pytest.MonkeyPatch, stream: Any, kind: str) -> None:
    """``stream.send`` raises a RuntimeError for frames of ``kind`` (the others go out as usual)."""
    real = stream.send

    def send(k: str, body: dict[str, Any] | None = None) -> None:
        if k == kind:
            raise RuntimeError(f"injected into {k}")
        real(k, body)

    monkeypatch.setattr(stream, "send", send)


@pytest.fixture
def link() -> Iterator[tuple[Receiver, Session]]:
    # (timeouts far beyond the test's waits: an end seen within them is the fix's, not a timeout's)
    with Receiver(key="k", peer_timeout=30, transfer_timeout=60, heartbeat=0.2) as rx, \
            connect(*rx.address, key="k", lanes=2, peer_timeout=30, heartbeat=0.2) as s:
        send_verified(rx, s, LAYOUT, RequestSpec("warm", 300, 299))  # (the session works)
        yield rx, s


def _pair(rx: Receiver, s: Session, rid: str) -> tuple[Any, Any]:
    req = RequestSpec(rid, 300, 299)
    incoming = rx.expect(rid, np.zeros(sum(a.nbytes for a in payload(LAYOUT, req)), np.uint8), layout=LAYOUT)
    out = s.send(LAYOUT, req)
    assert wait_until(lambda: incoming.manifest is not None)
    return out, incoming


def test_a_sender_cancel_whose_frame_cannot_be_sent_still_ends_the_handle_and_fails_the_session(
        monkeypatch: pytest.MonkeyPatch, link: tuple[Receiver, Session]) -> None:
    rx, s = link
    out, incoming = _pair(rx, s, "cancelled")
    other, other_in = _pair(rx, s, "bystander")
    _inject(monkeypatch, s.ctrl, F.CANCEL)
    out.cancel("stop")  # returns: the error is the session's, not this call's
    with pytest.raises(TransferCancelled):
        out.result(5)
    assert out.state is State.CANCELLED
    assert wait_until(lambda: s.closed, 5) and "RuntimeError: injected into cancel" in s.failure
    with pytest.raises(TransferFailed, match="injected into cancel"):
        other.result(5)
    for h in (incoming, other_in):  # the receiver saw the connection go
        with pytest.raises(TransferFailed):
            h.result(5)


def test_a_sender_heartbeat_whose_frame_cannot_be_sent_fails_the_session(
        monkeypatch: pytest.MonkeyPatch, link: tuple[Receiver, Session]) -> None:
    rx, s = link
    out, incoming = _pair(rx, s, "idle")
    _inject(monkeypatch, s.ctrl, F.HEARTBEAT)  # (the monitor sends one every 0.2 s on an idle connection)
    with pytest.raises(TransferFailed, match="sending a heartbeat control frame failed: RuntimeError"):
        out.result(5)
    assert s.closed
    with pytest.raises(TransferFailed):
        incoming.result(5)


@pytest.mark.parametrize("kind", [F.HEARTBEAT, F.ACK])
def test_a_receiver_frame_that_cannot_be_sent_cuts_the_session_naming_the_error(
        monkeypatch: pytest.MonkeyPatch, link: tuple[Receiver, Session], kind: str) -> None:
    rx, s = link
    out, incoming = _pair(rx, s, "r")
    (session,) = rx.live_sessions()
    _inject(monkeypatch, session.ctrl, kind)  # (the outbox's writer writes through this stream)
    if kind == F.ACK:  # (the receiver may verify every chunk, and end DONE, before its first ACK fails)
        out.write_all(payload(LAYOUT, REQ))
        out.finish()
        assert wait_until(lambda: incoming.finished, 5)
    else:  # (the receiver heartbeats every 0.2 s on the idle connection: its first one fails)
        with pytest.raises(TransferFailed, match="sending a heartbeat control frame failed: RuntimeError: injected"):
            incoming.result(5)
    with pytest.raises(TransferFailed):  # the sender saw its connection cut (it never had a COMPLETE)
        out.result(5)
    assert wait_until(lambda: s.closed and rx.sessions == 0, 5)
    assert session.outbox.wait(5)  # its writer ended (on_stuck ran)
    # negative control: the receiver takes a new session as before
    with connect(*rx.address, key="k", lanes=2) as s2:
        send_verified(rx, s2, LAYOUT, RequestSpec("after", 300, 299))


# ------------------------------------------------------------------ reconnect=True: the session comes back

@pytest.fixture
def relink() -> Iterator[tuple[Receiver, Session]]:
    with Receiver(key="k", peer_timeout=30, transfer_timeout=60, heartbeat=0.2) as rx, \
            connect(*rx.address, key="k", lanes=2, peer_timeout=30, heartbeat=0.2, reconnect=True) as s:
        send_verified(rx, s, LAYOUT, RequestSpec("warm", 300, 299))
        yield rx, s


def _ends_once(*handles: Any) -> list[list[State]]:
    """Each handle's done callbacks as they run: one state each, once (checked by the caller)."""
    seen: list[list[State]] = []
    for h in handles:
        mine: list[State] = []
        seen.append(mine)
        h.add_done_callback(lambda _f, h=h, mine=mine: mine.append(h.state))
    return seen


def _comes_back(rx: Receiver, s: Session, rid: str) -> None:
    """The session re-established itself (the injected stream was the old connection's) and carries a
    transfer through; nothing was closed for good."""
    assert wait_until(lambda: s.stats()["session_reconnects"] >= 1 and not s.closed, 10), s.failure
    send_verified(rx, s, LAYOUT, RequestSpec(rid, 300, 299), timeout=10)
    assert not s.closed


@pytest.mark.parametrize("kind", [F.CANCEL, F.HEARTBEAT])
def test_with_reconnect_a_sender_frame_that_cannot_be_sent_ends_each_transfer_once_then_reconnects(
        monkeypatch: pytest.MonkeyPatch, relink: tuple[Receiver, Session], kind: str) -> None:
    rx, s = relink
    out, incoming = _pair(rx, s, "cancelled")
    other, other_in = _pair(rx, s, "bystander")
    seen = _ends_once(out, other, incoming, other_in)
    _inject(monkeypatch, s.ctrl, kind)
    if kind == F.CANCEL:
        out.cancel("stop")
        with pytest.raises(TransferCancelled):
            out.result(5)
        assert out.state is State.CANCELLED
    else:
        with pytest.raises(TransferFailed, match="sending a heartbeat control frame failed: RuntimeError"):
            out.result(5)
    with pytest.raises(TransferFailed, match=f"injected into {kind}"):
        other.result(5)
    for h in (incoming, other_in):  # the receiver saw the old connection go
        with pytest.raises(TransferFailed):
            h.result(5)
    _comes_back(rx, s, "after")
    assert wait_until(lambda: all(len(x) == 1 for x in seen), 5)
    time.sleep(0.3)  # (a second end would come now, if at all)
    assert [len(x) for x in seen] == [1, 1, 1, 1], seen
    assert [x[0] for x in seen[1:]] == [State.FAILED] * 3


@pytest.mark.parametrize("kind", [F.HEARTBEAT, F.ACK])
def test_with_reconnect_a_receiver_frame_that_cannot_be_sent_cuts_the_session_and_the_sender_comes_back(
        monkeypatch: pytest.MonkeyPatch, relink: tuple[Receiver, Session], kind: str) -> None:
    rx, s = relink
    out, incoming = _pair(rx, s, "r")
    seen = _ends_once(out, incoming)
    (session,) = rx.live_sessions()
    _inject(monkeypatch, session.ctrl, kind)
    if kind == F.ACK:
        out.write_all(payload(LAYOUT, REQ))
        out.finish()
    with pytest.raises(TransferFailed):  # the sender saw its connection cut (it never had a COMPLETE)
        out.result(5)
    assert wait_until(lambda: incoming.finished, 5)
    assert session.outbox.wait(5)
    _comes_back(rx, s, "after")
    assert rx.sessions == 1
    time.sleep(0.3)
    assert [len(x) for x in seen] == [1, 1], seen


def test_with_reconnect_a_frame_that_cannot_be_sent_while_reconnecting_is_one_failed_try(
        monkeypatch: pytest.MonkeyPatch, relink: tuple[Receiver, Session], caplog: pytest.LogCaptureFixture) -> None:
    """Every HELLO fails (a RuntimeError) for a while: each reconnect try fails, the session keeps trying and
    comes back once HELLO goes out again. Before, the first such try ended the reconnect thread: the session
    stayed down and open for good (each send waited out connect_timeout), though the fault had gone. The first
    failed try is a warning with its traceback, the later ones a line each at INFO (before, a traceback a try)."""
    caplog.set_level(logging.INFO, logger="kvwire")
    rx, s = relink
    out, incoming = _pair(rx, s, "r")
    failing = [True]
    real = Channel.send

    def send(ch: Channel, k: str, body: dict[str, Any] | None = None) -> None:
        if k == F.HELLO and failing[0]:  # (only a sender sends HELLO)
            raise RuntimeError("injected into hello")
        real(ch, k, body)

    monkeypatch.setattr(Channel, "send", send)
    _inject(monkeypatch, s.ctrl, F.HEARTBEAT)  # the connection fails: reconnect
    with pytest.raises(TransferFailed, match="heartbeat"):
        out.result(5)
    with pytest.raises(TransferFailed):
        incoming.result(5)
    time.sleep(1.0)  # (several tries fail)
    assert not s.closed and s.stats()["session_reconnects"] == 0
    failing[0] = False
    _comes_back(rx, s, "after")
    tries = [r for r in caplog.records if "reconnecting to" in r.getMessage() and "failed" in r.getMessage()]
    assert len(tries) >= 3, [r.getMessage() for r in caplog.records]
    assert [r.exc_info is not None for r in tries] == [True] + [False] * (len(tries) - 1)
    assert [r.levelno for r in tries] == [logging.WARNING] + [logging.INFO] * (len(tries) - 1)
