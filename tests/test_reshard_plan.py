"""Re-sharding plans against an independent reference: bit-exact TP a -> b for every family and layout variant,
replication and Mamba2 group padding, a property test of exact coverage, 64-bit offsets, typed refusals."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from reshard_ref import FAMILY_CONFIGS, VARIANTS, family_layout, global_payload, shard_reference

from kvwire.codec.compat import check_compatible
from kvwire.codec.hf import layout_from_hf_config
from kvwire.codec.layout import ModelLayout, RequestSpec, plan_segments
from kvwire.codec.reshard import ReshardPlan, SliceCopy, plan_reshard
from kvwire.errors import LayoutError, ReshardRequired, ReshardUnsupported
from kvwire.reshard import gather, scatter
from kvwire.testing.fixtures import FIXTURES, load_fixture

PAIRS = [(1, 2), (2, 1), (2, 4), (4, 2), (8, 2)]
REQUESTS = {
    "N": RequestSpec("r", 40, 40),  # SGLang-style: the state after every prompt token
    "N-1+hit": RequestSpec("r", 40, 39, {"attn": 16, "swa": 16}),  # vLLM N-1, receiver holds a prefix
}


def run_locally(plan: ReshardPlan, request: RequestSpec, prefill: list[list[np.ndarray]]) -> list[list[np.ndarray]]:
    """Every decode rank's segments, filled only through the plan's copies (sentinel 0xEE elsewhere)."""
    out = []
    for d in range(plan.decode_tp):
        bufs = [np.full(s.nbytes, 0xEE, np.uint8) for s in plan_segments(plan.decode, request)]
        for p in plan.sources(d):
            for c in plan.copies(p, d, request):
                scatter(memoryview(bufs[c.dst_segment]), c, gather(memoryview(prefill[p][c.src_segment]), c))
        out.append(bufs)
    return out


def reshard_case(family: str, variant: str, tp_p: int, tp_d: int, request: RequestSpec, *,
                 wrong_conv: bool = False) -> tuple[list[list[np.ndarray]], list[list[np.ndarray]]]:
    """(what the plan delivers, what the reference says) per decode rank."""
    config = FAMILY_CONFIGS[family]
    g = family_layout(family, variant, 1)
    payload = global_payload(g, request, seed=tp_p * 10 + tp_d)
    prefill = [shard_reference(g, config, payload, request, tp_p, p) for p in range(tp_p)]
    for p, segs in enumerate(prefill):  # the reference's shards have the engine layout's sizes
        assert [a.nbytes for a in segs] == [s.nbytes for s in plan_segments(family_layout(family, variant, tp_p, p),
                                                                             request)]
    plan = plan_reshard(family_layout(family, variant, tp_p), family_layout(family, variant, tp_d))
    got = run_locally(plan, request, prefill)
    want = [shard_reference(g, config, payload, request, tp_d, d, contiguous_conv=wrong_conv) for d in range(tp_d)]
    return got, want


@pytest.mark.parametrize("req", sorted(REQUESTS))
@pytest.mark.parametrize("pair", PAIRS, ids=lambda p: f"{p[0]}to{p[1]}")
@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("family", sorted(FAMILY_CONFIGS))
def test_every_family_and_variant_reshards_bit_exact(family: str, variant: str, pair: tuple[int, int],
                                                     req: str) -> None:
    got, want = reshard_case(family, variant, *pair, REQUESTS[req])
    assert len(got) == pair[1]
    for d, (g, w) in enumerate(zip(got, want)):
        assert len(g) == len(w)
        for i, (a, b) in enumerate(zip(g, w)):
            assert a.tobytes() == b.tobytes(), f"decode rank {d} segment {i}"


@pytest.mark.parametrize("family", ["gdn", "kda", "mamba2", "mamba2-g1", "mamba1"])
def test_negative_control_contiguous_conv_slice_is_caught(family: str) -> None:
    """A reference that cuts the conv channels as one contiguous slice (the classic bug) must disagree with
    the plan on the conv segments, and only there."""
    for variant in VARIANTS:
        got, wrong = reshard_case(family, variant, 1, 2, REQUESTS["N"], wrong_conv=True)
        layout = family_layout(family, variant, 2)
        conv = {s.index for s in plan_segments(layout, REQUESTS["N"]) if s.name.endswith(".conv")}
        differing = {i for g, w in zip(got, wrong) for i, (a, b) in enumerate(zip(g, w)) if a.tobytes() != b.tobytes()}
        if family == "mamba1":  # one sub-projection: the contiguous slice IS right, a control of the control
            assert not differing
        else:
            assert differing and differing <= conv, (family, variant, differing)


def test_replicated_kv_heads_and_padded_groups_land_on_the_right_ranks() -> None:
    req = REQUESTS["N"]
    got, _ = reshard_case("mamba2", "vllm", 1, 4, req)
    layout = family_layout("mamba2", "vllm", 4)
    segs = plan_segments(layout, req)
    k = next(s.index for s in segs if s.name.endswith("gqa.k"))
    conv = next(s.index for s in segs if s.name.endswith("mamba2.conv"))
    # 2 KV heads over 4 ranks: ranks 0,1 hold head 0, ranks 2,3 head 1
    assert got[0][k].tobytes() == got[1][k].tobytes() != got[2][k].tobytes() == got[3][k].tobytes()
    # 2 groups padded to 4: the B|C channels of ranks 0,1 are group 0's, x channels differ
    x = 8 * 8 // 4  # heads*head_dim / tp channels of x per rank
    tail = [g[conv].reshape(3, -1, 2)[:, x:] for g in got]  # SD (K-1, dim) bf16
    assert tail[0].tobytes() == tail[1].tobytes() != tail[2].tobytes() == tail[3].tobytes()
    plan = plan_reshard(family_layout("mamba2", "vllm", 1), layout)
    assert "padded" not in plan.summary()  # summary is a readable table, not an error
    assert all(plan.sources(d) == [0] for d in range(4))


def test_replicated_caches_come_from_one_prefill_rank_each() -> None:
    """MLA (replicated everywhere): each decode rank receives each layer's latent once, from one prefill rank,
    and the replicas take turns layer by layer, so no prefill rank sends all of it."""
    plan = plan_reshard(family_layout("kda", "vllm", 4), family_layout("kda", "vllm", 2))
    req = REQUESTS["N"]
    mla_layer = 2
    for d in range(2):
        route = next(r for r in plan.routes[d] if r.layer == mla_layer)
        assert len(route.pieces) == 1 and route.pieces[0].length == route.dst_axis == 1
        assert sum(plan.wire_bytes(p, d, req) for p in plan.sources(d)) == plan.needed_bytes(d, req)
    mla_sources = {next(r for r in plan.routes[d] if r.layer == mla_layer).pieces[0].source for d in range(2)}
    assert len(mla_sources) == 2  # the two decode ranks fetch from different replicas
    gqa = plan_reshard(family_layout("gqa", "vllm", 8), family_layout("gqa", "vllm", 2))  # 2 KV heads, 4 replicas
    per_source = {p: sum(gqa.wire_bytes(p, d, req) for d in gqa.targets(p)) for p in range(8)}
    busy = [n for n in per_source.values() if n]
    assert len(busy) == 4 and len(set(busy)) == 1  # 2 layers x 2 decode ranks: 4 replicas, equal shares


@pytest.mark.parametrize("name", sorted(FIXTURES))
@pytest.mark.parametrize("pair", [(1, 2), (2, 1), (2, 4), (4, 2)], ids=lambda p: f"{p[0]}to{p[1]}")
def test_research_fixtures_plan_exact_coverage(name: str, pair: tuple[int, int]) -> None:
    """F1-F9 where their dims shard: every decode byte covered once, wire bytes = needed bytes."""
    try:
        pre, dec = load_fixture(name, tp_size=pair[0]), load_fixture(name, tp_size=pair[1])
    except LayoutError:
        pytest.skip(f"{name} does not shard to tp {max(pair)}")
    assert_exact_coverage(plan_reshard(pre, dec), RequestSpec("r", 100, 99))


def assert_exact_coverage(plan: ReshardPlan, request: RequestSpec) -> None:
    src_sizes = [s.nbytes for s in plan_segments(plan.prefill, request)]
    for d in range(plan.decode_tp):
        dst = plan_segments(plan.decode, request)
        counts = [np.zeros(s.nbytes, np.int32) for s in dst]
        wire = 0
        for p in plan.sources(d):
            assert 0 <= p < plan.prefill_tp
            for c in plan.copies(p, d, request):
                wire += c.nbytes
                assert c.src_offset >= 0 and c.src_offset + (c.rows - 1) * c.src_stride + c.row_bytes \
                    <= src_sizes[c.src_segment], "reads past the source segment"
                assert c.src_stride >= c.row_bytes and c.dst_stride >= c.row_bytes
                idx = (c.dst_offset + np.arange(c.rows, dtype=np.int64)[:, None] * c.dst_stride
                       + np.arange(c.row_bytes, dtype=np.int64)[None, :])
                np.add.at(counts[c.dst_segment], idx.reshape(-1), 1)
        for s, cnt in zip(dst, counts):
            assert (cnt == 1).all(), f"decode rank {d} {s.name}: bytes covered {set(cnt.tolist())} times"
        assert wire == plan.needed_bytes(d, request)


_TPS = st.sampled_from([1, 2, 3, 4, 6, 8])


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tp_p=_TPS, tp_d=_TPS, kv=st.sampled_from([1, 2, 3, 4, 6, 8, 12, 24]), heads_mult=st.integers(1, 4),
       groups=st.sampled_from([1, 2, 3, 4, 6, 8, 24]), d_state=st.integers(1, 3), hk_mult=st.integers(1, 3),
       hv_ratio=st.sampled_from([1, 2]), conv=st.sampled_from(["conv:SD", "conv:DS", "conv:HF"]),
       kv_layout=st.sampled_from(["NHD", "HND"]), gdn=st.booleans(), tokens=st.integers(1, 5),
       hint=st.booleans())
def test_property_plan_covers_every_destination_byte_once(tp_p: int, tp_d: int, kv: int, heads_mult: int,
                                                          groups: int, d_state: int, hk_mult: int, hv_ratio: int,
                                                          conv: str, kv_layout: str, gdn: bool, tokens: int,
                                                          hint: bool) -> None:
    lcm = 24  # every TP above divides it
    attn = {"hidden_size": 64, "num_attention_heads": 24, "num_key_value_heads": kv, "head_dim": 2}
    if gdn:
        hk = lcm * hk_mult // 4
        config = {"model_type": "qwen3_next", "num_hidden_layers": 2, "full_attention_interval": 2, **attn,
                  "linear_num_key_heads": hk, "linear_num_value_heads": hk * hv_ratio, "linear_key_head_dim": 2,
                  "linear_value_head_dim": 3, "linear_conv_kernel_dim": 3}
    else:
        config = {"model_type": "nemotron_h", "num_hidden_layers": 2, "hybrid_override_pattern": "M*", **attn,
                  "mamba_num_heads": lcm * heads_mult, "mamba_head_dim": 2, "ssm_state_size": d_state,
                  "n_groups": groups, "conv_kernel": 3}
    try:
        pre = layout_from_hf_config(config, tp_size=tp_p, conv_layout=conv, kv_layout=kv_layout)
        dec = layout_from_hf_config(config, tp_size=tp_d, conv_layout=conv, kv_layout=kv_layout)
    except LayoutError:
        assume(False)
        return
    try:
        plan = plan_reshard(pre, dec, heads={"gqa": kv} if hint else None)
    except ReshardUnsupported as e:  # only when the head count is in neither layout and matters
        assert not hint and "heads=" in str(e) and kv < min(tp_p, tp_d) and max(tp_p, tp_d) % min(tp_p, tp_d)
        plan = plan_reshard(pre, dec, heads={"gqa": kv})
    request = RequestSpec("r", tokens, tokens)
    assert_exact_coverage(plan, request)
    # and the bytes are the right ones: the independent reference agrees
    g = layout_from_hf_config(config, conv_layout=conv, kv_layout=kv_layout, name=pre.name)
    payload = global_payload(g, request)
    prefill = [shard_reference(g, config, payload, request, tp_p, p) for p in range(tp_p)]
    for d, segs in enumerate(run_locally(plan, request, prefill)):
        want = shard_reference(g, config, payload, request, tp_d, d)
        assert [a.tobytes() for a in segs] == [w.tobytes() for w in want]


def test_offsets_past_2_and_4_gib_are_exact_python_ints() -> None:
    """Plan arithmetic for segments of 6 GiB (no allocation): strides and offsets beyond 2**31 and 2**32."""
    config = {"model_type": "llama", "num_hidden_layers": 1, "hidden_size": 1024, "num_attention_heads": 8,
              "num_key_value_heads": 8, "head_dim": 128}
    n = 3 * 1024 * 1024  # tokens: 3M x 8 heads x 128 x bf16 = 6 GiB per K tensor at TP1
    req = RequestSpec("big", n, n)
    for kv_layout in ("NHD", "HND"):
        tp1, tp2 = (layout_from_hf_config(config, tp_size=t, kv_layout=kv_layout) for t in (1, 2))
        assert plan_segments(tp1, req)[0].nbytes == 6 << 30
        split = plan_reshard(tp1, tp2).copies(0, 1, req)[0]  # decode rank 1's K: heads 4..7
        merge = plan_reshard(tp2, tp1).copies(1, 0, req)[0]  # prefill rank 1's K into TP1 heads 4..7
        if kv_layout == "NHD":
            assert split == SliceCopy(0, 4 * 256, 8 * 256, 0, 0, 4 * 256, 4 * 256, n)
            assert merge == SliceCopy(0, 0, 4 * 256, 0, 4 * 256, 8 * 256, 4 * 256, n)
            last = split.src_offset + (split.rows - 1) * split.src_stride
            assert last > 1 << 32
        else:
            assert split == SliceCopy(0, 4 * n * 256, 8 * n * 256, 0, 0, 4 * n * 256, 4 * n * 256, 1)
            assert merge.dst_offset == 3 << 30 and merge.dst_offset > 1 << 31 and merge.nbytes == 3 << 30
    # the numpy path takes 64-bit offsets: scatter a small piece past 4 GiB into a lazily zeroed 5 GiB buffer
    big = np.zeros((5 << 30) + 64, np.uint8)  # calloc: only the touched pages become resident
    c = SliceCopy(0, 0, 16, 0, (4 << 30) + 100, (1 << 29) + 8, 16, 2)
    scatter(memoryview(big), c, np.arange(32, dtype=np.uint8))
    assert big[(4 << 30) + 100: (4 << 30) + 116].tolist() == list(range(16))
    second = (4 << 30) + 100 + (1 << 29) + 8
    assert big[second: second + 16].tolist() == list(range(16, 32))
    back = gather(memoryview(big), c._replace(src_offset=c.dst_offset, src_stride=c.dst_stride))
    assert bytes(back) == bytes(range(32))
    del big


def test_plan_is_cached_per_layout_pair_and_rank_independent() -> None:
    a = plan_reshard(family_layout("gdn", "vllm", 2, 1), family_layout("gdn", "vllm", 4, 3))
    b = plan_reshard(family_layout("gdn", "vllm", 2, 0), family_layout("gdn", "vllm", 4, 0))
    assert a is b
    text = a.summary(REQUESTS["N"])
    assert "prefill TP=2 -> decode TP=4" in text and "decode rank 3" in text and "needed" in text


def test_typed_refusals_and_check_compatible() -> None:
    tp1, tp2 = family_layout("gdn", "vllm", 1), family_layout("gdn", "vllm", 2)
    with pytest.raises(ReshardRequired, match="TP differs.*ReshardSender"):
        check_compatible(tp1, tp2)
    check_compatible(tp1, tp2, reshard=True)  # lifted where a plan exists
    # KV heads replicated on both sides with TP sharing a factor: the head count is in neither layout
    g4, g6 = family_layout("gqa", "vllm", 4), family_layout("gqa", "vllm", 6)
    with pytest.raises(ReshardUnsupported, match=r"\(1 or 2\).*heads="):
        plan_reshard(g4, g6)
    assert_exact_coverage(plan_reshard(g4, g6, heads={"gqa": 2}), REQUESTS["N"])
    # another model on the other side: head counts disagree
    other = layout_from_hf_config({**FAMILY_CONFIGS["gqa"], "num_key_value_heads": 4}, tp_size=2)
    with pytest.raises(ReshardUnsupported, match="head counts disagree"):
        check_compatible(family_layout("gqa", "vllm", 1), other, reshard=True)
    # indivisible heads: 6 KV heads at TP3 (2 per rank) cannot be split or replicated over TP4
    six = layout_from_hf_config({**FAMILY_CONFIGS["gqa"], "num_key_value_heads": 6}, tp_size=3)
    replicated4 = family_layout("gqa", "vllm", 4)  # one (replicated) head per rank: the count is not in it
    with pytest.raises(ReshardUnsupported, match="6 units cannot be split or replicated over tp=4"):
        check_compatible(six, replicated4)
    # a dtype change is never a reshard
    fp32 = layout_from_hf_config(FAMILY_CONFIGS["gdn"], tp_size=2, ssm_dtype="bfloat16")
    with pytest.raises(ReshardUnsupported, match="dtype"):
        plan_reshard(tp1, fp32)


def test_ranks_outside_the_plan_and_non_layouts_are_refused_by_name() -> None:
    """``sources(2)`` on decode TP 2 was a raw IndexError, ``sources(-1)`` silently rank 1's sources,
    ``targets(5)`` silently none, ``slice_layout(True, 0)`` rank 1's slice; ``plan_reshard('x', ...)`` a
    dataclasses TypeError. Now a ValueError naming the range, or a TypeError naming the parameter."""
    plan = plan_reshard(family_layout("gqa", "vllm", 1), family_layout("gqa", "vllm", 2))
    for call, what in ((plan.sources, "decode_rank"), (plan.paired, "decode_rank"), (plan.targets, "prefill_rank")):
        tp = plan.decode_tp if what == "decode_rank" else plan.prefill_tp
        for rank in (-1, tp, 5):
            with pytest.raises(ValueError, match=rf"{what} {rank} outside tp {tp}"):
                call(rank)
        for rank in (0.0, True, "0"):
            with pytest.raises(TypeError, match=f"{what} must be an int"):
                call(rank)
    for p, d, err in ((0, 2, ValueError), (1, 0, ValueError), (0, -1, ValueError), (True, 0, TypeError),
                      (0, 1.0, TypeError)):
        with pytest.raises(err, match="_rank"):
            plan.slice_layout(p, d)
        with pytest.raises(err, match="_rank"):
            plan.copies(p, d, REQUESTS["N"])
    # negative control: every rank in range, as an int or a numpy integer
    assert plan.sources(1) == plan.sources(np.int64(1)) == [0] and plan.targets(np.int64(0)) == [0, 1]
    assert plan.slice_layout(np.int64(0), np.int64(1)) is plan.slice_layout(0, 1)
    lay = family_layout("gqa", "vllm", 2)
    for args, name in ((("x", lay), "prefill"), ((lay, None), "decode"), ((lay.to_dict(), lay), "prefill")):
        with pytest.raises(TypeError, match=f"{name} must be a ModelLayout"):
            plan_reshard(*args)
    for heads in (["gqa", 2], {"gqa": 2.0}, {"gqa": "2"}, {2: 2}):
        with pytest.raises(TypeError, match="heads must be a mapping"):
            plan_reshard(lay, lay, heads=heads)
    g4, g6 = family_layout("gqa", "vllm", 4), family_layout("gqa", "vllm", 6)
    assert plan_reshard(g4, g6, heads={"gqa": np.int64(2)}) is plan_reshard(g4, g6, heads={"gqa": 2})


def test_slice_layout_fingerprints_differ_between_pairs() -> None:
    plan = plan_reshard(family_layout("gdn", "vllm", 4), family_layout("gdn", "vllm", 2))
    prints = {plan.slice_layout(p, d).fingerprint() for d in range(2) for p in plan.sources(d)}
    assert len(prints) == sum(len(plan.sources(d)) for d in range(2))
    assert isinstance(plan.slice_layout(0, 0), ModelLayout)


def test_slice_layouts_of_pieces_past_2_gib_survive_the_wire_checks() -> None:
    """A 4.3 GiB Mamba1 state split 2 -> 1: each piece is 2.15 GiB, more than a layout dim may claim on the
    wire (2**31); the slice layout states it as factors, so a receiver parses it (no allocation here)."""
    config = {"model_type": "jamba", "num_hidden_layers": 1, "hidden_size": 1 << 19, "num_attention_heads": 8,
              "num_key_value_heads": 8, "attn_layer_period": 2, "attn_layer_offset": 1, "mamba_d_state": 1100,
              "mamba_d_conv": 4, "mamba_expand": 2}
    plan = plan_reshard(layout_from_hf_config(config, tp_size=2, ssm_dtype="float32"),
                        layout_from_hf_config(config, ssm_dtype="float32"))
    request = RequestSpec("big", 4, 4)
    for p in range(2):
        sliced = plan.slice_layout(p, 0)
        assert ModelLayout.from_dict(sliced.to_dict()).fingerprint() == sliced.fingerprint()
        ssm = plan_segments(sliced, request)[-1]
        assert ssm.nbytes == (1 << 20) // 2 * 1100 * 4 > 1 << 31
    copy = plan.copies(1, 0, request)[-1]
    assert copy.dst_offset == (1 << 20) // 2 * 1100 * 4 and copy.dst_offset + copy.nbytes > 1 << 32


@pytest.mark.parametrize("pair", [(1, 2), (2, 1), (2, 4), (4, 2), (8, 2), (1, 8)], ids=lambda p: f"{p[0]}to{p[1]}")
def test_every_shipped_preset_plans_exact_intervals(pair: tuple[int, int]) -> None:
    """Real dimensions (presets), one token so each copy is a few intervals: the intervals of every decode
    segment tile it exactly, and every read stays inside its source segment."""
    from kvwire.codec.presets import PRESETS, load_preset

    request = RequestSpec("one", 1, 1)
    planned = 0
    for name in PRESETS:
        try:
            pre, dec = load_preset(name, tp_size=pair[0]), load_preset(name, tp_size=pair[1])
        except LayoutError:
            continue  # a dim this TP does not split (the engines refuse it too)
        plan = plan_reshard(pre, dec)  # one TP divides the other: no head count needed
        planned += 1
        src = [s.nbytes for s in plan_segments(pre, request)]
        for d in range(pair[1]):
            spans: dict[int, list[tuple[int, int]]] = {}
            for p in plan.sources(d):
                for c in plan.copies(p, d, request):
                    assert c.src_offset + (c.rows - 1) * c.src_stride + c.row_bytes <= src[c.src_segment]
                    spans.setdefault(c.dst_segment, []).extend(
                        (c.dst_offset + i * c.dst_stride, c.row_bytes) for i in range(c.rows))
            for s in plan_segments(dec, request):
                pos = 0
                for start, n in sorted(spans.pop(s.index)):
                    assert start == pos, f"{name} {pair} rank {d} {s.name}: gap or overlap at {pos}"
                    pos += n
                assert pos == s.nbytes
            assert not spans
    assert planned >= 8, planned
