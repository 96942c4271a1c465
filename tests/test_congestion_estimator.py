"""LinkEstimator on synthetic TCP_INFO streams: bandwidth, RTT, loss, limits, capacity."""

from __future__ import annotations

import json
from dataclasses import dataclass, replace

import pytest

from kvwire.congestion.estimator import EstimatorConfig, LinkEstimator, LinkState
from kvwire.congestion.tcpinfo import TcpInfo

DT = 0.1


@dataclass
class FakeLane:
    """Cumulative counters of one synthetic lane, advanced interval by interval."""

    acked: int = 0
    sent: int = 0
    retrans: int = 0
    busy_us: int = 0
    rwnd_us: int = 0
    sndbuf_us: int = 0

    def step(self, rate: float, *, loss: float = 0.0, busy: float = 1.0, rwnd: float = 0.0,
             sndbuf: float = 0.0) -> None:
        good = int(rate * DT)
        retr = int(good * loss)
        self.acked += good
        self.sent += good + retr
        self.retrans += retr
        b = int(busy * DT * 1e6)
        self.busy_us += b
        self.rwnd_us += int(rwnd * b)
        self.sndbuf_us += int(sndbuf * b)

    def info(self, rtt_us: int = 20_000, min_rtt_us: int = 20_000) -> TcpInfo:
        return TcpInfo(length=280, state=1, ca_state=0, snd_mss=1448, snd_cwnd=100, rtt_us=rtt_us,
                       min_rtt_us=min_rtt_us, bytes_acked=self.acked, bytes_sent=self.sent,
                       bytes_retrans=self.retrans, busy_time_us=self.busy_us,
                       rwnd_limited_us=self.rwnd_us, sndbuf_limited_us=self.sndbuf_us)


def run(est: LinkEstimator, lanes: list[FakeLane], t0: float, steps: int, rate: float,
        rtt_us: int = 20_000, *, min_rtt_us: int = 20_000, **kw: float) -> tuple[float, LinkState]:
    """Advance every lane ``steps`` intervals at ``rate`` bytes/s in total; return (t, last state)."""
    t = t0
    state = None
    for _ in range(steps):
        for lane in lanes:
            lane.step(rate / len(lanes), **kw)
        t += DT
        state = est.update(t, [lane.info(rtt_us=rtt_us, min_rtt_us=min_rtt_us) for lane in lanes])
    assert state is not None
    return t, state


def test_first_sample_has_no_rate_but_knows_rtt() -> None:
    est = LinkEstimator()
    s = est.update(0.0, [FakeLane().info()])
    assert s.goodput == 0.0 and s.btl_bw == 0.0
    assert s.min_rtt == pytest.approx(0.020) and s.queueing_ratio == pytest.approx(1.0)
    assert len(s.lanes) == 1 and s.lanes[0].lane == 0
    assert s.capacity is None and s.utilization is None and not s.congested


def test_steady_rate_is_measured() -> None:
    est = LinkEstimator()
    lanes = [FakeLane(), FakeLane()]
    est.update(0.0, [ln.info() for ln in lanes])
    _, s = run(est, lanes, 0.0, 20, 10e6)
    assert s.goodput == pytest.approx(10e6, rel=0.01)
    assert s.btl_bw == pytest.approx(10e6, rel=0.01)
    assert [ln.goodput for ln in s.lanes] == pytest.approx([5e6, 5e6], rel=0.01)
    assert s.busy == pytest.approx(1.0) and s.loss_rate == 0.0


def test_bandwidth_step_down_is_reflected_after_the_window() -> None:
    cfg = EstimatorConfig(bw_window=1.0, bw_sample=0.25, stats_window=0.5)
    est = LinkEstimator(cfg)
    lanes = [FakeLane() for _ in range(4)]
    est.update(0.0, [ln.info() for ln in lanes])
    t, s = run(est, lanes, 0.0, 30, 40e6)
    assert s.btl_bw == pytest.approx(40e6, rel=0.01)
    t, s = run(est, lanes, t, 3, 20e6)  # 0.3 s after the step: the max still remembers 40
    assert s.btl_bw == pytest.approx(40e6, rel=0.01)
    t, s = run(est, lanes, t, 8, 20e6)  # 1.1 s after: the last spans that averaged in 40 are still in
    assert 20e6 < s.btl_bw < 40e6
    t, s = run(est, lanes, t, 2, 20e6)  # 1.3 s = bw_window + bw_sample: the old rate is gone
    assert s.btl_bw == pytest.approx(20e6, rel=0.01)
    assert s.goodput == pytest.approx(20e6, rel=0.01)


def test_loss_raises_loss_rate_and_heavy_loss_is_congestion() -> None:
    est = LinkEstimator()
    lanes = [FakeLane(), FakeLane()]
    est.update(0.0, [ln.info() for ln in lanes])
    t, s = run(est, lanes, 0.0, 12, 10e6)
    assert s.loss_rate == 0.0
    t, s = run(est, lanes, t, 12, 10e6, loss=0.005)
    assert s.loss_rate == pytest.approx(0.005 / 1.005, rel=0.05)
    assert not s.congested
    _, s = run(est, lanes, t, 12, 10e6, loss=0.05)
    assert s.loss_rate == pytest.approx(0.05 / 1.05, rel=0.05)
    assert s.congested


def test_queue_inflation_raises_ratio_and_probes_capacity() -> None:
    est = LinkEstimator()
    lanes = [FakeLane()]
    est.update(0.0, [ln.info() for ln in lanes])
    t, s = run(est, lanes, 0.0, 12, 10e6, rtt_us=21_000)
    assert s.queueing_ratio == pytest.approx(1.05)
    assert not s.saturated and not s.congested and s.capacity is None
    t, s = run(est, lanes, t, 12, 25e6, rtt_us=50_000)
    assert s.min_rtt == pytest.approx(0.020)  # the window minimum survives the inflation
    assert s.queueing_ratio == pytest.approx(2.5)
    assert s.saturated and s.congested
    assert s.capacity == pytest.approx(25e6, rel=0.01)
    assert s.utilization == pytest.approx(1.0, rel=0.02)
    # below the probed capacity, with the queue drained, there is headroom
    _, s = run(est, lanes, t, 12, 10e6, rtt_us=20_000)
    assert s.capacity == pytest.approx(25e6, rel=0.01)
    assert s.utilization == pytest.approx(0.4, rel=0.02)
    assert s.available_bw == pytest.approx(15e6, rel=0.02)


def test_min_rtt_window_forgets_old_minimum() -> None:
    est = LinkEstimator(EstimatorConfig(rtt_window=1.0))
    lane = FakeLane()
    est.update(0.0, [lane.info(min_rtt_us=10_000)])
    for i in range(1, 16):
        lane.step(1e6)
        s = est.update(i * DT, [lane.info(rtt_us=30_000, min_rtt_us=30_000)])
    assert s.min_rtt == pytest.approx(0.030)


def test_configured_capacity_gives_utilization() -> None:
    est = LinkEstimator(EstimatorConfig(capacity=50e6))
    lanes = [FakeLane()]
    est.update(0.0, [ln.info() for ln in lanes])
    _, s = run(est, lanes, 0.0, 12, 20e6)
    assert s.utilization == pytest.approx(0.4, rel=0.01)
    assert s.available_bw == pytest.approx(30e6, rel=0.01)
    est.set_capacity(25e6)  # the config wins over a late external probe
    assert est.update(1.3, [ln.info() for ln in lanes]).capacity == 50e6


def test_limited_shares_and_app_limited_busy() -> None:
    est = LinkEstimator()
    lanes = [FakeLane(), FakeLane()]
    est.update(0.0, [ln.info() for ln in lanes])
    _, s = run(est, lanes, 0.0, 12, 10e6, busy=0.5, rwnd=0.4, sndbuf=0.1)
    assert s.busy == pytest.approx(0.5, rel=0.01)
    assert s.rwnd_limited == pytest.approx(0.4, rel=0.01)
    assert s.sndbuf_limited == pytest.approx(0.1, rel=0.01)
    assert s.lanes[0].rwnd_limited == pytest.approx(0.4, rel=0.01)


def test_reconnected_lane_counters_reset_without_negative_rates() -> None:
    est = LinkEstimator()
    lane = FakeLane()
    est.update(0.0, {"a": lane.info()})
    lane.step(10e6)
    est.update(0.1, {"a": lane.info()})
    fresh = FakeLane()  # a new socket behind the same key: counters restart at zero
    fresh.step(10e6)
    s = est.update(0.2, {"a": fresh.info()})
    assert s.lanes[0].goodput == 0.0 and s.goodput > 0  # the 0.1 s interval before still counts
    fresh.step(10e6)
    s = est.update(0.3, {"a": fresh.info()})
    assert s.lanes[0].goodput == pytest.approx(10e6, rel=0.01)


def test_old_kernel_fields_missing() -> None:
    est = LinkEstimator()
    old = TcpInfo(length=104, state=1, rtt_us=20_000, snd_cwnd=10, snd_mss=1448)
    est.update(0.0, [old])
    s = est.update(0.1, [replace(old, rtt_us=22_000)])
    assert s.goodput == 0.0 and s.min_rtt is None and s.queueing_ratio is None
    assert s.srtt == pytest.approx(0.022)


def test_timestamps_must_increase() -> None:
    est = LinkEstimator()
    est.update(1.0, [])
    with pytest.raises(ValueError):
        est.update(1.0, [])


def test_to_dict_is_plain_data() -> None:
    est = LinkEstimator()
    lanes = [FakeLane(), FakeLane()]
    est.update(0.0, [ln.info() for ln in lanes])
    _, s = run(est, lanes, 0.0, 5, 10e6)
    d = s.to_dict()
    again = json.loads(json.dumps(d))
    assert again["goodput"] == pytest.approx(s.goodput)
    assert [ln["lane"] for ln in again["lanes"]] == [0, 1]
    assert set(d) >= {"utilization", "available_bw", "btl_bw", "goodput", "min_rtt", "srtt",
                      "queueing_ratio", "loss_rate", "congested", "lanes", "timestamp"}


def test_capacity_follows_a_rate_drop_under_a_queue_within_a_few_samples() -> None:
    est = LinkEstimator(EstimatorConfig(bw_sample=0.2))
    lanes = [FakeLane(), FakeLane()]
    est.update(0.0, [ln.info() for ln in lanes])
    t, s = run(est, lanes, 0.0, 12, 40e6, rtt_us=30_000)
    assert s.capacity == pytest.approx(40e6, rel=0.02)
    t, s = run(est, lanes, t, 3, 20e6, rtt_us=60_000)  # the link halved: 0.3 s later ...
    assert s.capacity == pytest.approx(20e6, rel=0.02)  # ... not the 1 s windowed max
    assert s.btl_bw == pytest.approx(40e6, rel=0.02)
    _, s = run(est, lanes, t, 5, 19e6, rtt_us=20_000)  # paced below it, queue gone: stays down
    assert s.capacity == pytest.approx(20e6, rel=0.02)


def test_sharing_reads_a_queue_below_capacity_as_competing_traffic() -> None:
    est = LinkEstimator(EstimatorConfig(capacity_follows_queue=False))
    est.seed_capacity(40e6)
    lanes = [FakeLane()]
    est.update(0.0, [ln.info() for ln in lanes])
    t, s = run(est, lanes, 0.0, 12, 38e6, rtt_us=21_000)
    assert s.competing_bw == 0.0 and s.usable_bw == pytest.approx(40e6, rel=0.02)
    _, s = run(est, lanes, t, 12, 20e6, rtt_us=60_000)  # another flow fills the queue and takes half
    assert s.capacity == pytest.approx(40e6, rel=0.02)
    assert s.competing_bw == pytest.approx(20e6, rel=0.05)
    assert s.available_bw == 0.0 and s.usable_bw == pytest.approx(20e6, rel=0.05)


def _with_delivered(info: TcpInfo, delivered_bytes: int) -> TcpInfo:
    return replace(info, delivered=(delivered_bytes // 1448) & 0xFFFFFFFF)


def test_goodput_counts_delivered_segments_so_a_loss_recovery_is_no_burst() -> None:
    """During a recovery SACKed data is delivered at the link rate while the cumulative ACK stalls; the
    ACK that ends the recovery jumps. ``bytes_acked`` would read a burst faster than the link,
    ``tcpi_delivered`` does not (and it wraps at 2**32 segments)."""
    est = LinkEstimator(EstimatorConfig(bw_sample=0.2, capacity_follows_queue=False))
    rate, t = 40e6, 0.0
    base = (0xFFFFFFFF - 50) * 1448  # the segment counter wraps during the run
    acked = delivered = 0
    lane = FakeLane()
    est.update(t, [_with_delivered(lane.info(), base)])
    rates = []
    for i in range(30):
        delivered += int(rate * DT)
        stalled = 10 <= i < 13  # three intervals of recovery: nothing cumulatively ACKed ...
        acked = acked if stalled else delivered  # ... then all of it at once
        lane.acked = acked
        t += DT
        s = est.update(t, [_with_delivered(lane.info(), base + delivered)])
        rates.append(s.btl_bw)
    assert max(rates) == pytest.approx(rate, rel=0.02)
    assert s.goodput == pytest.approx(rate, rel=0.02)
    # without the field (an old kernel) the estimator falls back to bytes_acked: the jump shows
    est2 = LinkEstimator(EstimatorConfig(bw_sample=0.2))
    acked, lane2, t, peak = 0, FakeLane(), 0.0, 0.0
    est2.update(t, [lane2.info()])
    for i in range(30):
        delivered_i = int(rate * DT) * (i + 1)
        lane2.acked = lane2.acked if 10 <= i < 13 else delivered_i
        t += DT
        peak = max(peak, est2.update(t, [lane2.info()]).btl_bw)
    assert peak > 1.5 * rate


def test_capacity_under_a_queue_is_what_the_link_served_while_it_stood() -> None:
    """An up-probe fills a queue for one interval: the capacity is that interval's rate, not a span
    mixing it with the cruise before it."""
    est = LinkEstimator(EstimatorConfig(bw_sample=0.3))
    lanes = [FakeLane()]
    est.update(0.0, [ln.info() for ln in lanes])
    t, s = run(est, lanes, 0.0, 5, 40e6, rtt_us=40_000)  # probe: the link full at 40e6
    assert s.capacity == pytest.approx(40e6, rel=0.01)
    t, s = run(est, lanes, t, 10, 36e6, rtt_us=20_000)  # cruising below it, no queue
    t, s = run(est, lanes, t, 1, 40e6, rtt_us=30_000)  # up-probe: a queue stands at once
    assert s.saturated and s.capacity == pytest.approx(40e6, rel=0.01)


def test_rtt_floor_keeps_sub_millisecond_noise_from_reading_as_a_queue() -> None:
    est = LinkEstimator()  # rtt_floor 1 ms
    lanes = [FakeLane()]
    est.update(0.0, [ln.info(rtt_us=30, min_rtt_us=20) for ln in lanes])
    t = 0.0
    for _ in range(5):
        lanes[0].step(1e9)
        t += DT
        s = est.update(t, [lanes[0].info(rtt_us=600, min_rtt_us=20)])  # loopback under load: 30x min_rtt
    assert s.min_rtt == pytest.approx(20e-6) and s.queueing_ratio == 1.0
    assert not s.congested and not s.saturated
    s = est.update(t + DT, [lanes[0].info(rtt_us=3000, min_rtt_us=20)])  # 3 ms of queue is one
    assert s.queueing_ratio == pytest.approx(3.0) and s.congested


def test_a_drain_emptying_the_queue_does_not_lower_the_capacity() -> None:
    """srtt lags the queue: the interval in which a drain emptied it still reads as saturated while the
    link idled part of it. A shrinking queue is not evidence of the link's rate."""
    est = LinkEstimator(EstimatorConfig(bw_sample=0.2))
    lanes = [FakeLane()]
    est.update(0.0, [ln.info() for ln in lanes])
    t, s = run(est, lanes, 0.0, 5, 40e6, rtt_us=40_000)
    assert s.capacity == pytest.approx(40e6, rel=0.01)
    t, s = run(est, lanes, t, 1, 30e6, rtt_us=28_000)  # draining at 75 %: the queue shrinks ...
    t, s = run(est, lanes, t, 1, 30e6, rtt_us=26_000)  # ... still above saturated_ratio
    assert s.saturated and s.capacity == pytest.approx(40e6, rel=0.01)
    # and goodput over raise_span that reaches back before a rate drop does not undo it
    t, s = run(est, lanes, t, 3, 20e6, rtt_us=60_000)
    assert s.capacity == pytest.approx(20e6, rel=0.05)
    t, s = run(est, lanes, t, 3, 19e6, rtt_us=20_000)
    assert s.capacity == pytest.approx(20e6, rel=0.05)


def test_a_rate_drop_is_measured_without_the_interval_it_fell_in() -> None:
    """The interval in which the rate fell is served partly at the old rate, and the drain that answers
    the drop starts within an interval or two, freezing the run (a shrinking queue measures nothing).
    The run's first interval is left out once there is another, so what stands is the new rate."""
    est = LinkEstimator(EstimatorConfig(bw_sample=0.2))
    lanes = [FakeLane()]
    est.update(0.0, [ln.info() for ln in lanes])
    t, s = run(est, lanes, 0.0, 10, 40e6, rtt_us=20_000)
    t, s = run(est, lanes, t, 3, 40e6, rtt_us=40_000)  # a probe: the link full at 40e6
    assert s.capacity == pytest.approx(40e6, rel=0.01)
    t, s = run(est, lanes, t, 10, 39e6, rtt_us=20_000)  # cruise
    t, s = run(est, lanes, t, 1, 30e6, rtt_us=60_000)  # the link halves a third into this interval
    t, s = run(est, lanes, t, 1, 20e6, rtt_us=100_000)  # the queue grows: [30e6, 20e6] stood 0.2 s
    assert s.capacity == pytest.approx(20e6, rel=0.01)  # not 25e6, the average with the old rate
    for rtt in (90_000, 70_000, 50_000):  # the drain empties it: those intervals are left out
        t, s = run(est, lanes, t, 1, 17e6, rtt_us=rtt)
    assert s.capacity == pytest.approx(20e6, rel=0.01)
    t, s = run(est, lanes, t, 1, 14e6, rtt_us=30_000)  # emptied within this interval: left out
    t, s = run(est, lanes, t, 3, 19e6, rtt_us=20_000)
    assert s.capacity == pytest.approx(20e6, rel=0.01)
    # the first interval is left out only when that lowers the estimate: a queue that forms while the
    # rate holds is measured over the whole run (one 100 ms interval alone is noisier; polite mode never
    # lowers what its first probe found, so a high reading would stick)
    polite = LinkEstimator(EstimatorConfig(bw_sample=0.2, capacity_follows_queue=False))
    one = [FakeLane()]
    polite.update(0.0, [ln.info() for ln in one])
    t, s = run(polite, one, 0.0, 1, 40e6, rtt_us=30_000)
    t, s = run(polite, one, t, 1, 42e6, rtt_us=40_000)
    assert s.capacity == pytest.approx(41e6, rel=0.01)


def test_lanes_that_join_under_a_queue_do_not_read_as_a_slower_link() -> None:
    """A LaneGroup member that becomes busy adds its lanes to the samples; their bytes count from their
    second sample, so the interval they joined in undercounts what the link served. It must not set the
    capacity (the queue that its lanes' first burst raises is still a full link)."""
    est = LinkEstimator(EstimatorConfig(bw_sample=0.2))
    a, b = FakeLane(), FakeLane()
    est.update(0.0, {1: a.info()})
    t, s = run_keyed(est, {1: a}, 0.0, 3, 40e6, rtt_us=40_000)  # one member fills the link
    assert s.capacity == pytest.approx(40e6, rel=0.01)
    t, s = run_keyed(est, {1: a, 2: b}, t, 1, 40e6, rtt_us=50_000)  # b joins: only a's half is counted
    assert s.capacity == pytest.approx(40e6, rel=0.01)
    t, s = run_keyed(est, {1: a, 2: b}, t, 2, 40e6, rtt_us=50_000)  # both counted from here on
    assert s.capacity == pytest.approx(40e6, rel=0.01)
    _, s = run_keyed(est, {2: b}, t, 1, 40e6, rtt_us=50_000)  # a goes idle and leaves the samples
    assert s.capacity == pytest.approx(40e6, rel=0.01)


def run_keyed(est: LinkEstimator, lanes: dict[int, FakeLane], t0: float, steps: int, rate: float,
              rtt_us: int) -> tuple[float, LinkState]:
    """``run`` with lanes keyed as LinkMonitor keys them (by file descriptor), so the set can change."""
    t, state = t0, None
    for _ in range(steps):
        for lane in lanes.values():
            lane.step(rate / len(lanes))
        t += DT
        state = est.update(t, {k: lane.info(rtt_us=rtt_us) for k, lane in lanes.items()})
    assert state is not None
    return t, state


def test_a_first_overflowing_queue_gives_the_capacity_at_once_a_later_one_never_raises_it() -> None:
    """Lanes starting unpaced on a shallow queue overflow it within a few round trips (4 BBR lanes on 400
    Mbit/s, 20 ms, a one-BDP queue: a fifth of their packets lost). The first interval with a standing
    queue and congestive loss says the link is full: the capacity is at once the fastest the link
    delivered (``btl_bw``, or the lanes' latest delivery-rate samples summed, no more than the aggregate's
    goodput over the last round trip), without the ``bw_sample`` of
    standing queue a capacity otherwise needs.
    Negative control: the same queue with only the path's random loss (0.1 %) leaves it unknown. Later,
    a queue overflows because the rate fell: the capacity follows it down, not up to the old best."""

    def start(loss: float, delivery_rate: int | None = None) -> tuple[LinkEstimator, list[FakeLane], float, LinkState]:
        est = LinkEstimator(EstimatorConfig(bw_sample=0.2))
        lanes = [FakeLane(), FakeLane()]
        est.update(0.0, [ln.info() for ln in lanes])
        t, s = run(est, lanes, 0.0, 1, 10e6)
        t, s = run(est, lanes, t, 1, 30e6)
        assert s.capacity is None and not s.overflowing
        for ln in lanes:
            ln.step(45e6 / 2, loss=loss)
        t += DT
        s = est.update(t, [replace(ln.info(rtt_us=40_000), delivery_rate=delivery_rate) for ln in lanes])
        return est, lanes, t, s

    _, _, _, s = start(0.001)
    assert s.saturated and not s.overflowing and s.capacity is None
    est, lanes, t, s = start(0.1)
    assert s.overflowing and s.capacity == pytest.approx(s.btl_bw) and s.btl_bw == pytest.approx(37.5e6, rel=0.01)
    _, _, _, s2 = start(0.1, delivery_rate=22_000_000)  # each lane's last round trip: half of 44e6
    assert s2.overflowing and s2.capacity == pytest.approx(44e6, rel=0.01)  # (btl_bw's span reaches into the ramp)
    # the lanes' samples, taken at different moments of a ramp, can sum above what the link delivers: the
    # aggregate's goodput over the last round trip (45e6 here) bounds them (over 10-16 lanes they read 119-140 %)
    _, _, _, s3 = start(0.1, delivery_rate=40_000_000)
    assert s3.overflowing and s3.capacity == pytest.approx(45e6, rel=0.01)
    t, s = run(est, lanes, t, 10, 45e6)  # paced at it, the queue gone: raised to what the link delivers
    assert s.capacity == pytest.approx(45e6, rel=0.02) and not s.overflowing
    _, s = run(est, lanes, t, 3, 20e6, rtt_us=60_000, loss=0.1)  # the link halved and the queue overflows
    assert s.overflowing and s.btl_bw == pytest.approx(45e6, rel=0.02)
    assert s.capacity == pytest.approx(22.5e6, rel=0.02)  # down (to floor_fraction of the last second's best)


def _bursts(est: LinkEstimator, lanes: list[FakeLane], t: float, seconds: float,
            rate: float) -> tuple[float, LinkState]:
    """A prefill streaming layers at half the link: 0.3 s bursts at ``rate`` (the link's), 0.3 s with
    nothing queued (every lane idle)."""
    state = None
    while seconds > 1e-9:
        t, state = run(est, lanes, t, 3, rate)
        t, state = run(est, lanes, t, 3, 0.0, busy=0.0)
        seconds -= 0.6
    assert state is not None
    return t, state


def test_bursts_of_an_app_limited_sender_raise_a_low_estimate_to_the_rate_the_link_served() -> None:
    """An estimate taken low (0.7 of the link, say from a probe the host's own delay cut short) stayed
    there while the sender streamed: its raise_span average (half the link) never exceeded it. The
    bursts the link served at its rate now raise it, to burst_share of them, never above them; a sender
    whose bursts are slower than the estimate neither raises nor lowers it."""
    cap, cfg = 100e6, EstimatorConfig()
    est = LinkEstimator(cfg)
    lanes = [FakeLane(), FakeLane()]
    est.update(0.0, [ln.info() for ln in lanes])
    est.seed_capacity(0.7 * cap)
    _, s = _bursts(est, lanes, 0.0, 3.0, cap)
    assert s.capacity == pytest.approx(cfg.burst_share * cap, rel=0.02)
    slow = LinkEstimator(cfg)
    slow.update(0.0, [ln.info() for ln in lanes])
    slow.seed_capacity(0.7 * cap)
    _, s = _bursts(slow, lanes, 0.0, 3.0, 0.5 * cap)
    assert s.capacity == pytest.approx(0.7 * cap)


def _layers(est: LinkEstimator, lanes: list[FakeLane], t: float, seconds: float, pace: float, *,
            delivery_rates: tuple[float | None, float | None], cap: float | None,
            rtt_us: int = 80_000) -> tuple[float, LinkState]:
    """A layer stream on an 80 ms path: in every other 0.1 s interval each lane sends for 70 ms at its share
    of ``pace`` (bytes/s, all lanes), then nothing is queued; the lanes' ``TCP_INFO`` carries the delivery
    rate ``delivery_rates[0]`` after a burst and ``[1]`` after a gap (the kernel keeps its last sample
    through one: give both the same) and a pacing cap of ``cap`` (per lane; None: unpaced)."""
    state = None
    n = len(lanes)
    while seconds > 1e-9:
        for busy, rate in zip((0.7, 0.0), delivery_rates):
            for ln in lanes:
                ln.step(busy * pace / n, busy=busy)
            t += DT
            state = est.update(t, [replace(ln.info(rtt_us=rtt_us, min_rtt_us=80_000),
                                           delivery_rate=None if rate is None else int(rate),
                                           max_pacing_rate=None if cap is None else int(cap)) for ln in lanes])
        seconds -= 2 * DT
    assert state is not None
    return t, state


def test_paced_lanes_delivery_samples_raise_a_low_estimate_where_layer_bursts_are_too_short_for_spans() -> None:
    """A layer (16.8 MB, 70 ms on 2 Gbit/s) is shorter than any goodput span that reads a capacity on an
    80 ms path, so a stream's up-probes never raised a warm-up reading of half the link: at 1.5x of it
    every lane delivered its whole pacing share and the estimate moved 1 %. Paced lanes' delivery-rate
    samples with no queue standing, in two samples running, now raise it to their sum, each lane's sample
    counted up to its own cap (not ``burst_share`` of it: a 1.1x up-probe whose lanes delivered 98 % of their
    caps then moved the estimate under the 3 % that makes a probe pay, and a stream at 0.75x of a 2 Gbit/s
    link stayed there for 17 s of probes). Negative controls: unpaced lanes (samples in a ramp sum above the
    link), a standing queue, one sample alone, and no samples (the old reading) leave it."""
    link, cfg = 100e6, EstimatorConfig()
    share = 0.375 * link  # each of 2 lanes' pacing cap: 1.5x an estimate of half the link, split

    def stream(burst: float | None, cap: float | None, *, rtt_us: int = 80_000,
               gap: float | None = None) -> LinkState:
        est = LinkEstimator(cfg)
        lanes = [FakeLane(), FakeLane()]
        est.update(0.0, [ln.info(rtt_us=80_000, min_rtt_us=80_000) for ln in lanes])
        est.seed_capacity(0.5 * link)
        rates = (burst, burst if gap is None else gap)
        return _layers(est, lanes, 0.0, 2.0, 2 * share, delivery_rates=rates, cap=cap, rtt_us=rtt_us)[1]

    raised = 2 * share
    assert stream(share, share).capacity == pytest.approx(raised, rel=0.01)
    assert stream(1.5 * share, share).capacity == pytest.approx(raised, rel=0.01)  # counted up to the cap
    assert stream(share, None).capacity == pytest.approx(0.5 * link)  # unpaced
    assert stream(share, share, rtt_us=100_000).capacity == pytest.approx(0.5 * link)  # a queue stands
    assert stream(share, share, gap=0.2 * link).capacity == pytest.approx(0.5 * link)  # one sample at a time
    assert stream(None, share).capacity == pytest.approx(0.5 * link)  # no samples: the spans alone


def test_a_seeded_capacity_floors_the_estimate_for_floor_window_like_a_rate_the_link_delivered() -> None:
    """A warm-up's reading is a rate the link delivered: for ``floor_window`` after it the estimate stays
    above ``floor_fraction`` of it. At a first request the host stalled (srtt 1.7x the min RTT on a 20 ms
    queue, little acked), which reads as a standing queue: the estimate followed it to a quarter of the
    warm-up's reading, and the request took 1.71x the ideal. Negative controls: a reading older than
    ``floor_window``, and one seeded without a time, are followed down."""
    cfg = EstimatorConfig(bw_sample=0.2)

    def first_request(seeded_at: float | None) -> LinkState:
        est = LinkEstimator(cfg)
        lanes = [FakeLane(), FakeLane()]
        est.seed_capacity(100e6, seeded_at)  # before any sample, as LinkControl seeds it
        est.update(0.0, [ln.info() for ln in lanes])
        _, s = run(est, lanes, 0.0, 6, 20e6, rtt_us=34_000)
        assert s.saturated
        return s

    assert first_request(0.0).capacity == pytest.approx(cfg.floor_fraction * 100e6)
    assert first_request(-2.0).capacity == pytest.approx(20e6, rel=0.05)
    assert first_request(None).capacity == pytest.approx(20e6, rel=0.05)


def test_lanes_that_open_during_an_interval_do_not_read_as_idle_time() -> None:
    """10 busy lanes, then 6 more open during a long (0.4 s) interval and all 16 stay busy: the lanes'
    busy share is 1.0 throughout (the new ones have no busy time to show for the interval they opened in).
    Before, the 6 counted as idle lane-time and busy read 0.8 for the stats window, holding off decisions."""
    est = LinkEstimator()
    lanes = {k: FakeLane() for k in range(10)}
    est.update(0.0, {k: ln.info() for k, ln in lanes.items()})
    t, s = run_keyed(est, lanes, 0.0, 5, 100e6, rtt_us=20_000)
    assert s.busy == pytest.approx(1.0, abs=0.01)
    for k in range(10, 16):
        lanes[k] = FakeLane()
    for k in range(10):
        lanes[k].busy_us += 400_000
        lanes[k].acked += int(0.4 * 100e6 / 10)
    t += 0.4
    s = est.update(t, {k: ln.info() for k, ln in lanes.items()})
    assert s.busy == pytest.approx(1.0, abs=0.01), s.busy
    t, s = run_keyed(est, lanes, t, 2, 100e6, rtt_us=20_000)
    assert s.busy == pytest.approx(1.0, abs=0.01), s.busy


def test_unqueued_is_the_share_of_lane_samples_with_an_empty_socket_and_no_send_buffer_limit() -> None:
    """``LinkState.unqueued``: over the stats window, how often a lane had nothing unsent (and was not held
    by its send buffer). Busy time cannot say it: data in flight for a round trip reads busy."""
    def feed(notsent: list[int | None], sndbuf: float = 0.0) -> LinkState:
        est = LinkEstimator()
        lanes = [FakeLane(), FakeLane()]
        est.update(0.0, [replace(ln.info(), notsent_bytes=n) for ln, n in zip(lanes, notsent)])
        t, state = 0.0, None
        for _ in range(10):
            for ln in lanes:
                ln.step(5e6, busy=1.0, sndbuf=sndbuf)
            t += DT
            state = est.update(t, [replace(ln.info(), notsent_bytes=n) for ln, n in zip(lanes, notsent)])
        assert state is not None and state.busy == pytest.approx(1.0)
        return state

    assert feed([0, 0]).unqueued == pytest.approx(1.0)  # busy all along, yet nothing was ever queued
    assert feed([0, 65536]).unqueued == pytest.approx(0.5)
    assert feed([65536, 65536]).unqueued == 0.0
    assert feed([0, 0], sndbuf=0.5).unqueued == 0.0  # held by the send buffer: the writer has more
    assert feed([None, None]).unqueued == 0.0  # a kernel without notsent_bytes: counted as queued


def _step_by(est: LinkEstimator, lanes: list[FakeLane], t: float, dt: float, rate: float, *, rtt_us: int,
             loss: float = 0.0, delivery_rate: int | None = None, min_rtt_us: int = 80_000) -> tuple[float, LinkState]:
    """One sampling interval of ``dt`` seconds (not ``DT``) at ``rate`` bytes/s over the lanes, busy throughout."""
    for ln in lanes:
        good = int(rate * dt / len(lanes))
        retr = int(good * loss)
        ln.acked += good
        ln.sent += good + retr
        ln.retrans += retr
        ln.busy_us += int(dt * 1e6)
    t += dt
    infos = [replace(ln.info(rtt_us=rtt_us, min_rtt_us=min_rtt_us), delivery_rate=delivery_rate) for ln in lanes]
    return t, est.update(t, infos)


def test_a_capacity_rests_on_goodput_over_two_round_trips_not_one_intervals_spike() -> None:
    """On an 80 ms path sampled every 50 ms (the warm-up's probe), the lanes plateau at the link's rate with
    a queue under the saturation ratio, then one interval's ACKs read 1.5x the link (ACK bunching, or the
    sampler's timing error on a loaded host) as the queue overflows, the lanes' delivery-rate samples summing
    to 1.5x too. The first-overflow capacity is bounded by the aggregate's goodput over two round trips, so
    the spike's excess counts diluted over them (1.125x; over the 0.1 s it was bounded by before: 1.25x).
    Later, with the capacity known, one saturated interval at 1.5x (shorter than two round trips) does not
    raise it. Negative controls: a link that really delivers 1.5x for two round trips reads 1.5x, and the
    same plateau without the spike reads the link exactly."""
    link = 240e6  # bytes/s: 1.93 Gbit/s

    def overflow(spike: float, plateau: float = link) -> tuple[LinkEstimator, list[FakeLane], float, LinkState]:
        est = LinkEstimator(EstimatorConfig(bw_sample=0.2, stats_window=0.4))
        lanes = [FakeLane(), FakeLane()]
        t = 0.0
        est.update(t, [ln.info(rtt_us=80_000, min_rtt_us=80_000) for ln in lanes])
        for rate in (0.3 * link, 0.6 * link):  # the ramp
            t, s = _step_by(est, lanes, t, 0.05, rate, rtt_us=80_000)
        for _ in range(4):  # the plateau, a queue under the 1.25 ratio (a 20 ms queue at 80 ms peaks at ~1.23)
            t, s = _step_by(est, lanes, t, 0.05, plateau, rtt_us=96_000)
            assert s.capacity is None
        t, s = _step_by(est, lanes, t, 0.05, spike, rtt_us=104_000, loss=0.1, delivery_rate=int(spike / 2))
        assert s.overflowing
        return est, lanes, t, s

    est, lanes, t, s = overflow(1.5 * link)
    assert s.capacity == pytest.approx((3 * link + 1.5 * link) / 4, rel=0.01)
    assert s.capacity < 1.13 * link
    _, _, _, clean = overflow(link)  # negative control: no spike, the link's rate exactly
    assert clean.capacity == pytest.approx(link, rel=0.01)
    _, _, _, faster = overflow(1.5 * link, plateau=1.5 * link)  # a link that delivered 1.5x for 0.2 s is 1.5x
    assert faster.capacity == pytest.approx(1.5 * link, rel=0.01)

    est2 = LinkEstimator(EstimatorConfig(bw_sample=0.2, stats_window=0.4))
    lanes2 = [FakeLane(), FakeLane()]
    t = 0.0
    est2.update(t, [ln.info(rtt_us=80_000, min_rtt_us=80_000) for ln in lanes2])
    for _ in range(4):
        t, s = _step_by(est2, lanes2, t, 0.05, link, rtt_us=80_000)
    est2.seed_capacity(link)
    t, s = _step_by(est2, lanes2, t, 0.05, 1.5 * link, rtt_us=104_000)  # one saturated interval at 1.5x
    assert s.saturated and s.capacity == pytest.approx(link, rel=0.01)
    t, s = _step_by(est2, lanes2, t, 0.05, link, rtt_us=104_000)  # the run goes on at the link's rate
    assert s.saturated and s.capacity == pytest.approx(link, rel=0.01)
    t, s = _step_by(est2, lanes2, t, 0.05, 1.5 * link, rtt_us=104_000)  # negative control: the link did speed
    t, s = _step_by(est2, lanes2, t, 0.05, 1.5 * link, rtt_us=104_000)  # up, for two round trips under a queue
    assert s.saturated and s.capacity is not None and s.capacity > 1.2 * link


def test_a_queue_run_lowers_the_estimate_no_further_than_the_paced_lanes_delivery_samples() -> None:
    """Under a standing queue the estimate follows the run's goodput down, but no lower than the least sum
    of the paced lanes' delivery-rate samples over the run: those are the kernel's, each over one packet's
    send and ACK intervals, so a stall that holds ACKs back (little acked, srtt up: a busy receiver or
    emulator) or an overflow's losses do not slow them, while a rate drop does within a round trip. On
    2 Gbit/s, 80 ms, an overflow's run read 1683 Mbit/s where the samples summed to 1830-1973 (the payload
    rate 1931) and the requests after paced at 87 %. Negative controls: samples that fell with the goodput (a
    rate drop), an unpaced lane (no sum), and no samples at all are followed down as before."""
    link, cap = 100e6, 60e6  # bytes/s: the link, and each of 2 lanes' pacing cap

    def run_under_a_queue(delivery: float | None, paced: bool = True) -> LinkState:
        est = LinkEstimator(EstimatorConfig(bw_sample=0.2))
        lanes = [FakeLane(), FakeLane()]

        def infos(rtt_us: int) -> list[TcpInfo]:
            return [replace(ln.info(rtt_us=rtt_us, min_rtt_us=80_000),
                            delivery_rate=None if delivery is None else int(delivery / 2),
                            max_pacing_rate=int(cap) if paced else None) for ln in lanes]

        est.update(0.0, infos(80_000))
        est.seed_capacity(link)
        t = 0.0
        for _ in range(6):  # a stall: a queue reads (srtt 2x), 40 % of the link acked
            for ln in lanes:
                ln.step(0.2 * link)
            t += DT
            state = est.update(t, infos(160_000))
        assert state.saturated
        return state

    assert run_under_a_queue(0.95 * link).capacity == pytest.approx(0.95 * link, rel=0.01)
    assert run_under_a_queue(0.4 * link).capacity == pytest.approx(0.5 * link, rel=0.02)  # floor_fraction of the seed
    assert run_under_a_queue(0.95 * link, paced=False).capacity == pytest.approx(0.5 * link, rel=0.02)
    assert run_under_a_queue(None).capacity == pytest.approx(0.5 * link, rel=0.02)


def _overflowed(link: float) -> tuple[LinkEstimator, list[FakeLane], float]:
    """An estimator that saw a 20 ms drop-tail queue on an 80 ms path overflow at ``link`` bytes/s (ratio 1.25,
    5 % loss), then the queue drain: the buffer is 20 ms x ``link`` bytes."""
    est = LinkEstimator(EstimatorConfig(bw_sample=0.2))
    lanes = [FakeLane(), FakeLane()]
    est.update(0.0, [ln.info(rtt_us=80_000, min_rtt_us=80_000) for ln in lanes])
    t, s = run(est, lanes, 0.0, 3, link, 100_000, min_rtt_us=80_000, loss=0.05)
    assert s.overflowing and s.capacity == pytest.approx(link, rel=0.01)
    assert s.buffer == pytest.approx(0.02 * link, rel=0.01) and s.max_queue == pytest.approx(0.03, rel=0.01)
    t, s = run(est, lanes, t, 12, link, 80_000, min_rtt_us=80_000)  # the queue gone, the lanes at the link's rate
    assert not s.saturated and s.capacity == pytest.approx(link, rel=0.01)
    return est, lanes, t


def test_a_lossless_queue_deeper_than_the_buffer_an_overflow_showed_lowers_no_estimate() -> None:
    """A drop-tail queue holds no more than it held when it dropped: once an overflow read the bottleneck's
    buffer (20 ms on 80 ms), a lossless "queue" of 100 ms (ratio 2.25, a host stall holding packets or ACKs
    back, 40 % of the link acked) is delay elsewhere (``stalled``): the estimate stays. Seen on a 2-core host
    emulating 2 Gbit/s, 80 ms: such stalls took the estimate to 0.6-0.7x of the link and the first request ran at
    77 % of it. Negative controls: the same stall with no overflow seen before is followed down (to the floor),
    and so is a real rate drop after the overflow (the link halves: the buffer's bytes now read 40 ms, ratio 1.5,
    and it overflows again)."""
    link = 100e6
    est, lanes, t = _overflowed(link)
    t, s = run(est, lanes, t, 5, 0.4 * link, 180_000, min_rtt_us=80_000)
    assert s.saturated and s.stalled and not s.overflowing
    assert s.capacity == pytest.approx(link, rel=0.01)
    assert s.competing_bw == 0.0  # (nor is it another flow's queue)

    fresh = LinkEstimator(EstimatorConfig(bw_sample=0.2))  # negative control: no overflow seen
    fresh_lanes = [FakeLane(), FakeLane()]
    fresh.update(0.0, [ln.info(rtt_us=80_000, min_rtt_us=80_000) for ln in fresh_lanes])
    t2, s2 = run(fresh, fresh_lanes, 0.0, 12, link, 80_000, min_rtt_us=80_000)
    fresh.seed_capacity(link)
    t2, s2 = run(fresh, fresh_lanes, t2, 5, 0.4 * link, 180_000, min_rtt_us=80_000)
    assert s2.max_queue is None and not s2.stalled and s2.capacity is not None and s2.capacity < 0.6 * link

    est, lanes, t = _overflowed(link)  # negative control: a real rate drop still lowers it
    t, s = run(est, lanes, t, 5, 0.5 * link, 120_000, min_rtt_us=80_000, loss=0.05)
    assert s.overflowing and not s.stalled and s.capacity == pytest.approx(0.5 * link, rel=0.02)
    assert s.max_queue == pytest.approx(0.06, rel=0.02)  # the same bytes, in seconds at the lower rate


def test_a_seeded_buffer_bounds_the_queue_from_the_first_sample() -> None:
    """``seed_buffer`` (a warm-up's overflow, ``ProbeResult.buffer``) bounds ``max_queue`` as the estimator's own
    overflows do, for ``buffer_window``; bad sizes are refused."""
    link = 100e6
    est = LinkEstimator(EstimatorConfig(bw_sample=0.2, buffer_window=5.0))
    lanes = [FakeLane(), FakeLane()]
    est.update(0.0, [ln.info(rtt_us=80_000, min_rtt_us=80_000) for ln in lanes])
    est.seed_capacity(link)
    est.seed_buffer(0.02 * link)
    t, s = run(est, lanes, 0.0, 5, 0.4 * link, 180_000, min_rtt_us=80_000)
    assert s.stalled and s.max_queue == pytest.approx(0.03) and s.capacity == pytest.approx(link, rel=0.01)
    t, s = run(est, lanes, t, 50, link, 80_000, min_rtt_us=80_000)  # past buffer_window: forgotten
    assert s.max_queue is None and s.buffer is None
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError):
            est.seed_buffer(bad)
    with pytest.raises(ValueError):
        EstimatorConfig(buffer_margin=0.9)


def test_an_overflow_reads_the_buffer_from_the_fullest_queue_of_its_last_round_trips() -> None:
    """On a short path the senders' backoff empties the queue within a round trip of the drop, before the
    retransmits show: the overflowing sample itself read 1.3 on 20 ms with a 20 ms buffer (full: 2.0). The
    buffer is taken from the most the ratio read over the last round trips (0.1 s at least), so the full
    queue's 20 ms and not 6 ms; a later lossless queue of 2.0 is the bottleneck's, not ``stalled`` (with 6 ms
    it would read as a stall, and as no competing traffic)."""
    link = 25e6
    est = LinkEstimator(EstimatorConfig(bw_sample=0.2))
    lanes = [FakeLane(), FakeLane()]
    t = 0.0
    est.update(t, [ln.info(rtt_us=20_000, min_rtt_us=20_000) for ln in lanes])
    for rtt_us, loss in ((20_000, 0.0), (30_000, 0.0), (40_000, 0.0), (26_000, 0.05)):
        t, s = _step_by(est, lanes, t, 0.05, link, rtt_us=rtt_us, loss=loss, min_rtt_us=20_000)
    assert s.overflowing and s.queueing_ratio == pytest.approx(1.3)
    assert s.buffer == pytest.approx(0.02 * s.capacity, rel=0.01)
    for _ in range(4):
        t, s = _step_by(est, lanes, t, 0.05, link, rtt_us=40_000, min_rtt_us=20_000)
    assert s.saturated and not s.stalled


def test_a_later_overflow_lowers_an_estimate_above_the_link_to_what_the_link_served() -> None:
    """A warm-up read 1.16x of a 2 Gbit/s, 80 ms link; its 16 BBR lanes, each capped above its share, set the
    rate themselves and overflowed the 20 ms queue in bursts (1-2 % loss for 3 s), the queue emptying between
    them, so it never stood the ``bw_sample`` that lowers an estimate. An overflow says the link was full: the
    estimate comes down to the goodput it served. Negative controls: the same oscillating queue with only the
    path's random loss (no overflow), the overflow while a lane had nothing queued (app-limited: the span's
    goodput is partly what we offered), an estimate already under the served rate, and a sharing estimator
    (``capacity_follows_queue`` off: a queue below the capacity is another flow's) all keep the estimate."""
    link = 100e6

    def oscillate(seed: float, loss: float, *, busy: float = 1.0, follows: bool = True) -> LinkState:
        est = LinkEstimator(EstimatorConfig(bw_sample=0.2, capacity_follows_queue=follows))
        lanes = [FakeLane(), FakeLane()]
        est.update(0.0, [ln.info(rtt_us=80_000, min_rtt_us=80_000) for ln in lanes])
        t, _ = run(est, lanes, 0.0, 3, link, 80_000, min_rtt_us=80_000)  # at the link's rate, no queue
        est.seed_capacity(seed, t)
        state = None
        for i in range(12):  # a queue that overflows and empties, interval by interval
            rtt, lost = (104_000, loss) if i % 2 else (84_000, 0.0)
            t, state = run(est, lanes, t, 1, link, rtt, min_rtt_us=80_000, loss=lost, busy=busy)
        assert state is not None
        return state

    s = oscillate(1.16 * link, 0.025)
    assert s.capacity == pytest.approx(link, rel=0.02)
    s = oscillate(1.16 * link, 0.001)  # negative control: random loss only, nothing overflowed
    assert not s.overflowing and s.capacity == pytest.approx(1.16 * link)
    s = oscillate(1.16 * link, 0.025, busy=0.5)  # negative control: app-limited
    assert s.capacity == pytest.approx(1.16 * link)
    s = oscillate(0.9 * link, 0.025)  # negative control: never down to a rate above the estimate
    assert s.capacity is not None and s.capacity >= 0.9 * link
    s = oscillate(1.16 * link, 0.025, follows=False)  # negative control: sharing
    assert s.capacity == pytest.approx(1.16 * link)


def test_a_request_tail_does_not_add_idle_lanes_old_delivery_samples_to_the_busy_ones() -> None:
    """In a request's tail one lane still sends, alone on the link (its cap raised to the aggregate), while the
    others idle; the kernel keeps each idle lane's last delivery-rate sample, taken when it shared the link.
    Summed with the busy lane's, they read 1.75x the link and raised the estimate there, above the link, where
    nothing lowered it again (the lanes' own BBR kept the queue empty). Only the busy lanes' samples count then.
    Negative control: the same samples with every lane busy are one moment's, and raise it."""
    link = 100e6

    def tail(idle: bool) -> LinkState:
        est = LinkEstimator(EstimatorConfig(bw_sample=0.2))
        lanes = [FakeLane() for _ in range(4)]
        est.update(0.0, [ln.info(rtt_us=80_000, min_rtt_us=80_000) for ln in lanes])
        est.seed_capacity(link)
        t, state = 0.0, None
        for _ in range(10):
            for i, ln in enumerate(lanes):  # the link's rate in all, over the lanes that send
                sends = i == 0 or not idle
                ln.step((link if idle else link / 4) if sends else 0.0, busy=1.0 if sends else 0.0)
            t += DT
            state = est.update(t, [replace(ln.info(rtt_us=80_000, min_rtt_us=80_000), max_pacing_rate=int(link),
                                           delivery_rate=int(link if i == 0 else link / 4))
                                   for i, ln in enumerate(lanes)])
        assert state is not None
        return state

    assert tail(idle=True).capacity == pytest.approx(link)
    assert tail(idle=False).capacity == pytest.approx(1.75 * link, rel=0.01)
