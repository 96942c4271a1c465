"""A re-sharded request (``ReshardIncoming``) that ends early (cancelled, a source failed, a source timed out) is
announced, and its buffers go back to the pool, only once no source transfer's lane writes into them any more:
real sessions, one source's lane held mid-chunk in the receiver's chunk stage while the request ends.

Before, the request was announced (and the adapter's job freed its pinned buffers) as soon as its outcome was
decided: a lane still placing a chunk wrote into memory the pool could hand to another request. And
``Inbox.expect_resharded`` registered the request before its job existed: a cancel in that gap reached no job
(the transfers went on) or freed the job's buffers before they were handed to the transport."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pytest
from helpers import HoldingStage
from reshard_ref import global_payload, shard_reference

from kvwire import Receiver, State, TransferCancelled, TransferFailed, TransferTimedOut, connect
from kvwire.codec.hf import layout_from_hf_config
from kvwire.codec.layout import ModelLayout, RequestSpec, plan_segments
from kvwire.codec.reshard import ReshardPlan, plan_reshard
from kvwire.reshard import ReshardIncoming, ReshardOutgoing, ReshardReceiver, ReshardSender

CONFIG = {"model_type": "llama", "num_hidden_layers": 4, "hidden_size": 128, "num_attention_heads": 8,
          "num_key_value_heads": 2, "head_dim": 16}
HOLD = 0.3  # seconds the request is watched while the lane is held (a done callback queued would have run)


def _layout(tp: int, rank: int = 0) -> ModelLayout:
    return layout_from_hf_config(CONFIG, tp_size=tp, tp_rank=rank, name="gqa4")




@dataclass
class Reshard:
    plan: ReshardPlan
    h: ReshardIncoming
    outs: list[ReshardOutgoing]
    prefill: list[list[np.ndarray]]
    dest: list[np.ndarray]
    want: list[np.ndarray]


@contextlib.contextmanager
def resharded(name: str, gate: HoldingStage, timeout: float = 30.0) -> Iterator[Reshard]:
    """TP 2 -> 1 over real sockets (one two-lane session per prefill rank); nothing written yet."""
    plan = plan_reshard(_layout(2), _layout(1))
    req = RequestSpec(name, 1024, 1023)
    g = _layout(1)
    payload = global_payload(g, req, seed=7)
    prefill = [shard_reference(g, CONFIG, payload, req, 2, p) for p in range(2)]
    dest = [np.zeros(s.nbytes, np.uint8) for s in plan_segments(plan.decode, req)]
    with contextlib.ExitStack() as stack:
        rx = stack.enter_context(Receiver(key="k", chunk_stage=gate))
        sessions = [stack.enter_context(connect(*rx.address, key="k", lanes=2, chunk_size=1 << 16)) for _ in range(2)]
        h = ReshardReceiver(plan, 0, rx).expect(req, dest, timeout=timeout)
        h.add_done_callback(gate.done)
        outs = [ReshardSender(plan, p, {0: sessions[p]}).send(req, timeout=timeout) for p in range(2)]
        try:
            yield Reshard(plan, h, outs, prefill, dest, shard_reference(g, CONFIG, payload, req, 1, 0))
        finally:
            gate.release.set()
            for out in outs:
                out.cancel("test over")  # (no-op once ended)
            assert rx.callbacks.drain(10)


@pytest.mark.parametrize("how", ["cancel", "source fails", "source times out"])
def test_a_request_ended_while_a_source_lane_writes_is_announced_only_after_that_chunk(
        how: str, no_leaks: None) -> None:
    """Prefill rank 0's first chunk sits in the stage (a lane writing into the request's memory) when the request
    ends: by ``cancel``, by prefill rank 1's transfer failing, or by it timing out (rank 1 never sends). The
    request stays unannounced (not terminal, no done callback) until that chunk is out; then it ends once."""
    gate = HoldingStage()
    with resharded(f"end-mid-chunk-{how}", gate, timeout=1.5 if how == "source times out" else 30.0) as r:
        r.outs[0].write_all(r.prefill[0])
        r.outs[0].finish()
        assert gate.entered.wait(20)
        try:
            if how == "cancel":
                r.h.cancel("engine dropped the request")
            elif how == "source fails":
                r.outs[1].cancel("prefill rank 1 died")
                assert r.h.sources[1].future.exception(10) is not None  # (its CANCEL is in)
            else:
                assert r.h.sources[1].future.exception(10) is not None  # (its deadline passed)
            time.sleep(HOLD)
            assert not r.h.finished and gate.log == [], f"announced while a lane still writes: {gate.log}"
        finally:
            gate.release.set()
        expected = {"cancel": TransferCancelled, "source fails": TransferFailed, "source times out": TransferTimedOut}
        with pytest.raises(expected[how]):
            r.h.result(10)
        assert all(s.finished for s in r.h.sources.values())
        deadline = time.monotonic() + 10
        while gate.log != ["stage out", "done"] and time.monotonic() < deadline:
            time.sleep(0.01)
        assert gate.log == ["stage out", "done"]


def test_control_a_request_whose_lane_is_held_but_not_cancelled_arrives_exact(no_leaks: None) -> None:
    gate = HoldingStage()
    with resharded("held-not-cancelled", gate) as r:
        for p in range(2):
            r.outs[p].write_all(r.prefill[p])
            r.outs[p].finish()
        assert gate.entered.wait(20)
        time.sleep(HOLD)
        assert not r.h.finished
        gate.release.set()
        assert r.h.result(20).state is State.DONE
        for out in r.outs:
            out.result(20)
        assert [a.tobytes() for a in r.dest] == [w.tobytes() for w in r.want]
