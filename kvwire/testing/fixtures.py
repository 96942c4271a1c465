"""Small, structurally faithful test models (F1-F9) and deterministic payloads for them (test-only).

Owns: the tiny HF-style configs of the fixtures (each built through ``hf.py``, so fixtures exercise the
config path too), the default request (T=1000, resumed at 999), seeded per-segment payload bytes and
index-coded arrays for layout tests. Must not know: sockets, threads, clocks, torch, or how payloads
travel. Test and benchmark code only: nothing in ``kvwire`` proper imports it (it lived in ``kvwire.codec``
before; ``kvwire.codec.fixtures`` is a deprecated alias).

Payload bytes are a pure function of (layout name, layer, segment name, request id, seed): the RNG
seed is a BLAKE2b digest, never Python's salted ``hash()``. Token-indexed tensors are generated in
chunks of ``CHUNK_TOKENS`` tokens keyed by chunk number, so the bytes of a token do not depend on
which token range a request ships: a prefix-hit payload is the tail of the full one.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..codec.hf import layout_from_hf_config
from ..codec.layout import TOKEN, ModelLayout, RequestSpec, TensorSpec, plan_segments
from ..errors import LayoutError

DEFAULT_TOKENS = 1000  # not a multiple of any block size: the last block is partial
DEFAULT_STATE_POSITION = 999  # the vLLM N-1 resume point
CHUNK_TOKENS = 64


@dataclass(frozen=True)
class Fixture:
    """A tiny model: its HF-style config and the ``layout_from_hf_config`` options it is built with."""

    name: str
    mimics: str
    config: Mapping[str, Any]
    options: Mapping[str, Any] = field(default_factory=dict)


def _kimi(layers: int, full: list[int]) -> dict[str, Any]:
    kda = [i for i in range(1, layers + 1) if i not in full]
    return {"model_type": "kimi_linear", "num_hidden_layers": layers, "hidden_size": 128,
            "num_attention_heads": 4, "kv_lora_rank": 64, "qk_rope_head_dim": 16,
            "linear_attn_config": {"num_heads": 4, "head_dim": 32, "short_conv_kernel_size": 4,
                                   "full_attn_layers": full, "kda_layers": kda}}


_GQA_4_2_32 = {"hidden_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32}
_FP32_SSM = {"ssm_dtype": "float32"}

_ALL = [
    Fixture("tiny-kimi-linear", "Kimi Linear: KDA + MLA, 1-based layer lists", _kimi(8, [4, 8])),
    Fixture("tiny-kimi-linear-irregular", "Kimi's non-periodic tail (K K K F K K F)", _kimi(7, [4, 7])),
    Fixture("tiny-qwen3-next", "Qwen3-Next/3.5 GDN + GQA, asymmetric d_k=32, d_v=48", {
        "model_type": "qwen3_next", "num_hidden_layers": 8, "hidden_size": 256, "full_attention_interval": 4,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64,
        "linear_num_key_heads": 2, "linear_num_value_heads": 4, "linear_key_head_dim": 32,
        "linear_value_head_dim": 48, "linear_conv_kernel_dim": 4, "mamba_ssm_dtype": "float32",
    }, {"conv_layout": "conv:DS"}),
    Fixture("tiny-nemotron-h", "Nemotron-H: Mamba2 + GQA + cache-less MLP layers", {
        "model_type": "nemotron_h", "num_hidden_layers": 8, "hybrid_override_pattern": "M-M*M-M*",
        **_GQA_4_2_32,
        "mamba_num_heads": 8, "mamba_head_dim": 16, "ssm_state_size": 32, "n_groups": 2, "conv_kernel": 4,
    }),
    Fixture("tiny-jamba", "Jamba: Mamba1 + GQA at offset 4", {
        "model_type": "jamba", "num_hidden_layers": 8, "hidden_size": 128, "num_attention_heads": 4,
        "num_key_value_heads": 2, "attn_layer_period": 8, "attn_layer_offset": 4,
        "mamba_d_state": 16, "mamba_d_conv": 4, "mamba_expand": 2,
    }, _FP32_SSM),
    Fixture("tiny-lightning", "MiniMax-M1 / Ring-linear: lightning state, no conv", {
        "model_type": "minimax", "num_hidden_layers": 8, **_GQA_4_2_32, "attn_type_list": [0, 0, 0, 1] * 2,
    }, _FP32_SSM),
    Fixture("tiny-mimo-swa", "MiMo-V2-Flash: global + SWA, K/V head dims differ", {
        "model_type": "mimo_v2_flash", "num_hidden_layers": 6, "hidden_size": 128, "num_attention_heads": 4,
        "num_key_value_heads": 1, "head_dim": 48, "v_head_dim": 32, "swa_num_attention_heads": 4,
        "swa_num_key_value_heads": 2, "swa_head_dim": 48, "swa_v_head_dim": 32, "sliding_window": 32,
        "add_swa_attention_sink_bias": True, "hybrid_layer_pattern": [0, 1, 1, 1, 1, 0],
    }),
    Fixture("tiny-falcon-h1", "Falcon-H1: attention and Mamba2 in every layer", {
        "model_type": "falcon_h1", "num_hidden_layers": 4, **_GQA_4_2_32, "mamba_d_ssm": 64,
        "mamba_n_heads": 4, "mamba_d_head": 16, "mamba_d_state": 32, "mamba_n_groups": 1, "mamba_d_conv": 4,
    }, _FP32_SSM),
    Fixture("tiny-llama", "dense GQA baseline (zero state)", {
        "model_type": "llama", "num_hidden_layers": 4, "hidden_size": 256, "num_attention_heads": 4,
        "num_key_value_heads": 2,
    }),
    Fixture("tiny-deepseek-mla", "DeepSeek-V3 MLA (zero state)", {
        "model_type": "deepseek_v3", "num_hidden_layers": 4, "kv_lora_rank": 64, "qk_rope_head_dim": 16,
    }),
    Fixture("tiny-mamba2", "pure Mamba2 (zero KV), F3 dims", {
        "model_type": "mamba2", "num_hidden_layers": 4, "hidden_size": 64, "expand": 2, "num_heads": 8,
        "head_dim": 16, "state_size": 32, "n_groups": 2, "conv_kernel": 4,
    }, _FP32_SSM),
]

FIXTURES: Mapping[str, Fixture] = {f.name: f for f in _ALL}


def load_fixture(name: str, **overrides: Any) -> ModelLayout:
    """The fixture's layout; ``overrides`` (tp_size, conv_layout, ssm_dtype, ...) replace its options."""
    try:
        fx = FIXTURES[name]
    except KeyError:
        raise LayoutError(f"unknown fixture {name!r}; known: {', '.join(FIXTURES)}") from None
    options = {**fx.options, **overrides, "name": name}
    return layout_from_hf_config(fx.config, **options)


def default_request(
    request_id: str = "req-0",
    num_tokens: int = DEFAULT_TOKENS,
    state_position: int = DEFAULT_STATE_POSITION,
    prefix_hit: Mapping[str, int] | None = None,
) -> RequestSpec:
    return RequestSpec(request_id, num_tokens, state_position, dict(prefix_hit or {}))


def _rng(*key: object) -> np.random.Generator:
    digest = hashlib.blake2b("\x1f".join(map(str, key)).encode(), digest_size=16).digest()
    return np.random.Generator(np.random.PCG64(int.from_bytes(digest, "little")))


def _random_bytes(rng: np.random.Generator, count: int, dtype: str) -> np.ndarray:
    """``count`` finite values of ``dtype`` as raw little-endian bytes (no NaN/inf patterns)."""
    if dtype in ("float32", "float16", "bfloat16"):
        x = rng.standard_normal(count, dtype=np.float32)
        if dtype == "float16":
            return x.astype(np.float16).view(np.uint8)
        if dtype == "bfloat16":
            return (x.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8)
        return x.view(np.uint8)
    raw = rng.integers(0, 256, count, dtype=np.uint8)
    if dtype == "float8_e4m3fn":
        raw[(raw & 0x7F) == 0x7F] ^= 1  # S.1111.111 is NaN
    elif dtype == "float8_e5m2":
        raw[(raw & 0x7C) == 0x7C] &= 0xBF  # exponent 11111 is inf/NaN
    return raw


def _token_bytes(spec: TensorSpec, start: int, count: int, key: tuple[object, ...]) -> np.ndarray:
    per_token = spec.nbytes // spec.itemsize
    first, last = start // CHUNK_TOKENS, (start + count - 1) // CHUNK_TOKENS
    chunks = [_random_bytes(_rng(*key, "chunk", c), CHUNK_TOKENS * per_token, spec.dtype)
              for c in range(first, last + 1)]
    offset = (start - first * CHUNK_TOKENS) * spec.nbytes
    return np.concatenate(chunks)[offset : offset + count * spec.nbytes]


def fixture_payload(layout: ModelLayout, request: RequestSpec, seed: int = 0) -> list[np.ndarray]:
    """One flat uint8 array per segment of ``plan_segments(layout, request)``, in order.

    Each holds the segment's wire bytes (view a float32 tensor with ``.view(numpy.float32)``; bfloat16
    is the upper half of a float32, view it as uint16).
    """
    out: list[np.ndarray] = []
    for seg in plan_segments(layout, request):
        spec = layout.layers[seg.layer].caches[seg.cache].tensors[seg.tensor]
        key = (layout.name, seg.layer, seg.name, request.request_id, seed)
        if spec.indexing == TOKEN:
            data = _token_bytes(spec, seg.token_start, seg.token_count, key)
        else:
            data = _random_bytes(_rng(*key), spec.nbytes // spec.itemsize, spec.dtype)
        assert data.nbytes == seg.nbytes, (seg.name, data.nbytes, seg.nbytes)
        out.append(np.ascontiguousarray(data))
    return out


def payload_digests(arrays: list[np.ndarray]) -> list[str]:
    """sha256 hex digest of each array's raw bytes."""
    return [hashlib.sha256(np.ascontiguousarray(a).view(np.uint8).data).hexdigest() for a in arrays]


def index_coded(shape: tuple[int, ...], base: int = 64) -> np.ndarray:
    """A float32 array whose value encodes its index: ``sum(i_d * base**(ndim-1-d))``.

    With the default base, a (H, V, K) state holds ``h*4096 + v*64 + k``. Every axis but the first
    must be at most ``base`` and every value below 2**24, so each value is exact in float32 and a
    transposed or mis-strided copy shows up as a wrong value.
    """
    if not shape or any(d < 1 for d in shape) or any(d > base for d in shape[1:]):
        raise LayoutError(f"index coding needs positive dims, all but the first <= {base}: {shape}")
    if shape[0] * base ** (len(shape) - 1) > 1 << 24:
        raise LayoutError(f"index coding of {shape} with base {base} is not exact in float32")
    grids = np.indices(shape, dtype=np.int64)
    codes = sum(g * base ** (len(shape) - 1 - d) for d, g in enumerate(grids))
    return np.asarray(codes, dtype=np.float32)
