"""The deployment across an emulated WAN (``up --wan``): the PrfaaS node in one namespace behind the link, the
local cluster and the front door in the other. A PrfaaS prefill crosses the link and gives the local tokens;
the link cut mid-prefill (every packet dropped, both ways) → the request is re-prefilled locally with the same
tokens, the router stops routing to the node until the link is back and its /health answers.

Needs root, iproute2 and iptables (skips with the reason otherwise).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest

from kvwire.testing import netns
from kvwire.testing.wan import unavailable_reason

_REASON = unavailable_reason()
pytestmark = [pytest.mark.netns, pytest.mark.slow, pytest.mark.skipif(_REASON is not None, reason=_REASON or "")]
pytest.importorskip("openai")
pytest.importorskip("transformers")
import openai  # noqa: E402
from prfaas_deploy_util import get_json, stream_tokens, wait_for, wait_gone, write_config  # noqa: E402

from kvwire.prfaas.launcher import Deployment, WanSpec  # noqa: E402

LONG = " ".join(f"word{i % 97}" for i in range(500))[:3000]


@pytest.fixture
def wan_deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    tmp = tmp_path_factory.mktemp("prfaas-wan")
    d = Deployment(write_config(tmp / "deploy.toml", node_timeout_s=1.0), wan=WanSpec(200.0, 20.0),
                   log_dir=tmp / "logs")
    d.start(timeout=120)
    pids, namespaces = list(d.pids().values()), list(d.link.namespaces)
    try:
        yield d
    finally:
        d.stop()
        assert wait_gone(pids) == []
        assert not any(netns.exists(ns) for ns in namespaces)


def _cut(d: Deployment, on: bool) -> None:
    op = "-I" if on else "-D"
    netns.sh(netns.exec_prefix(d.link.middle_ns) + ["iptables", "-w", op, "FORWARD", "-j", "DROP"])


def test_prefill_across_the_wan_and_a_cut_link(wan_deployment: Deployment) -> None:
    d = wan_deployment
    with netns.entered(d.link.client_ns):  # the front door lives in the client namespace
        client = openai.OpenAI(base_url=d.frontdoor_url + "/v1", api_key="unused", max_retries=0, timeout=90)
        healthy = lambda: bool(get_json(d.frontdoor_url + "/health", 3)["nodes"]["prfaas-0"]["healthy"])  # noqa: E731
        try:
            over, _, s = stream_tokens(client, "over: " + LONG[:1500], 6, **{"X-Prfaas-Route": "prfaas"})
            here, _, _ = stream_tokens(client, "over: " + LONG[:1500], 6,
                                       **{"X-Prfaas-Route": "local", "X-Prfaas-Reuse": "off"})
            assert s["prefill_node"] == "prfaas-0" and over == here
            prompt = "cut: " + LONG
            out: dict[str, Any] = {}

            def run() -> None:
                with netns.entered(d.link.client_ns):
                    try:
                        out["ids"], _, out["s"] = stream_tokens(client, prompt, 6, **{"X-Prfaas-Route": "prfaas"})
                    except Exception as e:
                        out["error"] = e

            t = threading.Thread(target=run)
            t.start()
            node = d.config.node("prfaas-0").control_url
            wait_for(lambda: get_json(node + "/health", 3)["running"] >= 1 or not t.is_alive(), 30,
                     "the PrfaaS prefill")
            _cut(d, True)
            try:
                t.join(60)
                assert not t.is_alive() and "error" not in out, out.get("error")
                assert out["s"]["reprefilled"] and out["s"]["prefill_node"] == "local-p0", out["s"]
                assert not healthy()
                want, _, _ = stream_tokens(client, prompt, 6, **{"X-Prfaas-Route": "local", "X-Prfaas-Reuse": "off"})
                assert out["ids"] == want
                r = client.completions.create(model="m", prompt="during: " + LONG[:400], max_tokens=3,
                                              extra_headers={"X-Prfaas-Route": "prfaas"})
                assert r.model_extra["prfaas"]["prefill_node"] == "local-p0"  # not routed to the cut node
            finally:
                _cut(d, False)
            wait_for(healthy, 15, "prfaas-0 to be routed to again")
            # forced to PrfaaS (the cut's losses may have raised t): served there, not a fallback
            r = client.completions.create(model="m", prompt="healed: " + LONG[:400], max_tokens=3,
                                          extra_headers={"X-Prfaas-Route": "prfaas"})
            assert r.model_extra["prfaas"]["prefill_node"] == "prfaas-0"
        finally:
            client.close()
