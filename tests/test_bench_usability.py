"""What a newcomer meets first in the command-line tools: consistent defaults, iperf3's meanings (--version,
-v, --connect-timeout in ms), no long silences, a warning before an open server, a readable plot, honest
summaries (SKIP is not PASS) and --help that documents every flag. Real processes and sockets throughout.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import bench_verdict

from kvwire import __version__
from kvwire.bench import main
from kvwire.bench.errors import EXIT_UNREACHABLE
from kvwire.bench.options import build_parser, options_from_args, parse_connect_timeout

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}


def bench(*args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kvwire.bench", *args], capture_output=True, text=True,
                          timeout=timeout, env=ENV)


def opts(*argv: str) -> Any:
    return options_from_args(build_parser().parse_args(list(argv)))


@pytest.fixture
def mute_server() -> Iterator[int]:
    """A TCP port that accepts connections and never says a word."""
    srv = socket.create_server(("127.0.0.1", 0), backlog=16)
    try:
        yield srv.getsockname()[1]
    finally:
        srv.close()


# ---------------------------------------------------------------- defaults


def test_raw_mode_concurrency_does_not_depend_on_whether_t_was_typed() -> None:
    assert opts("-c", "h").concurrency == opts("-c", "h", "-t", "10").concurrency == \
        opts("-c", "h", "-n", "1G").concurrency == opts("-c", "h", "--requests", "3").concurrency == 2
    assert opts("-c", "h").duration == 10.0  # iperf3's default amount
    assert opts("-c", "h", "--model", "qwen3-next-80b-a3b").concurrency == 1
    assert opts("-c", "h", "-t", "5", "--concurrency", "3").concurrency == 3


# ---------------------------------------------------------------- --version and -v


def test_version_and_a_lone_v_print_the_version_like_iperf3() -> None:
    for flag in ("--version", "-v"):
        r = bench(flag, timeout=60)
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip() == f"kvwire-bench {__version__} (kvwire {__version__})"


def test_v_with_a_test_is_verbose_and_says_it_is_deprecated(capsys: pytest.CaptureFixture[str]) -> None:
    assert opts("-c", "h", "-v").verbose and opts("-c", "h", "--verbose").verbose
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()
    assert main(["-c", "127.0.0.1", "-p", str(port), "-v"]) == EXIT_UNREACHABLE
    err = capsys.readouterr().err
    assert "-v means --verbose here" in err and "--version" in err


# ---------------------------------------------------------------- --connect-timeout


def test_connect_timeout_is_milliseconds_like_iperf3_with_units_accepted() -> None:
    assert parse_connect_timeout("1500") == 1.5
    assert parse_connect_timeout("250ms") == 0.25
    assert parse_connect_timeout("2s") == 2.0 and parse_connect_timeout("0.5s") == 0.5
    for old_style in ("3", "1.5", "0"):  # seconds, as earlier builds took them: refused with the fix
        with pytest.raises(argparse.ArgumentTypeError, match="milliseconds"):
            parse_connect_timeout(old_style)
    with pytest.raises(argparse.ArgumentTypeError):
        parse_connect_timeout("soon")
    r = bench("-c", "127.0.0.1", "--connect-timeout", "3", timeout=60)
    assert r.returncode == 2 and "write 3000 or 3s" in r.stderr


def test_connect_timeout_in_ms_bounds_a_mute_server(mute_server: int) -> None:
    """300 (ms) against a server that never answers: the client gives up in well under a second plus start-up
    (read as seconds, as before, it would wait five minutes)."""
    t0 = time.monotonic()
    r = bench("-c", "127.0.0.1", "-p", str(mute_server), "--connect-timeout", "300", timeout=60)
    assert r.returncode == EXIT_UNREACHABLE, r.stderr
    assert time.monotonic() - t0 < 30


# ---------------------------------------------------------------- set-up progress


def test_setup_prints_progress_before_the_test_starts(tiny_config: str) -> None:
    r = bench("--loopback", "--model", tiny_config, "--tokens", "2000", "-i", "0")
    assert r.returncode == 0, bench_verdict(r)
    lines = r.stdout.splitlines()
    first_test_line = next(i for i, x in enumerate(lines) if x.startswith("Connecting to host"))
    setup = [x for x in lines[:first_test_line] if x.startswith("Setting up:")]
    assert any("loopback server" in x for x in setup), lines[:first_test_line]
    assert any("the server prepares" in x for x in setup) and any("payloads ready in" in x for x in setup), setup
    rev = bench("--loopback", "-R", "--model", tiny_config, "--tokens", "2000", "-i", "0")
    assert rev.returncode == 0, rev.stderr + rev.stdout
    lines = rev.stdout.splitlines()
    first_test_line = next(i for i, x in enumerate(lines) if x.startswith("Connecting to host"))
    assert any("connects back to port" in x for x in lines[:first_test_line]), lines[:first_test_line]
    js = bench("--loopback", "--model", tiny_config, "--tokens", "2000", "-J")
    assert js.returncode == 0 and json.loads(js.stdout)["kv"]["verification"]["verified"]  # -J stays pure JSON


# ---------------------------------------------------------------- the open-server warning


def _server_stderr(*args: str) -> str:
    p = subprocess.Popen([sys.executable, "-m", "kvwire.bench", "-s", "-p", "0", "--data-port", "0", *args],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    try:
        assert p.stdout is not None
        for _ in range(5):
            if "Server listening" in p.stdout.readline():
                break
        p.terminate()
        _, err = p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    return err


def test_server_without_a_key_on_all_interfaces_warns() -> None:
    err = _server_stderr()  # the defaults: -B 0.0.0.0, no key, a 16 GiB pool
    assert "warning: listening on 0.0.0.0" in err and "without --key" in err and "16.0 GiB" in err, err
    assert "warning" not in _server_stderr("--key", "k")
    assert "warning" not in _server_stderr("-B", "127.0.0.1")


# ---------------------------------------------------------------- the plot


def test_plot_stacks_lanes_and_traces_capacity_and_pacing(tmp_path: Path) -> None:
    """A real adaptive loopback run: its lanes stack up to the sum (no lane hidden behind it), and the link
    controller's estimates (bottleneck bandwidth; capacity and pacing when it has them) are traced."""
    pytest.importorskip("matplotlib")
    from kvwire.bench.plot import throughput_traces, write_plot

    r = bench("--loopback", "-t", "2", "-l", "8M", "-P", "3", "--adaptive", "-i", "0.2", "-J", timeout=180)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    series: list[tuple[float, list[int]]] = []
    for rec in doc["intervals"]:  # cumulative bytes per lane at each interval edge: the sampler's series
        prev = series[-1][1] if series else [0] * len(rec["streams"])
        prev = prev + [0] * (len(rec["streams"]) - len(prev))
        series.append((rec["sum"]["end"], [a + s["bytes"] for a, s in zip(prev, rec["streams"])]))
    series.insert(0, (doc["intervals"][0]["sum"]["start"], [0] * len(series[0][1])))
    tr = throughput_traces(doc, series)
    assert len(tr["lanes"]) == len(series[-1][1]) >= 1
    for i, total in enumerate(tr["sum"]):
        assert total == pytest.approx(sum(lane[i] for lane in tr["lanes"]))
    links = [rec["link"] for rec in doc["intervals"] if rec.get("link")]
    assert links and len(tr["btl_bw"]) == sum(1 for x in links if (x.get("btl_bw") or 0) > 0) >= 1
    assert len(tr["capacity"]) == sum(1 for x in links if (x.get("capacity") or 0) > 0)  # None on loopback, mostly
    assert len(tr["pacing"]) == sum(1 for x in links if (x.get("pacing") or 0) > 0)
    png = tmp_path / "wan.png"
    write_plot(str(png), doc, series)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_draws_fixed_limits_from_the_document() -> None:
    from kvwire.bench.plot import throughput_traces

    doc = {"start": {"emulated_link": {"rate_mbit": 400.0}, "fq_rate": 100_000_000}, "intervals": []}
    series = [(0.0, [0, 0]), (1.0, [50_000_000, 25_000_000])]
    tr = throughput_traces(doc, series)
    assert tr["lanes"] == [[0.4], [0.2]] and tr["sum"] == [pytest.approx(0.6)]
    assert [v for v, _ in tr["limits"]] == [0.4, 0.2]  # 400 Mbit/s link; 100 Mbit/s x 2 lanes


# ---------------------------------------------------------------- gpu_check's summary


def test_gpu_check_records_a_skipped_section_as_skip() -> None:
    pytest.importorskip("torch")
    spec = importlib.util.spec_from_file_location("gpu_check_under_test", ROOT / "benchmarks" / "gpu_check.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)

    def no_device() -> None:
        raise mod.Skipped("no CUDA device")

    mod.run_section("8 pytest tests/test_staging_gpu.py", time.monotonic() + 60, no_device)
    mod.run_section("9 fine", time.monotonic() + 60, lambda: None)
    assert mod.SECTIONS[-2] == ("8 pytest tests/test_staging_gpu.py", "SKIP", "no CUDA device")
    assert mod.SECTIONS[-1][:2] == ("9 fine", "PASS")


# ---------------------------------------------------------------- --help


def _undocumented(parser: argparse.ArgumentParser) -> list[str]:
    return [a.option_strings[0] for a in parser._actions
            if a.option_strings and a.help is not argparse.SUPPRESS and not (a.help or "").strip()]


def test_prfaas_demo_help_documents_every_flag() -> None:
    from kvwire.prfaas.demo import build_parser as demo_parser

    assert not _undocumented(demo_parser())
    r = subprocess.run([sys.executable, "-m", "kvwire.prfaas.demo", "--help"], capture_output=True, text=True,
                       timeout=60, env=ENV)
    assert r.returncode == 0
    for flag in ("--requests", "--layout", "--layers", "--token-scale", "--time-scale", "--load", "--egress-mbps",
                 "--congest", "--seed"):
        assert flag in r.stdout
    bad = subprocess.run([sys.executable, "-m", "kvwire.prfaas.demo", "--congest", "2:1"], capture_output=True,
                         text=True, timeout=60, env=ENV)
    assert bad.returncode == 2 and "START < END" in bad.stderr


def test_bench_help_documents_every_flag() -> None:
    assert not _undocumented(build_parser())


# ---------------------------------------------------------------- server memory across -R tests


def _rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(x.split()[1]) for x in f if x.startswith("VmRSS")) / 1024


def test_server_rss_stays_flat_across_reverse_tests() -> None:
    """With -R the server sends: each test fills ~140 MB of payload. Those buffers must go when the test
    ends, not linger until a garbage collection: the server's RSS after the fourth test stays within one
    payload of its RSS after the first. Before the sender stopped resolving a handle's future with the
    handle itself (a reference cycle that kept the payload until a garbage collection), the server grew
    180 -> 180 -> 314 -> 448 MiB over such tests; now 46 -> 50 MiB."""
    p = subprocess.Popen([sys.executable, "-m", "kvwire.bench", "-s", "-B", "127.0.0.1", "-p", "0", "--key", "k"],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV)
    try:
        assert p.stdout is not None
        port = None
        for _ in range(5):
            line = p.stdout.readline()
            if "Server listening" in line:
                port = line.split(" port ")[1].split()[0]
                break
        assert port is not None
        rss = []
        for _ in range(4):
            r = bench("-c", "127.0.0.1", "-p", port, "--key", "k", "-R", "--model", "qwen3-next-80b-a3b",
                      "--tokens", "4096", "--requests", "3", "-i", "0", timeout=180)
            assert r.returncode == 0, bench_verdict(r)
            time.sleep(0.3)
            rss.append(_rss_mib(p.pid))
        assert max(rss[1:]) - rss[0] < 70, rss  # one payload is ~134 MiB
    finally:
        p.terminate()
        p.wait(30)


@pytest.mark.parametrize(("argv", "message"), [
    (["-c", "h", "-p", "70000"], "-p must be in 0..65535"),  # the socket layer wrapped it to 4464
    (["-s", "--data-port", "70000"], "--data-port must be in 0..65535"),
    (["-s", "--metrics-port", "70000"], "--metrics-port must be in 0..65535"),
    (["-s", "-p", "65535"], "no data port above it"),
    (["-c", "h", "-t", "nan"], "-t must be a positive, finite"),  # NaN passed "<= 0" and ran forever
    (["-c", "h", "-t", "inf"], "-t must be a positive, finite"),
    (["-c", "h", "--timeout", "0"], "--timeout must be a positive, finite"),
    (["-c", "h", "--timeout", "1e400"], "--timeout must be a positive, finite"),
    (["-s", "--pool-bytes", "0"], "--pool-bytes must be positive"),
])
def test_out_of_range_ports_durations_and_pools_are_usage_errors(argv: list[str], message: str) -> None:
    """Each ran (a wrapped port, a test with no end) or failed with a traceback and rc 1; a usage error (rc 2)
    names the flag. Negative control: the same flags at ordinary values parse."""
    from kvwire.bench.errors import UsageError

    with pytest.raises(UsageError, match=message):
        opts(*argv)
    assert opts("-c", "h", "-p", "65534", "-t", "2", "--timeout", "30").port == 65534
    assert opts("-s", "--data-port", "65535", "--metrics-port", "9100", "--pool-bytes", "1M").data_port == 65535


@pytest.mark.parametrize("interval", ["0.0001", "1e-9", "0.019", "nan", "inf", "-1"])
def test_an_interval_too_short_to_sample_is_a_usage_error(interval: str, capsys: pytest.CaptureFixture[str]) -> None:
    """``-i 1e-9`` made the sampler thread spin (fine period = the interval): a ``-t 2`` loopback run took 17 s at
    0.08 Gbit/s, and ``-i 0.0001`` printed 3098 intervals in 2 s. Now -i is 0 (off) or at least MIN_INTERVAL
    (the sampler's own 20 ms reading period; iperf3's floor is 0.1 s), a usage error naming the flag from the
    command line (rc 2) and from Options built in code (``check``, which the -R server runs on a client's
    options too). Negative control: 0, the floor and the values the tests here use pass."""
    from kvwire.bench.errors import UsageError
    from kvwire.bench.options import MIN_INTERVAL, Options, check

    with pytest.raises(SystemExit) as e:
        main(["-c", "127.0.0.1", "-t", "1", f"--interval={interval}"])
    assert e.value.code == 2
    assert "-i must be 0 (no interval reports) or a finite number of seconds >= 0.02" in capsys.readouterr().err
    with pytest.raises(UsageError, match="^-i must be"):
        check(Options(mode="client", host="h", duration=1.0, interval=float(interval)))
    for ok in ("0", str(MIN_INTERVAL), "0.05", "1", "60"):
        assert opts("-c", "h", "-t", "1", "-i", ok).interval == float(ok)
        check(Options(mode="client", host="h", duration=1.0, interval=float(ok)))


def test_the_metrics_exporter_refuses_a_port_out_of_range() -> None:
    from kvwire.metrics import Metrics

    with pytest.raises(ValueError, match="0..65535"):
        Metrics().serve("127.0.0.1", 70000)  # it bound 4464
    server = Metrics().serve("127.0.0.1", 0)  # negative control
    server.close()


def test_tls_files_that_cannot_be_loaded_are_usage_errors(tmp_path: Path) -> None:
    """A missing or non-PEM --tls-* file was a FileNotFoundError traceback (rc 1)."""
    from kvwire.bench.errors import UsageError
    from kvwire.bench.options import client_ssl_context, server_ssl_context

    bad = tmp_path / "not.pem"
    bad.write_text("not a certificate")
    for path in ("/nonexistent.pem", str(bad)):
        with pytest.raises(UsageError, match="--tls-cert"):
            server_ssl_context(opts("-s", "--tls-cert", path, "--tls-key", path))
        with pytest.raises(UsageError, match="--tls-ca"):
            client_ssl_context(opts("-c", "h", "--tls-ca", path))
    assert client_ssl_context(opts("-c", "h")) is None  # negative control: no TLS asked, none built
