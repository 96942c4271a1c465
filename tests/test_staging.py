"""Staging on CPU torch tensors: paged sender cache -> pinned-style pooled buffers -> real loopback TCP ->
pooled receive buffers -> paged receiver cache at other block ids and another state slot, bit-exact."""

from __future__ import annotations

import math
import random
import threading
import time
import zlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from kvwire import (  # noqa: E402
    LayoutMismatch,
    ModelLayout,
    Receiver,
    RequestSpec,
    Session,
    TransferFailed,
    connect,
)
from kvwire.codec.layout import TOKEN, token_range  # noqa: E402
from kvwire.cuda import PagedCache, PinnedPool, Stager, Unstager, allocate_paged_cache  # noqa: E402
from kvwire.cuda.paged import CacheStorage  # noqa: E402
from kvwire.errors import PoolExhausted  # noqa: E402
from kvwire.testing.fixtures import FIXTURES, default_request, load_fixture  # noqa: E402

CHUNK = 64 * 1024
MiB = 1 << 20


# ------------------------------------------------------------------ shared loopback link


@pytest.fixture(scope="module")
def link() -> Iterator[tuple[Receiver, Session]]:
    with Receiver(key="k") as rx, connect(*rx.address, key="k", lanes=3, chunk_size=CHUNK) as s:
        yield rx, s


@pytest.fixture
def pool() -> Iterator[PinnedPool]:
    with PinnedPool(64 * MiB, backend="torch") as p:
        yield p


# ------------------------------------------------------------------ helpers


def scrambled_tables(layout: ModelLayout, cache: PagedCache, request: RequestSpec, seed: int
                     ) -> dict[str, list[int]]:
    """A random block table per token group, drawn without repetition from all of the cache's blocks."""
    rng = random.Random(seed)
    need = -(-request.num_tokens // cache.block_size)
    out = {}
    for g in cache.groups:
        ids = list(range(cache.num_blocks(g)))
        rng.shuffle(ids)
        out[g] = ids[:need]
    return out


def blocks_needed(request: RequestSpec, block_size: int) -> int:
    return -(-request.num_tokens // block_size)


def snapshot(cache: PagedCache) -> list[list[Any]]:
    return [[t.clone() for t in st.tensors] for st in cache.storages()]


def expected_after(layout: ModelLayout, src: PagedCache, dst: PagedCache, before: list[list[Any]],
                   src_tables: dict[str, list[int]], dst_tables: dict[str, list[int]], src_slot: int,
                   dst_slot: int, request: RequestSpec) -> list[list[Any]]:
    """The receiver cache as it must be: ``before`` with each shipped token / the state copied over.

    Independent of the stager: one token at a time through advanced indexing on the paged views.
    """
    out = [[t.clone() for t in ts] for ts in before]
    for k, (st_dst, st_src) in enumerate(zip(dst.storages(), src.storages())):
        spec = st_dst.spec
        exp = CacheStorage(st_dst.layer, st_dst.cache, spec, st_dst.format, tuple(out[k]), st_dst.kv_order)
        if spec.indexing == TOKEN:
            start, stop = token_range(spec, request)
            if stop <= start:
                continue
            dev = src.device
            p = torch.arange(start, stop, device=dev)
            bs_s, bs_d = src.block_size, dst.block_size
            sb = torch.tensor(src_tables[spec.group], device=dev)[p // bs_s]
            db = torch.tensor(dst_tables[spec.group], device=dev)[p // bs_d]
            for v_src, v_exp in zip(st_src.paged_views(), exp.paged_views()):
                v_exp[db, p % bs_d] = v_src[sb, p % bs_s]
        else:
            for v_src, v_exp in zip(st_src.slot_views(), exp.slot_views()):
                v_exp[dst_slot] = v_src[src_slot]
    return out


def assert_bytes_equal(cache: PagedCache, expected: list[list[Any]]) -> None:
    for st, exp in zip(cache.storages(), expected):
        for t, e in zip(st.tensors, exp):
            assert t.dtype == e.dtype
            same = torch.equal(t.view(torch.uint8), e.view(torch.uint8))
            assert same, f"layer {st.layer} {st.spec.kind} differs"


def address(view: memoryview) -> int:
    return int(np.frombuffer(view, dtype=np.uint8).ctypes.data)


def round_trip(link: tuple[Receiver, Session], pool: PinnedPool, layout: ModelLayout, request: RequestSpec, *,
               page_layout: str = "block_major", kv_order: str = "NHD", rx_block_size: int | None = None,
               rx_request: RequestSpec | None = None, seed: int = 0, mode: str = "auto",
               device: str = "cpu") -> dict[str, Any]:
    rx, session = link
    rx_request = rx_request or request
    bs_tx = layout.block_size
    bs_rx = rx_block_size or bs_tx
    src = allocate_paged_cache(layout, blocks_needed(request, bs_tx) + 5, 4, page_layout=page_layout,
                               kv_order=kv_order, fill="random", seed=seed, device=device)
    dst = allocate_paged_cache(layout, blocks_needed(request, bs_rx) + 3, 3, page_layout=page_layout,
                               kv_order=kv_order, fill="random", seed=seed + 1, block_size=bs_rx, device=device)
    src_tables = scrambled_tables(layout, src, request, seed + 2)
    dst_tables = scrambled_tables(layout, dst, request, seed + 3)
    src_slot, dst_slot = 3, 1
    before = snapshot(dst)
    expected = expected_after(layout, src, dst, before, src_tables, dst_tables, src_slot, dst_slot, request)

    with Stager(src, pool, d2h=mode) as stager, Unstager(dst, pool, h2d=mode) as unstager:
        rjob = unstager.prepare(rx_request, dst_tables, dst_slot)
        h_rx = rjob.expect_on(rx)
        sjob = stager.begin(request, src_tables, src_slot)
        h_tx = session.send(layout, request)
        sjob.release_when_done(h_tx)
        staged = sjob.send_all(h_tx)
        h_tx.result(30)
        h_rx.result(30)
        for layer in range(layout.num_layers):
            rjob.wait_layer(layer, timeout=30)
        # zero copy: the socket read the stager's views, the receiver wrote into the unstager's buffers
        for s in staged:
            for seg_i, view in zip(sjob.placement.by_layer[s.layer], s.views):
                assert address(h_tx.views[seg_i]) == view.data_ptr()
        for seg_i, buf in enumerate(rjob.buffers):
            assert address(h_rx.views[seg_i]) == buf.data_ptr()
        rjob.release()
        sjob.release()  # also released by the transfer's end; returns once the buffer is back
    assert_bytes_equal(dst, expected)
    return {"src": src, "dst": dst, "staged": staged, "rjob": rjob, "sjob": sjob}


# ------------------------------------------------------------------ round trips


@pytest.mark.parametrize("page_layout", ["block_major", "kv_major"])
@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_every_fixture_round_trips_bit_exact(link: tuple[Receiver, Session], pool: PinnedPool, name: str,
                                             page_layout: str) -> None:
    layout = load_fixture(name)
    req = default_request(f"stage-{name}-{page_layout}")  # T=1000, S=999: partial last block everywhere
    seed = zlib.crc32(name.encode()) & 0xFFFF
    out = round_trip(link, pool, layout, req, page_layout=page_layout, seed=seed)
    assert pool.in_use_bytes == 0  # both jobs gave their buffers back
    if any(c.kind == "swa" for layer in layout.layers for c in layer.caches):
        swa = [s for s in out["sjob"].segments if s.name.split(".")[1] == "swa"]
        assert swa and all(s.token_start % layout.block_size for s in swa)  # window starts mid-block


def test_unaligned_prefix_hit_leaves_the_receivers_prefix_untouched(link: tuple[Receiver, Session],
                                                                    pool: PinnedPool) -> None:
    layout = load_fixture("tiny-qwen3-next")
    req = RequestSpec("stage-hit", 1000, 999, {"attn": 203})  # 203 % 64 != 0: first block entered mid-way
    out = round_trip(link, pool, layout, req)
    seg = next(s for s in out["sjob"].segments if s.token_count)
    assert (seg.token_start, seg.token_count) == (203, 796)


@pytest.mark.parametrize("kv_order,page_layout",
                         [("HND", "block_major"), ("HND", "kv_major"), ("NHD", "split")])
def test_other_engine_formats(link: tuple[Receiver, Session], pool: PinnedPool, kv_order: str,
                              page_layout: str) -> None:
    for name in ("tiny-llama", "tiny-mimo-swa", "tiny-falcon-h1"):
        layout = load_fixture(name)
        round_trip(link, pool, layout, default_request(f"fmt-{name}-{kv_order}-{page_layout}"),
                   page_layout=page_layout, kv_order=kv_order, seed=7)


@pytest.mark.parametrize("name", ["tiny-mimo-swa", "tiny-qwen3-next", "tiny-falcon-h1", "tiny-kimi-linear"])
def test_gpu_placement_path_on_cpu(link: tuple[Receiver, Session], pool: PinnedPool, name: str) -> None:
    """The GPU path's shape (gather into a scratch laid out like the layer's span, then one span copy;
    one span copy, then the scatter) run synchronously on CPU tensors."""
    layout = load_fixture(name)
    req = RequestSpec(f"scratch-{name}", 1000, 999, {"attn": 100})
    round_trip(link, pool, layout, req, mode="scratch", seed=21)


def test_receiver_with_another_block_size(link: tuple[Receiver, Session], pool: PinnedPool) -> None:
    layout = load_fixture("tiny-mimo-swa")  # block 16 on the sender, 48 on the receiver
    round_trip(link, pool, layout, default_request("other-bs"), rx_block_size=48)


def test_float8_and_fp32_bytes_survive_unchanged(link: tuple[Receiver, Session], pool: PinnedPool) -> None:
    layout = load_fixture("tiny-nemotron-h", kv_dtype="float8_e4m3fn")
    out = round_trip(link, pool, layout, default_request("fp8"), seed=11)
    dtypes = {str(t.dtype) for st in out["dst"].storages() for t in st.tensors}
    assert {"torch.float8_e4m3fn", "torch.float32", "torch.bfloat16"} <= dtypes


def test_layers_unstage_as_they_are_written(link: tuple[Receiver, Session], pool: PinnedPool) -> None:
    rx, session = link
    layout = load_fixture("tiny-qwen3-next")
    req = default_request("one-by-one")
    src = allocate_paged_cache(layout, 20, 2, fill="random", seed=1)
    dst = allocate_paged_cache(layout, 20, 2, fill="zeros")
    tables = {"attn": list(range(19, 3, -1))}
    with Stager(src, pool) as stager, Unstager(dst, pool) as unstager:
        rjob = unstager.prepare(req, {"attn": list(range(16))}, 0)
        h_rx = rjob.expect_on(rx)
        sjob = stager.begin(req, tables, 1)
        h_tx = session.send(layout, req)
        for layer in range(layout.num_layers):
            with pytest.raises(TimeoutError):
                rjob.wait_layer(layer, timeout=0.05)
            staged = sjob.stage_and_send(h_tx, layer)
            assert staged.done()  # CPU staging is synchronous
            staged.wait_sent(5)
            rjob.wait_layer(layer, timeout=10)
            assert layer in rjob.done_at and rjob.done_at[layer] >= rjob.arrived_at[layer]
            # the layer is in the destination once wait_layer returns
            st_s, st_d = src.storage(layer, 0), dst.storage(layer, 0)
            if st_s.token_indexed:
                k_s, k_d = st_s.paged_views()[0], st_d.paged_views()[0]
                assert torch.equal(k_s[19][:5].view(torch.uint8), k_d[0][:5].view(torch.uint8))
            else:
                ssm_s, ssm_d = st_s.slot_views()[1], st_d.slot_views()[1]
                assert torch.equal(ssm_s[1].view(torch.uint8), ssm_d[0].view(torch.uint8))
        h_tx.finish().result(10)
        h_rx.result(10)
        sjob.release()
        rjob.release()


def test_staged_layer_views_hold_the_wire_bytes(pool: PinnedPool) -> None:
    layout = load_fixture("tiny-mimo-swa")
    req = default_request("views")
    src = allocate_paged_cache(layout, 70, 1, fill="random", seed=3)
    tables = {"attn": list(range(63)), "swa": list(range(63))}
    with Stager(src, pool) as stager, stager.begin(req, tables, None) as job:
        seen: list[int] = []
        staged = job.stage(1)
        staged.add_done_callback(lambda s: seen.append(s.layer))
        assert seen == [1]
        k_view = staged.result(0)[0]
        start = job.segments[job.placement.by_layer[1][0]].token_start
        assert start == 999 - 31  # window 32, resumed at 999
        k = src.storage(1, 0).paged_views()[0]  # identity table: token p is at block p // 16
        want = torch.stack([k[p // 16, p % 16] for p in range(start, 999)])
        assert k_view.numel() == want.numel() * want.element_size()
        assert torch.equal(k_view, want.view(torch.uint8).reshape(-1))
        with pytest.raises(ValueError, match="twice"):
            job.stage(1)
    assert pool.in_use_bytes == 0


# ------------------------------------------------------------------ mismatches: nothing written


def test_destination_dtype_or_shape_mismatch_is_refused(pool: PinnedPool) -> None:
    layout = load_fixture("tiny-qwen3-next")
    other = allocate_paged_cache(load_fixture("tiny-qwen3-next", kv_dtype="float16"), 4, 1)
    with pytest.raises(LayoutMismatch, match="dtype float16"):
        PagedCache(layout, [CacheStorage(s.layer, s.cache, layout.layers[s.layer].caches[s.cache], s.format,
                                         s.tensors, s.kv_order) for s in other.storages()])
    small = allocate_paged_cache(layout, 4, 1, block_size=32)
    with pytest.raises(LayoutMismatch, match="shape"):
        PagedCache(layout, small.storages())  # block size 64 expected
    with pytest.raises(LayoutMismatch, match="no engine storage"):
        PagedCache(layout, small.storages()[:-1], block_size=32)
    hnd = load_fixture("tiny-qwen3-next", kv_layout="HND")  # the HF adapter's wire form, not what staging writes
    with pytest.raises(LayoutMismatch, match="NHD wire form"):
        allocate_paged_cache(hnd, 4, 1)


def test_bad_block_tables_and_slots_are_refused_before_anything_moves(pool: PinnedPool) -> None:
    layout = load_fixture("tiny-qwen3-next")
    req = default_request("bad")
    cache = allocate_paged_cache(layout, 20, 2)
    with Stager(cache, pool) as stager, Unstager(cache, pool) as unstager:
        with pytest.raises(LayoutMismatch, match="need"):
            stager.begin(req, {"attn": list(range(10))}, 0)  # 1000 tokens need 16 blocks of 64
        with pytest.raises(LayoutMismatch, match="outside"):
            stager.begin(req, {"attn": [*range(15), 20]}, 0)
        with pytest.raises(LayoutMismatch, match="no block table"):
            stager.begin(req, {}, 0)
        with pytest.raises(LayoutMismatch, match="slot"):
            stager.begin(req, {"attn": list(range(16))}, 2)
        with pytest.raises(LayoutMismatch, match="repeats"):
            unstager.prepare(req, {"attn": [0, *range(15)]}, 0)
    assert pool.in_use_bytes == 0


def _refused(pool: PinnedPool, err: type[Exception], match: str, tables: Any, slot: Any) -> None:
    """``begin`` and ``prepare`` both refuse ``tables``/``slot`` of tiny-qwen3-next, before taking a buffer."""
    layout = load_fixture("tiny-qwen3-next")
    cache = allocate_paged_cache(layout, 20, 2)
    with Stager(cache, pool) as stager, Unstager(cache, pool) as unstager:
        with pytest.raises(err, match=match):
            stager.begin(default_request("types"), tables, slot)
        with pytest.raises(err, match=match):
            unstager.prepare(default_request("types"), tables, slot)
    assert pool.in_use_bytes == 0


def _state_layer(layout: ModelLayout) -> int:
    return next(la.index for la in layout.layers if any(c.indexing != TOKEN for c in la.caches))


@pytest.mark.parametrize("slot", [1.0, True, "1", [1], torch.tensor(1.0), {"x": 1.0}])
def test_state_slot_that_is_not_an_int_is_a_type_error(pool: PinnedPool, slot: Any) -> None:
    """A float slot (even 1.0), bool or string is a ``TypeError`` naming ``state_slot`` (was an
    AttributeError from deep in the plan, or for True slot 1)."""
    _refused(pool, TypeError, "state_slot", {"attn": list(range(16))}, slot)


@pytest.mark.parametrize("ids", [[b + 0.9 for b in range(16)], [str(b) for b in range(16)], None,
                                 "abcdefghijklmnop", torch.arange(16).reshape(1, 16),
                                 np.arange(16, dtype=np.float64), [[b] for b in range(16)]],
                         ids=["float", "str", "None", "string", "2-D", "float-array", "nested"])
def test_block_ids_that_are_not_ints_are_a_type_error(pool: PinnedPool, ids: Any) -> None:
    """Block ids 0.9, 1.9... used to be truncated to blocks 0, 1... (the wrong blocks sent or overwritten);
    strings, None or a 2-D table failed with an untyped message. Now a ``TypeError`` naming the table."""
    _refused(pool, TypeError, r"block_tables\['attn'\]", {"attn": ids}, 0)


@pytest.mark.parametrize("tables", [[list(range(16))], None, "attn"])
def test_block_tables_that_are_not_a_mapping_are_a_type_error(pool: PinnedPool, tables: Any) -> None:
    _refused(pool, TypeError, "block_tables must be a mapping", tables, 0)


def test_stage_refuses_a_layer_that_is_not_one_of_the_layouts(pool: PinnedPool) -> None:
    """``stage(-1)``/``stage(num_layers)``/``stage('0')`` used to return an empty staged layer, and
    ``stage_and_send`` then never wrote the layer: a ``LayoutMismatch`` (as ``write_layer``) or
    ``TypeError`` now, with nothing staged or written; an engine's numpy/torch integer is a layer."""
    layout = load_fixture("tiny-qwen3-next")
    state_layer = _state_layer(layout)
    cache = allocate_paged_cache(layout, 20, 2)
    written: list[int] = []

    class Writer:
        def write_layer(self, layer: int, views: list[Any]) -> None:
            assert type(layer) is int  # OutgoingTransfer.write_layer takes ints only
            written.append(layer)

    with Stager(cache, pool) as stager, stager.begin(default_request("layers"), {"attn": list(range(16))}, 0) as job:
        for layer in (-1, layout.num_layers):
            with pytest.raises(LayoutMismatch, match=f"layer {layer} is not a layer"):
                job.stage(layer)
            with pytest.raises(LayoutMismatch, match=f"layer {layer} is not a layer"):
                job.stage_and_send(Writer(), layer)
        with pytest.raises(LayoutMismatch, match="not a layer"):
            job.views(99)
        for bad in ("0", 0.0, True, None):
            with pytest.raises(TypeError, match="layer must be an int"):
                job.stage(bad)
        assert job.staged == {} and written == []
        staged = job.stage_and_send(Writer(), np.int64(state_layer))
        staged.wait_sent(10)
        assert written == [state_layer] and list(job.staged) == [state_layer]
        attn_layer = next(la for la in job.layers if la != state_layer)
        assert job.stage(torch.tensor(attn_layer)).result(10)
        with pytest.raises(ValueError, match="twice"):
            job.stage(attn_layer)
    assert pool.in_use_bytes == 0


def test_numpy_and_torch_integers_are_slots_block_ids_and_layers(link: tuple[Receiver, Session],
                                                                 pool: PinnedPool) -> None:
    """Engines hold slots and block tables as numpy/torch integers: they move the same bytes as ints."""
    rx, session = link
    layout = load_fixture("tiny-qwen3-next")
    request = default_request("np-ints")
    src = allocate_paged_cache(layout, 20, 4, fill="random", seed=21)
    dst = allocate_paged_cache(layout, 20, 3, fill="random", seed=22)
    src_tables = scrambled_tables(layout, src, request, 23)
    dst_tables = scrambled_tables(layout, dst, request, 24)
    expected = expected_after(layout, src, dst, snapshot(dst), src_tables, dst_tables, 3, 1, request)
    state_layers = [la.index for la in layout.layers if any(c.indexing != TOKEN for c in la.caches)]
    with Stager(src, pool) as stager, Unstager(dst, pool) as unstager:
        rjob = unstager.prepare(request, {g: torch.tensor(t) for g, t in dst_tables.items()}, torch.tensor(1))
        assert rjob.state_slot == 1 and type(rjob.state_slot) is int
        h_rx = rjob.expect_on(rx)
        sjob = stager.begin(request, {g: np.array(t) for g, t in src_tables.items()},
                            {la: np.int64(3) for la in state_layers})
        h_tx = session.send(layout, request)
        sjob.release_when_done(h_tx)
        for staged in [sjob.stage_and_send(h_tx, np.int64(layer)) for layer in sjob.layers]:
            staged.wait_sent(30)
        h_tx.finish()
        h_tx.result(30)
        h_rx.result(30)
        rjob.wait_all(30)
        rjob.release()
        sjob.release()
    assert_bytes_equal(dst, expected)
    assert pool.in_use_bytes == 0


def test_manifest_other_than_the_plan_fails_the_layer_and_writes_nothing(link: tuple[Receiver, Session],
                                                                          pool: PinnedPool) -> None:
    rx, session = link
    layout = load_fixture("tiny-llama")
    sent = RequestSpec("shifted", 1000, 999, {"attn": 16})  # tokens [16, 999): 983 tokens
    mine = RequestSpec("shifted", 983, 983)  # also 983 tokens, but [0, 983): same sizes, other tokens
    src = allocate_paged_cache(layout, 70, 1, fill="random", seed=5)
    dst = allocate_paged_cache(layout, 70, 1, fill="random", seed=6)
    before = snapshot(dst)
    with Stager(src, pool) as stager, Unstager(dst, pool) as unstager:
        rjob = unstager.prepare(mine, {"attn": list(range(62))}, None)
        h_rx = rjob.expect_on(rx, check_state_position=False)
        with stager.begin(sent, {"attn": list(range(63))}) as sjob:
            h_tx = session.send(layout, sent)
            sjob.send_all(h_tx)
            h_tx.result(10)
        h_rx.result(10)
        with pytest.raises(LayoutMismatch, match="token"):
            rjob.wait_layer(0, timeout=10)
        rjob.release()
    assert_bytes_equal(dst, before)


def test_state_position_mismatch_is_rejected_and_writes_nothing(link: tuple[Receiver, Session],
                                                                pool: PinnedPool) -> None:
    rx, session = link
    layout = load_fixture("tiny-qwen3-next")
    sent = RequestSpec("n-vs-n1", 1000, 999)  # vLLM N-1
    mine = RequestSpec("n-vs-n1", 1000, 1000)  # SGLang N
    src = allocate_paged_cache(layout, 20, 1, fill="random", seed=8)
    dst = allocate_paged_cache(layout, 20, 1, fill="random", seed=9)
    before = snapshot(dst)
    with Stager(src, pool) as stager, Unstager(dst, pool) as unstager:
        rjob = unstager.prepare(mine, {"attn": list(range(16))}, 0)
        rjob.expect_on(rx)
        with stager.begin(sent, {"attn": list(range(16))}, 0) as sjob:
            h_tx = session.send(layout, sent)
            with pytest.raises(TransferFailed, match="resumes at 1000"):
                sjob.send_all(h_tx)
                h_tx.result(10)
        with pytest.raises(TransferFailed):
            rjob.wait_layer(0, timeout=10)
        rjob.release()
    assert_bytes_equal(dst, before)


def test_begin_raises_pool_exhausted_and_waits_for_a_release() -> None:
    layout = load_fixture("tiny-qwen3-next")
    req = default_request("pool")
    cache = allocate_paged_cache(layout, 20, 1)
    with PinnedPool(64 * MiB, backend="torch") as big, Stager(cache, big) as probe:
        with probe.begin(req, {"attn": list(range(16))}, 0) as job:
            need = job.buffer.capacity  # the request's size class (~1.2 MB)
    with PinnedPool(need * 3 // 2, backend="torch") as small, Stager(cache, small) as stager:
        first = stager.begin(req, {"attn": list(range(16))}, 0)
        with pytest.raises(PoolExhausted, match="exhausted"):
            stager.begin(req, {"attn": list(range(16))}, 0)
        threading.Timer(0.2, first.release).start()
        second = stager.begin(req, {"attn": list(range(16))}, 0, acquire_timeout=10)
        second.release()


# ------------------------------------------------------------------ pool


def test_pool_reuses_released_buffers() -> None:
    with PinnedPool(16 * MiB, backend="torch") as pool:
        a = pool.acquire(100_000)
        ptr = a.data_ptr()
        assert a.tensor().numel() == 100_000 and a.capacity >= 100_000
        a.release()
        a.release()  # idempotent
        with pool.acquire(99_000) as b:  # same size class: the same memory back
            assert b.data_ptr() == ptr
        with pool.acquire(60_000) as c:  # a smaller request reuses a cached class up to twice its size
            assert c.data_ptr() == ptr and c.tensor().numel() == 60_000
        assert pool.hits == 2 and pool.allocations == 1
        with pool.acquire(40_000) as d:  # more than twice: a buffer of its own class
            assert d.data_ptr() != ptr and d.capacity < 60_000
        assert pool.allocations == 2
        with pytest.raises(ValueError, match="released"):
            b.tensor()


def test_pool_is_bounded_and_exhaustion_is_typed() -> None:
    with PinnedPool(4 * MiB, backend="numpy") as pool:
        held = [pool.acquire(MiB) for _ in range(4)]
        with pytest.raises(PoolExhausted, match="4 buffers"):
            pool.acquire(1)
        with pytest.raises(PoolExhausted, match="exceeds"):
            pool.acquire(5 * MiB)
        for h in held:
            h.release()
        # cached buffers are evicted to make room for another size class; the bound holds throughout
        for n in (3 * MiB, MiB // 3, 2 * MiB, 700_000, 3 * MiB):
            with pool.acquire(n) as b:
                assert b.array().nbytes == n
                assert pool.allocated_bytes <= pool.capacity
        assert pool.evictions >= 1
        assert pool.in_use_bytes == 0 and pool.buffers_in_use == 0


def test_pool_blocking_acquire_waits_with_a_timeout() -> None:
    with PinnedPool(2 * MiB, backend="numpy") as pool:
        a = pool.acquire(2 * MiB)
        t0 = time.monotonic()
        with pytest.raises(PoolExhausted, match="after waiting"):
            pool.acquire(MiB, block=True, timeout=0.1)
        assert time.monotonic() - t0 >= 0.1
        threading.Timer(0.1, a.release).start()
        with pool.acquire(MiB, block=True, timeout=10) as b:
            assert b.nbytes == MiB


def test_pool_arguments_are_checked_at_the_call() -> None:
    """A size or a wait that is not one fails at the call, typed and named: a NaN timeout on a full pool
    used to spin forever, infinity raised a raw OverflowError, a NaN capacity made a pool that refused all."""
    for capacity, err in (("1024", TypeError), (1.5, TypeError), (math.nan, TypeError), (True, TypeError),
                          (0, ValueError), (-1, ValueError)):
        with pytest.raises(err, match="capacity"):
            PinnedPool(capacity, backend="numpy")
    with pytest.raises(TypeError, match="min_class"):
        PinnedPool(MiB, backend="numpy", min_class=4096.0)
    with PinnedPool(np.int64(MiB), backend="numpy") as pool:  # numpy ints are ints
        assert pool.capacity == MiB and type(pool.capacity) is int
        for nbytes, err in (("10", TypeError), (math.nan, TypeError), (1.5, TypeError), (-1, ValueError)):
            with pytest.raises(err, match="nbytes"):
                pool.acquire(nbytes)
        for timeout, err in ((math.nan, ValueError), (math.inf, ValueError), (-1, ValueError), ("1", TypeError)):
            with pytest.raises(err, match="timeout"):
                pool.acquire(10, block=True, timeout=timeout)
        with pool.acquire(np.int64(10)) as b, pool.acquire(0, block=True, timeout=0) as c:
            assert b.nbytes == 10 and c.nbytes == 0
        held = pool.acquire(MiB)
        outcome: list[BaseException] = []

        def acquire_nan() -> None:
            try:
                pool.acquire(10, block=True, timeout=math.nan)
            except BaseException as e:  # noqa: BLE001 - what the call raised, checked below
                outcome.append(e)

        t = threading.Thread(target=acquire_nan, daemon=True)
        t.start()
        t.join(5)
        assert not t.is_alive(), "acquire(timeout=nan) on a full pool waits forever"
        assert isinstance(outcome[0], ValueError) and "timeout" in str(outcome[0])
        with pytest.raises(PoolExhausted, match="after waiting"):  # a finite wait still ends typed
            pool.acquire(10, block=True, timeout=0.05)
        threading.Timer(0.1, held.release).start()
        with pool.acquire(10, block=True, timeout=None) as d:  # None: no deadline, the release ends it
            assert d.nbytes == 10
        assert pool.in_use_bytes == 0


def test_begin_and_prepare_check_acquire_timeout(pool: PinnedPool) -> None:
    layout = load_fixture("tiny-qwen3-next")
    req = default_request("wait")
    cache = allocate_paged_cache(layout, 20, 1)
    with Stager(cache, pool) as stager, Unstager(cache, pool) as unstager:
        for timeout, err in ((math.inf, ValueError), (math.nan, ValueError), (-1, ValueError), ("1", TypeError),
                             (None, TypeError)):
            with pytest.raises(err, match="acquire_timeout"):
                stager.begin(req, {"attn": list(range(16))}, 0, acquire_timeout=timeout)
            with pytest.raises(err, match="acquire_timeout"):
                unstager.prepare(req, {"attn": list(range(16))}, 0, acquire_timeout=timeout)
        assert pool.in_use_bytes == 0
        with stager.begin(req, {"attn": list(range(16))}, 0, acquire_timeout=0) as a, \
                unstager.prepare(req, {"attn": list(range(16))}, 0, acquire_timeout=5) as b:
            assert a.buffer.nbytes == b.buffer.nbytes > 0
    assert pool.in_use_bytes == 0


def test_pool_backends() -> None:
    with PinnedPool(MiB, backend="numpy") as p:
        assert not p.pinned
        with p.acquire(10) as b:
            b.memoryview()[:] = bytes(range(10))
            assert b.tensor().tolist() == list(range(10))  # torch view of the same bytes
    with PinnedPool(MiB, backend="torch", pin=None) as p:
        assert p.pinned == torch.cuda.is_available()
    try:
        import cupyx  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="cupy"):
            PinnedPool(MiB, backend="cupy")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA"):
            PinnedPool(MiB, backend="torch", pin=True)


def test_wait_layer_and_views_refuse_what_is_not_a_layer_or_released(pool: PinnedPool) -> None:
    """``wait_layer("0")`` raised a raw comparison TypeError and ``wait_layer(True)`` waited for layer 1;
    ``views()`` after ``release()`` a raw TypeError on None. Now the checks ``stage`` has: TypeError for a bool
    or a string, LayoutMismatch outside the layout, KvwireError once released; an engine's numpy integer is a
    layer (the control)."""
    from kvwire import KvwireError

    layout = load_fixture("tiny-qwen3-next")
    dst = allocate_paged_cache(layout, 20, 2, fill="zeros")
    state_layer = _state_layer(layout)
    with Unstager(dst, pool) as unstager:
        rjob = unstager.prepare(default_request("wait-args"), {"attn": list(range(16))}, 0)
        for bad in ("0", True, 1.0):
            with pytest.raises(TypeError, match="layer must be an int"):
                rjob.wait_layer(bad, timeout=0.01)
        for bad in (-1, layout.num_layers):
            with pytest.raises(LayoutMismatch, match="not a layer"):
                rjob.wait_layer(bad, timeout=0.01)
        with pytest.raises(TimeoutError):
            rjob.wait_layer(np.int64(state_layer), timeout=0.05)
        rjob.release()
    src = allocate_paged_cache(layout, 20, 2)
    with Stager(src, pool) as stager:
        job = stager.begin(default_request("views-args"), {"attn": list(range(16))}, 0)
        assert job.views(state_layer)
        job.release()
        with pytest.raises(KvwireError, match="released"):
            job.views(state_layer)
