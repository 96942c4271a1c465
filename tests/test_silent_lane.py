"""A lane that goes silent while the control connection stays healthy: a proxy stops forwarding one
lane's bytes mid-chunk. The sender notices the lane no longer drains (no acknowledgement, nothing taken
off its send queue) and re-sends its chunks on the other lanes; the receiver cuts a lane whose chunk
stopped arriving; the duplicate copy of the stuck chunk is never written over it. Either way the
transfer ends done, with the right bytes, well inside its own deadline."""

from __future__ import annotations

import socket
import threading
import time

import numpy as np
import pytest
from helpers import StallProxy, payload, wait_until

from kvwire import Receiver, RequestSpec, connect, plan_segments
from kvwire.testing.faults import ChunkHook
from kvwire.testing.fixtures import load_fixture

CHUNK = 64 * 1024


def _stalled_transfer(sender_timeout: float, receiver_timeout: float, tokens: int = 6000
                      ) -> tuple[float, dict[str, int]]:
    """Stall the first lane to send, 16 bytes into of its first chunk's body; returns (seconds from the stall to
    done, sender stats). ~1 KiB a token: 6000 tokens are about a hundred 64 KiB chunks."""
    layout = load_fixture("tiny-qwen3-next")
    req = RequestSpec("stall", tokens, tokens)
    src = payload(layout, req, seed=3)
    dst = np.zeros(sum(s.nbytes for s in plan_segments(layout, req)), np.uint8)
    with Receiver(peer_timeout=receiver_timeout, heartbeat=0.2) as rx:
        proxy = StallProxy(rx.address)
        try:
            with connect(*proxy.address, lanes=3, chunk_size=CHUNK, peer_timeout=sender_timeout,
                         heartbeat=0.2) as s:
                h_rx = rx.expect(req.request_id, dst, layout=layout)

                def first_frame(lane: int, tid: int, chunk: int, pieces: list) -> None:  # type: ignore[type-arg]
                    with once:  # the first chunk sent at all: its lane stalls 16 bytes into the body
                        if not stalled:
                            stalled.append(lane)
                            proxy.stall(s.lanes[lane].ch.sock.getsockname()[1], 48 + 16)

                stalled: list[int] = []
                once = threading.Lock()
                s.chunk_stage = ChunkHook(first_frame)
                h = s.send(layout, req, timeout=60)
                h.write_all(src)
                assert proxy.stalled.wait(10)
                t0 = time.monotonic()
                h.finish().result(60)
                took = time.monotonic() - t0
                h_rx.result(10)
                assert not s.failure and s.healthy
                assert wait_until(lambda: s.alive_lanes == 3, 10)
                stats = s.stats()
        finally:
            proxy.close()
    assert dst.tobytes() == b"".join(a.tobytes() for a in src)
    return took, stats


@pytest.mark.parametrize("tokens", [100, 300, 600, 6000])
def test_sender_detects_a_lane_that_stopped_draining_and_resends_its_chunks(tokens: int, no_leaks: None) -> None:
    # the receiver would wait 30 s on the stuck chunk: only the sender's detection can help in time.
    # 600 tokens: the stalled lane's few chunks fit in the socket buffers, so it sits idle with chunks
    # in flight (no send ever blocks); 6000: its sends block too.
    took, stats = _stalled_transfer(sender_timeout=2.0, receiver_timeout=30.0, tokens=tokens)
    assert stats["chunks_requeued"] >= 1 and stats["lane_reconnects"] >= 1
    assert took < 2.0 * 2, f"stalled lane took {took:.2f}s to get past (peer timeout 2 s)"


def test_receiver_cuts_a_lane_stuck_mid_chunk(no_leaks: None) -> None:
    # the sender would wait 15 s before calling the lane stalled: the receiver's cut comes first
    took, stats = _stalled_transfer(sender_timeout=30.0, receiver_timeout=1.5)
    assert stats["chunks_requeued"] >= 1
    assert took < 1.5 * 3, f"stuck chunk held the transfer {took:.2f}s (receiver peer timeout 1.5 s)"


@pytest.mark.parametrize("lanes", [1])
def test_a_single_stalled_lane_is_redialled(lanes: int, no_leaks: None) -> None:
    """With one lane there is nowhere else to re-send: the re-dialled lane carries the chunks."""
    layout = load_fixture("tiny-qwen3-next")
    req = RequestSpec("one-lane", 2000, 2000)
    src = payload(layout, req, seed=4)
    dst = np.zeros(sum(s.nbytes for s in plan_segments(layout, req)), np.uint8)
    with Receiver(peer_timeout=30.0, heartbeat=0.2) as rx:
        proxy = StallProxy(rx.address)
        try:
            with connect(*proxy.address, lanes=lanes, chunk_size=CHUNK, peer_timeout=2.0, heartbeat=0.2) as s:
                h_rx = rx.expect(req.request_id, dst)
                proxy.stall(s.lanes[0].ch.sock.getsockname()[1], 48 + 16)
                h = s.send(layout, req, timeout=60)
                h.write_all(src)
                h.finish().result(20)
                h_rx.result(10)
                assert s.stats()["lane_reconnects"] >= 1
        finally:
            proxy.close()
    assert dst.tobytes() == b"".join(a.tobytes() for a in src)


def test_a_late_copy_never_overwrites_a_verified_chunk(no_leaks: None) -> None:
    """Chunk X's first copy (corrupt past its 17th byte) stalls mid-body on lane A; A is given up and X
    re-sent on another lane; then A's copy resumes. Its bytes must not land on X: before, the re-sent
    copy was written and verified beside it, A's tail then overwrote it, failed its hash, and the
    transfer still ended done with wrong bytes."""
    layout = load_fixture("tiny-qwen3-next")
    req = RequestSpec("late-copy", 600, 600)
    src = payload(layout, req, seed=5)
    dst = np.zeros(sum(s.nbytes for s in plan_segments(layout, req)), np.uint8)
    with Receiver(peer_timeout=30.0) as rx:
        proxy = StallProxy(rx.address)
        try:
            with connect(*proxy.address, lanes=3, chunk_size=CHUNK, peer_timeout=30.0) as s:
                h_rx = rx.expect(req.request_id, dst, layout=layout)
                first: list[tuple[int, int]] = []
                once = threading.Lock()

                def corrupt_first(lane: int, tid: int, chunk: int, pieces: list) -> list | None:  # type: ignore[type-arg]
                    with once:
                        if first:
                            return None
                        first.append((lane, chunk))
                        proxy.stall(s.lanes[lane].ch.sock.getsockname()[1], 48 + 16)
                    bad = bytearray(pieces[-1])
                    bad[-1] ^= 0xFF
                    return [*pieces[:-1], memoryview(bad)]

                s.chunk_stage = ChunkHook(corrupt_first)
                h = s.send(layout, req, timeout=60)
                h.write_all(src)
                assert proxy.stalled.wait(10)
                (lane, x), = first
                proxy.refuse_new = True  # the lane cannot be re-dialled: the stuck reader is not cut
                s.lanes[lane].ch.sock.shutdown(socket.SHUT_RDWR)  # the sender gives the lane up now
                # (with early chunks the stalled copy may be on the wire before the receiver admitted the
                # transfer: wait for its machine)
                assert wait_until(lambda: h_rx.machine is not None, 10)
                sm = h_rx.machine
                assert sm is not None
                # the re-sent copy arrived: before the fix it was written and verified, now it is dropped
                assert wait_until(lambda: bool(sm.verified[x]) or x in getattr(sm, "dropped", ()), 20)
                proxy.release()  # A's corrupt tail reaches the receiver
                h.finish().result(30)
                h_rx.result(10)
        finally:
            proxy.close()
    assert dst.tobytes() == b"".join(a.tobytes() for a in src)
