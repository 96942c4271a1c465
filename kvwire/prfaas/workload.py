"""Synthetic workload and payloads for the reference PrfaaS server: lengths, prefix hits, content patterns.

Owns: the paper's truncated log-normal input lengths (§4: μ = 9.90, σ = 1.00, [128, 128K]), synthetic
cached prefixes, and the deterministic per-segment byte pattern the simulated prefill writes and the
decode side checks (so a transfer is verified by content, independently of kvwire's own hashes).
Must not know: sockets, threads, routing policy.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np

from ..codec.layout import ModelLayout, RequestSpec, Segment, plan_segments

PAPER_MU, PAPER_SIGMA, PAPER_MIN, PAPER_MAX = 9.90, 1.00, 128, 131072
_PERIOD = 65521  # prime: a chunk landing at the wrong 2 MiB-aligned offset never matches


def lognormal_lengths(n: int, seed: int = 0, mu: float = PAPER_MU, sigma: float = PAPER_SIGMA,
                      lo: int = PAPER_MIN, hi: int = PAPER_MAX) -> list[int]:
    """``n`` input lengths from the truncated log-normal (rejection sampling; deterministic per seed)."""
    rng = np.random.default_rng(seed)
    out: list[int] = []
    while len(out) < n:
        v = rng.lognormal(mu, sigma, max(16, 2 * (n - len(out))))
        out.extend(int(x) for x in v[(v >= lo) & (v <= hi)])
    return out[:n]


@dataclass(frozen=True)
class SyntheticRequest:
    request_id: str
    total: int
    cached_pd: int
    cached_prfaas: int


def synthetic_requests(n: int, seed: int = 0, pd_hit: float = 0.25, prfaas_hit: float = 0.15,
                       prefix: str = "req") -> list[SyntheticRequest]:
    """Lengths from ``lognormal_lengths``; a share of requests have a cached prefix (10-90% of the input)
    in the PD cluster, another share in the PrfaaS cluster."""
    rng = np.random.default_rng(seed + 1)
    out = []
    for i, total in enumerate(lognormal_lengths(n, seed)):
        pd = int(total * rng.uniform(0.1, 0.9)) if rng.random() < pd_hit else 0
        pf = int(total * rng.uniform(0.1, 0.9)) if rng.random() < prfaas_hit else 0
        out.append(SyntheticRequest(f"{prefix}-{i:04d}", total, pd, pf))
    return out


def _block(request_id: str, seg: Segment) -> np.ndarray:
    seed = zlib.crc32(f"{request_id}/{seg.index}/{seg.name}".encode())
    return np.random.default_rng(seed).integers(0, 256, _PERIOD, dtype=np.uint8)


def segment_pattern(request_id: str, seg: Segment) -> np.ndarray:
    """The bytes the simulated prefill produces for one segment (deterministic, cheap to regenerate)."""
    return np.resize(_block(request_id, seg), seg.nbytes)


def check_payload(layout: ModelLayout, request: RequestSpec, dest: np.ndarray) -> bool:
    """True when ``dest`` (the whole transfer, segments back to back) holds exactly the pattern."""
    off = 0
    for seg in plan_segments(layout, request):
        if not np.array_equal(dest[off:off + seg.nbytes], segment_pattern(request.request_id, seg)):
            return False
        off += seg.nbytes
    return off == len(dest)


def payload_bytes(layout: ModelLayout, request: RequestSpec) -> int:
    return sum(s.nbytes for s in plan_segments(layout, request))
