"""kvwire-bench --emulate: the whole bench over an emulated WAN link (real namespaces, real processes).

Needs root, iproute2 and iptables (skips with the reason otherwise), except the test of the error a user
without those privileges gets, which drops them with ``setpriv`` when run as root.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import bench_verdict

from kvwire.testing import netns
from kvwire.testing.wan import iter_stale_namespaces, unavailable_reason

_REASON = unavailable_reason()
ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}
LINK = "rtt=2ms,rate=2000mbit"


def bench(*args: str, prefix: tuple[str, ...] = (), timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*prefix, sys.executable, "-m", "kvwire.bench", *args], capture_output=True, text=True,
                          timeout=timeout, env=ENV)


@pytest.mark.netns
@pytest.mark.skipif(_REASON is not None, reason=_REASON or "")
def test_kv_run_over_an_emulated_link_verifies_and_reports_the_link(tiny_config: str) -> None:
    before = set(iter_stale_namespaces())
    r = bench("--emulate", LINK + ",queue=256KB", "--model", tiny_config, "--tokens", "3000", "--requests", "2",
              "-P", "2", "--prefill-ms-per-layer", "2", "-J")
    assert r.returncode == 0, bench_verdict(r)
    doc = json.loads(r.stdout)
    link = doc["start"]["emulated_link"]
    assert (link["rtt_ms"], link["loss"], link["rate_mbit"], link["queue_bytes"]) == (2.0, 0.0, 2000.0, 256000)
    assert doc["start"]["connecting_to"]["host"] == link["server_addr"] == "10.77.2.2"
    assert {c["local_host"] for c in doc["start"]["connected"]} == {link["client_addr"]}, "client in its netns"
    assert {c["remote_host"] for c in doc["start"]["connected"]} == {link["server_addr"]}
    kv = doc["kv"]
    assert kv["verification"]["verified"] and kv["verification"]["bytes_verified"] == 2 * kv["bytes_per_request"]
    # every payload byte crossed the emulator (server -> client is only ACKs and control)
    stats = kv["emulated_link_stats"]
    assert stats["c2s"]["bytes_in"] >= 2 * kv["bytes_per_request"] > stats["s2c"]["bytes_in"]
    # the path has the emulated delay: no lane saw an RTT below it
    assert min(s["sender"]["min_rtt"] for s in doc["end"]["streams"]) >= 2000 * 0.9
    assert set(iter_stale_namespaces()) == before, "the link's namespaces are gone"


@pytest.mark.netns
@pytest.mark.skipif(_REASON is not None, reason=_REASON or "")
def test_reverse_over_an_emulated_link_and_the_text_summary() -> None:
    before = set(iter_stale_namespaces())
    r = bench("--emulate", LINK + ",loss=0%", "-R", "-n", "2M", "-l", "1M", "-P", "2")
    assert r.returncode == 0, bench_verdict(r)
    assert "Emulated link  rtt 2 ms, loss 0%, rate 2000 Mbit/s" in r.stdout
    assert "client 10.77.1.2 <-> server 10.77.2.2" in r.stdout
    assert "Reverse mode, remote host 10.77.2.2 is sending" in r.stdout
    assert "Verification   OK: 2/2 requests" in r.stdout
    assert set(iter_stale_namespaces()) == before


def test_emulate_without_privileges_is_a_clear_error() -> None:
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("needs setpriv to drop root's capabilities")
        prefix: tuple[str, ...] = ("setpriv", "--bounding-set=-all", "--inh-caps=-all")
    else:
        prefix = ()
    before = set(os.listdir(netns.NETNS_DIR)) if Path(netns.NETNS_DIR).is_dir() else set()
    r = bench("--emulate", LINK, "-n", "1M", prefix=prefix)
    assert r.returncode == 2, r.stderr
    assert "--emulate needs root and network namespaces" in r.stderr and "Traceback" not in r.stderr
    after = set(os.listdir(netns.NETNS_DIR)) if Path(netns.NETNS_DIR).is_dir() else set()
    assert after <= before


def test_emulate_spec_errors_are_usage_errors() -> None:
    for spec, message in (("rtt=2ms", "needs rate"), ("rtt=2ms,rate=1gbit,jitter=1ms", "bad --emulate item"),
                          ("rtt=2ms,rate=fast", "bad --emulate rate"), ("rtt=2ms,rate=1gbit,loss=100%", "loss")):
        r = bench("--emulate", spec, "-n", "1M")
        assert r.returncode == 2 and message in r.stderr, (spec, r.stderr)
