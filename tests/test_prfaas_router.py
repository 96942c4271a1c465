"""The PrfaaS router: routing rules (§2.4), the short loop on synthetic LinkState streams, the long re-plan."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from kvwire.congestion.estimator import LinkState
from kvwire.prfaas import model
from kvwire.prfaas.router import PD, PRFAAS, Router, RouterConfig, RouteRequest
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
