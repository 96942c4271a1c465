"""The vLLM node backend's parts that run without vLLM (kvwire/prfaas/vllm_node.py): backend selection in the
config, the ``[vllm]`` options, the typed error where vLLM is missing, and ``NodeConnector`` reporting each
transfer's end under its kvwire request id over real loopback transfers (the connector contract harness of
tests/test_adapters_vllm.py), and the decode node's map of expected requests over its real control API (signed
requests to the node's app, in-process; ``/expect`` never reaches the engine, so none is started): bounded in
count and expiring. The real vLLM-CPU deployment is scripts/prfaas_vllm_cpu.sh (not a test)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from kvwire.prfaas import config as cfg
from kvwire.prfaas import vllm_node

NODES = [{"name": "p0", "cluster": "prfaas", "role": "prefill", "control_port": 9101, "data_port": 9201},
         {"name": "d0", "cluster": "local", "role": "decode", "control_port": 9102, "data_port": 9202,
          "backend": "transformers"}]


def test_backend_from_model_and_per_node(tmp_path: Path) -> None:
    default = cfg.from_dict({"nodes": NODES[:1]})
    assert default.model.backend == "transformers" and default.backend_of("p0") == "transformers"
    c = cfg.from_dict({"model": {"backend": "vllm"}, "nodes": NODES})
    assert c.backend_of("p0") == "vllm" and c.backend_of("d0") == "transformers"  # the node's key wins
    path = tmp_path / "d.toml"
    path.write_text(cfg.to_toml(c))
    back = cfg.load(path)
    assert back.model.backend == "vllm" and [n.backend for n in back.nodes] == [None, "transformers"]
    with pytest.raises(cfg.ConfigError, match=r"\[model\].backend: 'sglang'"):
        cfg.from_dict({"model": {"backend": "sglang"}, "nodes": NODES})
    with pytest.raises(cfg.ConfigError, match=r"\[\[nodes\]\]\[0\].backend"):
        cfg.from_dict({"nodes": [{**NODES[0], "backend": 3}]})


def test_vllm_options_overlay_and_refuse_unknown_keys() -> None:
    c = cfg.from_dict({"model": {"backend": "vllm"}, "nodes": NODES, "vllm": {"max_model_len": 4096}})
    opts = vllm_node.vllm_options(c)
    assert opts["max_model_len"] == 4096 and opts["connector"] == "kvwire.prfaas.vllm_node:NodeConnector"
    with pytest.raises(ValueError, match="unknown keys \\['max_len'\\]"):
        vllm_node.vllm_options(cfg.from_dict({"nodes": NODES, "vllm": {"max_len": 1}}))


def test_missing_vllm_is_a_typed_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm -> ImportError, installed or not
    c = cfg.from_dict({"model": {"backend": "vllm"}, "nodes": NODES})
    with pytest.raises(vllm_node.VllmUnavailable, match="prfaas_vllm_cpu.sh"):
        vllm_node.VllmNode(c, c.node("p0"), b"k" * 16)


def test_node_process_without_vllm_exits_naming_it(tmp_path: Path) -> None:
    if subprocess.run([sys.executable, "-c", "import vllm"], capture_output=True).returncode == 0:
        pytest.skip("vLLM is installed here")
    path = tmp_path / "d.toml"
    path.write_text(cfg.to_toml(cfg.from_dict({"model": {"backend": "vllm"}, "nodes": NODES})))
    env = {"KVWIRE_KEY": "k" * 32, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "PATH": "/usr/bin:/bin"}
    r = subprocess.run([sys.executable, "-m", "kvwire.prfaas.node", "--config", str(path), "--name", "p0"],
                       capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode != 0 and "VllmUnavailable" in r.stderr and "needs vLLM" in r.stderr


def test_import_loads_no_heavy_module() -> None:
    code = ("import sys, kvwire.prfaas.vllm_node; "
            "print(sorted(m for m in ('torch', 'vllm', 'transformers', 'starlette') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": str(Path(__file__).resolve().parents[1]), "PATH": "/usr/bin:/bin"})
    if "vllm" not in out.stdout:  # where vLLM is installed, the adapter imports its base classes
        assert out.stdout.strip() == "[]"


# -- NodeConnector over the connector contract harness (torch needed) ------------------------------------------
@pytest.fixture
def node_pd(monkeypatch: pytest.MonkeyPatch):
    pytest.importorskip("torch")
    import vllm_contract as vc

    from kvwire.adapters import vllm as adapter

    monkeypatch.setattr(adapter, "KvwireConnector", vllm_node.NodeConnector)  # the harness builds these
    p, d = vc.Instance("kv_producer"), vc.Instance("kv_consumer", timeout=0.5)
    yield vc, p, d
    p.close()
    d.close()


def _settled(key: str, timeout: float = 20.0) -> tuple[str, str]:
    return vllm_node.BOARD.future(key).result(timeout)


def test_node_connector_posts_done_under_the_kvwire_id(node_pd) -> None:
    import test_adapters_vllm as t

    vc, p, d = node_pd
    assert isinstance(p.worker, vllm_node.NodeConnector)
    n = t.N
    preq = vc.Request("p-req-1a2b", n - 1, t.adapter.prefill_params("kvid-ok", d.endpoint))
    dreq = vc.Request("d-req-3c4d", n, t.adapter.decode_params("kvid-ok"))
    assert d.admit(dreq, t.D_IDS) == (n - 1, True)
    d.step({})
    p.admit(preq, t.P_IDS)
    p.step({preq: n - 1}, t.prefill_forward(p, range(0, n - 1), 1))
    p.finish(preq)
    t.run_until(d, lambda r: "d-req-3c4d" in r.finished_recving)
    t.run_until(p, lambda r: "p-req-1a2b" in r.finished_sending)
    assert _settled("kvid-ok") == ("done", "")  # vLLM's request ids (with suffixes) never leak out
    assert not vllm_node.BOARD.future("d-req-3c4d").done() and not vllm_node.BOARD.future("p-req-1a2b").done()
    vllm_node.BOARD.forget("d-req-3c4d")
    vllm_node.BOARD.forget("p-req-1a2b")


def test_node_connector_posts_a_lost_transfer(node_pd) -> None:
    import test_adapters_vllm as t

    vc, _p, d = node_pd
    dreq = vc.Request("d-lost-9f", t.N, t.adapter.decode_params("kvid-lost"))
    d.admit(dreq, t.D_IDS)
    t0 = time.monotonic()
    t.run_until(d, lambda r: "d-lost-9f" in r.finished_recving, timeout=20)
    state, reason = _settled("kvid-lost")
    assert state == "timed_out" and reason and time.monotonic() - t0 < 10


# -- the decode node's expected requests over its control API (no vLLM: /expect never reaches the engine) ----
class _UnusedEngine:
    """The engine of a decode node whose requests are only expected, cancelled or dropped, never generated:
    none of those submits to it (``cancel`` asks it to abort, a no-op for a request it never had)."""

    def __init__(self) -> None:
        self.submitted: list[str] = []

    def submit(self, request_id: str, *_: Any) -> Any:
        self.submitted.append(request_id)
        raise AssertionError("no request is generated in these tests")

    def abort(self, request_id: str) -> None:
        pass

    def close(self) -> None:
        pass


KEY = b"prfaas-vllm-node-key"


def _decode_node(**cache: Any) -> vllm_node.VllmNode:
    c = cfg.from_dict({"model": {"backend": "vllm"}, "cache": cache, "nodes": NODES})
    return vllm_node.VllmNode(c, c.node("d0"), KEY, engine=_UnusedEngine())  # type: ignore[arg-type]


async def _call(node: vllm_node.VllmNode, path: str, body: dict[str, Any]) -> Any:
    """One signed POST to the node's control app, in-process (as NodeClient signs it)."""
    httpx = pytest.importorskip("httpx")
    from kvwire.prfaas.controlauth import AUTH, sign
    from kvwire.prfaas.nodeapp import app

    content = json.dumps(body).encode()
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app(node)), base_url="http://node") as http:
        return await http.post(path, content=content, headers={AUTH: sign(KEY, "POST", path, content),
                                                               "content-type": "application/json"})


def _prompt(n: int) -> list[int]:
    return [(7 * i + 3) % 512 for i in range(n)]


def test_expected_requests_are_bounded_in_count() -> None:
    """Signed /expects past ``[cache] pending_requests`` are 503 naming the bound (as past ``pending_bytes`` on
    the runner's node), and nothing of them is held; a cancel makes room. Before: 2000 expects of a 4096-token
    prompt were all 200, all held (peak RSS +190 MiB), for ever. Negative control: up to the bound, all 200."""
    pytest.importorskip("starlette")
    node = _decode_node(pending_requests=3, expect_timeout_s=60)

    async def run() -> None:
        for i in range(3):
            r = await _call(node, "/expect", {"request_id": f"r{i}", "prompt": _prompt(4096)})
            assert r.status_code == 200, r.text
        for i in range(3, 6):
            r = await _call(node, "/expect", {"request_id": f"r{i}", "prompt": _prompt(4096)})
            assert r.status_code == 503 and "pending_requests" in r.json()["error"], r.text
        assert sorted(node._expected) == ["r0", "r1", "r2"] and node.health()["running"] == 3
        assert (await _call(node, "/cancel", {"request_id": "r1"})).status_code == 200
        assert (await _call(node, "/expect", {"request_id": "r3", "prompt": _prompt(2)})).status_code == 200
        r = await _call(node, "/expect", {"request_id": "r2", "prompt": _prompt(2)})
        assert r.status_code == 409  # a duplicate is still a 409, not a 503
        assert sorted(node._expected) == ["r0", "r2", "r3"]
    try:
        asyncio.run(run())
    finally:
        node.close()
    assert node.engine.submitted == []  # type: ignore[attr-defined]


def test_expected_requests_expire_and_free_their_place() -> None:
    """An expected request whose /generate never comes (a router that crashed after /expect) is dropped
    ``[cache] expect_timeout_s`` after its /expect: the node holds nothing, drains at once and takes new
    requests again; a late /generate gets a ``timed_out`` line, not the cache. Before: held for ever (drain
    504). Negative control: one expected just now is still there, and the bound still holds before expiry."""
    pytest.importorskip("starlette")
    node = _decode_node(pending_requests=2, expect_timeout_s=0.6)

    async def run() -> None:
        loop = asyncio.get_running_loop()
        for i in range(2):
            assert (await _call(node, "/expect", {"request_id": f"r{i}", "prompt": _prompt(64)})).status_code == 200
        assert (await _call(node, "/expect", {"request_id": "r2", "prompt": _prompt(64)})).status_code == 503
        await asyncio.sleep(0.3)
        assert node.is_expected("r0") and node._held() == 2  # not yet
        t0 = loop.time()
        while node._held():
            assert loop.time() - t0 < 5, node._expected
            await asyncio.sleep(0.02)
        assert loop.time() - t0 < 1.0  # at its timeout, not later
        assert node.health()["running"] == 0
        await node.drain(1.0)  # idle: nothing held
        node.resume()
        r = await _call(node, "/generate", {"request_id": "r0", "max_tokens": 2})
        assert r.status_code == 200, r.text
        line = json.loads(r.text.splitlines()[0])
        assert line["state"] == "timed_out" and "no /generate within 0.6 s" in line["error"], line
        r = await _call(node, "/generate", {"request_id": "r0", "max_tokens": 2})
        assert r.status_code == 404  # said once
        for i in range(2):  # room again
            assert (await _call(node, "/expect", {"request_id": f"n{i}", "prompt": _prompt(64)})).status_code == 200
        assert (await _call(node, "/expect", {"request_id": "r1", "prompt": _prompt(64)})).status_code == 503
    try:
        asyncio.run(run())
    finally:
        node.close()


def test_pending_requests_and_expect_timeout_in_the_config(tmp_path: Path) -> None:
    c = cfg.from_dict({"nodes": NODES})
    assert (c.cache.pending_requests, c.cache.expect_timeout_s) == (cfg.PENDING_REQUESTS, cfg.EXPECT_TIMEOUT_S)
    assert "pending_requests" not in cfg.to_toml(c)  # defaults unwritten: model_dir's digest is unchanged
    c = cfg.from_dict({"nodes": NODES, "cache": {"pending_requests": 5, "expect_timeout_s": 2}})
    path = tmp_path / "d.toml"
    path.write_text(cfg.to_toml(c))
    back = cfg.load(path)
    assert (back.cache.pending_requests, back.cache.expect_timeout_s) == (5, 2.0)
    for bad in ({"pending_requests": 0}, {"expect_timeout_s": 0}, {"expect_timeout_s": float("nan")},
                {"expect_timeout_s": "60"}, {"pending_requests": 1.5}):
        with pytest.raises(cfg.ConfigError, match=next(iter(bad))):
            cfg.from_dict({"nodes": NODES, "cache": bad})
