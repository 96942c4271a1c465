"""Build a ``ModelLayout`` from a HuggingFace config (dict, ``config.json`` path or live ``PretrainedConfig``).

Owns: which HF config fields describe each model family's caches (as written by transformers 4 and 5),
the engines' default state dtypes and layout tags, TP sharding of every cache (GQA replication when
kv_heads < TP, MLA replication, the conv channel split per sub-projection, Mamba2 group padding) and
``hybrid_block_size`` (vLLM ``_align_hybrid_block_size``). Must not know: sockets, threads, clocks,
torch (a ``PretrainedConfig`` is read through its ``to_dict``) or how bytes move. Files: only reading
one ``config.json`` (``read_config``).

Engines and their tags (``engine=``): ``vllm`` and ``sglang`` default to KV ``NHD``, conv ``conv:SD``,
GDN/KDA ``ssm:HVK``; ``transformers`` (its ``DynamicCache``) to KV ``HND`` (``(kv_heads, tokens,
head_dim)``, batch 1), conv ``conv:HF`` (full kernel width) and ``ssm:HKV``. Mamba1 is always
``ssm:DN``, Mamba2 ``ssm:HPN``.

Dtype rules for the recurrent ("ssm") tensor, first match wins:
1. the ``ssm_dtype`` argument (it overrides every family, KDA and lightning included);
2. the config's ``mamba_ssm_dtype`` / ``mamba_ssm_cache_dtype`` (Qwen3.5, Nemotron-3-Nano);
3. the engine default: KDA always float32; lightning the model dtype; SGLang and transformers (its
   PyTorch scans keep the state in float32) float32 for every other SSM; vLLM float32 for Nemotron-H
   (its config hook) and the model dtype ("auto") otherwise.
Conv states use the model dtype (``model_dtype``, else the config's ``torch_dtype``/``dtype``, default
bfloat16); KV uses ``kv_dtype`` (default bfloat16; the model dtype for transformers).
"""

from __future__ import annotations

import json
import math
import os
import stat
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ..errors import LayoutError
from .frames import DEFAULT_LIMITS
from .layout import _MAX_DIM as MAX_DIM
from .layout import REQUEST, TOKEN, CacheSpec, LayerSpec, ModelLayout, TensorSpec, dtype_size
from .layout import conv_rank_split as conv_rank_split  # re-exported: it lived here before moving down to layout

CONV_LAYOUTS = ("conv:SD", "conv:DS", "conv:HF")
DELTA_SSM_LAYOUTS = ("ssm:HVK", "ssm:HKV")  # GDN/KDA only; Mamba and lightning tags are fixed
KV_LAYOUTS = ("NHD", "HND")
ENGINES = ("vllm", "sglang", "transformers")
#: per engine: default (kv_layout, conv_layout, ssm_layout)
ENGINE_TAGS: Mapping[str, tuple[str, str, str]] = {
    "vllm": ("NHD", "conv:SD", "ssm:HVK"),
    "sglang": ("NHD", "conv:SD", "ssm:HVK"),
    "transformers": ("HND", "conv:HF", "ssm:HKV"),
}

_DTYPE_ALIASES = {"bf16": "bfloat16", "fp32": "float32", "float": "float32", "fp16": "float16",
                  "half": "float16", "fp8": "float8_e4m3fn", "fp8_e4m3": "float8_e4m3fn",
                  "fp8_e5m2": "float8_e5m2"}

Layers = list[tuple[CacheSpec, ...]]

#: the largest ``config.json`` ``read_config`` reads (real ones are a few KiB); a longer file is refused
MAX_CONFIG_BYTES = 1 << 20
#: the most layers a config may describe: what a manifest may carry (``frames.Limits.max_layers``),
#: checked before the layers are built
MAX_LAYERS = DEFAULT_LIMITS.max_layers


def normalize_dtype(value: Any, what: str = "dtype") -> str | None:
    """``"torch.bfloat16"``, ``"bf16"`` -> ``"bfloat16"``; ``None``/``"auto"`` -> ``None``."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise LayoutError(f"{what} must be a string, got {value!r}")
    name = value.removeprefix("torch.").lower()
    if name == "auto":
        return None
    name = _DTYPE_ALIASES.get(name, name)
    dtype_size(name)  # raises LayoutError for unknown names
    return name


class _Fields:
    """Typed access to one config's fields; every failure is a LayoutError naming the model type."""

    def __init__(self, raw: Mapping[str, Any], model_type: str) -> None:
        self.raw = raw
        self.model_type = model_type

    def fail(self, msg: str) -> LayoutError:
        return LayoutError(f"{self.model_type} config: {msg}")

    def num(self, key: str, default: int | None = None, minimum: int = 1) -> int:
        """An int field in ``[minimum, MAX_DIM]``: no dimension a layout on the wire may have is larger."""
        v = self.raw.get(key, default)
        if v is None:
            raise self.fail(f"missing field {key!r}")
        if isinstance(v, bool) or not isinstance(v, int) or not minimum <= v <= MAX_DIM:
            raise self.fail(f"{key!r} must be an int in [{minimum}, {MAX_DIM}], got {v!r}")
        return v

    def int_list(self, key: str, length: int | None = None) -> list[int]:
        v = self.raw.get(key)
        if not isinstance(v, list) or not all(isinstance(x, int) and not isinstance(x, bool) for x in v):
            raise self.fail(f"{key!r} must be a list of ints, got {v!r}")
        if length is not None and len(v) != length:
            raise self.fail(f"{key!r} has {len(v)} entries for {length} layers")
        return v

    def sub(self, key: str) -> _Fields:
        v = self.raw.get(key)
        if not isinstance(v, Mapping):
            raise self.fail(f"{key!r} must be an object")
        return _Fields(v, self.model_type)

    def head_dim(self, key: str = "head_dim") -> int:
        """An explicit head dim, else hidden_size / num_attention_heads."""
        if self.raw.get(key) is not None:
            return self.num(key)
        hidden, heads = self.num("hidden_size"), self.num("num_attention_heads")
        if hidden % heads:
            raise self.fail(f"no {key!r} and hidden_size {hidden} is not a multiple of {heads} heads")
        return hidden // heads


@dataclass(frozen=True)
class _Ctx:
    model_type: str
    tp: int
    kv_dtype: str
    model_dtype: str
    ssm_dtype: str | None  # explicit argument or config key; None = engine default
    engine: str
    conv_layout: str
    ssm_layout: str
    kv_layout: str

    def state_dtype(self, kind: str) -> str:
        if self.ssm_dtype is not None:
            return self.ssm_dtype
        if kind == "kda":
            return "float32"  # vLLM kda_state_dtype and SGLang both keep the recurrent state fp32
        if kind == "lightning":
            return self.model_dtype
        if self.engine in ("sglang", "transformers") or self.model_type == "nemotron_h":
            return "float32"
        return self.model_dtype

    def shard(self, n: int, what: str) -> int:
        if n % self.tp:
            raise LayoutError(f"{self.model_type}: {what}={n} is not divisible by tp_size={self.tp}")
        return n // self.tp


# --- one cache of one layer, per TP rank -------------------------------------------------------------


def _attn(ctx: _Ctx, kind: str, kv_heads: int, d_k: int, d_v: int, window: int = 0) -> CacheSpec:
    if kv_heads < ctx.tp:
        if ctx.tp % kv_heads:
            raise LayoutError(f"{ctx.model_type}: tp_size={ctx.tp} is not a multiple of {kv_heads} KV heads")
        heads, replicated = 1, True
    else:
        heads, replicated = ctx.shard(kv_heads, "num_key_value_heads"), False
    k = TensorSpec("k", (heads, d_k), ctx.kv_dtype, ctx.kv_layout, TOKEN, replicated)
    v = TensorSpec("v", (heads, d_v), ctx.kv_dtype, ctx.kv_layout, TOKEN, replicated)
    return CacheSpec(kind, (k, v), window)


def _mla(ctx: _Ctx, kv_lora_rank: int, rope_dim: int) -> CacheSpec:
    latent = TensorSpec("latent", (kv_lora_rank + rope_dim,), ctx.kv_dtype, "latent", TOKEN, ctx.tp > 1)
    return CacheSpec("mla", (latent,))


def _conv(ctx: _Ctx, parts: tuple[int, ...], rank_dim: int, kernel: int) -> TensorSpec:
    if kernel < 2:
        raise LayoutError(f"{ctx.model_type}: conv kernel {kernel} < 2 leaves no state")
    shape = {"conv:SD": (kernel - 1, rank_dim), "conv:DS": (rank_dim, kernel - 1),
             "conv:HF": (rank_dim, kernel)}[ctx.conv_layout]
    return TensorSpec("conv", shape, ctx.model_dtype, ctx.conv_layout, REQUEST, False, parts)


def _split_conv(ctx: _Ctx, parts: tuple[int, ...], kernel: int) -> TensorSpec:
    rank_dim = sum(ctx.shard(p, "conv sub-projection") for p in parts)
    return _conv(ctx, parts, rank_dim, kernel)


def _delta_state(ctx: _Ctx, kind: str, heads: int, d_k: int, d_v: int) -> TensorSpec:
    shape = (heads, d_v, d_k) if ctx.ssm_layout == "ssm:HVK" else (heads, d_k, d_v)
    return TensorSpec("ssm", shape, ctx.state_dtype(kind), ctx.ssm_layout, REQUEST)


def _gdn(ctx: _Ctx, h_k: int, h_v: int, d_k: int, d_v: int, kernel: int) -> CacheSpec:
    ctx.shard(h_k, "linear_num_key_heads")
    conv = _split_conv(ctx, (h_k * d_k, h_k * d_k, h_v * d_v), kernel)  # [q | k | v]
    state = _delta_state(ctx, "gdn", ctx.shard(h_v, "linear_num_value_heads"), d_k, d_v)
    return CacheSpec("gdn", (conv, state))


def _kda(ctx: _Ctx, heads: int, head_dim: int, kernel: int) -> CacheSpec:
    conv = _split_conv(ctx, (heads * head_dim,) * 3, kernel)  # merged [q | k | v]
    state = _delta_state(ctx, "kda", ctx.shard(heads, "num_heads"), head_dim, head_dim)
    return CacheSpec("kda", (conv, state))


def _mamba1(ctx: _Ctx, d_inner: int, d_state: int, kernel: int) -> CacheSpec:
    rank = ctx.shard(d_inner, "d_inner")
    ssm = TensorSpec("ssm", (rank, d_state), ctx.state_dtype("mamba1"), "ssm:DN", REQUEST)
    return CacheSpec("mamba1", (_conv(ctx, (d_inner,), rank, kernel), ssm))


def _mamba2(ctx: _Ctx, heads: int, head_dim: int, d_state: int, groups: int, kernel: int) -> CacheSpec:
    heads_r = ctx.shard(heads, "mamba heads")
    if groups % ctx.tp == 0:
        groups_r = groups // ctx.tp
    elif ctx.tp % groups == 0:
        groups_r = 1  # vLLM extra_groups_for_head_shards: groups padded up to tp, one per rank
    else:
        raise LayoutError(f"{ctx.model_type}: {groups} Mamba2 groups cannot be padded to tp_size={ctx.tp}")
    parts = (heads * head_dim, groups * d_state, groups * d_state)  # global [x | B | C]
    conv = _conv(ctx, parts, heads_r * head_dim + 2 * groups_r * d_state, kernel)
    ssm = TensorSpec("ssm", (heads_r, head_dim, d_state), ctx.state_dtype("mamba2"), "ssm:HPN", REQUEST)
    return CacheSpec("mamba2", (conv, ssm))


def _lightning(ctx: _Ctx, heads: int, head_dim: int) -> CacheSpec:
    shape = (ctx.shard(heads, "num_attention_heads"), head_dim, head_dim)
    state = TensorSpec("ssm", shape, ctx.state_dtype("lightning"), "ssm:HDD", REQUEST)
    return CacheSpec("lightning", (state,))


# --- model families ------------------------------------------------------------------------------------


def _gqa_of(f: _Fields, ctx: _Ctx) -> CacheSpec:
    kv = f.num("num_key_value_heads", f.raw.get("num_attention_heads"))
    d = f.head_dim()
    return _attn(ctx, "gqa", kv, d, d)


def _one_based(f: _Fields, key: str, n: int) -> set[int]:
    idx = f.int_list(key)
    if any(not 1 <= i <= n for i in idx) or len(set(idx)) != len(idx):
        raise f.fail(f"{key!r} must hold distinct 1-based layer numbers in 1..{n}, got {idx}")
    return {i - 1 for i in idx}


def _kimi_linear(f: _Fields, ctx: _Ctx) -> Layers:
    n = f.num("num_hidden_layers")
    lin = f.sub("linear_attn_config")
    full, kda = _one_based(lin, "full_attn_layers", n), _one_based(lin, "kda_layers", n)
    if full & kda or len(full | kda) != n:
        raise f.fail("full_attn_layers and kda_layers must partition the layers")
    mla = _mla(ctx, f.num("kv_lora_rank"), f.num("qk_rope_head_dim"))
    state = _kda(ctx, lin.num("num_heads"), lin.num("head_dim"), lin.num("short_conv_kernel_size"))
    return [(mla,) if i in full else (state,) for i in range(n)]


def _full_flags(f: _Fields, n: int) -> list[bool]:
    """Qwen3-Next/3.5: explicit ``layer_types`` when present, else every ``full_attention_interval``-th."""
    types = f.raw.get("layer_types")
    if types is None:
        k = f.num("full_attention_interval")
        return [(i + 1) % k == 0 for i in range(n)]
    known = {"full_attention": True, "linear_attention": False}
    if not isinstance(types, list) or len(types) != n or any(t not in known for t in types):
        raise f.fail(f"layer_types must list {n} of {sorted(known)}")
    return [known[t] for t in types]


def _qwen_gdn(f: _Fields, ctx: _Ctx) -> Layers:
    n = f.num("num_hidden_layers")
    attn = _gqa_of(f, ctx)
    gdn = _gdn(ctx, f.num("linear_num_key_heads"), f.num("linear_num_value_heads"),
               f.num("linear_key_head_dim"), f.num("linear_value_head_dim"), f.num("linear_conv_kernel_dim"))
    return [(attn,) if full else (gdn,) for full in _full_flags(f, n)]


def _minimax(f: _Fields, ctx: _Ctx) -> Layers:
    n = f.num("num_hidden_layers")
    if "attn_type_list" not in f.raw and f.model_type == "minimax_m2":
        types = [1] * n  # M2 is plain GQA throughout
    else:
        types = f.int_list("attn_type_list", n)
    if any(t not in (0, 1) for t in types):
        raise f.fail("attn_type_list entries must be 0 (lightning) or 1 (softmax)")
    attn = _gqa_of(f, ctx)
    lightning = _lightning(ctx, f.num("num_attention_heads"), f.head_dim()) if 0 in types else attn
    return [(attn,) if t == 1 else (lightning,) for t in types]


def _jamba(f: _Fields, ctx: _Ctx) -> Layers:
    n, period = f.num("num_hidden_layers"), f.num("attn_layer_period")
    offset = f.num("attn_layer_offset", minimum=0)
    if offset >= period:
        raise f.fail(f"attn_layer_offset {offset} must be below attn_layer_period {period}")
    attn = _gqa_of(f, ctx)
    mamba = _mamba1(ctx, f.num("mamba_expand") * f.num("hidden_size"), f.num("mamba_d_state"),
                    f.num("mamba_d_conv"))
    return [(attn,) if i % period == offset else (mamba,) for i in range(n)]


#: layer type names transformers 5 remaps (``configuration_utils._LEGACY_LAYER_TYPE_REMAP``)
_LEGACY_LAYER_TYPES = {"mamba": "linear_attention", "attention": "full_attention"}


def _layer_types(f: _Fields, keys: tuple[str, ...], known: tuple[str, ...], *, strict_count: bool = True
                 ) -> list[str] | None:
    """The first of ``keys`` present: a list of per-layer type names (legacy names remapped), else None.

    ``strict_count``: a ``num_hidden_layers`` that disagrees with the list is an error (transformers 5
    refuses it too); Nemotron-H ignores it, as transformers does (the list decides).
    """
    for key in keys:
        value = f.raw.get(key)
        if value is None:
            continue
        if not isinstance(value, list) or not value or not all(isinstance(t, str) for t in value):
            raise f.fail(f"{key!r} must be a non-empty list of layer type names, got {value!r}")
        types: list[str] = [_LEGACY_LAYER_TYPES.get(str(t), str(t)) for t in value]
        unknown = sorted(set(types) - set(known))
        if unknown:
            raise f.fail(f"{key!r} has unknown layer types {unknown}; known: {list(known)}")
        if strict_count and f.raw.get("num_hidden_layers") is not None and f.num("num_hidden_layers") != len(types):
            raise f.fail(f"num_hidden_layers {f.raw['num_hidden_layers']} != {len(types)} entries of {key!r}")
        return types
    return None


def _alias(f: _Fields, *keys: str, default: int | None = None) -> int:
    """The first of ``keys`` present (transformers 4 and 5 spell some Mamba fields differently)."""
    for key in keys:
        if f.raw.get(key) is not None:
            return f.num(key)
    return f.num(keys[0], default)


_NEMOTRON_CHARS = {"M": "linear_attention", "*": "full_attention", "-": "mlp", "E": "moe"}


def _nemotron_h(f: _Fields, ctx: _Ctx) -> Layers:
    known = tuple(_NEMOTRON_CHARS.values())
    types = _layer_types(f, ("layers_block_type", "layer_types"), known, strict_count=False)
    if types is None:  # transformers 4 configs
        n, pattern = f.num("num_hidden_layers"), f.raw.get("hybrid_override_pattern")
        if not isinstance(pattern, str) or len(pattern) != n or set(pattern) - set(_NEMOTRON_CHARS):
            raise f.fail(f"hybrid_override_pattern must be {n} characters of M * - E, got {pattern!r}")
        types = [_NEMOTRON_CHARS[c] for c in pattern]
    kv = f.num("num_key_value_heads", f.raw.get("num_attention_heads"))
    d = f.head_dim("head_dim") if f.raw.get("head_dim") is not None else f.head_dim("attention_head_dim")
    attn = _attn(ctx, "gqa", kv, d, d)
    mamba = _mamba2(ctx, f.num("mamba_num_heads"), f.num("mamba_head_dim"), f.num("ssm_state_size"),
                    _alias(f, "n_groups", "mamba_n_groups"), _alias(f, "conv_kernel", "mamba_d_conv")
                    ) if "linear_attention" in types else attn
    by_type: dict[str, tuple[CacheSpec, ...]] = {"linear_attention": (mamba,), "full_attention": (attn,),
                                                 "mlp": (), "moe": ()}
    return [by_type[t] for t in types]


def _granite_hybrid(f: _Fields, ctx: _Ctx) -> Layers:
    """IBM Granite 4.0-H (``granitemoehybrid``): Mamba2 and attention layers listed in ``layer_types``."""
    types = _layer_types(f, ("layer_types", "layers_block_type"), ("linear_attention", "full_attention"))
    if types is None:  # transformers' default: every layer Mamba2
        types = ["linear_attention"] * f.num("num_hidden_layers")
    heads = f.num("mamba_n_heads")
    head_dim = f.raw.get("mamba_d_head", "auto")
    if head_dim in ("auto", None):
        inner = f.num("mamba_expand", 2) * f.num("hidden_size")
        if inner % heads:
            raise f.fail(f"mamba_n_heads {heads} does not divide mamba_expand * hidden_size = {inner}")
        head_dim = inner // heads
    else:
        head_dim = f.num("mamba_d_head")
    mamba = _mamba2(ctx, heads, head_dim, f.num("mamba_d_state"), f.num("mamba_n_groups", 1), f.num("mamba_d_conv"))
    attn = _gqa_of(f, ctx)
    return [(mamba,) if t == "linear_attention" else (attn,) for t in types]


def _zamba2(f: _Fields, ctx: _Ctx) -> Layers:
    """Zamba2: Mamba2 layers; ``hybrid`` layers run the shared attention block, then their own Mamba2.

    A hybrid layer caches attention K/V (its own, the block's weights are shared) and a Mamba2 state.
    The attention works on ``[hidden | embeddings]``, so its head dim defaults to 2 * hidden / heads.
    """
    types = _layer_types(f, ("layers_block_type", "layer_types"), ("linear_attention", "hybrid"))
    if types is None:
        raise f.fail("needs 'layers_block_type' (one of mamba / hybrid per layer)")
    hidden, q_heads = f.num("hidden_size"), f.num("num_attention_heads")
    heads = f.num("n_mamba_heads")
    if f.raw.get("mamba_headdim") is not None:
        head_dim = f.num("mamba_headdim")
    else:
        inner = f.num("mamba_expand", 2) * hidden
        if inner % heads:
            raise f.fail(f"n_mamba_heads {heads} does not divide mamba_expand * hidden_size = {inner}")
        head_dim = inner // heads
    mamba = _mamba2(ctx, heads, head_dim, f.num("mamba_d_state"), f.num("mamba_ngroups", 1), f.num("mamba_d_conv"))
    if "hybrid" not in types:
        return [(mamba,)] * len(types)
    d = f.num("attention_head_dim") if f.raw.get("attention_head_dim") is not None else 2 * hidden // q_heads
    attn = _attn(ctx, "gqa", f.num("num_key_value_heads", q_heads), d, d)
    return [(attn, mamba) if t == "hybrid" else (mamba,) for t in types]


def _falcon_h1(f: _Fields, ctx: _Ctx) -> Layers:
    heads, head_dim = f.num("mamba_n_heads"), f.num("mamba_d_head")
    if f.raw.get("mamba_d_ssm") is not None and f.num("mamba_d_ssm") != heads * head_dim:
        raise f.fail("mamba_d_ssm must equal mamba_n_heads * mamba_d_head")
    mamba = _mamba2(ctx, heads, head_dim, f.num("mamba_d_state"), f.num("mamba_n_groups"),
                    f.num("mamba_d_conv"))
    return [(_gqa_of(f, ctx), mamba)] * f.num("num_hidden_layers")  # attention and Mamba2 in every layer


def _mimo_v2_flash(f: _Fields, ctx: _Ctx) -> Layers:
    pattern = f.int_list("hybrid_layer_pattern", f.num("num_hidden_layers"))
    if any(p not in (0, 1) for p in pattern):
        raise f.fail("hybrid_layer_pattern entries must be 0 (global) or 1 (sliding window)")
    full = _attn(ctx, "gqa", f.num("num_key_value_heads"), f.num("head_dim"), f.num("v_head_dim"))
    swa = _attn(ctx, "swa", f.num("swa_num_key_value_heads"), f.num("swa_head_dim"), f.num("swa_v_head_dim"),
                f.num("sliding_window")) if 1 in pattern else full
    return [(swa,) if p else (full,) for p in pattern]


def _bailing_linear(f: _Fields, ctx: _Ctx) -> Layers:
    n, group = f.num("num_hidden_layers"), f.num("layer_group_size")
    attn = _gqa_of(f, ctx)
    lightning = _lightning(ctx, f.num("num_attention_heads"), f.head_dim())  # state heads = q heads
    tail = (n // group) * group  # trailing layers past the last whole group are full attention
    return [(attn,) if (i + 1) % group == 0 or i >= tail else (lightning,) for i in range(n)]


def _pure_mamba2(f: _Fields, ctx: _Ctx) -> Layers:
    mamba = _mamba2(ctx, f.num("num_heads"), f.num("head_dim"), f.num("state_size"), f.num("n_groups", 1),
                    f.num("conv_kernel"))
    return [(mamba,)] * f.num("num_hidden_layers")


def _dense(f: _Fields, ctx: _Ctx) -> Layers:
    return [(_gqa_of(f, ctx),)] * f.num("num_hidden_layers")


def _deepseek(f: _Fields, ctx: _Ctx) -> Layers:
    return [(_mla(ctx, f.num("kv_lora_rank"), f.num("qk_rope_head_dim")),)] * f.num("num_hidden_layers")


_BUILDERS: Mapping[str, Callable[[_Fields, _Ctx], Layers]] = {
    "kimi_linear": _kimi_linear,
    **dict.fromkeys(("qwen3_next", "qwen3_5", "qwen3_5_moe", "qwen3_5_text", "qwen3_5_moe_text"), _qwen_gdn),
    **dict.fromkeys(("minimax", "minimax_m1", "minimax_text_01", "minimax_m2"), _minimax),
    "jamba": _jamba,
    "nemotron_h": _nemotron_h,
    "granitemoehybrid": _granite_hybrid,
    "zamba2": _zamba2,
    "falcon_h1": _falcon_h1,
    "mimo_v2_flash": _mimo_v2_flash,
    **dict.fromkeys(("bailing_moe_linear", "bailing_moe_linear_v2"), _bailing_linear),
    "mamba2": _pure_mamba2,
    **dict.fromkeys(("llama", "mistral", "qwen2", "qwen3"), _dense),
    **dict.fromkeys(("deepseek_v3", "deepseek_v2"), _deepseek),
}

SUPPORTED_MODEL_TYPES = tuple(sorted(_BUILDERS))


def read_config(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The JSON object in ``path`` (a directory means its ``config.json``); LayoutError otherwise.

    Only a regular file is read (a FIFO or a device is refused without blocking on it), and at most
    ``MAX_CONFIG_BYTES`` of it."""
    p = Path(path)
    if p.is_dir():
        p = p / "config.json"
    try:  # O_NONBLOCK: opening a FIFO must not wait for a writer; fstat then refuses it
        fd = os.open(p, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise LayoutError(f"no config file at {str(path)!r}") from None
    except OSError as e:
        raise LayoutError(f"cannot read config {str(p)!r}: {e}") from None
    try:
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise LayoutError(f"config {str(p)!r} is not a regular file")
            data = f.read(MAX_CONFIG_BYTES + 1)
        if len(data) > MAX_CONFIG_BYTES:
            raise LayoutError(f"config {str(p)!r} is larger than {MAX_CONFIG_BYTES} bytes")
        config = json.loads(data.decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise LayoutError(f"cannot read config {str(p)!r}: {type(e).__name__}: {e}") from None
    if not isinstance(config, dict):
        raise LayoutError(f"config {str(p)!r} is not a JSON object")
    return config


def config_dict(config: Any) -> dict[str, Any]:
    """A plain dict of a config given as a mapping, a ``config.json`` path or a ``PretrainedConfig``.

    A ``PretrainedConfig`` (anything with ``to_dict()`` and a ``model_type``) is read through
    ``to_dict()``, which is what ``save_pretrained`` writes, so a live config and its file agree.
    """
    if isinstance(config, Mapping):
        return dict(config)
    if isinstance(config, (str, os.PathLike)):
        return read_config(config)
    to_dict = getattr(config, "to_dict", None)
    if callable(to_dict) and isinstance(getattr(config, "model_type", None), str):
        d = to_dict()
        if not isinstance(d, Mapping):
            raise LayoutError(f"{type(config).__name__}.to_dict() returned {type(d).__name__}, not a mapping")
        return dict(d)
    raise LayoutError(f"config must be a mapping, a config.json path or a PretrainedConfig, "
                      f"got {type(config).__name__}")


def layout_from_hf_config(
    config: Any,
    *,
    tp_size: int = 1,
    tp_rank: int = 0,
    block_size: int | None = None,
    ssm_dtype: str | None = None,
    kv_dtype: str | None = None,
    model_dtype: str | None = None,
    conv_layout: str | None = None,
    ssm_layout: str | None = None,
    kv_layout: str | None = None,
    engine: str = "vllm",
    name: str | None = None,
    align: int = 16,
) -> ModelLayout:
    """The cache layout of one TP rank of the model ``config`` describes.

    ``config``: a dict, a path to a ``config.json`` (or its directory) or a ``PretrainedConfig``.
    ``engine`` picks the default layout tags (``ENGINE_TAGS``) and state dtypes; ``kv_layout``,
    ``conv_layout`` and ``ssm_layout`` (GDN/KDA) override the tags, ``model_dtype`` the config's dtype
    (a model built from a config without one runs in float32), ``kv_dtype`` the KV dtype.
    ``block_size=None`` takes ``hybrid_block_size(layout, align)``. Fields nested under ``text_config``
    (Qwen3.5 VLM wrappers) take precedence over top-level ones.
    """
    config = config_dict(config)
    model_type = config.get("model_type")
    if not isinstance(model_type, str) or model_type not in _BUILDERS:
        supported = ", ".join(SUPPORTED_MODEL_TYPES)
        raise LayoutError(f"unsupported model_type {model_type!r}; supported: {supported}")
    raw = dict(config)
    if isinstance(config.get("text_config"), Mapping):
        raw.update(config["text_config"])
    if isinstance(tp_size, bool) or not isinstance(tp_size, int) or tp_size < 1:
        raise LayoutError(f"tp_size must be a positive int, got {tp_size!r}")
    if engine not in ENGINES:
        raise LayoutError(f"engine must be one of {ENGINES}, got {engine!r}")
    default_kv, default_conv, default_ssm = ENGINE_TAGS[engine]
    kv_layout = default_kv if kv_layout is None else kv_layout
    conv_layout = default_conv if conv_layout is None else conv_layout
    ssm_layout = default_ssm if ssm_layout is None else ssm_layout
    if kv_layout not in KV_LAYOUTS:
        raise LayoutError(f"kv_layout must be one of {KV_LAYOUTS}, got {kv_layout!r}")
    if conv_layout not in CONV_LAYOUTS:
        raise LayoutError(f"conv_layout must be one of {CONV_LAYOUTS}, got {conv_layout!r}")
    if ssm_layout not in DELTA_SSM_LAYOUTS:
        raise LayoutError(f"ssm_layout must be one of {DELTA_SSM_LAYOUTS}, got {ssm_layout!r}")
    mdt = normalize_dtype(model_dtype, "model_dtype") or normalize_dtype(
        raw.get("torch_dtype", raw.get("dtype")), "torch_dtype") or "bfloat16"
    kv = normalize_dtype(kv_dtype, "kv_dtype") or (mdt if engine == "transformers" else "bfloat16")
    config_ssm = raw.get("mamba_ssm_dtype", raw.get("mamba_ssm_cache_dtype"))
    ctx = _Ctx(
        model_type=str(model_type),
        tp=tp_size,
        kv_dtype=kv,
        model_dtype=mdt,
        ssm_dtype=normalize_dtype(ssm_dtype, "ssm_dtype") or normalize_dtype(config_ssm, "mamba_ssm_dtype"),
        engine=engine,
        conv_layout=conv_layout,
        ssm_layout=ssm_layout,
        kv_layout=kv_layout,
    )
    _check_layer_count(raw, str(model_type))
    layers = _BUILDERS[ctx.model_type](_Fields(raw, ctx.model_type), ctx)
    if len(layers) > MAX_LAYERS:
        raise LayoutError(f"{model_type} config describes {len(layers)} layers; at most {MAX_LAYERS} are supported")
    if not layers:
        raise LayoutError(f"{model_type} config describes no layers")
    label = name if name is not None else str(raw.get("_name_or_path") or model_type)
    layout = ModelLayout(label, tuple(LayerSpec(i, c) for i, c in enumerate(layers)), 16, tp_size, tp_rank)
    if block_size is None:
        block_size = hybrid_block_size(layout, align)
    return replace(layout, block_size=block_size)


#: the fields whose value (a count, or a per-layer list or string) sets how many layers a config has
_LAYER_COUNT_FIELDS = ("num_hidden_layers", "layer_types", "layers_block_type", "hybrid_override_pattern",
                       "hybrid_layer_pattern", "attn_type_list")


def _check_layer_count(raw: Mapping[str, Any], model_type: str) -> None:
    """LayoutError when a field that sets the layer count asks for more than ``MAX_LAYERS``, before anything
    is built: building ten million layers takes a CPU for many seconds."""
    for key in _LAYER_COUNT_FIELDS:
        v = raw.get(key)
        n = v if isinstance(v, int) and not isinstance(v, bool) else len(v) if isinstance(v, (list, str)) else 0
        if n > MAX_LAYERS:
            raise LayoutError(f"{model_type} config: {key!r} asks for {n} layers; at most {MAX_LAYERS} are supported")


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def hybrid_block_size(layout: ModelLayout, align: int = 16, mode: str = "align", chunk: int = 256) -> int:
    """vLLM's attention block size (tokens) once attention and state pages are unified.

    ``attn1`` = per-token bytes of one attention layer on this rank, ``page`` = state bytes of one
    linear layer on this rank. Modes ``none``/``align``: ``align * cdiv(page, align * attn1)``; mode
    ``all``: ``u * cdiv(cdiv(page, attn1), u)`` with ``u = lcm(chunk, align)``. A model without both an
    attention and a state side needs no unification and gets ``align``.
    """
    if align < 1 or chunk < 1:
        raise LayoutError("align and chunk must be positive")
    caches = [c for layer in layout.layers for c in layer.caches]
    attn = {c.nbytes for c in caches if c.kind in ("gqa", "mla")}
    pages = [c.nbytes for c in caches if c.indexing == REQUEST]
    if not attn or not pages:
        return align
    if len(attn) > 1:
        raise LayoutError(f"attention layers differ in bytes per token {sorted(attn)}; one attn1 is assumed")
    attn1, page = attn.pop(), max(pages)
    if mode in ("none", "align"):
        return align * _cdiv(page, align * attn1)
    if mode == "all":
        unit = math.lcm(chunk, align)
        return unit * _cdiv(_cdiv(page, attn1), unit)
    raise LayoutError(f"mode must be 'none', 'align' or 'all', got {mode!r}")
