"""Metrics: real transfers over loopback, scraped over real HTTP, parsed against the text format."""

from __future__ import annotations

import gc
import re
import threading
import urllib.error
import urllib.request

import numpy as np
import pytest
from helpers import payload, wait_until

from kvwire import Receiver, RequestSpec, connect, plan_segments
from kvwire.congestion.control import LinkControl
from kvwire.congestion.controller import ControllerConfig
from kvwire.errors import AuthenticationError
from kvwire.metrics import Metrics, escape
from kvwire.testing.faults import ChunkHook
from kvwire.testing.fixtures import load_fixture

SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{((?:[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\[\\"n])*",?)+)\})? '
                    r"(-?[0-9.e+-]+|NaN|[+-]Inf)$")
LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\\n]|\\[\\"n])*)"')

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    """Parse the exposition strictly: HELP then TYPE before each family's samples, one block a family."""
    out: Samples = {}
    seen: set[str] = set()
    family = None
    lines = text.splitlines()
    assert text.endswith("\n") or not text
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("# HELP "):
            family = line.split()[2]
            assert family not in seen, f"{family} twice"
            seen.add(family)
            kind = lines[i + 1].split()
            assert kind[:3] == ["#", "TYPE", family] and kind[3] in ("counter", "gauge"), lines[i + 1]
            assert (kind[3] == "counter") == family.endswith("_total")
            i += 2
            continue
        m = SAMPLE.match(line)
        assert m, f"bad sample line {line!r}"
        assert m.group(1) == family, f"{m.group(1)} outside its family block"
        labels = frozenset((k, v.replace('\\"', '"').replace("\\n", "\n").replace("\\\\", "\\"))
                           for k, v in LABEL.findall(m.group(2) or ""))
        out[(m.group(1), labels)] = float(m.group(3))
        i += 1
    return out


def scrape(url: str) -> Samples:
    with urllib.request.urlopen(url, timeout=5) as r:
        assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        return parse(r.read().decode())


def value(samples: Samples, metric: str, **labels: str) -> float:
    return samples[(metric, frozenset(labels.items()))]


def _request(rid: str) -> tuple:  # type: ignore[type-arg]
    layout = load_fixture("tiny-qwen3-next")
    req = RequestSpec(rid, 3000, 3000)
    src = payload(layout, req, seed=3)
    return layout, req, src, sum(s.nbytes for s in plan_segments(layout, req))


def test_a_transfer_is_counted_on_both_sides(no_leaks: None) -> None:
    layout, req, src, total = _request("m1")
    dst = np.zeros(total, np.uint8)
    metrics = Metrics()
    with Receiver(key="k") as rx, connect(*rx.address, key="k", lanes=3, chunk_size=64 * 1024) as s, \
            metrics.serve() as srv:
        metrics.watch(s, name="decode-1")
        metrics.watch(rx, name="rx")
        url = f"http://{srv.address[0]}:{srv.address[1]}/metrics"
        before = scrape(url)
        assert value(before, "kvwire_sent_bytes_total", peer="decode-1") == 0
        assert value(before, "kvwire_sender_lanes_alive", peer="decode-1") == 3
        h_rx = rx.expect("m1", dst)
        h = s.send(layout, req)
        h.write_all(src)
        h.finish().result(20)
        h_rx.result(20)
        after = scrape(url)
    assert value(after, "kvwire_sent_bytes_total", peer="decode-1") == total  # nothing re-sent here
    assert value(after, "kvwire_received_bytes_total", listen="rx") == total
    assert value(after, "kvwire_sent_transfers_total", peer="decode-1", state="done") == 1
    assert value(after, "kvwire_received_transfers_total", listen="rx", state="done") == 1
    assert value(after, "kvwire_received_transfers_total", listen="rx", state="failed") == 0
    assert value(after, "kvwire_sender_transfers_in_flight", peer="decode-1") == 0
    assert value(after, "kvwire_receiver_sessions", listen="rx") == 1
    assert value(after, "kvwire_receiver_lanes", listen="rx") == 3
    assert value(after, "kvwire_sent_chunks_total", peer="decode-1") == len(h.plan.lengths)


def test_corrupt_chunks_and_bad_keys_show_up(no_leaks: None) -> None:
    layout, req, src, total = _request("m2")
    dst = np.zeros(total, np.uint8)
    metrics = Metrics()
    with Receiver(key="k") as rx, connect(*rx.address, key="k", lanes=2, chunk_size=64 * 1024) as s:
        metrics.watch(s)
        metrics.watch(rx)
        flipped: list[int] = []

        def hook(lane: int, tid: int, chunk: int, pieces: list) -> list | None:  # type: ignore[type-arg]
            if chunk in (3, 9) and chunk not in flipped:
                flipped.append(chunk)
                bad = bytearray(pieces[0])
                bad[0] ^= 1
                return [memoryview(bad), *pieces[1:]]
            return None

        s.chunk_stage = ChunkHook(hook)
        h_rx = rx.expect("m2", dst)
        h = s.send(layout, req)
        h.write_all(src)
        h.finish().result(20)
        h_rx.result(20)
        for _ in range(2):
            with pytest.raises(AuthenticationError):
                connect(*rx.address, key="wrong")
        assert wait_until(lambda: rx.stats()["auth_failures"] == 2, 5)
        got = parse(metrics.render())
    peer = f"{s.address[0]}:{s.address[1]}"
    listen = f"{rx.address[0]}:{rx.address[1]}"
    assert value(got, "kvwire_nacked_chunks_total", peer=peer) == 2
    assert value(got, "kvwire_rejected_chunks_total", listen=listen) == 2
    assert value(got, "kvwire_sent_bytes_total", peer=peer) > total  # the two chunks went twice
    assert value(got, "kvwire_received_bytes_total", listen=listen) == total  # only verified bytes count
    assert value(got, "kvwire_auth_failures_total", listen=listen) == 2
    assert dst.tobytes() == b"".join(a.tobytes() for a in src)


def test_link_control_gauges_and_label_escaping(no_leaks: None) -> None:
    layout, req, src, total = _request("m3")
    metrics = Metrics()
    odd = 'dc2 "east"\\rack\n7'
    with Receiver() as rx, connect(*rx.address, lanes=2, chunk_size=64 * 1024) as s, \
            LinkControl(s, ControllerConfig(initial_lanes=2, min_lanes=1, max_lanes=4)) as ctl:
        metrics.watch(ctl, name=odd)
        assert wait_until(lambda: ctl.latest() is not None, 5)
        rx.expect("m3", np.zeros(total, np.uint8))
        h = s.send(layout, req)
        h.write_all(src)
        h.finish().result(20)
        got = parse(metrics.render())
    assert value(got, "kvwire_link_mode", link=odd, mode=ctl.decision.mode.value) == 1
    assert value(got, "kvwire_link_lanes", link=odd) == ctl.decision.lanes
    assert value(got, "kvwire_link_busy_ratio", link=odd) >= 0
    assert value(got, "kvwire_link_congested", link=odd) in (0, 1)
    # loopback never overflows a queue: no buffer learned, so nothing reads as a stall
    assert value(got, "kvwire_link_stalled", link=odd) == 0 and "kvwire_link_max_queue_seconds{" not in metrics.render()
    assert escape(odd) in metrics.render()


def test_dropped_objects_disappear_and_unknown_paths_are_404(no_leaks: None) -> None:
    metrics = Metrics()
    with pytest.raises(TypeError):
        metrics.watch(object())  # type: ignore[arg-type]
    with Receiver() as rx, metrics.serve() as srv:
        metrics.watch(rx, name="gone-soon")
        assert "gone-soon" in metrics.render()
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(f"http://{srv.address[0]}:{srv.address[1]}/nope", timeout=5)
        assert e.value.code == 404
        e.value.close()
    del rx
    gc.collect()
    assert metrics.render() == ""


def test_custom_gauges_render_and_a_failing_one_is_skipped() -> None:
    metrics = Metrics()
    depth = [3]
    metrics.gauge("engine_queue_depth", "Requests waiting.", lambda: depth[0])
    metrics.gauge("engine_pool_free_bytes", "Free pool bytes.", lambda: 1.5e9, pool="pinned")
    metrics.gauge("engine_pool_free_bytes", "Free pool bytes.", lambda: 1 / 0, pool="broken")
    metrics.gauge("engine_unknown", "Not known yet.", lambda: None)
    got = parse(metrics.render())
    assert value(got, "engine_queue_depth") == 3 and value(got, "engine_pool_free_bytes", pool="pinned") == 1.5e9
    assert not any(k[0] == "engine_unknown" or ("pool", "broken") in k[1] for k in got)
    depth[0] = 5
    assert value(parse(metrics.render()), "engine_queue_depth") == 5
    for bad in ("1abc", "x_total", "a-b"):
        with pytest.raises(ValueError):
            metrics.gauge(bad, "", lambda: 1)
    with pytest.raises(ValueError):
        metrics.gauge("ok", "", lambda: 1, **{"bad-label": "x"})


def test_a_removed_gauge_is_no_longer_rendered() -> None:
    metrics = Metrics()
    remove_pinned = metrics.gauge("engine_pool_free_bytes", "Free pool bytes.", lambda: 1.0, pool="pinned")
    remove_host = metrics.gauge("engine_pool_free_bytes", "Free pool bytes.", lambda: 2.0, pool="host")
    remove_pinned()
    remove_pinned()  # twice is harmless
    got = parse(metrics.render())
    assert value(got, "engine_pool_free_bytes", pool="host") == 2.0
    assert not any(("pool", "pinned") in k[1] for k in got)
    remove_host()
    assert "engine_pool_free_bytes" not in metrics.render()  # no HELP/TYPE left for an empty family


def test_a_counter_of_the_caller_s_own_joins_kvwire_s_family_once() -> None:
    """``Metrics.counter``: a count kept outside kvwire (a handshake of the caller's own) named like one of
    kvwire's counters renders in that family, under its one HELP/TYPE (the strict parser refuses a family
    twice); any other ``_total`` name is a family of its own. Names that are not counters, or are kvwire's
    gauges, are refused; ``remove()`` drops the sample."""
    metrics = Metrics()
    rx = Receiver("127.0.0.1", 0, key=b"k")
    try:
        metrics.watch(rx, name="data")
        failures = [0]
        remove = metrics.counter("kvwire_auth_failures_total", "ignored: the family has its help", lambda: failures[0],
                                 listen="control")
        metrics.counter("engine_retries_total", "Retries.", lambda: 7)
        failures[0] = 3
        text = metrics.render()
        got = parse(text)
        assert value(got, "kvwire_auth_failures_total", listen="data") == 0
        assert value(got, "kvwire_auth_failures_total", listen="control") == 3
        assert text.count("# TYPE kvwire_auth_failures_total counter\n") == 1
        assert value(got, "engine_retries_total") == 7 and "# TYPE engine_retries_total counter\n" in text
        for bad in ("engine_retries", "kvwire_receiver_lanes", "1_total"):
            with pytest.raises(ValueError):
                metrics.counter(bad, "", lambda: 1)
        remove()
        assert ("kvwire_auth_failures_total", frozenset({("listen", "control")})) not in parse(metrics.render())
    finally:
        rx.close()


def test_a_wrong_key_on_the_bench_control_port_is_an_auth_failure_in_the_scrape(
        capsys: pytest.CaptureFixture[str]) -> None:
    """``kvwire-bench -s --metrics-port``: a client with the wrong --key on the control port was refused and
    logged, but ``kvwire_auth_failures_total`` stayed 0 (only the data port's Receiver counted), so an operator
    watching the metric for attacks saw nothing. Now the control port's failures are in the same family,
    ``listen="kvwire-bench-control"``, beside the data port's ``listen="kvwire-bench"``. Negative controls: 0
    before, a right-key client counts nothing, and a wrong key on the data port is counted there, not here."""
    from kvwire.bench import main
    from kvwire.bench.server import BenchServer, ServerConfig

    server = BenchServer(ServerConfig(bind="127.0.0.1", port=0, data_port=0, key=b"right", metrics_port=0),
                         log=lambda _: None)
    t = threading.Thread(target=server.serve, daemon=True)
    t.start()
    try:
        assert server.metrics_server is not None
        url = "http://{}:{}/metrics".format(*server.metrics_server.address)
        port = str(server.address[1])

        def failures() -> tuple[float, float]:
            got = scrape(url)
            return (value(got, "kvwire_auth_failures_total", listen="kvwire-bench-control"),
                    value(got, "kvwire_auth_failures_total", listen="kvwire-bench"))

        assert failures() == (0, 0)
        assert main(["-c", "127.0.0.1", "-p", port, "-n", "1M", "--key", "wrong"]) == 3
        assert "failed authentication" in capsys.readouterr().err
        assert wait_until(lambda: failures() == (1, 0), 5), failures()
        assert main(["-c", "127.0.0.1", "-p", port, "-n", "1M", "-l", "1M", "--key", "right", "-J"]) == 0
        capsys.readouterr()
        with pytest.raises(AuthenticationError):
            connect(*server.data_address, key="wrong")
        assert wait_until(lambda: failures() == (1, 1), 5), failures()
    finally:
        server.close()
        t.join(5)
    assert not t.is_alive()
