"""Faults in the running PrfaaS deployment: the PrfaaS node killed mid-prefill, or cut off (frozen: its sockets
stay open and silent, as behind a cut link). The request is re-prefilled locally and completes with exactly
the tokens a local prefill gives (nothing was streamed before the decode node had a cache); the router stops
routing to the node until its /health answers again.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

pytest.importorskip("openai")
pytest.importorskip("transformers")
import openai  # noqa: E402
from prfaas_deploy_util import get_json, metric, metrics, stream_tokens, wait_for, wait_gone, write_config  # noqa: E402

from kvwire.prfaas.launcher import Deployment  # noqa: E402

LONG = " ".join(f"word{i % 97}" for i in range(500))[:3000]  # ~3000 tokens: a prefill long enough to hit


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Deployment, Any]]:
    tmp = tmp_path_factory.mktemp("prfaas-faults")
    d = Deployment(write_config(tmp / "deploy.toml", node_timeout_s=1.0), log_dir=tmp / "logs")
    d.start(timeout=120)
    pids = list(d.pids().values())
    client = openai.OpenAI(base_url=d.frontdoor_url + "/v1", api_key="unused", max_retries=0, timeout=90)
    try:
        yield d, client
    finally:
        client.close()
        d.stop()
        assert wait_gone(pids + list(d.pids().values())) == []


def _prfaas_busy(d: Deployment) -> bool:
    try:
        return int(get_json(d.config.node("prfaas-0").control_url + "/health")["running"]) >= 1
    except OSError:
        return False


def _healthy(d: Deployment, node: str) -> bool:
    return bool(get_json(d.frontdoor_url + "/health")["nodes"][node]["healthy"])


def _fault_mid_prefill(d: Deployment, client: Any, fault: Callable[[], None], prompt: str) -> dict[str, Any]:
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            out["ids"], _, out["summary"] = stream_tokens(client, prompt, 6, **{"X-Prfaas-Route": "prfaas",
                                                                              "X-Prfaas-Reuse": "off"})
        except Exception as e:  # reported by the assertions below
            out["error"] = e

    t = threading.Thread(target=run)
    t0 = time.monotonic()
    t.start()
    wait_for(lambda: _prfaas_busy(d) or not t.is_alive(), 30, "the PrfaaS prefill to start")
    fault()
    t.join(60)
    out["seconds"] = time.monotonic() - t0
    assert not t.is_alive(), "the request hung"
    assert "error" not in out, out.get("error")
    return out


def test_prfaas_node_killed_mid_request(deployment: tuple[Deployment, Any]) -> None:
    d, client = deployment
    prompt = "kill: " + LONG
    before = metrics(d.frontdoor_url)
    out = _fault_mid_prefill(d, client, lambda: d.kill("prfaas-0"), prompt)
    s = out["summary"]
    assert s["reprefilled"] and s["route"] == "local" and s["prefill_node"] == "local-p0", s
    want, _, _ = stream_tokens(client, prompt, 6, **{"X-Prfaas-Route": "local", "X-Prfaas-Reuse": "off"})
    assert out["ids"] == want and len(want) == 6  # every token once, the same as a local prefill
    m = metrics(d.frontdoor_url)
    assert metric(m, "prfaas_reprefills_total", why="node") + metric(m, "prfaas_reprefills_total", why="node-down") \
        - metric(before, "prfaas_reprefills_total", why="node") >= 1
    wait_for(lambda: not _healthy(d, "prfaas-0"), 5, "the router to mark prfaas-0 unhealthy")
    assert metric(metrics(d.frontdoor_url), "prfaas_node_healthy", node="prfaas-0") == 0
    r = client.completions.create(model="m", prompt="after: " + LONG[:400], max_tokens=3)  # long: t* is 256
    assert r.model_extra["prfaas"]["route"] == "local"
    assert metric(metrics(d.frontdoor_url), "prfaas_routing_decisions_total", target="local", why="fallback") >= 1
    d.restart("prfaas-0")
    wait_for(lambda: _healthy(d, "prfaas-0"), 10, "prfaas-0 to be routed to again")
    r = client.completions.create(model="m", prompt="back: " + LONG[:400], max_tokens=3)
    assert r.model_extra["prfaas"]["route"] == "prfaas"


def test_prfaas_node_cut_off_mid_request(deployment: tuple[Deployment, Any]) -> None:
    """SIGSTOP: the node's connections stay open but nothing answers (a cut link, as far as TCP can tell)."""
    d, client = deployment
    prompt = "cut: " + LONG
    out = _fault_mid_prefill(d, client, lambda: d.kill("prfaas-0", signal.SIGSTOP), prompt)
    try:
        s = out["summary"]
        assert s["reprefilled"] and s["prefill_node"] == "local-p0", s
        assert out["seconds"] < 30  # the health poll (1 s timeout) took the node out; no wait for the prefill timeout
        assert not _healthy(d, "prfaas-0")
        want, _, _ = stream_tokens(client, prompt, 6, **{"X-Prfaas-Route": "local", "X-Prfaas-Reuse": "off"})
        assert out["ids"] == want
        r = client.completions.create(model="m", prompt="during: " + LONG[:400], max_tokens=3)
        assert r.model_extra["prfaas"]["route"] == "local"
    finally:
        d.kill("prfaas-0", signal.SIGCONT)
    wait_for(lambda: _healthy(d, "prfaas-0"), 10, "prfaas-0 to be routed to again")
    r = client.completions.create(model="m", prompt="healed: " + LONG[:400], max_tokens=3)
    assert r.model_extra["prfaas"]["route"] == "prfaas"
