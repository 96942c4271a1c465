"""Layouts of transformers 5 configs: Nemotron-H written by transformers 5, granitemoehybrid, zamba2, live
``PretrainedConfig`` objects and paths, and ``engine="transformers"`` tags checked against the tensors a
real tiny model of each family puts in its ``DynamicCache``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from kvwire.codec.hf import layout_from_hf_config
from kvwire.codec.layout import _MAX_DIM as MAX_DIM  # the bound ModelLayout.from_dict puts on a dimension
from kvwire.codec.layout import ModelLayout, TensorSpec
from kvwire.codec.presets import load_layout
from kvwire.errors import LayoutError

NEMOTRON_V5: dict[str, Any] = {  # what NemotronHConfig.to_dict() writes in transformers 5: no num_hidden_layers
    "model_type": "nemotron_h", "hidden_size": 4096, "dtype": "bfloat16",
    "layers_block_type": ["linear_attention", "mlp", "linear_attention", "full_attention", "moe",
                          "linear_attention"],
    "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "mamba_num_heads": 128,
    "mamba_head_dim": 64, "ssm_state_size": 128, "n_groups": 8, "conv_kernel": 4,
    "mamba_ssm_cache_dtype": "float32",
}

GRANITE: dict[str, Any] = {  # Granite-4.0-H style (legacy "mamba"/"attention" names)
    "model_type": "granitemoehybrid", "hidden_size": 1536, "num_hidden_layers": 4, "torch_dtype": "bfloat16",
    "layer_types": ["mamba", "mamba", "attention", "mamba"], "num_attention_heads": 12, "num_key_value_heads": 4,
    "mamba_n_heads": 48, "mamba_d_head": "auto", "mamba_d_state": 128, "mamba_n_groups": 1, "mamba_d_conv": 4,
    "mamba_expand": 2,
}

ZAMBA2: dict[str, Any] = {
    "model_type": "zamba2", "hidden_size": 2560, "num_hidden_layers": 4, "torch_dtype": "bfloat16",
    "layers_block_type": ["mamba", "hybrid", "mamba", "hybrid"], "num_attention_heads": 32,
    "num_key_value_heads": 32, "n_mamba_heads": 80, "mamba_d_state": 64, "mamba_ngroups": 1, "mamba_d_conv": 4,
    "mamba_expand": 2,
}


def _kinds(layout: Any) -> list[tuple[str, ...]]:
    return [layer.kinds for layer in layout.layers]


def test_nemotron_h_transformers5_config() -> None:
    layout = layout_from_hf_config(NEMOTRON_V5)
    assert _kinds(layout) == [("mamba2",), (), ("mamba2",), ("gqa",), (), ("mamba2",)]
    conv, ssm = layout.layers[0].caches[0].tensors
    assert conv.shape == (3, 128 * 64 + 2 * 8 * 128) and ssm.shape == (128, 64, 128) and ssm.dtype == "float32"
    legacy = {**NEMOTRON_V5, "layers_block_type": ["mamba", "mlp", "mamba", "attention", "moe", "mamba"]}
    assert layout_from_hf_config(legacy).fingerprint() == layout.fingerprint()
    # the transformers 4 form of the same model gives the same layout
    v4 = {k: v for k, v in NEMOTRON_V5.items() if k != "layers_block_type"}
    v4.update(num_hidden_layers=6, hybrid_override_pattern="M-M*EM", mamba_n_groups=8)
    assert layout_from_hf_config(v4).fingerprint() == layout.fingerprint()


def test_granite_and_zamba2() -> None:
    g = layout_from_hf_config(GRANITE)
    assert _kinds(g) == [("mamba2",), ("mamba2",), ("gqa",), ("mamba2",)]
    conv, ssm = g.layers[0].caches[0].tensors
    assert conv.shape == (3, 3072 + 2 * 128) and ssm.shape == (48, 64, 128)  # d_head auto = 2*1536/48
    assert g.layers[2].caches[0].tensors[0].shape == (4, 128)
    z = layout_from_hf_config(ZAMBA2)
    assert _kinds(z) == [("mamba2",), ("gqa", "mamba2"), ("mamba2",), ("gqa", "mamba2")]
    assert z.layers[1].caches[0].tensors[0].shape == (32, 160)  # attention on [hidden | embeddings]
    assert z.layers[1].caches[1].tensors[1].shape == (80, 64, 64)


@pytest.mark.parametrize("config,change,match", [
    (NEMOTRON_V5, {"layers_block_type": ["linear_attention", "ssm"]}, "unknown layer types"),
    (NEMOTRON_V5, {"layers_block_type": "M*"}, "layers_block_type"),
    (GRANITE, {"num_hidden_layers": 5}, "num_hidden_layers"),
    (GRANITE, {"mamba_n_heads": 7}, "does not divide"),
    (ZAMBA2, {"layers_block_type": None}, "layers_block_type"),
    (ZAMBA2, {"layers_block_type": ["mamba", "moe", "mamba", "mamba"]}, "unknown layer types"),
])
def test_malformed_new_families(config: dict[str, Any], change: dict[str, Any], match: str) -> None:
    with pytest.raises(LayoutError, match=match):
        layout_from_hf_config({**config, **change})


@pytest.mark.parametrize("model_type", [["nemotron_h"], {"a": 1}, 3, None])
def test_model_type_that_is_not_a_string_is_a_layout_error(model_type: Any) -> None:
    """A list or dict model_type (a config that came from a client) used to raise 'unhashable type'."""
    with pytest.raises(LayoutError, match="unsupported model_type"):
        layout_from_hf_config({**NEMOTRON_V5, "model_type": model_type})


def test_dimensions_no_wire_layout_may_have_are_refused_where_the_layout_is_built() -> None:
    """mamba_num_heads=2**64-1 used to build a layout whose fingerprint() raised msgpack's OverflowError, and
    2**40 one that ``ModelLayout.from_dict`` refuses (it caps dimensions at 2**31, as the wire does): a
    LayoutError naming the field now, or the tensor where only a product of fields is too large."""
    for v in (MAX_DIM + 1, 2**40, 2**64 - 1):
        with pytest.raises(LayoutError, match=rf"'mamba_num_heads' must be an int in \[1, {MAX_DIM}\]"):
            layout_from_hf_config({**NEMOTRON_V5, "mamba_num_heads": v})
    with pytest.raises(LayoutError, match=r"tensor 'conv': shape must be 1 to 8 ints in \[1, 2147483648\]"):
        layout_from_hf_config({**NEMOTRON_V5, "mamba_num_heads": 2**16, "mamba_head_dim": 2**16})
    for shape, subs in (((MAX_DIM + 1,), ()), ((True, 2), ()), ((2,) * 9, ()), ((2, 3.0), ()),
                        ((4,), (MAX_DIM + 1,)), ((4,), (1,) * 9), ((4,), (-1,))):
        with pytest.raises(LayoutError, match="shape|sub_projections"):
            TensorSpec("t", shape, "uint8", "raw", "request", sub_projections=subs)  # type: ignore[arg-type]
    # negative controls: the bound itself is a wire dimension, and real configs still build and round-trip
    edge = TensorSpec("t", (MAX_DIM, 1), "uint8", "raw", "request", sub_projections=(MAX_DIM, 0))
    assert TensorSpec.from_list(edge.to_list()) == edge
    for config in (NEMOTRON_V5, GRANITE, ZAMBA2):
        layout = layout_from_hf_config(config)
        assert ModelLayout.from_dict(layout.to_dict()).fingerprint() == layout.fingerprint()


def test_engine_tags_and_config_sources(tmp_path: Path) -> None:
    hf = layout_from_hf_config(NEMOTRON_V5, engine="transformers", kv_layout=None)
    t = {x.name: x.layout for layer in hf.layers for c in layer.caches for x in c.tensors}
    assert t == {"k": "HND", "v": "HND", "conv": "conv:HF", "ssm": "ssm:HPN"}
    assert hf.layers[0].caches[0].tensors[0].shape == (128 * 64 + 2 * 8 * 128, 4)
    (tmp_path / "config.json").write_text(json.dumps(NEMOTRON_V5))
    assert layout_from_hf_config(tmp_path).fingerprint() == layout_from_hf_config(NEMOTRON_V5).fingerprint()
    assert load_layout(tmp_path).fingerprint() == layout_from_hf_config(NEMOTRON_V5).fingerprint()
    with pytest.raises(LayoutError, match="no config file"):
        layout_from_hf_config(tmp_path / "missing.json")
    with pytest.raises(LayoutError, match="kv_layout"):
        layout_from_hf_config(NEMOTRON_V5, kv_layout="THD")


FAMILIES = ["qwen3_next", "jamba", "falcon_h1", "nemotron_h", "granitemoehybrid", "zamba2", "mamba2", "llama"]


@pytest.mark.parametrize("family", FAMILIES)
def test_transformers_layout_matches_real_cache(family: str) -> None:
    """A bf16 tiny model's DynamicCache after prefill: every tensor has the shape and dtype the layout built
    from the live PretrainedConfig says (conv bf16 full kernel width, recurrent state fp32, K/V HND)."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from hf_tiny import prompt, tiny_model
    from transformers import DynamicCache

    from kvwire.adapters.transformers import cache_kwargs, hf_layout

    model = tiny_model(family, dtype=torch.bfloat16)
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(prompt(9), use_cache=True, **cache_kwargs(model, cache))
    layout = hf_layout(model)
    assert layout == layout_from_hf_config(model.config, engine="transformers", model_dtype="bfloat16")
    assert len(cache.layers) == layout.num_layers
    for spec, layer in zip(layout.layers, cache.layers):
        got = []
        if getattr(layer, "keys", None) is not None and layer.keys.numel():
            got += [(tuple(t.shape[1:2]) + tuple(t.shape[3:]), t.dtype) for t in (layer.keys, layer.values)]
            assert layer.keys.shape[2] == 9
        for states in (getattr(layer, "conv_states", {}), getattr(layer, "recurrent_states", {})):
            if states.get(0) is not None:
                got.append((tuple(states[0].shape[1:]), states[0].dtype))
        want = [(t.shape, getattr(torch, t.dtype)) for c in spec.caches for t in c.tensors]
        assert got == want, f"layer {spec.index}"
    states = [t for layer in layout.layers for c in layer.caches for t in c.tensors if t.name == "ssm"]
    assert all(t.dtype == "float32" for t in states)
