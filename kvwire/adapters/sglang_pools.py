"""SGLang's transfer buffers as a kvwire layout: what ``KVArgs`` describes, in kvwire's terms.

Owns: ``SglangPools``, built from an SGLang ``KVArgs`` (read by attribute; no SGLang import): one kvwire
layer per SGLang buffer, in SGLang's own buffer order (every ``kv_data_ptrs`` entry, then each state type's
buffers, then the aux/metadata rows), the ``PagedCache`` over the engine's memory (zero-copy tensors over the
buffer pointers), and, per request, the ``RequestSpec`` and per-layer block tables and slots that
``kvwire.cuda`` Stager/Unstager take. Must not know: sockets, SGLang's classes or call order.

The wire unit is SGLang's: a KV or SWA *page* (``item_len`` bytes of one buffer) or a state/aux *slot*
(``item_len`` bytes). kvwire's ``block_size`` is 1 and a "token" of the ``RequestSpec`` is one SGLang page,
so ``num_tokens == state_position ==`` the request's KV page count (SGLang's own N convention: prefill
computed every prompt token; the state is the one after all of them; decode gets the first output token in
the aux rows). Bytes are not interpreted (tag ``raw``, dtype ``uint8``): SGLang checks model, dtype and TP on
its own; kvwire checks that both sides' buffers have the same per-page and per-slot sizes, layer by layer
(the layout fingerprint), and hashes every chunk.

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
#: SGLang names (its window's), counted from the end through ``prefix_hit['swa']``.
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


class SglangPools:
    """One SGLang rank's transfer buffers (``KVArgs``) as a kvwire ``ModelLayout`` and ``PagedCache``.

    ``device``: where the buffers live (``"cpu"`` or ``"cuda:N"``). ``aux_device``: where the aux rows live
    (SGLang keeps them in host memory); when it differs from ``device`` the aux rows travel through a
    device mirror (``load_aux``/``store_aux`` copy one row, a few KB, in and out of it).
    """

    def __init__(self, kv_args: Any, *, is_mla: bool = False, device: Any = "cpu", aux_device: Any = "cpu") -> None:
        self.kv_args = kv_args
        self.device = device
        page_size = int(kv_args.page_size)
        if page_size <= 0:
            raise LayoutError(f"page_size must be positive, got {page_size}")
        self.page_size = page_size
        bufs: list[tuple[int, int, int]] = []  # (ptr, nbytes, item_len)
        layers: list[LayerSpec] = []
        families: dict[str, Family] = {}

        def add(name: str, kind: str, ptrs: Sequence[int], lens: Sequence[int], items: Sequence[int],
                indexing: str) -> tuple[int, ...]:
            if not (len(ptrs) == len(lens) == len(items)):
                raise LayoutError(f"{name}: {len(ptrs)} pointers, {len(lens)} lengths, {len(items)} item sizes")
            out = []
            for j, (p, n, item) in enumerate(zip(ptrs, lens, items)):
                p, n, item = int(p), int(n), int(item)
                if item <= 0 or n < item:
                    raise LayoutError(f"{name} buffer {j}: {n} bytes cannot hold an item of {item} bytes")
                t = TensorSpec(f"{name}{j}", (item,), "uint8", "raw", indexing)
                cache = CacheSpec(kind, (t,), window=_WIDE if kind == "swa" else 0)
                out.append(len(layers))
                layers.append(LayerSpec(len(layers), (cache,)))
                bufs.append((p, n, item))
            return tuple(out)

        kv = add("kv", "mla" if is_mla else "gqa", kv_args.kv_data_ptrs, kv_args.kv_data_lens,
                 kv_args.kv_item_lens, TOKEN)
        families["kv"] = Family("kv", kv, True)
        self.state_families: list[Family | None] = []
        for i, st in enumerate(list(getattr(kv_args, "state_types", None) or [])):
            name = _state_name(st)
            if name not in SUPPORTED_STATES:
                raise LayoutError(f"SGLang state type {name!r} is not supported by the kvwire backend "
                                  f"(supported: {', '.join(SUPPORTED_STATES)})")
            if name in families:
                raise LayoutError(f"SGLang state type {name!r} given twice")
            fam_layers = add(name, "swa" if name == "swa" else "mamba2", kv_args.state_data_ptrs[i],
                             kv_args.state_data_lens[i], kv_args.state_item_lens[i],
                             TOKEN if name == "swa" else REQUEST)
            families[name] = Family(name, fam_layers, name == "swa")
            self.state_families.append(families[name])
        aux_ptrs = list(getattr(kv_args, "aux_data_ptrs", None) or [])
        aux = add("aux", "aux", aux_ptrs, kv_args.aux_data_lens if aux_ptrs else [],
                  kv_args.aux_item_lens if aux_ptrs else [], REQUEST)
        families["aux"] = Family("aux", aux, False)
        if not layers:
            raise LayoutError("KVArgs names no buffers")
        self.families = families
        # one rank's buffers: which rank they are is checked in the request's metadata, not the layout
        self.layout = ModelLayout(f"sglang-{getattr(kv_args, 'kv_cache_dtype_str', '')}", tuple(layers),
                                  block_size=1)
        self._bufs = bufs
        self._mirror: dict[int, tuple[Any, Any]] = {}  # aux layer -> (host rows, device rows)
        self.cache = self._paged_cache(aux_device)

    def _paged_cache(self, aux_device: Any) -> PagedCache:
        import torch

        storages = []
        for la, (ptr, nbytes, item) in zip(self.layout.layers, self._bufs):
            spec = la.caches[0]
            rows = nbytes // item
            aux = spec.kind == "aux"
            dev = aux_device if aux else self.device
            t = _view(ptr, rows * item, dev).view(rows, item)
            if aux and torch.device(aux_device) != torch.device(self.device):
                mirror = torch.zeros((rows, item), dtype=torch.uint8, device=self.device)
                self._mirror[la.index] = (t, mirror)
                t = mirror
            if spec.indexing == TOKEN:
                storages.append(CacheStorage(la.index, 0, spec, "split", (t.view(rows, 1, item),)))
            else:
                storages.append(CacheStorage(la.index, 0, spec, "slots", (t,)))
        return PagedCache(self.layout, storages, block_size=1)

    # ---- per request
    def request(self, request_id: str, num_pages: int, state_counts: Sequence[int | None] = ()) -> RequestSpec:
        """The transfer of one request: ``num_pages`` KV pages, the SWA window's page count, the state."""
        if num_pages <= 0:
            raise LayoutMismatch(f"request {request_id}: no KV pages to transfer")
        hit: dict[str, int] = {}
        for fam, n in zip(self.state_families, state_counts):
            if fam is not None and fam.name == "swa":
                if n is None or not 0 < n <= num_pages:
                    raise LayoutMismatch(f"request {request_id}: {n} SWA pages for {num_pages} KV pages")
                hit["swa"] = num_pages - n
        return RequestSpec(request_id, num_tokens=num_pages, state_position=num_pages, prefix_hit=hit)

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
