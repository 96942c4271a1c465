"""Sink transfers and the active capacity probe, on real sockets and threads: the manifest flag, the
receiver's refusals, a probe against a real receiver that delivers and allocates nothing, real transfers
around a probe, and the lane settings the probe must put back."""

from __future__ import annotations

import json
import math
import socket
import sys
import threading
import time
import tracemalloc
from dataclasses import replace
from typing import Any

import msgpack
import numpy as np
import pytest
from helpers import burst_sample, payload, wait_until

from kvwire import KvwireError, Receiver, RequestSpec, Session, State, TransferFailed, connect, plan_segments
from kvwire.codec import frames as F
from kvwire.codec.layout import CacheSpec, LayerSpec, ModelLayout, TensorSpec
from kvwire.codec.manifest import HASH_NONE, build_manifest, parse_manifest
from kvwire.codec.probe import (
    PROBE_MAX_LAYERS,
    PROBE_SEGMENT,
    SINK_MAX_SEGMENT,
    probe_layers,
    probe_layout,
    probe_request,
    sink_refusal,
)
from kvwire.congestion.estimator import EstimatorConfig, LinkEstimator, LinkState
from kvwire.congestion.tcpinfo import TcpInfo
from kvwire.errors import ProbeRefused, ProtocolError
from kvwire.probe import ProbeResult, burst_capacity, probe
from kvwire.sockopts import (
    available_congestion_algorithms,
    get_congestion,
    get_pacing_rate,
    set_congestion,
    set_pacing_rate,
)
from kvwire.testing.fixtures import load_fixture

MiB = 1 << 20
SECONDS = 0.4


def _wire(d: dict[str, Any]) -> dict[str, Any]:
    return msgpack.unpackb(msgpack.packb(d, use_bin_type=True), raw=False)


# ---------------------------------------------------------------- codec


def test_sink_manifest_round_trip_and_old_manifests_stay_valid() -> None:
    layout = probe_layout(3)
    sink = build_manifest(9, layout, probe_request("p"), MiB, hashed=False, sink=True)
    d = sink.to_wire(with_layout=True)
    assert d["sink"] is True
    got = parse_manifest(_wire(d))
    assert got.sink and got.hash == HASH_NONE and got.total_bytes == 3 * PROBE_SEGMENT
    plain = build_manifest(10, layout, probe_request("p"), MiB)
    assert "sink" not in plain.to_wire(with_layout=True)  # absent means False: old peers parse it as before
    assert parse_manifest(_wire(plain.to_wire(with_layout=True))).sink is False
    assert parse_manifest(_wire({**plain.to_wire(with_layout=True), "sink": False})).sink is False


@pytest.mark.parametrize("bad", [1, 0, "true", None, [], 1.0])
def test_parse_refuses_a_sink_flag_that_is_not_a_bool(bad: Any) -> None:
    d = build_manifest(9, probe_layout(1), probe_request("p"), MiB, hashed=False, sink=True).to_wire(True)
    d["sink"] = bad
    with pytest.raises(ProtocolError, match="sink"):
        parse_manifest(_wire(d))


def test_probe_layout_is_one_request_indexed_segment_per_layer() -> None:
    layout = probe_layout(5)
    assert layout.name == "kvwire-probe" and layout.num_layers == 5
    assert probe_layout(5) is layout  # cached: one fingerprint, so the layout is sent once per session
    segs = plan_segments(layout, probe_request("p"))
    assert [(s.layer, s.nbytes) for s in segs] == [(i, PROBE_SEGMENT) for i in range(5)]
    assert all(c.indexing == "request" for layer in layout.layers for c in layer.caches)
    assert probe_layers(0) == probe_layers(PROBE_SEGMENT - 1) == 0
    assert probe_layers(10 * PROBE_SEGMENT + 1) == 10 and probe_layers(1 << 50) == PROBE_MAX_LAYERS
    with pytest.raises(ValueError):
        probe_layout(0)


def test_sink_refusal_rules() -> None:
    layout = probe_layout(2)
    ok = build_manifest(1, layout, probe_request("p"), MiB, hashed=False, sink=True)
    assert sink_refusal(ok, 2 * PROBE_SEGMENT) == ""
    assert "no probes" in sink_refusal(ok, 0)
    assert "exceeds" in sink_refusal(ok, 2 * PROBE_SEGMENT - 1)
    hashed = build_manifest(1, layout, probe_request("p"), MiB, hashed=True, sink=True)
    assert "unhashed" in sink_refusal(hashed, 1 << 40)
    assert sink_refusal(build_manifest(1, layout, probe_request("p"), MiB), 1 << 40)  # not a sink
    big = build_manifest(1, _one_state_layer(SINK_MAX_SEGMENT + 1), probe_request("p"), MiB, hashed=False, sink=True)
    assert "more than" in sink_refusal(big, 1 << 40)


def _one_state_layer(nbytes: int) -> ModelLayout:
    t = TensorSpec("s", (nbytes,), "uint8", "ssm:HVK", "request")
    return ModelLayout("big-state", (LayerSpec(0, (CacheSpec("gdn", (t,)),)),))


# ---------------------------------------------------------------- receiver refusals


class _Counting:
    """An allocator that records every call (a sink must never reach it)."""

    def __init__(self) -> None:
        self.calls: list[int] = []

    def __call__(self, m: Any) -> np.ndarray:
        self.calls.append(m.total_bytes)
        return np.zeros(m.total_bytes, np.uint8)


@pytest.mark.parametrize("case", ["probes-off", "over-the-bound", "segment-too-big"])
def test_receiver_refuses_sinks_it_does_not_allow(case: str, no_leaks: None) -> None:
    alloc = _Counting()
    max_probe = {"probes-off": 0, "over-the-bound": 2 * PROBE_SEGMENT, "segment-too-big": 1 << 30}[case]
    layout = _one_state_layer(SINK_MAX_SEGMENT * 2) if case == "segment-too-big" else probe_layout(3)
    match = {"probes-off": "accepts no probes", "over-the-bound": "exceeds the receiver's",
             "segment-too-big": "more than"}[case]
    with Receiver(allocator=alloc, max_probe_bytes=max_probe) as rx, connect(*rx.address, lanes=2) as s:
        h = s.send(layout, probe_request("refused"), sink=True)
        with pytest.raises(TransferFailed, match=f"rejected.*{match}"):
            h.result(10)
        assert h.state is State.FAILED
        if case == "probes-off":
            with pytest.raises(ProbeRefused, match="max_probe_bytes=0"):
                probe(s, seconds=SECONDS)
    assert alloc.calls == []


def test_receiver_refuses_a_hashed_sink(no_leaks: None) -> None:
    from kvwire.tcp import Channel, client_handshake

    alloc = _Counting()
    with Receiver(allocator=alloc) as rx, socket.create_connection(rx.address) as raw:
        ch = Channel(raw, F.DEFAULT_LIMITS)
        _, limits = client_handshake(ch, b"", 1)
        assert limits["max_probe_bytes"] == rx.max_probe_bytes
        m = build_manifest(7, probe_layout(1), probe_request("hashed"), MiB, hashed=True, sink=True)
        ch.send(F.BEGIN, m.to_wire(with_layout=True))
        kind, body = ch.read_control()
        while kind == F.HEARTBEAT:
            kind, body = ch.read_control()
        assert kind == F.REJECT and body["tid"] == 7 and "unhashed" in body["reason"]
    assert alloc.calls == []


def test_sender_refuses_a_sink_to_a_receiver_without_probe_support(no_leaks: None) -> None:
    with Receiver() as rx, connect(*rx.address, lanes=1) as s:
        del s.server_limits["max_probe_bytes"]  # what an older receiver announces
        with pytest.raises(KvwireError, match="does not support sink"):
            s.send(probe_layout(1), probe_request("old"), sink=True)
        with pytest.raises(ProbeRefused, match="does not support probes"):
            probe(s, seconds=SECONDS)


# ---------------------------------------------------------------- probes


def test_probe_measures_and_the_receiver_delivers_and_allocates_nothing(no_leaks: None) -> None:
    alloc = _Counting()
    delivered: list[Any] = []
    with Receiver(allocator=alloc, on_transfer=delivered.append) as rx, connect(*rx.address, lanes=4) as s:
        tracemalloc.start()
        try:
            tracemalloc.reset_peak()
            base = tracemalloc.get_traced_memory()[0]
            r = probe(s, seconds=SECONDS)
            peak = tracemalloc.get_traced_memory()[1] - base
        finally:
            tracemalloc.stop()
        assert isinstance(r, ProbeResult)
        assert r.capacity > 0 and r.bytes_sent > 0 and r.min_rtt is not None and r.min_rtt > 0
        assert r.lanes == 4 and r.states and 0 <= r.loss_rate <= 1
        # the burst ran its whole budget and then ended: the upper bound is wide because a loaded 2-core CI
        # machine once stalled the burst's loop half a second past it (0.905 s for 0.4); what it catches is
        # a burst that ignores ``seconds`` (the 1 s default, or never ending), not scheduling noise
        assert SECONDS <= r.seconds < SECONDS + 2.0
        assert r.drained and r.congestion is not None
        # each sink announces 1 GiB: one allocation for it (either side) would be seen here
        assert peak < 48 * MiB, f"probe peak allocation {peak / MiB:.1f} MiB"
        with pytest.raises(KvwireError, match="on_transfer"):
            rx.next_transfer(timeout=0.2)  # handles go to on_transfer: next_transfer says so at once
        assert alloc.calls == [] and delivered == []
        # no sink is left behind on the receiver: every one ended (done or cancelled)
        assert wait_until(lambda: all(not x.transfers for x in rx.live_sessions()), 5)
        json.dumps(r.to_dict())  # plain data
        assert r.to_dict()["capacity"] == r.capacity and len(r.to_dict()["states"]) == len(r.states)  # type: ignore


def test_real_transfers_during_and_after_a_probe_arrive_bit_exact(no_leaks: None) -> None:
    layout = load_fixture("tiny-qwen3-next")
    reqs = [RequestSpec(f"real-{i}", 3000, 3000) for i in range(2)]
    srcs = [payload(layout, r, seed=i) for i, r in enumerate(reqs)]
    dsts = [np.zeros(sum(a.nbytes for a in src), np.uint8) for src in srcs]
    errors: list[BaseException] = []
    with Receiver() as rx, connect(*rx.address, lanes=3) as s:
        handles_rx = [rx.expect(r.request_id, d, layout=layout) for r, d in zip(reqs, dsts)]

        def during() -> None:
            try:
                time.sleep(SECONDS / 4)
                h = s.send(layout, reqs[0])
                h.write_all(srcs[0])
                h.finish().result(20)
            except BaseException as e:  # noqa: BLE001
                errors.append(e)

        t = threading.Thread(target=during)
        t.start()
        r = probe(s, seconds=SECONDS)
        t.join(30)
        assert not errors, errors
        h = s.send(layout, reqs[1])
        h.write_all(srcs[1])
        h.finish().result(20)
        for h_rx in handles_rx:
            h_rx.result(10)
        assert r.bytes_sent > 0
    for src, dst in zip(srcs, dsts):
        assert dst.tobytes() == b"".join(a.tobytes() for a in src)


def test_probe_by_address_opens_and_closes_its_own_session(no_leaks: None) -> None:
    # a receiver taking only 64 MiB probes: the sinks are sized to fit (a 1 GiB one would be rejected)
    with Receiver(key="k", max_probe_bytes=64 * MiB) as rx:
        r = probe(rx.address, seconds=SECONDS, lanes=2, key="k")
        assert r.lanes == 2 and r.capacity > 0 and r.bytes_sent > 0
        assert wait_until(lambda: rx.sessions == 0, 5)


def _record_pacing(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int | None]]:
    """Every ``SO_MAX_PACING_RATE`` the probe sets, as (fd, rate), in order; the calls still go through."""
    kp = sys.modules["kvwire.probe"]  # (the module: ``kvwire.probe`` the attribute is its function)
    caps: list[tuple[int, int | None]] = []
    real = kp.set_pacing_rate

    def recording(sock: socket.socket, rate: int | None) -> None:
        caps.append((sock.fileno(), rate))
        real(sock, rate)

    monkeypatch.setattr(kp, "set_pacing_rate", recording)
    return caps


def test_probe_restores_pacing_congestion_and_lane_count(no_leaks: None, monkeypatch: pytest.MonkeyPatch) -> None:
    algos = available_congestion_algorithms()
    if "cubic" not in algos or "bbr" not in algos:
        pytest.skip(f"needs cubic and bbr, kernel has {algos}")
    caps = _record_pacing(monkeypatch)
    with Receiver() as rx, connect(*rx.address, lanes=2, link_control=False) as s:  # (settings of our own)
        socks = s.lane_sockets()
        for i, sock in enumerate(socks):
            set_pacing_rate(sock, 50_000_000 + i)
            set_congestion(sock, "cubic")
        r = probe(s, seconds=SECONDS, lanes=3, congestion="bbr")
        assert r.lanes == 3 and r.congestion == "bbr" and r.notes == ()
        assert s.active_lanes == 2
        assert [get_pacing_rate(x) for x in socks] == [50_000_000, 50_000_001]
        assert [get_congestion(x) for x in socks] == ["cubic", "cubic"]
        # the caps were lifted for the burst (not a capacity threshold: the lane the probe added has none, and
        # under the full suite's load loopback read 136 MB/s once) and put back after it, in that order (a
        # burst whose pipe read full caps the lanes at their share of it for the drain between the two: under
        # load, loopback's did once)
        fds = sorted(x.fileno() for x in socks)
        assert sorted(fd for fd, rate in caps if rate is None and fd in fds) == fds
        lifted = max(i for i, (fd, rate) in enumerate(caps) if rate is None and fd in fds)
        last = {fd: rate for fd, rate in caps[lifted + 1:] if fd in fds}
        assert last == dict(zip([x.fileno() for x in socks], [50_000_000, 50_000_001]))
        assert r.capacity > 0


def test_probe_skips_an_unknown_congestion_algorithm_with_a_note(no_leaks: None) -> None:
    with Receiver() as rx, connect(*rx.address, lanes=1) as s:
        before = get_congestion(s.lane_sockets()[0])
        r = probe(s, seconds=SECONDS, congestion="no-such-cc")
        assert r.capacity > 0 and r.congestion == before
        assert any("no-such-cc" in n for n in r.notes)
        assert get_congestion(s.lane_sockets()[0]) == before


def test_bad_use_is_refused(no_leaks: None) -> None:
    with pytest.raises(ValueError, match="max_probe_bytes"):
        Receiver(max_probe_bytes=-1)
    with Receiver() as rx:
        s = connect(*rx.address, lanes=1)
        for bad in (0, -1.0, math.nan, math.inf):
            with pytest.raises(ValueError, match="seconds"):
                probe(s, seconds=bad)
        with pytest.raises(ValueError, match="interval"):
            probe(s, interval=0)
        with pytest.raises(ValueError, match="lanes"):
            probe(s, lanes=0)
        with pytest.raises(ValueError, match="connect arguments"):
            probe(s, key="k")
        with pytest.raises(TypeError):
            probe("127.0.0.1:1")  # type: ignore[arg-type]
        s.close()
        with pytest.raises(KvwireError, match="session closed"):
            probe(s, seconds=SECONDS)


def test_session_failure_mid_probe_is_raised(no_leaks: None) -> None:
    rx = Receiver()
    s: Session | None = None
    try:
        s = connect(*rx.address, lanes=2, peer_timeout=3.0)
        killer = threading.Timer(0.3, rx.close)
        killer.start()
        t0 = time.monotonic()
        with pytest.raises(KvwireError):
            probe(s, seconds=5.0)
        assert time.monotonic() - t0 < 4.0
        killer.join()
        assert s.closed
    finally:
        if s is not None:
            s.close()
        rx.close()


def test_a_burst_that_read_the_pipe_full_drains_paced_at_the_measured_capacity(
        no_leaks: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """Once the pipe reads full the lanes still hold their windows and up to TCP_NOTSENT_LOWAT unsent: the
    drain sends that at each lane's share of the measured capacity, not at STARTUP's rate into a queue that
    already overflows (on 400 Mbit/s, 20 ms with a one-BDP queue: 1700-2060 queue drops in a warm-up before,
    770-985 after). Loopback reads as a LAN, where the full-pipe rule stays off: here it counts from 0 s."""
    from kvwire.congestion.decision import ControllerConfig

    kp = sys.modules["kvwire.probe"]  # (the module: ``kvwire.probe`` the attribute is its function)

    monkeypatch.setattr(kp, "ControllerConfig", lambda: ControllerConfig(lan_rtt=0.0))
    # Which samples count toward the full-pipe rule is not this test's subject (that is
    # test_held_samples_pause_the_full_pipe_rule_and_do_not_restart_it): here every one does. On loopback the
    # receiver's window holds the lanes in most samples (rwnd_limited 0.3-0.6, read under load), which the
    # rule rightly does not take for the link's plateau: in CI, 1 run in ~5, the burst never read full in 3 s.
    monkeypatch.setattr(kp, "_MIN_BUSY", 0.0)
    monkeypatch.setattr(kp, "_WINDOW_HELD", 2.0)
    caps = _record_pacing(monkeypatch)
    with Receiver() as rx, connect(*rx.address, lanes=2, link_control=False, warm=False) as s:
        socks = s.lane_sockets()
        full = probe(s, seconds=3.0, lanes=2, congestion=None, until_full=True)
        assert full.stopped_full and full.full_pipe and full.seconds < 3.0
        drain = caps[2:-2]  # (lifted for the burst first, put back last)
        assert sorted(fd for fd, _ in drain) == sorted(x.fileno() for x in socks)
        shares = {rate for _, rate in drain}
        assert len(shares) == 1  # one share each: the measured capacity (or the lanes' delivery rates) halved
        share = shares.pop()
        # (at least the capacity the burst's samples measured by its end; the result's may be more: the drain's
        # samples count in it too)
        end = full.states[0].timestamp + full.seconds + 0.01
        burst_cap = max(st.btl_bw for st in full.states if st.timestamp <= end)
        assert share is not None and share >= int(burst_cap / 2) > 0
        assert [r for _, r in caps[-2:]] == [None, None]  # the lanes' own caps (none) put back
        # negative control: a burst that ran its time without reading the pipe full drains as it was
        caps.clear()
        monkeypatch.setattr(kp, "ControllerConfig", ControllerConfig)  # (loopback is a LAN again: never full)
        ran = probe(s, seconds=SECONDS, lanes=2, congestion=None, until_full=True)
        assert not ran.full_pipe and not ran.stopped_full
        assert [r for _, r in caps] == [None, None, None, None]  # lifted, put back: nothing between


def _burst_states(goodputs: list[float], delivery_rates: list[int | None]) -> list[Any]:
    """LinkStates of a real LinkEstimator (the probe's config) fed two synthetic lanes sampled every 50 ms
    on an 80 ms path: the aggregate ACKs ``goodputs[i]`` bytes/s in interval i, and each lane's latest
    delivery-rate sample is half of ``delivery_rates[i]``."""
    est = LinkEstimator(EstimatorConfig(bw_sample=0.2, stats_window=0.4))
    acked = 0
    states = []
    for i, (rate, dr) in enumerate(zip([0.0, *goodputs], [None, *delivery_rates], strict=True)):
        acked += int(rate * 0.05 / 2)
        infos = [TcpInfo(length=280, state=1, ca_state=0, snd_mss=1448, snd_cwnd=100, rtt_us=80_000,
                         min_rtt_us=80_000, bytes_acked=acked, bytes_sent=acked, bytes_retrans=0,
                         busy_time_us=int(i * 0.05 * 1e6), delivery_rate=None if dr is None else dr // 2)
                 for _ in range(2)]
        states.append(est.update(i * 0.05, infos))
    return states


def test_a_burst_capacity_is_not_raised_by_acks_a_host_stall_released_at_once() -> None:
    """A host stall holds ACKs back for two intervals and releases them in the next two: the goodput spans
    that include the release but not the stall read 1.15x the link, the lanes' delivery-rate samples (the
    kernel's, over each ACK's send interval at least) stay at the link's rate, and the burst's capacity is
    the link's. Negative control: without the lanes' samples (a kernel that gives none) the spans stand."""
    link = 240e6
    good = [0.3 * link, 0.6 * link, link, link, link, link, 0.5 * link, 0.5 * link, 1.6 * link, 1.6 * link, link]
    drs: list[int | None] = [int(0.35 * link), int(0.7 * link), int(link)] + [int(link)] * 8
    states = _burst_states(good, drs)
    assert max(s.btl_bw for s in states) > 1.1 * link  # what the spans alone read
    assert burst_capacity(states, None) == pytest.approx(link, rel=0.01)
    assert burst_capacity(states, 0.9 * link) == pytest.approx(link, rel=0.01)
    bare = _burst_states(good, [None] * len(good))
    assert burst_capacity(bare, None) == pytest.approx(max(s.btl_bw for s in bare))
    assert burst_capacity(bare, None) > 1.1 * link
    # and the samples never raise a reading (they sum above the link in a ramp): the lower of the two
    assert burst_capacity(_burst_states([link] * 6, [int(1.3 * link)] * 6), None) == pytest.approx(link, rel=0.01)


@pytest.mark.parametrize("held", [{"busy": 0.2}, {"sndbuf": 0.9}])
def test_held_samples_pause_the_full_pipe_rule_and_do_not_restart_it(no_leaks: None, held: dict[str, float]) -> None:
    """A burst's sample in which the lanes idled (a starved sender thread) or a socket window held them does
    not count toward the full-pipe rule's plateau (3 round trips, ``PIPE_MIN`` at least, without 25 %
    growth), as BBR skips app-limited samples; nor does it restart the count, which on a loaded host kept
    2 bursts in 5 from ever reading full in 3 s. An 80 ms path sampled every 0.1 s: 0.3 s of plateau
    interrupted by 0.5 s of held samples reads full once 0.3 s of unheld plateau has passed, not earlier;
    a plateau of held samples alone never does."""
    kp = sys.modules["kvwire.probe"]
    with Receiver() as rx, connect(*rx.address, lanes=1, link_control=False, warm=False) as s:
        pr = kp._Probe(s, 3.0, 0.1, 1, None, True)
        pr._watch_pipe(burst_sample(0.0, 100e6))  # grew: the plateau's clock starts here
        pr._watch_pipe(burst_sample(0.1, 101e6))
        for i in range(5):  # 0.2 .. 0.6 held: the clock stops
            pr._watch_pipe(burst_sample(0.2 + 0.1 * i, 101e6, **held))
        pr._watch_pipe(burst_sample(0.7, 101e6))
        assert not pr.full_pipe  # 0.2 s of unheld plateau (0-0.1, 0.6-0.7); restarted, it would read 0.1
        pr._watch_pipe(burst_sample(0.8, 101e6))
        assert pr.full_pipe  # 0.3 s unheld
        # negative control: held samples alone, however long, never read full
        only = kp._Probe(s, 3.0, 0.1, 1, None, True)
        only._watch_pipe(burst_sample(0.0, 100e6))
        for i in range(20):
            only._watch_pipe(burst_sample(0.1 * (i + 1), 100e6, **held))
        assert not only.full_pipe


def _queued(t: float, btl_bw: float, *, ratio: float, overflowing: bool = False) -> LinkState:
    """A burst's sample on an 80 ms path with a queue read standing (srtt ``ratio`` x the min RTT) and the
    estimator's capacity known from it."""
    return replace(burst_sample(t, btl_bw), srtt=0.08 * ratio, queueing_ratio=ratio, saturated=True,
                   capacity=0.8 * btl_bw, overflowing=overflowing, loss_rate=0.05 if overflowing else 0.0)


def test_a_queue_without_loss_ends_no_warm_up_while_the_bandwidth_grows_loss_or_a_plateau_does(no_leaks: None) -> None:
    """``until_full`` ends a burst on BBR's full-pipe rule or on a queue that overflowed, not on a queue that
    stood without loss (the estimator's capacity known from it) while the bandwidth still grew 25 % a round
    trip: a host that holds ACKs back reads as such a queue, deeper than the link's buffer (ratio 2 where a
    20 ms queue on 80 ms tops out at 1.25), and ending there read 0.56-0.66x of a 2 Gbit/s link. The plateau's
    round trips are counted at srtt (BBR counts a round by a packet's ACK): 3 min RTTs of plateau at ratio 2
    are 1.5 round trips. Negative controls: the same samples with the queue overflowing end the burst; a
    plateau of 3 round trips at srtt does too."""
    kp = sys.modules["kvwire.probe"]
    with Receiver() as rx, connect(*rx.address, lanes=1, link_control=False, warm=False) as s:
        growing = kp._Probe(s, 3.0, 0.05, 1, None, True)
        for i in range(8):  # 50 ms apart, +30 % a sample, under a "queue" read at 2x
            growing._watch_pipe(_queued(0.05 * i, 100e6 * 1.3 ** i, ratio=2.0))
            assert not growing._full(), i
        # the plateau: 3 min RTTs (0.24 s) are not yet 3 round trips at srtt (0.16 s each)
        for i in range(1, 6):
            growing._watch_pipe(_queued(0.35 + 0.05 * i, 100e6 * 1.3 ** 7, ratio=2.0))
        assert not growing._full()
        for i in range(6, 11):
            growing._watch_pipe(_queued(0.35 + 0.05 * i, 100e6 * 1.3 ** 7, ratio=2.0))
        assert growing._full() and growing.full_pipe  # 0.5 s >= 3 x 0.16 s of plateau
        lossy = kp._Probe(s, 3.0, 0.05, 1, None, True)
        lossy._watch_pipe(_queued(0.0, 100e6, ratio=1.25))
        assert not lossy._full()
        lossy._watch_pipe(_queued(0.05, 130e6, ratio=1.25, overflowing=True))
        assert lossy._full() and not lossy.full_pipe
