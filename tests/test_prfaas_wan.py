"""The PrfaaS loop on a real (emulated) cross-datacenter link: the prefill server streams caches through
WanLink with its decode session probed and paced by LinkControl, its LinkMonitor measures the egress, and
the router's short-timescale threshold holds while the load fits and rises when the link's rate drops
under the offered load, keeping more requests local. No synthetic LinkState here.

Needs root, iproute2 and iptables (skips with the reason otherwise).
"""

from __future__ import annotations

import dataclasses
import statistics
import time

import numpy as np
import pytest

import kvwire
from kvwire.congestion.controller import ControllerConfig
from kvwire.congestion.estimator import LinkState
from kvwire.prfaas import model
from kvwire.prfaas.router import PRFAAS, Router, RouteRequest
from kvwire.prfaas.server import PrfaasServer, SimulatedPrefill
from kvwire.prfaas.workload import payload_bytes
from kvwire.testing.wan import WanLink, unavailable_reason

_REASON = unavailable_reason()
pytestmark = [pytest.mark.netns, pytest.mark.skipif(_REASON is not None, reason=_REASON or "")]

KEY = b"prfaas-wan"
RATE_MBIT, CUT_MBIT, RTT_MS = 200.0, 40.0, 20.0


def test_the_router_keeps_requests_local_when_the_wan_rate_drops() -> None:
    full = kvwire.load_layout("kimi-linear-48b-a3b")
    layout = dataclasses.replace(full, name="kimi-linear-4l", layers=full.layers[:4])
    req_tokens = 40  # ~6.6 MB per request, nearly all KDA state: ~0.26 s on the wire at 200 Mbit/s
    per_request = payload_bytes(layout, kvwire.RequestSpec("size", req_tokens, req_tokens))
    assert 1e6 < per_request < 8e6
    every = per_request * 8 / (RATE_MBIT * 1e6) / 0.4  # offered load: 40 % of the link before the cut
    bdp = int(RATE_MBIT * 1e6 / 8 * RTT_MS / 1e3)
    router = Router(8000.0)
    reports = []
    with WanLink(rtt_ms=RTT_MS, rate_mbit=RATE_MBIT, queue_bytes=3 * bdp, realtime=True) as link:
        with link.inside("server"):
            rx = kvwire.Receiver(link.server_addr, 0, key=KEY, allocator=lambda m: np.empty(m.total_bytes, np.uint8))
        try:
            with link.inside("client"):  # its workers dial the decode side: they must start in the namespace
                server = PrfaasServer(layout, SimulatedPrefill(layout, model.table5_profile(), time_scale=0.0),
                                      instances=2, lanes=4, key=KEY, monitor_interval=0.1,
                                      link_control=ControllerConfig(), probe_seconds=1.0)
            try:
                # a first request dials the session, probes the link (1 s) and starts the egress control;
                # the load starts after it, so no backlog from the probe's second reads as pressure
                warm = kvwire.RequestSpec("warm-up", req_tokens, req_tokens)
                assert server.submit(warm, (link.server_addr, rx.address[1])).result(timeout=30).ok
                t0 = time.monotonic()
                settled, cut_at, end_at, k, next_submit = 1.0, 5.0, 10.0, 0, t0
                t_before_cut = None
                while (now := time.monotonic()) - t0 < end_at:
                    if now >= next_submit:
                        d = router.route(RouteRequest(f"r{k}", 20000))  # long: offloaded while t < 20000
                        if d.target == PRFAAS:
                            req = kvwire.RequestSpec(f"r{k}", req_tokens, req_tokens)
                            reports.append(server.submit(req, (link.server_addr, rx.address[1])))
                        k += 1
                        next_submit += every
                    router.observe(now - t0, server.link_state(), server.queue_depth)
                    if t_before_cut is None and now - t0 >= cut_at:
                        t_before_cut = router.t
                        link.set_rate(CUT_MBIT)
                    time.sleep(0.02)
                done = [f.result(timeout=60) for f in reports]
            finally:
                server.close()
        finally:
            rx.close()
    assert all(r.ok for r in done), [r.reason for r in done if not r.ok]
    assert t_before_cut is not None
    # paced, with the probed capacity known, 40 % of the link is no pressure
    assert not [c for c in router.history if settled <= c.at < cut_at and c.new > c.old], router.history
    raised = [c for c in router.history if c.at >= cut_at]
    assert raised and raised[0].at <= cut_at + 2.5, router.history  # the real egress told it within 2.5 s
    assert raised[0].why in ("congested", "egress") and router.t > 20000  # long requests now stay local


def test_two_decode_peers_share_the_egress_under_one_link_control() -> None:
    """Two decode peers behind one link: their sessions join one LaneGroup under one LinkControl (not one
    controller per peer, competing). Offered more than the link, it is used and no queue stands."""
    full = kvwire.load_layout("kimi-linear-48b-a3b")
    layout = dataclasses.replace(full, name="kimi-linear-4l", layers=full.layers[:4])
    tokens = 40  # ~6.6 MB per request
    per_request = payload_bytes(layout, kvwire.RequestSpec("size", tokens, tokens))
    payload_rate = RATE_MBIT * 1e6 / 8 * 1448 / 1500
    bdp = int(RATE_MBIT * 1e6 / 8 * RTT_MS / 1e3)
    states: list[LinkState] = []
    with WanLink(rtt_ms=RTT_MS, rate_mbit=RATE_MBIT, queue_bytes=3 * bdp, realtime=True) as link:
        with link.inside("server"):
            rxs = [kvwire.Receiver(link.server_addr, 0, key=KEY, allocator=lambda m: np.empty(m.total_bytes, np.uint8))
                   for _ in range(2)]
        peers = [(link.server_addr, rx.address[1]) for rx in rxs]
        try:
            with link.inside("client"):
                server = PrfaasServer(layout, SimulatedPrefill(layout, model.table5_profile(), time_scale=0.0),
                                      instances=4, lanes=4, key=KEY, monitor_interval=0.1,
                                      link_control=ControllerConfig(), probe_seconds=1.0)
            try:
                for peer in peers:  # dial both; the first one's probe starts the egress control
                    assert server.submit(kvwire.RequestSpec(f"warm{peer[1]}", tokens, tokens), peer).result(30).ok
                server.subscribe(states.append)
                t0 = time.monotonic()
                before = [rx.stats()["bytes_received"] for rx in rxs]
                n = int(1.5 * 5.0 * payload_rate / per_request)  # 150 % of what the link carries in 5 s
                jobs = [server.submit(kvwire.RequestSpec(f"r{i}", tokens, tokens), peers[i % 2]) for i in range(n)]
                time.sleep(5.0)
                got = [rx.stats()["bytes_received"] - b for rx, b in zip(rxs, before)]
                elapsed = time.monotonic() - t0
                done = [j.result(timeout=60) for j in jobs]
            finally:
                server.close()
        finally:
            for rx in rxs:
                rx.close()
    assert all(r.ok for r in done), [r.reason for r in done if not r.ok]
    assert sum(got) / elapsed >= 0.8 * payload_rate, f"{sum(got) / elapsed * 8e-6:.0f} Mbit/s"
    assert min(got) >= 0.35 * sum(got), got  # both peers carried
    loaded = [s for s in states if t0 + 1.0 <= s.timestamp <= t0 + 5.0 and s.busy > 0.5]
    assert loaded and max(len(s.lanes) for s in loaded) == 8  # one control samples both sessions' lanes
    assert statistics.median(s.queueing_ratio or 9 for s in loaded) <= 1.3
