"""A handle's callbacks run one at a time, in order, on the pool, and before its done callbacks,
however late they are registered.

Before, ``on_layer`` (receiver) and ``on_layer_acked`` (sender) registered mid-transfer reported the layers
already verified inline, on the registering thread, while the layers verified meanwhile were reported on the
callback pool: the same callback ran on two threads at once, the layers came interleaved out of order
(``[0, 7, 1, 6, 2, 4, 3, 5]``), and the done callback ran before layers 2-6 were reported. A caller that held a
lock its callback takes deadlocked in the registration. Now the replayed layers are queued on the handle's
ordered queue, under the lock that orders the later ones.

Likewise a done callback added (``add_done_callback``, ``future.add_done_callback``) to a handle that had
already ended ran at once on the adding thread, as ``concurrent.futures`` does: beside the handle's layer
callbacks still running on the pool, and before the ones still queued. Now it is queued behind them.

And a layer verified on one lane while another lane answered the DONE could come in after the handle ended:
never reported to ``on_layer``. Now a chunk's layers are ready under the lock that verified it.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import numpy as np
import pytest
from helpers import payload, wait_until

from kvwire import Receiver, RequestSpec, connect, plan_segments
from kvwire.testing.fixtures import load_fixture

LAYOUT = load_fixture("tiny-qwen3-next")
CHUNK = 64 * 1024
SLOW = 0.08  # seconds each layer callback takes: long enough for later layers to arrive meanwhile


class Recorder:
    """Records every call of its callbacks: (what, layer, thread, entered, left)."""

    def __init__(self, delay: float = SLOW) -> None:
        self.delay = delay
        self.calls: list[tuple[str, int | None, str, float, float]] = []
        self._lock = threading.Lock()

    def layer(self, layer: int) -> None:
        t0 = time.monotonic()
        time.sleep(self.delay)
        with self._lock:
            self.calls.append(("layer", layer, threading.current_thread().name, t0, time.monotonic()))

    def done(self, _future: Any) -> None:
        t0 = time.monotonic()
        with self._lock:
            self.calls.append(("done", None, threading.current_thread().name, t0, time.monotonic()))

    def layers(self) -> list[int]:
        with self._lock:
            return [layer for what, layer, *_ in self.calls if what == "layer" and layer is not None]

    def ended(self) -> bool:
        with self._lock:
            return any(what == "done" for what, *_ in self.calls)

    def check(self, expected: list[int], registrar: str) -> None:
        """Every layer of ``expected`` once, in that order, then the done callback; never two calls at
        once; none on the registering thread ``registrar``."""
        assert wait_until(self.ended, 20), self.calls
        with self._lock:
            calls = sorted(self.calls, key=lambda c: c[3])
        assert [c[1] for c in calls if c[0] == "layer"] == expected, calls
        assert calls[-1][0] == "done", f"the done callback ran before layer callbacks: {calls}"
        for a, b in zip(calls, calls[1:]):
            assert a[4] <= b[3], f"{a} and {b} ran at the same time"
        assert all(c[2] != registrar for c in calls), f"user code ran on the registering thread: {calls}"


def _request(name: str) -> tuple[RequestSpec, list[np.ndarray], dict[int, list[int]], np.ndarray]:
    req = RequestSpec(name, 1000, 999)
    src = payload(LAYOUT, req, seed=5)
    by_layer: dict[int, list[int]] = {}
    for seg in plan_segments(LAYOUT, req):
        by_layer.setdefault(seg.layer, []).append(seg.index)
    return req, src, by_layer, np.zeros(sum(a.nbytes for a in src), np.uint8)


def _write(out: Any, src: list[np.ndarray], by_layer: dict[int, list[int]], layers: range) -> None:
    for layer in layers:
        out.write_layer(layer, [src[i] for i in by_layer[layer]])


def test_on_layer_registered_mid_transfer_reports_in_order_one_at_a_time_before_done(no_leaks: None) -> None:
    req, src, by_layer, dest = _request("late-on-layer")
    first = 5
    rec = Recorder()
    with Receiver(key="k") as rx, connect(*rx.address, key="k", lanes=3, chunk_size=CHUNK) as s:
        h_rx = rx.expect(req.request_id, dest, layout=LAYOUT)
        out = s.send(LAYOUT, req)
        _write(out, src, by_layer, range(first))
        for layer in range(first):
            h_rx.wait_layer(layer, timeout=20)
        before = list(h_rx.layer_times)  # verified so far, in the order they were
        h_rx.add_done_callback(rec.done)
        rest = threading.Thread(target=lambda: (_write(out, src, by_layer, range(first, LAYOUT.num_layers)),
                                                out.finish()))
        rest.start()  # the later layers are verified while the earlier ones are being reported
        h_rx.on_layer(rec.layer)
        rest.join(20)
        h_rx.result(20)
        out.result(20)
        rec.check(list(h_rx.layer_times), threading.current_thread().name)
        assert sorted(before) == list(range(first)) and rec.layers()[:first] == before  # the replayed ones first
    assert dest.tobytes() == b"".join(a.tobytes() for a in src)


def test_on_layer_acked_registered_mid_transfer_reports_in_order_one_at_a_time_before_done(
        no_leaks: None) -> None:
    req, src, by_layer, dest = _request("late-on-acked")
    first = 5
    rec = Recorder()
    with Receiver(key="k") as rx, connect(*rx.address, key="k", lanes=3, chunk_size=CHUNK) as s:
        h_rx = rx.expect(req.request_id, dest, layout=LAYOUT)
        out = s.send(LAYOUT, req)
        _write(out, src, by_layer, range(first))
        assert wait_until(lambda: sorted(out.layers_acked) == list(range(first)), 20), out.layers_acked
        before = out.layers_acked
        out.add_done_callback(rec.done)
        rest = threading.Thread(target=lambda: (_write(out, src, by_layer, range(first, LAYOUT.num_layers)),
                                                out.finish()))
        rest.start()
        out.on_layer_acked(rec.layer)
        rest.join(20)
        out.result(20)
        h_rx.result(20)
        rec.check(out.layers_acked, threading.current_thread().name)
        assert rec.layers()[:first] == before
    assert dest.tobytes() == b"".join(a.tobytes() for a in src)


@pytest.mark.parametrize("side", ["rx", "tx"])
def test_a_callback_registered_holding_its_own_lock_does_not_deadlock(side: str, no_leaks: None) -> None:
    """The registering thread runs no user code: a callback that takes a lock the registrar holds
    waits for it on the pool instead of failing (a plain Lock) or deadlocking on the caller's thread.
    Registered on an ended handle, the layers come after the done callbacks already queued."""
    req, src, by_layer, dest = _request(f"locked-{side}")
    mine = threading.Lock()
    got: list[tuple[int, bool, str, float]] = []
    done_at: list[float] = []

    def fn(layer: int) -> None:
        ok = mine.acquire(timeout=2)  # (the registering thread holds it while it registers)
        if ok:
            mine.release()
        got.append((layer, ok, threading.current_thread().name, time.monotonic()))

    with Receiver(key="k") as rx, connect(*rx.address, key="k", lanes=2, chunk_size=CHUNK) as s:
        h_rx = rx.expect(req.request_id, dest, layout=LAYOUT)
        out = s.send(LAYOUT, req)
        h = h_rx if side == "rx" else out
        h.add_done_callback(lambda _f: done_at.append(time.monotonic()))
        _write(out, src, by_layer, range(LAYOUT.num_layers))
        out.finish().result(20)
        h_rx.result(20)
        expected = list(h_rx.layer_times) if side == "rx" else out.layers_acked
        with mine:
            if side == "rx":
                h_rx.on_layer(fn)
            else:
                out.on_layer_acked(fn)
            time.sleep(0.2)  # (released after a while: the pool's calls wait for it meanwhile)
        assert wait_until(lambda: len(got) == len(expected), 10), got
    me = threading.current_thread().name
    assert [g[0] for g in got] == expected
    assert all(ok and name != me for _, ok, name, _ in got), got
    assert done_at and done_at[0] <= got[0][3]  # (the transfer had ended: its done callbacks were queued first)


def test_control_callbacks_registered_before_any_layer_behave_as_before(no_leaks: None) -> None:
    """Negative control: registered before any layer arrives (nothing to replay), both sides report every
    layer once, in the order verified/acked, one at a time on the pool, and then the done callback."""
    req, src, by_layer, dest = _request("early")
    rx_rec, tx_rec = Recorder(0.02), Recorder(0.02)
    with Receiver(key="k") as rx, connect(*rx.address, key="k", lanes=3, chunk_size=CHUNK) as s:
        h_rx = rx.expect(req.request_id, dest, layout=LAYOUT)
        out = s.send(LAYOUT, req)
        h_rx.on_layer(rx_rec.layer)
        h_rx.add_done_callback(rx_rec.done)
        out.on_layer_acked(tx_rec.layer)
        out.add_done_callback(tx_rec.done)
        _write(out, src, by_layer, range(LAYOUT.num_layers))
        out.finish().result(20)
        h_rx.result(20)
        me = threading.current_thread().name
        rx_rec.check(list(h_rx.layer_times), me)
        tx_rec.check(out.layers_acked, me)
        assert sorted(rx_rec.layers()) == sorted(tx_rec.layers()) == list(range(LAYOUT.num_layers))
    assert dest.tobytes() == b"".join(a.tobytes() for a in src)


@pytest.mark.parametrize("side", ["rx", "tx"])
def test_a_done_callback_added_after_the_end_waits_for_the_layer_callbacks(side: str, no_leaks: None) -> None:
    """``add_done_callback`` on a handle that has ended, while its (slow) layer callbacks are still queued:
    queued behind them on the pool, as one added before the end is (``concurrent.futures`` runs it at
    once on the adding thread, beside them)."""
    req, src, by_layer, dest = _request(f"done-late-{side}")
    rec = Recorder()
    with Receiver(key="k") as rx, connect(*rx.address, key="k", lanes=2, chunk_size=CHUNK) as s:
        h_rx = rx.expect(req.request_id, dest, layout=LAYOUT)
        out = s.send(LAYOUT, req)
        if side == "rx":
            h_rx.on_layer(rec.layer)
        else:
            out.on_layer_acked(rec.layer)
        _write(out, src, by_layer, range(LAYOUT.num_layers))
        out.finish().result(20)
        h_rx.result(20)
        h = h_rx if side == "rx" else out
        assert len(rec.layers()) < LAYOUT.num_layers  # (layer callbacks still to run: 8 x SLOW s)
        h.future.add_done_callback(rec.done)
        rec.check(list(h_rx.layer_times) if side == "rx" else out.layers_acked, threading.current_thread().name)


class _SecondChunkWaits:
    """A receiver chunk stage: once ``armed``, the second chunk to arrive waits ``delay`` s before its hash is
    checked (so it is verified after the first), and the lanes they came on are kept."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.armed = False
        self.lanes: list[int] = []
        self._lock = threading.Lock()

    def outgoing(self, ref: Any, pieces: list[memoryview]) -> list[memoryview]:
        return pieces

    def incoming(self, ref: Any, views: list[memoryview]) -> None:
        if not self.armed:
            return
        with self._lock:
            self.lanes.append(ref.lane)
            second = len(self.lanes) == 2
        if second:
            time.sleep(self.delay)


def test_done_finds_every_verified_layer_ready_and_reported(monkeypatch: pytest.MonkeyPatch,
                                                            no_leaks: None) -> None:
    """A lane paused between the engine's verdict on its chunk and telling the handle (here in
    ``add_lane_bytes``, its first call on the handle after the verdict), while another lane verifies the last
    chunk and answers the held DONE. Before, the handle was DONE without that layer (``result()`` returned,
    ``wait_layer`` raised 'transfer done but layer 0 is not in it', its bytes were not counted) and ``on_layer``
    never heard of it: the handle had dropped its callbacks when it ended. Now a chunk's layers are ready under
    the lock that verified it."""
    from kvwire.tcp._incoming import IncomingTransfer
    pause = threading.Event()
    paused: list[int] = []
    real = IncomingTransfer.add_lane_bytes

    def add_lane_bytes(self: IncomingTransfer, lane: int, n: int) -> None:
        if pause.is_set() and not paused:
            paused.append(lane)
            time.sleep(0.6)
        real(self, lane, n)

    monkeypatch.setattr(IncomingTransfer, "add_lane_bytes", add_lane_bytes)
    exercised = 0
    for attempt in range(6):  # until the two last chunks came on different lanes (as they mostly do)
        req, src, by_layer, dest = _request(f"done-finds-{attempt}")
        stage = _SecondChunkWaits(0.2)
        rec = Recorder(0.0)
        pause.clear()
        paused.clear()
        with Receiver(key="k", chunk_stage=stage) as rx, connect(*rx.address, key="k", lanes=2,
                                                                 chunk_size=CHUNK) as s:
            h_rx = rx.expect(req.request_id, dest, layout=LAYOUT)
            out = s.send(LAYOUT, req)
            assert all(len(out.plan.layer_chunks[i]) == 1 for i in (0, 1))  # one chunk each
            h_rx.on_layer(rec.layer)
            h_rx.add_done_callback(rec.done)
            _write(out, src, by_layer, range(2, LAYOUT.num_layers))
            for layer in range(2, LAYOUT.num_layers):
                h_rx.wait_layer(layer, timeout=20)
            stage.armed = True
            pause.set()
            _write(out, src, by_layer, range(2))
            out.finish().result(20)
            h_rx.result(20)
            if len(set(stage.lanes)) < 2:
                continue  # both on one lane: the pause held the other chunk back, nothing raced
            exercised += 1
            assert paused
            assert set(h_rx.layer_times) == set(range(LAYOUT.num_layers)), list(h_rx.layer_times)
            h_rx.wait_layer(0, timeout=0)
            h_rx.wait_layer(1, timeout=0)
            assert sum(h_rx.lane_bytes().values()) == out.manifest.total_bytes
            rec.check(list(h_rx.layer_times), threading.current_thread().name)
        assert dest.tobytes() == b"".join(a.tobytes() for a in src)
        if exercised:
            break
    assert exercised, "the two last chunks came on one lane every time"
