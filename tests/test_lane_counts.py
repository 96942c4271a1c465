"""A lane counts a chunk's bytes before it writes them: the receiver may verify and acknowledge a chunk before
the sender's write returns, ending its transfer, and whoever reads the session's counters once the transfer
ended (the bench's totals, metrics) must find its bytes there. A bench run's totals once came out one 512 KiB
chunk short of its intervals."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import pytest
from helpers import payload

import kvwire.tcp._wire as wire
from kvwire import Receiver, RequestSpec, connect, plan_segments
from kvwire.testing.fixtures import load_fixture

LAYOUT = load_fixture("tiny-qwen3-next")


def test_a_transfer_never_ends_before_its_chunks_are_counted(monkeypatch: pytest.MonkeyPatch,
                                                             no_leaks: None) -> None:
    """Every lane write returns 0.3 s after its bytes went (a thread descheduled there, on a loaded host):
    the transfer ends meanwhile, and its bytes and chunks are counted already. On the old order the count
    was still 0."""
    real = wire.Channel.send_parts

    def late_return(self: wire.Channel, parts: Any) -> None:
        real(self, parts)
        time.sleep(0.3)

    req = RequestSpec("counted", 40, 39)
    src = payload(LAYOUT, req, seed=9)
    dest = np.empty(sum(a.nbytes for a in src), np.uint8)
    with Receiver(key="k") as rx, connect(*rx.address, key="k", lanes=1, link_control=False) as session:
        incoming = rx.expect(req.request_id, dest, layout=LAYOUT, state_position=39)
        out = session.send(LAYOUT, req)
        chunks = out.plan.num_chunks
        monkeypatch.setattr(wire.Channel, "send_parts", late_return)
        by_layer: dict[int, list[int]] = {}
        for seg in plan_segments(LAYOUT, req):
            by_layer.setdefault(seg.layer, []).append(seg.index)
        for layer, idx in by_layer.items():
            out.write_layer(layer, [src[i] for i in idx])
        out.finish().result(timeout=30)
        stats = session.stats()
        incoming.result(timeout=10)
        monkeypatch.undo()
    assert np.array_equal(dest, np.concatenate(src))
    assert stats["bytes_sent"] >= dest.nbytes and stats["chunks_sent"] >= chunks, (stats, dest.nbytes, chunks)
    assert out.bytes_sent >= dest.nbytes
