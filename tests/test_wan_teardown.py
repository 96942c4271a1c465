"""SIGTERM, SIGHUP and SIGINT tear an emulated link down: ``kvwire-bench --emulate`` mid-test and a
process holding a ``WanLink`` (as a fixture does) leave no namespace and no process behind.

Each run names its namespaces with a prefix of its own (``KVWIRE_WAN_PREFIX``), so links that other test
runs build at the same time are neither counted nor touched. Needs root, iproute2 and iptables.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import default_signals

from kvwire.termination import pid_alive
from kvwire.testing import cemu
from kvwire.testing.netns import sh
from kvwire.testing.wan import iter_stale_namespaces, unavailable_reason

_REASON = unavailable_reason()
pytestmark = [pytest.mark.netns, pytest.mark.skipif(_REASON is not None, reason=_REASON or "")]
ROOT = str(Path(__file__).resolve().parents[1])

HOLD_A_LINK = """
import sys, time
from kvwire.testing.wan import WanLink
with WanLink(rtt_ms=2, rate_mbit=100) as link:
    link.popen_in("server", ["sleep", "300"])
    print("up", flush=True)
    time.sleep(300)
"""


def _ours(prefix: str) -> list[str]:
    return sorted(iter_stale_namespaces(prefix))


def _pids_in(namespaces: list[str]) -> set[int]:
    pids: set[int] = set()
    for ns in namespaces:
        out = sh(["ip", "netns", "pids", ns], check=False).stdout
        pids |= {int(p) for p in out.split()}
    return pids



def _wait_for(cond: object, timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():  # type: ignore[operator]
            return True
        time.sleep(0.1)
    return False


def _start(cmd: list[str], prefix: str, emulator: str = "auto") -> subprocess.Popen[str]:
    env = {**os.environ, "KVWIRE_WAN_PREFIX": prefix, "PYTHONUNBUFFERED": "1", "KVWIRE_WAN_EMULATOR": emulator,
           "PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))}
    with default_signals(signal.SIGHUP, signal.SIGINT):  # (what the tests send: heard even under nohup)
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _kill_and_check(proc: subprocess.Popen[str], prefix: str, sig: signal.Signals) -> None:
    try:
        # the link is up with its emulator, and the server (bench server or sleep) in the server namespace
        assert _wait_for(lambda: len(_ours(prefix)) == 3 and len(_pids_in(_ours(prefix))) >= 2, 60), (
            proc.poll(), proc.stderr.read() if proc.poll() is not None and proc.stderr else "")
        namespaces = _ours(prefix)
        pids = _pids_in(namespaces)
        time.sleep(0.5)
        proc.send_signal(sig)
        rc = proc.wait(30)
        err = proc.stderr.read() if proc.stderr else ""
        # the bench exits 128 + signal; a bare script dies of the uncaught Terminated (status 1), not of
        # the signal itself (-signal: Python's default, which leaves everything behind)
        assert rc in (128 + sig, 1) and rc != -sig, (rc, err)
        assert _ours(prefix) == [], "namespaces left behind"
        assert _wait_for(lambda: not any(pid_alive(p) for p in pids), 10), [p for p in pids if pid_alive(p)]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for ns in _ours(prefix):  # clean up after a failure, only what this test made
            for p in _pids_in([ns]):
                try:
                    os.kill(p, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            sh(["ip", "netns", "del", ns], check=False)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT], ids=lambda s: s.name)
def test_bench_emulate_tears_down_on(sig: signal.Signals) -> None:
    prefix = "kvt" + secrets.token_hex(2)
    proc = _start([sys.executable, "-m", "kvwire.bench", "--emulate", "rtt=4ms,rate=100mbit", "-t", "60",
                   "-P", "2"], prefix)
    _kill_and_check(proc, prefix, sig)
    assert proc.returncode == 128 + sig


@pytest.mark.parametrize("emulator", [
    pytest.param("c", marks=pytest.mark.skipif(cemu.compiler() is None, reason="no C compiler")), "python"])
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP], ids=lambda s: s.name)
def test_a_process_holding_a_link_tears_it_down_on(sig: signal.Signals, emulator: str) -> None:
    prefix = "kvt" + secrets.token_hex(2)
    proc = _start([sys.executable, "-c", HOLD_A_LINK], prefix, emulator)
    _kill_and_check(proc, prefix, sig)
