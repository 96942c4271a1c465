"""``python -m kvwire.prfaas up|down|status --config deploy.toml [--wan rate=200mbit,rtt=20ms]``.

Owns: the command line over ``launcher.Deployment``. ``up`` starts a supervisor process (detached) that
runs the deployment and writes the state file (pids, namespaces, the front door's URL) once every
``/health`` answers; it returns then (exit 0) or with the failure (exit 1). The config (and ``--wan``) is read and
validated first, in the foreground: a missing or invalid one is said there (exit 1), not in the supervisor's
log; so is a port of the deployment already in use (without ``--wan``), before any process starts. ``down``
asks the supervisor to stop (SIGTERM), then SIGKILLs whatever the state file names that is still alive after
the bound and deletes its namespaces. ``status`` prints the state and the front door's ``/health``.
Must not know: routing, nodes' protocol.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from ..termination import pid_alive
from . import config as deploy_config
from .launcher import ROOT, Deployment, LaunchError, WanSpec, taken_ports
from .settings import FrontSettings

DESCRIPTION = ("Start, stop or inspect a PrfaaS deployment (every node and the router's front door)\n"
               "described by one TOML config.")
EXAMPLES = """example:
  python -m kvwire.prfaas up --config kvwire/prfaas/deploy-default.toml [--wan rate=200mbit,rtt=20ms]
  python -m kvwire.prfaas status --config kvwire/prfaas/deploy-default.toml
  python -m kvwire.prfaas down --config kvwire/prfaas/deploy-default.toml"""
COMMANDS = {  # the help of each subcommand (supervise is what up runs, detached: not listed)
    "up": "start every node and the front door (detached); return once every /health answers",
    "down": "stop the deployment: SIGTERM, SIGKILL after --grace; remove its namespaces",
    "status": "print the state file (pids, namespaces, the front door's URL)",
}


def default_state(config: str) -> Path:
    digest = hashlib.sha1(os.path.abspath(config).encode()).hexdigest()[:10]
    return Path(tempfile.gettempdir()) / f"kvwire-prfaas-{digest}.json"



def _write(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(path)


def supervise(a: argparse.Namespace) -> int:
    state = Path(a.state)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    d = Deployment(a.config, wan=WanSpec.parse(a.wan) if a.wan else None, log_dir=a.log_dir or None)
    base = {"supervisor": os.getpid(), "config": os.path.abspath(a.config), "log_dir": str(d.log_dir)}
    try:
        d.start(a.timeout)
    except (LaunchError, OSError, ValueError) as e:
        _write(state, dict(base, ready=False, error=str(e)))
        return 1
    _write(state, dict(base, ready=True, **d.state()))
    try:
        while not stop.wait(0.5):
            for p in d.procs:
                if p.popen.poll() is not None:
                    print(f"{p.name} exited with {p.popen.returncode}", file=sys.stderr, flush=True)
    finally:
        d.stop()
        with contextlib.suppress(OSError):
            state.unlink()
    return 0


def check_config(path: str, wan: str = "") -> str | None:
    """Why ``path`` (and ``wan``) cannot start a deployment (unreadable, not TOML, invalid ``[router]``...), or
    None: what the supervisor would otherwise find only after it was spawned."""
    try:
        cfg = deploy_config.load(path)
        FrontSettings.from_table(cfg.router)
        if wan:
            WanSpec.parse(wan)
    except ValueError as e:  # ConfigError included
        return str(e)
    return None


def up(a: argparse.Namespace) -> int:
    why = check_config(a.config, a.wan)
    if why is not None:
        print(f"up failed: {why}", file=sys.stderr)
        return 1
    state = Path(a.state)
    if state.exists():
        old = json.loads(state.read_text())
        if pid_alive(int(old.get("supervisor", 0))):
            print(f"already up (supervisor {old['supervisor']}); run down first", file=sys.stderr)
            return 1
        state.unlink()
    taken = [] if a.wan else taken_ports(deploy_config.load(a.config))  # --wan: all in the link's new namespaces
    if taken:
        print(f"up failed: port in use, nothing started: {'; '.join(taken)}", file=sys.stderr)
        return 1
    cmd = [sys.executable, "-m", "kvwire.prfaas", "supervise", "--config", a.config, "--state", str(state),
           "--timeout", str(a.timeout)]
    if a.wan:
        cmd += ["--wan", a.wan]
    if a.log_dir:
        cmd += ["--log-dir", a.log_dir]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    log = open(state.with_suffix(".log"), "ab")
    p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
                         start_new_session=True)
    log.close()
    end = time.monotonic() + a.timeout + 30
    while time.monotonic() < end:
        if state.exists():
            s = json.loads(state.read_text())
            if not s.get("ready"):
                print(f"up failed: {s.get('error')}", file=sys.stderr)
                p.wait(30)
                state.unlink(missing_ok=True)
                return 1
            print(json.dumps({"frontdoor": s["frontdoor"], "state": str(state), "processes": s["processes"],
                              "namespaces": s["namespaces"]}))
            return 0
        if p.poll() is not None:
            print(f"the supervisor exited with {p.returncode}; see {state.with_suffix('.log')}", file=sys.stderr)
            return 1
        time.sleep(0.2)
    os.killpg(p.pid, signal.SIGTERM)
    print("up timed out", file=sys.stderr)
    return 1


def down(a: argparse.Namespace) -> int:
    state = Path(a.state)
    if not state.exists():
        print("not up (no state file)", file=sys.stderr)
        return 0
    s = json.loads(state.read_text())
    sup = int(s.get("supervisor", 0))
    pids = [int(x) for x in s.get("processes", {}).values()]
    if sup and pid_alive(sup):
        os.kill(sup, signal.SIGTERM)
    end = time.monotonic() + a.grace
    while time.monotonic() < end and any(pid_alive(x) for x in [sup, *pids] if x):
        time.sleep(0.1)
    killed = []
    for pid in [sup, *pids, s.get("emulator_pid") or 0]:
        if pid and pid_alive(int(pid)):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(int(pid), signal.SIGKILL) if pid in pids else os.kill(int(pid), signal.SIGKILL)
            killed.append(pid)
    from ..testing import netns

    for ns in s.get("namespaces", []):
        netns.delete(ns)
    state.unlink(missing_ok=True)
    left = [x for x in [sup, *pids] if x and pid_alive(x)]
    print(json.dumps({"stopped": s.get("processes", {}), "killed_after_grace": killed, "left": left}))
    return 1 if left else 0


def status(a: argparse.Namespace) -> int:
    state = Path(a.state)
    if not state.exists():
        why = check_config(a.config)  # a mistyped path is not "not up"
        if why is not None:
            print(why, file=sys.stderr)
            return 1
        print("not up")
        return 1
    s = json.loads(state.read_text())
    if not pid_alive(int(s.get("supervisor", 0))):  # (killed without down: the file outlived the deployment)
        print(json.dumps(dict(s, ready=False, stale=True), indent=1))
        print(f"not up: the state file {state} is stale (supervisor {s.get('supervisor')} is gone); "
              "run down to clean up", file=sys.stderr)
        return 1
    print(json.dumps(s, indent=1))
    return 0 if s.get("ready") else 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kvwire.prfaas", description=DESCRIPTION, epilog=EXAMPLES,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True, title="commands", metavar="{" + ",".join(COMMANDS) + "}")
    for name in ("up", "down", "status", "supervise"):
        what = COMMANDS.get(name)
        p = sub.add_parser(name) if what is None else \
            sub.add_parser(name, help=what, description=what[0].upper() + what[1:])
        p.add_argument("--config", required=True, help="the deployment's TOML config")
        p.add_argument("--state", default=None, help="state file (default: one per config in the temp dir)")
        if name in ("up", "supervise"):
            p.add_argument("--wan", default="", help="rate=..,rtt=..[,loss=..]: put the PrfaaS nodes behind an "
                                                     "emulated link (root)")
            p.add_argument("--timeout", type=float, default=180.0, help="seconds to wait for every /health")
            p.add_argument("--log-dir", default="", help="process logs (default: a new temp dir)")
        if name == "down":
            p.add_argument("--grace", type=float, default=15.0, help="seconds before SIGKILL")
    a = ap.parse_args(argv)
    a.state = a.state or str(default_state(a.config))
    return {"up": up, "down": down, "status": status, "supervise": supervise}[a.cmd](a)


if __name__ == "__main__":
    raise SystemExit(main())
