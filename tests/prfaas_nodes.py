"""Start and stop real PrfaaS node processes (``python -m kvwire.prfaas.node``) on loopback for the tests."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from kvwire.prfaas import config as cfg
from kvwire.prfaas.nodeclient import NodeClient, NodeError

KEY = "prfaas-node-tests"


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def port_free(port: int) -> bool:
    """Nothing listens on ``port`` (SO_REUSEADDR, as servers bind: a killed node's connections in TIME_WAIT
    do not count; on Linux a listening socket still makes the bind fail)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


class Nodes:
    """Node processes of one config, started together; ``stop()`` sends SIGTERM and reaps every one."""

    def __init__(self, tmp: Path, roles: list[tuple[str, str, str]], model: dict[str, Any] | None = None) -> None:
        ports = free_ports(2 * len(roles))
        nodes = [{"name": n, "cluster": c, "role": r, "host": "127.0.0.1", "control_port": ports[2 * i],
                  "data_port": ports[2 * i + 1]} for i, (n, c, r) in enumerate(roles)]
        self.config = cfg.from_dict({"model": model or {}, "nodes": nodes})
        self.path = tmp / "deploy.toml"
        self.path.write_text(cfg.to_toml(self.config))
        env = {**os.environ, "KVWIRE_KEY": KEY, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1",
               "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent.parent), os.environ.get("PYTHONPATH", "")])}
        self.logs = {n: tmp / f"{n}.log" for n, _, _ in roles}
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        for n, _, _ in roles:
            with open(self.logs[n], "wb") as log:
                self.procs[n] = subprocess.Popen(
                    [sys.executable, "-m", "kvwire.prfaas.node", "--config", str(self.path), "--name", n],
                    env=env, stdout=log, stderr=subprocess.STDOUT)

    def spec(self, name: str) -> cfg.NodeSpec:
        return self.config.node(name)

    def client(self, name: str, timeout: float = 30.0) -> NodeClient:
        s = self.spec(name)
        return NodeClient(s.host, s.control_port, timeout=timeout, key=KEY)

    def log(self, name: str) -> str:
        return self.logs[name].read_text(errors="replace")[-3000:]

    async def wait_ready(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        for name, proc in self.procs.items():
            async with self.client(name, timeout=2.0) as c:
                while True:
                    if proc.poll() is not None:
                        raise AssertionError(f"node {name} exited rc={proc.returncode}:\n{self.log(name)}")
                    try:
                        await c.health()
                        break
                    except NodeError:
                        if time.monotonic() > deadline:
                            raise AssertionError(f"node {name} not ready in {timeout}s:\n{self.log(name)}") from None
                        await asyncio.sleep(0.2)

    def kill(self, name: str) -> None:
        self.procs[name].kill()
        self.procs[name].wait(10)

    def stop(self, timeout: float = 20.0) -> dict[str, int | None]:
        """SIGTERM every live node, wait; returns each one's exit code (SIGKILLed after ``timeout``: None)."""
        for p in self.procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        codes: dict[str, int | None] = {}
        for n, p in self.procs.items():
            try:
                codes[n] = p.wait(timeout)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
                codes[n] = None
        return codes
