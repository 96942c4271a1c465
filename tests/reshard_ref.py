"""An independent, naive reference for TP re-sharding tests: model configs per family that shard up to TP=8,
the whole TP=1 cache built with numpy, and a sharder written from the engines' rules (not from the plan).

The sharder knows each family's semantics from its config: KV heads split per rank, replicated (rank r holds
head r*H//T) when kv_heads < TP; MLA latent and aux rows whole on every rank; conv channels split per
sub-projection ([q|k|v], [x|B|C]), Mamba2 B/C groups padded to TP (rank r holds group r*G//T) when
n_groups % TP != 0; recurrent state heads (or Mamba1 d_inner rows) split.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from kvwire.codec.hf import layout_from_hf_config
from kvwire.codec.layout import TOKEN, ModelLayout, RequestSpec, plan_segments
from kvwire.testing.fixtures import fixture_payload

_GQA = {"hidden_size": 128, "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 16}

#: per family: configs whose every sharded dim splits up to TP=8 (KV heads 2: replicated at TP 4 and 8)
FAMILY_CONFIGS: Mapping[str, dict[str, Any]] = {
    "gqa": {"model_type": "llama", "num_hidden_layers": 2, **_GQA},
    "mla": {"model_type": "deepseek_v3", "num_hidden_layers": 2, "kv_lora_rank": 24, "qk_rope_head_dim": 8},
    "swa": {"model_type": "mimo_v2_flash", "num_hidden_layers": 3, "hidden_size": 128, "num_attention_heads": 8,
            "num_key_value_heads": 1, "head_dim": 24, "v_head_dim": 16, "swa_num_attention_heads": 8,
            "swa_num_key_value_heads": 4, "swa_head_dim": 24, "swa_v_head_dim": 16, "sliding_window": 16,
            "hybrid_layer_pattern": [0, 1, 1]},
    "gdn": {"model_type": "qwen3_next", "num_hidden_layers": 4, "full_attention_interval": 4, **_GQA,
            "linear_num_key_heads": 8, "linear_num_value_heads": 16, "linear_key_head_dim": 8,
            "linear_value_head_dim": 12, "linear_conv_kernel_dim": 4, "mamba_ssm_dtype": "float32"},
    "kda": {"model_type": "kimi_linear", "num_hidden_layers": 3, "hidden_size": 128, "num_attention_heads": 8,
            "kv_lora_rank": 24, "qk_rope_head_dim": 8,
            "linear_attn_config": {"num_heads": 8, "head_dim": 8, "short_conv_kernel_size": 4,
                                   "full_attn_layers": [3], "kda_layers": [1, 2]}},
    "mamba1": {"model_type": "jamba", "num_hidden_layers": 3, "hidden_size": 64, "num_attention_heads": 8,
               "num_key_value_heads": 2, "attn_layer_period": 3, "attn_layer_offset": 1, "mamba_d_state": 8,
               "mamba_d_conv": 4, "mamba_expand": 2},
    "mamba2": {"model_type": "nemotron_h", "num_hidden_layers": 4, "hybrid_override_pattern": "M-*M", **_GQA,
               "mamba_num_heads": 8, "mamba_head_dim": 8, "ssm_state_size": 8, "n_groups": 2, "conv_kernel": 4},
    "mamba2-g1": {"model_type": "falcon_h1", "num_hidden_layers": 2, **_GQA, "mamba_d_ssm": 64,
                  "mamba_n_heads": 8, "mamba_d_head": 8, "mamba_d_state": 8, "mamba_n_groups": 1,
                  "mamba_d_conv": 4},
    "lightning": {"model_type": "minimax", "num_hidden_layers": 3, **_GQA, "attn_type_list": [0, 1, 0]},
}

#: three layout variants: vLLM defaults; NIXL/SGLang-style DS conv with HKV states; transformers' HND/HF
VARIANTS: Mapping[str, dict[str, Any]] = {
    "vllm": {},
    "ds-hkv": {"conv_layout": "conv:DS", "ssm_layout": "ssm:HKV"},
    "hf": {"engine": "transformers", "model_dtype": "bfloat16"},
}


def family_layout(family: str, variant: str, tp: int, rank: int = 0) -> ModelLayout:
    return layout_from_hf_config(FAMILY_CONFIGS[family], tp_size=tp, tp_rank=rank, name=family,
                                 **VARIANTS[variant])


def _groups(config: Mapping[str, Any]) -> tuple[int, int] | None:
    """Mamba2 (n_groups, d_state) from a config, None for other families."""
    g = config.get("n_groups", config.get("mamba_n_groups"))
    n = config.get("ssm_state_size", config.get("mamba_d_state", config.get("state_size")))
    if config.get("model_type") not in ("nemotron_h", "falcon_h1", "mamba2", "granitemoehybrid", "zamba2"):
        return None
    return int(g or 1), int(n)


def _even(n: int, tp: int, r: int) -> np.ndarray:
    assert n % tp == 0, (n, tp)
    return np.arange(r * n // tp, (r + 1) * n // tp)


def _heads(h: int, tp: int, r: int) -> np.ndarray:
    return _even(h, tp, r) if h >= tp else np.array([r * h // tp])


def _conv_channels(parts: tuple[int, ...], tp: int, r: int, groups: tuple[int, int] | None,
                   contiguous: bool) -> np.ndarray:
    """Global channel indices of rank r's conv state, in its order."""
    total = sum(parts)
    if contiguous:  # the classic bug (negative control): one contiguous slice of the global channels
        return _even(total, tp, r)
    out, base = [], 0
    for j, p in enumerate(parts):
        if groups is not None and j > 0 and groups[0] % tp:
            g, n = groups
            k = r * g // tp  # padded: one whole group per rank
            out.append(base + np.arange(k * n, (k + 1) * n))
        else:
            out.append(base + _even(p, tp, r))
        base += p
    return np.concatenate(out)


def shard_reference(global_layout: ModelLayout, config: Mapping[str, Any], payload: list[np.ndarray],
                    request: RequestSpec, tp: int, rank: int, *, contiguous_conv: bool = False) -> list[np.ndarray]:
    """Rank ``rank`` of ``tp``'s segments, cut from the TP=1 ``payload`` (one uint8 array per segment)."""
    assert global_layout.tp_size == 1
    groups = _groups(config)
    out = []
    for seg, data in zip(plan_segments(global_layout, request), payload):
        cache = global_layout.layers[seg.layer].caches[seg.cache]
        t = cache.tensors[seg.tensor]
        b = t.itemsize
        n = seg.token_count
        if cache.kind in ("mla", "aux") or t.layout in ("latent", "raw"):
            part = data
        elif t.layout == "NHD":
            part = data.reshape(n, t.shape[0], -1)[:, _heads(t.shape[0], tp, rank)]
        elif t.layout == "HND":
            part = data.reshape(t.shape[0], n, -1)[_heads(t.shape[0], tp, rank)]
        elif t.layout == "conv:SD":
            ch = _conv_channels(t.sub_projections, tp, rank, groups, contiguous_conv)
            part = data.reshape(t.shape[0], t.shape[1], b)[:, ch]
        elif t.layout.startswith("conv:"):
            ch = _conv_channels(t.sub_projections, tp, rank, groups, contiguous_conv)
            part = data.reshape(t.shape[0], -1)[ch]
        else:  # recurrent states: heads (or Mamba1 d_inner rows) lead
            part = data.reshape(t.shape[0], -1)[_even(t.shape[0], tp, rank)]
        out.append(np.ascontiguousarray(part).reshape(-1))
    return out


def global_payload(global_layout: ModelLayout, request: RequestSpec, seed: int = 0) -> list[np.ndarray]:
    return fixture_payload(global_layout, request, seed)


def token_tensors(layout: ModelLayout) -> int:
    return sum(1 for layer in layout.layers for c in layer.caches for t in c.tensors if t.indexing == TOKEN)
