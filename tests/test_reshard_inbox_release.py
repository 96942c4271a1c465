"""``Inbox.expect_resharded`` and the engine's abort (``Inbox.cancel``) on the CPU staging path with real sessions:
a re-sharded request's pinned buffers go back to the pool only once no prefill rank's lane writes into them, and
without waiting for a poll, however early the abort comes.

Before: an abort while a slice's lane was placing a chunk freed the job's buffers at once (the request was
announced cancelled before its sources ended); an abort while ``expect_resharded`` prepared the job reached no
job (the transfers went on, the buffers were held until they ended), and one just after it freed the buffers
before they were handed to the receiver (which then received into memory back in the pool)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

torch = pytest.importorskip("torch")

from adapters_util import poll_until  # noqa: E402
from helpers import HoldingStage  # noqa: E402
from reshard_ref import FAMILY_CONFIGS, family_layout, global_payload, shard_reference  # noqa: E402
from test_reshard_staging import cache_with, read_back  # noqa: E402

import kvwire.adapters.lifecycle as lifecycle  # noqa: E402
from kvwire import RequestSpec, State  # noqa: E402
from kvwire.adapters.lifecycle import Inbox, Outbox  # noqa: E402
from kvwire.codec.reshard import ReshardPlan, plan_reshard  # noqa: E402
from kvwire.cuda import PagedCache, PinnedPool, Stager, Unstager  # noqa: E402
from kvwire.reshard import ReshardIncoming, ReshardReceiver, sub_request_id  # noqa: E402

KEY = b"reshard-release"
MiB = 1 << 20
HOLD = 0.3  # seconds the buffers are watched while a lane is held




@dataclass
class Ranks:
    request: RequestSpec
    plan: ReshardPlan
    src: list[tuple[PagedCache, dict[str, list[int]]]]
    dst: tuple[PagedCache, dict[str, list[int]]]
    want: list[bytes]
    outboxes: list[Outbox]  #: by prefill rank
    inbox: Inbox
    unstager: Unstager
    gate: HoldingStage

    def send(self, p: int) -> None:
        """Prefill rank ``p`` stages and sends every layer of its slice."""
        sending = self.outboxes[p].begin_resharded(f"p{p}", self.request, self.plan, p, {0: self.inbox.address},
                                                   self.src[p][1], 1)
        assert not sending.error, sending.error
        for layer in sending.layers:
            sending.stage(layer)
        sending.finish()

    def expect(self) -> lifecycle.Receiving:
        return self.inbox.expect_resharded("d0", self.request, self.plan, 0, self.dst[1], 1)

    @property
    def in_use(self) -> int:
        return self.unstager.pool.in_use_bytes


@pytest.fixture
def ranks(request: pytest.FixtureRequest, no_leaks: None) -> Iterator[Ranks]:
    """GDN, prefill TP 2 -> decode TP 1 (its contiguous pieces land straight in the job's buffers), an Outbox
    per prefill rank, the decode rank's Inbox receiving through a ``HoldingStage``."""
    family = "gdn"
    req = RequestSpec(f"rel-{request.node.name}"[:60], 40, 39)
    config, g = FAMILY_CONFIGS[family], family_layout(family, "vllm", 1)
    payload = global_payload(g, req, seed=11)
    plan = plan_reshard(family_layout(family, "vllm", 2), family_layout(family, "vllm", 1))
    src = [cache_with(family_layout(family, "vllm", 2, p), req, shard_reference(g, config, payload, req, 2, p),
                      7 * p + 1) for p in range(2)]
    dst = cache_with(family_layout(family, "vllm", 1), req, None, 2)
    want = [w.tobytes() for w in shard_reference(g, config, payload, req, 1, 0)]
    stagers = [Stager(c, PinnedPool(16 * MiB, backend="torch")) for c, _ in src]
    unstager = Unstager(dst[0], PinnedPool(16 * MiB, backend="torch"))
    gate = HoldingStage()
    outboxes = [Outbox(s, key=KEY, lanes=1) for s in stagers]
    inbox = Inbox(unstager, key=KEY, timeout=20, chunk_stage=gate)
    try:
        yield Ranks(req, plan, src, dst, want, outboxes, inbox, unstager, gate)
    finally:
        gate.release.set()
        boxes: list[Outbox | Inbox] = [*outboxes, inbox]
        for box in boxes:
            box.close()
        units: list[Stager | Unstager] = [*stagers, unstager]
        for u in units:
            u.close()
        assert [u.pool.in_use_bytes for u in units] == [0] * len(units)
        for u in units:
            u.pool.close()


def until(pred: Any, timeout: float = 10.0) -> bool:
    end = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > end:
            return False
        time.sleep(0.005)
    return True


def test_an_abort_while_a_slice_lane_writes_frees_the_buffers_only_after_that_chunk(ranks: Ranks) -> None:
    r = ranks
    rec = r.expect()
    held = r.in_use
    assert held > 0 and isinstance(rec.handle, ReshardIncoming)
    r.send(0)
    assert r.gate.entered.wait(20)
    try:
        r.inbox.cancel(r.request.request_id, "engine aborted")
        time.sleep(HOLD)
        assert r.in_use == held and not rec.handle.finished, \
            f"{r.in_use} bytes in use (of {held}) while a lane still writes into the job's buffers"
    finally:
        r.gate.release.set()
    assert until(lambda: r.in_use == 0)  # (no poll)
    assert rec.handle.finished and all(s.finished for s in rec.handle.sources.values())
    assert [(e.key, e.state) for e in poll_until(r.inbox, count=1)] == [("d0", State.CANCELLED)]


def test_an_abort_while_the_job_is_prepared_cancels_the_transfers_and_frees_without_a_poll(
        ranks: Ranks, monkeypatch: pytest.MonkeyPatch) -> None:
    """The engine aborts while ``expect_resharded`` has registered the request but has no job yet."""
    r = ranks
    real = r.unstager.prepare

    def prepare(*args: Any, **kwargs: Any) -> Any:
        r.inbox.cancel(r.request.request_id, "engine aborted")
        return real(*args, **kwargs)
    monkeypatch.setattr(r.unstager, "prepare", prepare)
    rec = r.expect()
    assert rec.handle is not None
    assert until(lambda: rec.handle.finished and r.in_use == 0), (rec.handle.state, r.in_use)  # (no poll)
    r.send(0)  # told CANCEL by the receiver: nothing lands
    ended = poll_until(r.outboxes[0], r.inbox, count=2)
    assert sorted((e.key, e.state) for e in ended) == [("d0", State.CANCELLED), ("p0", State.FAILED)]
    assert "cancelled" in ended[[e.key for e in ended].index("p0")].reason


def test_an_abort_just_before_the_receiver_registration_leaves_the_buffers_to_the_transfers(
        ranks: Ranks, monkeypatch: pytest.MonkeyPatch) -> None:
    """The engine aborts once the job exists, before its buffers are registered with the receiver: they stay the
    request's (the receiver may write into them) until its transfers ended, then go back without a poll."""
    r = ranks
    seen: list[int] = []

    class Racing(ReshardReceiver):
        def expect(self, request: RequestSpec, buffers: Any, **kwargs: Any) -> ReshardIncoming:
            r.inbox.cancel(request.request_id, "engine aborted")
            seen.append(r.in_use)  # (the buffers about to be registered: must not be back in the pool)
            return super().expect(request, buffers, **kwargs)
    monkeypatch.setattr(lifecycle, "ReshardReceiver", Racing)
    rec = r.expect()
    assert seen and seen[0] > 0, f"the buffers were back in the pool before the receiver was given them: {seen}"
    assert rec.handle is not None
    assert until(lambda: rec.handle.finished and r.in_use == 0), (rec.handle.state, r.in_use)  # (no poll)
    assert [(e.key, e.state) for e in poll_until(r.inbox, count=1)] == [("d0", State.CANCELLED)]


def test_an_abort_while_expect_waits_for_an_early_slices_handle_is_not_lost(
        ranks: Ranks, monkeypatch: pytest.MonkeyPatch) -> None:
    """Prefill rank 0's slice arrives first and its handle reaches the Inbox late: ``expect_resharded`` waits for it
    (``CLAIM_GRACE``) and the engine aborts meanwhile. Before, the request was not registered yet: the abort was
    lost and the request went on, its buffers held until its transfers timed out."""
    r = ranks
    r.gate.release.set()  # (no chunk held here)
    go, handed = threading.Event(), threading.Event()
    real = r.inbox.receiver.on_transfer
    assert real is not None

    def late(h: Any) -> None:
        handed.set()
        go.wait(20)
        real(h)
    monkeypatch.setattr(r.inbox.receiver, "on_transfer", late)
    r.send(0)
    assert handed.wait(20)
    got: list[lifecycle.Receiving] = []
    t = threading.Thread(target=lambda: got.append(r.expect()))
    t.start()
    try:
        time.sleep(HOLD)  # (expect_resharded is waiting for the early slice's handle)
        r.inbox.cancel(r.request.request_id, "engine aborted")
    finally:
        go.set()
        t.join(20)
    rec = got[0]
    assert until(lambda: rec.handle is not None and rec.handle.finished and r.in_use == 0), \
        (rec.handle and rec.handle.state, r.in_use)  # (no poll)
    ended = poll_until(r.outboxes[0], r.inbox, count=2)  # (rank 0's slice may have been verified already)
    assert sorted(e.key for e in ended) == ["d0", "p0"] and ended[[e.key for e in ended].index("d0")].state \
        is State.CANCELLED


def test_control_a_resharded_request_with_a_held_lane_arrives_exact(ranks: Ranks) -> None:
    r = ranks
    r.expect()
    r.send(0)
    assert r.gate.entered.wait(20)
    r.send(1)
    time.sleep(HOLD)
    r.gate.release.set()
    ended = poll_until(*r.outboxes, r.inbox, count=3)
    assert sorted((e.key, e.state) for e in ended) == [("d0", State.DONE), ("p0", State.DONE), ("p1", State.DONE)]
    assert r.in_use == 0
    assert read_back(r.dst[0], r.request, r.dst[1]) == r.want


def test_a_later_rank_failing_to_register_leaves_the_buffers_to_the_slice_that_began(
        ranks: Ranks, monkeypatch: pytest.MonkeyPatch) -> None:
    """Prefill rank 1's slice id is expected already (``expect_resharded`` cannot register it) while rank 0's slice,
    registered just before, has a lane writing into the job's buffers: the request fails, and its buffers stay
    held until that lane is out. Before: ``ReshardReceiver.expect`` raised and the job's buffers went back to the
    pool at once, under the writing lane."""
    r = ranks
    rx = r.inbox.receiver
    taken = rx.expect(sub_request_id(r.request.request_id, 1, 0), bytearray(8))
    real, held = rx.expect, []

    def expect(request_id: str, buffers: Any, **kwargs: Any) -> Any:
        if request_id == sub_request_id(r.request.request_id, 1, 0):  # rank 0's slice begins meanwhile
            r.send(0)
            assert r.gate.entered.wait(20)
            held.append(r.in_use)
        return real(request_id, buffers, **kwargs)
    monkeypatch.setattr(rx, "expect", expect)
    try:
        rec = r.expect()
        time.sleep(HOLD)
        assert held and held[0] > 0 and r.in_use == held[0], \
            f"{r.in_use} bytes in use (of {held}) while a lane still writes into the job's buffers"
    finally:
        r.gate.release.set()
    ended = poll_until(r.outboxes[0], r.inbox, count=2)
    assert sorted((e.key, e.state) for e in ended) == [("d0", State.FAILED), ("p0", State.FAILED)]
    assert "prefill rank 1" in ended[[e.key for e in ended].index("d0")].reason
    assert rec.handle is not None and all(s.finished for s in rec.handle.sources.values()) and r.in_use == 0
    assert not taken.finished
    taken.cancel("test over")
