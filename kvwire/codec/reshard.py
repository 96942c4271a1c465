"""Re-sharding plans: when prefill runs at TP=a and decode at TP=b, which bytes each decode rank needs from
which prefill ranks, and where they land.

Owns: the global meaning of every sharded tensor axis (KV heads, conv channels per sub-projection, state
heads), derived from both sides' layouts; the rank-to-unit maps (even split; replication when a rank
count exceeds the units, for GQA with kv_heads < TP and Mamba2 groups padded up to TP); the choice of one
source rank for bytes several prefill ranks hold (replicated caches are sent once to each decode rank);
the per-(prefill rank, decode rank) slice layout the transport carries; and the byte-level copies of one
request (Python ints, so offsets are 64-bit and beyond). Must not know: sockets, threads, buffers' memory
(it computes offsets and never touches bytes), torch.

Geometry. Every wire segment (see ``layout.py``) is viewed as ``(outer, axis, inner)``: ``outer`` rows of
``axis`` elements of ``inner`` bytes, where ``axis`` is the TP-sharded axis. NHD K/V: ``(tokens, heads,
head_dim*b)``; HND: ``(1, heads, tokens*head_dim*b)``; conv SD ``(K-1, dim, b)``; conv DS/HF ``(1, dim,
(K-1|K)*b)``; recurrent states ``(1, heads|d_inner, rest*b)``; replicated tensors (MLA latent, raw aux
rows) ``(1, 1, nbytes)``. A piece moves ``length`` axis elements in every row: ``rows = outer`` runs of
``length*inner`` bytes, contiguous on a side when ``rows == 1`` or ``length`` is that side's whole axis.

Wire form of a slice: each piece is one segment of the slice layout, its rows back to back.
"""

from __future__ import annotations

import functools
import math
import numbers
import reprlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, NamedTuple

from ..errors import ReshardUnsupported
from .layout import (
    TOKEN,
    CacheSpec,
    LayerSpec,
    ModelLayout,
    RequestSpec,
    TensorSpec,
    conv_rank_split,
    plan_segments,
)


@dataclass(frozen=True)
class AxisPart:
    """One sub-projection of a sharded axis, globally: ``units`` units of ``unit`` axis elements each."""

    units: int
    unit: int

    def held(self, tp: int, rank: int) -> tuple[int, int]:
        """``(first unit, count)`` rank ``rank`` of ``tp`` holds: an even split, or one replicated unit
        (rank r holds unit ``r // (tp // units)``: vLLM's KV-head replicas and padded Mamba2 groups)."""
        if self.units % tp == 0:
            k = self.units // tp
            return rank * k, k
        if tp % self.units == 0:
            return rank // (tp // self.units), 1
        raise ReshardUnsupported(f"{self.units} units cannot be split or replicated over tp={tp}")


class Piece(NamedTuple):
    """``length`` axis elements from prefill rank ``source`` (its element ``src_start``) to the decode rank's
    element ``dst_start``."""

    source: int
    src_start: int
    dst_start: int
    length: int


@dataclass(frozen=True)
class TensorRoute:
    """One tensor of one layer on one decode rank: its pieces, by destination order."""

    layer: int
    cache: int
    tensor: int
    name: str
    src_axis: int  # the sharded axis' length on a prefill rank
    dst_axis: int  # ... on a decode rank
    pieces: tuple[Piece, ...]


class SliceCopy(NamedTuple):
    """One slice segment of one request: ``rows`` runs of ``row_bytes`` from the prefill rank's segment
    ``src_segment`` (at ``src_offset + i*src_stride``) to the decode rank's segment ``dst_segment`` (at
    ``dst_offset + i*dst_stride``). Offsets are Python ints (64-bit safe)."""

    src_segment: int
    src_offset: int
    src_stride: int
    dst_segment: int
    dst_offset: int
    dst_stride: int
    row_bytes: int
    rows: int

    @property
    def nbytes(self) -> int:
        return self.rows * self.row_bytes

    @property
    def src_contiguous(self) -> bool:
        return self.rows == 1 or self.src_stride == self.row_bytes

    @property
    def dst_contiguous(self) -> bool:
        return self.rows == 1 or self.dst_stride == self.row_bytes


def _replicated_kind(cache: CacheSpec, t: TensorSpec) -> bool:
    return cache.kind in ("mla", "aux") or t.layout in ("latent", "raw")


def geometry(cache: CacheSpec, t: TensorSpec, tokens: int) -> tuple[int, int, int]:
    """``(outer, axis, inner bytes)`` of tensor ``t``'s wire segment holding ``tokens`` tokens."""
    b = t.itemsize
    if _replicated_kind(cache, t):
        return 1, 1, t.nbytes * (tokens if t.indexing == TOKEN else 1)
    rest = math.prod(t.shape[1:]) * b
    if t.layout == "NHD":
        return tokens, t.shape[0], rest
    if t.layout == "HND":
        return 1, t.shape[0], tokens * rest
    if t.layout == "conv:SD":
        return t.shape[0], t.shape[1], b
    return 1, t.shape[0], rest  # conv:DS, conv:HF, every ssm:* tag: the sharded axis leads


def _element_dims(cache: CacheSpec, t: TensorSpec) -> tuple[int, ...]:
    """The bytes of one sharded-axis element (per token, for token-indexed tensors) as a shape whose product
    they are: the tensor's other dims, then its item size."""
    if _replicated_kind(cache, t):
        return (*t.shape, t.itemsize)
    axis = 1 if t.layout == "conv:SD" else 0
    return (*t.shape[:axis], *t.shape[axis + 1:], t.itemsize)


def _axis(cache: CacheSpec, t: TensorSpec) -> int:
    return geometry(cache, t, 1)[1]


def _conv_split(t: TensorSpec, tp: int) -> tuple[int, ...]:
    try:
        return conv_rank_split(t, tp)
    except Exception as e:  # noqa: BLE001 - a LayoutError here means the pair cannot be mapped
        raise ReshardUnsupported(str(e)) from None


def _axis_parts(cache: CacheSpec, sp: TensorSpec, sd: TensorSpec, tp_p: int, tp_d: int,
                heads: int | None) -> tuple[AxisPart, ...]:
    """The global sub-projections of the sharded axis, derived from both sides (and checked against both)."""
    if _replicated_kind(cache, sp):
        if sp.shape != sd.shape:
            raise ReshardUnsupported(f"replicated tensor shapes differ: {sp.shape} vs {sd.shape}")
        return (AxisPart(1, 1),)
    a_p, a_d = _axis(cache, sp), _axis(cache, sd)
    if sp.layout in ("NHD", "HND"):
        cands = [n for n, rep, tp in ((a_p, sp.replicated, tp_p), (a_d, sd.replicated, tp_d)) if not rep]
        found = {n * tp for n, rep, tp in ((a_p, sp.replicated, tp_p), (a_d, sd.replicated, tp_d)) if not rep}
        if heads is not None:
            found.add(heads)
        if not cands and heads is None:  # replicated on both sides: H < both TPs and divides both
            g = math.gcd(tp_p, tp_d)
            possible = [h for h in range(1, g + 1) if g % h == 0 and h < min(tp_p, tp_d)]
            if len(possible) > 1 and max(tp_p, tp_d) % min(tp_p, tp_d) == 0:
                # one TP divides the other: rank r of the larger side holds the head of rank r*t//T of the
                # smaller (t), whatever the true count; mapping min(tp) virtual heads moves the right bytes
                possible = [min(tp_p, tp_d)]
            if len(possible) != 1:
                raise ReshardUnsupported(
                    f"{cache.kind} KV heads are replicated on both sides (tp {tp_p} and {tp_d}): their number "
                    f"({' or '.join(map(str, possible))}) is not in the layouts; "
                    f"pass heads={{{cache.kind!r}: kv_heads}}")
            found.add(possible[0])
        if len(found) != 1:
            raise ReshardUnsupported(f"{cache.kind} KV head counts disagree: {sorted(found)}")
        return (AxisPart(found.pop(), 1),)
    if sp.layout.startswith("conv:") and sp.sub_projections:
        if sp.sub_projections != sd.sub_projections:
            raise ReshardUnsupported(f"conv sub-projections differ: {sp.sub_projections} vs {sd.sub_projections}")
        out = []
        for p, s_p, s_d in zip(sp.sub_projections, _conv_split(sp, tp_p), _conv_split(sd, tp_d)):
            padded = {s for s, tp in ((s_p, tp_p), (s_d, tp_d)) if s * tp != p}
            if not padded:
                out.append(AxisPart(p, 1))
                continue
            unit = padded.pop()
            if padded or p % unit:
                raise ReshardUnsupported(f"conv part of {p} channels padded differently on the two sides")
            out.append(AxisPart(p // unit, unit))
        return tuple(out)
    if a_p * tp_p != a_d * tp_d:
        raise ReshardUnsupported(f"sharded axis {a_p} x tp {tp_p} != {a_d} x tp {tp_d}")
    return (AxisPart(a_p * tp_p, 1),)


def _part_offsets(parts: Sequence[AxisPart], tp: int, rank: int) -> tuple[list[int], int]:
    """Each part's offset in rank ``rank``'s axis, and the axis length."""
    offs, pos = [], 0
    for part in parts:
        offs.append(pos)
        pos += part.held(tp, rank)[1] * part.unit
    return offs, pos


def _merge(pieces: list[Piece]) -> tuple[Piece, ...]:
    out: list[Piece] = []
    for pc in sorted(pieces, key=lambda x: x.dst_start):
        last = out[-1] if out else None
        if (last is not None and last.source == pc.source and last.src_start + last.length == pc.src_start
                and last.dst_start + last.length == pc.dst_start):
            out[-1] = last._replace(length=last.length + pc.length)
        else:
            out.append(pc)
    return tuple(out)


def paired_ranks(tp_p: int, tp_d: int, d: int) -> range:
    """The prefill ranks SGLang pairs decode rank ``d`` with when one TP divides the other (its
    ``_resolve_rank_mapping``): ``[d*k, (d+1)*k)`` for ``k = tp_p // tp_d``, or ``d // (tp_d // tp_p)``.
    Replicated bytes are taken from these ranks where they hold them, so a decode rank draws from no more
    prefill ranks than SGLang's own backends connect it to."""
    if tp_p % tp_d == 0:
        k = tp_p // tp_d
        return range(d * k, (d + 1) * k)
    if tp_d % tp_p == 0:
        q = d // (tp_d // tp_p)
        return range(q, q + 1)
    return range(tp_p)


@functools.lru_cache(maxsize=8192)
def _tensor_pieces(cache: CacheSpec, sp: TensorSpec, sd: TensorSpec, tp_p: int, tp_d: int, heads: int | None,
                   spread: int = 0) -> tuple[tuple[Piece, ...], ...]:
    """Per decode rank, the pieces of one tensor (cached: layers repeat the same specs). Bytes that ``m``
    prefill ranks hold alike come from replica ``(decode rank + spread) % m``: the caller counts ``spread``
    up over the layers of each cache kind, so replicated caches (MLA, KV heads when kv_heads < TP) leave
    every replica in turn, among the replicas in decode rank's SGLang group (``paired_ranks``) where there are any."""
    where = f"{cache.kind}.{sp.name}"
    if (sp.dtype, sp.layout, sp.indexing) != (sd.dtype, sd.layout, sd.indexing):
        raise ReshardUnsupported(f"{where}: dtype/layout differ ({sp.dtype} {sp.layout} vs {sd.dtype} {sd.layout})")
    try:
        parts = _axis_parts(cache, sp, sd, tp_p, tp_d, heads)
        src_offs = [_part_offsets(parts, tp_p, p) for p in range(tp_p)]
        per_rank = []
        for d in range(tp_d):
            dst_offs, dst_len = _part_offsets(parts, tp_d, d)
            group = paired_ranks(tp_p, tp_d, d)
            pieces: list[Piece] = []
            for j, part in enumerate(parts):
                a, k = part.held(tp_d, d)
                if part.units % tp_p == 0:  # every unit on exactly one prefill rank
                    kp = part.units // tp_p
                    u = a
                    while u < a + k:
                        p = u // kp
                        stop = min(a + k, (p + 1) * kp)
                        pieces.append(Piece(p, src_offs[p][0][j] + (u - p * kp) * part.unit,
                                            dst_offs[j] + (u - a) * part.unit, (stop - u) * part.unit))
                        u = stop
                else:  # unit u replicated on prefill ranks [u*m, (u+1)*m): one of them sends it
                    m = tp_p // part.units
                    part.held(tp_p, 0)  # raises when the units neither split nor replicate over tp_p
                    for u in range(a, a + k):
                        held = range(u * m, (u + 1) * m)
                        replicas = [q for q in held if q in group] or list(held)
                        p = replicas[(d + spread) % len(replicas)]
                        pieces.append(Piece(p, src_offs[p][0][j], dst_offs[j] + (u - a) * part.unit, part.unit))
            merged = _merge(pieces)
            if dst_len != _axis(cache, sd) or any(o[1] != _axis(cache, sp) for o in src_offs):
                raise ReshardUnsupported(f"sub-projections {parts} do not add up to the per-rank axes "
                                         f"({_axis(cache, sp)} at tp {tp_p}, {_axis(cache, sd)} at tp {tp_d})")
            if sp.shape[1:] != sd.shape[1:] and not _replicated_kind(cache, sp) and sp.layout != "conv:SD":
                raise ReshardUnsupported(f"unsharded dims differ: {sp.shape} vs {sd.shape}")
            if sp.layout == "conv:SD" and sp.shape[0] != sd.shape[0]:
                raise ReshardUnsupported(f"conv widths differ: {sp.shape} vs {sd.shape}")
            per_rank.append(merged)
        return tuple(per_rank)
    except ReshardUnsupported as e:
        raise ReshardUnsupported(f"{where} (tp {tp_p} -> {tp_d}): {e}") from None


def check_rank(name: str, rank: Any, tp: int) -> int:
    """``rank`` as an int in ``0..tp-1`` (a numpy integer too): a float or bool is a ``TypeError`` (rank 0.0
    would name transfers ``r@0.0>0`` that no receiver expects), one out of range a ``ValueError``."""
    if isinstance(rank, bool) or not isinstance(rank, numbers.Integral):
        raise TypeError(f"{name} must be an int, not {type(rank).__name__}")
    r = int(rank)
    if not 0 <= r < tp:
        raise ValueError(f"{name} {r} outside tp {tp} (0..{tp - 1})")
    return r


def _key_layout(layout: ModelLayout) -> ModelLayout:
    """The cache key: any rank of a side stands for all of them."""
    return replace(layout, tp_rank=0)


class ReshardPlan:
    """Every decode rank's pieces, from every prefill rank, for one (prefill layout, decode layout) pair.

    Build it with ``plan_reshard`` (cached). ``routes[d]`` lists decode rank ``d``'s tensors with their
    pieces; ``slice_layout(p, d)`` is what prefill rank ``p`` sends decode rank ``d`` (one segment per
    piece); ``copies(p, d, request)`` the byte offsets of each of those segments on both sides.
    """

    def __init__(self, prefill: ModelLayout, decode: ModelLayout, heads: Mapping[str, int]) -> None:
        self.prefill = prefill
        self.decode = decode
        self.prefill_tp = prefill.tp_size
        self.decode_tp = decode.tp_size
        self.heads = dict(heads)
        if prefill.num_layers != decode.num_layers:
            raise ReshardUnsupported(f"layer count differs: {prefill.num_layers} vs {decode.num_layers}")
        routes: list[list[TensorRoute]] = [[] for _ in range(self.decode_tp)]
        turn: dict[str, int] = {}  # per cache kind, layers of it so far: replicas take turns by this count
        for lp, ld in zip(prefill.layers, decode.layers):
            if lp.kinds != ld.kinds:
                raise ReshardUnsupported(f"layer {lp.index}: cache kinds {lp.kinds} vs {ld.kinds}")
            for ci, (cp, cd) in enumerate(zip(lp.caches, ld.caches)):
                if cp.window != cd.window or len(cp.tensors) != len(cd.tensors):
                    raise ReshardUnsupported(f"layer {lp.index} {cp.kind}: window or tensor count differs")
                spread = turn.get(cp.kind, 0)
                turn[cp.kind] = spread + 1
                for ti, (sp, sd) in enumerate(zip(cp.tensors, cd.tensors)):
                    if sp.name != sd.name:
                        raise ReshardUnsupported(f"layer {lp.index} {cp.kind}: tensor {sp.name!r} vs {sd.name!r}")
                    try:
                        per_rank = _tensor_pieces(cp, sp, sd, self.prefill_tp, self.decode_tp,
                                                  self.heads.get(cp.kind), spread)
                    except ReshardUnsupported as e:
                        raise ReshardUnsupported(f"layer {lp.index} {e}") from None
                    name = f"{lp.index}.{cp.kind}.{sp.name}"
                    for d, pieces in enumerate(per_rank):
                        routes[d].append(TensorRoute(lp.index, ci, ti, name, _axis(cp, sp), _axis(cd, sd), pieces))
        self.routes: tuple[tuple[TensorRoute, ...], ...] = tuple(tuple(r) for r in routes)
        self._slices: dict[tuple[int, int], tuple[ModelLayout, tuple[tuple[TensorRoute, Piece], ...]]] = {}

    # ---- who talks to whom
    def sources(self, decode_rank: int) -> list[int]:
        """The prefill ranks decode rank ``decode_rank`` receives from."""
        d = check_rank("decode_rank", decode_rank, self.decode_tp)
        return sorted({pc.source for r in self.routes[d] for pc in r.pieces})

    def paired(self, decode_rank: int) -> list[int]:
        """The prefill ranks SGLang's own backends pair ``decode_rank`` with (``paired_ranks``); a superset of
        ``sources(decode_rank)`` when one TP divides the other."""
        return list(paired_ranks(self.prefill_tp, self.decode_tp, check_rank("decode_rank", decode_rank,
                                                                              self.decode_tp)))

    def targets(self, prefill_rank: int) -> list[int]:
        """The decode ranks prefill rank ``prefill_rank`` sends to."""
        p = check_rank("prefill_rank", prefill_rank, self.prefill_tp)
        return [d for d in range(self.decode_tp) if p in self.sources(d)]

    # ---- what travels
    def slice_layout(self, prefill_rank: int, decode_rank: int) -> ModelLayout:
        """The layout of what ``prefill_rank`` sends ``decode_rank``: per layer and cache, one raw uint8
        tensor per piece, shaped ``(length, *bytes of one axis element)`` and named after the piece (so a
        sender with another plan is refused by the receiver's fingerprint check). A layer without pieces is
        cache-less here."""
        return self._slice(prefill_rank, decode_rank)[0]

    def _slice(self, p: int, d: int) -> tuple[ModelLayout, tuple[tuple[TensorRoute, Piece], ...]]:
        p, d = check_rank("prefill_rank", p, self.prefill_tp), check_rank("decode_rank", d, self.decode_tp)
        key = (p, d)
        if key not in self._slices:
            by_cache: dict[tuple[int, int], list[TensorSpec]] = {}
            order: list[tuple[TensorRoute, Piece]] = []
            for r in self.routes[d]:
                cache = self.decode.layers[r.layer].caches[r.cache]
                t = cache.tensors[r.tensor]
                # bytes per axis element, as dims: a layout on the wire caps each dim at 2**31, a slice's
                # byte count may pass it (a 4 GiB state), the factors never do
                per_elem = _element_dims(cache, t)
                for pc in r.pieces:
                    if pc.source != p:
                        continue
                    name = f"{t.name}.p{p}[{pc.src_start}+{pc.length}]>{pc.dst_start}"
                    by_cache.setdefault((r.layer, r.cache), []).append(
                        TensorSpec(name, (pc.length, *per_elem), "uint8", "raw", t.indexing))
                    order.append((r, pc))
            layers = []
            for layer in self.decode.layers:
                caches = tuple(CacheSpec(c.kind, tuple(by_cache[(layer.index, ci)]), c.window)
                               for ci, c in enumerate(layer.caches) if (layer.index, ci) in by_cache)
                layers.append(LayerSpec(layer.index, caches))
            name = f"{self.decode.name} reshard p{p}/{self.prefill_tp}->d{d}/{self.decode_tp}"[:256]
            out = ModelLayout(name, tuple(layers), self.decode.block_size, self.decode_tp, d)
            self._slices[key] = (out, tuple(order))
        return self._slices[key]

    def copies(self, prefill_rank: int, decode_rank: int, request: RequestSpec) -> list[SliceCopy]:
        """One ``SliceCopy`` per segment of ``plan_segments(slice_layout(p, d), request)``, in order; segment
        numbers refer to ``plan_segments`` of the prefill and the decode layout for ``request``."""
        layout, order = self._slice(prefill_rank, decode_rank)
        src = {(s.layer, s.cache, s.tensor): s for s in plan_segments(self.prefill, request)}
        dst = {(s.layer, s.cache, s.tensor): s for s in plan_segments(self.decode, request)}
        out = []
        for r, pc in order:
            key = (r.layer, r.cache, r.tensor)
            if key not in dst:  # no tokens of this tensor travel in this request
                continue
            s_seg, d_seg = src[key], dst[key]
            cache = self.decode.layers[r.layer].caches[r.cache]
            outer, _, inner = geometry(cache, cache.tensors[r.tensor], d_seg.token_count)
            out.append(SliceCopy(s_seg.index, pc.src_start * inner, r.src_axis * inner, d_seg.index,
                                 pc.dst_start * inner, r.dst_axis * inner, pc.length * inner, outer))
        if len(out) != len(plan_segments(layout, request)):  # pragma: no cover - the slice layout mirrors routes
            raise AssertionError("slice segments and copies disagree")
        return out

    def wire_bytes(self, prefill_rank: int, decode_rank: int, request: RequestSpec) -> int:
        return sum(c.nbytes for c in self.copies(prefill_rank, decode_rank, request))

    def needed_bytes(self, decode_rank: int, request: RequestSpec) -> int:
        """The decode rank's own payload for ``request`` (every byte of it comes from exactly one piece)."""
        return sum(s.nbytes for s in plan_segments(self.decode, request))

    # ---- inspection
    def describe(self, request: RequestSpec | None = None) -> dict[str, Any]:
        """Per decode rank: sources, piece counts (direct landings vs scatters), and with ``request`` the
        bytes from each source."""
        ranks = []
        for d in range(self.decode_tp):
            pieces = [pc for r in self.routes[d] for pc in r.pieces]
            entry: dict[str, Any] = {"rank": d, "sources": self.sources(d), "pieces": len(pieces)}
            if request is not None:
                cs = {p: self.copies(p, d, request) for p in self.sources(d)}
                entry["bytes_from"] = {p: sum(c.nbytes for c in v) for p, v in cs.items()}
                entry["needed"] = self.needed_bytes(d, request)
                entry["direct"] = sum(c.dst_contiguous for v in cs.values() for c in v)
                entry["scatter"] = sum(not c.dst_contiguous for v in cs.values() for c in v)
                entry["gather"] = sum(not c.src_contiguous for v in cs.values() for c in v)
            ranks.append(entry)
        return {"model": self.decode.name, "prefill_tp": self.prefill_tp, "decode_tp": self.decode_tp,
                "layers": self.decode.num_layers, "ranks": ranks}

    def summary(self, request: RequestSpec | None = None) -> str:
        """A readable table of ``describe``."""
        info = self.describe(request)
        lines = [f"reshard {info['model'] or 'layout'}: prefill TP={self.prefill_tp} -> decode TP={self.decode_tp}, "
                 f"{info['layers']} layers"]
        for e in info["ranks"]:
            line = f"  decode rank {e['rank']}: from prefill ranks {e['sources']}, {e['pieces']} pieces"
            if request is not None:
                froms = ", ".join(f"p{p} {n:,} B" for p, n in e["bytes_from"].items())
                line += (f"; {e['needed']:,} B needed = {froms}; segments {e['direct']} direct, "
                         f"{e['scatter']} scattered, {e['gather']} gathered at the sender")
            lines.append(line)
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"ReshardPlan({self.decode.name!r}, tp {self.prefill_tp} -> {self.decode_tp})"


@functools.lru_cache(maxsize=64)
def _cached_plan(prefill: ModelLayout, decode: ModelLayout, heads: tuple[tuple[str, int], ...]) -> ReshardPlan:
    return ReshardPlan(prefill, decode, dict(heads))


def plan_reshard(prefill: ModelLayout, decode: ModelLayout, *, heads: Mapping[str, int] | None = None
                 ) -> ReshardPlan:
    """The plan for moving caches of ``prefill``'s TP onto ``decode``'s TP (either rank of either side may
    be given: the plan covers every rank). Computed once per layout pair (cached).

    ``heads`` (cache kind -> global KV heads) is needed only when both sides replicate a GQA/SWA cache's
    heads and their TP sizes share a factor: the head count is then in neither layout.
    Raises ``ReshardUnsupported`` naming the first tensor no plan can map; ``TypeError`` for a side that
    is not a ``ModelLayout`` or ``heads`` that is not a mapping of cache kind to int.
    """
    for name, side in (("prefill", prefill), ("decode", decode)):
        if not isinstance(side, ModelLayout):
            raise TypeError(f"{name} must be a ModelLayout, not {type(side).__name__}")
    if heads is not None and (not isinstance(heads, Mapping) or not all(
            isinstance(k, str) and isinstance(v, numbers.Integral) and not isinstance(v, bool)
            for k, v in heads.items())):
        raise TypeError(f"heads must be a mapping of cache kind (str) to global KV heads (int), "
                        f"not {type(heads).__name__} {reprlib.repr(heads)}")
    key = tuple(sorted((k, int(v)) for k, v in (heads or {}).items()))
    plan = _cached_plan(_key_layout(prefill), _key_layout(decode), key)
    return plan


def check_reshardable(prefill: ModelLayout, decode: ModelLayout, *, heads: Mapping[str, int] | None = None
                      ) -> ReshardPlan:
    """``plan_reshard`` under the name a compatibility check reads well with."""
    return plan_reshard(prefill, decode, heads=heads)

