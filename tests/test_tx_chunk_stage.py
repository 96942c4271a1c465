"""The sender's chunk stage (``Session(chunk_stage=...)``) on real sockets: every chunk passes it once, after
it is hashed and before the wire; a length-keeping transform undone by the receiver's stage arrives bit-exact,
and the same transform without the receiver's half is caught by the hash check (the negative control)."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from kvwire import Receiver, State, TransferFailed, connect
from kvwire.codec.layout import ModelLayout, RequestSpec
from kvwire.tcp.transport import ChunkRef
from kvwire.testing.fixtures import default_request, fixture_payload, load_fixture

CHUNK = 64 * 1024
KEY = 0x5A


class Recorder:
    """Records every chunk a sender puts on a lane, and the bytes it carries."""

    def __init__(self) -> None:
        self.seen: list[tuple[ChunkRef, bytes]] = []
        self._lock = threading.Lock()

    def outgoing(self, ref: ChunkRef, pieces: list[memoryview]) -> list[memoryview]:
        with self._lock:
            self.seen.append((ref, b"".join(bytes(p) for p in pieces)))
        return pieces

    def incoming(self, ref: ChunkRef, views: list[memoryview]) -> None:
        raise AssertionError("a sender's stage never sees incoming chunks")


class Xor:
    """A length-keeping transform: XOR every byte with ``KEY`` (in a copy on the way out, in place on the way in)."""

    def outgoing(self, ref: ChunkRef, pieces: list[memoryview]) -> list[memoryview]:
        return [memoryview(np.bitwise_xor(np.frombuffer(p, np.uint8), KEY).tobytes()) for p in pieces]

    def incoming(self, ref: ChunkRef, views: list[memoryview]) -> None:
        for v in views:
            a = np.frombuffer(v, np.uint8)
            a ^= KEY


def _request() -> tuple[ModelLayout, RequestSpec, list[np.ndarray], np.ndarray]:
    layout = load_fixture("tiny-qwen3-next")
    req = default_request("tx-staged")
    src = fixture_payload(layout, req)
    return layout, req, src, np.zeros(sum(a.nbytes for a in src), np.uint8)


def test_every_chunk_passes_the_senders_stage_once_after_hashing() -> None:
    layout, req, src, dst = _request()
    stage = Recorder()
    with Receiver() as rx, connect(*rx.address, lanes=3, chunk_size=CHUNK, chunk_stage=stage) as s:
        assert s.chunk_stage is stage
        h_rx = rx.expect(req.request_id, dst)
        h = s.send(layout, req)
        h.write_all(src)
        h.finish().result(20)
        assert h_rx.result(20).state is State.DONE
    whole = b"".join(a.view(np.uint8).tobytes() for a in src)
    assert dst.tobytes() == whole
    chunks = sorted(stage.seen, key=lambda x: x[0].chunk)
    assert [ref.chunk for ref, _ in chunks] == list(range(h.plan.num_chunks))  # each once: nothing re-sent
    for ref, data in chunks:
        assert ref.transfer_id == h.transfer_id and 0 <= ref.lane < 3 and ref.length == len(data) > 0
    assert b"".join(data for _, data in chunks) == whole  # an observer sees the payload as hashed


def test_a_transform_undone_by_the_receivers_stage_arrives_bit_exact() -> None:
    layout, req, src, dst = _request()
    with Receiver(chunk_stage=Xor()) as rx, connect(*rx.address, lanes=2, chunk_size=CHUNK, chunk_stage=Xor()) as s:
        h_rx = rx.expect(req.request_id, dst)
        h = s.send(layout, req)
        h.write_all(src)
        h.finish().result(20)
        assert h_rx.result(20).state is State.DONE
        assert rx.stats()["chunks_rejected"] == 0 and s.stats()["chunks_nacked"] == 0
    assert dst.tobytes() == b"".join(a.view(np.uint8).tobytes() for a in src)


def test_the_same_transform_without_the_receivers_half_fails_verification() -> None:
    layout, req, src, dst = _request()
    with Receiver() as rx, connect(*rx.address, lanes=2, chunk_size=CHUNK, chunk_stage=Xor(), max_retries=1) as s:
        h_rx = rx.expect(req.request_id, dst)
        h = s.send(layout, req)
        h.write_all(src)
        with pytest.raises(TransferFailed, match="failed verification"):
            h.finish().result(20)
        with pytest.raises(TransferFailed):
            h_rx.result(20)
        assert s.stats()["chunks_nacked"] >= 1


class Broken:
    """A stage that fails on one chunk: by raising, or by returning a payload of the wrong length."""

    def __init__(self, chunk: int, how: str) -> None:
        self.chunk, self.how = chunk, how

    def outgoing(self, ref: ChunkRef, pieces: list[memoryview]) -> list[memoryview]:
        if ref.chunk != self.chunk:
            return pieces
        if self.how == "raises":
            raise RuntimeError("stage bug")
        return [p[:-1] for p in pieces]  # one byte short per piece

    def incoming(self, ref: ChunkRef, views: list[memoryview]) -> None:
        return None


@pytest.mark.parametrize(("how", "why"), [("raises", "stage bug"), ("shortens", "bytes for a")])
def test_a_failing_stage_fails_its_transfer_at_once_and_the_session_carries_on(how: str, why: str,
                                                                               no_leaks: None) -> None:
    """A stage is user code: when it fails on a chunk, that transfer ends failed (both ends, promptly, not
    at its deadline) and the lane carries the next transfer; nothing wrong goes on the wire."""
    layout, req, src, dst = _request()
    with Receiver() as rx, connect(*rx.address, lanes=2, chunk_size=CHUNK, chunk_stage=Broken(2, how)) as s:
        h_rx = rx.expect(req.request_id, dst)
        h = s.send(layout, req, timeout=None)
        h.write_all(src)
        with pytest.raises(TransferFailed, match=f"chunk stage failed on chunk 2: (RuntimeError|ValueError): .*{why}"):
            h.finish().result(10)
        with pytest.raises(TransferFailed):
            h_rx.result(10)
        assert s.stats()["transfers_failed"] == 1 and s.healthy
        s.chunk_stage = Recorder()
        req2 = default_request("tx-staged-after")
        dst2 = np.zeros_like(dst)
        h_rx2 = rx.expect(req2.request_id, dst2)
        h2 = s.send(layout, req2)
        h2.write_all(src)
        assert h2.finish().result(10).state is State.DONE and h_rx2.result(10).state is State.DONE
        assert rx.stats()["chunks_rejected"] == 0
    assert dst2.tobytes() == b"".join(a.view(np.uint8).tobytes() for a in src)
