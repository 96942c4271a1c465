"""The bytes of a transfer's last-layer parity groups (``codec.parity``): the sender's parity payloads, the receiver's
scratch rows and its rebuilds.

Owns: ``TailEncoder`` (the sender's: a group's data chunks gathered into zero padded blocks, their digests,
its ``m`` parity payloads computed once, on an encode thread started as the layer is written or by the first
lane that needs one before that thread got to it) and ``TailRows`` (the receiver's:
one scratch row per chunk of the groups, which lanes read into instead of the destination; rebuilding a
group's missing data blocks from any ``k`` of its verified rows; copying a row or a rebuilt block into the
chunk's destination pieces).
Must not know: sockets, the protocol engines' state (which rows are verified is the engine's, passed in),
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


class TailEncoder:
    """The sender's parity payloads of one transfer's last layer: ``start()`` (as the layer is written)
    encodes every group on a thread of its own, while the lanes carry the layer's data; a lane that asks for a
    parity chunk (the engine hands those out behind the layer's data) waits for its group's encode, or does it
    itself if the thread has not begun it."""

    def __init__(self, groups: TailGroups, pieces: Callable[[int], list[memoryview]], hashed: bool) -> None:
        """``pieces(chunk)``: a data chunk's payload views (``OutgoingTransfer.pieces``)."""
        self.groups = groups
        self._pieces = pieces
        self._hashed = hashed
        # one lock a group: a lane waits only for its own group's encode (zfec releases the GIL, so groups
        # encode side by side on as many cores as lanes pick them up on)
        self._locks = [threading.Lock() for _ in range(groups.groups)]
        self._payloads: dict[int, tuple[list[bytes], bytes]] = {}

    def start(self) -> None:
        """Encode every group now, on a short-lived thread (the lanes' own picks wait for it group by group):
        the encode then runs beside the layer's data instead of after it."""
        threading.Thread(target=self._encode_all, name="kvwire-tail-encode", daemon=True).start()

    def _encode_all(self) -> None:
        try:
            for i in range(self.groups.groups):
                self._group(i)
        except Exception:  # (a lane's own ask raises it again, and skips that parity chunk)
            pass

    def _group(self, i: int) -> tuple[list[bytes], bytes]:
        with self._locks[i]:
            got = self._payloads.get(i)
            if got is None:
                got = self._payloads[i] = self._encode(i)
        return got

    def length(self, chunk: int) -> int:
        return self.groups.parity_length(self.groups.group(chunk))

    def payload(self, chunk: int) -> list[memoryview]:
        """Parity chunk ``chunk``'s payload (its block, then its group's data digests) as pieces."""
        g = self.groups
        i = g.group(chunk)
        blocks, trailer = self._group(i)
        return [memoryview(blocks[chunk - g.parity(i).start]), memoryview(trailer)]

    def _encode(self, group: int) -> tuple[list[bytes], bytes]:
        g = self.groups
        block = g.blocks[group]
        data = memoryview(bytearray(g.k(group) * block))  # zero padded past each chunk's length
        rows = [data[i * block:(i + 1) * block] for i in range(g.k(group))]
        digests = []
        for row, chunk in zip(rows, g.data(group)):
            pos = 0
            for piece in self._pieces(chunk):
                n = piece.nbytes
                row[pos:pos + n] = piece
                pos += n
            digests.append(xxhash.xxh3_64_intdigest(row[:pos]) if self._hashed else 0)
        return parity.encode(rows, g.m), parity.pack_digests(digests)


class TailRows:
    """The receiver's scratch rows of one transfer's last layer: row ``groups.row(c)`` holds chunk ``c``'s
    payload once read (data rows zero padded past their chunk's length: the code's blocks)."""

    def __init__(self, groups: TailGroups, plan: ChunkPlan) -> None:
        self.groups = groups
        self._plan = plan
        self._width = groups.width
        self._rows = memoryview(bytearray(groups.rows * self._width))

    def _row(self, chunk: int) -> memoryview:
        r = self.groups.row(chunk)
        return self._rows[r * self._width:(r + 1) * self._width]

    def view(self, chunk: int, length: int) -> memoryview:
        """Where the lane reads chunk ``chunk``'s ``length`` payload bytes."""
        return self._row(chunk)[:length]

    def digests(self, chunk: int) -> tuple[int, ...]:
        """A parity row's group data digests (read with it)."""
        g = self.groups
        i = g.group(chunk)
        return parity.unpack_digests(self._row(chunk)[g.blocks[i]:g.parity_length(i)], g.k(i))

    def place(self, chunk: int, dest: Sequence[memoryview]) -> None:
        """Copy data chunk ``chunk``'s row into its destination pieces."""
        self._copy(self._row(chunk), chunk, dest)

    def rebuild(self, present: Sequence[int], chunks: Sequence[int]) -> dict[int, memoryview]:
        """Data chunks ``chunks`` (of one group) rebuilt from its verified chunks ``present`` (at least ``k``),
        each cut to its length."""
        g = self.groups
        i = g.group(chunks[0])
        block = g.blocks[i]
        have = {g.block_id(c): self._row(c)[:block] for c in present}
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
