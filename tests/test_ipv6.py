"""IPv6 and dual-stack wherever an address is taken: the Receiver's listener, sessions, metrics, the bench
(-B, -c) and the examples, over ``::1`` (skipped where the host has no IPv6) and between two network
namespaces joined by a veth pair (skipped without root)."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import has_ipv6_loopback, send_verified

from kvwire import Receiver, connect
from kvwire.metrics import Metrics
from kvwire.testing import netns
from kvwire.testing.fixtures import default_request, load_fixture

pytestmark = pytest.mark.skipif(not has_ipv6_loopback(), reason="this host has no IPv6 loopback")
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _transfer(rx: Receiver, host: str, rid: str) -> None:
    with connect(host, rx.address[1], key="k", lanes=3) as s:
        send_verified(rx, s, load_fixture("tiny-llama"), default_request(rid))


def test_receiver_and_session_over_ipv6_loopback(no_leaks: None) -> None:
    with Receiver("::1", 0, key="k") as rx:
        assert rx.address[0] == "::1"
        _transfer(rx, "::1", "v6")


def test_dual_stack_listener_takes_ipv4_and_ipv6(no_leaks: None) -> None:
    if not socket.has_dualstack_ipv6():
        pytest.skip("no dual-stack sockets on this platform")
    with Receiver("::", 0, key="k") as rx:
        _transfer(rx, "127.0.0.1", "via-v4")
        _transfer(rx, "::1", "via-v6")
        _transfer(rx, "localhost", "via-name")


def test_metrics_over_ipv6() -> None:
    with Receiver("::1", 0, key="k") as rx:
        m = Metrics()
        m.watch(rx, name="v6")
        server = m.serve("::1", 0)
        try:
            with urllib.request.urlopen(f"http://[::1]:{server.address[1]}/metrics", timeout=5) as r:
                assert 'kvwire_receiver_sessions{listen="v6"} 0' in r.read().decode()
        finally:
            server.close()


@pytest.mark.parametrize("bench_server,client", [("::1", "::1"), ("::", "::1"), ("::", "127.0.0.1")],
                         indirect=["bench_server"], ids=["v6", "dual-v6", "dual-v4"])
def test_bench_over_ipv6(bench_server: tuple[str, int], client: str, capsys: pytest.CaptureFixture[str]) -> None:
    from kvwire.bench import main

    assert main(["-c", client, "-p", str(bench_server[1]), "-n", "2M", "-l", "1M", "--key", "k", "-J"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["kv"]["verification"]["verified"]
    assert {c["remote_host"] for c in doc["start"]["connected"]} == {client}


def test_examples_over_ipv6() -> None:
    rx = subprocess.Popen([sys.executable, str(EXAMPLES / "decode_receiver.py"), "--host", "::1", "--port", "0",
                           "--key", "k", "--model", "qwen3-next-80b-a3b", "--count", "1"],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert rx.stdout is not None
        first = rx.stdout.readline()
        m = re.search(r"listening on \[::1\]:(\d+)", first)
        assert m, first
        tx = subprocess.run([sys.executable, str(EXAMPLES / "prefill_sender.py"), "--host", "::1", "--port",
                             m.group(1), "--key", "k", "--tokens", "512"], capture_output=True, text=True, timeout=120)
        assert tx.returncode == 0, tx.stderr
        rest, _ = rx.communicate(timeout=60)
    finally:
        rx.kill()
        rx.wait()
    assert rx.returncode == 0 and "content verified" in rest, rest


# ---------------------------------------------------------------- between namespaces


@pytest.fixture
def two_namespaces() -> Iterator[tuple[str, str]]:
    """``kvw6a`` (fd00:6b76::1, 10.237.0.1) and ``kvw6b`` (fd00:6b76::2, 10.237.0.2) joined by a veth."""
    reason = netns.unavailable_reason()
    if reason:
        pytest.skip(reason)
    a, b = "kvw6a", "kvw6b"
    for ns in (a, b):
        netns.delete(ns)
        netns.create(ns)
    try:
        netns.sh(["ip", "link", "add", "kvw6x", "netns", a, "type", "veth", "peer", "name", "kvw6y", "netns", b])
        for ns, dev, n in ((a, "kvw6x", 1), (b, "kvw6y", 2)):
            netns.sh(["ip", "-n", ns, "addr", "add", f"fd00:6b76::{n}/64", "dev", dev, "nodad"])
            netns.sh(["ip", "-n", ns, "addr", "add", f"10.237.0.{n}/24", "dev", dev])
            netns.sh(["ip", "-n", ns, "link", "set", dev, "up"])
        yield a, b
    finally:
        for ns in (a, b):
            netns.delete(ns)


@pytest.mark.netns
def test_session_between_namespaces_over_ipv6_and_dual_stack(two_namespaces: tuple[str, str]) -> None:
    a, b = two_namespaces
    with netns.entered(a):
        rx_v6 = Receiver("fd00:6b76::1", 0, key="k")
        rx_dual = Receiver("::", 0, key="k")
    try:
        with netns.entered(b):
            _transfer(rx_v6, "fd00:6b76::1", "ns-v6")
            _transfer(rx_dual, "fd00:6b76::1", "ns-dual-v6")
            _transfer(rx_dual, "10.237.0.1", "ns-dual-v4")
            with pytest.raises(OSError):  # the IPv6-only listener is not on the IPv4 address
                connect("10.237.0.1", rx_v6.address[1], key="k", connect_timeout=2)
    finally:
        rx_v6.close()
        rx_dual.close()
