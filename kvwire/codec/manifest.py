"""The per-transfer manifest: what a BEGIN message carries, and its validation.

Owns: the manifest's fields, its msgpack form (version 1) and every check a receiver makes before it
asks the application for a destination buffer. Must not know: sockets, threads or buffers.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any

from ..errors import LayoutError, LayoutMismatch, ProtocolError
from .compat import check_compatible
from .frames import DEFAULT_LIMITS, MIN_CHUNK, Limits
from .layout import TOKEN, CacheSpec, ModelLayout, RequestSpec, Segment, plan_segments, token_range
from .parity import TailGroups, check_geometry
from .plan import ALIGN, ChunkPlan, plan_chunks

MANIFEST_VERSION = 1
#: what a receiver holds per segment and per chunk of a transfer in flight besides its payload (the
#: parsed segment, its destination view, plan and state-machine entries): measured ~390 B per
#: segment and ~150 B per chunk in CPython 3.11, rounded up. Charged against the receiver's in-flight
#: budget, so transfers that carry no payload still cost what they hold.
METADATA_BYTES_PER_SEGMENT = 512
METADATA_BYTES_PER_CHUNK = 256
HASH_XXH3 = "xxh3_64"
HASH_NONE = "none"


@dataclass(frozen=True)
class Manifest:
    transfer_id: int
    fingerprint: bytes
    request: RequestSpec
    segments: tuple[Segment, ...]
    chunk_size: int
    hash: str = HASH_XXH3
    layout: ModelLayout | None = None  # sent with the first transfer of a layout on a session
    sink: bool = False  # a capacity probe: the receiver reads and discards the payload (see codec.probe)
    group_size: int = 0  # with ``parity``: the last layer's chunks are coded in groups of this many (``codec.parity``)
    parity: int = 0  # parity chunks per group of the last layer's chunks (0: none)

    @cached_property
    def total_bytes(self) -> int:
        return sum(s.nbytes for s in self.segments)

    @cached_property
    def metadata_bytes(self) -> int:
        """Memory a receiver holds for this transfer besides the payload (an upper estimate)."""
        chunks = self.total_bytes // self.chunk_size + len(self.segments) + 1  # as parse_manifest bounds it
        return METADATA_BYTES_PER_SEGMENT * len(self.segments) + METADATA_BYTES_PER_CHUNK * chunks

    @property
    def hashed(self) -> bool:
        return self.hash == HASH_XXH3

    @cached_property
    def tail_groups(self) -> TailGroups | None:
        """The last layer's parity groups (``codec.parity``), or None without parity: the one place both ends
        derive them from the manifest."""
        return TailGroups.of(self.plan(), self.group_size, self.parity) if self.parity else None

    @property
    def tail_scratch_bytes(self) -> int:
        """What a receiver holds to rebuild the last layer's groups: a row per parity chunk and one for each data
        chunk being read (the sender's lanes: ``group_size``), each as wide as the widest parity chunk (0
        without parity)."""
        return self.tail_groups.scratch_bytes if self.tail_groups is not None else 0

    def plan(self) -> ChunkPlan:
        return plan_chunks(self.segments, self.chunk_size)

    def to_wire(self, with_layout: bool = False) -> dict[str, Any]:
        d: dict[str, Any] = {
            "v": MANIFEST_VERSION,
            "tid": self.transfer_id,
            "fp": self.fingerprint,
            "req": self.request.to_dict(),
            "seg": [[s.layer, s.cache, s.tensor, s.nbytes, s.token_start, s.token_count]
                    for s in self.segments],
            "chunk": self.chunk_size,
            "hash": self.hash,
        }
        if with_layout and self.layout is not None:
            d["layout"] = self.layout.to_dict()
        if self.sink:
            d["sink"] = True  # only when set: a manifest without the key is an ordinary transfer
        if self.parity:
            d["par"] = [self.group_size, self.parity]  # only when set: older receivers never see it
        return d


def build_manifest(transfer_id: int, layout: ModelLayout, request: RequestSpec, chunk_size: int,
                   hashed: bool = True, sink: bool = False) -> Manifest:
    return Manifest(transfer_id, layout.fingerprint(), request, tuple(plan_segments(layout, request)),
                    chunk_size, HASH_XXH3 if hashed else HASH_NONE, layout, sink)


def max_chunk_size(limits: Limits) -> int:
    """Largest chunk_size whose planned chunks (up to 1.5x, aligned) stay within max_chunk."""
    return (limits.max_chunk - ALIGN) * 2 // 3


def _int(d: dict[str, Any], key: str, lo: int, hi: int) -> int:
    v = d.get(key)
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise ProtocolError(f"manifest field {key!r} must be an int in [{lo}, {hi}], got {v!r}")
    return v


def parse_manifest(d: Any, limits: Limits = DEFAULT_LIMITS,
                   known_layouts: dict[bytes, ModelLayout] | None = None) -> Manifest:
    """Validate a manifest from the network. Raises ProtocolError (malformed, over a limit) or
    LayoutMismatch (segments inconsistent with the layout the fingerprint names)."""
    if not isinstance(d, dict):
        raise ProtocolError(f"manifest must be a map, got {type(d).__name__}")
    if d.get("v") != MANIFEST_VERSION:
        raise ProtocolError(f"manifest version {d.get('v')!r} not supported (want {MANIFEST_VERSION})")
    tid = _int(d, "tid", 0, (1 << 64) - 1)
    fp = d.get("fp")
    if not isinstance(fp, bytes) or len(fp) != 16:
        raise ProtocolError("manifest fingerprint must be 16 bytes")
    chunk = _int(d, "chunk", MIN_CHUNK, max_chunk_size(limits))
    hash_name = d.get("hash")
    if hash_name not in (HASH_XXH3, HASH_NONE):
        raise ProtocolError(f"unknown hash {hash_name!r}")
    sink = d.get("sink", False)
    if type(sink) is not bool:
        raise ProtocolError(f"manifest field 'sink' must be a bool, got {sink!r}")
    try:
        request = RequestSpec.from_dict(d.get("req"))
    except LayoutError as e:
        raise ProtocolError(f"manifest request: {e}") from None
    raw = d.get("seg")
    if not isinstance(raw, list) or len(raw) > limits.max_segments:
        raise ProtocolError(f"manifest needs a list of at most {limits.max_segments} segments")
    segments: list[Segment] = []
    total = prev = 0
    max_layers, max_bytes = limits.max_layers, limits.max_transfer_bytes
    for i, s in enumerate(raw):
        if type(s) is not list or len(s) != 6:
            raise ProtocolError(f"segment {i} malformed")
        layer, cache, tensor, nbytes, tok0, ntok = s
        # exact ints (msgpack yields int or bool; bool is refused), non-negative; unrolled: this runs per segment
        if (type(layer) is not int or type(cache) is not int or type(tensor) is not int or type(nbytes) is not int
                or type(tok0) is not int or type(ntok) is not int or min(s) < 0):
            raise ProtocolError(f"segment {i} malformed")
        if layer >= max_layers or cache > 16 or tensor > 16:
            raise ProtocolError(f"segment {i} indices out of range")
        if layer < prev:
            raise ProtocolError(f"segment {i} goes back to layer {layer}")
        prev = layer
        total += nbytes
        if total > max_bytes:
            raise ProtocolError(f"transfer exceeds the {max_bytes}-byte limit")
        segments.append(Segment(i, layer, cache, tensor, "", nbytes, tok0, ntok))
    layout = None
    if "layout" in d:
        try:
            # (a layout with more tensors than a manifest may carry segments is one no transfer carries whole;
            # the bound also caps what a layout the receiver keeps for the session costs: ``rxengine``)
            layout = ModelLayout.from_dict(d["layout"], limits.max_layers, limits.max_segments)
        except LayoutError as e:
            raise ProtocolError(f"manifest layout: {e}") from None
        if layout.fingerprint() != fp:
            raise ProtocolError("manifest layout does not match its fingerprint")
    elif known_layouts is not None:
        layout = known_layouts.get(fp)
    group_size, parity = _parity(d, sink)
    m = Manifest(tid, fp, request, tuple(segments), chunk, hash_name, layout, sink, group_size, parity)
    if layout is not None:
        check_segments(m, layout)
    if total // chunk + len(segments) + 1 > limits.max_chunks:
        raise ProtocolError(f"transfer would need more than {limits.max_chunks} chunks")
    if parity and not m.total_bytes:
        raise ProtocolError("tail parity on a transfer without payload")
    if m.tail_groups is not None and m.tail_groups.width > limits.max_chunk:  # (after the max_chunks check)
        raise ProtocolError(f"tail parity chunks would exceed max_chunk ({limits.max_chunk})")
    return m


def _parity(d: dict[str, Any], sink: bool) -> tuple[int, int]:
    """The manifest's ``"par": [group size, parity chunks per group]`` (absent: (0, 0)), checked: groups
    ``codec.parity`` codes, never on a sink."""
    if "par" not in d:
        return 0, 0
    par = d["par"]
    if type(par) is not list or len(par) != 2:
        raise ProtocolError(f"manifest field 'par' must be [group size, parity chunks], got {par!r}")
    if sink:
        raise ProtocolError("tail parity on a sink transfer (its payload is dropped)")
    check_geometry(par[0], par[1])
    return par[0], par[1]


_Row = tuple[int, int, int, int, int, int]  # layer, cache, tensor, nbytes, token_start, token_count
# Per layout, for each cache in send order: its rows when request-indexed (the same for every request), or
# (layer, cache index, CacheSpec, per-tensor bytes per token) when token-indexed. Keyed by identity; an entry
# holds its layout, so the id cannot be reused while cached.
_CacheRows = list[_Row] | tuple[int, int, CacheSpec, tuple[int, ...]]
_LAYOUT_ROWS: dict[int, tuple[ModelLayout, list[_CacheRows]]] = {}
_LAYOUT_ROWS_MAX = 64


def _cache_rows(layout: ModelLayout) -> list[_CacheRows]:
    hit = _LAYOUT_ROWS.get(id(layout))
    if hit is not None and hit[0] is layout:
        return hit[1]
    rows: list[_CacheRows] = []
    for layer in layout.layers:
        for ci, cache in enumerate(layer.caches):
            if cache.indexing == TOKEN:
                rows.append((layer.index, ci, cache, tuple(t.nbytes for t in cache.tensors)))
            else:
                rows.append([(layer.index, ci, ti, t.nbytes, 0, 0) for ti, t in enumerate(cache.tensors)])
    if len(_LAYOUT_ROWS) >= _LAYOUT_ROWS_MAX:
        _LAYOUT_ROWS.clear()
    _LAYOUT_ROWS[id(layout)] = (layout, rows)
    return rows


def expected_rows(layout: ModelLayout, request: RequestSpec) -> list[_Row]:
    """``plan_segments(layout, request)`` as bare rows, without building Segment objects (the receiver's
    per-transfer check). Must equal it row for row: tests compare the two over every preset."""
    out: list[_Row] = []
    for entry in _cache_rows(layout):
        if isinstance(entry, list):
            out += entry
        else:
            li, ci, cache, sizes = entry
            start, stop = token_range(cache, request)
            if stop > start:  # tensor sizes are positive, so a tensor has bytes iff it has tokens
                count = stop - start
                out += [(li, ci, ti, count * n, start, count) for ti, n in enumerate(sizes)]
    return out


def check_segments(m: Manifest, layout: ModelLayout) -> None:
    """The manifest's segments must be exactly what the layout and request imply."""
    want = expected_rows(layout, m.request)
    got = [(s.layer, s.cache, s.tensor, s.nbytes, s.token_start, s.token_count) for s in m.segments]
    if got != want:
        raise LayoutMismatch(
            f"manifest segments ({len(got)}) do not match layout {layout.name!r} for request "
            f"{m.request.request_id} ({len(want)} expected)"
        )


def check_manifest_against(m: Manifest, receiver_layout: ModelLayout) -> None:
    """Receiver side: the sender's layout (by fingerprint or in full) must equal ours."""
    if m.layout is not None:
        check_compatible(m.layout, receiver_layout)
    elif m.fingerprint != receiver_layout.fingerprint():
        raise LayoutMismatch("sender layout fingerprint differs from the receiver's layout")
    check_segments(m, receiver_layout)
