"""The bench's requester (``kvwire.bench.requester.Requester``) on a real socket pair: ``close`` returns only
once its reader and heartbeat threads have stopped, a heartbeat being written at that moment included."""

from __future__ import annotations

import socket
import threading
import time
from typing import Any

import pytest

from kvwire.bench import requester
from kvwire.bench.control import BenchChannel
from kvwire.bench.requester import Requester


class SlowBeats(BenchChannel):
    """A channel on which writing a heartbeat takes 0.3 s (a slow or stalled peer)."""

    def __init__(self, sock: socket.socket) -> None:
        super().__init__(sock, "test-peer")
        self.beating = threading.Event()

    def tell(self, op: str, **fields: Any) -> None:
        if op == "hb":
            self.beating.set()
            time.sleep(0.3)
        super().tell(op, **fields)


def test_close_returns_after_its_threads_stopped_even_mid_heartbeat(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(requester, "HEARTBEAT", 0.01)
    a, b = socket.socketpair()
    try:
        before = set(threading.enumerate())
        ch = SlowBeats(a)
        r = Requester(ch, {"run": "test"})
        mine = [t for t in threading.enumerate() if t not in before]
        assert sorted(t.name for t in mine) == ["kvwire-bench-ctl", "kvwire-bench-hb"]
        assert ch.beating.wait(5)  # the heartbeat thread is inside a write
        r.close(bye=False)
        assert [t.name for t in mine if t.is_alive()] == []
    finally:
        b.close()
