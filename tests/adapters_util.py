"""Shared helpers of the adapter tests: small hybrid layouts and byte comparisons of engine caches."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from kvwire.codec.layout import CacheSpec, LayerSpec, ModelLayout, TensorSpec

TOKEN, REQUEST = "token", "request"


def gqa(heads: int = 2, dim: int = 32, dtype: str = "bfloat16") -> CacheSpec:
    return CacheSpec("gqa", (TensorSpec("k", (heads, dim), dtype, "NHD", TOKEN),
                             TensorSpec("v", (heads, dim), dtype, "NHD", TOKEN)))


def gdn(conv_dim: int = 48, width: int = 4, heads: int = 2, k: int = 8, v: int = 8) -> CacheSpec:
    return CacheSpec("gdn", (TensorSpec("conv", (width - 1, conv_dim), "bfloat16", "conv:SD", REQUEST),
                             TensorSpec("ssm", (heads, k, v), "float32", "ssm:HKV", REQUEST)))


def hybrid_layout(pattern: str = "ggag" * 2, block_size: int = 32) -> ModelLayout:
    """``g``: a GDN layer, ``a``: a full-attention layer, ``m``: a cache-less (MoE/MLP) layer."""
    layers = []
    for i, c in enumerate(pattern):
        caches = {"g": (gdn(),), "a": (gqa(),), "m": ()}[c]
        layers.append(LayerSpec(i, caches))
    return ModelLayout("tiny-hybrid", tuple(layers), block_size=block_size)


def region_bytes(t: Any) -> bytes:
    return bytes(t.contiguous().view(-1).view(__import__("torch").uint8).numpy().tobytes())


def diff_blocks(a: Mapping[int, Sequence[Any]], b: Mapping[int, Sequence[Any]]) -> list[str]:
    """Names of the regions whose bytes differ between two ``{layer: [tensor views]}`` maps."""
    out = []
    for layer in sorted(a):
        for i, (x, y) in enumerate(zip(a[layer], b[layer])):
            if region_bytes(x) != region_bytes(y):
                out.append(f"layer {layer} tensor {i}")
    return out


def request_views(cache: Any, tables: Mapping[int, Sequence[int]], slots: Mapping[int, int], tokens: int
                  ) -> dict[int, list[Any]]:
    """Per layer, the engine views of one request's first ``tokens`` tokens (by block table) and states."""
    bs = cache.block_size
    out: dict[int, list[Any]] = {}
    for st in cache.storages():
        if st.token_indexed:
            table = tables[st.layer]
            for view in st.paged_views():
                out.setdefault(st.layer, []).extend(
                    view[table[p // bs], p % bs] for p in range(tokens))
        else:
            out.setdefault(st.layer, []).extend(v[slots[st.layer]] for v in st.slot_views())
    return out


def poll_until(*boxes: Any, count: int = 1, timeout: float = 30.0) -> list[Any]:
    """Poll outboxes/inboxes until ``count`` leases ended in all (or the timeout); the ended ones."""
    import time

    ended: list[Any] = []
    deadline = time.monotonic() + timeout
    while len(ended) < count and time.monotonic() < deadline:
        for b in boxes:
            ended += b.poll()
        time.sleep(0.005)
    return ended
