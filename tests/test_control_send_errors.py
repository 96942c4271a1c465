"""An error that is not an ``OSError`` while a control frame is written (a frame that cannot be encoded, a
broken stream; injected here into the control stream's ``send``) fails the session naming it, and every
transfer on it ends in exactly one terminal state, promptly. Before, at the sender it propagated out of the
actions being performed: a cancelled handle's ``Ended`` was skipped (ACTIVE for good) and a heartbeat's killed
the monitor thread; at the receiver it killed the session's ``ControlOutbox`` writer without ``on_stuck``, so
the session was never cut and its transfers waited for their timeouts. Over real loopback sockets.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from helpers import payload, send_verified, wait_until

from kvwire import Receiver, RequestSpec, Session, TransferCancelled, TransferFailed, connect
from kvwire.codec import frames as F
from kvwire.codec.transfer import State
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
