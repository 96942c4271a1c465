"""The PrfaaS throughput model (arXiv 2604.15039 §3.4, Eq 1-8) and the 2-D grid search over t and N_p/N_d.

Owns: KV size S_kv(l) (from a ``ModelLayout`` or fitted to a profile), prefill latency T_prefill(l)
(piecewise-linear over a measured table), Φ_kv, the length split (p, l_long, l_short) of an empirical
distribution, the three stage throughputs, Λ_max, and ``plan``. Pure: numbers in, numbers out.
Must not know: sockets, threads, clocks, kvwire transfers, or how requests are routed at run time.

Units: lengths in tokens, sizes in bytes, times in seconds, rates in requests/s, bandwidth in bytes/s.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from ..codec.layout import ModelLayout

MIB = 1 << 20
GBPS = 1e9 / 8  # bytes/s in one Gbit/s

#: Table 5 of the paper: the internal 1T Kimi-Linear-architecture model, 8×H200, in-house vLLM.
TABLE5_LENGTHS = (1024, 8192, 32768, 131072)
TABLE5_KV_MIB = (190.8, 308.9, 701.3, 2316.3)
TABLE5_SECONDS = (0.44, 0.72, 1.84, 7.40)
TABLE5_GBPS = (3.61, 3.59, 3.19, 2.62)


@dataclass(frozen=True)
class PrefillProfile:
    """T_prefill(l): linear interpolation between measured points, linear extrapolation past the ends."""

    lengths: tuple[float, ...]
    seconds: tuple[float, ...]

    def __post_init__(self) -> None:
        if len(self.lengths) < 2 or len(self.lengths) != len(self.seconds):
            raise ValueError("need at least two (length, seconds) points")
        if any(b <= a for a, b in zip(self.lengths, self.lengths[1:])) or min(self.seconds) <= 0:
            raise ValueError("lengths must increase and seconds be positive")

    def t_prefill(self, length: float) -> float:
        xs, ys = self.lengths, self.seconds
        i = min(max(bisect.bisect_right(xs, length) - 1, 0), len(xs) - 2)
        slope = (ys[i + 1] - ys[i]) / (xs[i + 1] - xs[i])
        return max(ys[0] * 1e-3, ys[i] + slope * (length - xs[i]))

    def scaled(self, factor: float) -> PrefillProfile:
        """The same curve on hardware ``factor`` times slower (e.g. the PD cluster's H20 against H200)."""
        return PrefillProfile(self.lengths, tuple(s * factor for s in self.seconds))


@dataclass(frozen=True)
class KvSize:
    """S_kv(l) = fixed_bytes + bytes_per_token · l: the request-level state plus the token-level KV."""

    fixed_bytes: float
    bytes_per_token: float

    def s_kv(self, length: float) -> float:
        return self.fixed_bytes + self.bytes_per_token * length

    @staticmethod
    def from_layout(layout: ModelLayout) -> KvSize:
        return KvSize(float(layout.state_bytes_per_request()), float(layout.kv_bytes_per_token()))

    @staticmethod
    def fit(lengths: Sequence[float], sizes: Sequence[float]) -> KvSize:
        """Least-squares line through measured (length, bytes) points."""
        n = len(lengths)
        if n < 2 or n != len(sizes):
            raise ValueError("need at least two (length, size) points")
        mx, my = sum(lengths) / n, sum(sizes) / n
        sxx = sum((x - mx) ** 2 for x in lengths)
        slope = sum((x - mx) * (y - my) for x, y in zip(lengths, sizes)) / sxx
        return KvSize(my - slope * mx, slope)


def table5_profile() -> PrefillProfile:
    return PrefillProfile(tuple(float(x) for x in TABLE5_LENGTHS), TABLE5_SECONDS)


def table5_kv() -> KvSize:
    return KvSize.fit([float(x) for x in TABLE5_LENGTHS], [m * MIB for m in TABLE5_KV_MIB])


def phi_kv(size_bytes: float, seconds: float) -> float:
    """Eq 1: KV throughput of one instance, bytes/s (× 8e-9 for the paper's Gbps)."""
    return size_bytes / seconds


@dataclass(frozen=True)
class LengthSplit:
    """p = P(L > t), l_long = E[L | L > t], l_short = E[L | L ≤ t] (0 when that side is empty)."""

    t: float
    p: float
    l_long: float
    l_short: float


def split_lengths(samples: Sequence[float], t: float) -> LengthSplit:
    if not samples:
        raise ValueError("need at least one length sample")
    long = [x for x in samples if x > t]
    short = [x for x in samples if x <= t]
    return LengthSplit(t, len(long) / len(samples), sum(long) / len(long) if long else 0.0,
                       sum(short) / len(short) if short else 0.0)


@dataclass(frozen=True)
class DecodeProfile:
    """Eq 5's constants: per-step decode time and max batch size under the SLO, mean output length."""

    t_decode: float
    bs_max: float
    l_out: float

    def rate(self) -> float:
        """Requests/s one decode instance finishes."""
        return self.bs_max / (self.t_decode * self.l_out)


@dataclass(frozen=True)
class Deployment:
    """What the model needs: PrfaaS and PD hardware profiles, KV size, instance counts, egress, decode."""

    prfaas: PrefillProfile
    pd: PrefillProfile
    kv: KvSize
    decode: DecodeProfile
    n_prfaas: int
    n_pd: int  # split into N_p prefill + N_d decode instances by ``plan``
    b_out: float  # PrfaaS egress, bytes/s


@dataclass(frozen=True)
class Throughput:
    """One operating point: stage throughputs (req/s), Λ_max, and egress it needs at Λ_max (bytes/s)."""

    split: LengthSplit
    n_p: int
    n_d: int
    theta_prfaas: float
    theta_pdp: float
    theta_pdd: float
    lam_max: float
    egress: float

    @property
    def bottleneck(self) -> str:
        terms = {"prfaas": _ratio(self.theta_prfaas, self.split.p),
                 "pd-p": _ratio(self.theta_pdp, 1 - self.split.p), "pd-d": self.theta_pdd}
        return min(terms, key=lambda k: terms[k])


def _ratio(theta: float, share: float) -> float:
    return math.inf if share <= 0 else theta / share


def theta_prfaas(dep: Deployment, l_long: float) -> float:
    """Eq 3: min(compute, egress) — a min, not a sum, because prefill and transfer are pipelined."""
    if dep.n_prfaas <= 0 or l_long <= 0:
        return 0.0
    return min(dep.n_prfaas / dep.prfaas.t_prefill(l_long), dep.b_out / dep.kv.s_kv(l_long))


def theta_pdp(dep: Deployment, n_p: int, l_short: float) -> float:
    """Eq 4 (intra-cluster RDMA never the bottleneck)."""
    return 0.0 if n_p <= 0 or l_short <= 0 else n_p / dep.pd.t_prefill(l_short)


def theta_pdd(dep: Deployment, n_d: int) -> float:
    """Eq 5."""
    return max(0, n_d) * dep.decode.rate()


def throughput(dep: Deployment, split: LengthSplit, n_p: int, n_d: int) -> Throughput:
    """Eq 6: Λ_max = min(Θ_prfaas/p, Θ_pd-p/(1-p), Θ_pd-d); a path with no traffic does not bound it."""
    tp = theta_prfaas(dep, split.l_long)
    tl = theta_pdp(dep, n_p, split.l_short)
    td = theta_pdd(dep, n_d)
    lam = min(_ratio(tp, split.p), _ratio(tl, 1 - split.p), td)
    lam = 0.0 if math.isinf(lam) else lam
    egress = lam * split.p * dep.kv.s_kv(split.l_long) if split.p > 0 else 0.0
    return Throughput(split, n_p, n_d, tp, tl, td, lam, egress)


def candidate_thresholds(samples: Sequence[float], count: int = 64) -> list[float]:
    """t values worth trying: ``count`` quantiles of the samples, plus "offload all" and "offload none"."""
    xs = sorted(samples)
    if not xs:
        raise ValueError("need at least one length sample")
    picks = {xs[min(len(xs) - 1, round(i * (len(xs) - 1) / max(1, count - 1)))] for i in range(count)}
    return sorted(picks | {min(0.0, xs[0] - 1), float(xs[-1])})


def plan(dep: Deployment, samples: Sequence[float], thresholds: Iterable[float] | None = None) -> Throughput:
    """§3.4.2: exhaustive grid over t and N_p + N_d = n_pd; the point of largest Λ_max.

    Ties (within 1e-9 relative) go to less egress, then to the larger t (fewer offloads). Eq 7/8 are
    what the optimum tends to satisfy; the search maximises Λ_max directly rather than solving them.
    """
    ts = candidate_thresholds(samples) if thresholds is None else sorted(set(thresholds))
    best: Throughput | None = None
    for t in ts:
        split = split_lengths(samples, t)
        for n_p in range(dep.n_pd + 1):
            cur = throughput(dep, split, n_p, dep.n_pd - n_p)
            if best is None or _better(cur, best):
                best = cur
    assert best is not None
    return best


def _better(a: Throughput, b: Throughput) -> bool:
    if a.lam_max > b.lam_max * (1 + 1e-9):
        return True
    if a.lam_max < b.lam_max * (1 - 1e-9):
        return False
    return (a.egress, -a.split.t) < (b.egress, -b.split.t)


def paper_deployment(n_prfaas: int = 4, n_pd: int = 8, b_out_gbps: float = 100.0) -> Deployment:
    """The §4 case study as far as the paper's numbers pin it down.

    PrfaaS = Table 5 (H200). PD prefill (H20) = Table 5 × 2.65, and decode = 20 sequences at 40 tok/s
    (T_decode 25 ms) for 1024 output tokens: both backed out of Table 6's homogeneous baseline
    (9 prefill instances → 2.11 req/s, 3 decode instances → 2.35 req/s). Our inference, not the paper's.
    """
    prof = table5_profile()
    return Deployment(prfaas=prof, pd=prof.scaled(2.65), kv=table5_kv(),
                      decode=DecodeProfile(t_decode=0.025, bs_max=20, l_out=1024),
                      n_prfaas=n_prfaas, n_pd=n_pd, b_out=b_out_gbps * GBPS)
