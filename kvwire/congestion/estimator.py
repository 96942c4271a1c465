"""Link estimation in the spirit of BBR, from periodic per-lane ``TCP_INFO`` samples.

Owns: ``LinkEstimator`` (pure: fed ``(timestamp, samples)``; no clock, no sockets, no threads) and the
snapshots it returns, ``LinkState`` and ``LaneState``. Signals: goodput ``G = Σ Δdelivered / Δt`` (the
kernel's ``tcpi_delivered`` segments x MSS: SACKed data counts when it arrives, so the cumulative ACK that
ends a loss recovery does not show up as a burst faster than the link; ``bytes_acked`` where the kernel lacks
it), bottleneck bandwidth (windowed max of ``G`` averaged over short spans), min RTT (windowed min), queueing
ratio ``median(srtt) / min_rtt`` (both taken as at least ``rtt_floor``), retransmit rate ``Σ Δbytes_retrans /
Σ Δbytes_sent``, receive-window- and send-buffer-limited shares of busy time, utilization of a configured or
probed capacity, and the bandwidth other flows take (a standing queue while our goodput is below the
capacity). Must not know: how samples are taken, sessions, or what is done about the estimate
(``controller``).
"""

from __future__ import annotations

import statistics
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import TypeGuard

from .tcpinfo import UNLIMITED_PACING, TcpInfo

LaneKey = int | str
_ROUND_SPAN = 0.1  # the shortest span a first overflow's capacity is averaged over (ACK bunching in 25 ms: +19 %)
# a goodput span that reads a capacity covers at least this many round trips: ACK bunching and the sampler's
# timing error (a few ms on a loaded host) move a span's rate by that error / its length, and a max over
# many spans keeps the worst. Over 0.1 s (1.25 round trips at 80 ms) a first overflow read 1.07x the link,
# and pacing at it kept a 20 ms queue overflowing for the rest of the run (BBR: samples of >= 1 round trip,
# max-filtered over ~10)
CAPACITY_ROUNDS = 2.0
#: an overflow after the first lowers the estimate to the goodput the link served over the last span (at least
#: ``bw_sample`` and CAPACITY_ROUNDS round trips) when that is more than this share below it
OVERFLOW_MARGIN = 0.03
#: ... but by at most this share of it per overflow
OVERFLOW_STEP = 0.1


@dataclass(frozen=True)
class EstimatorConfig:
    """Windows in seconds, rates in bytes/s."""

    bw_window: float = 1.0  # BtlBw = max over this long of goodput samples ...
    bw_sample: float = 0.25  # ... each averaged over this long (irons out ACK bunching and sampling jitter)
    # a probed capacity is raised by goodput averaged over this long: the max of short spans is biased
    # up by sampling jitter (a few ms in 0.2 s is 2 %), enough for pacing just under it to build a queue
    raise_span: float = 0.5
    rtt_window: float = 10.0  # min_rtt = min over this long
    stats_window: float = 1.0  # goodput, loss and limited shares are averaged over this long
    capacity: float | None = None  # the link's capacity, if known; otherwise probed (see LinkEstimator)
    saturated_ratio: float = 1.25  # queueing ratio at which we are filling the bottleneck's queue
    congested_ratio: float = 1.5  # queueing ratio that counts as congestion
    congested_loss: float = 0.02  # retransmit rate that counts as congestion
    # queueing ratios are taken against at least this RTT: on loopback or in a rack (min RTT ~10-100 us) a
    # fraction of a millisecond of scheduling noise would otherwise read as a standing queue many RTTs deep
    rtt_floor: float = 0.001
    min_busy: float = 0.5  # lanes busy less than this share of the time are app-limited
    # alone on the link (True): a standing queue means the link is full at our goodput, so the probed
    # capacity follows it down (a rate drop). Sharing (False): the capacity only goes up after the
    # first probe, and a standing queue below it is read as competing traffic instead.
    capacity_follows_queue: bool = True
    competing_margin: float = 0.1  # goodput below (1 - this) x capacity under a queue: others present
    # what we limited ourselves cannot say what the link can do: an interval in which some lane had nothing
    # queued (a request's gap or tail) or in which goodput reached this share of our own pacing cap never
    # lowers the probed capacity, whatever the queueing ratio says (srtt lags a queue that is gone, and
    # at a few packets per RTT delayed ACKs alone read as one)
    paced_share: float = 0.9
    # and the probed capacity never falls below floor_fraction x the best goodput (bw_sample spans) the
    # link delivered in the last floor_window: it can halve at most once per floor_window, so a burst of
    # false low samples cannot collapse it (an estimate too high is cheap: the pacing cap is only a cap,
    # each lane's kernel BBR still finds the bottleneck under it; one too low throttles every lane)
    floor_window: float = 1.0
    floor_fraction: float = 0.5
    # a sender that had nothing queued within the raise_span (a prefill producing layers slower than the
    # link) never fills one, so its average is what it offered, not what the link can do: then its best
    # bw_sample span since the queue last set the estimate (a burst the link served at that rate), times
    # this (sampling jitter biases a short span up by a few per cent), raises the estimate too
    burst_share: float = 0.95
    # ... and so do the lanes' own delivery-rate samples (the kernel's, each over the lane's last round
    # trip), each at most the lane's pacing cap, summed, when every lane is paced and no queue stands
    # (ratio at most clear_ratio) in two samples running (the smaller of the two): a layer burst (16.8 MB,
    # 70 ms on 2 Gbit/s) is shorter than any goodput span that reads a capacity on an 80 ms path
    # (CAPACITY_ROUNDS round trips), so a stream's up-probe at 1.5x a warm-up reading of half the link
    # delivered 1.47x in every lane's samples while its spans moved the estimate 1 %. Paced, a lane's
    # sample cannot exceed its cap, and with no queue the lanes do not take turns at the bottleneck (which
    # made unpaced lanes' samples sum to 1.2-1.4x the link in a ramp): no jitter to discount, so not
    # burst_share of it (that took a 1.1x up-probe delivered at 98 % of its caps to +2.6 %, under what
    # makes a probe pay; a stream whose warm-up read 0.75x of a 2 Gbit/s link stayed there for 17 s)
    clear_ratio: float = 1.1
    # a drop-tail queue holds no more than it held when it dropped: the least queue (bytes: its seconds above
    # min RTT x the capacity) an overflowing interval read within buffer_window is the bottleneck's buffer,
    # or more (a reading also counts delay elsewhere). A lossless "queue" deeper than buffer_margin x that, in
    # seconds at the current capacity (``LinkState.max_queue``), is not the bottleneck's: it is delay the
    # host or something else on the path added (a busy sender, receiver or emulator holding packets or ACKs
    # back), and lowers no estimate. On 2 Gbit/s, 80 ms with a 20 ms queue (ratio 1.25 at most), a 2-core host
    # read lossless ratios of 1.5-2.5 for 0.2-0.5 s at a time; the estimate followed them to 0.6-0.7x of
    # the link and the first request ran at 77 % of it. A rate drop still reads: it fills the buffer and
    # overflows, and at the lower estimate the same bytes are more seconds of queue
    buffer_window: float = 30.0
    buffer_margin: float = 1.5

    def __post_init__(self) -> None:
        for name in ("bw_window", "bw_sample", "raise_span", "rtt_window", "stats_window", "rtt_floor",
                     "floor_window", "buffer_window"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        if self.capacity is not None and self.capacity <= 0:
            raise ValueError("capacity must be positive")
        if not 0 < self.paced_share <= 1 or not 0 <= self.floor_fraction < 1 or not 0 < self.burst_share <= 1:
            raise ValueError("need 0 < paced_share <= 1, 0 <= floor_fraction < 1 and 0 < burst_share <= 1")
        if not self.buffer_margin >= 1:
            raise ValueError("buffer_margin must be at least 1")


@dataclass(frozen=True)
class LaneState:
    """One lane over the last interval. Rates in bytes/s, times in seconds, shares in [0, 1]."""

    lane: LaneKey
    goodput: float
    srtt: float | None
    min_rtt: float | None
    cwnd_bytes: int | None
    loss_rate: float  # Δbytes_retrans / Δbytes_sent this interval
    busy: float  # share of the interval with data in flight
    rwnd_limited: float  # share of busy time limited by the peer's receive window
    sndbuf_limited: float  # share of busy time limited by our send buffer
    delivery_rate: int | None
    pacing_rate: int | None
    max_pacing_rate: int | None
    notsent_bytes: int | None
    ca_state: int | None


@dataclass(frozen=True)
class LinkState:
    """The link as the estimator sees it at ``timestamp``. Rates in bytes/s, times in seconds.

    ``None`` means "not known yet" (no RTT sample, no capacity). ``goodput`` and the shares are averages
    over the stats window; ``btl_bw`` is the max over the bandwidth window of goodput averaged over
    ``bw_sample`` spans.
    """

    timestamp: float
    goodput: float
    btl_bw: float
    capacity: float | None
    utilization: float | None
    available_bw: float | None  # headroom: capacity - goodput, 0 while a standing queue shows it full
    min_rtt: float | None
    srtt: float | None
    queueing_ratio: float | None
    loss_rate: float
    busy: float
    rwnd_limited: float
    sndbuf_limited: float
    congested: bool
    saturated: bool
    lanes: tuple[LaneState, ...] = field(default=())
    competing_bw: float | None = None  # what others take: capacity - goodput while saturated below it
    app_limited: bool = False  # this interval a lane had nothing queued to send (a gap or a request's tail)
    pacing_limited: bool = False  # this interval goodput reached paced_share of our own aggregate pacing cap
    # this interval the queue overflowed: a standing queue and congestive loss (``congested_loss`` of what
    # was sent in it): the link was busy throughout (a first capacity is taken from what it delivered)
    overflowing: bool = False
    # share of the stats window's lane samples in which a lane had nothing unsent in its socket and no time
    # held by its send buffer: the sender had nothing queued for it (0: always work queued; lanes whose
    # kernel gives no ``notsent_bytes`` count as queued). TCP's busy time counts data in flight, so a lane
    # written to once a round trip reads busy; only an empty socket says the sender is what is slow
    unqueued: float = 0.0
    # the deepest queue (seconds at ``capacity``) the bottleneck can hold, as far as its overflows showed it
    # (``EstimatorConfig.buffer_margin`` x the least an overflow read within ``buffer_window``); None: no
    # overflow seen, or no capacity. A lossless queueing ratio above ``1 + max_queue / min_rtt`` is delay
    # elsewhere (``stalled``)
    max_queue: float | None = None
    buffer: float | None = None  # bytes: the least queue an overflow read within ``buffer_window`` (None: none)
    stalled: bool = False  # this interval's queue read deeper than ``max_queue`` without overflowing

    @property
    def usable_bw(self) -> float | None:
        """What kvwire can have now without taking from others: goodput + headroom."""
        return None if self.available_bw is None else self.goodput + self.available_bw

    def to_dict(self) -> dict[str, object]:
        """Plain data (numbers, bools, None, lists, dicts) for JSON/msgpack and logs."""
        d = asdict(self)
        d["lanes"] = [asdict(lane) for lane in self.lanes]
        return d


@dataclass(frozen=True)
class _Deltas:
    """Counter increments of one lane (or their sum over lanes) over one interval. ``acked`` is bytes
    delivered to the peer (``tcpi_delivered`` x MSS where the kernel has it, else ``bytes_acked``)."""

    acked: int = 0
    sent: int = 0
    retrans: int = 0
    busy_us: int = 0
    rwnd_us: int = 0
    sndbuf_us: int = 0

    @staticmethod
    def between(info: TcpInfo, prev: TcpInfo | None) -> _Deltas:
        if prev is None or _reset(info, prev):
            return _Deltas()
        return _Deltas(
            _delivered(info, prev), _delta(info.bytes_sent, prev.bytes_sent),
            _delta(info.bytes_retrans, prev.bytes_retrans), _delta(info.busy_time_us, prev.busy_time_us),
            _delta(info.rwnd_limited_us, prev.rwnd_limited_us),
            _delta(info.sndbuf_limited_us, prev.sndbuf_limited_us))

    def __add__(self, o: _Deltas) -> _Deltas:
        return _Deltas(self.acked + o.acked, self.sent + o.sent, self.retrans + o.retrans,
                       self.busy_us + o.busy_us, self.rwnd_us + o.rwnd_us, self.sndbuf_us + o.sndbuf_us)


@dataclass(frozen=True)
class _Interval:
    end: float
    dt: float
    lanes: int
    d: _Deltas
    partial: bool = False  # the lane set changed: a lane that came or went is missing from ``d``
    app_limited: bool = False  # a lane had nothing queued: goodput says what we offered, not the link
    pacing_limited: bool = False  # goodput reached our own pacing cap: ditto
    unqueued: float = 0.0  # share of the lanes seen before with nothing unsent and no send-buffer-limited time

    @property
    def limited(self) -> bool:
        return self.app_limited or self.pacing_limited


def _delivered(info: TcpInfo, prev: TcpInfo) -> int:
    if info.delivered is not None and prev.delivered is not None and info.snd_mss:
        return ((info.delivered - prev.delivered) & 0xFFFFFFFF) * info.snd_mss
    return _delta(info.bytes_acked, prev.bytes_acked)


def _delta(new: int | None, old: int | None) -> int:
    if new is None or old is None or new < old:
        return 0
    return new - old


def _share(part: float, whole: float) -> float:
    return min(1.0, part / whole) if whole > 0 else 0.0


def _us(v: int | None) -> float | None:
    return v / 1e6 if v else None


class LinkEstimator:
    """Turn per-lane ``TcpInfo`` samples into ``LinkState`` snapshots. Pure: call ``update`` with the
    sampling time and that moment's samples, keyed by a stable lane key (a list is keyed by index).

    A lane seen for the first time, or whose counters went backwards (a reconnected socket reusing the
    key), contributes from its next sample on. Capacity is ``config.capacity``, else the one set with
    ``set_capacity``, else *probed*: the goodput of the intervals during which the queueing ratio showed a
    standing queue (we were filling the bottleneck: it served at its rate the whole time), raised whenever
    goodput over a ``raise_span`` exceeds it (for a sender with gaps, ``burst_share`` of its best
    ``bw_sample`` span; with no queue, what the paced lanes' delivery-rate samples sum to in two samples
    running), and lowered at each overflow after the first to the goodput of the last span, when the lanes had
    work queued throughout it (``OVERFLOW_MARGIN``, ``OVERFLOW_STEP``); unknown until then.
    """

    def __init__(self, config: EstimatorConfig | None = None) -> None:
        self.config = config or EstimatorConfig()
        self._prev: dict[LaneKey, TcpInfo] = {}
        self._seen: set[LaneKey] = set()  # every lane ever sampled (a LaneGroup leaves idle members' lanes out)
        self._last_t: float | None = None
        self._intervals: deque[_Interval] = deque()
        self._rtts: deque[tuple[float, float]] = deque()  # (t, min over lanes of min_rtt_us)
        self._bw: deque[tuple[float, float]] = deque()  # (t, goodput over the bw_sample span ending at t)
        self._capacity_set: float | None = None
        self._probed: float | None = None
        # (end, dt, bytes, the paced lanes' delivery-rate samples summed: 0 where not every lane has one) under a queue
        self._saturated_run: deque[tuple[float, float, int, float]] = deque()
        self._run_start: float | None = None  # end of the run's first interval (the queue formed in it)
        self._last_ratio: float | None = None
        self._probed_at = 0.0  # when a standing queue last set the probed capacity
        self._floor_bw: deque[tuple[float, float]] = deque()  # (t, bw_sample goodput) over floor_window
        self._app_limited_at: float | None = None  # the last interval in which a lane had nothing queued
        self._last_paced = 0.0  # the previous sample's _paced_delivery (0: a queue, or a lane unpaced)
        self._buffers: deque[tuple[float, float]] = deque()  # (t, bytes queued) of overflows within buffer_window
        self._ratios: deque[tuple[float, float]] = deque()  # (t, queueing ratio) of the last round trips
        self.latest: LinkState | None = None

    def set_capacity(self, bytes_per_s: float | None) -> None:
        """Declare the capacity (from an external probe), or ``None`` to go back to probing."""
        if bytes_per_s is not None and bytes_per_s <= 0:
            raise ValueError("capacity must be positive")
        self._capacity_set = bytes_per_s

    def seed_capacity(self, bytes_per_s: float, now: float | None = None) -> None:
        """Start the probed capacity at ``bytes_per_s`` (an earlier probe's result); unlike
        ``set_capacity`` it keeps being probed from there. ``now``: when the probe measured it (the clock of
        ``update``'s timestamps; default the last sample's time): the link delivered that rate then, so
        for ``floor_window`` after it the estimate stays above ``floor_fraction`` of it like any rate the
        link delivered (a host stall at the first request after a warm-up, srtt 1.7x with no queue at the
        bottleneck, read as a standing queue with little acked and took the estimate to a quarter of the
        warm-up's reading: the first request took 1.71x the ideal). Without a time, no floor."""
        if bytes_per_s <= 0:
            raise ValueError("capacity must be positive")
        self._probed, self._probed_at = bytes_per_s, self._last_t or 0.0
        when = self._last_t if now is None else now
        if when is not None:
            self._floor_bw.append((when, bytes_per_s))

    def seed_buffer(self, queued: float, now: float | None = None) -> None:
        """Count ``queued`` bytes as a queue an overflow read (an earlier probe's, ``ProbeResult.buffer``) at
        ``now`` (the clock of ``update``'s timestamps; default the last sample's time): like the estimator's
        own overflows it bounds ``LinkState.max_queue`` for ``buffer_window``."""
        if not queued > 0:
            raise ValueError("queued bytes must be positive")
        when = self._last_t if now is None else now
        self._buffers.append((when or 0.0, float(queued)))

    def update(self, now: float, samples: Mapping[LaneKey, TcpInfo] | Sequence[TcpInfo]) -> LinkState:
        """Feed one sampling round taken at ``now`` (seconds, any monotonic clock)."""
        if self._last_t is not None and now <= self._last_t:
            raise ValueError(f"timestamps must increase: {now} after {self._last_t}")
        items = dict(samples.items() if isinstance(samples, Mapping) else enumerate(samples))
        dt = None if self._last_t is None else now - self._last_t
        deltas = {key: _Deltas.between(info, self._prev.get(key)) for key, info in items.items()}
        lanes = tuple(_lane(key, info, deltas[key], dt) for key, info in items.items())
        if dt is not None:
            total = sum(deltas.values(), _Deltas())
            partial = items.keys() != self._prev.keys()
            # and for a bw_sample after: srtt kept, through the gap, the queue from before it; the lanes
            # take a few round trips to fill the pipe again
            app = _app_limited(items, deltas, self._prev, dt)
            if app:
                self._app_limited_at = now
            recent = self._app_limited_at is not None and now - self._app_limited_at <= self.config.bw_sample + 1e-9
            # (lane-time leaves out lanes sampled for the first time: one that opened during the interval has
            # no busy time in it to show, and counting it read 16 busy lanes as 0.8 busy for the stats window
            # after the controller added 6 lanes while its thread waited 0.44 s for them to connect. A lane
            # seen before and back in the set, a LaneGroup member's that idled, did idle: it counts)
            known = sum(1 for key in items if key in self._prev or key in self._seen)
            self._intervals.append(_Interval(now, dt, known, total, partial, app or recent,
                                             _pacing_limited(items, total.acked / dt, self.config.paced_share),
                                             _unqueued(items, deltas, self._prev)))
            rate = self._span_rate(now, max(self.config.bw_sample, CAPACITY_ROUNDS * self._min_rtt()))
            self._bw.append((now, rate))
            self._floor_bw.append((now, rate))
        self._prev = items
        self._seen.update(items)
        self._last_t = now
        rtts = [i.min_rtt_us for i in items.values() if i.min_rtt_us]
        if rtts:
            self._rtts.append((now, float(min(rtts))))
        self._prune(now)
        self.latest = self._state(now, lanes)
        return self.latest

    # ------------------------------------------------------------ internals
    def _span_rate(self, now: float, seconds: float) -> float:
        """Goodput over the last ``seconds`` (at least the newest interval)."""
        acked = span = 0.0
        for iv in reversed(self._intervals):
            if span and iv.end <= now - seconds:
                break
            acked += iv.d.acked
            span += iv.dt
        return acked / span if span else 0.0

    def _min_rtt(self) -> float:
        """The windowed min RTT in seconds so far (0 before any)."""
        return min(r for _, r in self._rtts) / 1e6 if self._rtts else 0.0

    def _prune(self, now: float) -> None:
        keep = max(self.config.bw_sample, self.config.stats_window, self.config.raise_span,
                   CAPACITY_ROUNDS * self._min_rtt())
        while self._intervals and self._intervals[0].end <= now - keep:
            self._intervals.popleft()
        while self._bw and self._bw[0][0] <= now - self.config.bw_window:
            self._bw.popleft()
        while self._rtts and self._rtts[0][0] <= now - self.config.rtt_window:
            self._rtts.popleft()
        while self._floor_bw and self._floor_bw[0][0] <= now - self.config.floor_window:
            self._floor_bw.popleft()
        while self._buffers and self._buffers[0][0] <= now - self.config.buffer_window:
            self._buffers.popleft()

    def _state(self, now: float, lanes: tuple[LaneState, ...]) -> LinkState:
        cfg = self.config
        stats = [iv for iv in self._intervals if iv.end > now - cfg.stats_window]
        last = self._intervals[-1] if self._intervals and self._intervals[-1].end == now else None
        span = stats_span = sum(iv.dt for iv in stats)
        goodput = sum(iv.d.acked for iv in stats) / span if span else 0.0
        btl_bw = max((rate for _, rate in self._bw), default=0.0)
        busy_us = sum(iv.d.busy_us for iv in stats)
        lane_time_us = sum(iv.dt * iv.lanes for iv in stats) * 1e6
        busy = _share(busy_us, lane_time_us)
        loss = _share(sum(iv.d.retrans for iv in stats), sum(iv.d.sent for iv in stats))
        min_rtt = min(r for _, r in self._rtts) / 1e6 if self._rtts else None
        active = [ln.srtt for ln in lanes if ln.srtt is not None and ln.busy > 0] or [
            ln.srtt for ln in lanes if ln.srtt is not None]
        srtt = statistics.median(active) if active else None
        floor = cfg.rtt_floor
        ratio = max(srtt, floor) / max(min_rtt, floor) if srtt is not None and min_rtt else None
        saturated = ratio is not None and ratio >= cfg.saturated_ratio and busy >= cfg.min_busy
        # (whether a lane idled part of it or not: a queue that drops packets was full; lanes starting up read
        # as app-limited for a bw_sample, just when STARTUP overflows a shallow queue)
        overflowing = bool(saturated and last is not None and _share(last.d.retrans, last.d.sent) >= cfg.congested_loss)
        # (a bw_sample span reaching back into the lanes' ramp reads low; the kernel's latest delivery-rate
        # samples, each over a lane's last round trip, summed, read the full link: 375-389 Mbit/s on 386 in
        # the lossy row's starts. Not the interval's own goodput: over a 25 ms probe sample ACK bunching
        # read 461, and pacing above the link kept the queue overflowing for two seconds. Nor the sum alone: each
        # lane's sample is its own last round trip's, taken at different moments of a ramp that doubles per
        # round trip, and over 10-16 lanes the sum read 119-140 % of the link (2294-2548 Mbit/s on 1930): the
        # aggregate's goodput over the last CAPACITY_ROUNDS round trips, at least 0.1 s, bounds it: over one
        # round trip at 80 ms (0.1 s) the bound itself read 1.07x the link)
        span = self._span_rate(now, max(CAPACITY_ROUNDS * (min_rtt or 0.0), _ROUND_SPAN))
        full = max(btl_bw, min(sum(ln.delivery_rate or 0 for ln in lanes), span)) if overflowing else None
        rtt = max(min_rtt or 0.0, floor)
        excess = (ratio - 1) * rtt if ratio is not None else 0.0  # seconds of queue
        least = min((b for _, b in self._buffers), default=None)  # (before this sample's overflow, if any)
        limit = self._max_queue(least, self._current())
        stalled = bool(saturated and not overflowing and limit is not None and excess > limit)
        capacity = self._capacity(now, saturated, ratio, full, _paced_delivery(lanes), stalled)
        if ratio is not None:
            self._ratios.append((now, ratio))
        while self._ratios and self._ratios[0][0] < now - max(CAPACITY_ROUNDS * rtt, _ROUND_SPAN):
            self._ratios.popleft()
        if overflowing and capacity:
            # (the queue was full when it dropped, up to a round trip before its retransmits show: the most the
            # ratio read over the last round trips, not this sample's alone, which a queue that the senders'
            # backoff already emptied reads low; on 20 ms with a 20 ms buffer an overflow read 1.25 to 2.0)
            queued = (max(r for _, r in self._ratios) - 1) * rtt * capacity
            self._buffers.append((now, queued))
            least = queued if least is None else min(least, queued)
        competing = None
        if capacity:
            competing = 0.0
            if saturated and not stalled and goodput < (1 - cfg.competing_margin) * capacity:
                competing = capacity - goodput
        return LinkState(
            timestamp=now, goodput=goodput, btl_bw=btl_bw, capacity=capacity,
            utilization=goodput / capacity if capacity else None,
            available_bw=(0.0 if saturated else max(0.0, capacity - goodput)) if capacity else None,
            competing_bw=competing,
            min_rtt=min_rtt, srtt=srtt, queueing_ratio=ratio, loss_rate=loss, busy=busy,
            rwnd_limited=_share(sum(iv.d.rwnd_us for iv in stats), busy_us),
            sndbuf_limited=_share(sum(iv.d.sndbuf_us for iv in stats), busy_us),
            congested=(ratio is not None and ratio >= cfg.congested_ratio) or loss >= cfg.congested_loss,
            saturated=saturated, lanes=lanes, app_limited=bool(last and last.app_limited),
            pacing_limited=bool(last and last.pacing_limited), overflowing=overflowing,
            unqueued=sum(iv.unqueued * iv.dt for iv in stats) / stats_span if stats_span else 0.0,
            max_queue=self._max_queue(least, capacity), stalled=stalled, buffer=least)

    def _current(self) -> float | None:
        """The capacity as it stands before this sample is judged."""
        if self.config.capacity is not None:
            return self.config.capacity
        return self._capacity_set if self._capacity_set is not None else self._probed

    def _max_queue(self, least: float | None, capacity: float | None) -> float | None:
        """``buffer_margin`` x ``least`` (the least queue, bytes, an overflow read within ``buffer_window``), in
        seconds at ``capacity`` (None: no overflow, or no capacity)."""
        if least is None or not capacity:
            return None
        return self.config.buffer_margin * least / capacity

    def _capacity(self, now: float, saturated: bool, ratio: float | None,
                  overflow: float | None = None, delivering: float = 0.0, stalled: bool = False) -> float | None:
        """Under a standing queue the link is full, so the
        goodput of the run of saturated intervals (up to ``bw_sample`` of it) *is* the bottleneck rate
        (when alone); otherwise goodput is a lower bound. Only the saturated run, not the windowed max or
        a span reaching back before the queue: a rate drop is not undone by samples from before it, and
        the brief queue an up-probe makes is measured at the rate the link served it. It goes down only
        once the queue has stood ``bw_sample`` long (a single stalled interval says little). An interval whose
        queue shrank is left out: srtt lags, so the interval in which a drain emptied the queue still
        reads as saturated while the link idled part of it. So is the run's first interval, once there is
        another and if that lowers the estimate: the queue formed during it, so when the rate just fell it
        was served partly at the old rate (a drain that starts at once would otherwise freeze the run with
        it, and cruising at that rate refills the queue); when leaving it out would raise the estimate the
        queue was still filling, and the whole run is the steadier reading. Otherwise goodput
        over the last ``raise_span`` raises it, if all of that span came after the queue last set it (not
        undoing a rate drop); so does ``_burst_rate`` while the sender has gaps. ``overflow``: the queue
        overflowed this interval (``LinkState.overflowing``)
        and this is the fastest rate the link delivered within ``bw_window`` (the lanes' latest
        delivery-rate samples included): with no capacity known yet
        (the first probe) the link was full, so it is at least that, at once (waiting for the queue to
        stand a ``bw_sample`` costs the drops of every interval meanwhile: unpaced lanes starting on a
        shallow queue lose a fifth of their packets). Only the first: later, a queue overflows when the
        rate just fell, and the window's fastest rate is the old one; a later one only lowers the estimate, to
        the goodput of the last span (see the comment at that rule). ``stalled``: this interval's queue read
        deeper than the bottleneck's buffer without loss (``LinkState.stalled``); like a shrinking queue it
        neither extends nor breaks the run."""
        run = self._saturated_run
        # (the paced lanes' summed delivery-rate samples, ``delivering``, raise the estimate only with no queue)
        paced = delivering if ratio is not None and ratio <= self.config.clear_ratio else 0.0
        last_paced, self._last_paced = self._last_paced, paced
        shrinking = ratio is not None and self._last_ratio is not None and ratio < 0.95 * self._last_ratio
        self._last_ratio = ratio
        # an interval in which lanes came or went undercounts what the link served (a new lane's bytes
        # count from its next sample): it neither extends nor breaks the run, like a shrinking queue
        # (nor does one whose lossless queue read deeper than the bottleneck's buffer: ``stalled``, delay elsewhere)
        skip = shrinking or stalled or bool(self._intervals and self._intervals[-1].partial)
        # an interval we limited ourselves (nothing queued, or held to our own pacing) measures our offer,
        # not the link: it breaks the run like an interval without a queue
        limited = bool(self._intervals and self._intervals[-1].end == now and self._intervals[-1].limited)
        if not saturated or limited:
            run.clear()
            self._run_start = None
        elif skip:
            pass  # the run is neither extended nor broken: the queue still stands
        elif self._intervals:
            iv = self._intervals[-1]
            if not run:
                self._run_start = iv.end
            run.append((iv.end, iv.dt, iv.d.acked, delivering))
            while len(run) > 1 and run[0][0] <= iv.end - self.config.bw_sample:
                run.popleft()
        if self.config.capacity is not None or self._capacity_set is not None:
            return self._current()  # (configured or set: not probed)
        span = sum(e[1] for e in run)
        whole = _rate(run) if not skip else 0.0
        # the run without its first interval, when that lowers it (a rate that just fell); when it would
        # raise it (the queue was still forming), the whole run: one interval alone is noisier than two
        served = min(whole, _rate([e for e in run if e[0] != self._run_start])) if len(run) > 1 else whole
        # ... and no lower than the paced lanes' delivery-rate samples summed, the least of them over the run:
        # the kernel's, each over a packet's own send and ACK intervals, so they hold their value through a
        # stall that holds ACKs back (a busy receiver or emulator; it reads as a queue with little acked) and
        # do not count the losses of an overflow as time the link idled, while a rate drop slows them within
        # a round trip. On 2 Gbit/s, 80 ms, a seed 1.1x the link overflowed the queue; its run read 1683 Mbit/s
        # where every sample's sum read 1830-1973 (payload rate 1931), and the requests after paced at 87 %
        if served > 0 and self._probed is not None and served < self._probed:
            served = min(self._probed, max(served, min(e[3] for e in run)))
        # down only on a queue that stood a whole bw_sample (not one stalled interval: an RTO, a hiccup)
        # (up only on a run of CAPACITY_ROUNDS round trips: a shorter one can be one interval's ACK bunching or
        # sampling error, and 50 ms of it had read 1.5x the link)
        lasted = span >= 0.95 * self.config.bw_sample or (
            self._probed is not None and served > self._probed
            and span >= 0.95 * CAPACITY_ROUNDS * self._min_rtt())
        if served > 0 and lasted and (self._probed is None or self.config.capacity_follows_queue):
            self._probed, self._probed_at = served, now
        elif self._probed is not None and now - self._probed_at >= self.config.raise_span:
            self._probed = max(self._probed, self._span_rate(now, self.config.raise_span), self._burst_rate(now),
                               min(paced, last_paced))
        if overflow is not None and overflow > 0 and self._probed is None:
            self._probed, self._probed_at = overflow, now
        elif overflow is not None and self._probed is not None and self.config.capacity_follows_queue:
            # a later overflow: the link was full, so what it served over the last span, lanes busy throughout, is
            # about its rate, whoever held the lanes (not our pacing: at 1.05-1.1x of the link the lanes deliver
            # over paced_share of it, and the rule above lowers no estimate on an interval that reads
            # pacing-limited). A warm-up read 1.16x of a 2 Gbit/s, 80 ms link, and its 16 BBR lanes (each capped
            # above its share, so their own probing set the rate) overflowed the 20 ms queue in bursts, 1-2 % loss
            # for 3 s, the queue emptying between them, so it never stood a bw_sample. Only down, by more than
            # OVERFLOW_MARGIN and at most OVERFLOW_STEP at a time: the queue may have filled only at the span's end
            # (lanes ramping back after a drain or a lane restart), and what the span served is then less
            span = max(self.config.bw_sample, CAPACITY_ROUNDS * self._min_rtt())
            queued = not any(iv.app_limited for iv in self._intervals if iv.end > now - span)
            served_now = self._span_rate(now, span)
            if queued and 0 < served_now < (1 - OVERFLOW_MARGIN) * self._probed:
                self._probed = max(served_now, (1 - OVERFLOW_STEP) * self._probed)
                self._probed_at = now
        if self._probed is not None and self._floor_bw:
            self._probed = max(self._probed, self.config.floor_fraction * max(r for _, r in self._floor_bw))
        return self._probed

    def _burst_rate(self, now: float) -> float:
        """``burst_share`` x the best ``bw_sample`` span that began after the queue last set the estimate,
        when a lane had nothing queued within the last ``raise_span`` (else 0: the span average says it)."""
        cfg = self.config
        if self._app_limited_at is None or now - self._app_limited_at > cfg.raise_span:
            return 0.0
        spans = [rate for t, rate in self._bw if t - cfg.bw_sample >= self._probed_at - 1e-9]
        return cfg.burst_share * max(spans, default=0.0)


def _rate(run: Sequence[tuple[float, float, int, float]] | deque[tuple[float, float, int, float]]) -> float:
    """Bytes per second over ``(end, dt, bytes, ...)`` intervals (0 for none)."""
    span = sum(e[1] for e in run)
    return sum(e[2] for e in run) / span if span else 0.0


def _lane(key: LaneKey, info: TcpInfo, d: _Deltas, dt: float | None) -> LaneState:
    return LaneState(
        lane=key, goodput=d.acked / dt if dt else 0.0, srtt=_us(info.rtt_us), min_rtt=_us(info.min_rtt_us),
        cwnd_bytes=info.cwnd_bytes, loss_rate=_share(d.retrans, d.sent),
        busy=_share(d.busy_us, dt * 1e6) if dt else 0.0, rwnd_limited=_share(d.rwnd_us, d.busy_us),
        sndbuf_limited=_share(d.sndbuf_us, d.busy_us), delivery_rate=info.delivery_rate,
        pacing_rate=info.pacing_rate, max_pacing_rate=info.max_pacing_rate,
        notsent_bytes=info.notsent_bytes, ca_state=info.ca_state)


def _app_limited(items: Mapping[LaneKey, TcpInfo], deltas: Mapping[LaneKey, _Deltas],
                 prev: Mapping[LaneKey, TcpInfo], dt: float) -> bool:
    """Some lane had nothing to send: it had data in flight less than 90 % of the interval (a gap, or a
    request's tail on it). Only lanes seen before and whose kernel keeps ``busy_time``. (Neither
    ``notsent_bytes`` 0 nor the kernel's ``tcpi_delivery_rate_app_limited`` says it: a lane whose send
    buffer, not its window, bounds what is in flight has nothing unsent and is marked application-limited
    by the kernel while the application waits to write more; measured on a 1 Gbit/s, 80 ms link, both
    were set in most samples of a transfer that never paused.)"""
    for key, info in items.items():
        if key in prev and info.busy_time_us is not None and deltas[key].busy_us < 0.9 * dt * 1e6:
            return True
    return False


def _unqueued(items: Mapping[LaneKey, TcpInfo], deltas: Mapping[LaneKey, _Deltas],
              prev: Mapping[LaneKey, TcpInfo]) -> float:
    """Share of the lanes seen before that had nothing unsent at this sample (``notsent_bytes`` 0) and no
    send-buffer-limited time in the interval (a lane whose send buffer bounds what is in flight has nothing
    unsent while the application waits to write more: that is work queued). A lane whose kernel gives no
    ``notsent_bytes`` counts as queued."""
    known = [key for key in items if key in prev]
    if not known:
        return 0.0
    empty = sum(1 for key in known if items[key].notsent_bytes == 0 and deltas[key].sndbuf_us <= 0)
    return empty / len(known)


def _capped(cap: int | None) -> TypeGuard[int]:
    """``tcpi_max_pacing_rate`` says the lane carries a pacing cap (the kernel reports ~0 for none)."""
    return cap is not None and 0 < cap < UNLIMITED_PACING


def _paced_delivery(lanes: Sequence[LaneState]) -> float:
    """The lanes' latest delivery-rate samples, each at most the lane's pacing cap, summed (bytes/s); 0 unless
    every lane is paced and has a sample. Samples of one moment only: where some lanes carried data this
    interval and others did not, the busy ones' alone (an idle lane's sample is its last, from before its gap,
    when it shared the link with the lanes still sending: in a request's tail those summed read up to twice the
    link, and raised an estimate that nothing lowered after); where none did, all their last samples."""
    if any(not ln.delivery_rate or not _capped(ln.max_pacing_rate) for ln in lanes):
        return 0.0
    busy = [ln for ln in lanes if ln.busy > 0] or list(lanes)
    return float(sum(min(ln.delivery_rate or 0, ln.max_pacing_rate or 0) for ln in busy))


def _pacing_limited(items: Mapping[LaneKey, TcpInfo], goodput: float, share: float) -> bool:
    """Every lane carries a pacing cap and goodput reached ``share`` of their sum."""
    caps = [info.max_pacing_rate for info in items.values()]
    if not caps or not all(_capped(c) for c in caps):
        return False
    return goodput >= share * sum(c for c in caps if c is not None)


def _reset(info: TcpInfo, prev: TcpInfo) -> bool:
    """True when the counters went backwards: a new socket behind the same lane key."""
    return any(_lt(getattr(info, f), getattr(prev, f)) for f in ("bytes_acked", "bytes_sent", "busy_time_us"))


def _lt(a: int | None, b: int | None) -> bool:
    return a is not None and b is not None and a < b
