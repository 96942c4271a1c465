"""The reference PrfaaS server end to end over real loopback sockets: route, prefill, stream, verify."""

from __future__ import annotations

import dataclasses
import importlib
import math
from typing import Any

import numpy as np
import pytest

import kvwire
from kvwire.congestion.controller import ControllerConfig
from kvwire.metrics import Metrics
from kvwire.prfaas import demo, model
from kvwire.prfaas.router import PD, PRFAAS, Router, RouteRequest
from kvwire.prfaas.server import PrfaasServer, SimulatedPrefill
from kvwire.prfaas.workload import check_payload, payload_bytes

KEY = b"prfaas-test"
SCALE = 64  # shipped tokens = logical length / SCALE


@pytest.fixture
def layout() -> kvwire.ModelLayout:
    full = kvwire.load_layout("kimi-linear-48b-a3b")
    return dataclasses.replace(full, name="kimi-linear-4l", layers=full.layers[:4])  # 3 KDA + 1 MLA


@pytest.mark.usefixtures("no_leaks")
def test_offloaded_requests_arrive_verified_and_short_ones_stay_local(layout: kvwire.ModelLayout) -> None:
    router = Router(8000.0)
    rx = kvwire.Receiver("127.0.0.1", 0, key=KEY)
    metrics = Metrics()
    server = PrfaasServer(layout, SimulatedPrefill(layout, model.table5_profile(), time_scale=0.01),
                          instances=2, lanes=3, key=KEY, monitor_interval=0.05, metrics=metrics)
    try:
        lengths = {"a": 1200, "b": 7999, "c": 9000, "d": 40000, "e": 120000}
        jobs = []
        for rid, n in lengths.items():
            d = router.route(RouteRequest(rid, n))
            assert (d.target == PRFAAS) == (n > 8000)
            if d.target == PD:
                continue
            tokens = math.ceil(n / SCALE)
            req = kvwire.RequestSpec(rid, tokens, tokens)
            dest = np.zeros(payload_bytes(layout, req), np.uint8)
            inc = rx.expect(rid, dest, layout=layout, state_position=tokens)
            jobs.append((req, dest, inc, server.submit(req, rx.address, length=d.incremental)))
        assert len(jobs) == 3
        for req, dest, inc, fut in jobs:
            rep = fut.result(timeout=30)
            inc.result(timeout=30)
            assert rep.ok and rep.bytes == len(dest) == payload_bytes(layout, req)
            assert rep.queued_s >= 0 and rep.prefill_s > 0 and rep.tail_s >= 0
            assert check_payload(layout, req, dest)
            assert sorted(inc.layers_ready) == list(range(layout.num_layers))
        assert len(server.lane_sockets()) == 3  # one session per decode peer, reused by every request
        assert server.queue_depth == 0
        assert server.monitor.wait_next(timeout=5) is not None and server.link_state() is not None
        text = metrics.render()  # the session to the decode peer, the link and the queue, as scraped
        peer = f'peer="{rx.address[0]}:{rx.address[1]}"'
        assert f"kvwire_sent_bytes_total{{{peer}}} {sum(len(j[1]) for j in jobs)}\n" in text
        assert f'kvwire_sent_transfers_total{{{peer},state="done"}} 3\n' in text
        assert "kvwire_prfaas_queue_depth 0\n" in text and 'kvwire_link_busy_ratio{link="prfaas"}' in text

        # a congested egress, as the LinkMonitor would publish it, pushes t up; 9000 now stays local
        state = dataclasses.replace(server.monitor.wait_next(timeout=5) or demo.synthetic_link(0, 0, False),
                                    congested=True)
        router.observe(state.timestamp, state, server.queue_depth)
        router.observe(state.timestamp + 0.4, dataclasses.replace(state, timestamp=state.timestamp + 0.4), 0)
        assert router.t > 8000 and router.history[-1].why == "congested"
        assert router.route(RouteRequest("c2", 9000)).target == PD
    finally:
        server.close()
        rx.close()
    assert "kvwire_prfaas_queue_depth" not in metrics.render()  # a closed server leaves the exposition


def test_a_wrong_destination_fails_the_content_check(layout: kvwire.ModelLayout) -> None:
    req = kvwire.RequestSpec("z", 10, 10)
    dest = np.zeros(payload_bytes(layout, req), np.uint8)
    assert not check_payload(layout, req, dest)


@pytest.mark.usefixtures("no_leaks")
def test_demo_runs_end_to_end() -> None:
    cfg = demo.DemoConfig(requests=10, layers=4, token_scale=64, time_scale=0.02, load=0.8, congest=None,
                          quiet=True, seed=7)
    res = demo.run(cfg)
    assert len(res.outcomes) == 10 and all(o.report is not None for o in res.outcomes)
    assert res.offloaded and all(o.verified for o in res.offloaded)
    for o in res.outcomes:
        assert (o.decision.target == PRFAAS) == (o.decision.incremental > o.decision.threshold)
        if o.decision.target == PD:
            assert o.verified is None and o.report is not None and o.report.bytes == 0
    assert res.bytes_moved == sum(o.report.bytes for o in res.offloaded if o.report)


@pytest.mark.usefixtures("no_leaks")
def test_the_egress_probes_its_first_session_once_and_later_ones_are_still_warmed(
        layout: kvwire.ModelLayout, monkeypatch: pytest.MonkeyPatch) -> None:
    """With ``probe_seconds``, the first decode session is measured by the egress's explicit probe only: it
    is not also warmed as it opens (one probe, whose capacity seeds the egress), while a later session,
    which nothing probes, is still warmed. Loopback stands in for a long path (``WARM_MIN_RTT`` 0)."""
    probe_module = importlib.import_module("kvwire.probe")
    server_module = importlib.import_module("kvwire.prfaas.server")
    calls: list[tuple[int, dict[str, Any]]] = []
    real = probe_module.probe

    def counting(session: kvwire.Session, **kw: Any) -> Any:
        calls.append((session.address[1], kw))
        return real(session, **kw)

    monkeypatch.setattr(probe_module, "probe", counting)  # what the warm-up runs ...
    monkeypatch.setattr(server_module, "probe", counting)  # ... and the egress's explicit probe
    monkeypatch.setattr(probe_module, "WARM_MIN_RTT", 0.0)  # every path warms
    rxs = [kvwire.Receiver("127.0.0.1", 0, key=KEY) for _ in range(2)]
    server = PrfaasServer(layout, SimulatedPrefill(layout, model.table5_profile(), time_scale=0.01), lanes=2,
                          key=KEY, monitor_interval=0.05, link_control=ControllerConfig(), probe_seconds=0.3)
    try:
        for i, rx in enumerate(rxs):
            req = kvwire.RequestSpec(f"p{i}", 64, 64)
            dest = np.zeros(payload_bytes(layout, req), np.uint8)
            inc = rx.expect(req.request_id, dest, layout=layout, state_position=64)
            assert server.submit(req, rx.address).result(timeout=30).ok
            inc.result(timeout=30)
            assert check_payload(layout, req, dest)
        first, second = (rx.address[1] for rx in rxs)
        assert [port for port, _ in calls] == [first, second]  # one probe per session, not two for the first
        assert calls[0][1] == {"seconds": 0.3}  # the first: the egress's probe of probe_seconds
        assert calls[1][1].get("until_full") is True  # the second: the warm-up
    finally:
        server.close()
        for rx in rxs:
            rx.close()
