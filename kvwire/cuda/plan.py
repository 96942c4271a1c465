"""Copy plans: where a request's bytes sit in one host buffer, and the tensor copies that move them there.

Owns: the host placement of a request's segments (``Placement``: one buffer; each layer's segments adjacent,
each segment 256-byte aligned, so a layer is one contiguous span), the check of block tables and state slot
against a cache and a request (``check_request``), the integer-word views that make every copy a raw-byte
copy, and the per-layer copy plans both directions are built from, once per request:

* ``direct``: one ``copy_`` per run of consecutive block ids, straight between engine memory and the
  layer's host span (a run is one contiguous region in ``kv_major``/``split`` NHD storage; in
  ``block_major`` or HND it is a strided view and torch makes it contiguous on the device first); a
  scrambled table degrades to one copy per block. State tensors: one ``copy_`` each.
* ``scratch``: whole blocks with ``index_select(out=)`` / ``index_copy_`` (a partial first/last block with
  ``copy_``) into or out of a device scratch laid out like the span, plus one span copy to or from host.
* ``gather`` (CPU caches, where host and engine memory are one): the same gather straight into the span.
* ``auto``: per layer, ``direct`` unless it needs more copies than the scratch path, beyond one extra copy
  per ``AUTO_BYTES_PER_EXTRA_COPY`` bytes (each copy costs launch overhead; the scratch path costs a
  device-side pass over the bytes); CPU caches: ``gather``.

A plan is a list of ``(kind, dst, src, idx)`` tuples of tensor views; ``run_ops`` executes one on the
current stream. Must not know: streams, events, threads, pools, sockets. torch is imported lazily.
All copies move raw bytes (the widest integer word the strides allow), so every dtype, float8 included,
is carried bit-exactly and never converted.
"""

from __future__ import annotations

import operator
import reprlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from ..codec.layout import ModelLayout, RequestSpec, Segment, plan_segments
from ..errors import LayoutMismatch
from .paged import PagedCache

if TYPE_CHECKING:
    import torch

ALIGN = 256
MODES = ("auto", "direct", "scratch")
#: auto: one more copy than the scratch path is worth it for every this many bytes of the layer
AUTO_BYTES_PER_EXTRA_COPY = 16 << 20

COPY, SELECT, SCATTER = 0, 1, 2
#: ``(COPY, dst, src, None)``: ``dst.copy_(src)``; ``(SELECT, out, src, idx)``: ``index_select(src, 0, idx,
#: out=out)``; ``(SCATTER, dst, src, idx)``: ``dst.index_copy_(0, idx, src)``. idx: block ids, a list until
#: ``bind_indices`` replaces it with a slice of one int64 tensor on the cache's device.
Op = tuple[int, Any, Any, Any]
#: ``(block id, first token in that block, tokens, first row in the segment's region)``
Part = tuple[int, int, int, int]

_WORDS = ((8, "int64"), (4, "int32"), (2, "int16"))


def _round_up(n: int, a: int) -> int:
    return -(-n // a) * a


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"copy path must be one of {MODES}, got {mode!r}")
    return mode


class Placement:
    """Where each segment of a request lives in one host buffer, and each layer's contiguous span."""

    def __init__(self, layout: ModelLayout, request: RequestSpec, align: int = ALIGN) -> None:
        self.segments: list[Segment] = plan_segments(layout, request)
        self.offsets: list[int] = []
        self.by_layer: dict[int, list[int]] = {}
        pos = 0
        for s in self.segments:
            pos = _round_up(pos, align)
            self.offsets.append(pos)
            pos += s.nbytes
            self.by_layer.setdefault(s.layer, []).append(s.index)
        self.total = pos
        self.spans: dict[int, tuple[int, int]] = {}
        for layer, idx in self.by_layer.items():
            self.spans[layer] = (self.offsets[idx[0]], self.offsets[idx[-1]] + self.segments[idx[-1]].nbytes)

    @property
    def payload_bytes(self) -> int:
        return sum(s.nbytes for s in self.segments)

    def layer_bytes(self, layer: int) -> int:
        return sum(self.segments[i].nbytes for i in self.by_layer.get(layer, []))

    def views(self, host: torch.Tensor, layer: int) -> list[torch.Tensor]:
        """The host region of ``layer``: one uint8 view per segment, in plan order."""
        return [host[self.offsets[i] : self.offsets[i] + self.segments[i].nbytes]
                for i in self.by_layer.get(layer, [])]


def table_key(tables: Mapping[Any, Any], layer: int, group: str) -> str | int:
    """The key of ``layer``'s block table in ``tables``: the layer's index if present, else its group.
    Per-layer tables fit engines that give every KV-cache group, so every layer, its own (vLLM's hybrid
    manager); per-group tables fit the others."""
    return layer if layer in tables else group


def slot_of(slot: int | Mapping[int, int] | None, layer: int) -> int | None:
    """``layer``'s state slot: the one slot of every state layer (SGLang), or the layer's entry of a
    per-layer mapping (vLLM: each Mamba group has its own block)."""
    if slot is None or isinstance(slot, int):
        return slot
    return slot.get(layer)


def _index(name: str, v: Any) -> int:
    """``v`` as a Python int: an int, or an integer numpy/torch scalar (``operator.index``); a bool, float
    (even 1.0: a slot or block id computed as one was computed wrong), string... is a ``TypeError``."""
    if isinstance(v, bool):
        raise TypeError(f"{name} must be an int, not bool")
    try:
        return operator.index(v)
    except TypeError:
        raise TypeError(f"{name} must be an int, not {type(v).__name__} {reprlib.repr(v)}") from None


def check_layer(layer: Any, num_layers: int) -> int:
    """``layer`` as an int index of a layout of ``num_layers`` (a numpy/torch integer too), else ``TypeError``
    (a bool, a string) or, as ``write_layer`` does, ``LayoutMismatch`` (outside ``0..num_layers - 1``)."""
    if isinstance(layer, bool):
        raise TypeError("layer must be an int, not bool")
    try:
        i = operator.index(layer)
    except TypeError:
        raise TypeError(f"layer must be an int, not {type(layer).__name__}") from None
    if not 0 <= i < num_layers:
        raise LayoutMismatch(f"layer {i} is not a layer of the layout (0..{num_layers - 1})")
    return i


def check_slot(state_slot: Any) -> int | dict[int, int] | None:
    """``state_slot`` as ``check_request`` and the plans take it: ``None``, one int, or a mapping of state
    layer to int (``None`` entries are left out: a layer that needs a slot and has none is a
    ``LayoutMismatch`` either way). Integer numpy and torch scalars (how engines hold slots) become ints;
    anything else is a ``TypeError`` naming it."""
    if state_slot is None:
        return None
    if isinstance(state_slot, Mapping):
        return {layer: _index(f"state_slot[{layer!r}]", v) for layer, v in state_slot.items() if v is not None}
    if isinstance(state_slot, bool):
        raise TypeError("state_slot must be an int, a mapping of layer to int, or None, not bool")
    try:
        return operator.index(state_slot)
    except TypeError:
        raise TypeError(f"state_slot must be an int, a mapping of layer to int, or None, not "
                        f"{type(state_slot).__name__}") from None


def _block_ids(what: str, ids: Any) -> list[int]:
    """A block table as ints: a sequence of ints, a 1-D integer numpy array or torch tensor; a float id
    (0.9 would have been block 0), a string, ``None`` or a 2-D table is a ``TypeError`` naming it."""
    ndim = getattr(ids, "ndim", None)
    if ndim is not None and hasattr(ids, "tolist"):
        if ndim != 1:
            raise TypeError(f"{what} must be one-dimensional (block ids), got {ndim} dimensions")
        ids = ids.tolist()  # floats stay floats, refused below
    elif isinstance(ids, (str, bytes)) or not isinstance(ids, Iterable):
        raise TypeError(f"{what} must be a sequence of block ids, not {type(ids).__name__}")
    return [_index(f"{what}: block id", b) for b in ids]


def _key_ranges(layout: ModelLayout, segments: Sequence[Segment], tables: Mapping[Any, Any]
                ) -> dict[str | int, tuple[int, int]]:
    """Per block-table key, the union ``[start, stop)`` of the tokens its segments carry."""
    out: dict[str | int, tuple[int, int]] = {}
    for s in segments:
        cache = layout.layers[s.layer].caches[s.cache]
        if s.token_count:
            key = table_key(tables, s.layer, cache.group)
            a, b = out.get(key, (s.token_start, s.token_start + s.token_count))
            out[key] = (min(a, s.token_start), max(b, s.token_start + s.token_count))
    return out


def check_request(cache: PagedCache, placement: Placement, block_tables: Mapping[Any, Sequence[int]],
                  state_slot: int | Mapping[int, int] | None, unique: bool) -> dict[str | int, list[int]]:
    """Block tables and slots fit the cache and the request: ``LayoutMismatch`` before any byte moves.

    ``block_tables``: per group, or per layer index (``table_key``); ``state_slot``: one slot, or one per
    state layer (``slot_of``), checked by ``check_slot``. A value of the wrong type is a ``TypeError``
    naming it."""
    if not isinstance(block_tables, Mapping):
        raise TypeError(f"block_tables must be a mapping of group (or layer index) to block ids, not "
                        f"{type(block_tables).__name__}")
    state_slot = check_slot(state_slot)
    bs = cache.block_size
    token_layers = {la.index for la in cache.layout.layers if any(c.indexing == "token" for c in la.caches)}
    unknown = sorted(str(g) for g in block_tables
                     if (g not in token_layers if isinstance(g, int) else g not in cache.groups))
    if unknown:
        raise LayoutMismatch(f"block tables for groups {unknown} the cache does not have; its token-indexed "
                             f"groups are {sorted(cache.groups)} (or a token-indexed layer's index)")
    tables: dict[str | int, list[int]] = {}
    for key, (start, stop) in _key_ranges(cache.layout, placement.segments, block_tables).items():
        what = f"layer {key}" if isinstance(key, int) else repr(key)
        if key not in block_tables:
            raise LayoutMismatch(f"no block table for group {what} (tokens {start}..{stop} are shipped)")
        table = _block_ids(f"block_tables[{key!r}]", block_tables[key])
        first, last = start // bs, (stop - 1) // bs
        if len(table) <= last:
            raise LayoutMismatch(f"block table {what} has {len(table)} blocks; tokens up to {stop} need "
                                 f"{last + 1} at block size {bs}")
        used = table[first : last + 1]
        group = key if isinstance(key, str) else cache.layout.layers[key].caches[0].group
        limit = cache.num_blocks(group)
        bad = [b for b in used if not 0 <= b < limit]
        if bad:
            raise LayoutMismatch(f"block table {what}: block ids {bad[:4]} outside [0, {limit})")
        if unique and len(set(used)) != len(used):
            raise LayoutMismatch(f"block table {what} repeats a block among the ones written")
        tables[key] = table
    for s in placement.segments:
        if not s.token_count:
            slot = slot_of(state_slot, s.layer)
            limit = cache.storage(s.layer, s.cache).num_slots  # state pools may differ in size (SGLang aux)
            if slot is None or not 0 <= slot < limit:
                raise LayoutMismatch(f"layer {s.layer}: state slot {slot} outside [0, {limit})")
    return tables


# ------------------------------------------------------------------ raw-byte views


def _fits(t: torch.Tensor, w: int) -> bool:
    if t.dim() == 0 or t.shape[-1] % w or t.storage_offset() % w or t.stride(-1) != 1:
        return False
    return all(st % w == 0 for st, n in zip(t.stride()[:-1], t.shape[:-1]) if n > 1)


def as_words(*byte_tensors: torch.Tensor) -> list[torch.Tensor]:
    """The uint8 tensors viewed as the widest integer word all of them allow (strides, offsets, sizes)."""
    import torch

    for w, name in _WORDS:
        if all(_fits(t, w) for t in byte_tensors):
            try:
                return [t.view(getattr(torch, name)) for t in byte_tensors]
            except RuntimeError:  # a stride rule torch applies that _fits does not model
                continue
    return list(byte_tensors)


def _flat(eng: torch.Tensor) -> torch.Tensor | None:
    """A paged view ``(blocks, block_size, *rest)`` as ``(blocks * block_size, *rest)`` where that is a view
    of the same memory (``kv_major``/``split`` NHD), else None. ``view`` never copies: it raises instead."""
    try:
        return eng.view(-1, *eng.shape[2:])
    except RuntimeError:
        return None


def engine_and_region(cache: PagedCache, seg: Segment, region: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Word views of the segment's engine memory and of its ``nbytes`` region (token-major or state)."""
    import torch

    st = cache.storage(seg.layer, seg.cache)
    if st.token_indexed:
        eng = st.paged_views()[seg.tensor].view(torch.uint8)
        reg = region.view(seg.token_count, *eng.shape[2:])
    else:
        eng = st.slot_views()[seg.tensor].view(torch.uint8)
        reg = region.view(*eng.shape[1:])
    e, r = as_words(eng, reg)
    return e, r


# ------------------------------------------------------------------ token parts (pure arithmetic)


def block_parts(seg: Segment, table: Sequence[int], bs: int) -> list[Part]:
    """One part per block the segment's tokens touch."""
    out: list[Part] = []
    p, stop, pos = seg.token_start, seg.token_start + seg.token_count, 0
    while p < stop:
        b, off = divmod(p, bs)
        n = min(bs - off, stop - p)
        out.append((table[b], off, n, pos))
        p, pos = p + n, pos + n
    return out


def merge_runs(parts: Sequence[Part], bs: int) -> list[Part]:
    """Parts joined while block ids follow each other: ``(first block, offset in it, tokens, row)``."""
    runs: list[Part] = []
    for b, off, n, pos in parts:
        if runs:
            rb, roff, rn, rpos = runs[-1]
            end = roff + rn
            if off == 0 and end % bs == 0 and b == rb + end // bs:
                runs[-1] = (rb, roff, rn + n, rpos)
                continue
        runs.append((b, off, n, pos))
    return runs


def split_run(run: Part, bs: int) -> list[Part]:
    """A run as views of a non-flat paged tensor: a part inside one block (``off + n <= bs``) or whole
    blocks (``off == 0``, ``n`` a multiple of ``bs``): a partial first block, whole blocks, a partial last."""
    b, off, n, pos = run
    out: list[Part] = []
    if off or n < bs:
        m = min(bs - off, n)
        out.append((b, off, m, pos))
        b, n, pos = b + 1, n - m, pos + m
    k = n // bs
    if k:
        out.append((b, 0, k * bs, pos))
    b, n, pos = b + k, n - k * bs, pos + k * bs
    if n:
        out.append((b, 0, n, pos))
    return out


def direct_parts(seg: Segment, table: Sequence[int], bs: int, flat: bool) -> list[Part]:
    runs = merge_runs(block_parts(seg, table, bs), bs)
    return runs if flat else [p for r in runs for p in split_run(r, bs)]


def gather_parts(seg: Segment, bs: int) -> list[tuple[int, int, int]]:
    """``(first token, tokens, row)``: a partial first block, the whole blocks, a partial last block."""
    p, stop, pos = seg.token_start, seg.token_start + seg.token_count, 0
    out = []
    if p % bs:
        n = min(bs - p % bs, stop - p)
        out.append((p, n, pos))
        p, pos = p + n, pos + n
    k = (stop - p) // bs
    if k:
        out.append((p, k * bs, pos))
        p, pos = p + k * bs, pos + k * bs
    if p < stop:
        out.append((p, stop - p, pos))
    return out


# ------------------------------------------------------------------ ops


def segment_ops(cache: PagedCache, seg: Segment, region: torch.Tensor, table: Sequence[int] | None,
                slot: int | None, *, to_region: bool, direct: bool) -> list[Op]:
    """The copies of one segment between engine memory and its ``region``: gather (``to_region``) or
    scatter; ``direct``: per run of block ids, else whole blocks by index."""
    eng, reg = engine_and_region(cache, seg, region)

    def copy(e: Any, r: Any) -> Op:
        return (COPY, r, e, None) if to_region else (COPY, e, r, None)

    if not seg.token_count:
        assert slot is not None
        return [copy(eng[slot], reg)]
    assert table is not None
    bs = cache.block_size
    ops: list[Op] = []
    if direct:
        flat = _flat(eng)
        for b, off, n, pos in direct_parts(seg, table, bs, flat is not None):
            if flat is not None:
                ops.append(copy(flat[b * bs + off : b * bs + off + n], reg[pos : pos + n]))
            elif off + n <= bs:
                ops.append(copy(eng[b, off : off + n], reg[pos : pos + n]))
            else:
                k = n // bs
                ops.append(copy(eng[b : b + k], reg[pos : pos + n].view(k, bs, *reg.shape[1:])))
        return ops
    for p, n, pos in gather_parts(seg, bs):
        b, off = divmod(p, bs)
        if off or n < bs:
            ops.append(copy(eng[table[b], off : off + n], reg[pos : pos + n]))
            continue
        k = n // bs
        r = reg[pos : pos + n].view(k, bs, *reg.shape[1:])
        ids = list(table[b : b + k])
        ops.append((SELECT, r, eng, ids) if to_region else (SCATTER, eng, r, ids))
    return ops


def _flat_storage(cache: PagedCache, seg: Segment) -> bool:
    return _flat(cache.storage(seg.layer, seg.cache).paged_views()[seg.tensor]) is not None


def auto_mode(cache: PagedCache, placement: Placement, layer: int, tables: Mapping[Any, Sequence[int]]) -> str:
    """``direct`` or ``scratch`` for one layer on a device: copies counted, no tensor touched but views."""
    bs = cache.block_size
    direct, scratch = 0, 1  # the scratch path's span copy
    for i in placement.by_layer[layer]:
        seg = placement.segments[i]
        if not seg.token_count:
            direct, scratch = direct + 1, scratch + 1
            continue
        table = tables[table_key(tables, seg.layer, cache.layout.layers[seg.layer].caches[seg.cache].group)]
        direct += len(direct_parts(seg, table, bs, _flat_storage(cache, seg)))
        scratch += len(gather_parts(seg, bs))
    return "direct" if direct <= scratch + placement.layer_bytes(layer) // AUTO_BYTES_PER_EXTRA_COPY else "scratch"


class LayerPlan:
    """One layer's copies, in order, on one stream: ``mode`` is ``direct``, ``scratch`` or ``gather``."""

    __slots__ = ("layer", "mode", "ops", "nbytes")

    def __init__(self, layer: int, mode: str, ops: list[Op], nbytes: int) -> None:
        self.layer = layer
        self.mode = mode
        self.ops = ops
        self.nbytes = nbytes

    def __repr__(self) -> str:
        return f"LayerPlan(layer {self.layer}, {self.mode}, {len(self.ops)} ops, {self.nbytes} bytes)"


def plan_layers(cache: PagedCache, placement: Placement, tables: Mapping[Any, Sequence[int]],
                slot: int | Mapping[int, int] | None,
                host: torch.Tensor, *, mode: str, to_host: bool, on_device: bool,
                scratch: Callable[[int], torch.Tensor]) -> dict[int, LayerPlan]:
    """Every layer's plan between the cache and ``host`` (sender: ``to_host``). ``scratch(n)``: a device
    buffer of at least ``n`` bytes, asked for once, for the layers that go through a scratch."""
    check_mode(mode)
    chosen: dict[int, str] = {}
    for layer in placement.by_layer:
        m = mode
        if m == "auto":
            m = auto_mode(cache, placement, layer, tables) if on_device else "gather"
        chosen[layer] = m
    need = max((placement.spans[la][1] - placement.spans[la][0] for la, m in chosen.items() if m == "scratch"),
               default=0)
    buf = scratch(need) if need else None
    plans: dict[int, LayerPlan] = {}
    for layer, m in chosen.items():
        lo, hi = placement.spans[layer]
        target, base = host, 0
        if m == "scratch":
            assert buf is not None
            target, base = buf[: hi - lo], lo
        ops: list[Op] = []
        for i in placement.by_layer[layer]:
            seg = placement.segments[i]
            group = cache.layout.layers[seg.layer].caches[seg.cache].group
            region = target[placement.offsets[i] - base : placement.offsets[i] - base + seg.nbytes]
            ops += segment_ops(cache, seg, region, tables.get(table_key(tables, seg.layer, group)),
                               slot_of(slot, seg.layer), to_region=to_host, direct=m == "direct")
        if m == "scratch":  # the one span copy of the layer, after the gather or before the scatter
            span = (COPY, host[lo:hi], target, None) if to_host else (COPY, target, host[lo:hi], None)
            ops = [*ops, span] if to_host else [span, *ops]
        plans[layer] = LayerPlan(layer, m, ops, placement.layer_bytes(layer))
    return plans


def bind_indices(plans: Mapping[int, LayerPlan], upload: Callable[[torch.Tensor], tuple[Any, Any, Any]]
                 ) -> tuple[Any, Any, Any]:
    """Replace the plans' block-id lists with slices of one int64 tensor made by ``upload(host_ids)``
    (one host-to-device copy per request). Returns ``upload``'s ``(ids, ready event, keep-alive)``."""
    import torch

    flat: list[int] = []
    where: list[tuple[LayerPlan, int, int, int]] = []
    for plan in plans.values():
        for i, (kind, _dst, _src, idx) in enumerate(plan.ops):
            if kind != COPY:
                where.append((plan, i, len(flat), len(idx)))
                flat.extend(idx)
    if not flat:
        return None, None, None
    ids, ready, keep = upload(torch.tensor(flat, dtype=torch.int64))
    for plan, i, a, n in where:
        kind, dst, src, _ = plan.ops[i]
        plan.ops[i] = (kind, dst, src, ids[a : a + n])
    return ids, ready, keep


def run_ops(ops: Sequence[Op]) -> None:
    """Enqueue (GPU) or run (CPU) one plan's copies on the current stream.

    Under ``torch.inference_mode``: engines (vLLM) allocate their cache and build requests inside it, so the
    views in a plan may be inference tensors, which torch lets this thread write only in that mode. Raw-byte
    copies need no autograd either way."""
    import torch

    with torch.inference_mode():
        for kind, dst, src, idx in ops:
            if kind == COPY:
                dst.copy_(src, non_blocking=True)
            elif kind == SELECT:
                torch.index_select(src, 0, idx, out=dst)
            else:
                dst.index_copy_(0, idx, src)
