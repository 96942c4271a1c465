"""SGLang's transfer buffers as a kvwire layout: what ``KVArgs`` describes, in kvwire's terms.

Owns: ``SglangPools``, built from an SGLang ``KVArgs`` (read by attribute; no SGLang import): one kvwire
layer per SGLang buffer, in SGLang's own buffer order (every ``kv_data_ptrs`` entry, then each state type's
buffers, then the aux/metadata rows), the ``PagedCache`` over the engine's memory (zero-copy tensors over the
buffer pointers), and, per request, the ``RequestSpec`` and per-layer block tables and slots that
``kvwire.cuda`` Stager/Unstager take. Must not know: sockets, SGLang's classes or call order.

The wire unit is SGLang's: a kvwire block is one SGLang *page* (``page_size`` tokens of one buffer) and a
state/aux *slot* is one ``item_len`` row. A request moves whole pages: ``num_tokens == state_position ==`` its
page count times ``page_size`` (SGLang's own N convention: prefill computed every prompt token; the state is
the one after all of them; decode gets the first output token in the aux rows).

Each buffer is described with the TP-sharded axis SGLang itself reports in ``KVArgs``, so that prefill and
decode at different TP can be re-sharded (``kvwire.codec.reshard``): KV and SWA pages as ``(page_size,
kv_head_num, bytes per head)`` (NHD, ``replicated`` when ``total_kv_head_num < tp``); MLA pages as latent
rows (replicated); a Mamba-pool state slot as ``state_slice_outer_counts`` rows of ``state_dim_per_tensor``
elements (the rank's slice of the TP axis), the conv state split per ``state_conv_shard_groups`` (GDN
``[q|k|v]``), a dim of 0 marking a state replicated on every rank; aux rows raw (replicated). Bytes are not
interpreted beyond that (dtype ``uint8`` where the element size is not needed). A buffer SGLang gives no
such metadata for is carried raw: fine between equal TP layouts, refused (``unsliceable``) for re-sharding.
kvwire checks that both sides' layouts agree tensor by tensor (the fingerprint, TP size and rank included)
and hashes every chunk.

Supported state types: ``mamba`` (one slot per request: Mamba2, GDN, KDA conv and temporal states) and
``swa`` (the window's pages, counted from the end of the request). Others raise ``LayoutError`` at build.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..codec.layout import REQUEST, TOKEN, CacheSpec, LayerSpec, ModelLayout, RequestSpec, TensorSpec
from ..cuda import CacheStorage, PagedCache
from ..errors import LayoutError, LayoutMismatch

#: SWA layers are token-indexed with a window wider than any request: the pages shipped are the ones
#: SGLang names (its window's), counted from the end through ``prefix_hit['swa']`` (whole pages).
_WIDE = 1 << 30

SUPPORTED_STATES = ("mamba", "swa")


def _state_name(t: Any) -> str:
    return str(getattr(t, "value", t))


@dataclass(frozen=True)
class Family:
    """The kvwire layers that one SGLang index list addresses: KV pages, one state type, or aux rows."""

    name: str  # "kv", "mamba", "swa", "aux"
    layers: tuple[int, ...]
    paged: bool  # a list of pages (kv, swa) or one slot (mamba, aux)


def _view(ptr: int, nbytes: int, device: Any) -> Any:
    """A zero-copy uint8 tensor over ``nbytes`` of engine memory at ``ptr`` (CPU or CUDA)."""
    import torch

    dev = torch.device(device)
    if dev.type == "cuda":
        class _Cai:
            __cuda_array_interface__ = {"shape": (nbytes,), "typestr": "|u1", "data": (int(ptr), False),
                                        "version": 3, "strides": None}

        return torch.as_tensor(_Cai(), device=dev)
    return torch.frombuffer((ctypes.c_uint8 * nbytes).from_address(int(ptr)), dtype=torch.uint8)


#: a state element's byte size -> a dtype of that size (conv states stored ``(K-1, dim)`` need it as the unit)
_DTYPE_OF_SIZE = {1: "uint8", 2: "float16", 4: "float32"}


def _nth(v: Any, i: int) -> Any:
    """``v[i]`` of an optional per-state-type list from ``KVArgs`` (``None`` when absent)."""
    try:
        return v[i] if v is not None and i < len(v) else None
    except TypeError:
        return None


class SglangPools:
    """One SGLang rank's transfer buffers (``KVArgs``) as a kvwire ``ModelLayout`` and ``PagedCache``.

    ``device``: where the buffers live (``"cpu"`` or ``"cuda:N"``). ``aux_device``: where the aux rows live
    (SGLang keeps them in host memory); when it differs from ``device`` the aux rows travel through a
    device mirror (``load_aux``/``store_aux`` copy one row, a few KB, in and out of it). ``tp_size`` and
    ``tp_rank``: this rank's attention-TP place (SGLang's ``attn_tp_size`` and ``engine_rank``).
    """

    def __init__(self, kv_args: Any, *, is_mla: bool = False, device: Any = "cpu", aux_device: Any = "cpu",
                 tp_size: int = 1, tp_rank: int = 0) -> None:
        self.kv_args = kv_args
        self.device = device
        page_size = int(kv_args.page_size)
        if page_size <= 0:
            raise LayoutError(f"page_size must be positive, got {page_size}")
        self.page_size = page_size
        self.tp_size, self.tp_rank = int(tp_size), int(tp_rank)
        #: buffers carried raw for want of SGLang's slicing metadata: a re-sharding plan cannot use them
        self.unsliceable: list[str] = []
        heads = int(getattr(kv_args, "kv_head_num", 0) or 0)
        total_heads = int(getattr(kv_args, "total_kv_head_num", 0) or 0) or heads * self.tp_size
        bufs: list[tuple[int, int, int, tuple[int, ...], str]] = []  # (ptr, nbytes, item_len, row shape, dtype)
        layers: list[LayerSpec] = []
        families: dict[str, Family] = {}

        def describe(name: str, kind: str, j: int, item: int,
                     meta: dict[str, Any]) -> tuple[TensorSpec, tuple[int, ...]]:
            """The tensor spec of one buffer's page or slot, and the shape its rows are viewed with."""
            tname = f"{name}{j}"
            if kind in ("gqa", "swa", "mla"):
                per_tok, rem = divmod(item, page_size)
                if rem:
                    raise LayoutError(f"{tname}: a page of {item} bytes is not {page_size} tokens")
            if kind in ("gqa", "swa"):
                if heads > 0 and per_tok % heads == 0 and meta.get("nhd", True):
                    return (TensorSpec(tname, (heads, per_tok // heads), "uint8", "NHD", TOKEN,
                                       replicated=total_heads < self.tp_size), (page_size, heads, per_tok // heads))
                self.unsliceable.append(tname)
                return TensorSpec(tname, (per_tok,), "uint8", "raw", TOKEN), (page_size, per_tok)
            if kind == "mla":
                return TensorSpec(tname, (per_tok,), "uint8", "latent", TOKEN), (page_size, per_tok)
            if kind == "mamba2":
                dim, outer, groups = meta.get("dim"), int(meta.get("outer") or 1), meta.get("groups")
                subs = tuple(int(g) for g in groups) if groups else ()
                if dim == 0:  # SGLang's marker: replicated on every attention-TP rank
                    return TensorSpec(tname, (item,), "uint8", "raw", REQUEST, replicated=True), (item,)
                if dim is not None and dim > 0 and item % (dim * outer) == 0:
                    elem = item // (dim * outer)
                    if outer == 1:
                        return (TensorSpec(tname, (int(dim), elem), "uint8", "conv:DS" if subs else "ssm:DN",
                                           REQUEST, sub_projections=subs), (int(dim), elem))
                    if elem in _DTYPE_OF_SIZE:  # Kimi conv: (K-1, dim), the TP axis second
                        return (TensorSpec(tname, (outer, int(dim)), _DTYPE_OF_SIZE[elem], "conv:SD", REQUEST,
                                           sub_projections=subs), (outer, int(dim)))
                self.unsliceable.append(tname)
                return TensorSpec(tname, (item,), "uint8", "raw", REQUEST), (item,)
            return TensorSpec(tname, (item,), "uint8", "raw", REQUEST), (item,)  # aux rows: replicated

        def add(name: str, kind: str, ptrs: Sequence[int], lens: Sequence[int], items: Sequence[int],
                metas: Sequence[dict[str, Any]] = ()) -> tuple[int, ...]:
            if not (len(ptrs) == len(lens) == len(items)):
                raise LayoutError(f"{name}: {len(ptrs)} pointers, {len(lens)} lengths, {len(items)} item sizes")
            out = []
            for j, (p, n, item) in enumerate(zip(ptrs, lens, items)):
                p, n, item = int(p), int(n), int(item)
                if item <= 0 or n < item:
                    raise LayoutError(f"{name} buffer {j}: {n} bytes cannot hold an item of {item} bytes")
                t, row = describe(name, kind, j, item, metas[j] if j < len(metas) else {})
                cache = CacheSpec(kind, (t,), window=_WIDE if kind == "swa" else 0)
                out.append(len(layers))
                layers.append(LayerSpec(len(layers), (cache,)))
                bufs.append((p, n, item, row, t.dtype))
            return tuple(out)

        kv = add("kv", "mla" if is_mla else "gqa", kv_args.kv_data_ptrs, kv_args.kv_data_lens,
                 kv_args.kv_item_lens)
        families["kv"] = Family("kv", kv, True)
        self.state_families: list[Family | None] = []
        for i, st in enumerate(list(getattr(kv_args, "state_types", None) or [])):
            name = _state_name(st)
            if name not in SUPPORTED_STATES:
                raise LayoutError(f"SGLang state type {name!r} is not supported by the kvwire backend "
                                  f"(supported: {', '.join(SUPPORTED_STATES)})")
            if name in families:
                raise LayoutError(f"SGLang state type {name!r} given twice")
            n_bufs = len(kv_args.state_data_ptrs[i])
            if name == "swa":
                swa_layout = getattr(kv_args, "swa_kv_cache_layout", None)
                metas = [{"nhd": swa_layout in (None, "nhd")}] * n_bufs
            else:
                dims = _nth(getattr(kv_args, "state_dim_per_tensor", None), i) or []
                outers = _nth(getattr(kv_args, "state_slice_outer_counts", None), i) or []
                groups = _nth(getattr(kv_args, "state_conv_shard_groups", None), i) or []
                metas = [{"dim": _nth(dims, j), "outer": _nth(outers, j), "groups": _nth(groups, j)}
                         for j in range(n_bufs)]
            fam_layers = add(name, "swa" if name == "swa" else "mamba2", kv_args.state_data_ptrs[i],
                             kv_args.state_data_lens[i], kv_args.state_item_lens[i], metas)
            families[name] = Family(name, fam_layers, name == "swa")
            self.state_families.append(families[name])
        aux_ptrs = list(getattr(kv_args, "aux_data_ptrs", None) or [])
        aux = add("aux", "aux", aux_ptrs, kv_args.aux_data_lens if aux_ptrs else [],
                  kv_args.aux_item_lens if aux_ptrs else [])
        families["aux"] = Family("aux", aux, False)
        if not layers:
            raise LayoutError("KVArgs names no buffers")
        self.families = families
        self.layout = ModelLayout(f"sglang-{getattr(kv_args, 'kv_cache_dtype_str', '')}", tuple(layers),
                                  block_size=page_size, tp_size=self.tp_size, tp_rank=self.tp_rank)
        #: global KV heads per cache kind, for a plan where both sides replicate them (``plan_reshard(heads=)``)
        self.heads = {k: total_heads for k in ("gqa", "swa")} if total_heads else {}
        self._bufs = bufs
        self._mirror: dict[int, tuple[Any, Any]] = {}  # aux layer -> (host rows, device rows)
        self.cache = self._paged_cache(aux_device)

    def _paged_cache(self, aux_device: Any) -> PagedCache:
        import torch

        from ..cuda.paged import torch_dtype

        storages = []
        for la, (ptr, nbytes, item, row, dtype) in zip(self.layout.layers, self._bufs):
            spec = la.caches[0]
            rows = nbytes // item
            aux = spec.kind == "aux"
            dev = aux_device if aux else self.device
            t = _view(ptr, rows * item, dev).view(rows, item)
            if aux and torch.device(aux_device) != torch.device(self.device):
                mirror = torch.zeros((rows, item), dtype=torch.uint8, device=self.device)
                self._mirror[la.index] = (t, mirror)
                t = mirror
            if dtype != "uint8":
                t = t.view(torch_dtype(dtype))
            t = t.view(rows, *row)
            if spec.indexing == TOKEN:
                storages.append(CacheStorage(la.index, 0, spec, "split", (t,)))
            else:
                storages.append(CacheStorage(la.index, 0, spec, "slots", (t,)))
        return PagedCache(self.layout, storages, block_size=self.page_size)

    # ---- per request
    def request(self, request_id: str, num_pages: int, state_counts: Sequence[int | None] = ()) -> RequestSpec:
        """The transfer of one request: ``num_pages`` KV pages (whole pages of tokens), the SWA window's page
        count, the state."""
        if num_pages <= 0:
            raise LayoutMismatch(f"request {request_id}: no KV pages to transfer")
        hit: dict[str, int] = {}
        for fam, n in zip(self.state_families, state_counts):
            if fam is not None and fam.name == "swa":
                if n is None or not 0 < n <= num_pages:
                    raise LayoutMismatch(f"request {request_id}: {n} SWA pages for {num_pages} KV pages")
                hit["swa"] = (num_pages - n) * self.page_size
        tokens = num_pages * self.page_size
        return RequestSpec(request_id, num_tokens=tokens, state_position=tokens, prefix_hit=hit)

    def tables(self, kv_pages: Sequence[int], state_indices: Sequence[Any] | None, aux_index: int | None
               ) -> tuple[dict[int, list[int]], dict[int, int]]:
        """Per-layer block tables (KV pages; SWA pages placed at the end of the request) and slots (the
        request's Mamba slot, its aux row) for ``Stager.begin`` / ``Unstager.prepare``."""
        pages = [int(p) for p in kv_pages]
        tables: dict[int, list[int]] = {la: pages for la in self.families["kv"].layers}
        slots: dict[int, int] = {}
        states = list(state_indices or [])
        for i, fam in enumerate(self.state_families):
            if fam is None:
                continue
            idx = [int(x) for x in (states[i] if i < len(states) and states[i] is not None else [])]
            if fam.paged:
                if not 0 < len(idx) <= len(pages):
                    raise LayoutMismatch(f"{len(idx)} SWA pages for {len(pages)} KV pages")
                table = [0] * (len(pages) - len(idx)) + idx  # positions before the window are never read
                tables.update((la, table) for la in fam.layers)
            else:
                if len(idx) != 1:
                    raise LayoutMismatch(f"state {fam.name}: {len(idx)} slots for one request, need one")
                slots.update((la, idx[0]) for la in fam.layers)
        if self.families["aux"].layers:
            if aux_index is None:
                raise LayoutMismatch("no aux (metadata) row for the request")
            slots.update((la, int(aux_index)) for la in self.families["aux"].layers)
        return tables, slots

    def state_counts(self, state_indices: Sequence[Any] | None) -> list[int | None]:
        states = list(state_indices or [])
        return [len(states[i]) if i < len(states) and states[i] is not None else None
                for i in range(len(self.state_families))]

    # ---- aux rows through the device mirror (only when the aux rows are not on the cache's device)
    def load_aux(self, aux_index: int) -> None:
        """Prefill: copy the request's aux row from host memory into the device mirror before staging."""
        for host, mirror in self._mirror.values():
            mirror[aux_index].copy_(host[aux_index])

    def store_aux(self, aux_index: int) -> None:
        """Decode: copy the request's received aux row from the device mirror into host memory."""
        for host, mirror in self._mirror.values():
            host[aux_index].copy_(mirror[aux_index])


def unsliceable_tensors(layout: ModelLayout) -> list[str]:
    """Tensors of an SGLang layout carried raw without being replicated: their TP axis is unknown, so a
    re-sharding plan (which copies raw tensors whole, as replicated ones) would move the wrong bytes."""
    return [f"{layer.index}.{c.kind}.{t.name}" for layer in layout.layers for c in layer.caches
            for t in c.tensors if t.layout == "raw" and c.kind != "aux" and not t.replicated]
