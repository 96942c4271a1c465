"""The running PrfaaS deployment (node processes + front door, loopback) through the official ``openai`` client.

One deployment per module (the shipped default config on free ports: a PrfaaS prefill node, a local prefill
and a local decode node, the router); its finalizer stops it and checks every process is gone.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("openai")
pytest.importorskip("transformers")
import openai  # noqa: E402
from prfaas_deploy_util import metric, metrics, stream_tokens, wait_gone, write_config  # noqa: E402

from kvwire.prfaas import config as deploy_config  # noqa: E402
from kvwire.prfaas.controlauth import AUTH, sign  # noqa: E402
from kvwire.prfaas.launcher import Deployment  # noqa: E402

WORDS = ("kv cache prefill decode hybrid linear attention state layer token route wire lane link egress "
         "threshold datacenter transfer checkpoint block").split()


def prompts(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        k = int(rng.integers(4, 30))
        out.append(f"{i}: " + " ".join(rng.choice(WORDS, k)))
    return out


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Deployment, Any]]:
    tmp = tmp_path_factory.mktemp("prfaas-deploy")
    d = Deployment(write_config(tmp / "deploy.toml"), log_dir=tmp / "logs")
    d.start(timeout=120)
    pids = list(d.pids().values())
    client = openai.OpenAI(base_url=d.frontdoor_url + "/v1", api_key="unused", max_retries=0, timeout=60)
    try:
        yield d, client
    finally:
        client.close()
        d.stop()
        assert wait_gone(pids) == [], "processes left after stop"


def _post(url: str, body: dict[str, Any], key: str | None = None) -> tuple[int, Any]:
    """POST ``body`` as JSON; signed with ``key`` (the deployment's, for ``/admin/convert``) when given."""
    data = json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers[AUTH] = sign(key.encode(), "POST", urllib.parse.urlsplit(url).path, data)
    req = urllib.request.Request(url, data, headers)
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _get(url: str) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_100_prompts_same_tokens_prefilled_locally_or_on_prfaas(deployment: tuple[Deployment, Any]) -> None:
    d, client = deployment
    texts = prompts(100)

    def both(text: str) -> tuple[list[int], list[int], str, str]:
        a, _, sa = stream_tokens(client, text, 5, **{"X-Prfaas-Route": "local", "X-Prfaas-Reuse": "off"})
        b, _, sb = stream_tokens(client, text, 5, **{"X-Prfaas-Route": "prfaas", "X-Prfaas-Reuse": "off"})
        return a, b, sa["prefill_node"], sb["prefill_node"]

    with ThreadPoolExecutor(3) as pool:
        results = list(pool.map(both, texts))
    assert all(len(a) == 5 for a, _, _, _ in results)
    assert {(pa, pb) for _, _, pa, pb in results} == {("local-p0", "prfaas-0")}  # each path really ran
    same = [a == b for a, b, _, _ in results]
    assert all(same), f"{same.count(False)} of 100 differ"
    # negative controls: the outputs depend on the prompt (not a constant), and one changed byte changes them
    assert len({tuple(a) for a, _, _, _ in results}) >= 30  # (prompts ending alike often continue alike)
    changed = [stream_tokens(client, t[:-1] + "#", 5, **{"X-Prfaas-Reuse": "off"})[0] for t in texts[:10]]
    assert sum(c != r[0] for c, r in zip(changed, results[:10])) >= 8
    # and what was served is what one process's greedy run of the same seeded model gives
    from kvwire.prfaas.runner import TransformersRunner

    cfg = deploy_config.load(d.config_path)
    ref = TransformersRunner(cfg.model, cfg.cache.block_size)
    for text, (a, _, _, _) in list(zip(texts, results))[:3]:
        assert ref.reference(list(text.encode()), 5) == a


def test_a_prefix_cached_in_the_other_cluster_is_moved_and_still_matches(
        deployment: tuple[Deployment, Any]) -> None:
    d, client = deployment
    base = "shared system prompt: " + " ".join(prompts(8, seed=3))
    question = base + " / and now the question?"
    before = metrics(d.frontdoor_url)
    a, _, sa = stream_tokens(client, base, 4, **{"X-Prfaas-Route": "local"})  # leaves a checkpoint on local-p0
    assert sa["moved_prefix"] == 0
    b, _, sb = stream_tokens(client, question, 8, **{"X-Prfaas-Route": "prfaas"})
    after = metrics(d.frontdoor_url)
    block = deploy_config.load(d.config_path).cache.block_size
    assert sb["prefill_node"] == "prfaas-0" and sb["moved_prefix"] >= block and sb["moved_prefix"] % block == 0
    assert sb["moved_prefix"] <= len(base.encode())
    moves = metric(after, "prfaas_prefix_moves_total", src="local", dst="prfaas") - \
        metric(before, "prfaas_prefix_moves_total", src="local", dst="prfaas")
    assert moves == 1
    assert metric(after, "prfaas_reused_tokens_total") - metric(before, "prfaas_reused_tokens_total") >= block
    fresh, _, _ = stream_tokens(client, question, 8, **{"X-Prfaas-Route": "local", "X-Prfaas-Reuse": "off"})
    assert b == fresh  # the moved prefix + the rest computed on PrfaaS = the whole prompt computed locally
    # negative control: a prompt nobody cached moves nothing
    stream_tokens(client, "nothing cached here: " + " ".join(prompts(6, seed=9)), 4, **{"X-Prfaas-Route": "prfaas"})
    assert metric(metrics(d.frontdoor_url), "prfaas_prefix_moves_total", src="local", dst="prfaas") == \
        metric(after, "prfaas_prefix_moves_total", src="local", dst="prfaas")


def test_threshold_routing_non_streaming_and_metrics(deployment: tuple[Deployment, Any]) -> None:
    d, client = deployment
    short = client.completions.create(model="m", prompt="short one", max_tokens=5)
    long_ = client.completions.create(model="m", prompt="x" * 300 + " long", max_tokens=5,
                                      extra_headers={"X-Prfaas-Reuse": "off"})
    timeline = _get(d.frontdoor_url + "/admin/timeline")[1]
    assert short.model_extra["prfaas"]["route"] == "local", timeline
    assert long_.model_extra["prfaas"]["route"] == "prfaas", (long_.model_extra, timeline)
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 5
    assert short.usage.prompt_tokens == len(b"short one")
    ids = short.choices[0].model_extra["token_ids"]
    tok = client.completions.create(model="m", prompt=list(b"short one"), max_tokens=5)  # token ids in
    assert tok.choices[0].model_extra["token_ids"] == ids
    m = metrics(d.frontdoor_url)
    assert metric(m, "prfaas_threshold_tokens") == 256
    assert metric(m, "prfaas_routing_decisions_total", target="local", why="threshold") >= 1
    assert metric(m, "prfaas_routing_decisions_total", target="prfaas", why="threshold") >= 1
    assert metric(m, "prfaas_transfers_total", state="done") >= 3
    assert metric(m, "prfaas_ttft_seconds_count", route="prfaas") >= 1
    assert metric(m, "prfaas_tpot_seconds_count", route="local") >= 1
    assert metric(m, "prfaas_node_healthy", node="prfaas-0") == 1
    assert ("prfaas_egress_utilization", (("node", "prfaas-0"),)) in m
    status, health = _get(d.frontdoor_url + "/health")
    assert status == 200 and health["status"] == "ok" and health["nodes"]["local-d0"]["role"] == "decode"


def test_bad_requests_get_clear_errors(deployment: tuple[Deployment, Any]) -> None:
    _, client = deployment
    with pytest.raises(openai.BadRequestError, match="token 1"):
        client.completions.create(model="m", prompt=[1, 512, 3], max_tokens=2)  # vocab is 512
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model="m", prompt="hi there", max_tokens=0)
    with pytest.raises(openai.BadRequestError, match="route"):
        client.completions.create(model="m", prompt="hi there", max_tokens=2, extra_headers={"X-Prfaas-Route": "x"})
    with pytest.raises(openai.BadRequestError, match="n = 1"):
        client.completions.create(model="m", prompt="hi there", max_tokens=2, n=2)


def test_converting_a_local_node_is_real_and_visible(deployment: tuple[Deployment, Any]) -> None:
    d, client = deployment
    url, key = d.frontdoor_url, d.env["KVWIRE_KEY"]  # the key the launcher gave every process
    assert _post(url + "/admin/convert", {"node": "local-p0", "role": "decode"})[0] == 401  # unsigned: refused
    assert _post(url + "/admin/convert", {"node": "prfaas-0", "role": "decode"}, key)[0] == 400
    assert _post(url + "/admin/convert", {"node": "local-d0", "role": "prefill"}, key)[0] == 409  # the last decode
    status, out = _post(url + "/admin/convert", {"node": "local-p0", "role": "decode"}, key)
    assert status == 200 and out["changed"] and out["role"] == "decode"
    try:
        _, health = _get(url + "/health")
        assert health["nodes"]["local-p0"]["role"] == "decode" and health["nodes"]["local-p0"]["state"] == "ready"
        m = metrics(url)
        assert metric(m, "prfaas_node_role", node="local-p0", role="decode") == 1
        assert metric(m, "prfaas_role_conversions_total", node="local-p0", role="decode") == 1
        # no local prefill node now: a short prompt falls back to PrfaaS, may decode on the converted node
        r = client.completions.create(model="m", prompt="short again", max_tokens=4)
        assert r.model_extra["prfaas"]["route"] == "prfaas" and len(r.choices[0].model_extra["token_ids"]) == 4
        assert metric(metrics(url), "prfaas_routing_decisions_total", target="prfaas", why="fallback") >= 1
    finally:
        status, out = _post(url + "/admin/convert", {"node": "local-p0", "role": "prefill"}, key)
    assert status == 200 and out["role"] == "prefill"
    r = client.completions.create(model="m", prompt="short again", max_tokens=4)
    assert r.model_extra["prfaas"]["route"] == "local"


def test_the_deployment_stops_cleanly_after_a_failure_inside(tmp_path: Path) -> None:
    d = Deployment(write_config(tmp_path / "deploy.toml"), log_dir=tmp_path / "logs")
    pids: list[int] = []
    with pytest.raises(RuntimeError, match="test failed"):
        with d:
            pids = list(d.pids().values())
            assert len(pids) == 4
            raise RuntimeError("test failed")
    assert wait_gone(pids) == []
    # each process shut itself down on SIGTERM (front door and nodes exit 0; none had to be killed)
    assert len(d.exit_codes) == 4 and set(d.exit_codes.values()) == {0}, d.exit_codes


def test_stop_strings_end_the_completion_and_are_not_shown(deployment: tuple[Deployment, Any]) -> None:
    _, client = deployment
    found = None
    for text in prompts(30, seed=11):  # the seeded model is deterministic: find an ASCII token after the first
        ids = client.completions.create(model="m", prompt=text, max_tokens=12).choices[0].model_extra["token_ids"]
        k = next((i for i, t in enumerate(ids) if i >= 1 and 33 <= t < 127), None)
        if k is not None:
            found = (text, ids, k)
            break
    assert found is not None
    text, ids, k = found
    stop = chr(ids[k])
    cut = ids[:ids.index(ids[k])]
    r = client.completions.create(model="m", prompt=text, max_tokens=12, stop=[stop, "never-there"])
    assert r.choices[0].model_extra["token_ids"] == cut and r.choices[0].finish_reason == "stop"
    assert stop not in r.choices[0].text
    stream = client.completions.create(model="m", prompt=text, max_tokens=12, stop=stop, stream=True)
    chunks = list(stream)
    got = [t for c in chunks for t in (c.choices[0].model_extra or {}).get("token_ids") or []]
    assert got == cut and chunks[-1].choices[0].finish_reason == "stop"
