"""The PrfaaS loop on a real (emulated) cross-datacenter link: the prefill server streams caches through
WanLink with its decode session probed and paced by LinkControl, its LinkMonitor measures the egress, and
the router's short-timescale threshold holds while the load fits and rises when the link's rate drops
under the offered load, keeping more requests local. No synthetic LinkState here.

Needs root, iproute2 and iptables (skips with the reason otherwise).
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import pytest

import kvwire
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
                                      link_control=kvwire.ControllerConfig(), probe_seconds=1.0)
            try:
                t0 = time.monotonic()
                settled, cut_at, end_at, k, next_submit = 3.0, 7.0, 11.0, 0, t0
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
    # the probe's second of saturation may read as congestion; once paced, 40 % of the link is no pressure
    assert not [c for c in router.history if settled <= c.at < cut_at and c.new > c.old], router.history
    raised = [c for c in router.history if c.at >= cut_at]
    assert raised and raised[0].at <= cut_at + 2.5, router.history  # the real egress told it within 2.5 s
    assert raised[0].why in ("congested", "egress") and router.t > 20000  # long requests now stay local
