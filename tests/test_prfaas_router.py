"""The PrfaaS router: routing rules (§2.4), the short loop on synthetic LinkState streams, the long re-plan."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from kvwire.congestion.estimator import LinkState
from kvwire.prfaas import model
from kvwire.prfaas.router import PD, PRFAAS, Backlog, Router, RouterConfig, RouteRequest
from kvwire.prfaas.workload import lognormal_lengths

T = 8000.0


def link(now: float, util: float | None = 0.3, congested: bool = False) -> LinkState:
    return LinkState(timestamp=now, goodput=0.0, btl_bw=0.0, capacity=None if util is None else 1.0,
                     utilization=util, available_bw=None, min_rtt=None, srtt=None, queueing_ratio=None,
                     loss_rate=0.0, busy=1.0, rwnd_limited=0.0, sndbuf_limited=0.0, congested=congested,
                     saturated=False)


def feed(r: Router, start: float, end: float, util: float | None, congested: bool = False, queue: int = 0,
         dt: float = 0.1) -> float:
    now = start
    while now < end - 1e-9:
        r.observe(now, link(now, util, congested), queue)
        now = round(now + dt, 6)
    return now


def test_routes_by_incremental_length() -> None:
    r = Router(T)
    assert r.route(RouteRequest("a", 5000)).target == PD
    assert r.route(RouteRequest("b", 8000)).target == PD  # l <= t stays local
    d = r.route(RouteRequest("c", 8001))
    assert (d.target, d.incremental, d.prefix, d.prefix_at, d.transfer_cache) == (PRFAAS, 8001, 0, None, False)
    d = r.route(RouteRequest("d", 30000, cached_pd=25000))  # long input, short uncached tail
    assert (d.target, d.incremental, d.prefix_at) == (PD, 5000, PD)
    assert list(r.observed_lengths) == [5000, 8000, 8001, 5000]


def test_cache_affinity_scarce_judges_each_cluster_alone() -> None:
    r = Router(T)
    feed(r, 0, 1, util=0.75)  # above scarce_util, below high_util: scarce, t unchanged
    assert r.scarce and r.t == T
    d = r.route(RouteRequest("x", 30000, cached_pd=20000, cached_prfaas=25000))
    # PD's own tail is 10000 > t -> PrfaaS, which starts from its own 25000-token prefix; nothing moves
    assert (d.target, d.incremental, d.prefix, d.prefix_at, d.transfer_cache, d.scarce) == \
        (PRFAAS, 5000, 25000, PRFAAS, False, True)


def test_cache_affinity_abundant_uses_the_longer_prefix_anywhere() -> None:
    r = Router(T)
    feed(r, 0, 1, util=0.2)
    assert not r.scarce
    d = r.route(RouteRequest("x", 30000, cached_pd=20000, cached_prfaas=25000))
    assert (d.target, d.incremental, d.prefix, d.prefix_at, d.transfer_cache) == (PD, 5000, 25000, PRFAAS, True)
    d = r.route(RouteRequest("y", 100000, cached_pd=50000))
    assert (d.target, d.incremental, d.prefix_at, d.transfer_cache) == (PRFAAS, 50000, PD, True)
    d = r.route(RouteRequest("z", 100000, cached_pd=50000, cached_prfaas=50000))
    assert (d.target, d.prefix_at, d.transfer_cache) == (PRFAAS, PRFAAS, False)
    with pytest.raises(ValueError):
        r.route(RouteRequest("bad", 10, cached_pd=11))


def test_congestion_raises_t_in_bounded_steps_and_headroom_restores_it() -> None:
    cfg = RouterConfig(t_max=64000)
    r = Router(T, cfg)
    now = feed(r, 0, 3, util=0.5, congested=True)
    ups = list(r.history)
    assert ups and all(c.why == "congested" and c.new > c.old for c in ups)
    assert all(c.new - c.old <= max(cfg.max_step, c.old * (cfg.up - 1)) + 1e-6 for c in ups)
    assert all(b.at - a.at >= cfg.cooldown_s for a, b in itertools.pairwise(ups))
    assert r.route(RouteRequest("mid", int(T) + 1000)).target == PD  # what was offloaded now stays local
    raised = r.t
    feed(r, now, now + 30, util=0.3)
    downs = r.history[len(ups):]
    assert downs and all(c.why == "headroom" and c.new < c.old for c in downs)
    assert all(c.old - c.new <= c.old * (1 - cfg.down) + 1e-6 for c in downs)
    assert raised > T and r.t == T  # back exactly at the planned t*, never below


def test_queue_surge_raises_t_and_t_max_caps_it() -> None:
    r = Router(T, RouterConfig(t_max=12000))
    feed(r, 0, 5, util=None, queue=20)
    assert r.t == 12000 and r.history[0].why == "queue"


def test_a_single_spike_does_not_move_t() -> None:
    r = Router(T)
    r.observe(0.0, link(0.0, 0.3), 0)
    r.observe(0.1, link(0.1, 0.3, congested=True), 0)
    feed(r, 0.2, 3, util=0.3)
    assert r.t == T and not r.history


def test_no_oscillation_under_noisy_utilization_around_the_threshold() -> None:
    cfg = RouterConfig(t_max=1e6)
    r = Router(T, cfg)
    rng = np.random.default_rng(0)
    utils = cfg.high_util + rng.uniform(-0.06, 0.06, 600)
    assert sum((a >= cfg.high_util) != (b >= cfg.high_util) for a, b in itertools.pairwise(utils)) > 100
    for i, u in enumerate(utils):
        r.observe(i * 0.1, link(i * 0.1, float(u)), 0)
    directions = [c.new > c.old for c in r.history]
    assert sum(a != b for a, b in itertools.pairwise(directions)) == 0  # never flips between up and down
    # and around the low mark it only walks back down, never up
    r2 = Router(T, cfg)
    feed(r2, 0, 3, util=0.5, congested=True)
    n = len(r2.history)
    for i, u in enumerate(cfg.low_util + rng.uniform(-0.06, 0.06, 600)):
        r2.observe(3 + i * 0.1, link(3 + i * 0.1, float(u)), 0)
    assert all(c.new < c.old for c in r2.history[n:])


def test_repeated_snapshots_are_not_counted_twice() -> None:
    r = Router(T)
    s = link(1.0, 1.0)
    for k in range(10):
        r.observe(1.0 + k * 0.01, s, 0)
    assert r.util == 1.0
    r.observe(2.0, link(2.0, 0.0), 0)
    assert r.util == pytest.approx(0.7)  # one EWMA step of 0.3


def test_long_timescale_replans_on_observed_lengths() -> None:
    dep = model.paper_deployment()
    r = Router(50000.0, RouterConfig(replan_s=10, replan_min_samples=100), deployment=dep)
    assert r.maybe_replan(0.0) is None  # too few samples
    for i, n in enumerate(lognormal_lengths(500, seed=5)):
        r.route(RouteRequest(f"r{i}", n))
    p = r.maybe_replan(1.0)
    assert p is not None and p.n_p + p.n_d == dep.n_pd and p.lam_max > 0
    assert r.t_star == p.split.t < 50000 and r.t == 50000  # a lower t* is not jumped to ...
    assert p.lam_max == pytest.approx(model.plan(dep, list(r.observed_lengths)).lam_max)
    feed(r, 1.0, 10.0, util=0.2)  # ... but walked to in bounded steps, given headroom
    assert r.t == r.t_star and len(r.history) > 3 and all(c.why == "headroom" for c in r.history)
    assert r.maybe_replan(5.0) is None and r.maybe_replan(11.0) is not None
    low = Router(1000.0, RouterConfig(replan_s=10, replan_min_samples=100), deployment=dep)
    for i, n in enumerate(lognormal_lengths(500, seed=5)):
        low.route(RouteRequest(f"r{i}", n))
    p2 = low.maybe_replan(0.0)  # a higher t* applies at once
    assert p2 is not None and low.t == low.t_star == p2.split.t > 1000 and low.history[-1].why == "replan"


# ------------------------------------------------------------ both sides (Backlog with waits)
CAP = 1e9  # bytes/s


def egress(now: float, goodput: float, congested: bool, cap: float | None = CAP) -> LinkState:
    util = None if cap is None else goodput / cap
    room = None if cap is None else cap - goodput
    return LinkState(timestamp=now, goodput=goodput, btl_bw=goodput, capacity=cap, utilization=util,
                     available_bw=room, min_rtt=None, srtt=None, queueing_ratio=None, loss_rate=0.0,
                     busy=1.0, rwnd_limited=0.0, sndbuf_limited=0.0, congested=congested, saturated=False)


def lengths_router(cfg: RouterConfig | None = None) -> Router:
    r = Router(T, cfg or RouterConfig(t_max=1e6))
    for i, n in enumerate(lognormal_lengths(2000, seed=3)):
        r.route(RouteRequest(f"r{i}", n))  # the observed lengths the demand forecast scales by
    return r


def run(r: Router, start: float, end: float, goodput: float, congested: bool,
        waits: object, dt: float = 0.1, cap: float | None = CAP) -> float:
    now = start
    while now < end - 1e-9:
        wp, wl = waits(now) if callable(waits) else waits  # type: ignore[misc]
        r.observe(now, egress(now, goodput, congested, cap), Backlog(0, 0, wp, wl))
        now = round(now + dt, 6)
    return now


def test_a_rate_drop_with_room_locally_raises_t_within_a_second() -> None:
    r = lengths_router()
    now = run(r, 0, 30, 0.3 * CAP, False, (0.0, 0.0))
    assert r.t == T and not r.history
    # the rate falls to a fifth: the link is full at its new capacity, 8 s of backlog, local queue empty
    run(r, now, now + 1.0, 0.2 * CAP, True, (8.0, 0.0), cap=0.2 * CAP)
    assert r.history and r.history[0].at - now <= 1.0 and r.t > T and r.history[0].why == "congested"


def test_one_burst_on_a_mostly_idle_link_is_not_congestion() -> None:
    """A single cache crossing fills the link for a second and trips the congestion flag: judged on the
    demand (goodput over demand_s vs capacity) it is no reason to keep long requests local. The one-sided
    loop (queue depth only) moves t on the same snapshots."""
    both, one_sided = lengths_router(), lengths_router()
    for r, queue in ((both, Backlog(0, 0, 0.5, 0.0)), (one_sided, 0)):
        now = 0.0
        while now < 30:
            burst = 28 <= now < 28.8  # under burst_s (1 s); hold_s is 0.3 s
            r.observe(now, egress(now, CAP if burst else 0.05 * CAP, burst), queue)
            now = round(now + 0.1, 6)
    assert both.t == T and not both.history
    assert one_sided.history and one_sided.t > T


def test_both_sides_overloaded_t_rests_where_the_waits_balance() -> None:
    """Slow link and a full local queue: both waits grow together. Told both, t holds still; told the PrfaaS
    side only, the congestion flag walks t up to t_max (the saw-tooth's first half)."""
    cfg = RouterConfig(t_max=64000)
    both, one_sided = lengths_router(cfg), lengths_router(cfg)
    for r in (both, one_sided):
        run(r, 0, 20, CAP, True, (6.0, 0.0))  # the drop: t rises while the local side has room
    raised = both.t
    assert raised > T
    n = len(both.history)
    run(both, 20, 80, CAP, True, lambda now: (10 + now, 9 + now))  # both waits grow, within the band
    assert len(both.history) == n and both.t == raised
    for k in range(600):
        one_sided.observe(20 + k * 0.1, egress(20 + k * 0.1, CAP, True), 0)
    assert one_sided.t == 64000


def test_a_longer_local_wait_lowers_t_in_spaced_steps_never_below_t_star() -> None:
    cfg = RouterConfig(t_max=64000)
    r = lengths_router(cfg)
    run(r, 0, 20, CAP, True, (6.0, 0.0))
    n = len(r.history)
    assert r.t > T
    run(r, 20, 120, CAP, True, (2.0, 40.0))  # the local queue now waits far longer
    downs = r.history[n:]
    assert downs and all(c.why == "local wait" and c.new < c.old for c in downs)
    assert all(b.at - a.at >= cfg.balance_cooldown_s for a, b in itertools.pairwise(downs))
    assert r.t == T  # back at t*, never below


def test_backlog_is_checked() -> None:
    with pytest.raises(ValueError):
        Backlog(-1)
    with pytest.raises(ValueError):
        Backlog(0, 0, -1.0, 0.0)
    with pytest.raises(ValueError):
        RouterConfig(balance_ratio=0.5)


def test_a_drop_on_a_link_never_filled_before_holds_t_while_the_link_idles() -> None:
    """The served case: the egress never had a standing queue, so the estimator's capacity is unknown
    (None). After a rate drop raises t the link goes idle (nothing long is sent); what the congested link
    carried is then its capacity, so the quiet that follows is no headroom and t holds until the link
    carries more again. (The router used to read the unknown capacity as room and walk t back to t* within
    seconds of the rise, during the drop.)"""
    r = lengths_router()
    now = run(r, 0, 30, 0.3 * CAP, False, (0.0, 0.0), cap=None)
    assert r.t == T
    now = run(r, now, now + 2.0, 0.01 * CAP, True, (4.0, 0.0), cap=None)
    raised = r.t
    assert raised > T and r.history[-1].why == "congested"
    # t up: nothing crosses, the link reads idle (not congested), the waits are even
    now = run(r, now, now + 12.0, 0.0, False, (0.0, 0.0), cap=None)
    assert r.t == raised, [(c.at, c.t, c.why) for c in r.history]
    # the link carries a long request at its old rate again: the room is real, t walks home
    run(r, now, now + 30.0, 0.3 * CAP, False, (0.0, 0.0), cap=None)
    assert r.t < raised
