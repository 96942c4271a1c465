"""``ReshardReceiver.expect`` failing partway (a later prefill rank's transfer id already expected): the sources
registered before it may have begun, a lane writing into the caller's buffers, so the call returns a FAILED
handle announced only once every one of them has ended; failing at the first rank, nothing was registered and
the error is raised at the call. Real sessions; prefill rank 0's first chunk held in the receiver's chunk stage.

Before: the error was raised at once while rank 0's transfer was still writing into the buffers, with nothing
to wait on (``Inbox.expect_resharded`` then freed the job's buffers under that lane)."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import pytest
from helpers import HoldingStage
from reshard_ref import global_payload, shard_reference
from test_reshard_release import CONFIG, HOLD, _layout

from kvwire import Receiver, State, TransferFailed, connect
from kvwire.codec.layout import RequestSpec, plan_segments
from kvwire.codec.reshard import plan_reshard
from kvwire.reshard import ReshardReceiver, ReshardSender, sub_request_id


def _until(pred: Any, timeout: float = 10.0) -> bool:
    end = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > end:
            return False
        time.sleep(0.01)
    return True


def test_a_later_rank_failing_to_register_returns_a_failed_handle_announced_after_the_begun_sources(
        no_leaks: None, monkeypatch: pytest.MonkeyPatch) -> None:
    gate = HoldingStage()
    plan = plan_reshard(_layout(2), _layout(1))
    req = RequestSpec("partial-expect", 1024, 1023)
    g = _layout(1)
    prefill = [shard_reference(g, CONFIG, global_payload(g, req, seed=3), req, 2, p) for p in range(2)]
    dest = [np.zeros(s.nbytes, np.uint8) for s in plan_segments(plan.decode, req)]
    with Receiver(key="k", chunk_stage=gate) as rx, connect(*rx.address, key="k", lanes=2) as session:
        taken = rx.expect(sub_request_id(req.request_id, 1, 0), bytearray(8))  # (someone else's: rank 1's id)
        real, sent = rx.expect, []

        def expect(request_id: str, buffers: Any, **kwargs: Any) -> Any:
            if request_id == sub_request_id(req.request_id, 1, 0):  # rank 0's transfer begins meanwhile
                out = ReshardSender(plan, 0, {0: session}).send(req, timeout=30)
                out.write_all(prefill[0])
                sent.append(out.finish())
                assert gate.entered.wait(20)
            return real(request_id, buffers, **kwargs)
        monkeypatch.setattr(rx, "expect", expect)
        try:
            h = ReshardReceiver(plan, 0, rx).expect(req, dest, timeout=30)
            h.add_done_callback(gate.done)
            time.sleep(HOLD)
            assert not h.finished and not h.sources[0].finished and gate.log == [], \
                f"announced while prefill rank 0's lane still writes into the buffers: {gate.log}"
        finally:
            gate.release.set()
        with pytest.raises(TransferFailed, match=r"prefill rank 1 \(partial-expect@1>0\) could not be expected: "
                                                 r"ValueError: .*already expected"):
            h.result(10)
        assert list(h.sources) == [0] and h.sources[0].state is State.CANCELLED
        assert _until(lambda: gate.log == ["stage out", "done"]), gate.log
        with pytest.raises(TransferFailed, match="cancelled"):  # (the receiver told rank 0's sender)
            sent[0].result(10)
        assert not taken.finished  # (the other expectation of that id is untouched)
        taken.cancel("test over")
        assert rx.callbacks.drain(10)


def test_control_the_first_rank_failing_to_register_raises_and_registers_nothing(no_leaks: None) -> None:
    plan = plan_reshard(_layout(2), _layout(1))
    req = RequestSpec("first-taken", 64, 63)
    dest = [np.zeros(s.nbytes, np.uint8) for s in plan_segments(plan.decode, req)]
    with Receiver(key="k") as rx:
        taken = rx.expect(sub_request_id(req.request_id, 0, 0), bytearray(8))
        with pytest.raises(ValueError, match="already expected"):
            ReshardReceiver(plan, 0, rx).expect(req, dest, timeout=30)
        again = rx.expect(sub_request_id(req.request_id, 1, 0), bytearray(8))  # (rank 1 was never registered)
        for h in (taken, again):
            h.cancel("test over")
