"""Design invariants measured on a real transfer: no Python copy of payload bytes on either side,
and memory beyond the destination buffers bounded by lanes x a small constant, whatever the size."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from kvwire import Receiver, RequestSpec, connect, plan_segments
from kvwire.testing.fixtures import load_fixture

MiB = 1024 * 1024


@pytest.mark.parametrize("tokens", [4000, 40000])
def test_python_heap_does_not_grow_with_payload(tokens: int, no_leaks: None) -> None:
    layout = load_fixture("tiny-qwen3-next")
    req = RequestSpec(f"heap-{tokens}", tokens, tokens)
    segs = plan_segments(layout, req)
    total = sum(s.nbytes for s in segs)
    src = [np.full(s.nbytes, s.index % 251, np.uint8) for s in segs]
    dst = np.zeros(total, np.uint8)
    with Receiver() as rx, connect(*rx.address, lanes=4, chunk_size=1 * MiB) as s:
        h_rx = rx.expect(req.request_id, dst)
        tracemalloc.start()
        try:
            h = s.send(layout, req)
            h.write_all(src)
            h.finish().result(60)
            h_rx.result(60)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert dst.tobytes() == b"".join(a.tobytes() for a in src)
    # 4 lanes x 256 KiB drain scratch + small control objects; never a copy of a 1 MiB chunk per lane
    assert peak < 3 * MiB, f"Python heap peak {peak / MiB:.1f} MiB while moving {total / MiB:.0f} MiB"
