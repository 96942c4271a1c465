"""vLLM's hybrid KV cache, read from vLLM's own objects: the kvwire layout and the engine tensors behind it.

Owns: ``VllmCacheMap`` — from a vLLM ``KVCacheConfig`` (its ``kv_cache_groups``: layer names and one
``KVCacheSpec`` per group), the ``ModelLayout`` both sides of a transfer agree on, which kvwire layer each
vLLM layer name is, the engine groups as ``GroupTables``, and (``paged_cache``) the ``PagedCache`` over the
tensors vLLM hands ``register_kv_caches``.

The engine tensors, as vLLM 0.32 lays them out (``vllm/v1/kv_cache_interface.create_kv_cache_views``):

* attention layers: a ``[blocks, kv_heads, block_size, 2 * head_size]`` view in the cache dtype; the CPU
  backend (``cpu_attn.py``) reads each ``(block, head)`` page as ``K[block_size, head_size]`` followed by
  ``V[block_size, head_size]``, i.e. split K and V in HND order — which is how they are described here;
* Mamba-like layers (GDN, Mamba1/2, linear attention): a raw ``int8 [blocks, 1, 1, bytes]`` page view whose
  pages hold the states back to back (``MambaBase.bind_kv_cache``: conv then ssm), each ``(blocks, *shape)``
  in its dtype; a request holds one block per Mamba group, its layers' state slot.

All layers alias one buffer; groups never share a block id. Duck-typed: vLLM is not imported here, so the
contract tests build the same objects without it. Must not know: the connector's call order, sockets.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ..codec.layout import REQUEST, TOKEN, CacheSpec, LayerSpec, ModelLayout, TensorSpec
from ..errors import LayoutError, LayoutMismatch
from .lifecycle import GroupTables

#: vLLM ``MambaAttentionBackendEnum`` member name -> kvwire cache kind and ssm layout tag
MAMBA_KINDS: Mapping[str, tuple[str, str]] = {
    "GDN_ATTN": ("gdn", "ssm:HVK"),  # (v_heads, head_v_dim, head_k_dim)
    "MAMBA2": ("mamba2", "ssm:HPN"),
    "MAMBA1": ("mamba1", "ssm:DN"),
    "LINEAR": ("lightning", "ssm:HDD"),
}


def layer_index(name: str) -> int:
    """The decoder layer a vLLM layer name belongs to (its one integer part, as vLLM's
    ``extract_layer_index``): ``model.layers.3.self_attn.attn`` -> 3."""
    ints = [int(p) for p in name.split(".") if p.isdigit()]
    if len(ints) != 1:
        raise LayoutError(f"layer name {name!r} should contain exactly one integer")
    return ints[0]


def _dtype(dt: Any) -> str:
    return str(dt).removeprefix("torch.")


def _is_mamba(spec: Any) -> bool:
    return hasattr(spec, "shapes") and hasattr(spec, "dtypes")


def _cache_spec(spec: Any, conv_layout: str) -> CacheSpec:
    """kvwire's description of one layer's cache, from its vLLM ``KVCacheSpec``."""
    if _is_mamba(spec):
        mtype = getattr(spec.mamba_type, "name", str(spec.mamba_type))
        if mtype not in MAMBA_KINDS:
            raise LayoutError(f"Mamba-like cache type {mtype} is not supported; known: {sorted(MAMBA_KINDS)}")
        kind, ssm_tag = MAMBA_KINDS[mtype]
        if len(spec.shapes) != 2:
            raise LayoutError(f"{kind}: {len(spec.shapes)} state tensors; conv and ssm expected")
        (conv, ssm), (cdt, sdt) = spec.shapes, spec.dtypes
        return CacheSpec(kind, (TensorSpec("conv", tuple(conv), _dtype(cdt), f"conv:{conv_layout}", REQUEST),
                                TensorSpec("ssm", tuple(ssm), _dtype(sdt), ssm_tag, REQUEST)))
    if hasattr(spec, "num_kv_heads") and hasattr(spec, "head_size"):
        if type(spec).__name__.startswith("MLA"):
            raise LayoutError("MLA caches are not supported by the vLLM adapter yet")
        head_v = getattr(spec, "head_size_v", None) or spec.head_size
        if head_v != spec.head_size:
            raise LayoutError("K and V head sizes differ: not supported by the vLLM adapter yet")
        shape = (int(spec.num_kv_heads), int(spec.head_size))
        tensors = (TensorSpec("k", shape, _dtype(spec.dtype), "NHD", TOKEN),
                   TensorSpec("v", shape, _dtype(spec.dtype), "NHD", TOKEN))
        window = getattr(spec, "sliding_window", None)
        return CacheSpec("swa", tensors, int(window)) if window else CacheSpec("gqa", tensors)
    raise LayoutError(f"KV cache spec {type(spec).__name__} is not supported by the vLLM adapter")


class VllmCacheMap:
    """The kvwire view of one vLLM instance's KV cache (one TP rank). See the module docstring."""

    def __init__(self, kv_cache_config: Any, *, conv_layout: str = "SD", name: str = "vllm",
                 tp_size: int = 1, tp_rank: int = 0) -> None:
        if conv_layout not in ("SD", "DS"):
            raise LayoutError(f"conv layout must be SD or DS, not {conv_layout!r}")
        self.kv_cache_config = kv_cache_config
        self.group_names: list[list[str]] = []
        self.layer_of: dict[str, int] = {}
        self.spec_of: dict[str, Any] = {}
        caches: dict[int, CacheSpec] = {}
        block_sizes = set()
        for g in kv_cache_config.kv_cache_groups:
            names = list(g.layer_names)
            self.group_names.append(names)
            for n in names:
                spec = g.kv_cache_spec
                per_layer = getattr(spec, "kv_cache_specs", None)  # UniformTypeKVCacheSpecs
                spec = per_layer[n] if per_layer is not None else spec
                idx = layer_index(n)
                if idx in caches:
                    raise LayoutError(f"two cached layers at decoder layer {idx} ({n})")
                caches[idx] = _cache_spec(spec, conv_layout)
                self.layer_of[n] = idx
                self.spec_of[n] = spec
                if not _is_mamba(spec):
                    block_sizes.add(int(spec.block_size))
        if not caches:
            raise LayoutError("the KV cache config has no layers")
        if len(block_sizes) > 1:
            raise LayoutError(f"attention groups with different block sizes {sorted(block_sizes)}")
        self.block_size = block_sizes.pop() if block_sizes else 1
        layers = tuple(LayerSpec(i, (caches[i],) if i in caches else ()) for i in range(max(caches) + 1))
        self.layout = ModelLayout(name, layers, block_size=self.block_size, tp_size=tp_size, tp_rank=tp_rank)
        self.groups = GroupTables(self.layout, [[self.layer_of[n] for n in names] for names in self.group_names])

    @property
    def has_state(self) -> bool:
        return any(self.groups.state_groups)

    def tables(self, block_ids: Sequence[Sequence[int]]) -> tuple[dict[int, list[int]], dict[int, int]]:
        """Per-layer block tables and state slots from vLLM's per-group block ids."""
        return self.groups.tables(block_ids)

    def storages(self, kv_caches: Mapping[str, Any]) -> list[Any]:
        """``CacheStorage`` of every layer over the tensors vLLM gave ``register_kv_caches``."""
        from ..cuda import CacheStorage

        out = []
        for name, idx in self.layer_of.items():
            if name not in kv_caches:
                raise LayoutMismatch(f"no KV cache tensor registered for layer {name}")
            spec = self.layout.layers[idx].caches[0]
            t = kv_caches[name]
            if spec.indexing == REQUEST:
                out.append(CacheStorage(idx, 0, spec, "slots", tuple(mamba_state_views(t, spec))))
            else:
                k, v = attention_kv_views(t, self.block_size, spec.tensors[0].shape)
                out.append(CacheStorage(idx, 0, spec, "split", (k, v), "HND"))
        return out

    def paged_cache(self, kv_caches: Mapping[str, Any]) -> Any:
        from ..cuda import PagedCache

        return PagedCache(self.layout, self.storages(kv_caches), block_size=self.block_size)


def attention_kv_views(t: Any, block_size: int, head_shape: tuple[int, ...]) -> tuple[Any, Any]:
    """K and V ``(blocks, heads, block_size, head_size)`` views of vLLM 0.32's CPU attention cache view
    ``[blocks, heads, block_size, 2 * head_size]`` (read as ``[blocks, heads, 2 * block_size, head_size]``:
    a page's K rows, then its V rows)."""
    heads, dim = head_shape
    if t.dim() != 4 or tuple(t.shape[1:]) != (heads, block_size, 2 * dim):
        raise LayoutMismatch(f"attention cache {tuple(t.shape)}: expected [blocks, {heads}, {block_size}, "
                             f"{2 * dim}] (kernel blocks smaller than the manager's are not supported)")
    kv = t.view(t.shape[0], heads, 2 * block_size, dim)
    return kv[:, :, :block_size], kv[:, :, block_size:]


def mamba_state_views(t: Any, spec: CacheSpec) -> list[Any]:
    """The ``(blocks, *shape)`` state views of a raw ``int8 [blocks, 1, 1, bytes]`` Mamba page view, packed
    in order from the page's start (as ``MambaBase.bind_kv_cache`` unpacks them)."""
    from ..cuda import torch_dtype

    if t.dim() != 4 or tuple(t.shape[1:3]) != (1, 1) or t.element_size() != 1:
        raise LayoutMismatch(f"Mamba cache {tuple(t.shape)} {t.dtype}: expected a raw int8 [blocks, 1, 1, bytes]")
    pages = t.squeeze(2).squeeze(1)
    views, off = [], 0
    for ts in spec.tensors:
        if off + ts.nbytes > pages.shape[1]:
            raise LayoutMismatch(f"Mamba page of {pages.shape[1]} bytes holds no {ts.name} at {off}")
        views.append(pages[:, off : off + ts.nbytes].view(torch_dtype(ts.dtype)).view(-1, *ts.shape))
        off += ts.nbytes
    return views
