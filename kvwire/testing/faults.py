"""Fault injection on the data path, for tests: a ``ChunkStage`` that hands every outgoing chunk to a hook.

Owns: ``ChunkHook`` (wraps ``fn(lane, transfer_id, chunk, pieces)``, which may return replacement
pieces, say with a bit flipped, or do something to the lane as the chunk goes out). Set it as a sending
session's ``chunk_stage``. Must not know: sessions, sockets or transfers beyond the ``ChunkRef`` it is
given. Never used in production code.
"""

from __future__ import annotations

from collections.abc import Callable

from ..tcp.transport import ChunkRef

#: called with (lane index, transfer id, chunk, payload pieces) just before a chunk goes on the wire;
#: returns replacement pieces of the same total length, or None to send them as they are
FaultHook = Callable[[int, int, int, list[memoryview]], "list[memoryview] | None"]


class ChunkHook:
    """A chunk stage calling ``fn`` for every chunk a sender puts on a lane (and nothing on receipt)."""

    def __init__(self, fn: FaultHook) -> None:
        self.fn = fn

    def outgoing(self, ref: ChunkRef, pieces: list[memoryview]) -> list[memoryview]:
        return self.fn(ref.lane, ref.transfer_id, ref.chunk, pieces) or pieces

    def incoming(self, ref: ChunkRef, views: list[memoryview]) -> None:
        return None
