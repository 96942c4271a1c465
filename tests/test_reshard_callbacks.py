"""A re-sharded request's callbacks (``ReshardIncoming``) run as a plain handle's do: one at a time, on its own
ordered queue of the receiver's callback pool, each layer once after its last source, then the outcome.

Before, a layer's ``on_layer`` callbacks ran inline in the callback of whichever prefill rank's transfer
completed the layer: two sources' layers were reported on two pool threads at once, a slow callback held up
that source's later scatters and its outcome (a callback that blocked kept ``result()`` from ever returning),
the done callback could run beside the last layer's, and a callback registered mid-transfer was replayed on
the registering thread while later layers were reported on the pool."""

from __future__ import annotations

import contextlib
import functools
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
from reshard_ref import global_payload, shard_reference

import kvwire.reshard
from kvwire import Receiver, Session, TransferCancelled, TransferFailed, connect
from kvwire.codec.hf import layout_from_hf_config
from kvwire.codec.layout import ModelLayout, RequestSpec, plan_segments
from kvwire.codec.reshard import ReshardPlan, plan_reshard
from kvwire.reshard import ReshardIncoming, ReshardOutgoing, ReshardReceiver, ReshardSender

# GQA, 2 KV heads, 10 layers: at TP 2 each prefill rank holds one head, so both feed every layer of TP 1
CONFIG = {"model_type": "llama", "num_hidden_layers": 10, "hidden_size": 128, "num_attention_heads": 8,
          "num_key_value_heads": 2, "head_dim": 16}
SLOW = 0.1  # seconds each layer callback takes: long enough for the other source's next layer to land meanwhile


def _layout(tp: int, rank: int = 0) -> ModelLayout:
    return layout_from_hf_config(CONFIG, tp_size=tp, tp_rank=rank, name="gqa10")


class Recorder:
    """Every call of its callbacks: (what, layer, thread, entered, left); ``gate``: layer calls wait for it."""

    def __init__(self, delay: float = SLOW, gate: threading.Event | None = None) -> None:
        self.delay, self.gate = delay, gate
        self.calls: list[tuple[str, int | None, str, float, float]] = []
        self._lock = threading.Lock()

    def layer(self, layer: int) -> None:
        t0 = time.monotonic()
        if self.gate is not None:
            self.gate.wait(30)
        time.sleep(self.delay)
        with self._lock:
            self.calls.append(("layer", layer, threading.current_thread().name, t0, time.monotonic()))

    def done(self, _future: Any) -> None:
        t0 = time.monotonic()
        with self._lock:
            self.calls.append(("done", None, threading.current_thread().name, t0, time.monotonic()))

    def ended(self) -> bool:
        with self._lock:
            return any(c[0] == "done" for c in self.calls)

    def check(self, expected: list[int], registrar: str) -> list[int]:
        """Every layer of ``expected`` once, in that order, then the done callback; never two calls at once;
        none on ``registrar``'s thread. Returns the layers as reported."""
        end = time.monotonic() + 30
        while not self.ended() and time.monotonic() < end:
            time.sleep(0.02)
        with self._lock:
            calls = sorted(self.calls, key=lambda c: c[3])
        layers = [c[1] for c in calls if c[0] == "layer"]
        assert layers == expected, calls
        assert calls and calls[-1][0] == "done", f"the done callback ran before a layer callback: {calls}"
        for a, b in zip(calls, calls[1:]):
            assert a[4] <= b[3], f"{a} and {b} ran at the same time"
        assert all(c[2] != registrar for c in calls), f"user code ran on the registering thread: {calls}"
        return [x for x in layers if x is not None]


@dataclass
class Request:
    plan: ReshardPlan
    rx: Receiver  #: the decode rank's
    h: ReshardIncoming
    outs: list[ReshardOutgoing]  #: both prefill ranks' (one two-lane Session each)
    write: Callable[[range], None]  #: both prefill ranks write these layers (an even run; see ``request``)
    dest: list[np.ndarray]
    want: list[np.ndarray]  #: what ``dest`` must end up holding

    def finish(self) -> None:
        for out in self.outs:
            out.finish()

    def exact(self) -> bool:
        return [a.tobytes() for a in self.dest] == [w.tobytes() for w in self.want]


@contextlib.contextmanager
def request(name: str) -> Iterator[Request]:
    """A request re-sharded TP 2 -> 1 over real sockets."""
    plan = plan_reshard(_layout(2), _layout(1))
    assert plan.sources(0) == [0, 1]
    req = RequestSpec(name, 256, 255)
    g = _layout(1)
    payload = global_payload(g, req, seed=3)
    prefill = [shard_reference(g, CONFIG, payload, req, 2, p) for p in range(2)]
    want = shard_reference(g, CONFIG, payload, req, 1, 0)
    own = [plan_segments(_layout(2, p), req) for p in range(2)]
    dest = [np.zeros(s.nbytes, np.uint8) for s in plan_segments(plan.decode, req)]
    with contextlib.ExitStack() as stack:
        rx = stack.enter_context(Receiver(key="k"))
        sessions: list[Session] = [stack.enter_context(connect(*rx.address, key="k", lanes=2, chunk_size=1 << 16))
                                   for _ in range(2)]
        h = ReshardReceiver(plan, 0, rx).expect(req, dest, timeout=30)
        outs = [ReshardSender(plan, p, {0: sessions[p]}).send(req, timeout=30) for p in range(2)]

        handled: list[set[int]] = [set(), set()]  # by source: layers whose callbacks on its own queue ran
        handled_cond = threading.Condition()

        def handled_layer(p: int, layer: int) -> None:  # (queued behind the request's own _arrived)
            with handled_cond:
                handled[p].add(layer)
                handled_cond.notify_all()
        for p in range(2):
            h.sources[p].on_layer(functools.partial(handled_layer, p))

        def part(p: int, layer: int, handled_too: bool) -> None:
            outs[p].write_layer(layer, [prefill[p][s.index] for s in own[p] if s.layer == layer])
            h.sources[p].wait_layer(layer, timeout=20)
            if handled_too:  # the request has taken the part in too
                with handled_cond:
                    assert handled_cond.wait_for(lambda: layer in handled[p], 20)

        def write(layers: range) -> None:
            """By pairs of layers, crossed: rank 0 completes the first of each, rank 1 the second (each first
            sends its part of the layer the other completes), so that two layers complete on both sources'
            callbacks at about the same time."""
            assert layers.start % 2 == 0 and len(layers) % 2 == 0
            for a in range(layers.start, layers.stop, 2):
                part(1, a, True)
                part(0, a + 1, True)
                part(0, a, False)
                part(1, a + 1, False)
        try:
            yield Request(plan, rx, h, outs, write, dest, want)
        finally:
            for out in outs:
                out.cancel("test over")  # (no-op once ended)


def test_slow_layer_callbacks_run_one_at_a_time_in_order_before_done(no_leaks: None) -> None:
    rec = Recorder()
    with request("slow-cbs") as r:
        r.h.on_layer(rec.layer)
        r.h.add_done_callback(rec.done)
        r.write(range(r.plan.decode.num_layers))
        r.finish()
        r.h.result(30)
        reported = rec.check(list(r.h.layer_times), threading.current_thread().name)
    assert sorted(reported) == list(range(r.plan.decode.num_layers))
    assert r.exact()


def test_a_blocked_layer_callback_holds_up_neither_the_scatters_nor_the_outcome(no_leaks: None) -> None:
    """The user's first layer callback blocks until the request has ended: the request still completes, every
    byte in place, and the callbacks then report every layer in order, then the outcome."""
    gate = threading.Event()
    rec = Recorder(delay=0.0, gate=gate)
    with request("blocked-cb") as r:
        r.h.on_layer(rec.layer)
        r.h.add_done_callback(rec.done)
        r.write(range(r.plan.decode.num_layers))
        r.finish()
        try:
            r.h.result(20)  # (before: the source whose callback blocked never reported its outcome: TimeoutError)
            assert r.exact()
            assert not rec.ended()
        finally:
            gate.set()
        rec.check(list(r.h.layer_times), threading.current_thread().name)


def test_on_layer_registered_mid_request_replays_in_order_on_the_pool_before_later_layers(
        no_leaks: None) -> None:
    rec = Recorder()
    first = 4
    with request("late-cb") as r:
        r.write(range(first))
        for layer in range(first):
            r.h.wait_layer(layer, timeout=20)
        before = list(r.h.layer_times)  # completed so far, in the order they did
        r.h.add_done_callback(rec.done)

        def rest() -> None:
            r.write(range(first, r.plan.decode.num_layers))
            r.finish()
        t = threading.Thread(target=rest)
        t.start()  # the later layers complete while the earlier ones are being reported
        r.h.on_layer(rec.layer)
        t.join(20)
        r.h.result(30)
        reported = rec.check(list(r.h.layer_times), threading.current_thread().name)
    assert sorted(before) == list(range(first)) and reported[:first] == before  # the replayed ones first
    assert r.exact()


def test_on_layer_after_the_request_ended_is_queued_behind_its_done_callbacks(no_leaks: None) -> None:
    """On an ended request every layer is still reported once, in order, after the done callbacks queued
    before it, and off the calling thread (before: on it, at once)."""
    rec = Recorder(delay=0.0)
    with request("ended-cb") as r:
        r.h.add_done_callback(rec.done)
        r.write(range(r.plan.decode.num_layers))
        r.finish()
        r.h.result(30)
        assert r.rx.callbacks.drain(10) and rec.ended()
        seen: list[tuple[int, str]] = []
        r.h.on_layer(lambda layer: seen.append((layer, threading.current_thread().name)))
        assert r.rx.callbacks.drain(10)
    assert [layer for layer, _ in seen] == list(r.h.layer_times)
    assert all(name != threading.current_thread().name for _, name in seen)


class GatedScatter:
    """Stands in for ``kvwire.reshard.scatter``: the first call waits for ``release`` (after setting
    ``entered``); every call is logged ("in"/"out") beside the request's done callback ("done", with how
    many scatters were in progress as it ran)."""

    def __init__(self, real: Callable[..., None]) -> None:
        self.real = real
        self.entered, self.release = threading.Event(), threading.Event()
        self.log: list[tuple[str, int]] = []
        self._active = 0
        self._lock = threading.Lock()

    def __call__(self, dst: Any, c: Any, data: Any) -> None:
        with self._lock:
            self._active += 1
            self.log.append(("in", self._active))
            first = not self.entered.is_set()
            self.entered.set()
        if first:
            self.release.wait(20)
        self.real(dst, c, data)
        with self._lock:
            self._active -= 1
            self.log.append(("out", self._active))

    def done(self, _future: Any) -> None:
        with self._lock:
            self.log.append(("done", self._active))


@pytest.mark.parametrize("how", ["cancel", "source fails"])
def test_a_request_ended_during_a_scatter_is_announced_only_once_the_scatter_is_over(
        how: str, monkeypatch: pytest.MonkeyPatch, no_leaks: None) -> None:
    """A scatter in progress when the request is cancelled (or a source fails) finishes before the request
    is terminal and its done callbacks run (they tell an engine the destination and the early staging
    buffers are free), and none starts after. Before, ``_arrived`` checked ``finished`` and scattered outside
    the lock: the done callback ran while a scatter was still writing into the destination."""
    gated = GatedScatter(kvwire.reshard.scatter)
    monkeypatch.setattr(kvwire.reshard, "scatter", gated)
    with request(f"end-mid-scatter-{how}") as r:
        r.h.add_done_callback(gated.done)
        writer = threading.Thread(target=_quietly, args=(r.write, range(2)), daemon=True)
        writer.start()
        try:
            assert gated.entered.wait(20)
            if how == "cancel":
                r.h.cancel("engine dropped the request")
            else:
                r.outs[0].cancel("prefill rank 0 died")  # (the gated scatter is rank 1's: rank 0's queue is free)
            time.sleep(0.3)  # (long enough for the done callback to run, had it been queued)
            assert not r.h.finished, "terminal while a scatter was still writing into the destination"
            assert ("done", 1) not in gated.log, gated.log
        finally:
            gated.release.set()
        with pytest.raises(TransferCancelled if how == "cancel" else TransferFailed):
            r.h.result(20)
        assert r.rx.callbacks.drain(10)
        writer.join(20)
    log = gated.log
    assert log.count(("done", 0)) == 1, log
    assert all(kind != "in" for kind, _ in log[log.index(("done", 0)):]), f"a scatter began after the end: {log}"


def _quietly(fn: Callable[..., Any], *args: Any) -> None:
    with contextlib.suppress(Exception):  # (the request ends under it)
        fn(*args)


def test_a_scatter_that_fails_fails_the_request_naming_the_layer(monkeypatch: pytest.MonkeyPatch,
                                                                 no_leaks: None) -> None:
    """Before, the error was only logged on the callback pool: the layer never completed, every source ended
    DONE, and the request never ended (``result()`` timed out)."""
    def broken(dst: Any, c: Any, data: Any) -> None:
        raise MemoryError("no room")
    monkeypatch.setattr(kvwire.reshard, "scatter", broken)
    with request("scatter-fails") as r:
        _quietly(r.write, range(r.plan.decode.num_layers))
        _quietly(r.finish)
        with pytest.raises(TransferFailed, match=r"scattering prefill rank \d's part of layer \d+ failed: MemoryError"):
            r.h.result(20)
        for src in r.h.sources.values():
            with contextlib.suppress(Exception):
                src.result(20)
            assert src.finished


def test_a_reshard_sends_done_callbacks_run_on_its_own_queue_of_the_session_pool(no_leaks: None) -> None:
    """``ReshardOutgoing``'s done callbacks run as a plain handle's do: off the calling thread even once it has
    ended, on its own queue, so one that blocks holds up no target transfer's callbacks. Before, they ran inside
    the last target's done callback (on that target's queue: a blocked one held up the target's later
    callbacks) and, added once it had ended, at once on the adding thread."""
    gate = threading.Event()
    seen: list[tuple[str, str]] = []

    def blocked(_f: Any) -> None:
        gate.wait(20)
        seen.append(("blocked", threading.current_thread().name))
    with request("tx-done") as r:
        out = r.outs[0]
        out.add_done_callback(blocked)
        target = out.transfers[0]
        r.write(range(r.plan.decode.num_layers))
        r.finish()
        r.h.result(30)
        out.result(30)
        target_done = threading.Event()
        try:
            target.add_done_callback(lambda _f: target_done.set())  # (queued behind the target's own)
            assert target_done.wait(10), "the target's callback waited for the reshard's blocked one"
        finally:
            gate.set()
        out.add_done_callback(lambda _f: seen.append(("late", threading.current_thread().name)))
        deadline = time.monotonic() + 10
        while len(seen) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
    assert [what for what, _ in seen] == ["blocked", "late"], seen
    assert all(name != threading.current_thread().name for _, name in seen), seen


def test_a_prefill_rank_with_no_target_runs_its_done_callbacks_off_the_calling_thread(no_leaks: None) -> None:
    """TP 8 -> 1 with 2 KV heads: prefill rank 2 holds a replica nobody needs. Its request is done at once, and a
    done callback added then still runs off the adding thread (before: on it, at once)."""
    config = {**CONFIG, "num_hidden_layers": 2}
    plan = plan_reshard(*(layout_from_hf_config(config, tp_size=tp, tp_rank=0, name="gqa2") for tp in (8, 1)))
    assert plan.targets(2) == []
    out = ReshardSender(plan, 2, {}).send(RequestSpec("no-target", 16, 15))
    assert out.result(10).state.value == "done"
    ran = threading.Event()
    names: list[str] = []

    def late(_f: Any) -> None:
        names.append(threading.current_thread().name)
        ran.set()
    out.add_done_callback(late)
    assert ran.wait(10) and names != [threading.current_thread().name], names
