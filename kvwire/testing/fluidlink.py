"""A deterministic fluid model of TCP lanes through one bottleneck, for testing the congestion controller
on a simulated clock.

Owns: ``FluidLink`` — a drop-tail bottleneck (rate, base RTT, queue in bytes) shared by N lanes, each a
rough model of Linux BBR v1 under ``SO_MAX_PACING_RATE`` (STARTUP doubling its bandwidth estimate per
round trip until it stops growing, then PROBE_BW: 1.25x for one round in eight, its estimate the max of
its delivery rate over ten rounds, so a lane capped for long regrows by 25 % per eight rounds), a
per-socket window cap (``tcp_wmem``), delayed ACKs inflating the RTT of a lane sending a few packets per
round trip, and the application's backlog per lane — and ``TcpInfo`` snapshots of every lane with the
counters the estimator reads. ``ClosedLoop`` runs ``LinkEstimator`` + ``decide`` against it every
``interval``. Pure: no sockets, threads or clocks; the same inputs give the same run. Must not know:
the policy's internals (only ``decide``'s inputs and outputs).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from ..congestion.controller import ControllerConfig, ControllerState, Decision, decide, initial_state
from ..congestion.estimator import EstimatorConfig, LaneKey, LinkEstimator, LinkState
from ..congestion.tcpinfo import UNLIMITED_PACING, TcpInfo

MSS = 1448
_STARTUP_GAIN = 2.89
_DELACK = 0.04  # Linux's minimum delayed-ACK timeout


@dataclass
class _Lane:
    bw: float  # the kernel BBR's bandwidth estimate (bytes/s)
    startup: bool = True
    full_bw: float = 0.0
    full_cnt: int = 0
    samples: deque[float] = field(default_factory=lambda: deque(maxlen=10))
    round_start: float = 0.0
    round_bytes: float = 0.0
    round_limited: bool = False
    cycle: int = 0
    cap: float | None = None  # SO_MAX_PACING_RATE
    srtt: float = 0.0
    acked: float = 0.0
    sent: float = 0.0
    retrans: float = 0.0
    busy_us: float = 0.0
    sndbuf_us: float = 0.0
    backlog: bool = True
    delivery: float = 0.0  # the rate its last data arrived at (the kernel keeps its last sample through a gap)


class FluidLink:
    """``link = FluidLink(rate=50e6, rtt=0.02)``; ``link.advance(0.1)``; ``link.infos()``.

    ``rate`` in bytes/s of TCP payload, ``rtt`` the base round trip in seconds, ``queue_bytes`` the
    drop-tail buffer (default one BDP), ``lane_window`` each lane's send-window cap.
    """

    def __init__(self, rate: float, rtt: float, *, lanes: int = 4, queue_bytes: float | None = None,
                 lane_window: float = 4 * 2**20, step: float = 0.001) -> None:
        if rate <= 0 or rtt <= 0 or lanes < 1 or step <= 0:
            raise ValueError("need rate > 0, rtt > 0, lanes >= 1, step > 0")
        self.rate = rate
        self.rtt = rtt
        self.queue_bytes = queue_bytes if queue_bytes is not None else rate * rtt
        self.lane_window = lane_window
        self.step = step
        self.now = 0.0
        self.queue = 0.0
        self.delivered = 0.0  # every lane's payload delivered, in total
        self.lanes: list[_Lane] = []
        self.set_lanes(lanes)

    # ------------------------------------------------------------ knobs
    def set_lanes(self, n: int) -> None:
        """Open lanes up to ``n`` (new ones start in STARTUP); lanes past ``n`` stop carrying data."""
        while len(self.lanes) < n:
            self.lanes.append(_Lane(bw=10 * MSS / self.rtt, srtt=self.rtt, round_start=self.now))
        for i, lane in enumerate(self.lanes):
            lane.backlog = lane.backlog and i < n
        self._active = n

    def set_backlog(self, has_data: Callable[[int], bool] | bool) -> None:
        """Whether each active lane has data queued to send (``fn(lane index)`` or one value for all)."""
        for i, lane in enumerate(self.lanes[: self._active]):
            lane.backlog = has_data(i) if callable(has_data) else has_data

    def set_pacing(self, total: int | None) -> None:
        """Split an aggregate pacing cap evenly over the active lanes (``None``: none)."""
        for lane in self.lanes[: self._active]:
            lane.cap = None if total is None else total / self._active

    def restart(self) -> None:
        """``restart_congestion`` on every lane: BBR back in STARTUP, its estimate from its last rate."""
        for lane in self.lanes:
            lane.startup, lane.full_bw, lane.full_cnt = True, 0.0, 0
            lane.samples.clear()

    # ------------------------------------------------------------ time
    def _offered(self, lane: _Lane, rtt_now: float) -> tuple[float, bool]:
        if not lane.backlog:
            return 0.0, False
        if lane.startup:
            gain = _STARTUP_GAIN
        else:
            gain = 1.25 if lane.cycle % 8 == 0 else 0.75 if lane.cycle % 8 == 1 else 1.0
        rate = gain * lane.bw
        window = self.lane_window / rtt_now
        windowed = window < rate
        rate = min(rate, window, 2 * lane.bw * self.rtt / rtt_now)  # in flight <= cwnd = 2 x its BDP estimate
        if lane.cap is not None:
            rate = min(rate, lane.cap)
        return rate, windowed

    def advance(self, seconds: float, offering: Callable[[float], bool] | None = None) -> None:
        """Run the model ``seconds`` on; ``offering(t)``: whether the sender has data queued at ``t`` (every
        active lane, at the model's own step: a layer stream's bursts are shorter than a controller tick)."""
        end = self.now + seconds
        h = self.step
        while self.now < end - 1e-12:
            if offering is not None:
                self.set_backlog(offering(self.now))
            rtt_now = self.rtt + self.queue / self.rate
            offers = [self._offered(lane, rtt_now) for lane in self.lanes]
            total = sum(r for r, _ in offers)
            backlog = self.queue + total * h
            served = min(backlog, self.rate * h)
            self.queue = backlog - served
            dropped = max(0.0, self.queue - self.queue_bytes)
            self.queue -= dropped
            for lane, (rate, windowed) in zip(self.lanes, offers):
                got = rate * h * (served / (total * h) if total > 0 and total * h > served else 1.0)
                got = min(got, rate * h)
                lost = dropped * (rate / total) if total > 0 else 0.0
                lane.sent += rate * h
                lane.acked += max(0.0, got - lost)
                if got > lost:
                    lane.delivery = (got - lost) / h
                lane.retrans += lost
                self.delivered += max(0.0, got - lost)
                if lane.backlog:
                    lane.busy_us += h * 1e6
                    if windowed:
                        lane.sndbuf_us += h * 1e6
                sample = rtt_now + (_DELACK if 0 < rate * self.rtt < 2 * MSS else 0.0)
                if rate > 0:  # no ACKs, no RTT samples: srtt keeps what it last saw through a gap
                    lane.srtt += (sample - lane.srtt) * min(1.0, h / (8 * rtt_now) * max(1.0, rate * rtt_now / MSS) / 4)
                lane.round_bytes += max(0.0, got - lost)
                lane.round_limited |= not lane.backlog or (lane.cap is not None and rate >= lane.cap * 0.99)
                if self.now - lane.round_start >= rtt_now:
                    self._end_round(lane, rtt_now)
            self.now += h

    def _end_round(self, lane: _Lane, rtt_now: float) -> None:
        rate = lane.round_bytes / max(rtt_now, self.now - lane.round_start)
        # BBR keeps app-limited samples only when they raise the estimate (a pacing cap counts as such)
        if lane.backlog and (rate > lane.bw or not lane.round_limited or not lane.samples):
            lane.samples.append(rate)
        elif lane.samples:
            lane.samples.append(lane.samples[-1])
        if lane.samples:  # (never below BBR's minimum window of 4 packets a round trip)
            lane.bw = max(max(lane.samples), 4 * MSS / self.rtt)
        if lane.startup and lane.backlog:
            if lane.bw >= 1.25 * lane.full_bw:
                lane.full_bw, lane.full_cnt = lane.bw, 0
            else:
                lane.full_cnt += 1
                if lane.full_cnt >= 3:
                    lane.startup = False
        lane.cycle += 1
        lane.round_start, lane.round_bytes, lane.round_limited = self.now, 0.0, False

    # ------------------------------------------------------------ what the kernel would say
    def infos(self) -> dict[LaneKey, TcpInfo]:
        """``TcpInfo`` of each active lane, keyed by index."""
        out: dict[LaneKey, TcpInfo] = {}
        for i, lane in enumerate(self.lanes[: self._active]):
            out[i] = TcpInfo(
                length=280, state=1, ca_state=0, snd_mss=MSS, snd_cwnd=100, rtt_us=int(lane.srtt * 1e6),
                min_rtt_us=int(self.rtt * 1e6), bytes_acked=int(lane.acked), bytes_sent=int(lane.sent),
                bytes_retrans=int(lane.retrans), busy_time_us=int(lane.busy_us), rwnd_limited_us=0,
                sndbuf_limited_us=int(lane.sndbuf_us), notsent_bytes=(1 << 20) if lane.backlog else 0,
                delivery_rate=int(lane.delivery), delivery_rate_app_limited=not lane.backlog,
                max_pacing_rate=UNLIMITED_PACING if lane.cap is None else int(lane.cap),
                pacing_rate=int(lane.bw))
        return out


@dataclass
class Tick:
    """One controller step of a ``ClosedLoop`` run."""

    t: float
    goodput: float  # bytes/s the link delivered over this tick
    state: LinkState
    decision: Decision


class ClosedLoop:
    """``LinkEstimator`` + ``decide`` driving a ``FluidLink`` every ``interval`` seconds, as ``LinkControl``
    drives real sockets (pacing split over the lanes, the lane count, restarts)."""

    def __init__(self, link: FluidLink, config: ControllerConfig | None = None,
                 estimator: EstimatorConfig | None = None, interval: float = 0.1) -> None:
        self.link = link
        self.config = config or ControllerConfig()
        self.estimator = LinkEstimator(estimator or EstimatorConfig(bw_sample=0.2))
        self.state: ControllerState = initial_state(self.config)
        self.interval = interval
        self.ticks: list[Tick] = []
        link.set_lanes(self.config.initial_lanes)
        self.estimator.update(link.now + 1e-9, link.infos())

    def run(self, seconds: float, each: Callable[[float], None] | None = None,
            offering: Callable[[float], bool] | None = None) -> list[Tick]:
        """Advance ``seconds``; ``each(t)`` runs before every tick (to change the link or the backlog);
        ``offering``: as ``FluidLink.advance``'s."""
        out = []
        end = self.link.now + seconds
        while self.link.now < end - 1e-9:
            if each is not None:
                each(self.link.now)
            before = self.link.delivered
            self.link.advance(self.interval, offering)
            ls = self.estimator.update(self.link.now, self.link.infos())
            old = self.state.decision
            self.state = decide(self.state, ls, self.config)
            d = self.state.decision
            if d != old:
                if d.lanes != old.lanes:
                    self.link.set_lanes(d.lanes)
                if getattr(d, "restart", False):
                    self.link.restart()
            self.link.set_pacing(d.total_pacing)
            tick = Tick(self.link.now, (self.link.delivered - before) / self.interval, ls, d)
            out.append(tick)
        self.ticks.extend(out)
        return out


def recovery_time(ticks: list[Tick], after: float, level: float, span: float = 0.5) -> float | None:
    """Seconds after ``after`` until goodput averaged over ``span`` first reaches ``level``; None: never."""
    window: deque[Tick] = deque()
    for tk in ticks:
        window.append(tk)
        while window and window[0].t <= tk.t - span:
            window.popleft()
        if tk.t - span >= after - 1e-9 and sum(w.goodput for w in window) / len(window) >= level:
            return tk.t - after
    return None


__all__ = ["ClosedLoop", "FluidLink", "Tick", "recovery_time"]
