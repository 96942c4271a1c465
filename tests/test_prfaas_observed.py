"""The router's pure helpers: a node's /link JSON as a LinkState, and the long loop's measured profile."""

from __future__ import annotations

import pytest

from kvwire.prfaas.fleet import backlog, link_state
from kvwire.prfaas.observed import ObservedProfile


def test_an_idle_egress_is_not_congested_whatever_its_last_rtts_said() -> None:
    busy = {"timestamp": 5.0, "utilization": 0.9, "congested": True, "busy": 0.4, "srtt": 0.04, "min_rtt": 0.02}
    s = link_state(busy, now=9.0)
    assert s.congested and s.utilization == 0.9 and s.timestamp == 5.0 and s.srtt == 0.04
    idle = dict(busy, busy=0.0)
    assert not link_state(idle, now=9.0).congested
    sparse = link_state({"congested": True, "utilization": "bad"}, now=3.0)  # missing/bad fields: unknown
    assert sparse.congested and sparse.utilization is None and sparse.timestamp == 3.0


def test_observed_profile_needs_enough_lengths_and_gives_non_decreasing_curves() -> None:
    p = ObservedProfile(min_samples=8, bins=4)
    for n in (100, 100, 100, 100, 100, 100, 100, 100):
        p.record_prefill(n, 0.05, 50_000)
    p.record_tpot(0.01)
    assert p.curves() is None  # one length only: no curve
    for n, sec in ((200, 0.09), (400, 0.2), (800, 0.35), (800, 0.5), (1600, 0.7), (1600, 0.6)):
        p.record_prefill(n, sec, n * 500)
    curves = p.curves()
    assert curves is not None
    prefill, kv = curves
    assert prefill.t_prefill(100) == pytest.approx(0.05, rel=0.2)
    assert all(b >= a for a, b in zip(prefill.seconds, prefill.seconds[1:]))
    dep = p.deployment(1, 2, batch=4, l_out=32, b_out=1e8)
    assert dep is not None and dep.decode.t_decode == 0.01 and dep.n_pd == 2 and dep.kv.s_kv(1600) > dep.kv.s_kv(100)
    p.record_prefill(0, 1.0, 10)  # nonsense is ignored
    p.record_tpot(float("nan"))
    assert p.samples == 14


def test_backlog_turns_node_queues_into_both_sides_waits() -> None:
    # 2 PrfaaS nodes (queued, running), 2 local prefill nodes (queued): 3 vs 1 waiting per node
    b = backlog([(4, 1), (2, 1)], [1, 1], prefill_s=2.0, kv_bytes=1e9, capacity=0.5e9)
    assert (b.prfaas_queue, b.local_queue) == (2, 1)  # PrfaaS queue beyond the local one
    # PrfaaS: 3 x 2 s of prefill + the KV of all 8 requests there ahead of a new one at 0.5 GB/s (16 s)
    assert b.prfaas_wait_s == pytest.approx(6.0 + 16.0) and b.local_wait_s == pytest.approx(2.0)
    fast = backlog([(4, 1), (2, 1)], [1, 1], prefill_s=2.0, kv_bytes=1e9, capacity=None)
    assert fast.prfaas_wait_s == pytest.approx(6.0)  # capacity unknown: no transfer term
    counts = backlog([(4, 1)], [1], prefill_s=None, kv_bytes=None, capacity=None)
    assert not counts.balanced and counts.prfaas_queue == 3  # no prefill measured yet: one-sided
    assert not backlog([], [5], 2.0, 1e9, 1e9).balanced  # without both clusters there is nothing to trade
    with pytest.raises(ValueError):
        backlog([(-1, 0)], [], None, None, None)


def test_observed_typical_prefill() -> None:
    o = ObservedProfile()
    assert o.typical() is None
    for tokens, secs, nbytes in ((100, 1.0, 10), (200, 3.0, 30), (300, 2.0, 20)):
        o.record_prefill(tokens, secs, nbytes)
    assert o.typical() == (2.0, 20.0)
