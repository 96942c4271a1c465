"""Warming a session as it opens (``connect(warm=...)``, ``kvwire.probe.warm_up``) on loopback, with real
sockets: the automatic warm-up leaves a short path alone (no probe sent, nothing measured), a forced one
runs the probe and ends early once the pipe reads full, the reasons it skips, and bad arguments refused at
the call. The long-path behaviour (lanes' congestion windows open after connect) is in
``tests/test_wan_warm.py``."""

from __future__ import annotations

import math
import sys
import time

import pytest
from helpers import burst_sample, send_verified

from kvwire import Receiver, RequestSpec, connect
from kvwire.probe import WARM_ENV, WARM_MIN_RTT, ProbeResult, path_rtt, warm_skip_reason
from kvwire.testing.fixtures import load_fixture


def _probes(stats: dict[str, int]) -> int:
    return sum(v for k, v in stats.items() if k.startswith("probes_"))


def test_auto_leaves_a_loopback_session_cold(no_leaks: None) -> None:
    with Receiver() as rx, connect(*rx.address) as s:
        assert s.link_control is not None and s.server_limits["max_probe_bytes"] > 0  # all but the RTT allow it
        rtt = path_rtt(s)
        assert rtt is not None and rtt < WARM_MIN_RTT
        assert "RTT" in warm_skip_reason(s)
        assert s.warmup is None
        assert _probes(s.stats()) == 0 and s.stats()["bytes_sent"] == 0  # not one probe byte went out


def test_forced_warm_up_probes_and_the_first_transfer_arrives_bit_exact(no_leaks: None) -> None:
    layout = load_fixture("tiny-qwen3-next")
    req = RequestSpec("after-warm", 3000, 3000)
    with Receiver() as rx, connect(*rx.address, warm=0.5) as s:
        w = s.warmup
        assert isinstance(w, ProbeResult)
        assert w.bytes_sent > 0 and w.capacity > 0 and w.drained
        assert w.seconds < 0.5 + 2.0  # the budget asked for, not a default (wide: CI load stalls the loop)
        # a burst not ended by the full-pipe rule ran its whole budget; one that was may end just past it (the
        # poll that read the pipe full can fall on the budget's last tick: 0.5012 s once under CI load)
        assert w.stopped_full or w.seconds >= 0.5
        assert _probes(s.stats()) >= 1
        send_verified(rx, s, layout, req, seed=7, timeout=20)


def test_warm_false_and_no_controller_send_no_probe(no_leaks: None) -> None:
    with Receiver() as rx:
        with connect(*rx.address, warm=False) as s:
            assert s.warmup is None and _probes(s.stats()) == 0
        with connect(*rx.address, link_control=False) as s:
            assert "controller" in warm_skip_reason(s) and s.warmup is None


def test_a_receiver_that_takes_no_probes_is_skipped_not_an_error(no_leaks: None,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    with Receiver(max_probe_bytes=0) as rx:
        with connect(*rx.address) as s:
            assert "takes no probes" in warm_skip_reason(s) and s.warmup is None
        with caplog.at_level("INFO", logger="kvwire.probe"), connect(*rx.address, warm=True) as s:
            assert s.warmup is None and not s.closed  # asked for, refused: the session is still good
        assert any("no warm-up" in r.getMessage() and "max_probe_bytes=0" in r.getMessage() for r in caplog.records)


def test_the_transport_runs_the_warm_up_it_is_handed_and_none_without_one(no_leaks: None) -> None:
    """The seam: ``kvwire.tcp``'s session warms only with the ``warm_up`` it is handed (``kvwire.connect``
    hands in ``kvwire.probe.warm_up``), called once with the open session; asked to warm without one, it
    refuses at the call, before connecting."""
    from kvwire import tcp

    calls: list[tuple[object, object]] = []
    measured = object()  # what the warm-up measured: the session keeps it as ``warmup``

    def recording(session: tcp.Session, warm: bool | float | None) -> object:
        calls.append((session, warm))
        return measured

    with Receiver() as rx:
        with pytest.raises(ValueError, match="warm_up"):
            tcp.connect(*rx.address, warm=True)
        with tcp.connect(*rx.address, warm=0.25, warm_up=recording) as s:  # type: ignore[arg-type]
            assert calls == [(s, 0.25)] and s.warmup is measured
        with tcp.connect(*rx.address, warm=False, warm_up=recording):  # type: ignore[arg-type]
            assert len(calls) == 1
        with tcp.connect(*rx.address, warm=None) as s:  # nothing handed in: never warmed, nothing probed
            assert s.warmup is None and _probes(s.stats()) == 0
        assert connect.__wrapped__ is tcp.connect  # type: ignore[attr-defined]  # kvwire.connect hands it in


def test_the_environment_turns_auto_off(monkeypatch: pytest.MonkeyPatch, no_leaks: None) -> None:
    monkeypatch.setenv(WARM_ENV, "0")
    with Receiver() as rx, connect(*rx.address, warm=False) as s:
        assert WARM_ENV in warm_skip_reason(s)


@pytest.mark.parametrize("bad, error", [(0, ValueError), (-1.0, ValueError), (math.nan, ValueError),
                                        (math.inf, ValueError), ("1", TypeError), ([1], TypeError)])
def test_bad_warm_is_refused_before_connecting(bad: object, error: type[Exception]) -> None:
    with pytest.raises(error, match="warm"):
        connect("127.0.0.1", 1, warm=bad)  # type: ignore[arg-type]  # (port 1: it never gets that far)


def test_the_warm_up_budget_is_counted_in_the_paths_round_trips(no_leaks: None,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """``warm=None``/``True`` bursts for up to ``WARM_SECONDS`` or ``WARM_ROUNDS`` round trips, whichever is
    longer: BBR's ramp to a bandwidth-delay product doubles per round trip. The session's own path (loopback)
    is short, so it is ``WARM_SECONDS``; the same session read as 80 ms and 200 ms paths gets 16 of them."""
    kp = sys.modules["kvwire.probe"]  # (the module: ``kvwire.probe`` the attribute is its function)
    with Receiver() as rx, connect(*rx.address, warm=False) as s:
        assert kp.warm_seconds(s) == kp.WARM_SECONDS  # loopback: a few us of RTT
        for rtt, want in ((0.02, kp.WARM_SECONDS), (0.08, 16 * 0.08), (0.2, 16 * 0.2)):
            monkeypatch.setattr(kp, "path_rtt", lambda _s, r=rtt: r)
            assert kp.warm_seconds(s) == pytest.approx(max(kp.WARM_SECONDS, kp.WARM_ROUNDS * rtt))
            assert kp.warm_seconds(s) == pytest.approx(want)
        monkeypatch.setattr(kp, "path_rtt", lambda _s: None)  # no RTT read: the floor
        assert kp.warm_seconds(s) == kp.WARM_SECONDS


def _result(capacity: float, seconds: float, min_rtt: float | None, *, saturated: bool = False,
            full_pipe: bool = False) -> ProbeResult:
    return ProbeResult(capacity=capacity, saturated=saturated, min_rtt=min_rtt, max_queueing_ratio=1.0,
                       loss_rate=0.0, bytes_sent=int(capacity * seconds), seconds=seconds, lanes=16,
                       full_pipe=full_pipe)


def test_the_controller_starts_from_a_measured_reading_or_a_long_bursts_floor_not_a_short_ramp() -> None:
    """``start_capacity``: a pipe seen full (a queue, or BBR's full-pipe rule) is the link's rate; a burst that ran
    ``FLOOR_ROUNDS`` round trips without seeing it full carried a floor of it; a shorter one read its ramp."""
    kp = sys.modules["kvwire.probe"]
    rtt = 0.08
    assert kp.start_capacity(_result(240e6, 0.9, rtt, saturated=True)) == 240e6
    assert kp.start_capacity(_result(240e6, 0.9, rtt, full_pipe=True)) == 240e6
    assert kp.start_capacity(_result(240e6, 0.2, rtt, full_pipe=True)) == 240e6  # measured: however short
    long = kp.FLOOR_ROUNDS * rtt
    assert kp.start_capacity(_result(244e6, 16 * rtt, rtt)) == 244e6  # a warm-up's whole budget, not seen full
    assert kp.start_capacity(_result(244e6, long, rtt)) == 244e6
    # negative controls: a ramp's reading, no round trip read, nothing carried
    assert kp.start_capacity(_result(60e6, long * 0.99, rtt)) is None
    assert kp.start_capacity(_result(60e6, 0.3, rtt)) is None
    assert kp.start_capacity(_result(244e6, 2.0, None)) is None
    assert kp.start_capacity(_result(2e9, 0.3, 50e-6)) is None  # loopback, a LAN: its lanes are left unpaced
    assert kp.start_capacity(_result(2e9, 0.3, 50e-6, saturated=True)) == 2e9  # ... unless it measured the link
    assert kp.start_capacity(_result(0.0, 2.0, rtt, full_pipe=True)) is None


def test_a_probe_that_ran_long_without_reading_full_leaves_the_controller_paced_at_its_floor(
        no_leaks: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """The wiring in ``kvwire.probe.probe`` on a real session and its controller: the probe pauses the controller
    and resumes it from ``start_capacity`` of what it measured, paced under a floor from a long burst (the first
    up-probe follows after ``settle``) and probing unpaced after a short one. The burst itself is replaced by
    its result (a loopback burst cannot be made to run long without reading the pipe full)."""
    from kvwire.congestion.controller import Mode

    kp = sys.modules["kvwire.probe"]
    rtt = 0.08
    for burst, paced in ((_result(244e6, 16 * rtt, rtt), True), (_result(60e6, 3 * rtt, rtt), False)):
        monkeypatch.setattr(kp._Probe, "run", lambda self, r=burst: r)
        with Receiver() as rx, connect(*rx.address, warm=False) as s:
            ctl = s.link_control
            assert ctl is not None and ctl.decision.mode is Mode.PROBE and ctl.decision.pacing_rate is None
            assert kp.probe(s, seconds=burst.seconds) is burst
            d = ctl.decision
            if paced:
                assert d.mode is Mode.CRUISE and d.pacing_rate is not None
                assert d.pacing_rate * d.lanes == pytest.approx(ctl.config.pace_gain * burst.capacity, rel=0.01)
                assert "probed beforehand" in d.reason
            else:
                assert d.mode is Mode.PROBE and d.pacing_rate is None


def test_a_bursts_faster_unconfirmed_span_is_probed_back_to_once_after_settle(
        no_leaks: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """A burst whose goodput spans read more than its capacity (which the lanes' delivery-rate samples bound,
    ``burst_capacity``) hands that reading to the controller as ``delivered`` (``ProbeResult.delivered``,
    ``LinkControl.resume(capacity, delivered)``): paced at the capacity, the first decision after ``settle``
    on a clear link that the pacing holds is an up-probe straight to it, not the usual 10 % step. Negative
    control: spans no faster than the capacity leave nothing to probe back to (the usual first step)."""
    from dataclasses import replace

    from kvwire.congestion.controller import Mode, decide

    kp = sys.modules["kvwire.probe"]
    rtt, cap = 0.08, 150e6
    for fastest, back in ((1.3 * cap, True), (cap, False)):
        burst = replace(_result(cap, 16 * rtt, rtt, full_pipe=True),
                        states=(burst_sample(0.0, 0.5 * cap), burst_sample(0.5, fastest), burst_sample(0.9, 0.9 * cap)))
        assert burst.delivered == fastest
        monkeypatch.setattr(kp._Probe, "run", lambda self, r=burst: r)
        with Receiver() as rx, connect(*rx.address, warm=False) as s:
            ctl = s.link_control
            assert ctl is not None
            assert kp.probe(s, seconds=burst.seconds) is burst
            st, cfg = ctl.controller.state, ctl.config
            assert st.mode is Mode.CRUISE and st.decision.total_pacing is not None
            assert st.delivered == (fastest if back else None)
            now = time.monotonic()
            up = decide(st, burst_sample(now, 0.0), cfg)  # (the first decision starts the clock)
            for _ in range(3):  # (the lane count for the path may be set first, the settle starting over)
                now += cfg.settle + 0.01
                up = decide(up, replace(burst_sample(now, cfg.pace_gain * cap), capacity=cap, pacing_limited=True), cfg)
                if up.mode is not Mode.CRUISE:
                    break
            assert up.mode is Mode.UPPROBE, up.decision.reason
            total = up.decision.total_pacing
            assert total is not None
            if back:
                assert total == pytest.approx(fastest, rel=0.01) and up.delivered is None  # once
            else:
                assert total == pytest.approx(cfg.upprobe_gain * cap, rel=0.01)


def test_a_bursts_overflow_bounds_the_sessions_queue_from_the_first_request(
        no_leaks: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """A burst whose queue overflowed read the bottleneck's buffer (``ProbeResult.buffer``: the least queue,
    in bytes, its overflowing samples read); ``probe`` hands it to the session's controller
    (``LinkControl.resume(..., buffer)``), whose estimator bounds ``max_queue`` by it from its next sample,
    so a host stall at the first request is not read as a rate drop. Negative control: a burst that never
    overflowed leaves nothing (``max_queue`` None)."""
    from dataclasses import replace

    kp = sys.modules["kvwire.probe"]
    rtt, cap = 0.08, 150e6
    for overflowed in (True, False):
        full = replace(burst_sample(0.5, cap), overflowing=overflowed, buffer=0.02 * cap if overflowed else None)
        burst = replace(_result(cap, 16 * rtt, rtt, full_pipe=True), states=(burst_sample(0.0, 0.5 * cap), full))
        assert burst.buffer == (0.02 * cap if overflowed else None)
        monkeypatch.setattr(kp._Probe, "run", lambda self, r=burst: r)
        with Receiver() as rx, connect(*rx.address, warm=False) as s:
            ctl = s.link_control
            assert ctl is not None
            assert kp.probe(s, seconds=burst.seconds) is burst
            state = ctl.monitor.poll()  # (the session's next sample)
            if overflowed:
                assert state.buffer == pytest.approx(0.02 * cap)
                assert state.max_queue == pytest.approx(ctl.estimator.config.buffer_margin * 0.02 * cap / cap, rel=0.01)
            else:
                assert state.buffer is None and state.max_queue is None
