"""Discrete-event simulator of a PrfaaS deployment, driven by the real ``Router`` on a simulated clock.

Owns: arrivals (Poisson, or bursty: a two-state Markov-modulated Poisson process), the PrfaaS and PD
prefill pools (FIFO queues, each request served for its own T_prefill(l)), the PrfaaS egress as one shared
link (a fluid FIFO queue fed as each prefill produces its KV layer by layer; its rate can change
mid-run), decode slots stepping every T_decode, and
the statistics (throughput, TTFT, per-stage utilization). Every routing decision is ``Router.route`` and,
when ``adaptive``, the short loop is ``Router.observe`` fed a ``LinkState`` built from the simulated link
and a ``Backlog`` of both prefill queues every ``tick_s`` — the same code the served deployment runs, with
``now`` from the event clock. The waits in that ``Backlog`` are exact (the queued requests' own prefill
seconds over the instances; PrfaaS adds the egress backlog at the link's rate): a real deployment estimates
them. ``sees_local=False`` feeds the PrfaaS queue depth alone, as the loop was before it saw both sides.
Must not know: sockets, threads, wall clocks (only ``wall_s`` is measured, for the report).

Model choices, each a simplification someone should know about:

* The PrfaaS instance is free when its compute ends; its KV may still be draining (the paper's
  "shipped asynchronously"), so egress only bounds throughput through the backlog, as Eq 3's min says.
* A flow's bytes are produced evenly over its prefill (layer-wise pipelining in the fluid limit), so
  on an uncongested link the KV is at decode when the prefill ends. The real exposed tail (about one
  layer's bytes, ~1 ms for the 1T model at 100 Gbit/s) is left out.
* PD-cluster KV moves over RDMA in no time (the paper's Eq 4 assumption).
* Decode: N_d · BS_max slots, every instance steps on the same grid k · T_decode. A request admitted at
  time a joins the step that starts at the next grid point s0; its first token is out at s0 + T_decode
  (TTFT counts to here: the first token the user sees comes from the decode node), its last at
  s0 + L_out · T_decode, when the slot frees.
"""

from __future__ import annotations

import dataclasses
import heapq
import math
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from ..congestion.estimator import LinkState
from . import model, paper
from .lengths import TruncatedLogNormal
from .router import PRFAAS, Backlog, Router, RouterConfig, RouteRequest

_ARRIVE, _PREFILL_DONE, _LINK, _DECODE_DONE, _TICK, _RATE, _MARK = range(7)


@dataclass(frozen=True)
class Arrivals:
    """Mean ``rate`` req/s. ``bursty``: high and low phases (each of exponential length, mean
    ``period_s``/2) whose rates differ by ``peak_ratio`` and average to ``rate``."""

    rate: float
    kind: str = "poisson"
    peak_ratio: float = 4.0
    period_s: float = 60.0

    def __post_init__(self) -> None:
        if not self.rate > 0 or self.kind not in ("poisson", "bursty"):
            raise ValueError("need rate > 0 and kind 'poisson' or 'bursty'")
        if self.peak_ratio < 1 or self.period_s <= 0:
            raise ValueError("need peak_ratio >= 1 and period_s > 0")

    def times(self, n: int, rng: np.random.Generator) -> np.ndarray:
        if self.kind == "poisson":
            return np.cumsum(rng.exponential(1 / self.rate, n))
        r = self.peak_ratio
        rates = (2 * self.rate * r / (1 + r), 2 * self.rate / (1 + r))
        out = np.empty(n)
        now, state, k = 0.0, 0, 0
        phase_end = rng.exponential(self.period_s / 2)
        while k < n:  # memoryless: a gap cut by a phase change restarts at the new rate
            gap = rng.exponential(1 / rates[state])
            if now + gap < phase_end:
                now += gap
                out[k] = now
                k += 1
            else:
                now, state = phase_end, 1 - state
                phase_end = now + rng.exponential(self.period_s / 2)
        return out


@dataclass(frozen=True)
class SimConfig:
    """One run: a deployment at an operating point (threshold ``t``, ``n_p`` PD prefill and ``n_d`` decode
    instances out of its PD cluster), an arrival process, and optional egress rate changes."""

    deployment: model.Deployment
    t: float
    n_p: int
    n_d: int
    arrivals: Arrivals
    requests: int = 100_000
    seed: int = 0
    lengths: TruncatedLogNormal = field(default_factory=paper.workload)
    link_rates: tuple[tuple[float, float], ...] = ()  # (at_s, bytes/s): the egress rate from then on
    adaptive: bool = False  # run the router's short loop; otherwise t stays at its planned value
    router_config: RouterConfig | None = None
    sees_local: bool = True  # the short loop gets both sides' waits (a Backlog), not just the PrfaaS queue
    tick_s: float = 0.1  # how often the router observes the link (LinkControl publishes every 100 ms)
    congested_s: float = 0.2  # LinkState.congested: more than this many seconds of the link unsent
    warmup: float = 0.1  # share of the requests (the first ones) left out of the statistics

    def __post_init__(self) -> None:
        dep = self.deployment
        if self.n_d <= 0 or self.n_p < 0 or self.requests < 10 or not 0 <= self.warmup < 0.9:
            raise ValueError("need n_d > 0, n_p >= 0, at least 10 requests and 0 <= warmup < 0.9")
        if self.n_p + self.n_d > dep.n_pd and dep.n_pd > 0:
            raise ValueError(f"n_p + n_d = {self.n_p + self.n_d} exceeds the PD cluster's {dep.n_pd}")
        if self.tick_s <= 0 or any(r < 0 for _, r in self.link_rates):
            raise ValueError("need tick_s > 0 and link rates >= 0")


@dataclass
class SimResult:
    """Statistics over the measured window (from the first measured arrival to the last arrival)."""

    requests: int
    window_s: float
    offered: float  # arrivals/s in the window
    throughput: float  # requests/s that finished decoding in the window
    sustainable: float  # Eq 6 on measured rates: min(prfaas rate / its share, pd-p rate / its share, decode)
    path_rate: dict[str, float]  # requests/s each stage finished in the window
    offloaded: float  # share routed to PrfaaS
    ttft: np.ndarray  # seconds, measured requests that got a first token, in arrival order
    utilization: dict[str, float]  # busy share of each stage's capacity in the window; egress: of the link
    egress_gbps: float  # mean egress in the window
    thresholds: list[tuple[float, float]]  # (time, t) each time the router moved t
    wall_s: float
    unfinished: int  # requests that never finished decoding (0 unless something is broken)
    arrivals: np.ndarray  # every request (warm-up included): arrival time, whether it went to PrfaaS, TTFT
    routed_prfaas: np.ndarray
    ttft_all: np.ndarray  # NaN where no first token came

    @property
    def ttft_mean(self) -> float:
        return float(self.ttft.mean())

    def ttft_pct(self, q: float) -> float:
        return float(np.percentile(self.ttft, q))


class _Busy:
    """∫ level dt clipped to [w0, w1]."""

    __slots__ = ("w0", "w1", "level", "last", "total")

    def __init__(self, w0: float, w1: float) -> None:
        self.w0, self.w1, self.level, self.last, self.total = w0, w1, 0.0, 0.0, 0.0

    def set(self, now: float, level: float) -> None:
        a, b = max(self.last, self.w0), min(now, self.w1)
        if b > a:
            self.total += self.level * (b - a)
        self.level, self.last = level, now


class _Link:
    """The PrfaaS egress as one fluid FIFO queue: bytes leave in the order prefill produced them (kvwire's
    lanes pull chunks from one queue as layers are handed over), at most at the link's rate. A flow is
    delivered when everything produced up to the end of its prefill has left."""

    def __init__(self, rate: float, w0: float, w1: float) -> None:
        self.rate = rate
        self.producing: dict[int, float] = {}  # rid -> bytes/s its prefill produces
        self.due: deque[tuple[float, int]] = deque()  # (produced bytes to wait for, rid), FIFO
        self.made = self.sent = 0.0  # cumulative bytes produced / sent
        self.last = 0.0
        self.cap_win = _Busy(w0, w1)  # ∫ capacity
        self.cap_win.set(0.0, rate)

    def advance(self, now: float) -> None:
        dt = now - self.last
        if dt > 0:
            self.made += sum(self.producing.values()) * dt
            self.sent = min(self.sent + self.rate * dt, self.made)
        self.last = now

    @property
    def backlog(self) -> float:
        return self.made - self.sent

    def settle(self, now: float) -> tuple[float, list[int]]:
        """After ``advance(now)`` and any change: (time of the next delivery, flows delivered now)."""
        done = []
        while self.due and self.due[0][0] <= self.sent * (1 + 1e-12) + 1e-6:
            done.append(self.due.popleft()[1])
        if not self.due or self.rate <= 0:
            return math.inf, done
        return now + (self.due[0][0] - self.sent) / self.rate, done


def simulate(cfg: SimConfig) -> SimResult:
    wall0 = time.perf_counter()
    dep = cfg.deployment
    rng = np.random.default_rng(cfg.seed)
    n = cfg.requests
    arrive = cfg.arrivals.times(n, rng)
    length = cfg.lengths.sample(n, rng)
    first = int(n * cfg.warmup)
    w0, w1 = float(arrive[first]), float(arrive[-1])
    rcfg = cfg.router_config or RouterConfig()
    if not cfg.adaptive:
        rcfg = dataclasses.replace(rcfg, t_min=cfg.t, t_max=cfg.t)
    elif cfg.n_p == 0:  # the short loop may not send anything to a path that has no instances
        rcfg = dataclasses.replace(rcfg, t_min=min(rcfg.t_min, cfg.t), t_max=cfg.t)
    elif dep.n_prfaas == 0:
        rcfg = dataclasses.replace(rcfg, t_min=cfg.t, t_max=max(rcfg.t_max, cfg.t))
    router = Router(cfg.t, rcfg)
    t_dec, l_out = dep.decode.t_decode, int(dep.decode.l_out)
    slots_total = int(round(cfg.n_d * dep.decode.bs_max))

    to_prfaas = np.zeros(n, bool)
    kv_ready = np.full(n, np.nan)
    first_tok = np.full(n, np.nan)
    done_at = np.full(n, np.nan)
    events: list[tuple[float, int, int, int]] = []
    seq = 0

    def push(at: float, kind: int, arg: int) -> None:
        nonlocal seq
        seq += 1
        heapq.heappush(events, (at, seq, kind, arg))

    # prefill pools: [free instances, FIFO, busy integrator, seconds per request, instances, queued seconds]
    pools = {True: [dep.n_prfaas, deque(), _Busy(w0, w1), dep.prfaas.many(length).tolist(), dep.n_prfaas, 0.0],
             False: [cfg.n_p, deque(), _Busy(w0, w1), dep.pd.many(length).tolist(), cfg.n_p, 0.0]}
    kv_bytes = dep.kv.many(length).tolist()
    lengths_int = length.astype(int).tolist()
    if dep.n_prfaas <= 0 and cfg.t < cfg.lengths.hi:
        raise ValueError("requests above t need PrfaaS instances")
    if cfg.n_p <= 0 and cfg.t >= cfg.lengths.lo:
        raise ValueError("requests at or below t need PD prefill instances")
    link = _Link(dep.b_out, w0, w1)
    link_version = 0
    waiting_decode: deque[int] = deque()
    free_slots = slots_total
    dec_busy = _Busy(w0, w1)
    rates = sorted(cfg.link_rates)
    for k, (at, _) in enumerate(rates):
        push(at, _RATE, k)
    if cfg.adaptive:
        push(0.0, _TICK, 0)
    push(float(arrive[0]), _ARRIVE, 0)
    push(w0, _MARK, 0)
    push(w1, _MARK, 1)
    marks = [0.0, 0.0]  # bytes sent by w0 and by w1
    sent_at_tick = 0.0
    thresholds: list[tuple[float, float]] = [(0.0, router.t)]

    def relink(now: float) -> None:
        nonlocal link_version
        nxt, finished = link.settle(now)
        for rid in finished:
            decode_ready(now, rid)
        link_version += 1
        if nxt < math.inf:
            push(nxt, _LINK, link_version)

    def start_prefill(now: float, off: bool, rid: int) -> None:
        pool = pools[off]
        pool[0] -= 1
        pool[2].set(now, pool[4] - pool[0])
        dur = pool[3][rid]
        push(now + dur, _PREFILL_DONE, rid)
        if off:
            link.advance(now)
            link.producing[rid] = kv_bytes[rid] / dur
            relink(now)

    def decode_ready(now: float, rid: int) -> None:
        nonlocal free_slots
        kv_ready[rid] = now
        if free_slots > 0:
            admit(now, rid)
        else:
            waiting_decode.append(rid)

    def admit(now: float, rid: int) -> None:
        nonlocal free_slots
        free_slots -= 1
        dec_busy.set(now, slots_total - free_slots)
        s0 = math.ceil(now / t_dec - 1e-9) * t_dec
        first_tok[rid] = s0 + t_dec
        push(s0 + l_out * t_dec, _DECODE_DONE, rid)

    while events:
        now, _, kind, arg = heapq.heappop(events)
        if kind == _ARRIVE:
            rid = arg
            if rid + 1 < n:
                push(float(arrive[rid + 1]), _ARRIVE, rid + 1)
            off = router.route(RouteRequest(str(rid), lengths_int[rid])).target == PRFAAS
            to_prfaas[rid] = off
            pool = pools[off]
            if pool[4] <= 0:
                raise ValueError(f"request {rid} routed to a pool with no instances")
            if pool[0] > 0:
                start_prefill(now, off, rid)
            else:
                pool[1].append(rid)
                pool[5] += pool[3][rid]
        elif kind == _PREFILL_DONE:
            rid = arg
            off = bool(to_prfaas[rid])
            pool = pools[off]
            pool[0] += 1
            pool[2].set(now, pool[4] - pool[0])
            if off:
                link.advance(now)
                del link.producing[rid]
                link.due.append((link.made, rid))
                relink(now)
            else:
                decode_ready(now, rid)
            if pool[1]:
                nxt = pool[1].popleft()
                pool[5] = pool[5] - pool[3][nxt] if pool[1] else 0.0
                start_prefill(now, off, nxt)
        elif kind == _LINK:
            if arg == link_version:
                link.advance(now)
                relink(now)
        elif kind == _DECODE_DONE:
            done_at[arg] = now
            free_slots += 1
            dec_busy.set(now, slots_total - free_slots)
            if waiting_decode:
                admit(now, waiting_decode.popleft())
        elif kind == _RATE:
            link.advance(now)
            link.rate = rates[arg][1]
            link.cap_win.set(now, link.rate)
            relink(now)
        elif kind == _MARK:
            link.advance(now)
            marks[arg] = link.sent
        elif kind == _TICK:
            link.advance(now)
            served = link.sent - sent_at_tick
            sent_at_tick = link.sent
            backlog = link.backlog
            u = served / (link.rate * cfg.tick_s) if link.rate > 0 else (1.0 if backlog > 0 else 0.0)
            congested = backlog > link.rate * cfg.congested_s if link.rate > 0 else backlog > 0
            before = router.t
            router.observe(now, _link_state(now, served / cfg.tick_s, link.rate, u, congested),
                           _backlog(pools, link, cfg.sees_local))
            if router.t != before:
                thresholds.append((now, router.t))
            if events:  # keep ticking while anything is left to happen
                push(now + cfg.tick_s, _TICK, 0)

    for b in (*(p[2] for p in pools.values()), dec_busy, link.cap_win):
        b.set(w1, b.level)
    win = w1 - w0
    meas = slice(first, n)
    in_win = (done_at >= w0) & (done_at <= w1)
    off_m = to_prfaas[meas]
    prefill_end = kv_ready  # for both paths: the KV is at decode
    rate = {"prfaas": float(np.sum((prefill_end >= w0) & (prefill_end <= w1) & to_prfaas)) / win,
            "pd-p": float(np.sum((prefill_end >= w0) & (prefill_end <= w1) & ~to_prfaas)) / win,
            "pd-d": float(np.sum(in_win)) / win}
    p = float(off_m.mean())
    sustainable = min(rate["prfaas"] / p if p > 0 else math.inf,
                      rate["pd-p"] / (1 - p) if p < 1 else math.inf, rate["pd-d"])
    util = {"prfaas": pools[True][2].total / (win * max(1, dep.n_prfaas)),
            "pd-p": pools[False][2].total / (win * max(1, cfg.n_p)),
            "pd-d": dec_busy.total / (win * slots_total),
            "egress": (marks[1] - marks[0]) / link.cap_win.total if link.cap_win.total > 0 else 0.0}
    ttft = (first_tok - arrive)[meas]
    return SimResult(n, win, (n - 1 - first) / win, rate["pd-d"], sustainable, rate, p, ttft[~np.isnan(ttft)],
                     util, (marks[1] - marks[0]) / win * 8e-9, thresholds, time.perf_counter() - wall0,
                     int(np.isnan(done_at).sum()), arrive, to_prfaas, first_tok - arrive)


def _backlog(pools: dict[bool, list], link: _Link, sees_local: bool) -> Backlog | int:
    """What the router is told each tick: the PrfaaS queue alone, or both sides' expected waits (queued
    prefill seconds spread over the instances; PrfaaS also the egress backlog at the link's rate)."""
    pq = len(pools[True][1])
    if not sees_local:
        return pq
    drain = link.backlog / link.rate if link.rate > 0 else (math.inf if link.backlog > 0 else 0.0)
    return Backlog(pq, len(pools[False][1]), pools[True][5] / max(1, pools[True][4]) + min(drain, 1e9),
                   pools[False][5] / max(1, pools[False][4]))


def _link_state(now: float, goodput: float, capacity: float, util: float, congested: bool) -> LinkState:
    return LinkState(timestamp=now, goodput=goodput, btl_bw=goodput, capacity=capacity, utilization=util,
                     available_bw=max(0.0, capacity - goodput), min_rtt=None, srtt=None, queueing_ratio=None,
                     loss_rate=0.0, busy=min(1.0, util), rwnd_limited=0.0, sndbuf_limited=0.0,
                     congested=congested, saturated=util >= 0.95)


def at_plan(dep: model.Deployment, point: model.Throughput, arrivals: Arrivals, **kw: object) -> SimConfig:
    """A ``SimConfig`` at a planner's operating point."""
    return SimConfig(dep, point.split.t, point.n_p, point.n_d, arrivals, **kw)  # type: ignore[arg-type]


def paper_configs(arrivals: Arrivals | Sequence[Arrivals], requests: int = 100_000, seed: int = 0,
                  averaging: str = "length") -> dict[str, SimConfig]:
    """Table 6's three deployments at the planner's operating points (``model.paper_cases``)."""
    cases = model.paper_cases(averaging)
    dep = model.paper_deployment()
    homo = model.Deployment(dep.prfaas, dep.pd, dep.kv, dep.decode, 0, 12, dep.b_out)
    arr = [arrivals] * 3 if isinstance(arrivals, Arrivals) else list(arrivals)
    deps = {"prfaas-pd": dep, "homogeneous": homo, "naive": dep}
    return {name: at_plan(deps[name], cases[name], a, requests=requests, seed=seed)
            for (name, point), a in zip(cases.items(), arr)}
