"""The copy paths of kvwire.cuda staging on CPU tensors: ``direct`` (one copy per run of consecutive blocks),
``scratch`` (gather into a scratch, one span copy) and ``auto``, every fixture, both page layouts, scrambled,
consecutive and chunked block tables, unaligned starts; staged bytes against an independent gather, the
receiver cache bit-exact. Then the GPU control flow (streams, events, waiter thread, foreign streams) run
with stub streams and events on CPU tensors."""

from __future__ import annotations

import contextlib
import random
import zlib
from collections.abc import Callable, Iterator
from typing import Any

import pytest

torch = pytest.importorskip("torch")

from test_staging import assert_bytes_equal, blocks_needed, expected_after, snapshot  # noqa: E402

from kvwire import ModelLayout, RequestSpec  # noqa: E402
from kvwire.cuda import PagedCache, PinnedPool, Stager, Unstager, allocate_paged_cache  # noqa: E402
from kvwire.cuda import stager as stager_mod  # noqa: E402
from kvwire.cuda import unstager as unstager_mod  # noqa: E402
from kvwire.cuda.plan import COPY, merge_runs, run_ops, split_run  # noqa: E402
from kvwire.cuda.streams import Completer, Device  # noqa: E402
from kvwire.testing.fixtures import FIXTURES, load_fixture  # noqa: E402

MiB = 1 << 20
TABLES = ("scrambled", "consecutive", "chunked")


@pytest.fixture
def pool() -> Iterator[PinnedPool]:
    with PinnedPool(64 * MiB, backend="torch") as p:
        yield p


def make_tables(cache: PagedCache, request: RequestSpec, kind: str, seed: int) -> dict[str, list[int]]:
    """Distinct block ids per group: shuffled, one consecutive range (offset by ``seed``), or shuffled
    chunks of 1..4 consecutive ids."""
    rng = random.Random(seed)
    need = blocks_needed(request, cache.block_size)
    out = {}
    for g in sorted(cache.groups):
        n = cache.num_blocks(g)
        if kind == "consecutive":
            first = seed % (n - need + 1)
            out[g] = list(range(first, first + need))
            continue
        ids = list(range(n))
        if kind == "scrambled":
            rng.shuffle(ids)
        else:
            chunks, i = [], 0
            while i < n:
                k = rng.randint(1, 4)
                chunks.append(ids[i : i + k])
                i += k
            rng.shuffle(chunks)
            ids = [b for c in chunks for b in c]
        out[g] = ids[:need]
    return out


def reference(src: PagedCache, seg: Any, tables: dict[str, list[int]], slot: int) -> Any:
    """A segment's wire bytes by advanced indexing, one token at a time (independent of the plans)."""
    st = src.storage(seg.layer, seg.cache)
    if not st.token_indexed:
        return st.slot_views()[seg.tensor][slot].contiguous().view(torch.uint8).reshape(-1)
    p = torch.arange(seg.token_start, seg.token_start + seg.token_count, device=src.device)
    b = torch.tensor(tables[st.spec.group], device=src.device)[p // src.block_size]
    v = st.paged_views()[seg.tensor][b, p % src.block_size]
    return v.contiguous().view(torch.uint8).reshape(-1)


def local_round_trip(pool: PinnedPool, layout: ModelLayout, request: RequestSpec, *, d2h: str, h2d: str,
                     tables: str = "scrambled", page_layout: str = "block_major", kv_order: str = "NHD",
                     seed: int = 0, rx_block_size: int | None = None, device: str = "cpu",
                     stub: bool = False, stream_for: Callable[[int], Any] | None = None) -> dict[str, Any]:
    """Stage every layer, check the staged bytes against ``reference``, hand them to the unstager as the
    wire would (no sockets), check the receiver cache bit-exact (untouched memory included)."""
    bs_rx = rx_block_size or layout.block_size
    src = allocate_paged_cache(layout, blocks_needed(request, layout.block_size) + 5, 4, page_layout=page_layout,
                               kv_order=kv_order, fill="random", seed=seed, device=device)
    dst = allocate_paged_cache(layout, blocks_needed(request, bs_rx) + 3, 3, page_layout=page_layout,
                               kv_order=kv_order, fill="random", seed=seed + 1, block_size=bs_rx, device=device)
    src_tables = make_tables(src, request, tables, seed + 2)
    dst_tables = make_tables(dst, request, tables, seed + 3)
    src_slot, dst_slot = 3, 1
    before = snapshot(dst)
    expected = expected_after(layout, src, dst, before, src_tables, dst_tables, src_slot, dst_slot, request)
    with Stager(src, pool, d2h=d2h) as stager, Unstager(dst, pool, h2d=h2d) as unstager:
        if stub:
            stager.device.close()
            unstager.device.close()
            stager.device, unstager.device = StubDevice(src), StubDevice(dst)
        sjob = stager.begin(request, src_tables, src_slot)
        staged = [sjob.stage(layer, stream=stream_for(layer) if stream_for else None) for layer in sjob.layers]
        for s in staged:
            s.result(10)
        for seg, off in zip(sjob.segments, sjob.placement.offsets):
            got = sjob._host[off : off + seg.nbytes]
            assert torch.equal(got, reference(src, seg, src_tables, src_slot).cpu()), seg.name
        rjob = unstager.prepare(request, dst_tables, dst_slot)
        for seg_i, buf in enumerate(rjob.buffers):
            buf.copy_(sjob._host[sjob.placement.offsets[seg_i] :][: buf.numel()])
        for layer in rjob.layers:
            rjob.layer_arrived(layer)
        rjob.wait_all(30)
        modes = ({la: p.mode for la, p in sjob.plans.items()}, {la: p.mode for la, p in rjob.plans.items()})
        ops = ({la: len(p.ops) for la, p in sjob.plans.items()}, {la: len(p.ops) for la, p in rjob.plans.items()})
        rjob.release()
        sjob.release()
        devs = (stager.device, unstager.device)
    assert_bytes_equal(dst, expected)
    assert pool.in_use_bytes == 0
    return {"src": src, "dst": dst, "tables": (src_tables, dst_tables), "modes": modes, "ops": ops,
            "staged": staged, "devs": devs, "sjob": sjob}


def hit_request(name: str) -> RequestSpec:
    # T=1000, S=999: a partial last block; attn resumes at 37: the first block entered mid-way; SWA windows
    # start mid-block too
    return RequestSpec(f"paths-{name}", 1000, 999, {"attn": 37})


# ------------------------------------------------------------------ the paths on CPU tensors


@pytest.mark.parametrize("mode", ["direct", "scratch"])
@pytest.mark.parametrize("tables", TABLES)
@pytest.mark.parametrize("page_layout", ["block_major", "kv_major"])
@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_every_fixture_every_path_bit_exact(pool: PinnedPool, name: str, page_layout: str, tables: str,
                                            mode: str) -> None:
    layout = load_fixture(name)
    seed = zlib.crc32(f"{name}{tables}".encode()) & 0xFFFF
    out = local_round_trip(pool, layout, hit_request(name), d2h=mode, h2d=mode, tables=tables,
                           page_layout=page_layout, seed=seed)
    assert set(out["modes"][0].values()) == {mode} and set(out["modes"][1].values()) == {mode}


@pytest.mark.parametrize("kv_order,page_layout", [("HND", "block_major"), ("HND", "kv_major"), ("NHD", "split")])
@pytest.mark.parametrize("mode", ["direct", "scratch", "auto"])
def test_other_engine_formats_every_path(pool: PinnedPool, kv_order: str, page_layout: str, mode: str) -> None:
    for name in ("tiny-llama", "tiny-mimo-swa", "tiny-falcon-h1", "tiny-deepseek-mla"):
        for tables in TABLES:
            local_round_trip(pool, load_fixture(name), hit_request(name), d2h=mode, h2d=mode, tables=tables,
                             page_layout=page_layout, kv_order=kv_order, seed=5)


@pytest.mark.parametrize("d2h,h2d", [("direct", "scratch"), ("scratch", "direct"), ("auto", "direct")])
def test_paths_mix_and_other_receiver_block_size(pool: PinnedPool, d2h: str, h2d: str) -> None:
    layout = load_fixture("tiny-mimo-swa")  # block 16 on the sender, 48 on the receiver
    for tables in TABLES:
        local_round_trip(pool, layout, hit_request("bs"), d2h=d2h, h2d=h2d, tables=tables, rx_block_size=48, seed=9)


def test_direct_takes_one_copy_per_run() -> None:
    """kv_major NHD: one copy per run of consecutive block ids (a consecutive table: one per segment);
    block_major: a strided view per run's whole blocks plus the partial first/last block."""
    layout = load_fixture("tiny-llama")  # block 16 tokens
    req = hit_request("runs")  # tokens [37, 999): blocks 2..62, the first and last partial
    with PinnedPool(64 * MiB, backend="torch") as pool:
        for page_layout in ("kv_major", "block_major"):
            for tables in TABLES:
                out = local_round_trip(pool, layout, req, d2h="direct", h2d="direct", tables=tables,
                                       page_layout=page_layout, seed=1)
                for ops, table in zip(out["ops"], out["tables"]):
                    used = table["attn"][2:63]
                    runs = 1 + sum(1 for a, b in zip(used, used[1:]) if b != a + 1)
                    if tables == "consecutive":
                        assert runs == 1
                    if page_layout == "kv_major":
                        want = {2 * runs}  # K and V
                    else:
                        want = {2 * (runs + 2)} if runs == 1 else set(range(2 * runs, 2 * 3 * runs + 1))
                    assert set(ops.values()) <= want, (page_layout, tables, runs, ops)


def test_run_arithmetic() -> None:
    bs = 4
    parts = [(7, 2, 2, 0), (8, 0, 4, 2), (9, 0, 4, 6), (3, 0, 4, 10), (4, 0, 1, 14)]
    assert merge_runs(parts, bs) == [(7, 2, 10, 0), (3, 0, 5, 10)]
    assert split_run((7, 2, 10, 0), bs) == [(7, 2, 2, 0), (8, 0, 8, 2)]
    assert split_run((3, 0, 5, 10), bs) == [(3, 0, 4, 10), (4, 0, 1, 14)]
    assert split_run((3, 1, 2, 0), bs) == [(3, 1, 2, 0)]
    assert split_run((3, 0, 12, 0), bs) == [(3, 0, 12, 0)]
    assert merge_runs([(5, 0, 4, 0), (6, 0, 4, 4), (6, 0, 4, 8)], bs) == [(5, 0, 8, 0), (6, 0, 4, 8)]


def test_auto_on_cpu_gathers_straight_into_the_host_buffer(pool: PinnedPool) -> None:
    out = local_round_trip(pool, load_fixture("tiny-qwen3-next"), hit_request("auto-cpu"), d2h="auto", h2d="auto")
    assert set(out["modes"][0].values()) == {"gather"} and set(out["modes"][1].values()) == {"gather"}
    assert out["devs"][0].scratch_bytes == 0  # no scratch on a CPU cache unless asked for


def test_bad_path_name_is_refused(pool: PinnedPool) -> None:
    cache = allocate_paged_cache(load_fixture("tiny-llama"), 4, 1)
    with pytest.raises(ValueError, match="copy path"):
        Stager(cache, pool, d2h="fast")
    with pytest.raises(ValueError, match="copy path"):
        Unstager(cache, pool, h2d="gather")


def test_scratch_is_reused_across_requests_and_grows(pool: PinnedPool) -> None:
    layout = load_fixture("tiny-llama")
    cache = allocate_paged_cache(layout, 70, 1, fill="random", seed=2)
    ids = {"attn": list(range(63))}
    with Stager(cache, pool, d2h="scratch") as stager:
        ptrs = []
        for tokens in (500, 400, 1000):
            with stager.begin(RequestSpec(f"grow-{tokens}", tokens, tokens - 1), ids) as job:
                for la in job.layers:
                    job.stage(la)
                op = next(iter(job.plans.values())).ops[-1]  # the span copy: (COPY, host span, scratch)
                assert op[0] == COPY
                ptrs.append((op[2].data_ptr(), stager.device.scratch_bytes))
        assert ptrs[0] == ptrs[1]  # a smaller request reuses the scratch
        assert ptrs[2][1] > ptrs[0][1]  # a larger one grows it
    assert stager.device.scratch_bytes == 0  # close frees it


# ------------------------------------------------------------------ GPU control flow with stub streams


class StubStream:
    def __init__(self, name: str) -> None:
        self.name = name
        self.log: list[tuple[str, Any]] = []

    def wait_event(self, ev: Any) -> None:
        assert ev.recorded_on is not None, "waiting on an event never recorded"
        self.log.append(("wait_event", ev))

    def wait_stream(self, s: Any) -> None:
        self.log.append(("wait_stream", s))

    def __repr__(self) -> str:
        return f"StubStream({self.name})"


class StubEvent:
    def __init__(self, dev: StubDevice) -> None:
        self.dev = dev
        self.recorded_on: Any = None

    def record(self, stream: Any) -> None:
        assert self.dev.current and self.dev.current[-1] is stream, "event recorded outside its stream"
        self.recorded_on = stream
        stream.log.append(("record", self))

    def synchronize(self) -> None:
        assert self.recorded_on is not None

    def elapsed_time(self, other: Any) -> float:
        return 0.0


class StubDevice(Device):
    """``Device`` with ``cuda`` True on a CPU cache: stub streams and events stand in for torch.cuda; the
    copies run synchronously, so the waiter thread finds every event complete."""

    active: list[Any] = []  # the current-stream stack, shared by all stub devices

    def __init__(self, cache: PagedCache) -> None:
        super().__init__(cache, None, True, "stub")
        self.cuda = True
        self.stream = StubStream("own")
        self.completer = Completer("kvwire-stub-waiter")
        self.caller = StubStream("caller")
        self.current = StubDevice.active
        self.record_streams: list[Any] = []
        self.ops_on: list[Any] = []

    def event(self, timing: bool = False) -> Any:
        return StubEvent(self)

    def on(self, stream: Any) -> contextlib.AbstractContextManager[Any]:
        @contextlib.contextmanager
        def ctx() -> Iterator[None]:
            self.current.append(stream)
            try:
                yield
            finally:
                self.current.pop()

        return ctx()

    def current_stream(self) -> Any:
        return self.caller

    def record_stream(self, t: Any, stream: Any) -> None:
        self.record_streams.append(stream)

    def pin(self, t: Any) -> Any:
        return t


@pytest.fixture
def ops_on(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """The stream current when each layer's copies were issued (the stager's and unstager's ``run_ops``)."""
    seen: list[Any] = []

    def recording(ops: Any) -> None:
        assert StubDevice.active, "copies issued outside a stream context"
        seen.append(StubDevice.active[-1])
        run_ops(ops)

    monkeypatch.setattr(stager_mod, "run_ops", recording)
    monkeypatch.setattr(unstager_mod, "run_ops", recording)
    return seen


@pytest.mark.parametrize("page_layout", ["block_major", "kv_major"])
@pytest.mark.parametrize("tables", TABLES)
@pytest.mark.parametrize("mode", ["direct", "scratch", "auto"])
def test_gpu_control_flow_with_stub_streams(pool: PinnedPool, ops_on: list[Any], mode: str, tables: str,
                                            page_layout: str) -> None:
    """Stager: each layer waits for the caller's stream (or its event) and the block ids, its copies are
    issued on its stream, an event is recorded after them and resolves the layer from the waiter thread;
    a layer staged on a foreign stream is ordered after the stager's stream and before its later work.
    Unstager: the same on its stream. Bit-exact throughout."""
    layout = load_fixture("tiny-qwen3-next")
    foreign = StubStream("foreign")
    out = local_round_trip(pool, layout, hit_request(f"stub-{mode}"), d2h=mode, h2d=mode, tables=tables,
                           page_layout=page_layout, seed=4, stub=True,
                           stream_for=lambda layer: foreign if layer % 3 == 1 else None)
    tx, rx = out["devs"]
    staged = out["staged"]
    assert len(ops_on) == 2 * len(staged)
    assert ops_on[: len(staged)] == [foreign if s.layer % 3 == 1 else tx.stream for s in staged]
    assert all(s is rx.stream for s in ops_on[len(staged) :])
    for s in staged:
        assert s.gpu_events is not None and s.done() and s.result(0) == s.views
        start, done = s.gpu_events
        on = foreign if s.layer % 3 == 1 else tx.stream
        assert start.recorded_on is on and done.recorded_on is on
    own, caller = tx.stream.log, tx.caller
    n_foreign = sum(1 for s in staged if s.layer % 3 == 1)
    assert own.count(("wait_stream", caller)) == len(staged) - n_foreign
    assert own.count(("wait_stream", foreign)) == n_foreign  # later layers wait for the foreign one
    assert foreign.log.count(("wait_stream", tx.stream)) == n_foreign  # it waits for earlier ones
    assert foreign.log.count(("wait_stream", caller)) == n_foreign
    has_ids = any(p != "direct" for p in out["modes"][0].values())
    assert tx.record_streams == ([foreign] * n_foreign if has_ids else [])
    if mode == "auto":  # tiny sizes: direct where it takes no more copies than the scratch path
        sm, rm = out["modes"]
        states = {s.layer for s in out["sjob"].segments if not s.token_count}
        attn = {s.layer for s in out["sjob"].segments if s.token_count}
        assert all(sm[la] == "direct" for la in states - attn)
        want = "direct" if tables == "consecutive" else "scratch"
        assert all(sm[la] == want and rm[la] == want for la in attn - states)


def test_stub_failure_in_a_copy_fails_the_layer_not_the_stager(pool: PinnedPool, monkeypatch: pytest.MonkeyPatch
                                                               ) -> None:
    layout = load_fixture("tiny-llama")
    cache = allocate_paged_cache(layout, 70, 1, fill="random", seed=2)
    with Stager(cache, pool, d2h="direct") as stager:
        stager.device.close()
        stager.device = StubDevice(cache)

        def boom(ops: Any) -> None:
            raise RuntimeError("CUDA error: an illegal memory access")

        monkeypatch.setattr(stager_mod, "run_ops", boom)
        with stager.begin(RequestSpec("boom", 100, 99), {"attn": list(range(7))}) as job:
            with pytest.raises(RuntimeError, match="illegal"):
                job.stage(0)
            with pytest.raises(RuntimeError, match="illegal"):
                job.staged[0].result(1)
            monkeypatch.setattr(stager_mod, "run_ops", run_ops)
            assert job.stage(1).result(5)  # the stager still works (its lock was released)
