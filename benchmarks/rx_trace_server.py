"""The bench's receiving server (``kvwire-bench -s``) with a recording chunk stage: for ``stream_trace.py --rx``.

    KVWIRE_RX_TRACE=out.json python benchmarks/rx_trace_server.py -s -1 ...   (the server's usual arguments)

Owns: a ``ChunkStage`` on the server's ``Receiver`` whose ``incoming`` records, for every chunk a lane read
(data and tail parity), the monotonic time its payload was in (before its hash), the lane, transfer and chunk;
written to ``$KVWIRE_RX_TRACE`` as JSON rows ``[t, lane, transfer, chunk, length]`` when the server exits.
Rebuilt chunks pass no stage: their time is their layer's, which the bench reports anyway. Must not know: the
trace's analysis (``stream_trace.py``), the bench server's internals beyond the ``Receiver`` it builds.
"""

from __future__ import annotations

import atexit
import json
import os
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

import kvwire.bench.receiving as receiving
from kvwire.bench.cli import main
from kvwire.tcp import Receiver
from kvwire.tcp.transport import ChunkRef

ROWS: list[tuple[float, int, int, int, int]] = []
_LOCK = threading.Lock()


class Stage:
    """Records each incoming chunk; passes outgoing ones on (a receiver sends none)."""

    def outgoing(self, ref: ChunkRef, pieces: Sequence[Any]) -> Sequence[Any]:
        return pieces

    def incoming(self, ref: ChunkRef, views: Sequence[memoryview]) -> None:
        with _LOCK:
            ROWS.append((time.monotonic(), ref.lane, ref.transfer_id, ref.chunk, ref.length))


class TracedReceiver(Receiver):
    def __init__(self, *args: Any, **kw: Any) -> None:
        kw["chunk_stage"] = Stage()
        super().__init__(*args, **kw)


def _dump() -> None:
    with _LOCK, open(os.environ["KVWIRE_RX_TRACE"], "w") as f:
        json.dump(ROWS, f)


if __name__ == "__main__":
    receiving.Receiver = TracedReceiver  # type: ignore[misc]  # (the bench server builds this one)
    atexit.register(_dump)
    sys.exit(main(sys.argv[1:]))
