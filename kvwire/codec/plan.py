"""Chunk planning: cut a request's segments into chunks, layer by layer.

Owns: the mapping from a transfer's flat payload (segments back to back, in send order) to chunks,
and from a chunk back to the pieces of segments it covers. Both sides derive the same plan from the
manifest, so a chunk on the wire is fully checked by (index, offset, length). Must not know: sockets,
buffers, hashing or layouts beyond ``Segment``.

A chunk never spans two layers, so layer i can leave as soon as it is ready. Inside a layer the
bytes are split into equal chunks of about ``chunk_size`` (never more than 1.5x, never tiny unless
the whole layer is), and a chunk may span several small segments of that layer (conv + ssm).
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Sequence
from dataclasses import dataclass

from ..errors import ProtocolError
from .frames import MIN_CHUNK
from .layout import Segment

DEFAULT_CHUNK = 2 * 1024 * 1024
ALIGN = 4096
#: ``spread_chunk_size`` never cuts finer than this (per-chunk costs: a header, a hash, an acknowledgement)
SPREAD_FLOOR = 256 * 1024
#: ... and cuts the largest layer into about this many chunks per lane, so that lanes share it out as they
#: free up (a lane slowed by an earlier layer's bytes, BBR's 0.75 gain phase or a loss takes fewer)
SPREAD_PER_LANE = 4


@dataclass(frozen=True)
class ChunkPlan:
    """Chunk ``i`` covers flat bytes ``[offsets[i], offsets[i] + lengths[i])`` of layer ``layers[i]``."""

    offsets: tuple[int, ...]
    lengths: tuple[int, ...]
    layers: tuple[int, ...]
    segment_offsets: tuple[int, ...]  # flat start of each segment, plus the total at the end
    layer_chunks: dict[int, range]  # layer -> its chunk indices (absent: layer has no bytes)
    total: int

    @property
    def num_chunks(self) -> int:
        return len(self.offsets)

    def pieces(self, chunk: int) -> list[tuple[int, int, int]]:
        """The segment pieces chunk ``chunk`` covers: ``(segment, start, stop)`` within each segment."""
        lo = self.offsets[chunk]
        hi = lo + self.lengths[chunk]
        seg = bisect_right(self.segment_offsets, lo) - 1
        out = []
        while lo < hi:
            s0, s1 = self.segment_offsets[seg], self.segment_offsets[seg + 1]
            stop = min(hi, s1)
            if stop > lo:
                out.append((seg, lo - s0, stop - s0))
            lo = stop
            seg += 1
        return out


def plan_chunks(segments: Sequence[Segment], chunk_size: int = DEFAULT_CHUNK, max_chunk: int | None = None
                ) -> ChunkPlan:
    if chunk_size < MIN_CHUNK:
        raise ValueError(f"chunk_size {chunk_size} below the {MIN_CHUNK}-byte minimum")
    cap = max_chunk if max_chunk is not None else chunk_size + chunk_size // 2
    seg_offsets = [0]
    for s in segments:
        seg_offsets.append(seg_offsets[-1] + s.nbytes)
    offsets: list[int] = []
    lengths: list[int] = []
    layers: list[int] = []
    layer_chunks: dict[int, range] = {}
    seen: set[int] = set()  # layers already planned: one pass, not a scan of the rest per layer
    i = 0
    while i < len(segments):
        layer = segments[i].layer
        if layer in seen:
            raise ValueError(f"segments of layer {layer} are not contiguous in send order")
        seen.add(layer)
        j = i
        while j < len(segments) and segments[j].layer == layer:
            j += 1
        start, stop = seg_offsets[i], seg_offsets[j]
        size = stop - start
        if size:
            n = max(1, round(size / chunk_size))
            while -(-size // n) > cap:
                n += 1
            # Cut k sits at k*size/n rounded down to ALIGN: every chunk is within ALIGN of size/n, so
            # none exceeds cap + ALIGN and the last one is never a sliver.
            first = len(offsets)
            pos = start
            for k in range(1, n + 1):
                cut = stop if k == n else start + (size * k // n) // ALIGN * ALIGN
                if cut > pos:
                    offsets.append(pos)
                    lengths.append(cut - pos)
                    layers.append(layer)
                    pos = cut
            layer_chunks[layer] = range(first, len(offsets))
        i = j
    return ChunkPlan(tuple(offsets), tuple(lengths), tuple(layers), tuple(seg_offsets), layer_chunks,
                     seg_offsets[-1])


def spread_chunk_size(segments: Sequence[Segment], lanes: int, chunk_size: int = DEFAULT_CHUNK,
                      floor: int = SPREAD_FLOOR, per_lane: int = SPREAD_PER_LANE) -> int:
    """The chunk size for one transfer of ``segments`` over ``lanes`` lanes: ``chunk_size``, or less, so that
    the largest layer is cut into about ``per_lane`` chunks per lane (never below ``floor`` or ``MIN_CHUNK``).
    Unchanged when the largest layer fits one chunk (it never spanned lanes) or already has that many.

    Why: one chunk goes out on one lane, and paced lanes each get an even share of the aggregate rate, so
    a layer cut into fewer chunks than there are lanes moves at that fraction of the rate; when it is the
    last one written (a prefill streaming layer by layer) its wire time is what the receiver waits for.
    And one chunk a lane is not enough: the layer is done when its slowest lane is, and lanes differ (one
    still sends the layer before, BBR's 0.75 gain phase paces one at three quarters, a loss costs one a
    round trip). Cut finer, lanes take the next chunk as they free up, so a slow lane takes fewer: on the
    stream row's 2 Gbit/s, 80 ms link with 16 lanes the last layer's last chunk landed a median 70 ms after
    its median chunk with one 1 MiB chunk a lane, about 10 ms with four of 256 KiB when no loss hit it.
    Pure; both sides then plan from the manifest's chunk size as usual."""
    per_layer: dict[int, int] = {}
    for sg in segments:
        per_layer[sg.layer] = per_layer.get(sg.layer, 0) + sg.nbytes
    largest = max(per_layer.values(), default=0)
    if lanes <= 1 or largest <= chunk_size:
        return chunk_size
    spread = -(-largest // (lanes * max(1, per_lane)))  # ceil
    spread = -(-spread // ALIGN) * ALIGN
    return max(min(chunk_size, spread), min(chunk_size, max(floor, MIN_CHUNK)))


def check_chunk(plan: ChunkPlan, chunk: int, offset: int, length: int, layer: int) -> None:
    """A chunk header must name exactly one planned chunk."""
    if not 0 <= chunk < plan.num_chunks:
        raise ProtocolError(f"chunk index {chunk} outside plan of {plan.num_chunks}")
    if (plan.offsets[chunk], plan.lengths[chunk], plan.layers[chunk]) != (offset, length, layer):
        raise ProtocolError(
            f"chunk {chunk} claims offset={offset} length={length} layer={layer}, plan says "
            f"{plan.offsets[chunk]}/{plan.lengths[chunk]}/{plan.layers[chunk]}"
        )
