"""Fixtures F1-F9 against the reference note (§9): byte counts, block sizes, shapes, payload determinism."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from kvwire.codec.hf import hybrid_block_size
from kvwire.codec.layout import ModelLayout, TensorSpec, conv_rank_split, plan_segments
from kvwire.errors import LayoutError
from kvwire.testing.fixtures import (
    CHUNK_TOKENS,
    DEFAULT_STATE_POSITION,
    DEFAULT_TOKENS,
    FIXTURES,
    default_request,
    fixture_payload,
    index_coded,
    load_fixture,
    payload_digests,
)

# name -> (KV bytes per token, state bytes per request, §9 "Bytes (state + KV@1000)").
EXPECTED: dict[str, tuple[int, int, int]] = {
    "tiny-kimi-linear": (320, 112_128, 112_128 + 320_000),
    "tiny-kimi-linear-irregular": (320, 93_440, 93_440 + 320_000),
    "tiny-qwen3-next": (1_024, 158_976, 158_976 + 1_024_000),
    "tiny-nemotron-h": (512, 71_680, 71_680 + 512_000),
    "tiny-jamba": (256, 125_440, 125_440 + 256_000),
    "tiny-lightning": (512, 98_304, 98_304 + 512_000),
    "tiny-mimo-swa": (320 + 4 * 320, 0, 40_960 + 320_000),  # SWA bounded by its 32-token window
    "tiny-falcon-h1": (1_024, 35_840, 35_840 + 1_024_000),
    "tiny-llama": (2_048, 0, 2_048_000),
    "tiny-deepseek-mla": (640, 0, 640_000),
    "tiny-mamba2": (0, 71_680, 71_680),
}

# name -> (attn1 = bytes/token of one attention layer, state bytes of one linear layer), from §9.
PAGES: dict[str, tuple[int, int]] = {
    "tiny-kimi-linear": (160, 2_304 + 16_384),
    "tiny-kimi-linear-irregular": (160, 2_304 + 16_384),
    "tiny-qwen3-next": (512, 1_920 + 24_576),
    "tiny-nemotron-h": (256, 1_536 + 16_384),
    "tiny-jamba": (256, 1_536 + 16_384),
    "tiny-lightning": (256, 16_384),
    "tiny-falcon-h1": (256, 768 + 8_192),
}


def _tensor(layout: ModelLayout, layer: int, kind: str, name: str) -> TensorSpec:
    cache = next(c for c in layout.layers[layer].caches if c.kind == kind)
    return next(t for t in cache.tensors if t.name == name)


def test_fixture_names() -> None:
    assert sorted(FIXTURES) == sorted(EXPECTED)
    with pytest.raises(LayoutError, match="unknown fixture"):
        load_fixture("tiny-gpt2")


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_fixture_bytes(name: str) -> None:
    kv, state, total = EXPECTED[name]
    layout = load_fixture(name)
    assert layout.name == name
    assert (layout.kv_bytes_per_token(), layout.state_bytes_per_request()) == (kv, state)
    caches = [c for layer in layout.layers for c in layer.caches]
    token_caches = [c for c in caches if c.indexing == "token"]
    window_kv = sum(c.nbytes * min(DEFAULT_TOKENS, c.window or DEFAULT_TOKENS) for c in token_caches)
    assert state + window_kv == total
    assert total < 2 * 1024 * 1024


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_default_request_plan(name: str) -> None:
    layout, request = load_fixture(name), default_request()
    assert (request.num_tokens, request.state_position) == (1000, 999)
    assert (DEFAULT_TOKENS, DEFAULT_STATE_POSITION) == (1000, 999)
    expected = layout.state_bytes_per_request()
    for layer in layout.layers:
        for c in layer.caches:
            if c.indexing == "token":
                expected += c.nbytes * (min(999, c.window - 1) if c.window else 999)
    assert sum(s.nbytes for s in plan_segments(layout, request)) == expected


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_block_size_formula(name: str) -> None:
    layout = load_fixture(name)
    if name in PAGES:
        attn1, page = PAGES[name]
        assert layout.block_size == 16 * -(-page // (16 * attn1)) == hybrid_block_size(layout)
        assert layout.block_size > 16  # inflated
        assert hybrid_block_size(layout, align=64) == 64 * -(-page // (64 * attn1))
    else:
        assert layout.block_size == 16


def test_qwen3_next_fixture_shapes() -> None:
    f2 = load_fixture("tiny-qwen3-next")
    assert f2.layers_of("gqa") == [3, 7]
    conv, ssm = _tensor(f2, 0, "gdn", "conv"), _tensor(f2, 0, "gdn", "ssm")
    assert (conv.shape, conv.layout, conv.dtype) == ((320, 3), "conv:DS", "bfloat16")
    assert conv.sub_projections == (64, 64, 192)
    assert (ssm.shape, ssm.layout, ssm.dtype) == ((4, 48, 32), "ssm:HVK", "float32")
    # the variants §9 asks for
    hkv = load_fixture("tiny-qwen3-next", ssm_layout="ssm:HKV")
    assert _tensor(hkv, 0, "gdn", "ssm").shape == (4, 32, 48)
    sd = load_fixture("tiny-qwen3-next", conv_layout="conv:SD")
    assert _tensor(sd, 0, "gdn", "conv").shape == (3, 320)
    bf16 = load_fixture("tiny-qwen3-next", ssm_dtype="bfloat16")
    assert bf16.state_bytes_per_request() == 6 * (1_920 + 12_288)
    # TP2: 1 KV head per rank; TP4: the 2 KV heads replicate, but 2 GDN key heads do not split 4 ways.
    assert not _tensor(load_fixture("tiny-qwen3-next", tp_size=2), 3, "gqa", "k").replicated
    with pytest.raises(LayoutError, match="linear_num_key_heads"):
        load_fixture("tiny-qwen3-next", tp_size=4)


def test_kimi_fixture_shapes() -> None:
    f1 = load_fixture("tiny-kimi-linear")
    assert f1.layers_of("mla") == [3, 7]
    assert load_fixture("tiny-kimi-linear-irregular").layers_of("mla") == [3, 6]
    assert _tensor(f1, 0, "kda", "conv").shape == (3, 384)
    assert _tensor(f1, 0, "kda", "ssm").shape == (4, 32, 32)
    latent = _tensor(load_fixture("tiny-kimi-linear", tp_size=2), 3, "mla", "latent")
    assert (latent.shape, latent.replicated) == ((80,), True)


def test_nemotron_fixture_tp_group_padding() -> None:
    f3 = load_fixture("tiny-nemotron-h")
    assert [layer.kinds for layer in f3.layers][:4] == [("mamba2",), (), ("mamba2",), ("gqa",)]
    tp2 = _tensor(load_fixture("tiny-nemotron-h", tp_size=2), 0, "mamba2", "conv")
    assert tp2.shape == (3, 128) and conv_rank_split(tp2, 2) == (64, 32, 32)
    tp4 = load_fixture("tiny-nemotron-h", tp_size=4)
    conv4 = _tensor(tp4, 0, "mamba2", "conv")
    assert conv4.shape == (3, 96) and conv4.shape[1] > 256 // 4  # groups padded 2 -> 4
    assert conv_rank_split(conv4, 4) == (32, 32, 32)
    assert _tensor(tp4, 0, "mamba2", "ssm").shape == (2, 16, 32)
    assert _tensor(tp4, 3, "gqa", "k").replicated


def test_two_caches_in_one_layer_and_zero_kv() -> None:
    f7 = load_fixture("tiny-falcon-h1")
    assert all(layer.kinds == ("gqa", "mamba2") for layer in f7.layers)
    segs = plan_segments(f7, default_request())
    assert [s.name for s in segs[:4]] == ["0.gqa.k", "0.gqa.v", "0.mamba2.conv", "0.mamba2.ssm"]
    f9 = load_fixture("tiny-mamba2")
    assert all(s.token_count == 0 for s in plan_segments(f9, default_request()))


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_payload_matches_plan(name: str) -> None:
    layout, request = load_fixture(name), default_request()
    segs = plan_segments(layout, request)
    payload = fixture_payload(layout, request)
    assert len(payload) == len(segs)
    for seg, arr in zip(segs, payload):
        spec = layout.layers[seg.layer].caches[seg.cache].tensors[seg.tensor]
        assert arr.dtype == np.uint8 and arr.ndim == 1 and arr.nbytes == seg.nbytes and arr.flags.c_contiguous
        if spec.dtype == "float32":
            assert np.isfinite(arr.view(np.float32)).all()
        elif spec.dtype == "bfloat16":
            as_f32 = (arr.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
            assert np.isfinite(as_f32).all()


def test_payload_is_deterministic_and_keyed() -> None:
    layout = load_fixture("tiny-qwen3-next")
    request = default_request()
    a, b = fixture_payload(layout, request), fixture_payload(layout, request)
    assert payload_digests(a) == payload_digests(b)
    other_seed = fixture_payload(layout, request, seed=1)
    other_request = fixture_payload(layout, default_request("req-1"))
    assert all(not np.array_equal(x, y) for x, y in zip(a, other_seed))
    assert all(not np.array_equal(x, y) for x, y in zip(a, other_request))
    assert len(set(payload_digests(a))) == len(a)  # every segment has its own stream


def test_payload_is_stable_across_processes() -> None:
    layout = load_fixture("tiny-kimi-linear")
    payload = fixture_payload(layout, default_request())
    here = hashlib.sha256(b"".join(a.tobytes() for a in payload)).hexdigest()
    code = (
        "import hashlib\n"
        "from kvwire.testing.fixtures import load_fixture, fixture_payload, default_request\n"
        "p = fixture_payload(load_fixture('tiny-kimi-linear'), default_request())\n"
        "print(hashlib.sha256(b''.join(a.tobytes() for a in p)).hexdigest())\n"
    )
    root = str(Path(__file__).resolve().parents[1])
    # another str-hash salt must not matter
    env = {**os.environ, "PYTHONHASHSEED": "12345", "PYTHONPATH": root}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env,
                         cwd=root, timeout=120)
    assert out.stdout.strip() == here


def test_prefix_hit_payload_is_the_tail_of_the_full_one() -> None:
    layout = load_fixture("tiny-qwen3-next")
    full_segs = plan_segments(layout, default_request())
    full = dict(zip((s.name for s in full_segs), fixture_payload(layout, default_request())))
    hit = default_request(prefix_hit={"attn": 512})
    assert 512 % CHUNK_TOKENS == 0 and 500 % CHUNK_TOKENS != 0
    for p in (hit, default_request(prefix_hit={"attn": 500})):
        for seg, arr in zip(plan_segments(layout, p), fixture_payload(layout, p)):
            if seg.token_count:
                per_token = seg.nbytes // seg.token_count
                assert np.array_equal(arr, full[seg.name][seg.token_start * per_token :])
            else:
                assert np.array_equal(arr, full[seg.name])  # the state is shipped whole


def test_index_coded() -> None:
    a = index_coded((4, 48, 32))
    assert a.dtype == np.float32 and a[3, 47, 31] == 3 * 4096 + 47 * 64 + 31 and a[1, 0, 0] == 4096
    assert np.unique(a).size == a.size
    with pytest.raises(LayoutError):
        index_coded((4, 65, 2))
    with pytest.raises(LayoutError):
        index_coded((5000, 64, 64))
