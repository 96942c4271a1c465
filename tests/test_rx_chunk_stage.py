"""The receiver's chunk stage (``Receiver(chunk_stage=...)``) on real sockets: every chunk passes it once its
payload is in the destination and before its hash is checked, so a stage that rewrites the bytes is caught by
the hash check (NACK, re-send) and one that only looks sees exactly the bytes that arrived."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import numpy as np
import pytest
from helpers import HoldingStage, wait_until

from kvwire import Receiver, State, TransferCancelled, TransferFailed, connect
from kvwire.tcp.transport import ChunkRef
from kvwire.testing.fixtures import default_request, fixture_payload, load_fixture

CHUNK = 64 * 1024


class Recorder:
    """Records each chunk it sees and the bytes in its views; flips one byte of chunk ``corrupt`` once."""

    def __init__(self, corrupt: int | None = None) -> None:
        self.seen: list[tuple[ChunkRef, bytes]] = []
        self.corrupt = corrupt
        self._lock = threading.Lock()

    def outgoing(self, ref: ChunkRef, pieces: list[memoryview]) -> list[memoryview]:
        return pieces

    def incoming(self, ref: ChunkRef, views: list[memoryview]) -> None:
        with self._lock:
            self.seen.append((ref, b"".join(bytes(v) for v in views)))
            if ref.chunk == self.corrupt:
                self.corrupt = None
                views[-1][len(views[-1]) - 1] ^= 0xFF


@dataclass
class Trip:
    src: bytes
    dst: bytes
    num_chunks: int
    transfer_id: int
    chunks_rejected: int


def _round_trip(stage: Recorder) -> Trip:
    layout = load_fixture("tiny-qwen3-next")
    req = default_request("staged")
    src = fixture_payload(layout, req)
    dst = np.zeros(sum(a.nbytes for a in src), np.uint8)
    with Receiver(chunk_stage=stage) as rx, connect(*rx.address, lanes=3, chunk_size=CHUNK) as s:
        h_rx = rx.expect(req.request_id, dst)
        h = s.send(layout, req)
        h.write_all(src)
        h.finish().result(20)
        assert h_rx.result(20).state is State.DONE
        assert h_rx.plan is not None and h_rx.manifest is not None
        assert wait_until(lambda: rx.stats()["transfers_done"] == 1, 5)
        rejected = rx.stats()["chunks_rejected"]
    return Trip(b"".join(a.view(np.uint8).tobytes() for a in src), dst.tobytes(), h_rx.plan.num_chunks,
                h_rx.manifest.transfer_id, rejected)


def test_every_chunk_passes_the_stage_with_its_payload_in_place() -> None:
    stage = Recorder()
    t = _round_trip(stage)
    assert t.dst == t.src and t.chunks_rejected == 0
    assert sorted(ref.chunk for ref, _ in stage.seen) == list(range(t.num_chunks))  # each once: none re-sent
    seen = {}
    for ref, data in stage.seen:
        assert ref.transfer_id == t.transfer_id and ref.length == len(data) > 0 and 0 <= ref.lane < 3
        seen[ref.chunk] = data
    assert b"".join(seen[c] for c in range(t.num_chunks)) == t.src  # what it saw is what arrived, in place


def test_a_stage_that_changes_the_bytes_is_caught_by_the_hash_check_and_the_chunk_is_sent_again() -> None:
    stage = Recorder(corrupt=3)
    t = _round_trip(stage)
    assert t.chunks_rejected == 1 and t.dst == t.src  # NACKed after the stage, re-sent, verified the second time
    chunks = [ref.chunk for ref, _ in stage.seen]
    assert chunks.count(3) == 2 and sorted(set(chunks)) == list(range(t.num_chunks))
    assert len(chunks) == t.num_chunks + 1


class Raises:
    """A stage that fails on one chunk of the first transfer it sees."""

    def __init__(self, chunk: int) -> None:
        self.chunk = chunk
        self.tid: int | None = None
        self.calls = 0

    def outgoing(self, ref: ChunkRef, pieces: list[memoryview]) -> list[memoryview]:
        return pieces

    def incoming(self, ref: ChunkRef, views: list[memoryview]) -> None:
        self.calls += 1
        if self.tid is None:
            self.tid = ref.transfer_id
        if ref.transfer_id == self.tid and ref.chunk == self.chunk:
            raise RuntimeError("stage broke")


def test_a_stage_that_raises_fails_that_transfer_on_both_ends_and_the_session_carries_the_next() -> None:
    layout = load_fixture("tiny-qwen3-next")
    stage = Raises(chunk=2)
    with Receiver(chunk_stage=stage) as rx, connect(*rx.address, lanes=2, chunk_size=CHUNK) as s:
        for i, fails in enumerate((True, False)):
            req = default_request(f"stage-{i}")
            src = fixture_payload(layout, req)
            dst = np.zeros(sum(a.nbytes for a in src), np.uint8)
            h_rx = rx.expect(req.request_id, dst)
            h = s.send(layout, req, timeout=20)
            h.write_all(src)
            if fails:
                with pytest.raises(TransferFailed, match="chunk stage failed on chunk 2: RuntimeError: stage broke"):
                    h_rx.result(10)
                with pytest.raises(TransferFailed):
                    h.finish().result(10)
            else:
                h.finish().result(20)
                assert h_rx.result(20).state is State.DONE
                assert dst.tobytes() == b"".join(a.view(np.uint8).tobytes() for a in src)
        assert rx.stats()["transfers_failed"] == 1 and rx.stats()["transfers_done"] == 1
        assert len(rx.live_sessions()) == 1 and len(rx.live_sessions()[0].lanes) == 2  # no lane was lost to it




def test_a_transfer_cancelled_while_a_lane_writes_into_it_ends_only_after_that_chunk() -> None:
    """The plain path's guard against what ``ReshardIncoming`` lacked: the engine resolves a cancelled transfer
    only once no lane writes into its destination, so its done callbacks (the user's "buffers are free") never
    run beside a chunk still being placed."""
    layout = load_fixture("tiny-qwen3-next")
    gate = HoldingStage()
    req = default_request("cancel-mid-chunk")
    src = fixture_payload(layout, req)
    dst = np.zeros(sum(a.nbytes for a in src), np.uint8)
    with Receiver(chunk_stage=gate) as rx, connect(*rx.address, lanes=2, chunk_size=CHUNK) as s:
        h_rx = rx.expect(req.request_id, dst)
        h_rx.add_done_callback(gate.done)
        h = s.send(layout, req, timeout=20)
        h.write_all(src)
        try:
            assert gate.entered.wait(20)
            h_rx.cancel("engine dropped the request")
            time.sleep(0.3)  # (the done callback would have run by now; well under the engine's UNSTICK_AFTER)
            assert not h_rx.finished and gate.log == []
        finally:
            gate.release.set()
        with pytest.raises(TransferCancelled):
            h_rx.result(10)
        assert rx.callbacks.drain(10)
        assert gate.log == ["stage out", "done"]
        with pytest.raises(TransferCancelled):
            h.result(10)
