"""Input-length distributions with exact partial moments, for the PrfaaS planner and simulator.

Owns: P(a < L ≤ b) and E[L · 1{a < L ≤ b}] of a length distribution — in closed form for the paper's
truncated log-normal (§4: μ = 9.90, σ = 1.00 on [128, 128K]) and by prefix sums for an empirical sample —
and from them the expectation of any piecewise-linear function of L over an interval, exactly (no
sampling, so the planner's optimum cannot flip with a seed). Also seeded sampling for the simulator.
Must not know: profiles' meaning, deployments, routing, clocks.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

PAPER_MU, PAPER_SIGMA, PAPER_MIN, PAPER_MAX = 9.90, 1.00, 128.0, 131072.0

#: a linear piece of a curve: (x0, x1, intercept, slope) meaning f(x) = intercept + slope·x on (x0, x1]
Piece = tuple[float, float, float, float]


class LengthDist(Protocol):
    @property
    def lo(self) -> float:
        """The shortest length (t = lo - 1 offloads everything)."""
        ...

    @property
    def hi(self) -> float:
        """The longest length (t = hi offloads nothing)."""
        ...

    def prob(self, a: float, b: float) -> float:
        """P(a < L ≤ b)."""
        ...

    def partial_mean(self, a: float, b: float) -> float:
        """E[L · 1{a < L ≤ b}]."""
        ...

    def thresholds(self) -> list[float]:
        """Candidate t values for the grid search (sorted)."""
        ...


def expect(dist: LengthDist, pieces: Sequence[Piece], a: float, b: float) -> float:
    """E[f(L) · 1{a < L ≤ b}] for a piecewise-linear f given as ``pieces`` covering the line (exact)."""
    total = 0.0
    for x0, x1, c, m in pieces:
        lo, hi = max(a, x0), min(b, x1)
        if hi > lo:
            total += c * dist.prob(lo, hi) + m * dist.partial_mean(lo, hi)
    return total


def _phi(z: float) -> float:
    return 0.5 * math.erfc(-z / math.sqrt(2.0))


@dataclass(frozen=True)
class TruncatedLogNormal:
    """ln L ~ N(μ, σ²) conditioned on lo ≤ L ≤ hi. Moments in closed form via the normal CDF."""

    mu: float = PAPER_MU
    sigma: float = PAPER_SIGMA
    lo: float = PAPER_MIN
    hi: float = PAPER_MAX
    grid: int = 1024  # geometric candidate thresholds between lo and hi (the optimum is then refined)
    _z: float = field(init=False, repr=False, default=0.0)

    def __post_init__(self) -> None:
        if not (self.sigma > 0 and 0 < self.lo < self.hi):
            raise ValueError("need sigma > 0 and 0 < lo < hi")
        object.__setattr__(self, "_z", self._cdf0(self.hi) - self._cdf0(self.lo))

    def _cdf0(self, x: float, shift: float = 0.0) -> float:
        if x <= 0:
            return 0.0
        return _phi((math.log(x) - self.mu - shift) / self.sigma)

    def _clip(self, a: float, b: float) -> tuple[float, float]:
        return max(a, self.lo), min(b, self.hi)

    def prob(self, a: float, b: float) -> float:
        a, b = self._clip(a, b)
        return 0.0 if b <= a else (self._cdf0(b) - self._cdf0(a)) / self._z

    def partial_mean(self, a: float, b: float) -> float:
        a, b = self._clip(a, b)
        if b <= a:
            return 0.0
        s2 = self.sigma ** 2
        return math.exp(self.mu + s2 / 2) * (self._cdf0(b, s2) - self._cdf0(a, s2)) / self._z

    @property
    def mean(self) -> float:
        return self.partial_mean(-math.inf, math.inf)

    def cdf(self, x: float) -> float:
        return self.prob(-math.inf, x)

    def quantile(self, u: float) -> float:
        """The u-quantile (bisection on the CDF; exact to a millionth of a token)."""
        if not 0 <= u <= 1:
            raise ValueError("u must lie in [0, 1]")
        a, b = self.lo, self.hi
        for _ in range(80):
            m = math.sqrt(a * b)
            a, b = (m, b) if self.cdf(m) < u else (a, m)
        return math.sqrt(a * b)

    def thresholds(self) -> list[float]:
        ratio = (self.hi / self.lo) ** (1 / self.grid)
        return [self.lo - 1] + [self.lo * ratio ** i for i in range(self.grid)] + [self.hi]

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """``n`` integer lengths (rejection sampling), as the simulator draws them."""
        out: list[np.ndarray] = []
        have = 0
        while have < n:
            v = rng.lognormal(self.mu, self.sigma, max(16, 2 * (n - have)))
            v = np.floor(v[(v >= self.lo) & (v <= self.hi)])
            out.append(v)
            have += len(v)
        return np.concatenate(out)[:n]


class Empirical:
    """The distribution of observed lengths (each sample weight 1/n); moments by prefix sums."""

    def __init__(self, samples: Sequence[float]) -> None:
        if len(samples) == 0:
            raise ValueError("need at least one length sample")
        self.xs = sorted(float(x) for x in samples)
        self._cum = [0.0]
        for x in self.xs:
            self._cum.append(self._cum[-1] + x)
        self.lo, self.hi = self.xs[0], self.xs[-1]

    def _count(self, a: float, b: float) -> tuple[int, int]:
        return bisect.bisect_right(self.xs, a), bisect.bisect_right(self.xs, b)

    def prob(self, a: float, b: float) -> float:
        i, j = self._count(a, b)
        return max(0, j - i) / len(self.xs)

    def partial_mean(self, a: float, b: float) -> float:
        i, j = self._count(a, b)
        return (self._cum[j] - self._cum[i]) / len(self.xs) if j > i else 0.0

    def thresholds(self) -> list[float]:
        """Every distinct sample (Λ only changes there) plus "offload all"."""
        return [self.lo - 1] + sorted(set(self.xs))
