"""Engine cache storage: where each cached tensor of each layer lives in an engine's (paged) device memory.

Owns: the storage formats of token-indexed caches (``block_major`` ``(num_blocks, 2, block_size, heads,
dim)``, ``kv_major`` ``(2, num_blocks, block_size, heads, dim)``, ``split``: one ``(num_blocks, block_size,
*per_token_shape)`` tensor per cached tensor, as MLA's ``(num_blocks, block_size, latent)`` or SGLang's
separate K and V pools), the ``NHD``/``HND`` order of the per-block ``(tokens, heads)`` axes, slot-indexed
state tensors ``(num_slots, *state_shape)``, validation of all of that against a ``ModelLayout``
(``LayoutMismatch``), and ``allocate_paged_cache`` to build such a cache on any torch device for tests
and checks. Must not know: sockets, streams, pools, the wire. torch is imported lazily.

Every token-indexed tensor is exposed as a *paged view* ``(num_blocks, block_size, *per_token_shape)``
(strided, no copy); every state tensor as a *slot view* ``(num_slots, *state_shape)``. The stager
gathers from and scatters into those views only, so a new engine format is one more ``paged_views``
case.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..codec.layout import TOKEN, CacheSpec, ModelLayout
from ..errors import LayoutMismatch

if TYPE_CHECKING:
    import torch

FORMATS = ("block_major", "kv_major", "split", "slots")
KV_ORDERS = ("NHD", "HND")

_TORCH_DTYPE_NAMES = {
    "bfloat16": "bfloat16",
    "float16": "float16",
    "float32": "float32",
    "float8_e4m3fn": "float8_e4m3fn",
    "float8_e5m2": "float8_e5m2",
    "int8": "int8",
    "uint8": "uint8",
}


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a layout dtype name (``bfloat16`` -> ``torch.bfloat16``)."""
    import torch

    try:
        dt: torch.dtype = getattr(torch, _TORCH_DTYPE_NAMES[name])
        return dt
    except (KeyError, AttributeError):
        raise LayoutMismatch(f"dtype {name!r} has no torch equivalent in this torch build") from None


def _dtype_name(dt: Any) -> str:
    return str(dt).removeprefix("torch.")


@dataclass(frozen=True)
class CacheStorage:
    """The engine tensors of one cache (``layout.layers[layer].caches[cache]``).

    ``format``: ``block_major`` / ``kv_major`` (one tensor holding K and V, which must then have equal
    shapes and dtypes), ``split`` (one paged tensor per cached tensor) or ``slots`` (state caches).
    ``kv_order``: ``NHD`` (block axes ``(block_size, heads, dim)``) or ``HND`` (``(heads, block_size,
    dim)``; only for ``(heads, dim)`` tensors).
    """

    layer: int
    cache: int
    spec: CacheSpec
    format: str
    tensors: tuple[Any, ...]
    kv_order: str = "NHD"

    @property
    def token_indexed(self) -> bool:
        return self.spec.indexing == TOKEN

    @property
    def device(self) -> Any:
        return self.tensors[0].device

    @property
    def num_blocks(self) -> int:
        if self.format == "kv_major":
            return int(self.tensors[0].shape[1])
        return int(self.tensors[0].shape[0])

    @property
    def num_slots(self) -> int:
        return int(self.tensors[0].shape[0])

    def expected_shapes(self, num: int, block_size: int) -> list[tuple[int, ...]]:
        """The engine tensor shapes this storage must have for ``num`` blocks (or slots)."""
        specs = self.spec.tensors
        if self.format == "slots":
            return [(num, *t.shape) for t in specs]

        def block(shape: tuple[int, ...]) -> tuple[int, ...]:
            if self.kv_order == "HND":
                return (shape[0], block_size, *shape[1:])
            return (block_size, *shape)

        if self.format == "split":
            return [(num, *block(t.shape)) for t in specs]
        inner = block(specs[0].shape)
        return [(num, 2, *inner)] if self.format == "block_major" else [(2, num, *inner)]

    def paged_views(self) -> list[torch.Tensor]:
        """Per cached tensor, a ``(num_blocks, block_size, *per_token_shape)`` view of engine memory."""
        if self.format == "slots":
            raise ValueError("a state cache has slot views, not paged views")
        if self.format == "split":
            raw = list(self.tensors)
        elif self.format == "block_major":
            raw = [self.tensors[0][:, i] for i in range(2)]
        else:
            raw = [self.tensors[0][i] for i in range(2)]
        if self.kv_order == "HND":
            raw = [r.transpose(1, 2) for r in raw]
        return raw

    def slot_views(self) -> list[torch.Tensor]:
        """Per state tensor, its ``(num_slots, *state_shape)`` engine tensor."""
        if self.format != "slots":
            raise ValueError("a token-indexed cache has paged views, not slot views")
        return list(self.tensors)

    def validate(self, block_size: int) -> None:
        """``LayoutMismatch`` unless the tensors are exactly what the spec and format say."""
        where = f"layer {self.layer} {self.spec.kind}"
        if self.format not in FORMATS:
            raise LayoutMismatch(f"{where}: unknown storage format {self.format!r}; known: {FORMATS}")
        if self.kv_order not in KV_ORDERS:
            raise LayoutMismatch(f"{where}: kv_order must be one of {KV_ORDERS}")
        # "raw" rows (an adapter's opaque per-page bytes, SGLang) have no axis order to get wrong
        if self.token_indexed and any(t.layout not in ("NHD", "latent", "raw") for t in self.spec.tensors):
            raise LayoutMismatch(f"{where}: staging writes token-indexed tensors in the NHD wire form; the "
                                 f"layout tags them {sorted({t.layout for t in self.spec.tensors})}")
        if (self.format == "slots") == self.token_indexed:
            raise LayoutMismatch(f"{where}: format {self.format!r} does not fit a "
                                 f"{self.spec.indexing}-indexed cache")
        specs = self.spec.tensors
        if self.format in ("block_major", "kv_major"):
            if len(specs) != 2 or specs[0].shape != specs[1].shape or specs[0].dtype != specs[1].dtype:
                raise LayoutMismatch(f"{where}: {self.format} stores K and V in one tensor, which needs two "
                                     f"tensors of one shape and dtype; use format 'split'")
            if len(self.tensors) != 1:
                raise LayoutMismatch(f"{where}: {self.format} takes one engine tensor, "
                                     f"got {len(self.tensors)}")
        elif len(self.tensors) != len(specs):
            raise LayoutMismatch(f"{where}: {len(specs)} cached tensors, "
                                 f"got {len(self.tensors)} engine tensors")
        if self.kv_order == "HND" and any(len(t.shape) != 2 for t in specs):
            raise LayoutMismatch(f"{where}: HND needs (heads, dim) tensors")
        if not self.tensors or any(not hasattr(t, "shape") or not hasattr(t, "dtype") for t in self.tensors):
            raise LayoutMismatch(f"{where}: engine tensors must be torch tensors")
        num = self.num_slots if self.format == "slots" else self.num_blocks
        shapes = self.expected_shapes(num, block_size)
        dtypes = [specs[0].dtype] if self.format in ("block_major", "kv_major") else [t.dtype for t in specs]
        dev = self.tensors[0].device
        for i, (t, shape, dtype) in enumerate(zip(self.tensors, shapes, dtypes)):
            if tuple(t.shape) != shape:
                raise LayoutMismatch(f"{where} tensor {i}: shape {tuple(t.shape)}, the layout needs {shape} "
                                     f"({self.format}, {self.kv_order}, block_size {block_size})")
            if _dtype_name(t.dtype) != dtype:
                raise LayoutMismatch(f"{where} tensor {i}: dtype {_dtype_name(t.dtype)}, the layout says "
                                     f"{dtype} (never cast silently)")
            if t.device != dev:
                raise LayoutMismatch(f"{where}: tensors on {dev} and {t.device}")
            if t.dim() and t.stride(-1) != 1:
                raise LayoutMismatch(f"{where} tensor {i}: the last axis must be contiguous")
        if num <= 0:
            raise LayoutMismatch(f"{where}: no blocks or slots")


class PagedCache:
    """An engine's cache for one ``ModelLayout`` (one TP rank): one ``CacheStorage`` per cache of each layer.

    ``block_size`` defaults to ``layout.block_size``. Construction validates every storage against the
    layout; a wrong dtype, shape or missing cache is ``LayoutMismatch`` before anything is read or written.
    """

    def __init__(self, layout: ModelLayout, storages: Iterable[CacheStorage], *, block_size: int | None = None
                 ) -> None:
        self.layout = layout
        self.block_size = block_size if block_size is not None else layout.block_size
        if self.block_size <= 0:
            raise LayoutMismatch("block_size must be positive")
        self._by_key: dict[tuple[int, int], CacheStorage] = {}
        for s in storages:
            key = (s.layer, s.cache)
            if key in self._by_key:
                raise LayoutMismatch(f"layer {s.layer} cache {s.cache} given twice")
            self._by_key[key] = s
        devices = set()
        for layer in layout.layers:
            for ci, spec in enumerate(layer.caches):
                st = self._by_key.get((layer.index, ci))
                if st is None:
                    raise LayoutMismatch(f"layer {layer.index} {spec.kind}: no engine storage given")
                if st.spec != spec:
                    raise LayoutMismatch(f"layer {layer.index} cache {ci}: storage describes {st.spec.kind} "
                                         f"{[t.name for t in st.spec.tensors]}, the layout says {spec.kind}")
                st.validate(self.block_size)
                devices.add(str(st.device))
        extra = [k for k in self._by_key
                 if k[0] >= layout.num_layers or k[1] >= len(layout.layers[k[0]].caches)]
        if extra:
            raise LayoutMismatch(f"storage for caches the layout does not have: {extra[:4]}")
        if len(devices) > 1:
            raise LayoutMismatch(f"cache spread over several devices: {sorted(devices)}")
        self.device: Any = next(iter(self._by_key.values())).device if self._by_key else None

    def storage(self, layer: int, cache: int) -> CacheStorage:
        return self._by_key[(layer, cache)]

    def storages(self) -> list[CacheStorage]:
        return [self._by_key[k] for k in sorted(self._by_key)]

    @property
    def is_cuda(self) -> bool:
        return self.device is not None and self.device.type == "cuda"

    def num_blocks(self, group: str) -> int:
        """Blocks every token-indexed storage of ``group`` has (the smallest, if they differ)."""
        n = [s.num_blocks for s in self._by_key.values() if s.token_indexed and s.spec.group == group]
        return min(n) if n else 0

    @property
    def num_slots(self) -> int:
        n = [s.num_slots for s in self._by_key.values() if not s.token_indexed]
        return min(n) if n else 0

    @property
    def groups(self) -> set[str]:
        return {s.spec.group for s in self._by_key.values() if s.token_indexed}

    @property
    def nbytes(self) -> int:
        return sum(int(t.numel()) * int(t.element_size()) for s in self._by_key.values() for t in s.tensors)


def allocate_paged_cache(
    layout: ModelLayout,
    num_blocks: int | Mapping[str, int],
    num_slots: int = 1,
    *,
    device: Any = "cpu",
    page_layout: str | None = None,
    kv_order: str = "NHD",
    fill: str = "empty",
    seed: int = 0,
    block_size: int | None = None,
) -> PagedCache:
    """Allocate an engine-style cache for ``layout`` on ``device`` (tests, benchmarks, the GPU check).

    ``page_layout``: ``block_major`` / ``kv_major`` for K/V caches (default ``layout.page_layout``); a
    cache whose K and V differ in shape (MiMo) or that has one tensor (MLA) is stored ``split``.
    ``num_blocks``: per group (``attn``, ``swa``) or one number for all. ``fill``: ``empty``, ``zeros``
    or ``random`` (random bytes, any bit pattern, from a generator seeded with ``seed``).
    """
    import torch

    page_layout = page_layout or layout.page_layout
    if page_layout not in ("block_major", "kv_major", "split"):
        raise ValueError(f"page_layout must be block_major, kv_major or split, got {page_layout!r}")
    if kv_order not in KV_ORDERS:
        raise ValueError(f"kv_order must be one of {KV_ORDERS}")
    if fill not in ("empty", "zeros", "random"):
        raise ValueError("fill must be empty, zeros or random")
    bs = block_size if block_size is not None else layout.block_size
    dev = torch.device(device)
    gen = None
    if fill == "random":
        gen = torch.Generator(device=dev)
        gen.manual_seed(seed)
    storages: list[CacheStorage] = []
    for layer in layout.layers:
        for ci, spec in enumerate(layer.caches):
            if spec.indexing == TOKEN:
                nb = num_blocks if isinstance(num_blocks, int) else num_blocks[spec.group]
                same = len(spec.tensors) == 2 and spec.tensors[0].shape == spec.tensors[1].shape \
                    and spec.tensors[0].dtype == spec.tensors[1].dtype
                fmt = page_layout if same else "split"
                order = kv_order if all(len(t.shape) == 2 for t in spec.tensors) else "NHD"
                probe = CacheStorage(layer.index, ci, spec, fmt, (), order)
                shapes = probe.expected_shapes(nb, bs)
                dtypes = [spec.tensors[0].dtype] if fmt != "split" else [t.dtype for t in spec.tensors]
            else:
                fmt, order = "slots", "NHD"
                probe = CacheStorage(layer.index, ci, spec, fmt, (), order)
                shapes = probe.expected_shapes(num_slots, bs)
                dtypes = [t.dtype for t in spec.tensors]
            tensors = []
            for shape, dt in zip(shapes, dtypes):
                t = torch.empty(shape, dtype=torch_dtype(dt), device=dev)
                if fill == "zeros":
                    t.view(torch.uint8).zero_()
                elif fill == "random":
                    t.view(torch.uint8).random_(0, 256, generator=gen)
                tensors.append(t)
            storages.append(CacheStorage(layer.index, ci, spec, fmt, tuple(tensors), order))
    return PagedCache(layout, storages, block_size=bs)
