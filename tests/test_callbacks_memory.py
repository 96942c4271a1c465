"""User callbacks never delay the protocol, and ended transfers hold no memory.

A done callback (and layer callbacks) that blocks far longer than the peer timeout on both sides, with
several sessions sending at once: before, it ran on the receiver's control thread ahead of COMPLETE, so
the receiver called its peer silent and the two sides disagreed. Allocator-placed transfers handed to
``on_transfer`` were also queued for ``next_transfer()`` forever, and each handle's future held the
handle, so buffers outlived their transfers until a garbage collection.
"""

from __future__ import annotations

import gc
import os
import threading
import time
import weakref
from typing import Any

import numpy as np
from helpers import payload, wait_until

from kvwire import Receiver, RequestSpec, State, connect, plan_segments
from kvwire.testing.fixtures import load_fixture

PEER_TIMEOUT = 1.5


def test_slow_callbacks_do_not_split_outcomes(no_leaks: None) -> None:
    layout = load_fixture("tiny-qwen3-next")
    release = threading.Event()
    entered: list[str] = []

    def slow(what: str) -> Any:
        def fn(*_: object) -> None:
            entered.append(what)
            release.wait(20)  # a 20 s callback, cut short once the test has seen both sides agree
        return fn

    sessions, pairs = [], []
    with Receiver(peer_timeout=PEER_TIMEOUT, heartbeat=0.2) as rx:
        try:
            for i in range(4):
                s = connect(*rx.address, lanes=2, chunk_size=64 * 1024, peer_timeout=PEER_TIMEOUT, heartbeat=0.2)
                sessions.append(s)
                for j in range(3):
                    req = RequestSpec(f"slow-{i}-{j}", 500, 500)
                    src = payload(layout, req, seed=i * 3 + j)
                    dst = np.zeros(sum(x.nbytes for x in plan_segments(layout, req)), np.uint8)
                    h_rx = rx.expect(req.request_id, dst, layout=layout)
                    h = s.send(layout, req, timeout=30)
                    if j == 0:
                        h_rx.on_layer(slow("rx-layer"))
                        h.on_layer_acked(slow("tx-layer"))
                    h_rx.add_done_callback(slow("rx-done"))
                    h.add_done_callback(slow("tx-done"))
                    pairs.append((h, h_rx, src, dst))
            threads = [threading.Thread(target=lambda h=h, src=src: (h.write_all(src), h.finish()))
                       for h, _, src, _ in pairs]
            for t in threads:
                t.start()
            for t in threads:
                t.join(10)
            for h, h_rx, _, _ in pairs:
                assert h.result(20) is h  # done on the sender: COMPLETE arrived while callbacks block
                assert h_rx.result(20) is h_rx
            # slow callbacks are running on both sides (they run one at a time per handle, on a small pool)
            sides = ({"rx-layer", "rx-done"}, {"tx-layer", "tx-done"})
            assert wait_until(lambda: all(side & set(entered) for side in sides), 10)
            time.sleep(2 * PEER_TIMEOUT)  # callbacks still blocked, well past the peer timeout
            assert all(s.healthy and not s.failure for s in sessions)
            assert rx.sessions == 4
            for h, h_rx, src, dst in pairs:
                assert h.state is State.DONE and h_rx.state is State.DONE
                assert dst.tobytes() == b"".join(a.tobytes() for a in src)
        finally:
            release.set()
            for s in sessions:
                s.close()


def test_a_slow_allocator_neither_silences_its_session_nor_holds_the_transfers_behind_it(no_leaks: None) -> None:
    """The allocator (user code: it may wait for GPU memory a decode step frees) ran on the session's control
    reader: one that took 2.5 s let a 1 s ``peer_timeout`` fail the session as silent, and every transfer
    behind it waited. Blocked here for twice the peer timeout: the session lives, a registered transfer sent
    after it completes meanwhile, and the allocated one completes once it returns. Negative control: a sender
    that goes silent while the allocator blocks is still called silent."""
    from helpers import raw_sender

    from kvwire.codec import frames as F
    from kvwire.codec.manifest import build_manifest

    layout = load_fixture("tiny-qwen3-next")
    gate = threading.Event()
    asked: list[str] = []

    def alloc(m: Any) -> np.ndarray:
        asked.append(m.request.request_id)
        gate.wait(4 * PEER_TIMEOUT)
        return np.zeros(m.total_bytes, np.uint8)

    req_a, req_b = RequestSpec("alloc", 300, 300), RequestSpec("registered", 300, 300)
    src_a, src_b = payload(layout, req_a, seed=1), payload(layout, req_b, seed=2)
    dst_b = np.zeros(sum(x.nbytes for x in plan_segments(layout, req_b)), np.uint8)
    try:
        with Receiver(allocator=alloc, peer_timeout=PEER_TIMEOUT, heartbeat=0.2) as rx, \
                connect(*rx.address, lanes=2, chunk_size=64 * 1024, peer_timeout=PEER_TIMEOUT, heartbeat=0.2) as s:
            h_a = s.send(layout, req_a, timeout=30)
            h_a.write_all(src_a)
            h_a.finish()
            assert wait_until(lambda: asked == ["alloc"], 5)
            h_rx_b = rx.expect(req_b.request_id, dst_b, layout=layout)
            h_b = s.send(layout, req_b, timeout=30)
            h_b.write_all(src_b)
            h_b.finish()
            assert h_b.result(3 * PEER_TIMEOUT) is h_b and h_rx_b.result(5) is h_rx_b
            assert not gate.is_set() and h_a.state is State.ACTIVE  # still in the allocator
            time.sleep(2 * PEER_TIMEOUT)
            assert s.healthy and not s.failure and rx.sessions == 1
            gate.set()
            assert h_a.result(10) is h_a
            got = rx.next_transfer(timeout=5)
            assert got.result(5) is got and got.dest.tobytes() == b"".join(a.tobytes() for a in src_a)
            assert dst_b.tobytes() == b"".join(a.tobytes() for a in src_b)
        gate.clear()
        asked.clear()
        with Receiver(key="k", allocator=alloc, peer_timeout=PEER_TIMEOUT, heartbeat=0.2) as rx:
            raw, ch, _, _ = raw_sender(rx.address, b"k")
            with raw:  # a hand-made sender: one BEGIN, then not a heartbeat
                ch.send(F.BEGIN, build_manifest(1, layout, req_a, 64 * 1024).to_wire(with_layout=True))
                assert wait_until(lambda: asked == ["alloc"], 5)
                assert wait_until(lambda: rx.sessions == 0, 3 * PEER_TIMEOUT)
                assert not gate.is_set()
    finally:
        gate.set()


def test_close_runs_the_callbacks_already_delivered(no_leaks: None) -> None:
    """A stager releasing its pinned buffers from a done callback must have finished when close() returns:
    a program that exits right after close() must not tear torch down under a callback thread."""
    layout = load_fixture("tiny-qwen3-next")
    req = RequestSpec("close-drain", 200, 200)
    src = payload(layout, req, seed=7)
    dst = np.zeros(sum(x.nbytes for x in plan_segments(layout, req)), np.uint8)
    ran: list[str] = []

    def slow(what: str) -> Any:
        def fn(*_: object) -> None:
            time.sleep(0.5)
            ran.append(what)
        return fn

    rx = Receiver()
    s = connect(*rx.address, lanes=2)
    try:
        h_rx = rx.expect(req.request_id, dst, layout=layout)
        h = s.send(layout, req, timeout=30)
        h_rx.add_done_callback(slow("rx"))
        h.add_done_callback(slow("tx"))
        h.write_all(src)
        h.finish()
        h.result(20), h_rx.result(20)
    finally:
        s.close()
        assert "tx" in ran, "Session.close() returned before the transfer's done callback ran"
        rx.close()
        assert "rx" in ran, "Receiver.close() returned before the transfer's done callback ran"


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_allocator_transfers_handed_to_on_transfer_keep_no_memory(no_leaks: None) -> None:
    layout = load_fixture("tiny-qwen3-next")
    req0 = RequestSpec("rss-0", 3000, 3000)
    src = payload(layout, req0, seed=7)
    ended: list[State] = []
    done = threading.Semaphore(0)

    def on_transfer(h: Any) -> None:  # keeps nothing: only counts the outcome
        h.add_done_callback(lambda f: (ended.append(State.DONE if f.exception() is None else State.FAILED),
                                       done.release()))

    rss: list[int] = []
    with Receiver(allocator=lambda m: np.ones(m.total_bytes, np.uint8), on_transfer=on_transfer) as rx, \
            connect(*rx.address, lanes=2) as s:
        for i in range(100):
            h = s.send(layout, RequestSpec(f"rss-{i}", 3000, 3000))
            h.write_all(src)
            h.finish().result(20)
            assert done.acquire(timeout=20)
            if i in (9, 99):
                rss.append(_rss())
        del h
    assert ended == [State.DONE] * 100
    grown = rss[1] - rss[0]
    print(f"RSS after 10 transfers {rss[0] / 2**20:.1f} MiB, after 100 {rss[1] / 2**20:.1f} MiB "
          f"(+{grown / 2**20:.1f} MiB; each transfer allocates {sum(a.nbytes for a in src) / 2**20:.1f} MiB)")
    assert grown < 48 * 2**20, f"RSS grew {grown / 2**20:.1f} MiB over 90 transfers"


def test_ended_transfers_free_their_buffers_without_a_garbage_collection(no_leaks: None) -> None:
    layout = load_fixture("tiny-qwen3-next")
    gc.collect()
    gc.disable()
    try:
        refs: list[weakref.ref[np.ndarray]] = []
        queued: list[Any] = []

        def allocate(m: Any) -> np.ndarray:
            buf = np.zeros(m.total_bytes, np.uint8)
            refs.append(weakref.ref(buf))
            return buf

        with Receiver(allocator=allocate) as rx, connect(*rx.address, lanes=2, chunk_size=64 * 1024) as s:
            for i in range(10):
                req = RequestSpec(f"weak-{i}", 600, 600)
                src = payload(layout, req, seed=i)
                refs.append(weakref.ref(src[0]))
                if i % 2:  # registered in advance (expect) ...
                    dst = np.zeros(sum(x.nbytes for x in plan_segments(layout, req)), np.uint8)
                    refs.append(weakref.ref(dst))
                    h_rx = rx.expect(req.request_id, dst)
                    del dst
                h = s.send(layout, req)
                h.on_layer_acked(lambda layer, h=h: None)  # a callback that holds its handle
                h.write_all(src)
                h.finish().result(20)
                if not i % 2:  # ... or placed by the allocator and taken with next_transfer
                    h_rx = rx.next_transfer(10)
                h_rx.on_layer(lambda layer, h_rx=h_rx: None)
                h_rx.add_done_callback(lambda f, h_rx=h_rx: None)
                h_rx.result(10)
                queued.append(weakref.ref(h_rx))
                del h, h_rx, src
            alive = lambda: [i for i, r in enumerate(refs) if r() is not None]  # noqa: E731
            assert wait_until(lambda: not alive(), 5), f"buffers still alive without gc: {alive()} of {len(refs)}"
            assert all(r() is None for r in queued)
    finally:
        gc.enable()


def test_cancelled_and_failed_transfers_free_their_buffers_without_a_garbage_collection(no_leaks: None) -> None:
    layout = load_fixture("tiny-qwen3-next")
    gc.collect()
    gc.disable()
    try:
        refs: list[weakref.ref[np.ndarray]] = []
        with Receiver() as rx, connect(*rx.address, lanes=2, chunk_size=64 * 1024) as s:
            for i, how in enumerate(["sender-cancel", "receiver-cancel", "deadline"] * 2):
                req = RequestSpec(f"{how}-{i}", 600, 600)
                src = payload(layout, req, seed=i)
                dst = np.zeros(sum(x.nbytes for x in plan_segments(layout, req)), np.uint8)
                refs += [weakref.ref(src[0]), weakref.ref(dst)]
                h_rx = rx.expect(req.request_id, dst, timeout=1.0 if how == "deadline" else None)
                h = s.send(layout, req)
                h.add_done_callback(lambda f, h=h: None)
                h_rx.add_done_callback(lambda f, h_rx=h_rx: None)
                h.write_layer(0, [a for a, x in zip(src, plan_segments(layout, req)) if x.layer == 0])
                if how == "sender-cancel":
                    h.cancel("test")
                elif how == "receiver-cancel":
                    assert wait_until(lambda h_rx=h_rx: bool(h_rx.layers_ready) or h_rx.finished, 10)
                    h_rx.cancel("test")
                for x in (h, h_rx):
                    try:
                        x.result(10)
                    except Exception:  # noqa: BLE001 - each ends cancelled or timed out; raising must not pin it
                        pass
                assert h.finished and h_rx.finished and h_rx.state is not State.DONE
                del h, h_rx, src, dst, x
            alive = lambda: [i for i, r in enumerate(refs) if r() is not None]  # noqa: E731
            assert wait_until(lambda: not alive(), 5), f"buffers still alive without gc: {alive()} of {len(refs)}"
    finally:
        gc.enable()
