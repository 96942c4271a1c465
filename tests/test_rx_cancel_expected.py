"""A request the receiver expected and then cancelled (``IncomingTransfer.cancel()`` on the handle ``expect``
returned) before its transfer was placed: the sender's BEGIN for it is answered CANCEL with the cancel's reason,
so the sender's handle ends CANCELLED, and it never reaches the allocator. Before, the withdrawn expectation
made it an unknown request: REJECT "no destination registered" (the sender's handle FAILED) or, with an
allocator, placed by the allocator (data the receiver had cancelled, accepted). The same for a request whose
expectation timed out before its sender began: its BEGIN is answered ERROR (state timed out), the sender's
handle ends TIMED_OUT. Each refusal counts in the receiver's stats and metrics. Over real loopback sockets.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest
from helpers import payload, send_verified, wait_until

from kvwire import Receiver, RequestSpec, Session, TransferCancelled, TransferFailed, TransferTimedOut, connect
from kvwire.codec.manifest import Manifest
from kvwire.codec.transfer import State
from kvwire.metrics import Metrics
from kvwire.tcp import _rxsession
from kvwire.testing.fixtures import load_fixture

LAYOUT = load_fixture("tiny-qwen3-next")


class _Allocator:
    """Records the request ids it is asked for; those starting with "slow" wait for ``go``."""

    def __init__(self) -> None:
        self.asked: list[str] = []
        self.go = threading.Event()

    def __call__(self, m: Manifest) -> np.ndarray:
        self.asked.append(m.request.request_id)
        if m.request.request_id.startswith("slow"):
            assert self.go.wait(20)
        return np.zeros(m.total_bytes, np.uint8)


@pytest.fixture(params=["allocator", "no-allocator"])
def link(request: pytest.FixtureRequest) -> Iterator[tuple[Receiver, Session, _Allocator | None]]:
    alloc = _Allocator() if request.param == "allocator" else None
    # (transfer_timeout: how long past its deadline a timed-out expectation is remembered)
    with Receiver(key="k", allocator=alloc, transfer_timeout=2.0) as rx, connect(*rx.address, key="k", lanes=2) as s:
        yield rx, s, alloc


def _expect(rx: Receiver, rid: str, req: RequestSpec, timeout: float | None = None):  # noqa: ANN202
    return rx.expect(rid, np.zeros(sum(a.nbytes for a in payload(LAYOUT, req)), np.uint8), layout=LAYOUT,
                     timeout=timeout)


def _ends_cancelled(s: Session, rid: str, req: RequestSpec, why: str) -> None:
    out = s.send(LAYOUT, req)
    out.write_all(payload(LAYOUT, req))
    out.finish()
    with pytest.raises(TransferCancelled, match=f"cancelled by receiver: {why}"):
        out.result(10)
    assert out.state is State.CANCELLED


def test_a_cancelled_expectation_refuses_its_sender_as_cancelled_and_is_never_allocated(
        link: tuple[Receiver, Session, _Allocator | None]) -> None:
    rx, s, alloc = link
    req = RequestSpec("gone", 300, 299)
    incoming = _expect(rx, "gone", req)
    incoming.cancel("decode slot freed")
    assert wait_until(lambda: "gone" not in rx._expected)  # withdrawn: its buffers are free
    _ends_cancelled(s, "gone", req, "decode slot freed")
    _ends_cancelled(s, "gone", req, "decode slot freed")  # (a sender's retry: refused again, still remembered)
    assert alloc is None or "gone" not in alloc.asked
    assert wait_until(lambda: rx.stats()["transfers_cancelled"] == 2)  # counted as they ended here
    with pytest.raises(TransferCancelled):
        incoming.result(0)
    # the session carries on, and the same request expected again goes through (its cancel no longer answers)
    send_verified(rx, s, LAYOUT, req, timeout=10)
    assert not s.closed, s.failure


def test_a_cancel_racing_the_placement_is_refused_as_cancelled(
        link: tuple[Receiver, Session, _Allocator | None]) -> None:
    """Cancelled while its withdrawal still waits on the callback pool: the placement finds the ended handle."""
    rx, s, alloc = link
    req = RequestSpec("racing", 300, 299)
    incoming = _expect(rx, "racing", req)
    hold = threading.Event()
    incoming.call_soon(hold.wait, 20)  # the handle's callbacks (its withdrawal among them) wait behind this
    incoming.cancel("raced")
    assert "racing" in rx._expected
    try:
        _ends_cancelled(s, "racing", req, "raced")
    finally:
        hold.set()
    assert alloc is None or "racing" not in alloc.asked
    send_verified(rx, s, LAYOUT, RequestSpec("bystander", 300, 299), timeout=10)


def test_a_cancel_after_the_sender_began_and_before_the_placement(monkeypatch: pytest.MonkeyPatch) -> None:
    """The BEGIN is in (admitted, waiting in the session's admission line behind a slow allocator call) when
    its expectation is cancelled."""
    monkeypatch.setattr(_rxsession, "MAX_ADMITTING", 1)  # (one slow allocator call holds the line)
    alloc = _Allocator()
    with Receiver(key="k", allocator=alloc) as rx, connect(*rx.address, key="k", lanes=2) as s:
        slow = s.send(LAYOUT, RequestSpec("slow", 300, 299))
        assert wait_until(lambda: "slow" in alloc.asked)
        req = RequestSpec("late", 300, 299)
        incoming = _expect(rx, "late", req)
        out = s.send(LAYOUT, req)  # its BEGIN admitted, waiting behind "slow"
        assert wait_until(lambda: any(x._admissions for x in rx.live_sessions()))
        incoming.cancel("changed my mind")
        alloc.go.set()
        with pytest.raises(TransferCancelled, match="cancelled by receiver: changed my mind"):
            out.result(10)
        assert "late" not in alloc.asked
        slow.cancel()
        send_verified(rx, s, LAYOUT, RequestSpec("bystander", 300, 299), timeout=10)
        assert not s.closed, s.failure


def test_a_cancelled_expectation_is_forgotten_at_its_deadline(
        link: tuple[Receiver, Session, _Allocator | None]) -> None:
    """Negative control: past the deadline its ``expect`` gave, the request is an unknown one again."""
    rx, s, alloc = link
    req = RequestSpec("brief", 300, 299)
    _expect(rx, "brief", req, timeout=0.3).cancel("brief")
    time.sleep(0.3 + 0.5)  # (past its deadline, and the monitor's next tick)
    out = s.send(LAYOUT, req)
    out.write_all(payload(LAYOUT, req))
    out.finish()
    if alloc is None:
        with pytest.raises(TransferFailed, match="no destination registered"):
            out.result(10)
    else:
        out.result(10)
        assert "brief" in alloc.asked


def _ends_timed_out(s: Session, req: RequestSpec) -> None:
    out = s.send(LAYOUT, req)
    out.write_all(payload(LAYOUT, req))
    out.finish()
    with pytest.raises(TransferTimedOut, match="receiver timed out: the sender never started this transfer"):
        out.result(10)
    assert out.state is State.TIMED_OUT


def test_a_timed_out_expectation_refuses_its_late_sender_as_timed_out_and_is_never_allocated(
        link: tuple[Receiver, Session, _Allocator | None]) -> None:
    """Before: the late BEGIN went to the allocator (data the receiver gave up on, accepted) or was REJECTed
    "no destination registered" (the sender FAILED), and no stat counted it."""
    rx, s, alloc = link
    metrics = Metrics()
    metrics.watch(rx, "rx")
    req = RequestSpec("late", 300, 299)
    incoming = _expect(rx, "late", req, timeout=0.2)
    with pytest.raises(TransferTimedOut):
        incoming.result(10)
    assert wait_until(lambda: "late" not in rx._expected)
    _ends_timed_out(s, req)
    _ends_timed_out(s, req)  # (a retry: still remembered)
    assert alloc is None or "late" not in alloc.asked
    assert wait_until(lambda: rx.stats()["transfers_timed_out"] == 2)
    assert rx.stats()["transfers_failed"] == 0
    assert 'kvwire_received_transfers_total{listen="rx",state="timed_out"} 2' in metrics.render()
    # the session carries on, and the request expected again goes through
    send_verified(rx, s, LAYOUT, req, timeout=10)
    assert not s.closed, s.failure


def test_a_timed_out_expectation_is_forgotten_transfer_timeout_past_its_deadline(
        link: tuple[Receiver, Session, _Allocator | None]) -> None:
    """Negative control: ``transfer_timeout`` (2 s here) past its deadline, the request is an unknown one again."""
    rx, s, alloc = link
    req = RequestSpec("stale", 300, 299)
    incoming = _expect(rx, "stale", req, timeout=0.2)
    with pytest.raises(TransferTimedOut):
        incoming.result(10)
    time.sleep(0.2 + 2.0 + 0.5)  # (past deadline + transfer_timeout, and the monitor's next tick)
    out = s.send(LAYOUT, req)
    out.write_all(payload(LAYOUT, req))
    out.finish()
    if alloc is None:
        with pytest.raises(TransferFailed, match="no destination registered"):
            out.result(10)
    else:
        out.result(10)
        assert "stale" in alloc.asked
    assert rx.stats()["transfers_timed_out"] == 0


def test_a_begin_while_the_monitor_times_out_its_expectation_is_refused_as_timed_out(
        link: tuple[Receiver, Session, _Allocator | None], monkeypatch: pytest.MonkeyPatch) -> None:
    """The BEGIN comes while the monitor is timing the expectation out (held, here, as it resolves the handle):
    refused as timed out, never allocated. Before: the monitor took it out of the table and remembered it only
    after resolving it, so a BEGIN in between was an unknown request (allocated, or REJECTed: the sender FAILED)."""
    rx, s, alloc = link
    req = RequestSpec("gap", 300, 299)
    incoming = _expect(rx, "gap", req, timeout=0.2)
    entered, go = threading.Event(), threading.Event()
    real = type(incoming).resolve

    def resolve(h: object, state: State, reason: str = "") -> bool:
        if h is incoming and state is State.TIMED_OUT and threading.current_thread().name == "kvwire-monitor":
            entered.set()
            assert go.wait(20)
        return real(h, state, reason)  # type: ignore[arg-type]
    monkeypatch.setattr(type(incoming), "resolve", resolve)
    assert entered.wait(10)
    try:
        assert "gap" not in rx._expected  # (the gap: taken out of the table, not yet resolved)
        _ends_timed_out(s, req)
    finally:
        go.set()
    assert alloc is None or "gap" not in alloc.asked
    with pytest.raises(TransferTimedOut, match="the sender never started this transfer"):
        incoming.result(10)
    assert wait_until(lambda: rx.stats()["transfers_timed_out"] == 1) and rx.stats()["transfers_failed"] == 0
    assert not s.closed, s.failure


def test_control_a_begin_before_the_monitor_times_out_its_expectation_is_placed(
        link: tuple[Receiver, Session, _Allocator | None]) -> None:
    rx, s, alloc = link
    req = RequestSpec("in-time", 300, 299)
    incoming = _expect(rx, "in-time", req, timeout=10)
    out = s.send(LAYOUT, req)
    out.write_all(payload(LAYOUT, req))
    out.finish()
    assert out.result(10).state is State.DONE and incoming.result(10).state is State.DONE
    assert alloc is None or "in-time" not in alloc.asked
