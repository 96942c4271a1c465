"""Presets against the reference note (hybrid-kv-layouts.md §2-§3): bytes, block sizes, TP sharding."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from kvwire.codec.hf import hybrid_block_size, layout_from_hf_config
from kvwire.codec.layout import ModelLayout, RequestSpec, TensorSpec, conv_rank_split, plan_segments
from kvwire.codec.presets import PRESETS, load_layout, load_preset, preset_config
from kvwire.errors import LayoutError

MiB = 1 << 20

# name -> (KV bytes per token, state bytes per request), TP1, engine defaults (vLLM), KV bf16 (§2).
EXPECTED_BYTES: dict[str, tuple[int, int]] = {
    "kimi-linear-48b-a3b": (8_064, 43_417_600),
    "qwen3-next-80b-a3b": (24_576, 39_518_208),
    "qwen3.5-397b-a17b": (30_720, 45 * 4_268_032),
    "qwen3.5-35b-a3b": (20_480, 30 * 2_146_304),
    "minimax-m1": (40_960, 70 * 2 * MiB),
    "minimax-m2": (253_952, 0),
    "jamba-1.5-mini": (16_384, 28 * 311_296),
    "nemotron-h-8b": (16_384, 24 * 4_255_744),
    "falcon-h1-7b": (45_056, 44 * 1_594_368),
    "mimo-v2-flash": (23_040 + 39 * 5_120, 0),  # all token-indexed bytes: full + unbounded SWA
    "ring-mini-linear-2.0": (8_192, 16 * 524_288),
    "mamba2-2.7b": (0, 64 * (32_256 + 1_310_720)),
    "llama-3-70b": (327_680, 0),
    "deepseek-v3": (70_272, 0),
}

# name -> {tp: block size} where §3 gives them (align 16, mode align, bf16 KV).
EXPECTED_BLOCKS: dict[str, dict[int, int]] = {
    "kimi-linear-48b-a3b": {1: 1888, 2: 944, 4: 480, 8: 240},
    "qwen3-next-80b-a3b": {1: 544, 2: 544, 4: 272, 8: 144},
    "qwen3.5-397b-a17b": {1: 2096, 2: 2096, 4: 1056, 8: 528},
    "qwen3.5-35b-a3b": {1: 1056, 2: 1056, 4: 528, 8: 272},
    "minimax-m1": {1: 512, 2: 512, 4: 512, 8: 512},
    "jamba-1.5-mini": {1: 80, 2: 80, 4: 80, 8: 80},
    "nemotron-h-8b": {1: 1040, 2: 1040, 4: 1040, 8: 1040},
    "falcon-h1-7b": {1: 1568, 2: 1568, 4: 784, 8: 400},
    "ring-mini-linear-2.0": {1: 256},
}


def _tensor(layout: ModelLayout, layer: int, kind: str, name: str) -> TensorSpec:
    cache = next(c for c in layout.layers[layer].caches if c.kind == kind)
    return next(t for t in cache.tensors if t.name == name)


def test_preset_names() -> None:
    assert sorted(PRESETS) == sorted(EXPECTED_BYTES)
    assert len(set(PRESETS)) == 14


@pytest.mark.parametrize("name", sorted(EXPECTED_BYTES))
def test_preset_bytes(name: str) -> None:
    layout = load_preset(name)
    assert layout.name == name
    assert (layout.kv_bytes_per_token(), layout.state_bytes_per_request()) == EXPECTED_BYTES[name]
    assert ModelLayout.from_dict(layout.to_dict()) == layout


BLOCK_CASES = [(n, tp, b) for n, d in EXPECTED_BLOCKS.items() for tp, b in d.items()]


@pytest.mark.parametrize("name,tp,block", BLOCK_CASES)
def test_preset_block_size(name: str, tp: int, block: int) -> None:
    layout = load_preset(name, tp_size=tp)
    assert layout.block_size == block == hybrid_block_size(layout)


def test_block_size_other_alignments() -> None:
    kimi = [load_preset("kimi-linear-48b-a3b", tp_size=tp) for tp in (1, 2, 4, 8)]
    assert [hybrid_block_size(k, align=64) for k in kimi] == [1920, 960, 512, 256]  # §3.1, 64-aligned MLA
    nem = load_preset("nemotron-h-8b")
    assert 4_255_744 == 1039 * 4096  # page / attn1 is exact here
    assert hybrid_block_size(nem, mode="all") == 256 * 5  # lcm(256, 16) * cdiv(1039, 256)
    assert load_preset("qwen3-next-80b-a3b", block_size=16).block_size == 16
    with pytest.raises(LayoutError, match="mode"):
        hybrid_block_size(nem, mode="sometimes")


def test_non_hybrid_models_keep_the_base_block() -> None:
    for name in ("minimax-m2", "llama-3-70b", "deepseek-v3", "mamba2-2.7b", "mimo-v2-flash"):
        assert load_preset(name).block_size == 16
        assert hybrid_block_size(load_preset(name), align=32) == 32


def test_engine_and_explicit_ssm_dtypes() -> None:
    assert load_preset("qwen3-next-80b-a3b", engine="sglang").state_bytes_per_request() == 77_266_944
    fp32 = load_preset("qwen3-next-80b-a3b", ssm_dtype="float32")
    assert fp32.state_bytes_per_request() == 77_266_944
    assert _tensor(fp32, 0, "gdn", "conv").dtype == "bfloat16"
    assert _tensor(load_preset("qwen3-next-80b-a3b"), 0, "gdn", "ssm").dtype == "bfloat16"
    # Qwen3.5's text_config.mamba_ssm_dtype is honoured by vLLM too.
    assert _tensor(load_preset("qwen3.5-35b-a3b"), 0, "gdn", "ssm").dtype == "float32"
    # KDA recurrent is fp32 whatever the engine; Nemotron-H is fp32 under vLLM's hook.
    kimi = load_preset("kimi-linear-48b-a3b")
    assert _tensor(kimi, 0, "kda", "conv").dtype == "bfloat16"
    assert _tensor(kimi, 0, "kda", "ssm").dtype == "float32"
    assert _tensor(load_preset("nemotron-h-8b"), 0, "mamba2", "ssm").dtype == "float32"
    assert load_preset("minimax-m1", ssm_dtype="fp32").state_bytes_per_request() == 280 * MiB
    jamba = load_preset("jamba-1.5-mini", engine="sglang")
    assert jamba.state_bytes_per_request() == 28 * (49_152 + 524_288)
    assert load_preset("mamba2-2.7b", kv_dtype="fp8").kv_bytes_per_token() == 0
    assert load_preset("deepseek-v3", kv_dtype="float8_e4m3fn").kv_bytes_per_token() == 35_136


def test_layer_patterns() -> None:
    kimi = load_preset("kimi-linear-48b-a3b")
    assert kimi.layers_of("mla") == [3, 7, 11, 15, 19, 23, 26]
    assert len(kimi.layers_of("kda")) == 20
    assert load_preset("qwen3-next-80b-a3b").layers_of("gqa") == list(range(3, 48, 4))
    assert load_preset("minimax-m1").layers_of("gqa") == list(range(7, 80, 8))
    m2 = load_preset("minimax-m2")
    assert m2.layers_of("lightning") == [] and len(m2.layers_of("gqa")) == 62
    assert load_preset("jamba-1.5-mini").layers_of("gqa") == [4, 12, 20, 28]
    nem = load_preset("nemotron-h-8b")
    assert nem.layers_of("gqa") == [7, 18, 29, 40]
    assert len(nem.layers_of("mamba2")) == 24 and sum(not layer.caches for layer in nem.layers) == 24
    falcon = load_preset("falcon-h1-7b")
    assert all(layer.kinds == ("gqa", "mamba2") for layer in falcon.layers)
    mimo = load_preset("mimo-v2-flash")
    assert mimo.layers_of("gqa") == [0, 5, 11, 17, 23, 29, 35, 41, 47] and len(mimo.layers_of("swa")) == 39
    assert load_preset("ring-mini-linear-2.0").layers_of("gqa") == [4, 9, 14, 19]


def test_mimo_full_and_window_bounded_swa() -> None:
    mimo = load_preset("mimo-v2-flash")
    caches = [c for layer in mimo.layers for c in layer.caches]
    assert sum(c.nbytes for c in caches if c.kind == "gqa") == 23_040
    assert {c.nbytes for c in caches if c.kind == "swa"} == {5_120}
    assert {c.window for c in caches if c.kind == "swa"} == {128}
    assert _tensor(mimo, 0, "gqa", "k").shape == (4, 192) and _tensor(mimo, 0, "gqa", "v").shape == (4, 128)
    s = 32_767
    segs = plan_segments(mimo, RequestSpec("r", s + 1, s))
    swa = sum(g.nbytes for g in segs if ".swa." in g.name)
    assert swa == 39 * 127 * 5_120  # the last window-1 tokens only, whatever the length
    assert sum(g.nbytes for g in segs) - swa == 23_040 * s


def test_tp_gqa_replication_and_mla() -> None:
    q2, q4 = load_preset("qwen3-next-80b-a3b", tp_size=2), load_preset("qwen3-next-80b-a3b", tp_size=4)
    k2, k4 = _tensor(q2, 3, "gqa", "k"), _tensor(q4, 3, "gqa", "k")
    assert (k2.shape, k2.replicated) == ((1, 256), False)
    assert (k4.shape, k4.replicated) == ((1, 256), True)
    assert _tensor(q4, 0, "gdn", "ssm").shape == (8, 128, 128)
    latent1 = _tensor(load_preset("kimi-linear-48b-a3b"), 3, "mla", "latent")
    latent2 = _tensor(load_preset("kimi-linear-48b-a3b", tp_size=2), 3, "mla", "latent")
    assert (latent1.shape, latent1.replicated) == ((576,), False)
    assert (latent2.shape, latent2.replicated) == ((576,), True)


def test_tp_conv_split_per_sub_projection() -> None:
    conv = _tensor(load_preset("qwen3-next-80b-a3b", tp_size=2), 0, "gdn", "conv")
    assert conv.shape == (3, 4096) and conv.layout == "conv:SD"
    assert conv.sub_projections == (2048, 2048, 4096)  # global [q | k | v]
    assert conv_rank_split(conv, 2) == (1024, 1024, 2048)
    kda = _tensor(load_preset("kimi-linear-48b-a3b", tp_size=4, conv_layout="conv:DS"), 0, "kda", "conv")
    assert kda.shape == (3072, 3) and conv_rank_split(kda, 4) == (1024, 1024, 1024)
    hf = _tensor(load_preset("jamba-1.5-mini", conv_layout="conv:HF"), 0, "mamba1", "conv")
    assert hf.shape == (8192, 4) and hf.sub_projections == (8192,)


def test_tp_mamba2_group_padding() -> None:
    # Falcon-H1-7B: n_groups=1 padded to TP.
    conv2 = _tensor(load_preset("falcon-h1-7b", tp_size=2), 0, "mamba2", "conv")
    assert conv2.sub_projections == (3072, 256, 256)
    assert conv2.shape == (3, 1536 + 2 * 256)  # grows past 3584 / 2
    assert conv_rank_split(conv2, 2) == (1536, 256, 256)
    # Nemotron-H-8B: 8 groups split evenly up to TP8, padded at TP16 (8 KV heads replicated too).
    assert _tensor(load_preset("nemotron-h-8b", tp_size=8), 0, "mamba2", "conv").shape == (3, 1024 + 2 * 128)
    n16 = load_preset("nemotron-h-8b", tp_size=16)
    conv16 = _tensor(n16, 0, "mamba2", "conv")
    assert conv16.shape == (3, 512 + 2 * 128) and conv16.shape[1] > 10_240 // 16
    assert conv_rank_split(conv16, 16) == (512, 128, 128)
    assert _tensor(n16, 0, "mamba2", "ssm").shape == (8, 64, 128)
    assert _tensor(n16, 7, "gqa", "k").replicated


def _qwen_next() -> dict[str, Any]:
    return preset_config("qwen3-next-80b-a3b")


@pytest.mark.parametrize(
    "change,kw,match",
    [
        ({"model_type": "gpt2"}, {}, "unsupported model_type"),
        ({"linear_num_value_heads": None}, {}, "linear_num_value_heads"),
        ({"head_dim": "256"}, {}, "head_dim"),
        ({"layer_types": ["full_attention"] * 3}, {}, "layer_types"),
        ({}, {"tp_size": 3}, "tp_size=3"),
        ({"num_key_value_heads": 8}, {"tp_size": 3}, "not divisible"),
        ({}, {"tp_size": 0}, "tp_size"),
        ({}, {"engine": "trt"}, "engine"),
        ({}, {"conv_layout": "conv:XY"}, "conv_layout"),
        ({}, {"ssm_layout": "ssm:HPN"}, "ssm_layout"),
        ({}, {"ssm_dtype": "float64"}, "unknown dtype"),
        ({}, {"tp_rank": 2, "tp_size": 2}, "tp_rank"),
    ],
)
def test_malformed_configs_raise(change: dict[str, Any], kw: dict[str, Any], match: str) -> None:
    config = {**_qwen_next(), **change}
    with pytest.raises(LayoutError, match=match):
        layout_from_hf_config(config, **kw)


def test_malformed_family_fields_raise() -> None:
    kimi = preset_config("kimi-linear-48b-a3b")
    kimi["linear_attn_config"]["kda_layers"] = [1, 2, 3]
    with pytest.raises(LayoutError, match="partition"):
        layout_from_hf_config(kimi)
    kimi["linear_attn_config"]["full_attn_layers"] = [0, 4]
    with pytest.raises(LayoutError, match="1-based"):
        layout_from_hf_config(kimi)
    with pytest.raises(LayoutError, match="attn_layer_offset"):
        layout_from_hf_config({**preset_config("jamba-1.5-mini"), "attn_layer_offset": 8})
    nem = {**preset_config("nemotron-h-8b"), "hybrid_override_pattern": "M*X"}
    with pytest.raises(LayoutError, match="hybrid_override_pattern"):
        layout_from_hf_config(nem)
    m1 = preset_config("minimax-m1")
    del m1["attn_type_list"]
    with pytest.raises(LayoutError, match="attn_type_list"):
        layout_from_hf_config(m1)
    with pytest.raises(LayoutError, match="groups cannot be padded"):
        odd_groups = {**preset_config("nemotron-h-8b"), "n_groups": 3, "mamba_num_heads": 6}
        layout_from_hf_config(odd_groups, tp_size=2)
    with pytest.raises(LayoutError, match="mapping"):
        layout_from_hf_config([1, 2])  # type: ignore[arg-type]


def test_preset_config_is_a_fresh_copy() -> None:
    cfg = preset_config("llama-3-70b")
    cfg["num_hidden_layers"] = 1
    assert preset_config("llama-3-70b")["num_hidden_layers"] == 80
    with pytest.raises(LayoutError, match="unknown preset"):
        preset_config("llama-4")


def test_load_layout_from_path(tmp_path: Path) -> None:
    model = tmp_path / "my-model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(preset_config("nemotron-h-8b")))
    for where in (model, model / "config.json", str(model / "config.json")):
        layout = load_layout(where, tp_size=2)
        assert layout.name == "my-model"
        assert layout.fingerprint() == load_preset("nemotron-h-8b", tp_size=2).fingerprint()
    assert load_layout("jamba-1.5-mini") == load_preset("jamba-1.5-mini")
    with pytest.raises(LayoutError, match="neither a preset"):
        load_layout(str(tmp_path / "missing.json"))
    (tmp_path / "bad.json").write_text("[1]")
    with pytest.raises(LayoutError, match="not a JSON object"):
        load_layout(tmp_path / "bad.json")


# ---------------------------------------------------------------- configs from untrusted places


def test_a_config_of_too_many_layers_is_refused_before_it_is_built(tmp_path: Path) -> None:
    """num_hidden_layers = 10**7 took 17.6 s of CPU to build (and its memory) before it was bounded by what a
    manifest may carry (frames.Limits.max_layers); a per-layer list as long is refused the same way."""
    import time

    from kvwire.codec.frames import Limits

    limit = Limits().max_layers
    c = preset_config("llama-3-70b")
    assert len(layout_from_hf_config(dict(c, num_hidden_layers=limit)).layers) == limit  # the bound itself is fine
    path = tmp_path / "big.json"
    path.write_text(json.dumps(dict(c, num_hidden_layers=10**7)))
    t0 = time.monotonic()
    with pytest.raises(LayoutError, match="at most 1024"):
        load_layout(path)
    assert time.monotonic() - t0 < 0.5
    mm = preset_config("minimax-m1")
    with pytest.raises(LayoutError, match="at most 1024"):
        layout_from_hf_config(dict(mm, num_hidden_layers=limit + 1, attn_type_list=[1] * (limit + 1)))


def test_read_config_reads_only_a_bounded_regular_file(tmp_path: Path) -> None:
    """A FIFO made load_layout block forever; /dev/zero made it read until MemoryError. Both are refused at
    once now, and so is a regular file over MAX_CONFIG_BYTES; a deeply nested one is a LayoutError."""
    import os
    import threading

    from kvwire.codec.hf import MAX_CONFIG_BYTES

    fifo = tmp_path / "fifo.json"
    os.mkfifo(fifo)
    got: list[BaseException] = []
    t = threading.Thread(target=lambda: _catch(got, load_layout, fifo), daemon=True)
    t.start()
    t.join(2.0)
    if t.is_alive():  # unblock the reader before failing
        with open(fifo, "w"):
            pass
        t.join(2.0)
        pytest.fail("load_layout blocked on a FIFO")
    assert len(got) == 1 and isinstance(got[0], LayoutError) and "regular file" in str(got[0])
    big = tmp_path / "big.json"
    with open(big, "wb") as f:  # sparse: costs no disk
        f.truncate(MAX_CONFIG_BYTES + 1)
    with pytest.raises(LayoutError, match="larger than"):
        load_layout(big)
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 200_000 + "]" * 200_000)
    with pytest.raises(LayoutError):
        load_layout(deep)


def test_reading_dev_zero_as_a_config_is_refused_at_once() -> None:
    """In a child under a 1 GiB address-space limit: before, it read until MemoryError."""
    import subprocess
    import sys

    code = ("import resource; resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))\n"
            "from kvwire.codec.presets import load_layout\nfrom kvwire.errors import LayoutError\n"
            "try:\n    load_layout('/dev/zero')\nexcept LayoutError as e:\n    print('LayoutError', e)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.stdout.startswith("LayoutError") and "regular file" in r.stdout, (r.stdout, r.stderr[-500:])


def _catch(out: list[BaseException], fn: Any, *args: Any) -> None:
    try:
        fn(*args)
    except BaseException as e:  # noqa: BLE001 - the test inspects it
        out.append(e)
