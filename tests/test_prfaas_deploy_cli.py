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


def test_up_and_status_say_the_config_is_unusable_in_the_foreground(tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    from kvwire.prfaas.__main__ import main

    state = tmp_path / "state.json"
    bad = tmp_path / "bad.toml"
    bad.write_text("[model\n")
    for cfg, why in ((tmp_path / "missing.toml", "cannot read config"), (bad, "not valid TOML")):
        assert main(["up", "--config", str(cfg), "--state", str(state), "--timeout", "5"]) == 1
        err = capsys.readouterr().err
        assert why in err and str(cfg) in err, err
        assert not state.exists() and not state.with_suffix(".log").exists()  # no supervisor was started
        assert main(["status", "--config", str(cfg), "--state", str(state)]) == 1
        out = capsys.readouterr()
        assert why in out.err and "not up" not in out.out, out
    # negative control: a readable config with nothing running is "not up"
    assert main(["status", "--config", str(write_config(tmp_path / "deploy.toml")), "--state", str(state)]) == 1
    assert capsys.readouterr().out.strip() == "not up"


def test_help_is_plain_text_and_lists_the_commands(capsys: pytest.CaptureFixture[str]) -> None:
    from kvwire.prfaas.__main__ import main

    with pytest.raises(SystemExit) as e:
        main(["--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and "``" not in out and "supervise" not in out, out
    for name in ("up", "down", "status"):
        assert any(line.split()[:1] == [name] and len(line.split()) > 1 for line in out.splitlines()), (name, out)


def test_status_calls_a_state_file_whose_supervisor_is_gone_stale(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """A deployment killed without ``down`` (kill -9 of the supervisor and its processes) left its state file,
    and ``status`` printed it unchanged: ``"ready": true``, rc 0. Negative control: a live supervisor's state
    (this test process stands in for it) is printed as it is, rc 0."""
    from kvwire.prfaas.__main__ import main

    cfg = str(write_config(tmp_path / "deploy.toml"))
    state = tmp_path / "state.json"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    gone = int(dead.stdout)
    state.write_text(json.dumps({"supervisor": gone, "ready": True, "frontdoor": "http://127.0.0.1:1"}))
    assert main(["status", "--config", cfg, "--state", str(state)]) == 1
    out = capsys.readouterr()
    assert "stale" in out.err and json.loads(out.out)["ready"] is False, out
    state.write_text(json.dumps({"supervisor": os.getpid(), "ready": True, "frontdoor": "http://127.0.0.1:1"}))
    assert main(["status", "--config", cfg, "--state", str(state)]) == 0
    assert json.loads(capsys.readouterr().out)["ready"] is True
