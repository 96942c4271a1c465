"""kvwire-bench --adaptive / --polite / --probe: real loopback runs (server in a child process, as a user
runs it), the link view in every interval, the controller's history, the probe line, and the usage errors."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
from helpers import bench_verdict

from kvwire.bench import main
from kvwire.bench.sampler import Sampler
from kvwire.congestion.controller import Mode
from kvwire.congestion.estimator import LinkState
from kvwire.tcp import LaneInfo
from kvwire.testing.wan import unavailable_reason

ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}
_NETNS = unavailable_reason()
MODES = {m.value for m in Mode}
STATE_KEYS = {f for f in LinkState.__dataclass_fields__ if f != "lanes"}
LINK_KEYS = STATE_KEYS | {"mode", "lanes", "pacing", "congestion", "reason", "decisions"}


def bench(*args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kvwire.bench", *args], capture_output=True, text=True,
                          timeout=timeout, env=ENV)


def check_link(link: dict[str, Any], end: float, lanes: tuple[int, int] = (2, 16)) -> None:
    """One interval's ``link`` object: the LinkState fields (no per-lane list) and the controller's."""
    assert set(link) == LINK_KEYS
    assert link["mode"] in MODES
    assert link["capacity"] is None or link["capacity"] > 0
    assert link["utilization"] is None or link["utilization"] >= 0
    assert link["queueing_ratio"] is None or link["queueing_ratio"] >= 1.0
    assert 0.0 <= link["loss_rate"] <= 1.0 and 0.0 <= link["busy"] <= 1.0
    assert isinstance(link["congested"], bool) and isinstance(link["saturated"], bool)
    assert lanes[0] <= link["lanes"] <= lanes[1]
    assert link["pacing"] is None or link["pacing"] > 0
    assert link["decisions"] >= 0
    if link["timestamp"] is not None:  # seconds since the test started, taken before the interval closed
        assert 0.0 <= link["timestamp"] <= end + 1e-6


def check_history(lc: dict[str, Any]) -> None:
    history = lc["history"]
    assert lc["decisions"] == len(history) - 1 and history[0]["t"] is None
    assert all(h["mode"] in MODES for h in history) and lc["mode"] == history[-1]["mode"]
    times = [h["t"] for h in history[1:]]
    assert times == sorted(times) and all(t >= 0 for t in times)


def test_adaptive_json_has_the_link_view_in_every_interval_and_the_decision_history() -> None:
    r = bench("--loopback", "-t", "1", "-l", "4M", "-P", "2", "-i", "0.2", "--adaptive", "-J")
    assert r.returncode == 0, bench_verdict(r)
    doc = json.loads(r.stdout)
    assert doc["kv"]["verification"]["verified"] is True
    assert "probe" not in doc["start"]
    intervals = doc["intervals"]
    assert len(intervals) >= 4
    for rec in intervals:
        check_link(rec["link"], rec["sum"]["end"])
        assert rec["sum"]["bytes"] == sum(s["bytes"] for s in rec["streams"])  # iperf3 fields untouched
    seen = [rec["link"] for rec in intervals if rec["link"]["srtt"] is not None]
    assert seen, "the controller sampled the lanes during the test"
    assert all(x["queueing_ratio"] is not None and x["min_rtt"] > 0 for x in seen)
    assert sum(i["sum"]["bytes"] for i in intervals) == doc["end"]["sum_sent"]["bytes"]
    lc = doc["kv"]["link_control"]
    check_history(lc)
    assert (lc["polite"], lc["congestion"], lc["initial_lanes"], lc["capacity_seed"]) == (False, "bbr", 2, None)
    assert lc["history"][0]["mode"] == "probe", "no seed: the controller probes in band"
    assert sum(rec["link"]["decisions"] for rec in intervals) <= lc["decisions"]
    check_link(lc["last"] | {"decisions": 0}, doc["end"]["sum_sent"]["end"] + 1.0)
    assert doc["start"]["kvwire"]["congestion"] == "bbr"


def test_polite_json_stream_runs_the_controller_in_polite_mode() -> None:
    r = bench("--loopback", "-t", "0.6", "-l", "2M", "-P", "2", "-i", "0.2", "--polite", "--json-stream")
    assert r.returncode == 0, bench_verdict(r)
    events = [json.loads(line) for line in r.stdout.splitlines()]
    kinds = [e["event"] for e in events]
    assert kinds[0] == "start" and kinds[-2:] == ["end", "kv"]
    assert events[0]["data"]["link_control"]["polite"] is True
    intervals = [e["data"] for e in events if e["event"] == "interval"]
    assert intervals
    for rec in intervals:
        check_link(rec["link"], rec["sum"]["end"])
        assert rec["link"]["congestion"] == "cubic"
    kv = events[-1]["data"]
    assert kv["verification"]["verified"] is True
    lc = kv["link_control"]
    check_history(lc)
    assert (lc["polite"], lc["congestion"]) == (True, "cubic")


def test_probe_is_reported_seeds_the_controller_and_is_left_out_of_the_counts() -> None:
    r = bench("--loopback", "-n", "8M", "-l", "2M", "-P", "2", "-i", "0.1", "--probe", "0.3", "--adaptive", "-J")
    assert r.returncode == 0, bench_verdict(r)
    doc = json.loads(r.stdout)
    p, kv, end = doc["start"]["probe"], doc["kv"], doc["end"]
    assert p["capacity"] > 0 and p["bytes_sent"] > 0 and p["lanes"] == 2 and p["samples"] > 0
    assert 0.25 <= p["seconds"] < 2.0 and p["drained"] is True and p["congestion"] == "bbr"
    assert p["min_rtt"] is None or p["min_rtt"] > 0
    assert 0.0 <= p["loss_rate"] <= 1.0 and isinstance(p["saturated"], bool) and "states" not in p
    payload = kv["payload_bytes"]
    assert kv["verification"]["verified"] is True and payload == 8 * 2**20
    # the probe's bytes went over the same lanes before the test: none of them may show up in its counts
    assert sum(i["sum"]["bytes"] for i in doc["intervals"]) == end["sum_sent"]["bytes"] == payload
    chunks = sum(s["sender"]["chunks"] for s in end["streams"])
    assert chunks == kv["requests"] * kv["layout"]["num_layers"] == 4 * 8, "a 256 KiB layer is one chunk"
    assert payload < kv["wire_bytes"] < 1.05 * payload
    received = sum(s["receiver"]["bytes"] for s in end["streams"])
    assert payload <= received < 1.05 * payload
    lc = kv["link_control"]
    check_history(lc)
    if p["saturated"]:
        assert lc["capacity_seed"] == p["capacity"] and lc["history"][0]["mode"] == "cruise"
    else:  # a lower bound is no capacity to pace under: the controller probes in band
        assert lc["capacity_seed"] is None and lc["history"][0]["mode"] == "probe"
    for rec in doc["intervals"]:
        check_link(rec["link"], rec["sum"]["end"])


def test_warm_probes_every_lane_the_controller_may_use_and_leaves_them_out_of_the_counts() -> None:
    """--warm (kvwire.connect's warm-up for the bench's session): the burst runs on all 16 lanes the
    controller may grow to, though the test runs 2; the 14 lanes it opened carry only probe bytes, and
    none of them may show up in the test's counts (counted from zero: they were not there before it)."""
    r = bench("--loopback", "-n", "8M", "-l", "2M", "-P", "2", "-i", "0.1", "--warm", "-J")
    assert r.returncode == 0, bench_verdict(r)
    doc = json.loads(r.stdout)
    p, kv, end = doc["start"]["probe"], doc["kv"], doc["end"]
    assert p["lanes"] == 16 and p["bytes_sent"] > 0 and p["drained"] is True
    payload = kv["payload_bytes"]
    assert kv["verification"]["verified"] is True and payload == 8 * 2**20
    assert sum(i["sum"]["bytes"] for i in doc["intervals"]) == end["sum_sent"]["bytes"] == payload
    assert payload < kv["wire_bytes"] < 1.05 * payload
    received = sum(s["receiver"]["bytes"] for s in end["streams"])
    assert payload <= received < 1.05 * payload
    check_history(kv["link_control"])


def test_without_warm_nothing_is_probed() -> None:
    r = bench("--loopback", "-n", "4M", "-l", "2M", "-P", "2", "-J")
    assert r.returncode == 0, bench_verdict(r)
    assert "probe" not in json.loads(r.stdout)["start"]


def test_human_output_has_the_probe_line_a_link_line_per_interval_and_the_controller_summary() -> None:
    r = bench("--loopback", "-t", "0.6", "-l", "2M", "-P", "2", "-i", "0.2", "--adaptive", "--probe", "0.2")
    assert r.returncode == 0, bench_verdict(r)
    out = r.stdout
    probe = re.search(r"^probe: capacity [\d.]+ Gbit/s \((saturated|lower bound)\), min RTT ([\d.]+ ms|-), "
                      r"max queueing ratio .*, loss [\d.]+%, 2 lanes, .*not counted in the test\)$", out, re.M)
    assert probe, out
    sums = re.findall(r"^\[SUM\] +[\d.]+-[\d.]+ +sec .* lanes \d+/\d+$", out, re.M)
    links = re.findall(r"^\[LNK\] +[\d.]+-[\d.]+ +sec  capacity +\S+( \S+)?  util +\S+  queue +\S+  loss +\S+  "
                       r"(clear|CONGESTED) +(\w+) +lanes \d+  paced .*$", out, re.M)
    assert sums and len(links) == len(sums), out
    assert {m for *_, m in links} <= MODES
    assert out.index("probe: capacity") < out.index("[LNK]")
    assert re.search(r"^Link control   bbr, lanes 2\.\.16 from 2.*: \d+ decision\(s\), last mode \w+ with \d+ lanes",
                     out, re.M), out
    assert "Verification   OK" in out


def test_probe_alone_leaves_the_lanes_to_the_options() -> None:
    r = bench("--loopback", "-n", "4M", "-l", "2M", "-P", "2", "-C", "reno", "--probe", "0.2", "--no-adaptive", "-J")
    assert r.returncode == 0, bench_verdict(r)
    doc = json.loads(r.stdout)
    assert doc["start"]["probe"]["congestion"] == "reno", "-C is the probe's algorithm too"
    assert "link_control" not in doc["kv"] and all("link" not in rec for rec in doc["intervals"])
    assert doc["end"]["sender_tcp_congestion"] == "reno" and doc["kv"]["verification"]["verified"]


def test_reverse_runs_the_controller_and_the_probe_on_the_sending_server() -> None:
    r = bench("--loopback", "-R", "-n", "8M", "-l", "2M", "-P", "2", "-i", "0.1", "-C", "reno", "--adaptive",
              "--probe", "0.2", "-J")
    assert r.returncode == 0, bench_verdict(r)
    doc = json.loads(r.stdout)
    kv = doc["kv"]
    assert kv["direction"] == "reverse" and kv["verification"]["verified"] is True
    assert doc["start"]["probe"]["bytes_sent"] > 0
    lc = kv["link_control"]
    check_history(lc)
    assert lc["congestion"] == "reno" and lc["history"][0]["congestion"] == "reno"
    assert doc["intervals"] and all(rec["link"]["congestion"] == "reno" for rec in doc["intervals"])


@pytest.mark.parametrize(("args", "message"), [
    (["--loopback", "--adaptive", "--fq-rate", "1G"], "drop --fq-rate"),
    (["--loopback", "--polite", "--fq-rate", "1G"], "drop --fq-rate"),
    (["--loopback", "--probe", "0"], "--probe takes seconds"),
    (["--loopback", "--probe=-1"], "--probe takes seconds"),
    (["--loopback", "--probe", "61"], "--probe takes seconds"),
    (["--loopback", "--probe", "nan"], "--probe takes seconds"),
    (["-s", "--adaptive"], "client options"),
    (["-s", "--polite"], "client options"),
    (["-s", "--probe", "1"], "client options"),
    (["-s", "--warm"], "client options"),
    (["--loopback", "--warm", "--probe", "1"], "drop --probe"),
])
def test_refused_combinations_are_usage_errors(args: list[str], message: str,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_an_unknown_algorithm_with_adaptive_is_a_usage_error() -> None:
    bad = bench("--loopback", "-n", "1M", "--adaptive", "-C", "no-such-cc")
    assert bad.returncode == 2 and "no-such-cc" in bad.stderr and "not available" in bad.stderr


@pytest.mark.netns
@pytest.mark.skipif(_NETNS is not None, reason=_NETNS or "")
def test_over_an_emulated_bottleneck_the_probe_and_the_controller_find_its_rate() -> None:
    rate = 200e6 / 8  # bytes/s of the emulated link
    r = bench("--emulate", "rtt=20ms,rate=200mbit", "-t", "2", "-l", "2M", "-P", "2", "-i", "0.5",
              "--adaptive", "--probe", "0.5", "-J")
    assert r.returncode == 0, bench_verdict(r)
    doc = json.loads(r.stdout)
    p = doc["start"]["probe"]
    assert 0.5 * rate < p["capacity"] < 1.1 * rate and p["min_rtt"] >= 0.019
    assert doc["kv"]["verification"]["verified"] is True
    for rec in doc["intervals"]:
        check_link(rec["link"], rec["sum"]["end"])
        assert rec["link"]["min_rtt"] >= 0.019 and 0.5 * rate < rec["link"]["capacity"] < 1.2 * rate
    paced = [rec["link"]["pacing"] for rec in doc["intervals"] if rec["link"]["pacing"]]
    assert paced and all(x < 1.3 * rate for x in paced), "the lanes are paced near the bottleneck's rate"


@pytest.mark.netns
@pytest.mark.skipif(_NETNS is not None, reason=_NETNS or "")
def test_on_a_long_path_the_bench_warms_by_default_as_connect_does_and_no_warm_leaves_it_cold() -> None:
    """Without flags, ``kvwire-bench`` warms its session as ``kvwire.connect()`` does on a path of 15 ms or
    more (the probe until the pipe reads full, on every lane the controller may use, left out of the test's
    counts), and the controller starts paced at what it measured: an operator's ``kvwire-bench -c`` on a
    2 Gbit/s, 80 ms link moved a 32k-token cache at 1.22 Gbit/s cold and 1.69 warm. Negative controls:
    ``--no-warm`` on the same path probes nothing, and loopback (``test_without_warm_nothing_is_probed``)."""
    args = ("--emulate", "rtt=20ms,rate=200mbit", "-n", "16M", "-l", "2M", "-P", "2", "-i", "0.5", "-J")
    warm = json.loads(bench(*args).stdout)
    p = warm["start"]["probe"]
    assert p["lanes"] == 16 and p["bytes_sent"] > 0 and p["stopped_full"] is True and p["drained"] is True
    assert warm["kv"]["verification"]["verified"] is True
    assert warm["kv"]["link_control"]["history"][0]["mode"] == "cruise"  # paced from the first byte
    cold = bench(*args, "--no-warm")
    assert cold.returncode == 0, cold.stderr + cold.stdout
    doc = json.loads(cold.stdout)
    assert "probe" not in doc["start"] and doc["kv"]["verification"]["verified"] is True
    assert doc["kv"]["link_control"]["history"][0]["mode"] == "probe"
    assert bench("-s", "--no-warm").returncode != 0  # a client option, like --warm


# ---------------------------------------------------------------- the sampler's side of it


@pytest.fixture
def tcp_pair() -> Iterator[list[socket.socket]]:
    with socket.create_server(("127.0.0.1", 0)) as srv:
        socks = []
        for _ in range(2):
            c = socket.create_connection(srv.getsockname())
            socks += [c, srv.accept()[0]]
        yield socks
        for s in socks:
            s.close()


def test_sampler_takes_in_lanes_opened_during_the_test_and_adds_the_extra_keys(
        tcp_pair: list[socket.socket]) -> None:
    def lane(i: int, sock: socket.socket) -> SimpleNamespace:
        return SimpleNamespace(index=i, sock=sock, alive=True, bytes_sent=0, chunks_sent=0)

    def lane_info() -> list[LaneInfo]:  # what Session.lane_info() returns: a snapshot of every lane
        return [LaneInfo(x.index, x.sock, x.bytes_sent, x.chunks_sent, x.alive, True) for x in lanes]

    lanes = [lane(0, tcp_pair[0])]
    calls = []
    t0 = time.monotonic()
    sampler = Sampler(lane_info, 0.05, t0, extra=lambda end: calls.append(end) or {"link": {"n": len(calls)}})
    sampler.start()
    lanes[0].bytes_sent = 100
    lanes.append(lane(1, tcp_pair[2]))  # what Session.set_active_lanes does to the session's lanes
    lanes[1].bytes_sent, lanes[1].chunks_sent = 50, 1
    time.sleep(0.2)
    sampler.stop(time.monotonic())
    recs = sampler.intervals
    assert sum(r["sum"]["bytes"] for r in recs) == 150
    assert len(recs[-1]["streams"]) == 2 and [r["link"]["n"] for r in recs] == list(range(1, len(recs) + 1))
    assert calls == [r["sum"]["end"] for r in recs], "the hook is told each interval's end"
    totals = sampler.lane_totals()
    assert [(t["socket"], t["bytes"], t["chunks"]) for t in totals] == [(0, 100, 0), (1, 50, 1)]
    assert all(len(b) in (1, 2) for _, b in sampler.series) and len(sampler.series[-1][1]) == 2


def _lanes_of(socks: list[socket.socket]) -> tuple[list[SimpleNamespace], Any]:
    """Lanes whose counters a test advances by hand, and the ``Session.lane_info`` that snapshots them."""
    lanes = [SimpleNamespace(index=i, sock=s, alive=True, bytes_sent=0, chunks_sent=0) for i, s in enumerate(socks)]

    def lane_info() -> list[LaneInfo]:
        return [LaneInfo(x.index, x.sock, x.bytes_sent, x.chunks_sent, x.alive, True) for x in lanes]

    return lanes, lane_info


@pytest.mark.parametrize("late", [True, False])
def test_sampler_intervals_add_up_to_the_totals_when_a_send_is_counted_after_stop(
        tcp_pair: list[socket.socket], late: bool) -> None:
    """A lane counts a chunk once its send has returned (kvwire.tcp._txlanes: send_parts, then lane.sent), and the
    receiver may acknowledge the chunk first: the test ends, ``stop()`` closes the last interval, and only then
    does the count move. An --adaptive loopback run under CPU load summed its intervals one 512 KiB chunk
    short of ``end.sum_sent``: ``lane_totals()``, read seconds later, had the chunk. Here the counter moves
    between ``stop()`` and ``lane_totals()`` as that lane thread's did; the chunk now gets an interval of its
    own (streamed like the others), so the intervals add up to the totals. Negative control (``late`` False):
    with nothing counted after ``stop()`` no interval is added."""
    chunk = 512 * 1024
    lanes, lane_info = _lanes_of([tcp_pair[0], tcp_pair[2]])
    streamed: list[dict[str, Any]] = []
    sampler = Sampler(lane_info, 10.0, time.monotonic(), on_interval=streamed.append)  # only stop() closes one
    sampler.start()
    lanes[0].bytes_sent, lanes[0].chunks_sent = 3 * chunk, 3
    lanes[1].bytes_sent, lanes[1].chunks_sent = 2 * chunk, 2
    sampler.stop(time.monotonic())
    assert [r["sum"]["bytes"] for r in sampler.intervals] == [5 * chunk]
    if late:
        lanes[1].bytes_sent, lanes[1].chunks_sent = 3 * chunk, 3  # the lane thread's count, after the test's end
    totals = sampler.lane_totals()
    sent = sum(t["bytes"] for t in totals)
    assert sent == (6 if late else 5) * chunk
    assert sum(r["sum"]["bytes"] for r in sampler.intervals) == sent, "the intervals add up to the total sent"
    assert len(sampler.intervals) == (2 if late else 1)
    assert streamed == sampler.intervals, "a --json-stream reader sums the same intervals"
    if late:
        last = sampler.intervals[-1]
        assert [s["bytes"] for s in last["streams"]] == [0, chunk]
        assert last["sum"]["start"] == sampler.intervals[0]["sum"]["end"] < last["sum"]["end"]
    again = [(t["bytes"], t["chunks"]) for t in sampler.lane_totals()]
    assert again == [(t["bytes"], t["chunks"]) for t in totals] and len(sampler.intervals) == (2 if late else 1)
