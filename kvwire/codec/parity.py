"""Tail parity: erasure-coded repair blocks for a transfer's last layer, so that a lane stalled by one lost
packet does not hold the transfer for a round trip.

Why: on a long path a TCP loss costs the lane that carried it about one round trip (the sender learns of it
from later packets' SACKs, then the repair crosses the path), and every byte behind it on that lane waits in
the receiver's kernel meanwhile. Early in a transfer the other lanes' bytes hide that; in the last layer
nothing does, so one loss in it adds a round trip to the time the receiver waits for a prefill's last layer.
With tail parity the sender codes the last layer's chunks in groups of ``size`` consecutive ones (about one
a lane: they go out together) and sends ``m`` chunks of Reed-Solomon parity (GF(2^8), the ``zfec`` library)
for each group right after the layer's data (behind it on every lane, so parity never delays a data
byte): any ``k`` of a group's ``k + m`` chunks rebuild it, so the receiver finishes without the lanes that a
few losses held back. The parity's own chunks end with their group's data digests, so a rebuilt chunk is
verified end to end like one that arrived. The cost: ``m / size`` more bytes of the last layer, after it.

Owns: the groups' geometry (``TailGroups``: which chunks, block sizes, the parity chunks' indices and
lengths, scratch rows), the parity payload's layout (a parity block over the group's zero padded data blocks,
then their ``k`` little-endian u64 digests) and its checks, and the calls into ``zfec`` (imported lazily: an
optional dependency, ``kvwire[fec]``). Must not know: sockets, threads, lanes, transfers' states or who holds
which buffer.
"""

from __future__ import annotations

import importlib
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import KvwireError, ProtocolError
from .frames import Header
from .plan import ChunkPlan

#: the most parity chunks per group a manifest may ask for, and the most data chunks one group may have
MAX_PARITY = 8
MAX_GROUP = 64
#: the WELCOME ``limits`` key of a receiver that rebuilds tail groups (value: the most parity it takes)
PARITY_KEY = "parity"
#: a receiver's counters of tail parity (``Receiver.stats``): parity chunks verified, parity that failed its
#: hash, data chunks rebuilt before their copy arrived, rebuilt chunks that failed their check
COUNTERS = ("parity_chunks", "parity_rejected", "chunks_rebuilt", "rebuilds_failed")
_DIGEST = struct.Struct("<Q")


def available() -> bool:
    """``zfec`` can be imported here (``pip install kvwire[fec]``)."""
    try:
        importlib.import_module("zfec")
    except ImportError:
        return False
    return True


def setting(value: object) -> int | None:
    """A sender's tail parity setting (``connect(tail_parity=...)``; the bench's and the engines' settings
    come here once parsed), checked: ``None`` (the default: chosen by the path) or an int in
    0..``MAX_PARITY``; ``ValueError`` otherwise (a bool, or a float: 2.9 is not 2), ``KvwireError`` for a
    count where zfec does not import."""
    if value is None:
        return None
    if type(value) is not int or not 0 <= value <= MAX_PARITY:
        raise ValueError(f"tail_parity must be an int in 0..{MAX_PARITY} (or None: by the path), got {value!r}")
    if value and not available():
        raise KvwireError(f"tail_parity={value} needs the zfec package here: pip install 'kvwire[fec]'")
    return value


def parse_offer(limits: Mapping[str, Any]) -> int:
    """How many parity chunks a receiver's WELCOME ``limits`` say it takes (0: none; an older receiver,
    one without ``zfec``, or a value that is not an int in [1, MAX_PARITY])."""
    v = limits.get(PARITY_KEY)
    return v if type(v) is int and 0 < v <= MAX_PARITY else 0


def check_geometry(k: int, m: int) -> None:
    """``ProtocolError`` unless ``k`` data and ``m`` parity chunks are a group this module codes."""
    if not (type(k) is int and type(m) is int and 1 <= k <= MAX_GROUP and 1 <= m <= MAX_PARITY):
        raise ProtocolError(f"tail parity needs 1..{MAX_GROUP} data and 1..{MAX_PARITY} parity chunks, "
                            f"got {k!r} and {m!r}")


@dataclass(frozen=True)
class TailGroups:
    """The last layer's ``count`` data chunks (plan indices ``first ..``), coded in groups of ``size``
    consecutive chunks (the last group may be smaller), each with ``m`` parity chunks, numbered from
    ``num_chunks`` on the wire, group by group. Consecutive chunks go out on different lanes at about the
    same time, so a lane a loss holds back misses about one chunk of each group it meets.

    Rows number every chunk of them for a receiver's bookkeeping: data ``0 .. count - 1``, then parity. In its
    group's code a data chunk is block ``i`` (its place in the group) and parity chunk ``j`` block ``k + j``.
    A receiver's scratch holds each parity chunk, and each data chunk only while a lane reads and checks it
    (then it is placed, and a rebuild reads it from its destination): about one row a lane, ``size``."""

    first: int
    count: int
    size: int
    m: int
    num_chunks: int
    layer: int
    blocks: tuple[int, ...]  # per group: its longest data chunk (the others are coded as if zero padded to it)

    @classmethod
    def of(cls, plan: ChunkPlan, size: int, m: int) -> TailGroups:
        """The groups over ``plan``'s last layer (its chunks are the plan's last ones)."""
        check_geometry(size, m)
        layer = plan.layers[-1]
        chunks = plan.layer_chunks[layer]
        blocks = tuple(max(plan.lengths[c] for c in chunks[g:g + size]) for g in range(0, len(chunks), size))
        return cls(chunks.start, len(chunks), size, m, plan.num_chunks, layer, blocks)

    @property
    def groups(self) -> int:
        return len(self.blocks)

    @property
    def rows(self) -> int:
        """Every chunk of the groups, data and parity (the receiver's bookkeeping, a byte each)."""
        return self.count + self.groups * self.m

    @property
    def width(self) -> int:
        """A scratch row: the longest parity chunk (block and digests)."""
        return max(self.parity_length(g) for g in range(self.groups))

    @property
    def scratch_bytes(self) -> int:
        """What a receiver's scratch holds at most for these groups (as long as its lanes read no more of the
        layer at once than the sender's ``size``): a row per parity chunk, and a row for each data chunk a
        lane is reading."""
        return (self.groups * self.m + self.size) * self.width

    def k(self, group: int) -> int:
        """Data chunks in ``group``."""
        return min(self.size, self.count - group * self.size)

    def data(self, group: int) -> range:
        start = self.first + group * self.size
        return range(start, start + self.k(group))

    def parity(self, group: int) -> range:
        start = self.num_chunks + group * self.m
        return range(start, start + self.m)

    def parity_length(self, group: int) -> int:
        """A parity chunk's payload: its block, then the group's data digests."""
        return self.blocks[group] + _DIGEST.size * self.k(group)

    def covers(self, chunk: int) -> bool:
        """``chunk`` (a wire index) is one of the groups', data or parity."""
        return self.first <= chunk < self.num_chunks + self.groups * self.m

    def is_parity(self, chunk: int) -> bool:
        return self.num_chunks <= chunk < self.num_chunks + self.groups * self.m

    def group(self, chunk: int) -> int:
        return (chunk - self.num_chunks) // self.m if chunk >= self.num_chunks else (chunk - self.first) // self.size

    def row(self, chunk: int) -> int:
        return chunk - self.first if chunk < self.num_chunks else self.count + chunk - self.num_chunks

    def block_id(self, chunk: int) -> int:
        """The chunk's block number in its group's code."""
        g = self.group(chunk)
        return chunk - self.data(g).start if chunk < self.num_chunks else self.k(g) + chunk - self.parity(g).start

    def check_parity_header(self, h: Header) -> None:
        """A parity chunk's header must name one of the parity chunks, whole."""
        if not self.is_parity(h.chunk):
            raise ProtocolError(f"parity chunk {h.chunk} outside the {self.groups * self.m} of the transfer")
        g = self.group(h.chunk)
        if (h.layer, h.offset, h.length) != (self.layer, 0, self.parity_length(g)):
            raise ProtocolError(f"parity chunk {h.chunk} claims layer={h.layer} offset={h.offset} length={h.length}"
                                f", its group says {self.layer}/0/{self.parity_length(g)}")


def pack_digests(digests: Sequence[int]) -> bytes:
    """The parity payload's trailer: the data chunks' digests in order (0 for an unhashed transfer)."""
    return struct.pack(f"<{len(digests)}Q", *digests)


def unpack_digests(trailer: bytes | memoryview, k: int) -> tuple[int, ...]:
    if len(trailer) != _DIGEST.size * k:
        raise ProtocolError(f"parity trailer of {len(trailer)} bytes for {k} digests")
    return struct.unpack(f"<{k}Q", trailer)


def _zfec() -> Any:
    try:
        return importlib.import_module("zfec")
    except ImportError as e:
        raise RuntimeError("tail parity needs the zfec package: pip install 'kvwire[fec]'") from e


def encode(blocks: Sequence[bytes | memoryview], m: int, which: Sequence[int] | None = None) -> list[bytes]:
    """The parity blocks ``which`` (0 .. m - 1; default all ``m``, in order) of ``blocks`` (the ``k`` data
    blocks, equal lengths). The cost is per parity block: one of ``m`` costs ``1 / m`` of all."""
    k = len(blocks)
    check_geometry(k, m)
    want = range(m) if which is None else which
    return list(_zfec().Encoder(k, k + m).encode(tuple(blocks), tuple(k + j for j in want)))


def decode(present: Mapping[int, bytes | memoryview], k: int, m: int, want: Sequence[int]) -> dict[int, bytes]:
    """The data blocks ``want`` (block numbers ``< k``) from ``k`` of the group's blocks by number (``present``:
    at least ``k``; data blocks are used first)."""
    check_geometry(k, m)
    rows = sorted(present)[:k] if len(present) >= k else None
    if rows is None:
        raise ValueError(f"{len(present)} blocks cannot rebuild a group of {k}")
    got = _zfec().Decoder(k, k + m).decode(tuple(present[r] for r in rows), tuple(rows))
    return {r: bytes(got[r]) if not isinstance(got[r], bytes) else got[r] for r in want}
