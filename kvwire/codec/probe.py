"""Sink transfers: the payload of an active capacity probe, and the receiver's rules for accepting one.

A *sink* transfer (``Manifest.sink``) runs the ordinary transfer protocol, but the receiver reads its
payload into one shared scratch buffer and throws it away: nothing is allocated per transfer and nothing
is delivered to the application. ``kvwire.probe`` sends sinks back to back to measure a link.

Owns: the probe layout (``probe_layout``: one request-indexed 4 MiB segment per layer, so a sink's size is
a whole number of segments and the sender feeds every layer from one zero buffer), the probe request,
how many layers fit a receiver's probe budget, and ``sink_refusal`` (the receiver's admission rules).
Must not know: sockets, threads, clocks or buffers.
"""

from __future__ import annotations

from functools import lru_cache

from .layout import REQUEST, CacheSpec, LayerSpec, ModelLayout, RequestSpec, TensorSpec
from .manifest import Manifest

#: bytes of one probe segment (one layer of the probe layout)
PROBE_SEGMENT = 4 * 2**20
#: the most layers one probe transfer has: 256 x 4 MiB = 1 GiB
PROBE_MAX_LAYERS = 256
#: the largest segment a receiver accepts in a sink, and the size of its one scratch buffer
SINK_MAX_SEGMENT = 16 * 2**20
PROBE_LAYOUT_NAME = "kvwire-probe"


@lru_cache(maxsize=16)
def probe_layout(num_layers: int) -> ModelLayout:
    """``num_layers`` layers, each one request-indexed state cache of ``PROBE_SEGMENT`` bytes.

    Cached, so repeated probes reuse one layout object (and its fingerprint: the full layout goes over
    the wire only with the first sink of a session).
    """
    if not isinstance(num_layers, int) or not 1 <= num_layers <= 1024:
        raise ValueError(f"a probe layout has 1..1024 layers, got {num_layers!r}")
    cache = CacheSpec("gdn", (TensorSpec("sink", (PROBE_SEGMENT,), "uint8", "ssm:HVK", REQUEST),))
    return ModelLayout(PROBE_LAYOUT_NAME, tuple(LayerSpec(i, (cache,)) for i in range(num_layers)))


def probe_request(request_id: str) -> RequestSpec:
    """A probe ships no tokens (state position 0): its payload is the request-indexed state of the probe layout."""
    return RequestSpec(request_id, 1, 0)


def probe_layers(max_bytes: int) -> int:
    """Layers of the largest probe transfer within ``max_bytes`` (at most ``PROBE_MAX_LAYERS``; 0: none fits)."""
    return max(0, min(PROBE_MAX_LAYERS, max_bytes // PROBE_SEGMENT))


def sink_refusal(m: Manifest, max_probe_bytes: int) -> str:
    """Why a receiver allowing sinks of up to ``max_probe_bytes`` (0: none) refuses sink ``m``; "" to accept.

    Sinks must be unhashed: lanes write their payload concurrently into one shared scratch buffer, so
    what a chunk's hash would be computed over is not the bytes that arrived.
    """
    if not m.sink:
        return "not a sink transfer"
    if max_probe_bytes <= 0:
        return "receiver accepts no probes (max_probe_bytes=0)"
    if m.hashed:
        return f"a probe (sink transfer) must be unhashed, got hash {m.hash!r}"
    if m.total_bytes > max_probe_bytes:
        return f"probe of {m.total_bytes} bytes exceeds the receiver's {max_probe_bytes}-byte probe limit"
    for s in m.segments:
        if s.nbytes > SINK_MAX_SEGMENT:
            return f"probe segment {s.index} has {s.nbytes} bytes, more than {SINK_MAX_SEGMENT}"
    return ""
