"""Chunk planning and the manifest: coverage, layer boundaries, sizes, checks, round trips and limits."""

from __future__ import annotations

from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvwire.codec.frames import MIN_CHUNK, Limits
from kvwire.codec.layout import (
    CacheSpec,
    LayerSpec,
    ModelLayout,
    RequestSpec,
    Segment,
    TensorSpec,
    plan_segments,
)
from kvwire.codec.manifest import (
    HASH_NONE,
    MANIFEST_VERSION,
    Manifest,
    build_manifest,
    check_manifest_against,
    expected_rows,
    max_chunk_size,
    parse_manifest,
)
from kvwire.codec.plan import (
    ALIGN,
    SPREAD_FLOOR,
    SPREAD_PER_LANE,
    ChunkPlan,
    check_chunk,
    plan_chunks,
    spread_chunk_size,
)
from kvwire.codec.presets import PRESETS, load_preset
from kvwire.errors import LayoutMismatch, ProtocolError

MiB = 1 << 20


def _segments(layer_sizes: list[list[int]]) -> list[Segment]:
    out: list[Segment] = []
    for layer, sizes in enumerate(layer_sizes):
        for t, n in enumerate(sizes):
            out.append(Segment(len(out), layer, 0, t, f"{layer}.{t}", n))
    return out


_sizes = st.one_of(st.integers(0, 3 * MiB), st.integers(0, 64),
                   st.sampled_from([0, 1, ALIGN, MIN_CHUNK, 2 * MiB]))
_layer_sizes = st.lists(st.lists(_sizes, min_size=0, max_size=4), min_size=0, max_size=12)
_chunk = st.one_of(st.integers(MIN_CHUNK, 4 * MiB), st.sampled_from([MIN_CHUNK, 2 * MiB, MiB + 1]))


def _check_plan(segs: list[Segment], plan: ChunkPlan, chunk_size: int) -> None:
    total = sum(s.nbytes for s in segs)
    assert plan.total == total
    starts = [0]
    for s in segs:
        starts.append(starts[-1] + s.nbytes)
    assert list(plan.segment_offsets) == starts
    layer_span: dict[int, tuple[int, int]] = {}
    for s, a in zip(segs, starts):
        lo, hi = layer_span.get(s.layer, (a, a))
        layer_span[s.layer] = (min(lo, a), max(hi, a + s.nbytes))
    # contiguous and exactly once: chunk i starts where chunk i-1 ends, the last ends at the total
    pos = 0
    for i in range(plan.num_chunks):
        assert plan.offsets[i] == pos and plan.lengths[i] > 0
        pos += plan.lengths[i]
    assert pos == total
    # never spans layers; the layer's chunks are a contiguous index range; every byte-carrying layer has one
    for i in range(plan.num_chunks):
        lo, hi = layer_span[plan.layers[i]]
        assert lo <= plan.offsets[i] and plan.offsets[i] + plan.lengths[i] <= hi
        assert i in plan.layer_chunks[plan.layers[i]]
    assert {la for la, (lo, hi) in layer_span.items() if hi > lo} == set(plan.layer_chunks)
    for layer, r in plan.layer_chunks.items():
        lo, hi = layer_span[layer]
        assert r.step == 1 and plan.offsets[r.start] == lo and plan.offsets[r[-1]] + plan.lengths[r[-1]] == hi
        lengths = [plan.lengths[c] for c in r]
        size = hi - lo
        for c in r:  # sizes: within [chunk/2, 1.5 chunk + ALIGN), unless the whole layer is smaller
            assert min(size, chunk_size // 2) <= plan.lengths[c] < chunk_size + chunk_size // 2 + ALIGN
            if c != r.start:
                assert (plan.offsets[c] - lo) % ALIGN == 0  # cuts are aligned from the layer start
        assert max(lengths) - min(lengths) < 2 * ALIGN  # about equal
    # pieces map back to segment ranges, covering each segment once, in order
    covered = [0] * len(segs)
    for i in range(plan.num_chunks):
        flat = plan.offsets[i]
        for seg, a, b in plan.pieces(i):
            assert 0 <= a < b <= segs[seg].nbytes and segs[seg].layer == plan.layers[i]
            assert starts[seg] + a == flat and covered[seg] == a
            covered[seg] = b
            flat += b - a
        assert flat == plan.offsets[i] + plan.lengths[i]
    assert covered == [s.nbytes for s in segs]


@settings(max_examples=300, deadline=None)
@given(layer_sizes=_layer_sizes, chunk_size=_chunk)
def test_plan_properties(layer_sizes: list[list[int]], chunk_size: int) -> None:
    segs = _segments(layer_sizes)
    _check_plan(segs, plan_chunks(segs, chunk_size), chunk_size)


@pytest.mark.parametrize("size", [500 * 2 * MiB + 1, 3 * 2 * MiB - 5, 7 * MiB + 12345, 2 * MiB * 3 // 2 + 1])
def test_large_layer_has_no_sliver_chunk(size: int) -> None:
    segs = _segments([[size // 3, size - size // 3]])
    plan = plan_chunks(segs, 2 * MiB)
    _check_plan(segs, plan, 2 * MiB)
    assert min(plan.lengths) > MiB


def test_plan_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        plan_chunks(_segments([[MiB]]), MIN_CHUNK - 1)
    segs = _segments([[MiB], [MiB]])
    shuffled = [segs[0], segs[1], Segment(2, 0, 0, 1, "late", 10)]
    with pytest.raises(ValueError, match="contiguous"):
        plan_chunks(shuffled, MIN_CHUNK)


def test_empty_plan() -> None:
    plan = plan_chunks([], MIN_CHUNK)
    assert plan.num_chunks == 0 and plan.total == 0 and plan.layer_chunks == {}
    plan = plan_chunks(_segments([[0, 0], [], [0]]), MIN_CHUNK)
    assert plan.num_chunks == 0 and plan.layer_chunks == {}


@given(layer_sizes=_layer_sizes, limit=st.integers(2 * MIN_CHUNK, 64 * MiB))
def test_max_chunk_size_keeps_chunks_under_the_limit(layer_sizes: list[list[int]], limit: int) -> None:
    limits = Limits(max_chunk=limit)
    plan = plan_chunks(_segments(layer_sizes), max(MIN_CHUNK, max_chunk_size(limits)))
    if max_chunk_size(limits) >= MIN_CHUNK:
        assert all(n <= limits.max_chunk for n in plan.lengths)


@settings(max_examples=50, deadline=None)
@given(layer_sizes=_layer_sizes.filter(lambda ls: any(any(x) for x in ls)), chunk_size=_chunk, data=st.data())
def test_check_chunk_rejects_every_mismatch(layer_sizes: list[list[int]], chunk_size: int, data: st.DataObject
                                            ) -> None:
    plan = plan_chunks(_segments(layer_sizes), chunk_size)
    i = data.draw(st.integers(0, plan.num_chunks - 1))
    off, ln, layer = plan.offsets[i], plan.lengths[i], plan.layers[i]
    check_chunk(plan, i, off, ln, layer)
    bad = [(i, off + 1, ln, layer), (i, off - 1, ln, layer), (i, off, ln + 1, layer), (i, off, ln - 1, layer),
           (i, off, ln, layer + 1), (i, off, ln, layer - 1), (-1, off, ln, layer),
           (plan.num_chunks, off, ln, layer), (2**32 - 1, off, ln, layer)]
    if plan.num_chunks > 1:
        j = (i + 1) % plan.num_chunks
        bad += [(j, off, ln, layer), (i, plan.offsets[j], plan.lengths[j], plan.layers[j])]
    for args in bad:
        with pytest.raises(ProtocolError):
            check_chunk(plan, *args)


# ---------------------------------------------------------------- manifest


def _t(name: str, shape: tuple[int, ...], layout: str, indexing: str, dtype: str = "bfloat16") -> TensorSpec:
    return TensorSpec(name, shape, dtype, layout, indexing)


def hybrid_layout(name: str = "hybrid", kv_heads: int = 2) -> ModelLayout:
    """GDN x2, GQA, MLP-only, SWA, MLA, GDN: every shape of payload the planner meets."""
    gdn = CacheSpec("gdn", (_t("conv", (3, 256), "conv:SD", "request"),
                            _t("ssm", (4, 32, 32), "ssm:HVK", "request", "float32")))
    gqa = CacheSpec("gqa", (_t("k", (kv_heads, 64), "NHD", "token"), _t("v", (kv_heads, 64), "NHD", "token")))
    swa = CacheSpec("swa", (_t("k", (1, 64), "NHD", "token"), _t("v", (1, 64), "NHD", "token")), window=128)
    mla = CacheSpec("mla", (_t("latent", (96,), "latent", "token"),))
    caches = [(gdn,), (gdn,), (gqa,), (), (swa,), (mla,), (gdn,)]
    return ModelLayout(name, tuple(LayerSpec(i, c) for i, c in enumerate(caches)))


LAYOUT = hybrid_layout()
REQUESTS = [
    RequestSpec("r-full", 3000, 2999),
    RequestSpec("r-hit", 3000, 3000, {"attn": 1024, "swa": 64}, {"attn": (7, 8, 9), "swa": (1,)}),
    RequestSpec("r-state-only", 500, 500, {"attn": 500}),
    RequestSpec("r-empty", 1, 0),  # state only: no token is shipped
]


def _rows(segments: Any) -> list[tuple[int, ...]]:
    return [(s.layer, s.cache, s.tensor, s.nbytes, s.token_start, s.token_count) for s in segments]


def _wire(m: Manifest, with_layout: bool = False) -> dict[str, Any]:
    """What the receiver's parse gets: the map after a msgpack round trip."""
    return msgpack.unpackb(msgpack.packb(m.to_wire(with_layout), use_bin_type=True), raw=False)


@pytest.mark.parametrize("request_", REQUESTS, ids=lambda r: r.request_id)
@pytest.mark.parametrize("mode", ["layout-sent", "layout-known", "no-layout"])
def test_manifest_round_trip(request_: RequestSpec, mode: str) -> None:
    m = build_manifest(2**64 - 1, LAYOUT, request_, 3 * MIN_CHUNK, hashed=mode != "no-layout")
    known = {LAYOUT.fingerprint(): LAYOUT} if mode == "layout-known" else None
    got = parse_manifest(_wire(m, with_layout=mode == "layout-sent"), known_layouts=known)
    assert (got.transfer_id, got.fingerprint, got.request, got.chunk_size, got.hash) == (
        m.transfer_id, m.fingerprint, m.request, m.chunk_size, m.hash)
    assert _rows(got.segments) == _rows(m.segments) == _rows(plan_segments(LAYOUT, request_))
    assert [s.index for s in got.segments] == list(range(len(m.segments)))
    assert got.total_bytes == m.total_bytes and got.hashed == (mode != "no-layout")
    assert got.layout == (None if mode == "no-layout" else LAYOUT)
    assert got.plan() == m.plan()
    check_manifest_against(got, LAYOUT)


def test_layout_is_only_sent_on_request() -> None:
    m = build_manifest(1, LAYOUT, REQUESTS[0], MIN_CHUNK)
    assert "layout" not in m.to_wire() and "layout" in m.to_wire(with_layout=True)


def _begin(request: RequestSpec = REQUESTS[0], with_layout: bool = True, **over: Any) -> dict[str, Any]:
    d = _wire(build_manifest(5, LAYOUT, request, MIN_CHUNK), with_layout)
    d.update(over)
    return d


def _mutated_segments() -> list[list[list[int]]]:
    seg = _begin()["seg"]
    out = []
    for i in range(len(seg)):
        for field in range(6):
            s = [list(x) for x in seg]
            s[i][field] += 1
            if field == 0 and any(s[j][0] < s[i][0] for j in range(i + 1, len(s))):
                continue  # a layer going backwards is a ProtocolError, tested below
            out.append(s)
    out.append(seg[:-1])
    out.append(seg + [seg[-1]])
    out.append(seg[1:])
    assert seg[0][0] == seg[1][0] == 0  # layer 0 is GDN: conv then ssm
    out.append([seg[1], seg[0]] + seg[2:])
    out.append([])
    return out


@pytest.mark.parametrize("known", [False, True])
def test_segments_inconsistent_with_layout(known: bool) -> None:
    layouts = {LAYOUT.fingerprint(): LAYOUT} if known else None
    for seg in _mutated_segments():
        with pytest.raises(LayoutMismatch):
            parse_manifest(_begin(with_layout=not known, seg=seg), known_layouts=layouts)
        parse_manifest(_begin(with_layout=False, seg=seg))  # without a layout there is nothing to compare


def test_request_inconsistent_with_segments() -> None:
    d = _begin(REQUESTS[0])
    d["req"] = _begin(REQUESTS[1])["req"]
    with pytest.raises(LayoutMismatch):
        parse_manifest(d)


def test_receiver_with_another_layout() -> None:
    m = parse_manifest(_begin())
    other = hybrid_layout(kv_heads=4)
    with pytest.raises(LayoutMismatch):
        check_manifest_against(m, other)
    m2 = parse_manifest(_begin(with_layout=False))
    with pytest.raises(LayoutMismatch, match="fingerprint"):
        check_manifest_against(m2, other)


@pytest.mark.parametrize("v", [None, 0, 2, MANIFEST_VERSION + 1, "1", b"\x01", [1]])
def test_wrong_version(v: Any) -> None:
    d = _begin(v=v)
    if v is None:
        del d["v"]
    with pytest.raises(ProtocolError, match="version"):
        parse_manifest(d)


@pytest.mark.parametrize("fp", [None, b"", b"x" * 15, b"x" * 17, "x" * 16, 16, [0] * 16])
def test_bad_fingerprint(fp: Any) -> None:
    with pytest.raises(ProtocolError, match="fingerprint"):
        parse_manifest(_begin(with_layout=False, fp=fp))


def test_fingerprint_not_matching_the_sent_layout() -> None:
    with pytest.raises(ProtocolError, match="fingerprint"):
        parse_manifest(_begin(fp=hybrid_layout(kv_heads=4).fingerprint()))


def test_unknown_fingerprint_means_no_layout() -> None:
    d = _begin(with_layout=False, fp=b"\x00" * 16)
    assert parse_manifest(d, known_layouts={LAYOUT.fingerprint(): LAYOUT}).layout is None


@pytest.mark.parametrize("limits", [Limits(), Limits(max_chunk=4 * MiB)])
def test_chunk_size_range(limits: Limits) -> None:
    hi = max_chunk_size(limits)
    for ok in (MIN_CHUNK, hi):
        assert parse_manifest(_begin(chunk=ok), limits).chunk_size == ok
        assert all(n <= limits.max_chunk for n in parse_manifest(_begin(chunk=ok), limits).plan().lengths)
    for bad in (MIN_CHUNK - 1, hi + 1, 0, -1, 2**64 - 1, 1.5 * MIN_CHUNK, "65536", True, None):
        with pytest.raises(ProtocolError, match="chunk"):
            parse_manifest(_begin(chunk=bad), limits)


@pytest.mark.parametrize("tid", [-1, 2**64, "1", None, 1.0])
def test_bad_transfer_id(tid: Any) -> None:
    with pytest.raises(ProtocolError, match="tid"):
        parse_manifest(_begin(tid=tid))


@pytest.mark.parametrize("h", [None, "xxh64", "", 1])
def test_unknown_hash(h: Any) -> None:
    with pytest.raises(ProtocolError, match="hash"):
        parse_manifest(_begin(hash=h))
    assert parse_manifest(_begin(hash=HASH_NONE)).hashed is False


def test_too_many_segments() -> None:
    n = len(_begin()["seg"])
    assert len(parse_manifest(_begin(), Limits(max_segments=n)).segments) == n
    with pytest.raises(ProtocolError, match="segments"):
        parse_manifest(_begin(), Limits(max_segments=n - 1))
    with pytest.raises(ProtocolError, match="segments"):
        parse_manifest(_begin(with_layout=False, seg=[[0, 0, 0, 1, 0, 0]] * 65537))


def test_too_many_bytes() -> None:
    total = sum(s[3] for s in _begin()["seg"])
    assert parse_manifest(_begin(), Limits(max_transfer_bytes=total)).total_bytes == total
    with pytest.raises(ProtocolError, match="byte limit"):
        parse_manifest(_begin(), Limits(max_transfer_bytes=total - 1))
    with pytest.raises(ProtocolError, match="byte limit"):
        parse_manifest(_begin(with_layout=False, seg=[[0, 0, 0, 2**63, 0, 0]] * 8))


def test_too_many_chunks() -> None:
    seg = [[i, 0, 0, 4 * MiB, 0, 0] for i in range(64)]
    m = parse_manifest(_begin(with_layout=False, seg=seg, chunk=MIN_CHUNK), Limits(max_chunks=64 * 64 + 65))
    assert m.plan().num_chunks == 64 * 64
    with pytest.raises(ProtocolError, match="chunks"):
        parse_manifest(_begin(with_layout=False, seg=seg, chunk=MIN_CHUNK), Limits(max_chunks=64 * 64))


@pytest.mark.parametrize(
    "seg",
    [
        "nope", {"0": 1}, [[0, 0, 0, 1, 0]], [[0, 0, 0, 1, 0, 0, 0]], [[0, 0, 0, -1, 0, 0]],
        [[0, 0, 0, 1.0, 0, 0]],
        [[0, 0, 0, True, 0, 0]], [[0, 0, 0, "1", 0, 0]], [[0, 0, 0, None, 0, 0]], [[1024, 0, 0, 1, 0, 0]],
        [[0, 17, 0, 1, 0, 0]], [[0, 0, 17, 1, 0, 0]], [[1, 0, 0, 1, 0, 0], [0, 0, 0, 1, 0, 0]], [7], [[]],
    ],
)
def test_malformed_segments(seg: Any) -> None:
    with pytest.raises(ProtocolError, match="segment"):
        parse_manifest(_begin(with_layout=False, seg=seg))


@pytest.mark.parametrize(
    "req",
    [
        None, [], {}, {"request_id": "", "num_tokens": 1, "state_position": 1},
        {"request_id": "r", "num_tokens": 1, "state_position": 2},
        {"request_id": "r", "num_tokens": -1, "state_position": 0},
        {"request_id": 5, "num_tokens": 1, "state_position": 1},
        {"request_id": "r", "num_tokens": float("inf"), "state_position": 1},
        {"request_id": "r", "num_tokens": 3, "state_position": 1, "prefix_hit": {"attn": 2}},
        {"request_id": "r", "num_tokens": 3, "state_position": 3, "prefix_hit": {"other": 1}},
        {"request_id": "r", "num_tokens": 3, "state_position": 3, "prefix_hit": [1]},
        {"request_id": "r", "num_tokens": 3, "state_position": 3, "block_ids": {"attn": [1, "2"]}},
        {"request_id": "r", "num_tokens": 3, "state_position": 3, "block_ids": {"attn": [0] * (1 << 20 | 1)}},
    ],
)
def test_malformed_request(req: Any) -> None:
    with pytest.raises(ProtocolError, match="request"):
        parse_manifest(_begin(with_layout=False, req=req))


@pytest.mark.parametrize(
    "layout",
    [
        None, [], {"layers": "x"}, {"layers": [[["gqa", 0, []]]]}, {"layers": [[["nope", 0, []]]]},
        {"layers": [[["gqa", 0, [["k", [2, 64], "bfloat17", "NHD", "token", False, []]]]]]},
        {"layers": [[["gqa", 0, [["k", [0, 64], "bfloat16", "NHD", "token", False, []]]]]]},
        {"layers": [[]] * 1025}, {"layers": [], "tp_size": 0}, {"layers": [], "block_size": float("inf")},
    ],
)
def test_malformed_layout(layout: Any) -> None:
    with pytest.raises(ProtocolError, match="layout"):
        parse_manifest(_begin(layout=layout))


def test_not_a_map() -> None:
    for d in (None, [], "begin", 5, b"\x81"):
        with pytest.raises(ProtocolError):
            parse_manifest(d)


_PRESET_LAYOUTS = [load_preset(name) for name in PRESETS] + [LAYOUT, hybrid_layout(kv_heads=8)]


@settings(max_examples=150, deadline=None)
@given(layout=st.sampled_from(_PRESET_LAYOUTS), n=st.integers(1, 300_000), last=st.booleans(),
       attn=st.floats(0, 1), swa=st.floats(0, 1), use_hit=st.booleans())
def test_receiver_rows_equal_plan_segments(layout: ModelLayout, n: int, last: bool, attn: float, swa: float,
                                           use_hit: bool) -> None:
    """The receiver's fast per-transfer check computes exactly the sender's plan_segments."""
    pos = max(0, n - 1) if last else n
    hit = {"attn": int(attn * pos), "swa": int(swa * pos)} if use_hit else {}
    request = RequestSpec("rows", n, pos, hit)
    want = _rows(plan_segments(layout, request))
    assert expected_rows(layout, request) == want
    assert expected_rows(layout, request) == want  # again, from the per-layout cache
    m = build_manifest(1, layout, request, MIN_CHUNK)
    got = parse_manifest(_wire(m), Limits(max_transfer_bytes=1 << 50, max_chunks=1 << 40),
                         {layout.fingerprint(): layout})
    assert got.segments == tuple(Segment(s.index, s.layer, s.cache, s.tensor, "", s.nbytes, s.token_start,
                                         s.token_count) for s in m.segments)


# ---------------------------------------------------------------- spread_chunk_size
@settings(max_examples=300, deadline=None)
@given(layer_sizes=_layer_sizes, chunk_size=_chunk, lanes=st.integers(1, 64))
def test_spread_chunk_size_gives_the_largest_layer_chunks_for_every_lane(layer_sizes: list[list[int]],
                                                                         chunk_size: int, lanes: int) -> None:
    segs = _segments(layer_sizes)
    got = spread_chunk_size(segs, lanes, chunk_size)
    assert MIN_CHUNK <= got <= chunk_size and (got == chunk_size or got >= SPREAD_FLOOR)
    plan = plan_chunks(segs, got)
    _check_plan(segs, plan, got)  # still a valid plan of the same bytes
    sizes = [sum(s.nbytes for s in segs if s.layer == la) for la in range(len(layer_sizes))]
    largest = max(sizes, default=0)
    if largest > chunk_size and lanes > 1:
        biggest = sizes.index(largest)
        n = len(plan.layer_chunks[biggest])
        want = SPREAD_PER_LANE * lanes
        # about SPREAD_PER_LANE chunks for every lane, unless the floor stops it; never many more
        assert n >= min(want, largest // max(got, 1)) and n <= max(want, round(largest / chunk_size)) + 1
    else:
        assert got == chunk_size  # the largest layer fits one chunk (or one lane): nothing to spread


def test_spread_chunk_size_on_the_streaming_cache() -> None:
    """The issue's 8k-token Qwen3-Next request: its 16.8 MB full-attention layers get four chunks per lane
    (one per lane before: the layer then waited for its slowest lane; 8 chunks of 2 MiB before that);
    a 32k-token cache's 67 MB layers get 1 MiB chunks on 16 lanes, and 2 MiB on 4."""
    from kvwire.codec.presets import load_preset

    layout = load_preset("qwen3-next-80b-a3b")
    segs = plan_segments(layout, RequestSpec("r", 8192, 8192))
    last = layout.layers[-1].index
    for lanes, want in ((4, MiB), (10, None), (16, MiB // 4)):
        c = spread_chunk_size(segs, lanes)
        if want is not None:
            assert c == want
        assert len(plan_chunks(segs, c).layer_chunks[last]) == SPREAD_PER_LANE * lanes
    big = plan_segments(layout, RequestSpec("r", 32768, 32768))
    assert spread_chunk_size(big, 16) == MiB and spread_chunk_size(big, 4) == 2 * MiB
    assert spread_chunk_size(segs, 16, per_lane=1) == MiB  # one a lane, as before
    assert spread_chunk_size(segs, 16, chunk_size=MIN_CHUNK) == MIN_CHUNK  # never above the session's
