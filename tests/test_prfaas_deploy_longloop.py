"""The long loop for real: it re-plans on what the running deployment measured (prefill times, cache sizes,
decode steps) and converts a local node toward the planned split, visibly in /metrics and /health."""

from __future__ import annotations

import concurrent.futures
import json
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("openai")
pytest.importorskip("transformers")
import openai  # noqa: E402
from prfaas_deploy_util import metric, metrics, wait_gone, write_config  # noqa: E402

from kvwire.prfaas.launcher import Deployment  # noqa: E402


@pytest.fixture
def decode_bound(tmp_path: Path) -> Iterator[tuple[Deployment, Any]]:
    # one sequence per decode node and 64 output tokens each: decode (~0.5 s a request) is the bottleneck,
    # prefill (~0.1 s) is not, so the plan wants both local nodes decoding and the PrfaaS node prefilling
    cfg = write_config(tmp_path / "deploy.toml", replan_s=1.5, decode_batch=1, decode_l_out=64,
                       loop={"t_min": 0, "t_max": 4096, "replan_min_samples": 8})
    d = Deployment(cfg, log_dir=tmp_path / "logs")
    d.start(timeout=120)
    pids = list(d.pids().values())
    client = openai.OpenAI(base_url=d.frontdoor_url + "/v1", api_key="unused", max_retries=0, timeout=60)
    try:
        yield d, client
    finally:
        client.close()
        d.stop()
        assert wait_gone(pids) == []


def _health(url: str) -> Any:
    with urllib.request.urlopen(url + "/health", timeout=5) as r:
        return json.loads(r.read())


def test_the_long_loop_converts_a_local_prefill_node_when_decode_binds(decode_bound: tuple[Deployment, Any]) -> None:
    d, client = decode_bound
    assert _health(d.frontdoor_url)["nodes"]["local-p0"]["role"] == "prefill"
    for i in range(12):  # lengths on both sides of t* = 256, both clusters prefill
        prompt = f"{i} " + "measure the deployment " * (2 + 3 * i)
        r = client.completions.create(model="m", prompt=prompt, max_tokens=8)
        assert len(r.choices[0].model_extra["token_ids"]) == 8
    end = time.monotonic() + 20
    while time.monotonic() < end and _health(d.frontdoor_url)["nodes"]["local-p0"]["role"] != "decode":
        time.sleep(0.2)
    h = _health(d.frontdoor_url)
    assert h["plan"] is not None and h["plan"]["n_d"] == 2 and h["plan"]["bottleneck"] == "pd-d", h["plan"]
    assert h["nodes"]["local-p0"]["role"] == "decode" and h["nodes"]["local-p0"]["state"] == "ready"
    m = metrics(d.frontdoor_url)
    assert metric(m, "prfaas_role_conversions_total", node="local-p0", role="decode") == 1
    assert metric(m, "prfaas_planned_instances", role="decode") == 2
    assert metric(m, "prfaas_node_role", node="local-p0", role="decode") == 1
    # served on the new split: prefill on PrfaaS, decode on either local node. The requests go at once: the
    # fleet picks the least-loaded decoder (ties by name), so one after another they may all find local-d0
    # idle again (seen once under a loaded CI run), while at once the converted node must take a share
    def one(i: int) -> Any:
        return client.completions.create(model="m", prompt=f"after {i} " + "x" * 40, max_tokens=4)

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        rs = list(pool.map(one, range(4)))
    assert all(r.model_extra["prfaas"]["route"] == "prfaas" for r in rs)
    decoders = {r.model_extra["prfaas"]["decode_node"] for r in rs}
    assert "local-p0" in decoders
