"""The PrfaaS discrete-event simulator against the planner and Table 6, and the real router reacting in it."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from kvwire.prfaas import model, paper, sim
from kvwire.prfaas.router import RouterConfig

N = 20_000  # requests per run: enough for ±1 % on rates, a second or two each


def _planner(cfg: sim.SimConfig, averaging: str) -> model.Throughput:
    return model.evaluate(cfg.deployment, paper.workload(), cfg.t, cfg.n_p, cfg.n_d, averaging=averaging)


@pytest.mark.parametrize("name", ["prfaas-pd", "homogeneous", "naive"])
def test_saturated_throughput_matches_the_planner(name: str) -> None:
    """Offered 1.3x the planner's Λ_max: the sim delivers what the planner says the stages sustain."""
    base = sim.paper_configs(sim.Arrivals(1.0), requests=N)[name]
    timed = _planner(base, "time")  # E[T(L)]: what FIFO instances serving each request's own T(l) sustain
    paper_eq = _planner(base, "length")  # the paper's Eq 3-4, T(E[L])
    r = sim.simulate(dataclasses.replace(base, arrivals=sim.Arrivals(1.3 * paper_eq.lam_max)))
    assert r.unfinished == 0
    assert r.sustainable == pytest.approx(timed.lam_max, rel=0.05)
    assert r.throughput == pytest.approx(timed.lam_max, rel=0.05)
    assert r.utilization[timed.bottleneck] > 0.97  # the planner's bottleneck is the stage that saturates
    # against the paper's own averaging the gap is Jensen's (T is convex): within 5 % here, 5.2 % for naive
    gap = r.throughput / paper_eq.lam_max - 1
    assert -0.06 < gap < 0.0 and (abs(gap) < 0.05 or name == "naive")


def test_decode_bound_and_egress_bound_points_match_too() -> None:
    dep = model.paper_deployment()
    homo = model.Deployment(dep.prfaas, dep.pd, dep.kv, dep.decode, 0, 12, dep.b_out)
    cfg = sim.SimConfig(homo, paper.workload().hi, 9, 2, sim.Arrivals(2.0), requests=N)  # 2 decode: 1.56 req/s
    r = sim.simulate(cfg)
    assert r.throughput == pytest.approx(2 * dep.decode.rate(), rel=0.02) and r.utilization["pd-d"] > 0.99
    thin = dataclasses.replace(dep, b_out=1 * model.GBPS)  # 1 Gbit/s: naive becomes egress-bound
    cfg = sim.SimConfig(thin, 0, 0, 8, sim.Arrivals(0.3), requests=N // 4)
    want = model.evaluate(thin, paper.workload(), 0, 0, 8, averaging="time")
    assert want.theta_prfaas == pytest.approx(thin.b_out / (want.egress / want.lam_max / want.split.p))
    r = sim.simulate(cfg)
    assert r.throughput == pytest.approx(want.lam_max, rel=0.05) and r.utilization["egress"] > 0.97
    assert r.utilization["prfaas"] < 0.6  # the instances idle, waiting on nothing: compute is not the limit


def test_light_load_ttft_matches_table6() -> None:
    """At 0.2 req/s (queues near empty) TTFT is prefill time plus the decode step, as the paper's figures
    are (PrfaaS-PD and naive share P90 = 3.51 s = T_H200(P90 length)). Within 5 % of every figure."""
    for name, cfg in sim.paper_configs(sim.Arrivals(0.2), requests=N).items():
        r = sim.simulate(cfg)
        want = paper.TABLE6[name]
        assert r.ttft_mean == pytest.approx(want["ttft_mean"], rel=0.05), name
        assert r.ttft_pct(90) == pytest.approx(want["ttft_p90"], rel=0.05), name


def test_link_rate_drop_raises_t_and_recovery_brings_it_back() -> None:
    dep = model.paper_deployment()
    best = model.paper_cases()["prfaas-pd"]
    router = RouterConfig(queue_high=10**9, queue_low=10**9, t_max=paper.workload().hi)  # the link signal alone
    cfg = sim.at_plan(dep, best, sim.Arrivals(2.0), requests=4000, adaptive=True, router_config=router,
                      link_rates=((600.0, 2 * model.GBPS), (1200.0, 100 * model.GBPS)), sees_local=False)
    r = sim.simulate(cfg)
    assert r.unfinished == 0
    ups = [(at, t) for at, t in r.thresholds if 600 <= at and t > best.split.t]
    assert ups and ups[0][0] < 602  # t rises within two seconds of the drop
    assert all(t == best.split.t for at, t in r.thresholds if at < 600)  # untouched before it
    last = r.thresholds[-1]
    assert last[1] == best.split.t and last[0] < 1230  # back at t* within 30 s of the recovery

    def share(a: float, b: float) -> float:
        m = (r.arrivals >= a) & (r.arrivals < b)
        return float(r.routed_prfaas[m].mean())

    assert share(0, 600) == pytest.approx(best.split.p, abs=0.05)
    assert share(610, 1190) < 0.5 * share(0, 600)  # long requests stay local while the link is short
    assert share(1240, r.arrivals[-1]) == pytest.approx(best.split.p, abs=0.05)


def _drop_run(sees_local: bool, seed: int) -> tuple[sim.SimResult, float]:
    """benchmarks/prfaas_sim.py's link drop: 1.5 req/s, egress 100 -> 4 Gbit/s over [600, 1200) s. Both the
    link and the local PD prefill are short of capacity then (all-local or all-offloaded long requests
    each overload one side)."""
    best = model.paper_cases()["prfaas-pd"]
    cfg = sim.at_plan(model.paper_deployment(), best, sim.Arrivals(1.5), requests=2700, seed=seed, adaptive=True,
                      router_config=RouterConfig(t_max=paper.workload().hi), sees_local=sees_local,
                      link_rates=((600.0, 4 * model.GBPS), (1200.0, 100 * model.GBPS)))
    return sim.simulate(cfg), best.split.t


@pytest.mark.parametrize("seed", [0, 1])
def test_a_slow_link_with_a_full_local_queue_finds_a_balance_instead_of_swinging(seed: int) -> None:
    """Told both sides' waits (a ``Backlog``), the short loop holds t where the PrfaaS wait (queue + egress
    backlog) and the local prefill wait balance. Told the PrfaaS side alone (as before), t swings between t*
    and t_max for the whole drop (seed 0: 715 changes, TTFT 141 s mean), each swing overfilling one queue
    and then the other. Measured with the balance (seed 0): 34 changes, TTFT 23.5 s."""
    blind, t_star = _drop_run(False, seed)
    both, _ = _drop_run(True, seed)
    assert blind.unfinished == both.unfinished == 0

    def during(r: sim.SimResult) -> tuple[int, float]:
        changes = sum(1 for at, _ in r.thresholds if 600 <= at < 1200)
        m = (r.arrivals >= 630) & (r.arrivals < 1200)
        return changes, float(np.nanmean(r.ttft_all[m]))

    (n_blind, ttft_blind), (n_both, ttft_both) = during(blind), during(both)
    assert n_blind > 300  # the saw-tooth this fixes
    assert n_both < 60 and ttft_both < 0.5 * ttft_blind
    ups = [at for at, t in both.thresholds if at >= 600 and t > t_star]
    assert ups and ups[0] < 602  # still rises within two seconds of the drop
    assert all(t == t_star for at, t in both.thresholds if at < 600)
    back = [at for at, t in both.thresholds if at >= 1200 and t == t_star]
    assert back and back[0] < 1230 and both.thresholds[-1][1] == t_star  # and comes back after it

    def share(a: float, b: float) -> float:
        m = (both.arrivals >= a) & (both.arrivals < b)
        return float(both.routed_prfaas[m].mean())

    assert share(630, 1200) < 0.6 * share(60, 600)  # long requests stay local while the link is short
    assert share(1230, both.arrivals[-1]) == pytest.approx(share(60, 600), abs=0.05)


def test_bursty_arrivals_keep_the_mean_and_fatten_the_tail() -> None:
    rng = np.random.default_rng(1)
    times = sim.Arrivals(2.0, "bursty", peak_ratio=4, period_s=60).times(200_000, rng)
    assert len(times) / times[-1] == pytest.approx(2.0, rel=0.03) and np.all(np.diff(times) >= 0)
    cfg = sim.paper_configs(sim.Arrivals(2.5), requests=N)["prfaas-pd"]
    smooth = sim.simulate(cfg)
    bursty = sim.simulate(dataclasses.replace(cfg, arrivals=sim.Arrivals(2.5, "bursty")))
    assert bursty.ttft_pct(90) > 1.5 * smooth.ttft_pct(90)


def test_bad_configs_are_refused() -> None:
    dep = model.paper_deployment()
    with pytest.raises(ValueError):
        sim.Arrivals(0.0)
    with pytest.raises(ValueError):
        sim.SimConfig(dep, 1000, 5, 5, sim.Arrivals(1.0))  # 10 > the 8 PD instances
    with pytest.raises(ValueError):
        sim.simulate(sim.SimConfig(dep, 1000, 0, 8, sim.Arrivals(1.0), requests=100))  # short ones: nowhere


def test_the_short_loop_never_routes_to_a_path_without_instances() -> None:
    """Naive heterogeneous has no PD prefill: queue pressure may not raise t there (it crashed before)."""
    naive = sim.paper_configs(sim.Arrivals(2.3), requests=3000)["naive"]
    r = sim.simulate(dataclasses.replace(naive, adaptive=True))
    assert r.unfinished == 0 and r.offloaded == 1.0 and len(r.thresholds) == 1



def test_busy_prfaas_instances_are_not_a_queue() -> None:
    """The short loop's queue signal counts requests waiting for a PrfaaS instance, not those running. At
    2 req/s (PrfaaS instances ~63 % busy, the link idle) with the default queue_high = 8, the offloaded
    share stays within 2 % of the planned p and t moves rarely (40 changes in 4000 requests). Fed waiting +
    running, as before, the 4 busy instances counted toward queue_high: 140 changes, 4.4 % under p."""
    best = model.paper_cases()["prfaas-pd"]
    cfg = sim.at_plan(model.paper_deployment(), best, sim.Arrivals(2.0), requests=4000, adaptive=True,
                      router_config=RouterConfig(t_max=paper.workload().hi))
    r = sim.simulate(cfg)
    assert r.utilization["prfaas"] > 0.5 and r.utilization["egress"] < 0.3  # busy instances, idle link
    assert r.offloaded == pytest.approx(best.split.p, rel=0.02)
    assert len(r.thresholds) < 70
