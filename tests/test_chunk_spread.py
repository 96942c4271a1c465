"""A transfer's largest layer is cut into about four chunks for every lane (``spread_chunk_size``),
end to end over real sockets: the manifest carries the finer chunk size, the receiver plans the same
chunks and every byte arrives; a session with few lanes keeps its chunk size."""

from __future__ import annotations

import numpy as np
import pytest

from kvwire import Receiver, RequestSpec, connect, plan_segments
from kvwire.codec.layout import CacheSpec, LayerSpec, ModelLayout, TensorSpec

MiB = 1 << 20


def _layout() -> ModelLayout:
    def kv(name: str) -> TensorSpec:
        return TensorSpec(name, (8, 128), "bfloat16", "NHD", "token")

    return ModelLayout("spread-test", tuple(LayerSpec(i, (CacheSpec("gqa", (kv("k"), kv("v"))),)) for i in range(3)))


@pytest.mark.parametrize(("lanes", "chunk", "per_layer"), [(8, MiB // 4, 16), (2, MiB // 2, 8)])
def test_the_largest_layer_gets_chunks_for_every_lane(lanes: int, chunk: int, per_layer: int, no_leaks: None) -> None:
    layout = _layout()
    req = RequestSpec(f"spread-{lanes}", 1024, 1024)  # 4 MiB a layer (K and V: 2 x 8 x 128 x 2 B a token)
    segs = plan_segments(layout, req)
    src = [np.random.default_rng(s.index).integers(0, 256, s.nbytes, np.uint8) for s in segs]
    dst = np.zeros(sum(s.nbytes for s in segs), np.uint8)
    with Receiver() as rx, connect(*rx.address, lanes=lanes, link_control=False) as s:
        h_rx = rx.expect(req.request_id, dst)
        h = s.send(layout, req)
        assert h.manifest.chunk_size == chunk
        assert [len(r) for r in h.plan.layer_chunks.values()] == [per_layer] * 3
        h.write_all(src)
        h.finish().result(30)
        h_rx.result(30)
        carried = sum(lane.chunks_sent for lane in s.lane_info())
    assert carried == 3 * per_layer
    assert dst.tobytes() == b"".join(a.tobytes() for a in src)
