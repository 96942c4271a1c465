"""The PrfaaS router: length-threshold routing with cache affinity (§2.4 / §3.4.3) and the two control loops.

Owns: the per-request decision (PrfaaS or local PD prefill, which cached prefix to use, whether a cache
must cross clusters), the short-timescale threshold loop fed with ``LinkState`` snapshots and the PrfaaS
queue depth, and the long-timescale re-plan over the observed incremental lengths (``model.plan``).
Pure: the clock is passed in (``now``), nothing here sleeps, locks or touches sockets.
Must not know: sockets, sessions, transfers, threads, or how ``LinkState`` is measured.

The paper gives no numbers for the short loop; ours (``RouterConfig``) and why:

* utilization is smoothed by an EWMA (α = 0.3 per new snapshot) so one noisy sample does not count;
* pressure = congested flag, or smoothed utilization ≥ 0.85, or PrfaaS queue ≥ 8; relief = not congested,
  smoothed utilization ≤ 0.60 (or unknown) and queue ≤ 2. Between the two nothing moves (hysteresis);
* a condition must hold for ``hold_s`` (0.3 s) before acting, and changes are ``cooldown_s`` (0.5 s) apart,
  so the transfer queue has time to respond before we judge again;
* the queue depth is the PrfaaS requests *waiting* for an instance, not those running (a busy instance
  is not a backlog: counting running ones read 4 busy instances as half of ``queue_high``);
* steps are bounded: up ×1.25 (at most ``max_step`` tokens), down ×0.9 but never below the planned t*;
  t stays within [t_min, t_max]. Up is faster than down: overload hurts more than a little lost offload;
* bandwidth is "scarce" for cache affinity when congested or smoothed utilization ≥ 0.70.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from ..congestion.estimator import LinkState
from . import model

PRFAAS = "prfaas"
PD = "pd"


@dataclass(frozen=True)
class RouterConfig:
    t_min: float = 0.0
    t_max: float = math.inf
    ewma: float = 0.3
    high_util: float = 0.85
    low_util: float = 0.60
    scarce_util: float = 0.70
    queue_high: int = 8
    queue_low: int = 2
    hold_s: float = 0.3
    cooldown_s: float = 0.5
    up: float = 1.25
    down: float = 0.9
    max_step: float = 16384.0
    replan_s: float = 30.0
    replan_min_samples: int = 50
    window: int = 4096  # incremental lengths kept for re-planning

    def __post_init__(self) -> None:
        if not 0 <= self.low_util < self.high_util:
            raise ValueError("need 0 <= low_util < high_util")
        if self.up <= 1 or not 0 < self.down < 1 or not 0 < self.ewma <= 1:
            raise ValueError("need up > 1, 0 < down < 1, 0 < ewma <= 1")


@dataclass(frozen=True)
class RouteRequest:
    """A request before prefill: full input length and the prefix each cluster already caches."""

    request_id: str
    total: int
    cached_pd: int = 0
    cached_prfaas: int = 0


@dataclass(frozen=True)
class Decision:
    request_id: str
    target: str  # PRFAAS or PD
    incremental: int  # tokens to prefill (uncached)
    prefix: int  # cached tokens the prefill starts from
    prefix_at: str | None  # cluster holding that prefix (None without one)
    transfer_cache: bool  # the prefix lives in the other cluster: move it first
    threshold: float
    scarce: bool


@dataclass(frozen=True)
class ThresholdChange:
    at: float
    old: float
    new: float
    why: str


@dataclass
class Router:
    """``route`` each request; feed ``observe`` with link snapshots; ``maybe_replan`` now and then."""

    t_star: float  # the planned threshold
    config: RouterConfig = field(default_factory=RouterConfig)
    deployment: model.Deployment | None = None  # enables the long-timescale re-plan
    t: float = field(init=False)
    util: float | None = field(init=False, default=None)
    congested: bool = field(init=False, default=False)
    queue: int = field(init=False, default=0)
    history: list[ThresholdChange] = field(init=False, default_factory=list)
    last_plan: model.Throughput | None = field(init=False, default=None)
    _lengths: deque[float] = field(init=False)
    _last_link: float | None = field(init=False, default=None)
    _pressure_since: float | None = field(init=False, default=None)
    _relief_since: float | None = field(init=False, default=None)
    _last_change: float = field(init=False, default=-math.inf)
    _last_plan_at: float | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        self.t = self._clamp(self.t_star)
        self._lengths = deque(maxlen=self.config.window)

    # ------------------------------------------------------------ routing
    @property
    def scarce(self) -> bool:
        return self.congested or (self.util is not None and self.util >= self.config.scarce_util)

    def route(self, req: RouteRequest) -> Decision:
        """§2.4: scarce bandwidth judges each cluster's own prefix; abundant uses the longer one anywhere."""
        if not 0 <= req.cached_pd <= req.total or not 0 <= req.cached_prfaas <= req.total:
            raise ValueError(f"{req.request_id}: cached prefixes must lie in [0, total]")
        scarce = self.scarce
        if scarce:
            if req.total - req.cached_pd <= self.t:
                target, prefix = PD, req.cached_pd
            else:
                target, prefix = PRFAAS, req.cached_prfaas
            at = target if prefix else None
            move = False
        else:
            prefix = max(req.cached_pd, req.cached_prfaas)
            target = PD if req.total - prefix <= self.t else PRFAAS
            if not prefix:
                at = None
            elif req.cached_pd == req.cached_prfaas:
                at = target
            else:
                at = PD if req.cached_pd > req.cached_prfaas else PRFAAS
            move = at is not None and at != target
        incremental = req.total - prefix
        self._lengths.append(float(incremental))
        return Decision(req.request_id, target, incremental, prefix, at, move, self.t, scarce)

    # ------------------------------------------------------------ short timescale
    def observe(self, now: float, link: LinkState | None, queue_depth: int) -> float:
        """Take the latest link snapshot (repeats are ignored) and the number of requests waiting for a
        PrfaaS instance (running ones excluded); return t."""
        cfg = self.config
        if link is not None and (self._last_link is None or link.timestamp > self._last_link):
            self._last_link = link.timestamp
            self.congested = link.congested
            if link.utilization is not None:
                u = link.utilization
                self.util = u if self.util is None else self.util + cfg.ewma * (u - self.util)
        self.queue = queue_depth
        util_high = self.util is not None and self.util >= cfg.high_util
        pressure = self.congested or util_high or queue_depth >= cfg.queue_high
        relief = (not self.congested and (self.util is None or self.util <= cfg.low_util)
                  and queue_depth <= cfg.queue_low)
        self._pressure_since = (self._pressure_since if self._pressure_since is not None else now) \
            if pressure else None
        self._relief_since = (self._relief_since if self._relief_since is not None else now) if relief else None
        if now - self._last_change < cfg.cooldown_s:
            return self.t
        if self._pressure_since is not None and now - self._pressure_since >= cfg.hold_s:
            why = "congested" if self.congested else "egress" if util_high else "queue"
            step = min(cfg.max_step, max(self.t * (cfg.up - 1), 1024.0))
            self._set(now, self.t + step, why)
        elif self._relief_since is not None and now - self._relief_since >= cfg.hold_s and self.t > self.t_star:
            new = max(self.t_star, self.t - min(cfg.max_step, self.t * (1 - cfg.down)))
            self._set(now, new if new - self.t_star > 0.01 * max(1.0, self.t_star) else self.t_star, "headroom")
        return self.t

    def _clamp(self, t: float) -> float:
        return min(self.config.t_max, max(self.config.t_min, t))

    def _set(self, now: float, t: float, why: str) -> None:
        t = self._clamp(t)
        if t != self.t:
            self.history.append(ThresholdChange(now, self.t, t, why))
            self.t = t
            self._last_change = now
            self._pressure_since = self._relief_since = None

    # ------------------------------------------------------------ long timescale
    @property
    def observed_lengths(self) -> Sequence[float]:
        return tuple(self._lengths)

    def maybe_replan(self, now: float, force: bool = False) -> model.Throughput | None:
        """§2.5: every ``replan_s``, re-run the grid search on the observed incremental lengths.

        Moves t* and returns the plan, whose ``n_p``/``n_d`` is the recommended PD split; ``None`` when not
        due, without a deployment, or with too few samples. A higher t* applies at once (fewer offloads is
        the safe direction); a lower one is approached by the short loop's bounded steps, given headroom.
        """
        cfg = self.config
        due = force or self._last_plan_at is None or now - self._last_plan_at >= cfg.replan_s
        if self.deployment is None or not due or len(self._lengths) < cfg.replan_min_samples:
            return None
        self._last_plan_at = now
        self.last_plan = model.plan(self.deployment, list(self._lengths))
        self.t_star = self._clamp(self.last_plan.split.t)
        if self.t < self.t_star:
            self._set(now, self.t_star, "replan")
        return self.last_plan
