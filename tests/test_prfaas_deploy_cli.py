"""``python -m kvwire.prfaas up`` starts the whole deployment from one config and returns once it serves;
``down`` stops it: every process it started is gone and the state file removed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("uvicorn")
from prfaas_deploy_util import alive, wait_gone, write_config  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _cli(*args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    return subprocess.run([sys.executable, "-m", "kvwire.prfaas", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT)


def test_up_serves_and_down_leaves_nothing(tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "deploy.toml")
    state = tmp_path / "state.json"
    common = ["--config", str(cfg), "--state", str(state)]
    up = _cli("up", *common, "--log-dir", str(tmp_path / "logs"))
    pids: list[int] = []
    try:
        assert up.returncode == 0, up.stderr
        info = json.loads(up.stdout)
        pids = [int(p) for p in info["processes"].values()] + [json.loads(state.read_text())["supervisor"]]
        assert sorted(info["processes"]) == ["frontdoor", "local-d0", "local-p0", "prfaas-0"]
        assert all(alive(p) for p in pids)
        with urllib.request.urlopen(info["frontdoor"] + "/health", timeout=5) as r:
            assert r.status == 200 and json.loads(r.read())["status"] == "ok"
        assert _cli("up", *common).returncode == 1  # already up: refused, nothing started twice
    finally:
        down = _cli("down", *common, "--grace", "10")
    assert down.returncode == 0, down.stderr
    assert wait_gone(pids) == [] and not state.exists()
    assert json.loads(down.stdout)["left"] == []
    assert _cli("down", *common).returncode == 0  # idempotent
