"""The PrfaaS throughput model: equations on hand-computed cases, monotonicity, grid search, Table 5 and §4."""

from __future__ import annotations

import itertools
import math

import pytest

import kvwire
from kvwire.prfaas import model
from kvwire.prfaas.model import (
    GBPS,
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


def small_dep(n_prfaas: int = 2, n_pd: int = 4, b_out: float = 1e9) -> Deployment:
    # decode: 10 sequences, 0.1 s/step, 100 output tokens -> 1 req/s per instance
    return Deployment(LINEAR, LINEAR.scaled(2), KvSize(1000.0, 10.0), DecodeProfile(0.1, 10, 100),
                      n_prfaas, n_pd, b_out)


def test_kv_size_from_layout_matches_the_wire_payload() -> None:
    layout = kvwire.load_layout("kimi-linear-48b-a3b")
    kv = KvSize.from_layout(layout)
    req = kvwire.RequestSpec("r", 5000, 5000)
    assert kv.s_kv(5000) == sum(s.nbytes for s in kvwire.plan_segments(layout, req))


def test_table5_phi_kv_reproduces_the_gbps_column() -> None:
    for mib, secs, gbps in zip(model.TABLE5_KV_MIB, model.TABLE5_SECONDS, model.TABLE5_GBPS):
        assert model.phi_kv(mib * MIB, secs) * 8e-9 == pytest.approx(gbps, abs=0.03)


def test_table5_fit_and_profile() -> None:
    kv = model.table5_kv()
    assert kv.fixed_bytes / MIB == pytest.approx(172, abs=1)  # the digest's fit: 172 MiB + 16.7 KiB/token
    assert kv.bytes_per_token / 1024 == pytest.approx(16.7, abs=0.1)
    for n, mib in zip(model.TABLE5_LENGTHS, model.TABLE5_KV_MIB):
        assert kv.s_kv(n) / MIB == pytest.approx(mib, rel=0.015)
    prof = model.table5_profile()
    assert prof.t_prefill(8192) == pytest.approx(0.72)
    assert prof.t_prefill((32768 + 131072) / 2) == pytest.approx((1.84 + 7.40) / 2)
    assert prof.t_prefill(262144) > 7.40 and prof.t_prefill(128) < 0.44


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


def test_paper_case_study_cross_check() -> None:
    """§4 / Table 6 as far as our backed-out H20 and decode constants allow (see paper_deployment)."""
    dep = model.paper_deployment()
    samples = lognormal_lengths(20000, seed=1)
    assert sum(samples) / len(samples) == pytest.approx(27000, rel=0.05)  # "mean about 27K"
    at = split_lengths(samples, 19400)
    assert at.p == pytest.approx(0.496, abs=0.03) and at.l_long == pytest.approx(44000, rel=0.05)
    assert model.theta_prfaas(dep, at.l_long) == pytest.approx(1.61, rel=0.05)
    homo = model.plan(Deployment(dep.prfaas, dep.pd, dep.kv, dep.decode, 0, 12, 0.0), samples)
    assert (homo.n_p, homo.n_d, homo.split.p) == (9, 3, 0) and homo.lam_max == pytest.approx(2.11, rel=0.05)
    naive = throughput(dep, split_lengths(samples, 0), 0, 8)
    assert naive.lam_max == pytest.approx(2.45, rel=0.05)
    best = model.plan(dep, samples)
    assert best.lam_max / homo.lam_max > 1.4  # the paper: 1.54x
    assert best.egress < 0.2 * dep.b_out  # far from egress-bound: ~13 Gbps of 100 in the paper
    assert 8 * GBPS < best.egress and not math.isinf(best.lam_max)
