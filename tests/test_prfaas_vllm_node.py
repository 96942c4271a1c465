"""The vLLM node backend's parts that run without vLLM (kvwire/prfaas/vllm_node.py): backend selection in the
config, the ``[vllm]`` options, the typed error where vLLM is missing, and ``NodeConnector`` reporting each
transfer's end under its kvwire request id over real loopback transfers (the connector contract harness of
tests/test_adapters_vllm.py). The real vLLM-CPU deployment is scripts/prfaas_vllm_cpu.sh (not a test)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

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
