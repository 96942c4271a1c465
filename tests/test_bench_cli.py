"""kvwire-bench end to end: real processes, real sockets, real layouts.

The loopback runs start the server as a child process exactly as a user would; the unreachable-server
cases run the client in-process against plain TCP servers that misbehave.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers import bench_verdict

from kvwire import Receiver
from kvwire.bench import main
from kvwire.bench.control import MAGIC
from kvwire.bench.payload import BLOCK_BYTES, Pattern, alloc_flat
from kvwire.bench.server import BenchServer, ServerConfig
from kvwire.codec.frames import VERSION

ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}


def bench(*args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kvwire.bench", *args], capture_output=True, text=True,
                          timeout=timeout, env=ENV)


# ---------------------------------------------------------------- payload pattern


def test_pattern_catches_wrong_offset_stale_request_and_single_bit() -> None:
    n = 3 * BLOCK_BYTES + 1000
    p = Pattern(11)
    buf = alloc_flat(n)[:n]
    p.fill(buf, "run/1")
    assert p.verify(buf, "run/1").ok
    assert not p.verify(buf, "run/2").ok, "bytes of another request (a reused buffer) must not pass"
    assert not Pattern(12).verify(buf, "run/1").ok, "another seed must not pass"
    swapped = buf.copy()
    first, second = slice(0, BLOCK_BYTES), slice(BLOCK_BYTES, 2 * BLOCK_BYTES)
    swapped[first], swapped[second] = buf[second], buf[first]
    r = p.verify(swapped, "run/1")
    assert (r.ok, r.bad_blocks, r.first_bad_offset) == (False, 2, 0)
    flipped = buf.copy()
    flipped[n - 3] ^= 0x10
    r = p.verify(flipped, "run/1")
    assert (r.ok, r.bad_blocks, r.first_bad_offset) == (False, 1, n - 3)
    assert p.verify(flipped, "run/1", 0, n - 3).ok and not p.verify(flipped, "run/1", n - 3, n - 2).ok


# ---------------------------------------------------------------- loopback runs


def test_loopback_json_has_iperf3_keys_and_every_byte_verified(tiny_config: str) -> None:
    r = bench("--loopback", "--model", tiny_config, "--tokens", "3000", "--requests", "3", "-P", "2",
              "-i", "0.05", "--prefill-ms-per-layer", "5", "-J")
    assert r.returncode == 0, bench_verdict(r)
    doc = json.loads(r.stdout)
    start, end, kv = doc["start"], doc["end"], doc["kv"]
    assert len(start["connected"]) == 2 and start["test_start"]["num_streams"] == 2
    assert {"connected", "version", "timestamp", "test_start"} <= set(start)
    assert doc["intervals"], "interval records"
    for rec in doc["intervals"]:
        assert len(rec["streams"]) == 2
        assert {"bytes", "bits_per_second", "retransmits", "rtt", "snd_cwnd", "start", "end"} <= set(rec["sum"])
        assert rec["sum"]["bytes"] == sum(s["bytes"] for s in rec["streams"])
    per_request = kv["bytes_per_request"]
    assert kv["layout"]["num_layers"] == 8 and kv["requests"] == 3
    assert end["sum_received"]["bytes"] == 3 * per_request
    assert end["sum_sent"]["bytes"] >= 3 * per_request
    assert sum(i["sum"]["bytes"] for i in doc["intervals"]) == end["sum_sent"]["bytes"]
    for key in ("bytes", "seconds", "bits_per_second"):
        assert end["sum_sent"][key] > 0 and end["sum_received"][key] > 0
    assert isinstance(end["sum_sent"]["retransmits"], int)
    assert {"host_total", "remote_total"} <= set(end["cpu_utilization_percent"])
    v = kv["verification"]
    assert v["verified"] is True and v["bytes_verified"] == v["bytes_expected"] == 3 * per_request
    slack = kv["clock_uncertainty_s"] * 1e3 + 0.5
    for t in kv["timeline"]:
        assert t["verified"] and len(t["layers"]) == 8
        for i, layer in enumerate(t["layers"]):
            assert layer["produced_ms"] >= 5.0 * (i + 1) - 0.5, "layer i is produced at t0 + (i+1)*5 ms"
            assert layer["verified_ms"] >= layer["produced_ms"] - slack, "verified before it was produced?"
        last_produced = max(x["produced_ms"] for x in t["layers"])
        last_verified = max(x["verified_ms"] for x in t["layers"])
        assert t["exposed_tail_ms"] == pytest.approx(last_verified - last_produced)
    tails = sorted(t["exposed_tail_ms"] for t in kv["timeline"])
    assert kv["exposed_tail_ms"]["p50"] == pytest.approx(tails[1])
    assert kv["wire_bytes"] > kv["payload_bytes"], "headers and control travel too"


def test_raw_mode_json_stream_and_human_summary() -> None:
    r = bench("--loopback", "-n", "6M", "-l", "1M", "-P", "3", "-i", "0.05", "--json-stream", "--no-hash")
    assert r.returncode == 0, bench_verdict(r)
    events = [json.loads(line) for line in r.stdout.splitlines()]
    kinds = [e["event"] for e in events]
    assert kinds[0] == "start" and kinds[-2:] == ["end", "kv"] and kinds.count("request") >= 6
    kv = events[-1]["data"]
    assert kv["mode"] == "raw" and kv["hash"] == "none" and kv["verification"]["verified"]
    assert kv["payload_bytes"] >= 6 * 1024 * 1024
    text = bench("--loopback", "-n", "2M", "-l", "1M", "-P", "2")
    assert text.returncode == 0, text.stderr
    assert re.search(r"^\[SUM\].*sender$", text.stdout, re.M)
    assert re.search(r"^\[SUM\].*receiver \(verified\)$", text.stdout, re.M)
    assert "Verification   OK" in text.stdout and "CPU-s/GB" in text.stdout


def test_wrong_expected_seed_fails_with_nonzero_exit(tiny_config: str) -> None:
    r = bench("--loopback", "--model", tiny_config, "--tokens", "500", "--seed", "1", "--verify-seed", "2", "-J")
    assert r.returncode == 1, r.stderr
    v = json.loads(r.stdout)["kv"]["verification"]
    assert v["verified"] is False and v["requests_failed"] == 1 and v["bytes_verified"] == 0
    assert "differ from the expected pattern" in v["failures"][0]
    text = bench("--loopback", "--model", tiny_config, "--tokens", "500", "--verify-seed", "9")
    assert text.returncode == 1 and "Verification   FAILED" in text.stdout


def test_congestion_and_pacing_reach_the_lane_sockets() -> None:
    r = bench("--loopback", "-n", "2M", "-l", "1M", "-P", "2", "-C", "reno", "--fq-rate", "4G", "-J")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["end"]["sender_tcp_congestion"] == "reno"
    assert [s["sender"]["max_pacing_rate"] for s in doc["end"]["streams"]] == [500_000_000] * 2
    bad = bench("--loopback", "-n", "1M", "-C", "no-such-cc")
    assert bad.returncode == 2 and "no-such-cc" in bad.stderr and "not available" in bad.stderr


def test_reverse_on_loopback_verifies_every_byte_with_a_layer_timeline(tiny_config: str) -> None:
    r = bench("--loopback", "-R", "--model", tiny_config, "--tokens", "3000", "--requests", "2", "-P", "2",
              "-i", "0.05", "--prefill-ms-per-layer", "4", "-J")
    assert r.returncode == 0, bench_verdict(r)
    doc = json.loads(r.stdout)
    start, end, kv = doc["start"], doc["end"], doc["kv"]
    assert start["test_start"]["reverse"] == 1 and kv["direction"] == "reverse"
    assert kv["model"] == tiny_config, "the client's name for the model, not the server's temp file"
    per_request = kv["bytes_per_request"]
    v = kv["verification"]
    assert v["verified"] is True and v["bytes_verified"] == 2 * per_request
    assert end["sum_received"]["bytes"] == 2 * per_request
    slack = kv["clock_uncertainty_s"] * 1e3 + 0.5
    for t in kv["timeline"]:
        assert t["verified"] and len(t["layers"]) == 8
        for i, layer in enumerate(t["layers"]):
            assert layer["produced_ms"] >= 4.0 * (i + 1) - 0.5
            assert layer["verified_ms"] >= layer["produced_ms"] - slack
    # the receiving side (this client) counted every lane's wire bytes: all the verified payload, and no
    # more than the sender put out (a re-sent tail chunk may still be on its way when it counts)
    for st in end["streams"]:
        assert st["receiver"] is not None and st["receiver"]["sender"] is False
        assert 0 < st["receiver"]["bytes"] <= st["sender"]["wire_bytes"]
    assert sum(st["receiver"]["bytes"] for st in end["streams"]) >= 2 * per_request
    assert doc["intervals"] and sum(i["sum"]["bytes"] for i in doc["intervals"]) == end["sum_sent"]["bytes"]


def test_reverse_raw_text_summary_and_a_bad_seed_fails() -> None:
    r = bench("--loopback", "-R", "-n", "3M", "-l", "1M", "-P", "2")
    assert r.returncode == 0, bench_verdict(r)
    assert "Reverse mode, remote host 127.0.0.1 is sending" in r.stdout
    assert "Verification   OK: 3/3 requests" in r.stdout and "by the receiver (this host)" in r.stdout
    # the receiving client checks against its own expectation: a different seed must fail it
    bad = bench("--loopback", "-R", "-n", "1M", "-l", "1M", "--verify-seed", "7", "-J")
    assert bad.returncode == 1, bad.stderr
    v = json.loads(bad.stdout)["kv"]["verification"]
    assert v["verified"] is False and "differ from the expected pattern" in v["failures"][0]


def test_reverse_with_tls_is_a_clear_usage_error() -> None:
    r = bench("-c", "127.0.0.1", "-R", "--tls-ca", "/nonexistent.pem")
    assert r.returncode == 2 and "-R with TLS is not supported" in r.stderr


def _json_documents(text: str) -> list[Any]:
    """Concatenated JSON documents (a server prints one per test); anything else fails the parse."""
    dec, docs, pos = json.JSONDecoder(), [], 0
    while pos < len(text):
        if text[pos].isspace():
            pos += 1
            continue
        doc, pos = dec.raw_decode(text, pos)
        docs.append(doc)
    return docs


def test_server_json_prints_one_document_per_test_and_nothing_else(tiny_config: str) -> None:
    server = subprocess.Popen([sys.executable, "-m", "kvwire.bench", "-s", "-J", "-B", "127.0.0.1", "-p", "0",
                               "--data-port", "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=ENV)
    assert server.stderr is not None
    try:
        port = None
        for line in server.stderr:  # with -J the log goes to stderr
            m = re.search(r"Server listening on \S+ port (\d+)", line)
            if m:
                port = m.group(1)
                break
        assert port is not None
        stderr = server.stderr
        threading.Thread(target=stderr.read, daemon=True).start()
        fwd = bench("-c", "127.0.0.1", "-p", port, "--model", tiny_config, "--tokens", "3000", "--requests", "2",
                    "-P", "2", "-J", timeout=60)
        assert fwd.returncode == 0, fwd.stderr
        rev = bench("-c", "127.0.0.1", "-p", port, "-R", "-n", "2M", "-l", "1M", "-J", timeout=60)
        assert rev.returncode == 0, rev.stderr
    finally:
        server.send_signal(signal.SIGTERM)
        out, _ = server.communicate(timeout=15)
    docs = _json_documents(out)
    assert len(docs) == 2, out
    rx, tx = docs
    client = json.loads(fwd.stdout)
    assert rx["kv"]["role"] == "receiver" and "error" not in rx
    assert rx["kv"]["verification"] == {"verified": True, "requests_ok": 2, "requests_failed": 0,
                                        "bytes_verified": 2 * client["kv"]["bytes_per_request"]}
    assert rx["end"]["sum_received"]["bytes"] == client["end"]["sum_received"]["bytes"]
    assert rx["start"]["test_start"] == {"protocol": "TCP", "num_streams": 2, "reverse": 0}
    assert len(rx["start"]["connected"]) == 2
    # receiving-side per-lane counts: each lane's bytes on the wire, as the sending client counted them
    sent = {s["sender"]["socket"]: s["sender"]["wire_bytes"] for s in client["end"]["streams"]}
    got = {s["receiver"]["socket"]: s["receiver"]["bytes"] for s in rx["end"]["streams"]}
    assert got.keys() == sent.keys() and all(0 < got[k] <= sent[k] for k in got), (got, sent)
    assert sum(got.values()) == rx["kv"]["lane_wire_bytes"] >= rx["end"]["sum_received"]["bytes"]
    assert [len(r["layers"]) for r in rx["kv"]["requests"]] == [8, 8]
    assert all(r["verified"] and r["bytes_checked"] == r["bytes"] for r in rx["kv"]["requests"])
    assert tx["kv"]["role"] == "sender" and tx["kv"]["verification"]["verified"] and "error" not in tx
    assert tx["end"]["sum_received"]["bytes"] == 2 * 1024 * 1024


def test_kv_preset_json_is_the_only_stdout_output() -> None:
    """The README example: a real preset at 32k tokens (845 MB), -J: stdout is exactly one JSON document."""
    r = bench("--loopback", "--model", "qwen3-next-80b-a3b", "--tokens", "32768", "-J")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    kv = doc["kv"]
    assert kv["bytes_per_request"] == 844_824_576 and kv["verification"]["verified"]
    assert kv["goodput_bits_per_second"] > 1e9, kv["goodput_bits_per_second"]


def test_plot_is_written(tiny_config: str, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    png = tmp_path / "run.png"
    r = bench("--loopback", "--model", tiny_config, "--tokens", "2000", "--plot", str(png))
    assert r.returncode == 0, r.stderr
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
def test_tls_and_key_on_loopback(tiny_config: str, tmp_path: Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True)
    r = bench("--loopback", "--model", tiny_config, "--tokens", "500", "--tls-cert", str(cert), "--tls-key",
              str(key), "--tls-ca", str(cert), "--key", "s3cret", "-J")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["start"]["kvwire"]["tls"] and doc["kv"]["verification"]["verified"]


# ---------------------------------------------------------------- peers that are not kvwire-bench servers


def _serve_once(behaviour: Any) -> tuple[socket.socket, threading.Thread]:
    lst = socket.create_server(("127.0.0.1", 0))

    def run() -> None:
        try:
            conn, _ = lst.accept()
        except OSError:
            return
        with conn:
            behaviour(conn)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return lst, t


def _garbage(conn: socket.socket) -> None:
    conn.sendall(b"SSH-2.0-OpenSSH_9.6\r\n")
    time.sleep(3)


def _silent(conn: socket.socket) -> None:
    time.sleep(3)


def _newer_version(conn: socket.socket) -> None:
    conn.recv(1024)
    conn.sendall(struct.pack("<4sB", MAGIC, VERSION + 1) + bytes(43))  # a kvwire header of the next version
    time.sleep(3)


def _close_at_once(conn: socket.socket) -> None:
    conn.recv(1024)


@pytest.mark.parametrize(("behaviour", "message"), [
    (_garbage, "is not a kvwire-bench peer"),
    (_silent, "no kvwire-bench answer"),
    (_newer_version, f"protocol v{VERSION + 1}"),
    (_close_at_once, "closed the connection during the handshake"),
])
def test_client_fails_fast_and_clearly_against_other_servers(
        behaviour: Any, message: str, capsys: pytest.CaptureFixture[str]) -> None:
    lst, t = _serve_once(behaviour)
    try:
        t0 = time.monotonic()
        rc = main(["-c", "127.0.0.1", "-p", str(lst.getsockname()[1]), "-n", "1M"])
        elapsed = time.monotonic() - t0
    finally:
        lst.close()
    err = capsys.readouterr().err
    assert rc == 3 and message in err, err
    assert elapsed < 2.0, f"took {elapsed:.2f} s"


def test_client_against_a_kvwire_receiver_port_fails_clearly(capsys: pytest.CaptureFixture[str]) -> None:
    with Receiver(allocator=lambda m: np.zeros(m.total_bytes, np.uint8)) as rx:
        t0 = time.monotonic()
        rc = main(["-c", "127.0.0.1", "-p", str(rx.address[1]), "-n", "1M"])
        elapsed = time.monotonic() - t0
    err = capsys.readouterr().err
    assert rc == 3 and "not a kvwire-bench server" in err and elapsed < 2.0, err


@pytest.fixture
def inproc_server() -> Iterator[BenchServer]:
    server = BenchServer(ServerConfig(bind="127.0.0.1", port=0, data_port=0, key=b"right"), log=lambda _: None)
    t = threading.Thread(target=server.serve, daemon=True)
    t.start()
    yield server
    server.close()
    t.join(5)


def test_wrong_key_is_refused(inproc_server: BenchServer, capsys: pytest.CaptureFixture[str]) -> None:
    port = str(inproc_server.address[1])
    assert main(["-c", "127.0.0.1", "-p", port, "-n", "1M", "--key", "wrong"]) == 3
    assert "failed authentication" in capsys.readouterr().err
    assert main(["-c", "127.0.0.1", "-p", port, "-n", "1M", "-l", "1M", "--key", "right", "-J"]) == 0
    assert json.loads(capsys.readouterr().out)["kv"]["verification"]["verified"]


def test_server_metrics_count_what_a_client_sent(capsys: pytest.CaptureFixture[str]) -> None:
    server = BenchServer(ServerConfig(bind="127.0.0.1", port=0, data_port=0, metrics_port=0), log=lambda _: None)
    t = threading.Thread(target=server.serve, daemon=True)
    t.start()
    try:
        assert server.metrics_server is not None
        host, port = server.metrics_server.address
        url = f"http://{host}:{port}/metrics"
        assert main(["-c", "127.0.0.1", "-p", str(server.address[1]), "-n", "2M", "-l", "1M", "-J"]) == 0
        capsys.readouterr()
        with urllib.request.urlopen(url, timeout=5) as r:
            text = r.read().decode()
    finally:
        server.close()
        t.join(5)
    assert 'kvwire_received_bytes_total{listen="kvwire-bench"} 2097152\n' in text
    assert 'kvwire_received_transfers_total{listen="kvwire-bench",state="done"} 2\n' in text
    assert "kvwire_bench_pool_held_bytes " in text


# ---------------------------------------------------------------- a server outlives its clients


def test_server_keeps_serving_after_a_client_is_killed_mid_transfer(tiny_config: str) -> None:
    server = subprocess.Popen([sys.executable, "-m", "kvwire.bench", "-s", "-B", "127.0.0.1", "-p", "0",
                               "--data-port", "0"], stdout=subprocess.PIPE, text=True, env=ENV)
    lines: list[str] = []
    assert server.stdout is not None
    try:
        port = None
        for line in server.stdout:
            lines.append(line)
            m = re.search(r"Server listening on \S+ port (\d+)", line)
            if m:
                port = m.group(1)
                break
        assert port is not None, lines
        reader = threading.Thread(target=lambda: lines.extend(server.stdout or []), daemon=True)
        reader.start()
        # a paced run (8 layers, one every 500 ms), killed once its first layer is on the wire
        victim = subprocess.Popen([sys.executable, "-m", "kvwire.bench", "-c", "127.0.0.1", "-p", port, "--model",
                                   tiny_config, "--tokens", "3000", "--prefill-ms-per-layer", "500",
                                   "--json-stream", "-i", "0.1"], stdout=subprocess.PIPE, text=True, env=ENV)
        assert victim.stdout is not None
        assert json.loads(victim.stdout.readline())["event"] == "start"
        for _ in range(30):
            event = json.loads(victim.stdout.readline())
            assert event["event"] == "interval", "the run must still be going"
            if event["data"]["sum"]["bytes"] > 0:
                break
        else:
            pytest.fail("no data moved")
        victim.send_signal(signal.SIGKILL)
        victim.wait(10)
        ok = bench("-c", "127.0.0.1", "-p", port, "--model", tiny_config, "--tokens", "3000", "--requests",
                   "2", "-J", timeout=60)
        assert ok.returncode == 0, ok.stderr + ok.stdout
        assert json.loads(ok.stdout)["kv"]["verification"]["verified"]
        assert server.poll() is None, "the server is still up"
        time.sleep(0.2)
        assert any("ended before completing" in x for x in lines), lines
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
    assert server.returncode == 0


def _server_process(lines: list[str] | None = None) -> tuple[subprocess.Popen[str], str]:
    """``kvwire-bench -s`` on loopback in a process of its own, its port read off its banner and the rest of its
    output drained on a thread (the caller stops it). ``lines``: its stdout and stderr, line by line, are kept
    there (complete once it has exited)."""
    server = subprocess.Popen([sys.executable, "-m", "kvwire.bench", "-s", "-B", "127.0.0.1", "-p", "0",
                               "--data-port", "0"], stdout=subprocess.PIPE, text=True, env=ENV,
                              stderr=subprocess.STDOUT if lines is not None else None)
    assert server.stdout is not None
    kept = lines if lines is not None else []
    port = None
    for line in server.stdout:
        kept.append(line)
        m = re.search(r"Server listening on \S+ port (\d+)", line)
        if m:
            port = m.group(1)
            break
    if port is None:
        server.kill()
        server.wait()
        pytest.fail(f"the bench server printed no port: {kept}")
    threading.Thread(target=lambda: kept.extend(server.stdout or []), daemon=True).start()
    return server, port


@pytest.mark.parametrize("sig, reverse", [(signal.SIGTERM, False), (signal.SIGINT, False), (signal.SIGTERM, True)])
def test_a_server_stopped_mid_test_exits_at_once_and_its_client_hears_why(sig: signal.Signals, reverse: bool) -> None:
    """SIGTERM to ``kvwire-bench -s`` mid-test: it exited 5.3 s later, logging "ended mid-test: OSError: [Errno 9]
    Bad file descriptor" (serve() waited 5 s for the test's thread before close() closed the channel under its
    reader), and its client learnt only that the connection closed. Now the server wakes the test's reader,
    tells the client why and exits within 2 s with status 0 (as on Ctrl-C), logging no error; the client ends
    at once, its document giving the reason. The log lines the server must print show its output is read."""
    lines: list[str] = []
    server, port = _server_process(lines)
    client = None
    try:
        client = subprocess.Popen([sys.executable, "-m", "kvwire.bench", "-c", "127.0.0.1", "-p", port, "-l", "1M",
                                   "-t", "60", "--json-stream", "-i", "0.2", *(["-R"] if reverse else [])],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
        assert client.stdout is not None
        assert json.loads(client.stdout.readline())["event"] == "start"
        while True:  # mid-test: data moving
            event = json.loads(client.stdout.readline())
            if event["event"] == "interval" and event["data"]["sum"]["bytes"] > 0:
                break
        t0 = time.monotonic()
        server.send_signal(sig)
        try:
            rc = server.wait(20)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the server did not exit within 20 s of {sig.name}")
        took = time.monotonic() - t0
        out, err = client.communicate(timeout=30)
        client_took = time.monotonic() - t0
    finally:
        for proc in (client, server):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
    time.sleep(0.2)  # the drain thread reads the last lines
    log = "".join(lines)
    print(f"\nserver exited {took:.2f} s after {sig.name} (rc {rc}); its client {client_took:.2f} s after\n{log}")
    assert took < 2.0, f"the server took {took:.1f} s to exit on {sig.name} mid-test"
    assert rc == 0, log
    assert "Accepted connection" in log and "ended before completing: the kvwire-bench server is shutting down" in log
    assert "Bad file descriptor" not in log and "Traceback" not in log and "Errno" not in log, log
    assert client.returncode == 1 and client_took < 10, (client.returncode, client_took, err)
    kv = next(json.loads(x)["data"] for x in out.splitlines() if x.strip() and json.loads(x)["event"] == "kv")
    assert not kv["verification"]["verified"]
    assert "the kvwire-bench server is shutting down" in kv["verification"]["session_error"], kv["verification"]


def test_client_with_its_server_frozen_ends_soon_and_keeps_per_request_states(tiny_config: str) -> None:
    """The server freezes mid-run (SIGSTOP: its connections stay up, nothing answers). The client's session
    fails after its peer timeout (10 s); before, it then waited 60 s more for a summary that never came
    (or, with the server killed, raised and printed no document). Now it gives up within seconds and its
    JSON still lists every request with its state."""
    server, port = _server_process()
    client = None
    try:
        client = subprocess.Popen([sys.executable, "-m", "kvwire.bench", "-c", "127.0.0.1", "-p", port, "--model",
                                   tiny_config, "--tokens", "3000", "--prefill-ms-per-layer", "300", "-P", "2",
                                   "--requests", "6", "--json-stream", "-i", "0.1"],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
        assert client.stdout is not None
        assert json.loads(client.stdout.readline())["event"] == "start"
        for _ in range(100):
            event = json.loads(client.stdout.readline())
            if event["event"] == "interval" and event["data"]["sum"]["bytes"] > 0:
                break
        else:
            pytest.fail("no data moved")
        server.send_signal(signal.SIGSTOP)
        t0 = time.monotonic()
        out, _ = client.communicate(timeout=60)
        took = time.monotonic() - t0
        print(f"client ended {took:.1f} s after the server froze (session peer timeout 10 s)")
        assert took < 10 + 20, f"client waited {took:.1f} s after the server froze"
        events = [json.loads(x) for x in out.splitlines() if x.strip()]
        kv = next(e["data"] for e in events if e["event"] == "kv")
        states = [(t["request_id"], t["transport_state"]) for t in kv["timeline"]]
        assert states and any(state == "failed" for _, state in states), states
        assert not kv["verification"]["verified"] and kv["verification"]["session_error"]
        assert client.returncode not in (0, None)
    finally:
        if client is not None and client.poll() is None:
            client.kill()
            client.wait()
        server.send_signal(signal.SIGCONT)
        server.kill()
        server.wait()


def test_tail_parity_is_sent_and_counted_in_the_document(tiny_config: str) -> None:
    """``--tail-parity 2``: the receiving side's counters come back in ``kv.tail_parity`` (parity verified
    or refused, chunks rebuilt), every byte still verified; without it the counters are zero."""
    pytest.importorskip("zfec")
    docs = {}
    for m in (2, 0):
        r = bench("--loopback", "--model", tiny_config, "--tokens", "60000", "--requests", "4", "-P", "4",
                  "--chunk-size", "64K", "--tail-parity", str(m), "-J")
        assert r.returncode == 0, bench_verdict(r)
        docs[m] = json.loads(r.stdout)["kv"]
    par, off = docs[2]["tail_parity"], docs[0]["tail_parity"]
    assert par["per_group"] == 2 and off["per_group"] == 0
    assert par["parity_chunks"] + par["chunks_rebuilt"] > 0 and par["parity_rejected"] == par["rebuilds_failed"] == 0
    assert off["parity_chunks"] == off["chunks_rebuilt"] == 0
    assert docs[2]["verification"]["verified"] and docs[0]["verification"]["verified"]
    bad = bench("--loopback", "--model", tiny_config, "--tail-parity", "9")
    assert bad.returncode != 0 and "--tail-parity" in bad.stderr


def test_a_client_worker_stops_waiting_for_a_frozen_server_s_checks() -> None:
    """A server stopped with SIGSTOP keeps its sockets open and answers nothing. A client worker waits for the
    server's check of its earlier requests before it starts another (the server holds concurrency + 1
    buffers); it waited for that up to --timeout (300 s), printing empty intervals far past -t (one run in four
    of a newcomer's). Now the wait ends once the session has failed (the receiver silent past the peer timeout)
    or -t ran out, and the worker starts nothing more. Negative control: checks that arrive let it go on."""
    import types

    from kvwire.bench.sending import _Runner

    class Ctl:
        error = None

        def __init__(self, arrive: bool) -> None:
            self.arrive = arrive

        def wait_until(self, ready: Any, timeout: float) -> bool:
            time.sleep(timeout if not self.arrive else 0)
            return self.arrive  # a frozen server: no result ever comes

    def runner(arrive: bool, failure_after: float | None, duration: float | None) -> tuple[bool, float]:
        r = object.__new__(_Runner)
        session = types.SimpleNamespace(failure="")
        r.o = types.SimpleNamespace(timeout=300.0, concurrency=2, duration=duration)  # type: ignore[assignment]
        r.ctl, r.session, r.t_start = Ctl(arrive), session, time.monotonic()  # type: ignore[assignment]
        if failure_after is not None:
            threading.Timer(failure_after, lambda: setattr(session, "failure", "receiver silent")).start()
        t0 = time.monotonic()
        return r._wait_for_room(), time.monotonic() - t0

    went_on, took = runner(arrive=False, failure_after=1.0, duration=None)
    assert not went_on and took < 3.5, took  # the session failed: stop (it waited 300 s)
    went_on, took = runner(arrive=False, failure_after=None, duration=1.0)
    assert not went_on and took < 3.5, took  # -t ran out
    assert runner(arrive=True, failure_after=None, duration=None)[0]  # negative control


def test_a_client_whose_server_froze_ends_instead_of_waiting_out_its_timeout() -> None:
    """A server stopped with SIGSTOP keeps its sockets open and answers nothing: a client worker that waited for
    the server's check of its earlier requests waited out --timeout (300 s), printing empty intervals far past
    -t. Now it stops starting requests once the session failed (the receiver silent past the peer timeout) or
    -t ran out, and the run ends with the failure. Negative control: the same client against a running server
    ends on time with rc 0."""
    server, port = _server_process()
    try:
        args = [sys.executable, "-m", "kvwire.bench", "-c", "127.0.0.1", "-p", port, "-l", "1M", "-t", "3",
                "--json-stream", "-i", "0.5"]
        t0 = time.monotonic()
        ok = subprocess.run(args, capture_output=True, text=True, env=ENV, timeout=60)
        assert ok.returncode == 0, ok.stderr  # negative control
        assert time.monotonic() - t0 < 20
        client = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
        assert client.stdout is not None
        assert json.loads(client.stdout.readline())["event"] == "start"
        while True:  # frozen mid-run, with requests in flight and checks outstanding
            event = json.loads(client.stdout.readline())
            if event["event"] == "interval" and event["data"]["sum"]["bytes"] > 0:
                break
        t0 = time.monotonic()
        server.send_signal(signal.SIGSTOP)
        try:
            out, err = client.communicate(timeout=45)
        except subprocess.TimeoutExpired:
            client.kill()
            client.communicate()
            pytest.fail("the client did not end within 45 s of its server freezing (-t 3, --timeout 300)")
        took = time.monotonic() - t0
        print(f"\nclient ended {took:.1f} s after its server froze, rc {client.returncode}")
        assert client.returncode != 0 and took < 45
    finally:
        server.send_signal(signal.SIGCONT)
        server.terminate()
        server.wait(15)
