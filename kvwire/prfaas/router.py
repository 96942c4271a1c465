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

Both sides: when the caller also passes a ``Backlog`` with the expected wait on each side (a new PrfaaS
request: its instance queue plus the egress backlog ahead of its KV at the measured rate; a new local one:
the local PD prefill queue), raising t is a trade, not a free relief valve: it moves work from the PrfaaS
side onto the local prefill queue. Then

* link/queue pressure raises t only while the PrfaaS wait is the longer one, and relief lowers it only
  while the local wait is not the longer one;
* one side's wait beyond ``balance_ratio`` (1.5) × the other's + ``balance_slack_s`` (3 s) moves t toward
  the other side (up: PrfaaS waits longer; down, never below t*: local waits longer);
* inside that band nothing moves: when both sides are overloaded (a slow link and a full local queue) t
  rests where the two waits grow together instead of swinging between t* and t_max (which it did
  without the local side: ~700 changes in a 10-minute drop in the simulator, each swing overfilling one
  queue and then the other);
* a change takes seconds to show in a wait of tens of seconds, so: moves are ``balance_cooldown_s`` (4 s)
  apart, wait-only evidence must hold ``balance_hold_s`` (2 s), and a second step the same way waits
  while the first is still narrowing the gap between the waits;
* congestion is judged on demand too: a congested flag or high utilization while the egress demand over
  ``demand_s`` is under ``low_util`` of the capacity (one cache's burst, RTTs inflated by a loaded CPU)
  must last ``burst_s`` (1 s) before t moves, not ``hold_s``; a demand that fills the capacity (a rate
  drop under load) moves it after ``hold_s``;
* headroom is judged on demand, not on one quiet moment: a link that went idle because t just rose is
  still short. A step down needs the egress demand it would bring to fit under ``low_util`` of the
  link's capacity: the goodput averaged over ``demand_s`` (20 s), scaled by the observed tokens above the
  new t vs above the t in force meanwhile (KV bytes grow with tokens). A recovered link passes at once
  (the capacity is back), and then t walks home at the one-sided pace (``cooldown_s``). The capacity is
  the estimator's, capped while congested (and until the link carries more, or ``demand_s`` passes) by
  the goodput it carried then: a probed capacity lags a rate drop.

Without waits (an ``int`` queue depth, or a ``Backlog`` without them) the loop is the one-sided one above.
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
    balance_ratio: float = 1.5
    balance_slack_s: float = 3.0
    balance_cooldown_s: float = 4.0
    balance_hold_s: float = 2.0
    demand_s: float = 20.0
    burst_s: float = 1.0
    replan_s: float = 30.0
    replan_min_samples: int = 50
    window: int = 4096  # incremental lengths kept for re-planning

    def __post_init__(self) -> None:
        if not 0 <= self.low_util < self.high_util:
            raise ValueError("need 0 <= low_util < high_util")
        if self.up <= 1 or not 0 < self.down < 1 or not 0 < self.ewma <= 1:
            raise ValueError("need up > 1, 0 < down < 1, 0 < ewma <= 1")
        if self.balance_ratio < 1 or self.balance_slack_s < 0 or self.balance_cooldown_s < 0:
            raise ValueError("need balance_ratio >= 1, balance_slack_s >= 0, balance_cooldown_s >= 0")


@dataclass(frozen=True)
class Backlog:
    """What waits ahead of prefill on each side, as the caller measures it. Waits in seconds: for a request
    routed now, the expected time before its prefill starts (PrfaaS: plus the egress backlog ahead of its KV
    at the measured egress rate). ``None``: not known (the loop is then one-sided)."""

    prfaas_queue: int  # requests waiting for a PrfaaS instance (running ones excluded)
    local_queue: int = 0  # requests waiting for a local PD prefill instance
    prfaas_wait_s: float | None = None
    local_wait_s: float | None = None

    def __post_init__(self) -> None:
        if self.prfaas_queue < 0 or self.local_queue < 0:
            raise ValueError("queue depths must be >= 0")
        for w in (self.prfaas_wait_s, self.local_wait_s):
            if w is not None and not w >= 0:
                raise ValueError(f"waits must be >= 0 seconds, got {w}")

    @property
    def balanced(self) -> bool:
        return self.prfaas_wait_s is not None and self.local_wait_s is not None


@dataclass(frozen=True)
class RouteRequest:
    """A request before prefill: full input length and the prefix each cluster already caches."""

    request_id: str
    total: int
    cached_pd: int = 0
    cached_prfaas: int = 0


@dataclass(frozen=True)
class RouteDecision:
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
    demand: float | None = field(init=False, default=None)  # egress goodput (bytes/s) over ~demand_s
    capacity: float | None = field(init=False, default=None)  # the link's, as last estimated
    congested: bool = field(init=False, default=False)
    queue: int = field(init=False, default=0)
    backlog: Backlog = field(init=False, default_factory=lambda: Backlog(0))
    history: list[ThresholdChange] = field(init=False, default_factory=list)
    last_plan: model.Throughput | None = field(init=False, default=None)
    _lengths: deque[float] = field(init=False)
    _last_link: float | None = field(init=False, default=None)
    _last_link_at: float | None = field(init=False, default=None)
    _demand_t: float = field(init=False, default=0.0)  # t averaged like ``demand``
    _carried: float | None = field(init=False, default=None)  # goodput while last congested
    _carried_at: float = field(init=False, default=0.0)
    _pressure_since: float | None = field(init=False, default=None)
    _relief_since: float | None = field(init=False, default=None)
    _last_change: float = field(init=False, default=-math.inf)
    _last_dir: int = field(init=False, default=0)  # +1 / -1: the last change raised / lowered t
    _gap: float = field(init=False, default=0.0)  # PrfaaS wait - local wait at the last observe (balanced)
    _gap_at_last: float = field(init=False, default=0.0)  # ... at the last change
    _last_plan_at: float | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        self.t = self._clamp(self.t_star)
        self._lengths = deque(maxlen=self.config.window)

    # ------------------------------------------------------------ routing
    @property
    def scarce(self) -> bool:
        return self.congested or (self.util is not None and self.util >= self.config.scarce_util)

    def route(self, req: RouteRequest) -> RouteDecision:
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
        return RouteDecision(req.request_id, target, incremental, prefix, at, move, self.t, scarce)

    # ------------------------------------------------------------ short timescale
    def observe(self, now: float, link: LinkState | None, queue_depth: int | Backlog) -> float:
        """Take the latest link snapshot (repeats are ignored) and either the number of requests waiting for
        a PrfaaS instance (running ones excluded) or a ``Backlog`` of both sides; return t."""
        cfg = self.config
        if link is not None and (self._last_link is None or link.timestamp > self._last_link):
            self._last_link = link.timestamp
            self.congested = link.congested
            if link.utilization is not None:
                u = link.utilization
                self.util = u if self.util is None else self.util + cfg.ewma * (u - self.util)
            if self.demand is None or self._last_link_at is None:
                self.demand, self._demand_t = link.goodput, self.t
            else:  # the goodput and the t it was produced under, averaged alike
                a = 1 - math.exp(-max(0.0, link.timestamp - self._last_link_at) / cfg.demand_s)
                self.demand += a * (link.goodput - self.demand)
                self._demand_t += a * (self.t - self._demand_t)
            self._last_link_at = link.timestamp
            # while congested the goodput is what the link carries: a lagging capacity estimate (probed
            # before a rate drop) is capped by it until the link carries more again, or demand_s passes
            if link.congested and link.goodput > 0:
                self._carried, self._carried_at = link.goodput, link.timestamp
            elif self._carried is not None and (link.goodput > self._carried
                                                or link.timestamp - self._carried_at > cfg.demand_s):
                self._carried = None
            # the estimator's capacity is unknown until a standing queue was seen (a link never filled):
            # then what the congested link carried is the capacity, not "unknown" (which reads as room)
            known = [c for c in (link.capacity, self._carried) if c]
            self.capacity = min(known) if known else None
        b = queue_depth if isinstance(queue_depth, Backlog) else Backlog(queue_depth)
        self.backlog, self.queue = b, b.prfaas_queue
        util_high = self.util is not None and self.util >= cfg.high_util
        pressure = self.congested or util_high or b.prfaas_queue >= cfg.queue_high
        relief = (not self.congested and (self.util is None or self.util <= cfg.low_util)
                  and b.prfaas_queue <= cfg.queue_low)
        why_up = "congested" if self.congested else "egress" if util_high else "queue"
        why_down = "headroom"
        cooldown, hold = cfg.cooldown_s, cfg.hold_s
        if b.prfaas_wait_s is not None and b.local_wait_s is not None:
            wp, wl = b.prfaas_wait_s, b.local_wait_s
            gap = wp - wl
            prfaas_longer = wp > cfg.balance_ratio * wl + cfg.balance_slack_s
            local_longer = wl > cfg.balance_ratio * wp + cfg.balance_slack_s
            # one burst (a single cache crossing, RTTs inflated by a loaded CPU) is not a short link: unless
            # the demand over demand_s fills the capacity too, the flag or a high utilization must last
            # burst_s (the estimator's capacity may lag a real drop, so it cannot veto one outright)
            unconfirmed = (self.congested or util_high) and self._demand_ratio(self.t) is not None \
                and self._demand_fits(self.t)
            up = (pressure and wp >= wl) or prfaas_longer
            # the link idle for a moment after t went up is not headroom: the demand it would see at the
            # lower t must fit too, or lowering t just refills it
            relief = relief and self._demand_fits(self._lowered())
            down = (relief and wl <= wp + cfg.balance_slack_s) or local_longer
            # a change takes seconds to show in a wait of many seconds: while the last move's direction is
            # still narrowing the gap, one more step would overshoot
            if up and self._last_dir > 0 and gap < self._gap_at_last:
                up = False
            if down and self._last_dir < 0 and gap > self._gap_at_last and not relief:
                down = False
            if up and not pressure:
                why_up, hold = "prfaas wait", cfg.balance_hold_s
            elif up and unconfirmed and not prfaas_longer and b.prfaas_queue < cfg.queue_high:
                hold = max(hold, cfg.burst_s)
            if down and not relief:
                why_down, hold = "local wait", cfg.balance_hold_s
            # going back to t* on a link idle now and over demand_s is as quick as one-sided; the rest waits
            # for the last change to show in the waits
            # (also a longer local wait, when the link would carry the lower t's demand: after a recovery)
            quick = relief or (local_longer and self._demand_ratio(self._lowered()) is not None
                               and self._demand_fits(self._lowered()))
            cooldown = cfg.cooldown_s if down and quick and not up else cfg.balance_cooldown_s
            pressure, relief = up, down
            self._gap = gap
        self._pressure_since = (self._pressure_since if self._pressure_since is not None else now) \
            if pressure else None
        self._relief_since = (self._relief_since if self._relief_since is not None else now) if relief else None
        if now - self._last_change < cooldown:
            return self.t
        if self._pressure_since is not None and now - self._pressure_since >= hold:
            step = min(cfg.max_step, max(self.t * (cfg.up - 1), 1024.0))
            self._set(now, self.t + step, why_up)
        elif self._relief_since is not None and now - self._relief_since >= hold and self.t > self.t_star:
            self._set(now, self._lowered(), why_down)
        return self.t

    def _lowered(self) -> float:
        """One bounded step down, never below t* (and onto t* when within 1 % of it)."""
        cfg = self.config
        new = max(self.t_star, self.t - min(cfg.max_step, self.t * (1 - cfg.down)))
        return new if new - self.t_star > 0.01 * max(1.0, self.t_star) else self.t_star

    def _demand_ratio(self, t_new: float) -> float | None:
        """The egress demand at ``t_new`` over the link's capacity; ``None`` while the capacity is unknown.
        The goodput over ``demand_s`` scaled by the tokens above ``t_new`` vs above the t in force meanwhile
        (averaged alike), among the observed incremental lengths (KV bytes grow with tokens)."""
        if self.demand is None or not self.capacity:
            return None
        above_now = sum(x for x in self._lengths if x > self._demand_t)
        above_new = sum(x for x in self._lengths if x > t_new)
        scale = above_new / above_now if above_now > 0 else (1.0 if above_new == 0 else math.inf)
        return self.demand * scale / self.capacity

    def _demand_fits(self, t_new: float) -> bool:
        """Would the demand at ``t_new`` stay under ``low_util`` of the capacity? Unknown capacity: yes (the
        utilization alone judges, as one-sided)."""
        ratio = self._demand_ratio(t_new)
        return ratio is None or ratio <= self.config.low_util

    def _clamp(self, t: float) -> float:
        return min(self.config.t_max, max(self.config.t_min, t))

    def _set(self, now: float, t: float, why: str) -> None:
        t = self._clamp(t)
        if t != self.t:
            self.history.append(ThresholdChange(now, self.t, t, why))
            self._last_dir, self._gap_at_last = (1 if t > self.t else -1), self._gap
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
