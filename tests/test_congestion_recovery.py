"""The controller cannot get stuck: false low samples, app-limited gaps and a starved link never leave the
capacity estimate (and the pacing under it) collapsed.

Closed-loop runs use ``kvwire.testing.fluidlink`` (a deterministic fluid model of BBR lanes through one
bottleneck, on a simulated clock) with the real ``LinkEstimator`` and ``decide``; the estimator tests feed
it synthetic ``TcpInfo`` streams; one test restarts a real socket's algorithm.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from dataclasses import dataclass, replace

import pytest

from kvwire.congestion.controller import ControllerConfig, ControllerState, Decision, Mode, decide, initial_state
from kvwire.congestion.estimator import EstimatorConfig, LinkEstimator, LinkState
from kvwire.congestion.tcpinfo import UNLIMITED_PACING, TcpInfo
from kvwire.sockopts import available_congestion_algorithms, get_congestion, restart_congestion
from kvwire.testing.fluidlink import ClosedLoop, FluidLink, recovery_time

DT = 0.1


# ---------------------------------------------------------------- closed loop on the fluid link


@pytest.mark.parametrize(("rate", "rtt"), [(50e6, 0.02), (125e6, 0.04)], ids=["400mbit-20ms", "1gbit-40ms"])
def test_a_starved_link_collapses_the_estimate_and_it_recovers_within_seconds(rate: float, rtt: float) -> None:
    """The issue's collapse: the link (an emulator starved of CPU) delivers 2 % of its rate for 3 s; the
    estimate follows it down (it must: that was the link). Once it ends, goodput is back to >= 80 % of
    the link within 5 s. Negative control: the same run without the re-probe (``recover_ratio=0``) and
    without remembering the start's unpaced delivery (``best_window`` 1 s) stays far below for longer
    (at a few packets per round trip, delayed ACKs read as a queue)."""

    def fault(link: FluidLink) -> object:
        return lambda t: setattr(link, "rate", rate * 0.02 if 5.0 <= t < 8.0 else rate)

    link = FluidLink(rate, rtt)
    ticks = ClosedLoop(link).run(20.0, fault(link))  # type: ignore[arg-type]
    during = [tk.state.capacity for tk in ticks if 6.0 <= tk.t < 8.0]
    assert all(c is not None and c < 0.5 * rate for c in during), "the fault lowered the estimate"
    took = recovery_time(ticks, 8.0, 0.8 * rate)
    assert took is not None and took <= 5.0, took
    last = ticks[-1]
    assert last.state.capacity is not None and last.state.capacity >= 0.8 * rate
    assert last.decision.total_pacing is not None and last.decision.total_pacing >= 0.8 * rate
    assert any(tk.decision.restart for tk in ticks if tk.t > 8.0), "recovered by a re-probe"

    control = FluidLink(rate, rtt)
    # (and without the memory of what the lanes delivered unpaced at the start, which up-probes back to it)
    slow = ClosedLoop(control, ControllerConfig(recover_ratio=0.0, best_window=1.0)).run(  # type: ignore[arg-type]
        20.0, fault(control))
    took_without = recovery_time(slow, 8.0, 0.8 * rate)
    assert took_without is None or took_without > 5.0


@pytest.mark.parametrize("phase", [i * 0.1 for i in range(13)])
def test_request_gaps_and_tails_never_lower_the_estimate(phase: float) -> None:
    """Requests back to back (0.8 s on every lane, a 0.2 s tail on one lane, a 0.3 s gap), and the link
    halves at 5 s: once that is measured, nothing pulls the estimate below the link (the issue's second
    halving 3 s after a real one came from a tail under a queue srtt still remembered)."""
    rate = 50e6
    link = FluidLink(rate, 0.02)

    def requests(t: float) -> None:
        link.rate = rate if t < 5.0 else rate / 2
        if t < 3.0:
            return
        at = (t - 3.0 + phase) % 1.3
        link.set_backlog(True if at < 0.8 else (lambda i: i == 0) if at < 1.0 else False)

    ticks = ClosedLoop(link).run(30.0, requests)
    after = [tk.state.capacity for tk in ticks if tk.t >= 8.0]
    assert all(c is not None and c >= 0.8 * rate / 2 for c in after), min(c or 0 for c in after)
    assert all(c is not None and c <= 1.1 * rate / 2 for c in after[-50:])


# ---------------------------------------------------------------- the estimator on synthetic samples


@dataclass
class Lane:
    acked: int = 0
    busy_us: int = 0

    def info(self, *, rtt_us: int, notsent: int | None = 1 << 20, cap: int | None = None) -> TcpInfo:
        return TcpInfo(length=280, state=1, ca_state=0, snd_mss=1448, snd_cwnd=100, rtt_us=rtt_us,
                       delivery_rate_app_limited=notsent == 0,
                       min_rtt_us=20_000, bytes_acked=self.acked, bytes_sent=self.acked, bytes_retrans=0,
                       busy_time_us=self.busy_us, rwnd_limited_us=0, sndbuf_limited_us=0, notsent_bytes=notsent,
                       max_pacing_rate=UNLIMITED_PACING if cap is None else cap)


def feed(est: LinkEstimator, lanes: list[Lane], t: float, steps: int, rate: float, *, rtt_us: int = 20_000,
         notsent: int | None = 1 << 20, cap: int | None = None, busy: float = 1.0,
         tail: bool = False) -> tuple[float, LinkState]:
    """``tail``: only the first lane carries (the others finished their part of a request and idle)."""
    state = None
    for _ in range(steps):
        for i, ln in enumerate(lanes):
            ln.acked += int(rate / (1 if tail else len(lanes)) * DT) if not tail or i == 0 else 0
            ln.busy_us += int(busy * DT * 1e6) if not tail or i == 0 else 0
        t += DT
        state = est.update(t, [ln.info(rtt_us=rtt_us, notsent=notsent, cap=cap) for ln in lanes])
    assert state is not None
    return t, state


@pytest.fixture
def measured() -> Iterator[tuple[LinkEstimator, list[Lane], float]]:
    """An estimator that measured 40 MB/s under a standing queue, then cruised clear."""
    est = LinkEstimator(EstimatorConfig(bw_sample=0.2))
    lanes = [Lane(), Lane()]
    est.update(0.0, [ln.info(rtt_us=20_000) for ln in lanes])
    t, s = feed(est, lanes, 0.0, 5, 40e6, rtt_us=40_000)
    t, s = feed(est, lanes, t, 10, 39e6)
    assert s.capacity == pytest.approx(40e6, rel=0.02)
    yield est, lanes, t


def test_intervals_with_nothing_queued_never_lower_the_capacity(
        measured: tuple[LinkEstimator, list[Lane], float]) -> None:
    est, lanes, t = measured
    # a request's tail: srtt still shows the queue, goodput is what little was left to send
    t, s = feed(est, lanes, t, 5, 4e6, rtt_us=60_000, notsent=0, tail=True)
    assert s.app_limited and s.saturated and s.capacity == pytest.approx(40e6, rel=0.02)
    # a gap: lanes idle most of the interval
    t, s = feed(est, lanes, t, 5, 1e6, rtt_us=60_000, busy=0.2)
    assert s.app_limited and s.capacity == pytest.approx(40e6, rel=0.02)
    # the first bw_sample after a gap is still the gap's (srtt kept the old queue through it)
    t, s = feed(est, lanes, t, 1, 10e6, rtt_us=60_000)
    assert s.app_limited and s.capacity == pytest.approx(40e6, rel=0.02)


def test_goodput_at_our_own_pacing_cap_never_lowers_the_capacity(
        measured: tuple[LinkEstimator, list[Lane], float]) -> None:
    est, lanes, t = measured
    # paced at 5 MB/s in all (2.5 each) with delayed ACKs tripling srtt: the death spiral's input
    t, s = feed(est, lanes, t, 10, 5e6, rtt_us=60_000, cap=2_500_000)
    assert s.pacing_limited and not s.app_limited and s.capacity == pytest.approx(40e6, rel=0.02)


def test_a_link_that_fell_is_followed_at_most_halving_per_floor_window(
        measured: tuple[LinkEstimator, list[Lane], float]) -> None:
    """The same samples without our cap: that is a link that fell, and it is followed, but never below
    half the best goodput the link delivered within floor_window."""
    est, lanes, t = measured
    t, s = feed(est, lanes, t, 3, 5e6, rtt_us=60_000)
    assert not s.pacing_limited and s.capacity == pytest.approx(20e6, rel=0.05)
    t, s = feed(est, lanes, t, 20, 5e6, rtt_us=60_000)
    assert s.capacity == pytest.approx(5e6, rel=0.05)


# ---------------------------------------------------------------- the controller's re-probe


def link(t: float, goodput: float, capacity: float | None, *, q: float = 1.0, pacing_limited: bool = False,
         app_limited: bool = False, loss: float = 0.0, sndbuf: float = 0.0) -> LinkState:
    return LinkState(timestamp=t, goodput=goodput, btl_bw=goodput, capacity=capacity, utilization=None,
                     available_bw=None, min_rtt=0.02, srtt=0.02 * q, queueing_ratio=q, loss_rate=loss, busy=1.0,
                     rwnd_limited=0.0, sndbuf_limited=sndbuf, congested=False, saturated=q >= 1.25,
                     pacing_limited=pacing_limited, app_limited=app_limited)


def cruising_at(cap: float, cfg: ControllerConfig, t: float = 1.0) -> ControllerState:
    st = ControllerState(Decision(4, int(0.99 * cap) // 4, "bbr", Mode.CRUISE, "test"), changed_at=t)
    return decide(st, link(t, cap, cap), cfg)


def test_a_collapsed_estimate_is_re_probed_unpaced_with_the_lanes_restarted() -> None:
    cfg = ControllerConfig()
    st = cruising_at(40e6, cfg)
    assert st.best == 40e6
    low = decide(st, link(1.5, 1e6, 1e6, q=3.0, pacing_limited=True), cfg)  # all the pacing gives, "queued"
    assert low.mode is Mode.PROBE and low.decision.pacing_rate is None and low.decision.restart
    # the re-probe measures less than half the old rate (the link really fell, or the fault is still on):
    # cruise; the best is kept, so it is re-probed again, after reprobe_hold, then after twice that
    # (every probe ends on a full pipe: the re-probe's bandwidth stopped growing full_pipe before)
    st = decide(low, link(1.5 + cfg.probe_min + 0.01 - cfg.full_pipe, 15e6, 15e6), cfg)
    st = decide(st, link(1.5 + cfg.probe_min + 0.01, 15e6, 15e6), cfg)
    assert st.mode is Mode.CRUISE and st.best == 40e6 and not st.decision.restart and st.reprobes == 1
    t = 1.5 + cfg.probe_min + 0.01 + cfg.settle + 0.01
    assert t - 1.5 >= cfg.reprobe_hold
    st = decide(st, link(t, 14.9e6, 15e6, pacing_limited=True), cfg)
    assert st.mode is Mode.PROBE and st.decision.restart and st.reprobes == 2
    st = decide(st, link(t + cfg.probe_min + 0.01 - cfg.full_pipe, 15e6, 15e6), cfg)
    st = decide(st, link(t + cfg.probe_min + 0.01, 15e6, 15e6), cfg)
    st = decide(st, link(t + cfg.probe_min + cfg.settle + 0.02, 14.9e6, 15e6, pacing_limited=True), cfg)
    assert st.mode is Mode.CRUISE, "the second wait is twice reprobe_hold"
    st = decide(st, link(t + 2 * cfg.reprobe_hold + 0.01, 14.9e6, 15e6, pacing_limited=True), cfg)
    assert st.mode is Mode.PROBE and st.reprobes == 3
    # back within recover_ratio of the best: the count starts over
    back = decide(st, link(t + 2 * cfg.reprobe_hold + cfg.probe_min + 0.02, 39e6, 39e6), cfg)
    assert back.reprobes == 0
    # ... and while it is not, the waits double up to reprobe_hold_max and stay there: a fault of any length
    # is re-probed within reprobe_hold_max of its end (uncapped, a 10 s fault had doubled the wait to 8 s,
    # and the ninth wait was 128 s). Negative control: the sample just before the wait is over stays put
    collapsed = replace(st, decision=replace(st.decision, mode=Mode.CRUISE, pacing_rate=int(15e6) // 4),
                        delivered=None)
    base = t + 1.0  # (within best_window of the best: it still counts)
    for n, wait in ((1, 1.0), (2, 2.0), (3, 4.0), (5, 4.0), (12, 4.0)):
        at = replace(collapsed, reprobes=n, reprobed_at=base, changed_at=base + wait - 1.0,
                     mode_at=base + wait - 1.0)  # (no up-probe due)
        early = decide(at, link(base + wait - 0.05, 14.9e6, 15e6, pacing_limited=True), cfg)
        assert early.mode is Mode.CRUISE, (n, early.decision)
        due = decide(at, link(base + wait + 0.01, 14.9e6, 15e6, pacing_limited=True), cfg)
        assert due.mode is Mode.PROBE and due.reprobes == n + 1, (n, due.decision)
    with pytest.raises(ValueError):
        ControllerConfig(reprobe_hold=5.0, reprobe_hold_max=4.0)
    # a low estimate that is not ours to judge is left alone: app-limited, lossy, or not at our cap
    for odd in (link(1.5, 1e6, 1e6, pacing_limited=True, app_limited=True),
                link(1.5, 1e6, 1e6, pacing_limited=True, loss=0.05), link(1.5, 1e6, 1e6, q=3.0)):
        kept = decide(cruising_at(40e6, cfg), odd, cfg)
        assert kept.decision.mode is not Mode.PROBE, odd



def test_an_up_probe_that_pays_from_a_collapsed_estimate_re_probes_at_once() -> None:
    """After a long fault the re-probes' hold has grown (up to reprobe_hold_max), and an up-probe may come
    first: when it pays, the link is coming back, and it is re-probed unpaced at once instead of climbing in
    1.1x .. 1.5x steps from 2 % of the link (a 10 s fault: back to 80 % 6-10 s after its end by steps, 1.5-3.5
    s with this). Negative controls: the same probe that did not pay cruises; one that paid from an estimate
    near the best steps on."""
    cfg = ControllerConfig()
    st = cruising_at(40e6, cfg)
    low = replace(st, decision=Decision(4, int(1.1e6) // 4, "bbr", Mode.UPPROBE, "up-probe"), changed_at=2.0,
                  probe_base=1e6, reprobes=5, reprobed_at=1.9)  # (the hold is far from over)
    paid = decide(low, link(2.0 + cfg.upprobe_time, 1.1e6, 1.1e6), cfg)
    assert paid.mode is Mode.PROBE and paid.decision.restart and paid.reprobes == 6, paid.decision
    flat = decide(low, link(2.0 + cfg.upprobe_time, 1e6, 1e6), cfg)
    assert flat.mode is Mode.CRUISE, flat.decision
    near = replace(low, probe_base=36e6, decision=replace(low.decision, pacing_rate=int(39.6e6) // 4))
    on = decide(near, link(2.0 + cfg.upprobe_time, 39e6, 39e6), cfg)
    assert on.mode is Mode.UPPROBE and on.upprobe_streak == 1, on.decision

def _layer_stream(clear_ratio: float, seconds: float = 12.0) -> list[float]:
    """A prefill streaming 20 MB layers every 0.166 s (half of a 2 Gbit/s, 80 ms link with a 20 ms queue)
    over 16 lanes, the controller starting paced at a warm-up's reading of half the link: the estimate at
    each tick."""
    rate, rtt = 250e6, 0.08
    link = FluidLink(rate, rtt, lanes=16, queue_bytes=0.02 * rate)
    link.advance(1.0)  # the warm-up: the lanes' BBR ramped up, unpaced
    cfg = ControllerConfig()
    loop = ClosedLoop(link, cfg, EstimatorConfig(bw_sample=0.2, clear_ratio=clear_ratio))
    loop.estimator.seed_capacity(0.5 * rate)
    loop.state = initial_state(cfg, capacity=0.5 * rate, lanes=16)
    link.set_lanes(16)
    link.set_pacing(loop.state.decision.total_pacing)
    start = sum(ln.sent for ln in link.lanes)

    def offering(t: float) -> bool:  # produced so far (a layer at each period's start) not all sent yet
        produced = (int((t - 1.0) / 0.166) + 1) * 20e6
        return sum(ln.sent for ln in link.lanes) - start < produced

    ticks = loop.run(seconds, offering=offering)
    return [tk.state.capacity or 0.0 for tk in ticks]


def test_a_layer_stream_paced_at_a_low_warm_up_reading_is_raised_to_the_link_by_its_up_probes() -> None:
    """A layer stream is app-limited: its goodput spans read what the prefill offers (half the link), so
    a warm-up reading of half the link stayed the estimate for good, every up-probe judged unpaid, and
    each layer crossed the link at half its rate. Its up-probes' bursts, paced above the estimate with no
    queue, now show in the lanes' delivery-rate samples and raise it, step by step, to the link (within
    ``burst_share``), never above it. Negative control: the same stream without those samples
    (``clear_ratio`` 0) stays at the reading."""
    rate = 250e6
    caps = _layer_stream(1.1)
    assert max(caps) <= 1.0 * rate, max(caps) / rate
    assert caps[-1] >= 0.85 * rate, [round(c / rate, 2) for c in caps[::10]]
    stuck = _layer_stream(0.0)
    assert max(stuck) <= 0.6 * rate, [round(c / rate, 2) for c in stuck[::10]]


def test_bbr_lanes_far_below_a_clear_link_are_restarted() -> None:
    """After a long stall BBR's own estimate is what is low (it regrows 25 % per eight round trips)."""
    cfg = ControllerConfig()
    st = cruising_at(40e6, cfg)
    st = decide(st, link(1.5, 2e6, 40e6), cfg)  # within settle + judge_after: not yet
    assert st.mode is Mode.CRUISE
    st = decide(st, link(1.01 + cfg.settle + cfg.judge_after, 2e6, 40e6), cfg)
    assert st.mode is Mode.PROBE and st.decision.restart
    held = decide(cruising_at(40e6, cfg), link(3.0, 2e6, 40e6, sndbuf=0.9), cfg)
    assert held.mode is not Mode.PROBE  # socket windows hold them: that is for more lanes, not a restart


def test_window_limited_lanes_double_while_it_pays() -> None:
    cfg = ControllerConfig(initial_lanes=4, max_lanes=16)
    st = ControllerState(Decision(4, None, "bbr", Mode.PROBE, "initial"), changed_at=0.0)
    st = decide(st, link(1.5, 100e6, None, sndbuf=0.6), cfg)
    assert st.decision.lanes == 8 and "send-buffer" in st.decision.reason
    same = decide(st, link(2.0, 180e6, None, sndbuf=0.6), cfg)
    assert same.decision.lanes == 8  # judged only a settle + judge_after later
    st = decide(st, link(2.9, 180e6, None, sndbuf=0.6), cfg)
    assert st.decision.lanes == 16
    st = ControllerState(Decision(8, None, "bbr", Mode.CRUISE, "x"), changed_at=0.0, lanes_at=0.0,
                         grown_from=100e6)
    assert decide(st, link(1.5, 105e6, None, sndbuf=0.6), cfg).decision.lanes == 8  # the last step did not pay
    assert decide(st, link(1.5, 200e6, None, q=1.5, sndbuf=0.6), cfg).decision.lanes == 8  # a queue: the link


def test_restart_congestion_keeps_the_algorithm_on_a_real_socket() -> None:
    if "reno" not in available_congestion_algorithms():
        pytest.skip("needs reno")
    srv = socket.create_server(("127.0.0.1", 0))
    a = socket.create_connection(srv.getsockname())
    b, _ = srv.accept()
    try:
        before = get_congestion(a)
        restart_congestion(a)
        assert get_congestion(a) == before
        a.sendall(b"x" * 100_000)
        got = 0
        while got < 100_000:
            got += len(b.recv(65536))
    finally:
        for s in (a, b, srv):
            s.close()


def test_one_queue_reading_is_no_drain_two_are() -> None:
    """A starved emulator releasing one batch late, or a delayed ACK, reads as a queue for one sample."""
    cfg = ControllerConfig()
    st = cruising_at(40e6, cfg)
    st = decide(st, link(1.5, 40e6, 40e6, q=2.0), cfg)
    assert st.mode is Mode.CRUISE and st.queue_at == 1.5
    st = decide(st, link(1.6, 40e6, 40e6, q=1.0), cfg)  # gone: nothing happened
    assert st.mode is Mode.CRUISE and st.queue_at is None
    st = decide(st, link(1.7, 40e6, 40e6, q=2.0), cfg)
    st = decide(st, link(1.8, 40e6, 40e6, q=2.0), cfg)  # it stands: drain
    assert st.mode is Mode.DRAIN
