"""The bytes of a transfer's last-layer parity groups (``codec.parity``): the sender's parity payloads, the receiver's
scratch and its rebuilds.

Owns: ``TailEncoder`` (the sender's: a group's data chunks as its code's blocks (their own views, zero padded
copies only where a chunk is short or in pieces), their digests, each parity payload computed once, on an encode
thread started as the layer is written or by the first lane that needs one before that thread got to it) and
``TailRows`` (the receiver's: a row per parity chunk, and read rows lanes take for one data chunk at a time
instead of reading into the destination; rebuilding a group's missing data blocks from any ``k`` of its verified
chunks; copying a read row or a rebuilt block into the chunk's destination pieces).
Must not know: sockets, the protocol engines' state (which chunks are verified is the engine's, passed in),
transfers' handles or callbacks.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence

import xxhash

from ..codec import parity
from ..codec.parity import TailGroups
from ..codec.plan import ChunkPlan


def _pieces(plan: ChunkPlan, views: Sequence[memoryview], chunk: int) -> list[memoryview]:
    """A data chunk's destination pieces (receiver side: every segment view is there)."""
    return [views[seg][a:b] for seg, a, b in plan.pieces(chunk)]


def _as_block(pieces: Sequence[memoryview], block: int) -> memoryview:
    """A data chunk's bytes (``pieces``, in order) as one of its group's code blocks: its one piece itself
    where that is the whole block, else a zero padded copy."""
    if len(pieces) == 1 and pieces[0].nbytes == block:
        return pieces[0]
    out = memoryview(bytearray(block))
    pos = 0
    for piece in pieces:
        out[pos:pos + piece.nbytes] = piece
        pos += piece.nbytes
    return out


class TailEncoder:
    """The sender's parity payloads of one transfer's last layer: ``start()`` (as the layer is written)
    encodes them on a thread of its own while the lanes carry the layer's data, in the order the engine hands
    them out (every group's first parity chunk, then every group's second...); a lane that asks for a parity
    chunk waits for its encode, or does it itself if the thread has not got to it."""

    def __init__(self, groups: TailGroups, pieces: Callable[[int], list[memoryview]], hashed: bool) -> None:
        """``pieces(chunk)``: a data chunk's payload views (``OutgoingTransfer.pieces``)."""
        self.groups = groups
        self._pieces = pieces
        self._hashed = hashed
        # one lock a group: a lane waits only for its own group's encode (zfec releases the GIL, so groups
        # encode side by side on as many cores as lanes pick them up on)
        self._locks = [threading.Lock() for _ in range(groups.groups)]
        self._rows: dict[int, tuple[list[memoryview], bytes]] = {}  # by group: its code blocks, digest trailer
        self._blocks: dict[int, bytes] = {}  # by parity chunk: its parity block

    def start(self) -> None:
        """Encode every parity block now, on a short-lived thread (the lanes' own asks wait for it): the encode
        then runs beside the layer's data instead of after it."""
        threading.Thread(target=self._encode_all, name="kvwire-tail-encode", daemon=True).start()

    def _encode_all(self) -> None:
        g = self.groups
        try:
            for j in range(g.m):
                for i in range(g.groups):
                    self._block(g.parity(i)[j])
        except Exception:  # (a lane's own ask raises it again, and skips that parity chunk)
            pass

    def length(self, chunk: int) -> int:
        return self.groups.parity_length(self.groups.group(chunk))

    def payload(self, chunk: int) -> list[memoryview]:
        """Parity chunk ``chunk``'s payload (its block, then its group's data digests) as pieces."""
        block, trailer = self._block(chunk)
        return [memoryview(block), memoryview(trailer)]

    def _block(self, chunk: int) -> tuple[bytes, bytes]:
        g = self.groups
        i = g.group(chunk)
        with self._locks[i]:
            rows, trailer = self._rows.get(i) or self._gather(i)
            block = self._blocks.get(chunk)
            if block is None:
                block = self._blocks[chunk] = parity.encode(rows, g.m, (chunk - g.parity(i).start,))[0]
            if all(c in self._blocks for c in g.parity(i)):
                self._rows[i] = ([], trailer)  # (the group's blocks are done: its gathered copies go)
        return block, trailer

    def _gather(self, group: int) -> tuple[list[memoryview], bytes]:
        """The group's code blocks: a data chunk's own payload view where that is one whole block, else a
        zero padded copy; and their digests (held by the lock of ``group``)."""
        g = self.groups
        block = g.blocks[group]
        rows: list[memoryview] = []
        digests = []
        for chunk in g.data(group):
            pieces = self._pieces(chunk)
            n = sum(p.nbytes for p in pieces)
            row = _as_block(pieces, block)
            rows.append(row)
            digests.append(xxhash.xxh3_64_intdigest(row[:n]) if self._hashed else 0)
        got = self._rows[group] = (rows, parity.pack_digests(digests))
        return got


class TailRows:
    """The receiver's scratch of one transfer's last layer: a row per parity chunk (kept: the group's rebuild
    reads it), and read rows that a lane takes for one data chunk (``take``) and gives back once that chunk
    was placed or dropped (``give``): about one a lane, not one a chunk of the layer. A rebuild reads the
    group's verified data chunks from their destination (never written again: invariant 7)."""

    def __init__(self, groups: TailGroups, plan: ChunkPlan) -> None:
        self.groups = groups
        self._plan = plan
        self._width = groups.width
        self._parity = memoryview(bytearray(groups.groups * groups.m * self._width))
        self._free: list[memoryview] = []
        self._lock = threading.Lock()

    def _parity_row(self, chunk: int) -> memoryview:
        r = chunk - self.groups.num_chunks
        return self._parity[r * self._width:(r + 1) * self._width]

    def parity_view(self, chunk: int, length: int) -> memoryview:
        """Where a lane reads parity chunk ``chunk``'s ``length`` payload bytes."""
        return self._parity_row(chunk)[:length]

    def take(self) -> memoryview:
        """A read row for one data chunk (a free one, or a new one: as many as lanes read the layer at once)."""
        with self._lock:
            if self._free:
                return self._free.pop()
        return memoryview(bytearray(self._width))

    def give(self, row: memoryview) -> None:
        """``row`` (from ``take``) is free again."""
        with self._lock:
            self._free.append(row)

    def digests(self, chunk: int) -> tuple[int, ...]:
        """A parity row's group data digests (read with it)."""
        g = self.groups
        i = g.group(chunk)
        return parity.unpack_digests(self._parity_row(chunk)[g.blocks[i]:g.parity_length(i)], g.k(i))

    def place(self, row: memoryview, chunk: int, dest: Sequence[memoryview]) -> None:
        """Copy data chunk ``chunk`` from its read row into its destination pieces."""
        self._copy(row, chunk, dest)

    def rebuild(self, present: Sequence[int], chunks: Sequence[int],
                dest: Sequence[memoryview]) -> dict[int, memoryview]:
        """Data chunks ``chunks`` (of one group) rebuilt from its verified chunks ``present`` (at least ``k``:
        data chunks, read from their destination pieces ``dest``, and parity rows), each cut to its length."""
        g = self.groups
        i = g.group(chunks[0])
        block = g.blocks[i]
        have = {g.block_id(c): self._parity_row(c)[:block] if g.is_parity(c)
                else _as_block(_pieces(self._plan, dest, c), block) for c in present}
        got = parity.decode(have, g.k(i), g.m, [g.block_id(c) for c in chunks])
        return {c: memoryview(got[g.block_id(c)])[: self._plan.lengths[c]] for c in chunks}

    def write(self, chunk: int, block: memoryview, dest: Sequence[memoryview]) -> None:
        """Copy a rebuilt block into chunk ``chunk``'s destination pieces."""
        self._copy(block, chunk, dest)

    def _copy(self, src: memoryview, chunk: int, dest: Sequence[memoryview]) -> None:
        pos = 0
        for piece in _pieces(self._plan, dest, chunk):
            n = piece.nbytes
            piece[:] = src[pos:pos + n]
            pos += n
