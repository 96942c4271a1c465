"""The PrfaaS throughput model: equations on hand-computed cases, monotonicity, grid search, Table 5 and §4."""

from __future__ import annotations

import itertools
import math

import pytest

import kvwire
from kvwire.prfaas import model, paper
from kvwire.prfaas.lengths import Empirical, expect
from kvwire.prfaas.model import (
    MIB,
    DecodeProfile,
    Deployment,
    KvSize,
    PrefillProfile,
    split_lengths,
    throughput,
)
from kvwire.prfaas.workload import lognormal_lengths

LINEAR = PrefillProfile((100.0, 200.0), (1.0, 2.0))  # T(l) = l / 100 s
SLOWER = PrefillProfile((100.0, 200.0), (2.0, 4.0))  # T(l) = l / 50 s


def small_dep(n_prfaas: int = 2, n_pd: int = 4, b_out: float = 1e9) -> Deployment:
    # decode: 10 sequences, 0.1 s/step, 100 output tokens -> 1 req/s per instance; S_kv(l) = 1000 + 10 l
    return Deployment(LINEAR, SLOWER, KvSize((0.0, 100.0), (1000.0, 2000.0)), DecodeProfile(0.1, 10, 100),
                      n_prfaas, n_pd, b_out)


def test_kv_size_from_layout_matches_the_wire_payload() -> None:
    layout = kvwire.load_layout("kimi-linear-48b-a3b")
    kv = KvSize.from_layout(layout)
    req = kvwire.RequestSpec("r", 5000, 5000)
    assert kv.s_kv(5000) == sum(s.nbytes for s in kvwire.plan_segments(layout, req))


def test_table5_phi_kv_reproduces_the_gbps_column() -> None:
    for mib, secs, gbps in zip(model.TABLE5_KV_MIB, model.TABLE5_SECONDS, model.TABLE5_GBPS):
        assert model.phi_kv(mib * MIB, secs) * 8e-9 == pytest.approx(gbps, abs=0.03)


def test_table5_curves_interpolate_the_measured_points() -> None:
    kv, prof = model.table5_kv(), model.table5_profile()
    for n, mib, secs in zip(model.TABLE5_LENGTHS, model.TABLE5_KV_MIB, model.TABLE5_SECONDS):
        assert kv.s_kv(n) / MIB == pytest.approx(mib) and prof.t_prefill(n) == pytest.approx(secs)
    assert kv.s_kv((8192 + 32768) / 2) / MIB == pytest.approx((308.9 + 701.3) / 2)
    assert prof.t_prefill((32768 + 131072) / 2) == pytest.approx((1.84 + 7.40) / 2)
    assert prof.t_prefill(262144) > 7.40 and prof.t_prefill(128) < 0.44
    with pytest.raises(ValueError):
        PrefillProfile((1.0, 1.0), (1.0, 2.0))
    with pytest.raises(ValueError):
        KvSize((1.0, 2.0), (1.0, float("nan")))


def test_equations_on_a_hand_computed_case() -> None:
    split = split_lengths([100, 100, 200, 300, 400], t=150)
    assert (split.p, split.l_long, split.l_short) == (0.6, 300, 100)
    dep = small_dep(b_out=10_000.0)
    r = throughput(dep, split, n_p=1, n_d=3)
    # Eq 3: min(2 / T(300)=3 s, 10000 B/s / S_kv(300)=4000 B) = min(0.667, 2.5)
    assert r.theta_prfaas == pytest.approx(2 / 3)
    assert r.theta_pdp == pytest.approx(1 / 2)  # Eq 4: 1 / (2 x T(100) = 2 s)
    assert r.theta_pdd == pytest.approx(3.0)  # Eq 5: 3 x 10 / (0.1 x 100)
    # Eq 6: min(0.667/0.6, 0.5/0.4, 3) = 1.111 (PrfaaS-bound)
    assert r.lam_max == pytest.approx((2 / 3) / 0.6) and r.bottleneck == "prfaas"
    assert r.egress == pytest.approx(r.lam_max * 0.6 * 4000)
    # egress-bound: the same with a thin pipe
    thin = throughput(small_dep(b_out=1000.0), split, 1, 3)
    assert thin.theta_prfaas == pytest.approx(0.25)


def test_an_empty_path_does_not_bound_lambda() -> None:
    dep = small_dep()
    none_off = throughput(dep, split_lengths([100, 200], t=1000), n_p=2, n_d=2)
    assert none_off.split.p == 0 and none_off.lam_max == pytest.approx(min(2 / 1.5 / 2, 2.0))
    all_off = throughput(dep, split_lengths([100, 200], t=0), n_p=0, n_d=4)
    assert all_off.split.p == 1 and all_off.lam_max == pytest.approx(min(2 / 1.5, 4.0))
    assert throughput(dep, split_lengths([100, 200], t=150), 0, 4).lam_max == 0  # short ones have nowhere to go


def test_raising_t_lowers_egress_need_for_a_large_state_model() -> None:
    """§2.3: with the 1T model, per-instance Φ_kv(l_long) falls as t rises, so the egress needed to keep
    PrfaaS compute-bound (N_prfaas · Φ_kv(l_long)) falls too; and Eq 7's two sides move in opposite ways."""
    dep = model.paper_deployment()
    samples = lognormal_lengths(4000, seed=3)
    need, lhs, rhs = [], [], []
    for t in (2000, 8000, 16000, 32000, 64000):
        s = split_lengths(samples, t)
        need.append(dep.n_prfaas * dep.kv.s_kv(s.l_long) / dep.prfaas.t_prefill(s.l_long))
        r = throughput(dep, s, 3, 5)
        lhs.append(r.theta_prfaas / s.p)
        rhs.append(r.theta_pdp / (1 - s.p))
    assert all(a > b for a, b in itertools.pairwise(need))
    assert all(a < b for a, b in itertools.pairwise(lhs))
    assert all(a > b for a, b in itertools.pairwise(rhs))


def test_grid_search_finds_the_brute_force_maximum() -> None:
    dep = small_dep(n_prfaas=2, n_pd=5, b_out=5000.0)
    samples = [120, 150, 180, 240, 300, 500, 700, 900, 110, 130]
    best = model.plan(dep, samples, thresholds=samples + [0, 1000])
    brute = max(throughput(dep, split_lengths(samples, t), n_p, 5 - n_p).lam_max
                for t in samples + [0, 1000] for n_p in range(6))
    assert best.lam_max == pytest.approx(brute) and best.lam_max > 0
    assert best.n_p + best.n_d == 5
    # the default grid (quantiles) reaches the same optimum on so few samples
    assert model.plan(dep, samples).lam_max == pytest.approx(brute)


def test_a_distribution_and_its_samples_give_the_same_split() -> None:
    """The closed-form truncated log-normal against 200k samples of it (and the empirical prefix sums)."""
    d = paper.workload()
    samples = lognormal_lengths(200_000, seed=7)
    assert d.mean == pytest.approx(27486, rel=1e-3) and sum(samples) / len(samples) == pytest.approx(d.mean, rel=0.01)
    emp = Empirical(samples)
    for t in (4000.0, 19400.0, 60000.0):
        exact, sampled = split_lengths(d, t), split_lengths(emp, t)
        assert exact.p == pytest.approx(sampled.p, abs=0.005)
        assert exact.l_long == pytest.approx(sampled.l_long, rel=0.01)
        assert exact.l_short == pytest.approx(sampled.l_short, rel=0.01)
    # E[T(L)] over a side, exactly, against the sample mean of T(l)
    prof = model.table5_profile()
    long = [x for x in samples if x > 19400]
    assert expect(d, prof.pieces(), 19400, math.inf) / d.prob(19400, math.inf) == pytest.approx(
        sum(prof.t_prefill(x) for x in long) / len(long), rel=0.01)
    assert d.quantile(0.9) == pytest.approx(sorted(samples)[180_000], rel=0.01)


def test_h20_curve_is_derived_from_table6_and_grows_against_h200() -> None:
    """The issue: the H20/H200 ratio grows from ~2.3x at 10K to ~2.7x at 27.5K; a constant factor cannot fit."""
    h20, h200, d = paper.h20_profile(), model.table5_profile(), paper.workload()
    s = split_lengths(d, 19400)
    assert 3 / h20(s.l_short) == pytest.approx(1.64, rel=1e-9)  # Eq 4 with N_p = 3 gives Table 6's Θ_pd-p
    assert 9 / h20(d.mean) == pytest.approx(2.11, rel=1e-9)  # homogeneous, N_p = 9
    assert h20(d.quantile(0.9)) == pytest.approx(9.73, rel=1e-9)  # the homogeneous P90 TTFT
    assert h20(10_000) / h200(10_000) == pytest.approx(2.3, abs=0.06)
    assert h20(27_500) / h200(27_500) == pytest.approx(2.7, abs=0.06)
    ratios = [h20(x) / h200(x) for x in (8192, 16384, 32768, 65536, 131072)]
    assert all(a < b for a, b in itertools.pairwise(ratios))


def _table6_misses(cases: dict[str, model.Throughput]) -> list[str]:
    out = []
    for name, row, ours, want in paper.table6_rows(cases):
        ok = ours == want if row in ("n_p", "n_d") else abs(ours - want) <= 0.05 * want
        if not ok:
            out.append(f"{name}.{row}: {ours:.4g} vs {want:.4g}")
    return out


def test_paper_case_reproduces_every_row_of_table6() -> None:
    cases = model.paper_cases()
    assert _table6_misses(cases) == []
    rows = {(n, k) for n, k, _, _ in paper.table6_rows(cases)}
    assert len(rows) == 20  # t, N_p, N_d, Θ x3 (x2 naive, x2 homog.), Λ_max, ratio: every row is checked
    best = cases["prfaas-pd"]
    assert best.split.p == pytest.approx(paper.OFFLOADED_SHARE, rel=0.05)
    assert best.split.l_long == pytest.approx(paper.OFFLOADED_MEAN, rel=0.05)
    assert best.egress * 8e-9 == pytest.approx(paper.EGRESS_GBPS, rel=0.1) and best.bottleneck == "prfaas"
    assert (cases["homogeneous"].split.p, cases["naive"].split.p) == (0, 1)


def test_table6_check_fails_for_a_constant_scaled_h20_curve() -> None:
    """Negative control: the old Table 5 x 2.65 H20 curve picks 4/4/4 and misses Θ rows."""
    dep = model.paper_deployment()
    h200 = model.table5_profile()
    scaled = Deployment(dep.prfaas, PrefillProfile(h200.lengths, [y * 2.65 for y in h200.seconds]), dep.kv,
                        dep.decode, dep.n_prfaas, dep.n_pd, dep.b_out)
    homo = Deployment(dep.prfaas, scaled.pd, dep.kv, dep.decode, 0, 12, dep.b_out)
    d = paper.workload()
    cases = {"prfaas-pd": model.plan(scaled, d), "homogeneous": model.plan(homo, d),
             "naive": model.evaluate(scaled, d, 0, 0, 8)}
    assert (cases["prfaas-pd"].n_p, cases["prfaas-pd"].n_d) == (4, 4)
    assert any(m.startswith("prfaas-pd.n_p") for m in _table6_misses(cases))


def test_the_optimum_is_deterministic_and_the_same_on_the_time_average() -> None:
    d = paper.workload()
    dep = model.paper_deployment()
    a, b = model.plan(dep, d), model.plan(dep, paper.workload())
    assert a == b  # no sampling: the same numbers, bit for bit
    # the refinement lands where Eq 7's sides meet (Θ_prfaas/p = Θ_pd-p/(1-p))
    assert a.theta_prfaas / a.split.p == pytest.approx(a.theta_pdp / (1 - a.split.p), rel=1e-6)
    timed = model.plan(dep, d, averaging="time")
    assert (timed.n_p, timed.n_d) == (3, 5) and timed.split.t == pytest.approx(a.split.t, rel=0.05)
    # E[T(L)] >= T(E[L]) for a convex curve: the time average never sustains more
    assert timed.lam_max < a.lam_max
    # samples (the router's re-plan) agree with the exact optimum
    for seed in range(3):
        s = model.plan(dep, lognormal_lengths(20_000, seed=seed))
        assert (s.n_p, s.n_d) == (3, 5) and s.lam_max == pytest.approx(a.lam_max, rel=0.02)
