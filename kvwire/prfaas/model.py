"""The PrfaaS throughput model (arXiv 2604.15039 §3.4, Eq 1-8) and the 2-D search over t and N_p/N_d.

Owns: Φ_kv, the length split (p, l_long, l_short) of a length distribution, each path's per-request cost,
the three stage throughputs, Λ_max, ``plan`` (a deterministic optimum) and the §4 deployments.
Pure: numbers in, numbers out. Must not know: sockets, threads, clocks, kvwire transfers, or how
requests are routed at run time.

Two ways to average a path's per-request cost over the lengths it gets (``averaging``):

* ``"length"`` — the paper's Eq 3-4 as written: T_prefill and S_kv at the mean length, T(E[L | side]).
  This is what Table 6 is computed with, so the paper case reproduces it this way.
* ``"time"`` — E[T(L) | side] and E[S(L) | side]: what a FIFO instance really sustains when each request
  takes its own T(l). T is convex in l, so this is lower (by Jensen: 2-5 % on the paper case); the
  simulator, which gives each request its own T(l), agrees with this one.

Units: lengths in tokens, sizes in bytes, times in seconds, rates in requests/s, bandwidth in bytes/s.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from . import paper
from .lengths import Empirical, LengthDist, TruncatedLogNormal, expect
from .profile import (
    GBPS,
    MIB,
    TABLE5_GBPS,
    TABLE5_KV_MIB,
    TABLE5_LENGTHS,
    TABLE5_SECONDS,
    KvSize,
    PrefillProfile,
    table5_kv,
    table5_profile,
)

__all__ = [
    "GBPS", "MIB", "TABLE5_GBPS", "TABLE5_KV_MIB", "TABLE5_LENGTHS", "TABLE5_SECONDS", "DecodeProfile",
    "Deployment", "KvSize", "LengthSplit", "PathCost", "PrefillProfile", "Throughput", "evaluate", "path_cost",
    "paper_cases", "paper_deployment", "phi_kv", "plan", "split_lengths", "table5_kv", "table5_profile",
    "throughput",
]

AVERAGINGS = ("length", "time")
Lengths = LengthDist | Sequence[float]


def phi_kv(size_bytes: float, seconds: float) -> float:
    """Eq 1: KV throughput of one instance, bytes/s (× 8e-9 for the paper's Gbps)."""
    return size_bytes / seconds


def as_dist(lengths: Lengths) -> LengthDist:
    return lengths if hasattr(lengths, "partial_mean") else Empirical(lengths)  # type: ignore[return-value]


@dataclass(frozen=True)
class LengthSplit:
    """p = P(L > t), l_long = E[L | L > t], l_short = E[L | L ≤ t] (0 when that side is empty)."""

    t: float
    p: float
    l_long: float
    l_short: float


def split_lengths(lengths: Lengths, t: float) -> LengthSplit:
    d = as_dist(lengths)
    p = d.prob(t, math.inf)
    q = d.prob(-math.inf, t)
    return LengthSplit(t, p, d.partial_mean(t, math.inf) / p if p > 0 else 0.0,
                       d.partial_mean(-math.inf, t) / q if q > 0 else 0.0)


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
    """What the model needs: PrfaaS and PD prefill curves, KV size curve, instance counts, egress, decode."""

    prfaas: PrefillProfile
    pd: PrefillProfile
    kv: KvSize
    decode: DecodeProfile
    n_prfaas: int
    n_pd: int  # split into N_p prefill + N_d decode instances by ``plan``
    b_out: float  # PrfaaS egress, bytes/s


@dataclass(frozen=True)
class PathCost:
    """Per-request cost of each path at one threshold: seconds on a PrfaaS instance and bytes shipped per
    offloaded request, seconds on a PD prefill instance per local one (0 when the side is empty)."""

    split: LengthSplit
    t_long: float
    s_long: float
    t_short: float


def path_cost(dep: Deployment, lengths: Lengths, t: float, averaging: str = "length") -> PathCost:
    if averaging not in AVERAGINGS:
        raise ValueError(f"averaging must be one of {AVERAGINGS}")
    d = as_dist(lengths)
    s = split_lengths(d, t)
    if averaging == "length":
        return PathCost(s, dep.prfaas(s.l_long) if s.p > 0 else 0.0, dep.kv(s.l_long) if s.p > 0 else 0.0,
                        dep.pd(s.l_short) if s.p < 1 else 0.0)
    q = 1 - s.p

    def mean(curve: PrefillProfile | KvSize, a: float, b: float, share: float) -> float:
        return expect(d, curve.pieces(), a, b) / share if share > 0 else 0.0

    return PathCost(s, mean(dep.prfaas, t, math.inf, s.p), mean(dep.kv, t, math.inf, s.p),
                    mean(dep.pd, -math.inf, t, q))


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
    """Eq 3 at one length: min(compute, egress) — a min, not a sum, because prefill and transfer overlap."""
    return _theta_prfaas(dep, dep.prfaas(l_long) if l_long > 0 else 0.0, dep.kv(l_long) if l_long > 0 else 0.0)


def _theta_prfaas(dep: Deployment, t_long: float, s_long: float) -> float:
    if dep.n_prfaas <= 0 or t_long <= 0:
        return 0.0
    return min(dep.n_prfaas / t_long, dep.b_out / s_long)


def theta_pdd(dep: Deployment, n_d: int) -> float:
    """Eq 5."""
    return max(0, n_d) * dep.decode.rate()


def _point(dep: Deployment, c: PathCost, n_p: int, n_d: int) -> Throughput:
    """Eq 6: Λ_max = min(Θ_prfaas/p, Θ_pd-p/(1-p), Θ_pd-d); a path with no traffic does not bound it."""
    tp = _theta_prfaas(dep, c.t_long, c.s_long)
    tl = 0.0 if n_p <= 0 or c.t_short <= 0 else n_p / c.t_short  # Eq 4 (RDMA never the bottleneck)
    td = theta_pdd(dep, n_d)
    s = c.split
    lam = min(_ratio(tp, s.p), _ratio(tl, 1 - s.p), td)
    lam = 0.0 if math.isinf(lam) else lam
    return Throughput(s, n_p, n_d, tp, tl, td, lam, lam * s.p * c.s_long if s.p > 0 else 0.0)


def throughput(dep: Deployment, split: LengthSplit, n_p: int, n_d: int) -> Throughput:
    """Eq 3-6 for a given split (the paper's averaging: costs at l_long and l_short)."""
    c = PathCost(split, dep.prfaas(split.l_long) if split.p > 0 else 0.0,
                 dep.kv(split.l_long) if split.p > 0 else 0.0, dep.pd(split.l_short) if split.p < 1 else 0.0)
    return _point(dep, c, n_p, n_d)


def evaluate(dep: Deployment, lengths: Lengths, t: float, n_p: int, n_d: int | None = None,
             averaging: str = "length") -> Throughput:
    """One operating point (threshold ``t``, ``n_p`` PD prefill, ``n_d`` decode; default the rest)."""
    return _point(dep, path_cost(dep, lengths, t, averaging), n_p, dep.n_pd - n_p if n_d is None else n_d)


def _key(r: Throughput) -> tuple[float, float, float]:
    """Bigger is better: Λ_max (rounded to 1e-9 relative, so float noise is no tie-break), then less
    egress, then the larger t (fewer offloads)."""
    lam = 0.0 if r.lam_max <= 0 else round(r.lam_max, 9 - int(math.floor(math.log10(r.lam_max))))
    return lam, -r.egress, r.split.t


def plan(dep: Deployment, lengths: Lengths, thresholds: Iterable[float] | None = None,
         averaging: str = "length") -> Throughput:
    """§3.4.2: exhaustive grid over t and N_p + N_d = n_pd; the point of largest Λ_max.

    ``lengths`` is a distribution (``TruncatedLogNormal``: exact moments, so no seed enters) or samples
    (``Empirical``: every distinct sample is a candidate, which is exact for them). Ties go to less egress,
    then the larger t. On a continuous distribution the best grid point is then refined to where Eq 7's
    two sides meet (bisection), which is where the optimum lies when a prefill path binds.
    """
    d = as_dist(lengths)
    ts = sorted(set(d.thresholds() if thresholds is None else thresholds))
    if not ts:
        raise ValueError("need at least one threshold")
    best: Throughput | None = None
    best_i = 0
    for i, t in enumerate(ts):
        c = path_cost(dep, d, t, averaging)
        for n_p in range(dep.n_pd + 1):
            cur = _point(dep, c, n_p, dep.n_pd - n_p)
            if best is None or _key(cur) > _key(best):
                best, best_i = cur, i
    assert best is not None
    if isinstance(d, TruncatedLogNormal) and thresholds is None and best.bottleneck != "pd-d":
        lo, hi = ts[max(0, best_i - 1)], ts[min(len(ts) - 1, best_i + 1)]
        ref = _eq7_crossing(dep, d, lo, hi, best.n_p, averaging)
        if ref is not None and _key(ref) > _key(best):
            best = ref
    return best


def _eq7_crossing(dep: Deployment, d: LengthDist, lo: float, hi: float, n_p: int,
                  averaging: str) -> Throughput | None:
    """Bisection for Θ_prfaas/p = Θ_pd-p/(1-p) in [lo, hi] (the left side rises with t, the right falls)."""

    def at(t: float) -> Throughput:
        return _point(dep, path_cost(dep, d, t, averaging), n_p, dep.n_pd - n_p)

    def gap(r: Throughput) -> float:
        return _ratio(r.theta_prfaas, r.split.p) - _ratio(r.theta_pdp, 1 - r.split.p)

    a, b = at(lo), at(hi)
    if not (gap(a) < 0 < gap(b)):
        return None
    for _ in range(60):
        m = at((a.split.t + b.split.t) / 2)
        a, b = (m, b) if gap(m) < 0 else (a, m)
    return a if a.lam_max >= b.lam_max else b


# ---------------------------------------------------------------- the §4 case study
def paper_deployment(n_prfaas: int = 4, n_pd: int = 8, b_out_gbps: float = 100.0) -> Deployment:
    """§4: PrfaaS = Table 5 (H200); PD prefill = the H20 curve derived from Table 6 (``paper.h20_profile``);
    decode = 20 sequences at 40 tok/s (T_decode 25 ms) for 1024 output tokens; 100 Gbit/s egress."""
    return Deployment(prfaas=table5_profile(), pd=paper.h20_profile(), kv=table5_kv(),
                      decode=DecodeProfile(paper.T_DECODE, paper.BS_MAX, paper.L_OUT),
                      n_prfaas=n_prfaas, n_pd=n_pd, b_out=b_out_gbps * GBPS)


def paper_cases(averaging: str = "length", dist: LengthDist | None = None) -> dict[str, Throughput]:
    """Table 6's three deployments through the planner: PrfaaS-PD (4 H200 + 8 H20 instances, searched),
    homogeneous PD (12 H20, searched), naive heterogeneous (all prefill on the 4 H200, all 8 H20 decode)."""
    d = dist or paper.workload()
    dep = paper_deployment()
    homo = Deployment(dep.prfaas, dep.pd, dep.kv, dep.decode, 0, 12, dep.b_out)
    return {"prfaas-pd": plan(dep, d, averaging=averaging), "homogeneous": plan(homo, d, averaging=averaging),
            "naive": evaluate(dep, d, d.lo - 1, n_p=0, n_d=dep.n_pd, averaging=averaging)}
