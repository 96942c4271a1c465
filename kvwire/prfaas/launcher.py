"""Start and stop a whole PrfaaS deployment from its config: node processes, the front door, optionally a WAN.

Owns: ``Deployment`` (checks that every port it will listen on can be bound, then spawns one
``python -m kvwire.prfaas.node`` per ``[[nodes]]`` entry and the front door, each in its own session with its
log file; waits for every ``/health``; stops them SIGTERM-then-SIGKILL
within a bound; with ``wan``, first builds an emulated link (``kvwire.testing.WanLink``) and runs the
PrfaaS nodes in its server namespace and everything else in its client namespace, the config's hosts
rewritten to the link's addresses), and the state file ``up``/``down`` share (pids, namespaces, URLs).
Must not know: routing, the node protocol beyond ``GET /health``, the model.
"""

from __future__ import annotations

import dataclasses
import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from ..tcp import listen
from . import config as deploy_config
from .config import DeployConfig

ROOT = str(Path(__file__).resolve().parents[2])


class LaunchError(RuntimeError):
    """A process of the deployment did not start or become healthy (the message names it and its log)."""


@dataclass(frozen=True)
class WanSpec:
    """``rate=200mbit,rtt=20ms,loss=0,queue=4bdp`` → the emulated link between the clusters (``queue``: the
    bottleneck's drop-tail buffer, in bandwidth-delay products; a WAN router's buffer is deep, and one BDP
    drops a single cache's burst)."""

    rate_mbit: float = 200.0
    rtt_ms: float = 20.0
    loss: float = 0.0
    queue_bdp: float = 4.0

    @staticmethod
    def parse(text: str) -> WanSpec:
        from ..testing.wan import parse_loss, parse_ms, parse_rate_mbit

        kw: dict[str, float] = {}
        parsers = {"rate": ("rate_mbit", parse_rate_mbit), "rtt": ("rtt_ms", parse_ms), "loss": ("loss", parse_loss),
                   "queue": ("queue_bdp", lambda v: float(v.lower().removesuffix("bdp")))}
        for part in filter(None, text.split(",")):
            key, _, value = part.partition("=")
            if key not in parsers or not value:
                raise ValueError(f"--wan takes rate=..,rtt=..,loss=..,queue=..bdp ; got {part!r}")
            name, parse = parsers[key]
            kw[name] = parse(value)
        return WanSpec(**kw)


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path
    health_url: str


def frontdoor_address(config: DeployConfig) -> tuple[str, int]:
    """The front door's ``(host, port)``: ``[router]`` ``host`` and ``port`` (``FrontSettings``' defaults)."""
    return str(config.router.get("host", "127.0.0.1")), int(config.router.get("port", 18000))


def taken_ports(config: DeployConfig) -> list[str]:
    """Each address the deployment would listen on (the front door's, every node's control and data port)
    that cannot be bound here now, as ``what host:port (why)``; empty when all can. Bound as the servers bind
    (SO_REUSEADDR: connections left in TIME_WAIT do not count, a listening socket does)."""
    host, port = frontdoor_address(config)
    wanted = [("the front door ([router] port)", host, port)]
    for n in config.nodes:
        wanted += [(f"node {n.name}'s control_port", n.host, n.control_port),
                   (f"node {n.name}'s data_port", n.host, n.data_port)]
    out = []
    for what, h, p in wanted:
        try:
            listen(h, p).close()
        except OSError as e:
            out.append(f"{what} {h}:{p} ({os.strerror(e.errno) if e.errno else e})")
    return out


def _get(url: str, timeout: float = 1.0) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, None


class Deployment:
    """``with Deployment("deploy.toml") as d: d.frontdoor_url`` — everything is stopped on exit, failures too.

    ``env``: extra environment for every process (``KVWIRE_KEY`` is made up if neither it nor the
    caller's environment has one). ``log_dir``: where each process's output goes (a temporary one by
    default, kept after stop so a failure can be read).
    """

    def __init__(self, config_path: str | os.PathLike[str], *, wan: WanSpec | None = None,
                 log_dir: str | os.PathLike[str] | None = None, env: dict[str, str] | None = None,
                 stop_grace_s: float = 5.0) -> None:
        self.source = deploy_config.load(config_path)
        self.wan = wan
        self.log_dir = Path(log_dir) if log_dir else Path(tempfile.mkdtemp(prefix="kvwire-prfaas-"))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.env = dict(os.environ)
        self.env.update(env or {})
        self.env.setdefault("KVWIRE_KEY", secrets.token_hex(16))
        self.env["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, self.env.get("PYTHONPATH")]))
        self.stop_grace_s = stop_grace_s
        self.procs: list[Proc] = []
        self.exit_codes: dict[str, int | None] = {}  # by process name, filled by stop(): 0 = shut down cleanly
        self.link: Any = None  # a WanLink when ``wan``
        self.config: DeployConfig = self.source
        self.config_path = Path(config_path)
        self._logs: list[IO[bytes]] = []

    # ------------------------------------------------------------ lifecycle
    def __enter__(self) -> Deployment:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def frontdoor_url(self) -> str:
        host, port = frontdoor_address(self.config)
        return f"http://{host}:{port}"

    def ns_for(self, cluster: str) -> str | None:
        if self.link is None:
            return None
        return self.link.server_ns if cluster == "prfaas" else self.link.client_ns

    def start(self, timeout: float = 180.0) -> Deployment:
        """Start every node, then the front door; ``LaunchError`` at once, nothing started, when a port is
        taken (without ``wan``: the link's namespaces are new, nothing listens there)."""
        if self.wan is None:
            taken = taken_ports(self.config)
            if taken:
                raise LaunchError(f"port in use, nothing started: {'; '.join(taken)}")
        try:
            if self.wan is not None:
                self._build_wan()
            for n in self.config.nodes:
                self._spawn(n.name, ["-m", "kvwire.prfaas.node", "--config", str(self.config_path), "--name", n.name],
                            self.ns_for(n.cluster), f"{n.control_url}/health")
            self._wait(timeout, self.procs)
            self._spawn("frontdoor", ["-m", "kvwire.prfaas.frontdoor", "--config", str(self.config_path)],
                        self.ns_for("local"), f"{self.frontdoor_url}/health")
            self._wait(timeout, self.procs[-1:])
        except BaseException:
            self.stop()
            raise
        return self

    def _build_wan(self) -> None:
        from ..testing.wan import WanLink

        assert self.wan is not None
        bdp = self.wan.rate_mbit * 1e6 / 8 * self.wan.rtt_ms / 1e3
        self.link = WanLink(rtt_ms=self.wan.rtt_ms, rate_mbit=self.wan.rate_mbit, loss=self.wan.loss,
                            queue_bytes=max(64 << 10, int(self.wan.queue_bdp * bdp)), prefix="kvp").start()
        hosts = {"prfaas": self.link.server_addr, "local": self.link.client_addr}
        nodes = tuple(dataclasses.replace(n, host=hosts[n.cluster]) for n in self.source.nodes)
        router = dict(self.source.router, host=self.link.client_addr, use_link=True)
        self.config = dataclasses.replace(self.source, nodes=nodes, router=router)
        self.config_path = self.log_dir / "deploy-wan.toml"
        self.config_path.write_text(deploy_config.to_toml(self.config))

    def _spawn(self, name: str, args: Sequence[str], ns: str | None, health_url: str) -> None:
        log_path = self.log_dir / f"{name}.log"
        log = open(log_path, "ab")
        self._logs.append(log)
        cmd = [sys.executable, *args]
        if ns is not None:
            cmd = ["ip", "netns", "exec", ns, *cmd]
        p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                             start_new_session=True, cwd=ROOT)
        self.procs.append(Proc(name, p, log_path, health_url))

    def _health(self, proc: Proc) -> int:
        ns = self.ns_for("prfaas" if self._cluster(proc.name) == "prfaas" else "local")
        if ns is None:
            try:
                return _get(proc.health_url)[0]
            except (OSError, ValueError):
                return 0
        from ..testing import netns

        with netns.entered(ns):
            try:
                return _get(proc.health_url)[0]
            except (OSError, ValueError):
                return 0

    def _cluster(self, name: str) -> str:
        return next((n.cluster for n in self.config.nodes if n.name == name), "local")

    def _wait(self, timeout: float, procs: list[Proc]) -> None:
        end = time.monotonic() + timeout
        waiting = list(procs)
        while waiting:
            for p in list(waiting):
                if p.popen.poll() is not None:
                    raise LaunchError(f"{p.name} exited with {p.popen.returncode}; log {p.log}:\n{_tail(p.log)}")
                if self._health(p) == 200:
                    waiting.remove(p)
            if waiting and time.monotonic() > end:
                names = ", ".join(p.name for p in waiting)
                raise LaunchError(f"not healthy after {timeout:.0f}s: {names}; logs in {self.log_dir}")
            if waiting:
                time.sleep(0.2)

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to one process of the deployment (fault tests)."""
        p = next(p for p in self.procs if p.name == name)
        os.killpg(p.popen.pid, sig)
        if sig == signal.SIGKILL:
            p.popen.wait(10)

    def restart(self, name: str, timeout: float = 120.0) -> None:
        """Start the process ``name`` again (after ``kill``) and wait for its health."""
        old = next(p for p in self.procs if p.name == name)
        if old.popen.poll() is None:
            raise LaunchError(f"{name} is still running")
        self.procs.remove(old)
        n = self.config.node(name)
        self._spawn(name, ["-m", "kvwire.prfaas.node", "--config", str(self.config_path), "--name", name],
                    self.ns_for(n.cluster), old.health_url)
        self._wait(timeout, self.procs[-1:])

    def pids(self) -> dict[str, int]:
        return {p.name: p.popen.pid for p in self.procs}

    def stop(self) -> None:
        """SIGTERM every process group (front door first), SIGKILL what is left after the grace, then the
        WAN link (emulator, namespaces). Idempotent."""
        for p in reversed(self.procs):
            _signal(p.popen, signal.SIGTERM)
        end = time.monotonic() + self.stop_grace_s
        for p in reversed(self.procs):
            try:
                p.popen.wait(max(0.0, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for p in self.procs:
            clean = p.popen.poll()  # its own exit after SIGTERM (None: it had to be killed)
            if clean is None:
                _signal(p.popen, signal.SIGKILL)
                p.popen.wait(10)
            self.exit_codes[p.name] = clean
            _signal(p.popen, signal.SIGKILL)  # anything the process left in its group
        self.procs.clear()
        for f in self._logs:
            f.close()
        self._logs.clear()
        if self.link is not None:
            self.link.close()
            self.link = None

    def state(self) -> dict[str, Any]:
        return {"config": str(self.config_path), "frontdoor": self.frontdoor_url, "log_dir": str(self.log_dir),
                "processes": {p.name: p.popen.pid for p in self.procs},
                "namespaces": list(self.link.namespaces) if self.link is not None else [],
                "emulator_pid": self.link.emulator_pid if self.link is not None else None}


def _signal(p: subprocess.Popen[bytes], sig: int) -> None:
    try:
        os.killpg(p.pid, sig)  # the process and whatever it started in its session
    except (ProcessLookupError, PermissionError):
        pass


def _tail(path: Path, n: int = 4000) -> str:
    try:
        return path.read_bytes()[-n:].decode(errors="replace")
    except OSError:
        return ""
