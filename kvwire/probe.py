"""Active capacity probe: a short burst of sink transfers that measures a link's capacity and RTT.

``result = probe(session)`` (``from kvwire.probe import probe``; or ``probe((host, port), key=...)``) before
real traffic; then, for example, ``LinkControl(session, capacity=result.capacity)``. The session's own
controller (its ``link_control``) is paused for the probe and starts over from the probe's capacity after
it; run it while no other ``LinkControl`` drives the session: the probe takes the lanes' pacing and
congestion algorithm over for its duration. ``warm_up`` is the same probe run by ``connect(warm=...)``
(``Session(warm=...)``) as a session opens on a long path, cut short once the pipe reads full, so the
first transfer finds its lanes' congestion windows open and its controller pacing at the measured rate.

Owns: ``probe`` and ``ProbeResult`` — preparing the session's lanes for the burst (pacing caps off, the
congestion algorithm, optionally another lane count; all put back afterwards), keeping sink transfers
back to back for the probe's duration, fed layer by layer from one shared zero buffer, sampling
``TCP_INFO`` on the calling thread into a ``LinkEstimator``, and waiting until the lanes hold nothing
unacknowledged, so the next real transfer does not queue behind probe bytes; ``warm_up``: whether a new
session is worth warming (its own controller, a path of ``WARM_MIN_RTT`` or more, a receiver that takes
probes; ``$KVWIRE_WARM``) — handed to the transport's ``Session(warm_up=...)`` by ``kvwire.connect``
(the transport is below this module and cannot import it). Must not know: the wire format, chunk
scheduling or how a receiver discards sinks (it calls ``Session.send(sink=True)`` like any caller), nor
the estimator's internals (only ``LinkState``'s fields).
"""

from __future__ import annotations

import concurrent.futures
import logging
import math
import os
import socket
import time
from dataclasses import dataclass, fields
from typing import Any

from .codec.layout import ModelLayout
from .codec.probe import PROBE_SEGMENT, probe_layers, probe_layout, probe_request
from .congestion.decision import ControllerConfig
from .congestion.estimator import EstimatorConfig, LinkEstimator, LinkState
from .congestion.monitor import LinkMonitor
from .congestion.rules import pipe_step
from .congestion.tcpinfo import sample
from .errors import KvwireError, ProbeRefused, TransferCancelled
from .sockopts import SocketOptionError, get_congestion, get_pacing_rate, set_congestion, set_pacing_rate
from .tcp import LONG_PATH_RTT, OutgoingTransfer, Session, connect

log = logging.getLogger("kvwire.probe")

Peer = Session | tuple[str, int]

#: sink transfers kept outstanding, so the lanes never idle while the next one is being accepted
OUTSTANDING = 2
#: after the burst the lanes get this long, plus 4 RTTs, to deliver what they hold
DRAIN_SECONDS = 2.0
_QUIET_STEP = 0.005  # seconds between two TCP_INFO reads that must both find the lanes empty
#: the burst's pipe is full by BBR's rule (``congestion.rules.pipe_step``) over at least this long
PIPE_MIN = 0.2
#: a probe interval in which lanes were held by their send buffer or the receive window this share of busy
#: time says nothing of the link: its plateau is the windows' (too few lanes for the path), not the pipe's
_WINDOW_HELD = 0.3
_MIN_BUSY = 0.5


@dataclass(frozen=True)
class ProbeResult:
    """What one probe measured. Rates in bytes/s of TCP payload, times in seconds."""

    # max over bw_sample spans of goodput (the LinkStates' btl_bw), or, if more, the estimator's capacity at the
    # burst's end (set once a queue stood or overflowed: before the bw_sample average catches up with a ramp)
    capacity: float
    saturated: bool  # a standing queue was seen while busy: capacity is the bottleneck's rate, not a lower bound
    min_rtt: float | None
    max_queueing_ratio: float | None
    loss_rate: float  # bytes retransmitted / bytes sent on the lanes during the probe
    bytes_sent: int  # probe payload handed to the lanes
    seconds: float  # length of the burst (the drain that follows is not counted)
    lanes: int
    states: tuple[LinkState, ...] = ()  # every sample, burst and drain
    congestion: str | None = None  # the lanes' congestion algorithm during the burst
    drained: bool = True  # the lanes held nothing unacknowledged when the probe returned
    notes: tuple[str, ...] = ()  # settings the kernel refused, a drain that ran out of time
    # bottleneck bandwidth stopped growing (BBR's full-pipe rule) on a WAN path while no socket window held the
    # lanes: capacity is the bottleneck's rate, as with ``saturated``
    full_pipe: bool = False
    stopped_full: bool = False  # ``until_full`` ended the burst before ``seconds`` (full_pipe, or the queue overflowed)
    drain_seconds: float = 0.0  # from the end of the burst until the lanes held nothing (or the drain gave up)

    @property
    def delivered(self) -> float:
        """The fastest ``bw_sample`` span of goodput the burst read (its samples' ``btl_bw``), which
        ``capacity`` bounds by what the lanes' own delivery-rate samples summed to (a span that ACKs a host
        stall held back and released at once reads faster than the link): evidence to probe back to once, not
        to pace at (``LinkControl(delivered=...)``)."""
        return max((s.btl_bw for s in self.states), default=0.0)

    @property
    def buffer(self) -> float | None:
        """Bytes: the least queue the burst's overflows read (``LinkState.buffer``; None: none overflowed). A
        drop-tail queue holds no more than it held when it dropped, so the bottleneck's buffer is at most this."""
        return min((s.buffer for s in self.states if s.buffer), default=None)

    @property
    def measured(self) -> bool:
        """The pipe was seen full (``saturated`` or ``full_pipe``): ``capacity`` is the link's, not a lower bound."""
        return self.saturated or self.full_pipe

    def to_dict(self) -> dict[str, object]:
        """Plain data (numbers, bools, None, strings, lists, dicts) for JSON/msgpack and logs."""
        d: dict[str, object] = {f.name: getattr(self, f.name) for f in fields(self)}
        d["states"] = [s.to_dict() for s in self.states]
        d["notes"] = list(self.notes)
        return d


#: a burst that did not see the pipe full still measured what the link carried; one that lasted this many of the
#: path's round trips is past BBR's STARTUP (which doubles a lane's window each round trip from ten segments:
#: 2^8 of it on 16 lanes is ~60 MB a round trip, over a 5 Gbit/s, 80 ms path's product), so its reading is the
#: link's rate or close under it. Discarded, the controller started over unpaced: on 2 Gbit/s, 80 ms, 0.01 % loss,
#: one warm-up in ~30 ran its 16 round trips reading 1955 Mbit/s without the full-pipe rule firing, the first
#: transfer's lanes overflowed the queue (6.9 % loss, 1993 drops), that overflow read the link at 675 Mbit/s and
#: the first layer-streamed request's tail took 863 ms (its later ones 124-169 ms)
FLOOR_ROUNDS = 8


def start_capacity(result: ProbeResult) -> float | None:
    """The capacity a session's controller starts from after ``result``: what it measured, the pipe seen full
    (``measured``); or, from a burst that ran ``FLOOR_ROUNDS`` of the path's round trips without seeing it full,
    its reading as a floor (paced at it, the controller's first up-probe follows after ``settle`` and finds more,
    if there is more) where the path is long (``LONG_PATH_RTT`` or more); ``None`` from a shorter burst, whose
    reading is its ramp's, or on a shorter path, where the controller leaves unpaced lanes alone (a LAN's lanes
    are not the limit, and a floor read there would only cap them): the controller starts over, probing."""
    if not result.capacity > 0:
        return None
    if result.measured:
        return result.capacity
    rtt = result.min_rtt
    if rtt is not None and rtt >= LONG_PATH_RTT and result.seconds >= FLOOR_ROUNDS * rtt:
        return result.capacity
    return None


def probe(peer: Peer, *, seconds: float = 1.0, interval: float = 0.05, lanes: int | None = None,
          congestion: str | None = "bbr", until_full: bool = False, **connect_kwargs: Any) -> ProbeResult:
    """Measure the link to ``peer`` with ``seconds`` of back-to-back sink transfers.

    ``peer`` is a ``Session`` (left open, its lane settings restored) or a ``(host, port)`` tuple (a
    session is opened with ``connect_kwargs`` and closed again). ``interval``: seconds between
    ``TCP_INFO`` samples. ``lanes``: the lane count to probe with (the session's is restored after).
    ``congestion``: the algorithm for the burst (``None`` keeps the lanes'); one the kernel refuses is
    skipped with a note in the result. ``until_full``: end the burst at the first sample that shows the pipe
    full (BBR's full-pipe rule, or the queue overflowing; ``_Probe._full``) instead of running all ``seconds``. Raises
    ``ValueError`` for bad arguments, ``ProbeRefused`` when the receiver takes no probes, ``KvwireError``
    for a closed session, and the failure (a ``KvwireError``) when the session or a probe transfer fails
    midway.
    """
    if not isinstance(seconds, (int, float)) or not 0 < seconds < math.inf:
        raise ValueError(f"seconds must be a positive number, got {seconds!r}")
    if not isinstance(interval, (int, float)) or not 0 < interval < math.inf:
        raise ValueError(f"interval must be a positive number, got {interval!r}")
    if lanes is not None and (isinstance(lanes, bool) or not isinstance(lanes, int) or lanes < 1):
        raise ValueError(f"lanes must be a positive int, got {lanes!r}")
    if isinstance(peer, Session):
        if connect_kwargs:
            raise ValueError(f"connect arguments {sorted(connect_kwargs)} need a (host, port) peer")
        ctl = peer.link_control
        if ctl is None:
            return _Probe(peer, float(seconds), float(interval), lanes, congestion, until_full).run()
        with ctl.paused():  # the session's own controller leaves the lanes to the probe ...
            result = _Probe(peer, float(seconds), float(interval), lanes, congestion, until_full).run()
        ctl.resume(start_capacity(result), result.delivered, result.buffer)  # ... and starts from what it measured
        return result
    if not isinstance(peer, tuple) or len(peer) != 2:
        raise TypeError(f"peer must be a Session or a (host, port) tuple, got {peer!r}")
    if lanes is not None:
        connect_kwargs.setdefault("lanes", lanes)
    connect_kwargs.setdefault("link_control", False)  # the probe drives the lanes itself
    connect_kwargs.setdefault("warm", False)  # (this is the probe)
    session = connect(peer[0], peer[1], **connect_kwargs)
    try:
        return _Probe(session, float(seconds), float(interval), lanes, congestion, until_full).run()
    finally:
        session.close()


@dataclass
class _Saved:
    """A lane socket's settings before the probe."""

    sock: socket.socket
    pacing: int | None
    congestion: str


class _Probe:
    """One probe over one session, on the calling thread."""

    def __init__(self, session: Session, seconds: float, interval: float, lanes: int | None,
                 congestion: str | None, until_full: bool = False) -> None:
        self.session = session
        self.until_full = until_full
        self.full_pipe = False
        self._judging = True
        self._pipe: tuple[float, float] | None = None  # (btl_bw, timestamp) at its last 25 % growth
        self._pipe_seen: float | None = None  # the previous sample's timestamp (held time pauses the count)
        self._estimate: float | None = None  # the estimator's capacity at the burst's last sample (None: unknown)
        self._overflowed = False  # a judged sample had the queue overflowing (``LinkState.overflowing``)
        self.seconds = seconds
        self.interval = interval
        self.lanes = lanes
        self.congestion = congestion
        self.notes: list[str] = []
        self.states: list[LinkState] = []
        self.handles: list[OutgoingTransfer] = []  # every sink sent
        self.saved: list[_Saved] = []
        bw_sample = min(0.2, max(2 * interval, seconds / 4))
        config = EstimatorConfig(bw_sample=bw_sample, stats_window=max(2 * bw_sample, 2 * interval))
        self.monitor = LinkMonitor(session.lane_sockets, interval, LinkEstimator(config))
        self._next_poll = 0.0

    # ------------------------------------------------------------ the run
    def run(self) -> ProbeResult:
        layout = self._layout()
        session = self.session
        active_before = session.active_lanes
        outstanding: list[OutgoingTransfer] = []
        try:
            if self.lanes is not None:
                session.set_active_lanes(self.lanes)
            socks = session.lane_sockets()
            if not socks:
                raise KvwireError("session has no live lane to probe with")
            used_cc = self._prepare(socks)
            stopped_full = False
            before = _counters(socks)
            zero = bytes(PROBE_SEGMENT)
            self._poll()
            t0 = time.monotonic()
            end = t0 + self.seconds
            self._next_poll = t0 + self.interval
            while True:
                for h in [h for h in outstanding if h.finished]:
                    outstanding.remove(h)
                    h.result(0)  # a sink that did not complete ends the probe with its error
                now = time.monotonic()
                if now >= end:
                    break
                while len(outstanding) < OUTSTANDING:
                    outstanding.append(self._sink(layout, zero))
                concurrent.futures.wait([h.future for h in outstanding], max(0.0, min(self._next_poll, end) - now),
                                        return_when=concurrent.futures.FIRST_COMPLETED)
                if self._maybe_poll() and self.until_full and self._full():
                    stopped_full = True
                    break
            burst = time.monotonic() - t0
            self._judging = False  # (the drain's samples say nothing of the pipe)
            self._pace_drain(socks)
            drained = self._wind_down(outstanding)
            drain = time.monotonic() - t0 - burst
            outstanding = []
            loss = _loss(before, _counters(socks))
        finally:
            for h in outstanding:  # an error ended the burst early
                h.cancel("probe aborted")
            self._restore()
            if self.lanes is not None and not session.closed and session.active_lanes != active_before:
                session.set_active_lanes(active_before)
        if session.closed:
            raise KvwireError(f"session failed during the probe: {session.failure or 'closed'}")
        states = tuple(self.states)
        rtts = [s.min_rtt for s in states if s.min_rtt is not None]
        ratios = [s.queueing_ratio for s in states if s.queueing_ratio is not None]
        return ProbeResult(
            capacity=self._capacity(),
            saturated=any(s.saturated for s in states),
            min_rtt=min(rtts) if rtts else None,
            max_queueing_ratio=max(ratios) if ratios else None,
            loss_rate=loss,
            bytes_sent=sum(h.bytes_sent for h in self.handles),
            seconds=burst,
            lanes=len(socks),
            states=states,
            congestion=used_cc,
            drained=drained,
            notes=tuple(self.notes),
            full_pipe=self.full_pipe,
            stopped_full=stopped_full,
            drain_seconds=drain,
        )

    def _layout(self) -> ModelLayout:
        s = self.session
        if s.closed:
            raise KvwireError(f"session closed: {s.failure or 'closed'}")
        if "max_probe_bytes" not in s.server_limits:
            raise ProbeRefused("the receiver does not support probes (it announces no max_probe_bytes)")
        budget = s.server_limits["max_probe_bytes"]
        if isinstance(budget, bool) or not isinstance(budget, int) or probe_layers(budget) == 0:
            raise ProbeRefused(f"the receiver accepts no probes (max_probe_bytes={budget!r})")
        cap = s.server_limits.get("max_transfer_bytes", budget)
        if isinstance(cap, int) and not isinstance(cap, bool):  # a receiver with smaller transfers
            budget = min(budget, cap)
        budget = min(budget, s.limits.max_transfer_bytes)
        if probe_layers(budget) == 0:
            raise ProbeRefused(f"the peers' transfer limits leave no room for a {PROBE_SEGMENT}-byte probe")
        return probe_layout(probe_layers(budget))

    def _sink(self, layout: ModelLayout, zero: bytes) -> OutgoingTransfer:
        """Start one sink transfer and hand it every layer (all the same zero buffer, nothing copied)."""
        rid = f"kvwire-probe-{len(self.handles)}"
        h = self.session.send(layout, probe_request(rid), timeout=self.seconds + 60.0, sink=True)
        self.handles.append(h)
        for layer in range(layout.num_layers):
            h.write_layer(layer, [zero])
        h.finish()
        return h

    def _poll(self) -> None:
        state = self.monitor.poll()
        self.states.append(state)
        self._watch_pipe(state)

    def _maybe_poll(self) -> bool:
        """Sample if one is due; True when it did."""
        now = time.monotonic()
        if now < self._next_poll:
            return False
        self._poll()
        self._next_poll += self.interval
        if self._next_poll <= now:  # fell behind: keep the period, skip the missed ticks
            self._next_poll = now + self.interval
        return True

    def _watch_pipe(self, s: LinkState) -> None:
        """BBR's full-pipe rule over the burst's samples (``pipe_step``, ``PIPE_MIN`` at least). A sample in
        which the lanes idled or a socket window held them does not count: the plateau's clock stops for it
        (a plateau of too few send buffers for the path is not the link's), as BBR skips app-limited rate
        samples. It used to restart the count: on loopback read as a WAN, beside a competing iperf3 -P4, 2
        bursts in 5 never read full in 3 s (8 of 8 did after). Not on a LAN path, where the plateau is the
        hosts' CPU."""
        held = max(s.sndbuf_limited, s.rwnd_limited) >= _WINDOW_HELD or s.busy < _MIN_BUSY
        lan = s.min_rtt is None or s.min_rtt < ControllerConfig().lan_rtt
        if not self._judging:
            return
        self._estimate = s.capacity
        self._overflowed = self._overflowed or s.overflowing
        seen, self._pipe_seen = self._pipe_seen, s.timestamp
        if lan or s.btl_bw <= 0:
            self._pipe = None
            return
        if held:
            if self._pipe is not None and seen is not None:
                self._pipe = (self._pipe[0], self._pipe[1] + (s.timestamp - seen))
            return
        # (round trips as the path takes them now, srtt: BBR counts a round by a packet's ACK, and a host that
        # holds ACKs back (srtt 2-3x the min RTT) stretches them; counted in min RTTs, 3 of them passed within
        # a host stall's flat span while the bandwidth went on growing after it: 0.51x of the link)
        self._pipe, full = pipe_step(self._pipe, s.btl_bw, s.timestamp, max(s.srtt or 0.0, s.min_rtt or 0.0), PIPE_MIN)
        self.full_pipe = self.full_pipe or full

    def _full(self) -> bool:
        """The pipe reads full: BBR's full-pipe rule, or the queue overflowed (``LinkState.overflowing``: a
        standing queue and congestive loss). Not a queue that stood without loss while the bandwidth still
        grew (the estimator's capacity from it is taken at the drain, not as the end): a host that cannot keep
        up with STARTUP's bursts (an emulator, a busy receiver) delays ACKs, and that reads as a queue deeper
        than the link's whole buffer. On a 2 Gbit/s, 80 ms link with a 20 ms queue, on a 2-core host, such
        "queues" (queueing ratio 1.5-2.0 where the link's queue tops out at 1.25, no loss) ended 3 warm-ups
        in 5 at 0.75-0.8 s with the bandwidth still growing ~40 % a round trip: readings 0.56-0.66x of the
        link, which every request after inherited (the first took 1.49x its ideal time). BBR ends STARTUP on
        the plateau or on loss, not on delay; so does the controller's in-band probe (it needs both)."""
        return self.full_pipe or self._overflowed

    def _capacity(self) -> float:
        """What the burst measured (``burst_capacity``)."""
        return burst_capacity(self.states, self._estimate)

    def _pace_drain(self, socks: list[socket.socket]) -> None:
        """Once the pipe read full, cap each lane at its share of the link's rate for the drain: what the lanes
        still hold (their congestion windows, up to ``TCP_NOTSENT_LOWAT`` unsent) then leaves at about that
        rate instead of at STARTUP's, into a queue that is already overflowing. The rate: the measured
        capacity, or the lanes' summed delivery rates at the last sample if more (each over the lane's last
        round trip: an overflow seen early, with a bw_sample span still reaching into the ramp, reads the
        capacity low, 237 Mbit/s on a 400 Mbit/s link once, while the sum read 412; paced at the low reading
        the drain hid the link's rate from the samples that would have raised it). The lanes' own caps come
        back with ``_restore``."""
        # (the reading before ``burst_capacity``'s bound, as before it: the drain's own samples count in the result)
        capacity = max(max((s.btl_bw for s in self.states), default=0.0), self._estimate or 0.0)
        if not (self.full_pipe or self._estimate is not None) or capacity <= 0 or not socks:
            return
        latest = self.states[-1] if self.states else None
        delivering = sum(ln.delivery_rate or 0 for ln in latest.lanes) if latest is not None else 0
        share = max(1, int(max(capacity, delivering) / len(socks)))
        for sock in socks:
            try:
                set_pacing_rate(sock, share)
            except SocketOptionError:
                continue

    def _wind_down(self, outstanding: list[OutgoingTransfer]) -> bool:
        """Cancel the sinks in flight (one about to finish may), then wait, bounded, until the lanes have
        nothing unsent or unacknowledged. True when they drained in time."""
        latest = self.states[-1] if self.states else None
        rate = latest.goodput if latest is not None else 0.0
        rtt = (latest.srtt or latest.min_rtt or 0.0) if latest is not None else 0.0
        deadline = time.monotonic() + DRAIN_SECONDS + 4 * rtt
        for h in outstanding:
            if h.manifest.total_bytes - h.bytes_sent > rate * self.interval:
                h.cancel("probe finished")
        for h in outstanding:
            try:
                h.result(max(0.0, deadline - time.monotonic()))
            except TransferCancelled:
                pass
            except TimeoutError:
                h.cancel("probe finished")
            except KvwireError:
                if self.session.closed:
                    raise
                self.notes.append(f"the last probe transfer failed: {h.reason}")
        quiet_at: float | None = None
        while True:
            now = time.monotonic()
            if _quiet(self.session.lane_sockets()):
                if quiet_at is not None:
                    return True
                quiet_at = now
            else:
                quiet_at = None
            if now >= deadline:
                self.notes.append(f"lanes still held probe bytes {DRAIN_SECONDS + 4 * rtt:.2f}s after the burst")
                return False
            if self.session.closed:
                return False
            self._maybe_poll()
            time.sleep(_QUIET_STEP)

    # ------------------------------------------------------------ lane settings
    def _prepare(self, socks: list[socket.socket]) -> str | None:
        """Remember each lane's pacing cap and algorithm, then lift the cap and set ``congestion``.
        Returns the algorithm in effect."""
        cc_refused = False
        for sock in socks:
            try:
                saved = _Saved(sock, get_pacing_rate(sock), get_congestion(sock))
            except SocketOptionError as e:
                self.notes.append(f"a lane's settings are unreadable; left as they are: {e}")
                continue
            self.saved.append(saved)
            try:
                set_pacing_rate(sock, None)
            except SocketOptionError as e:
                self.notes.append(f"pacing cap not lifted: {e}")
            if self.congestion is not None and self.congestion != saved.congestion and not cc_refused:
                try:
                    set_congestion(sock, self.congestion)
                except SocketOptionError as e:  # UnknownCongestionAlgorithm among them
                    cc_refused = True
                    self.notes.append(f"congestion algorithm {self.congestion!r} not set: {e}")
        for sock in socks:
            try:
                return get_congestion(sock)
            except SocketOptionError:
                continue
        return None

    def _restore(self) -> None:
        """Put back each lane's pacing cap and algorithm. A lane closed or replaced meanwhile is skipped: its
        successor got the session's lane-open settings (its controller's), not the probe's."""
        for saved in self.saved:
            try:
                set_pacing_rate(saved.sock, saved.pacing)
                if get_congestion(saved.sock) != saved.congestion:
                    set_congestion(saved.sock, saved.congestion)
            except SocketOptionError:
                continue
        self.saved.clear()


def burst_capacity(states: tuple[LinkState, ...] | list[LinkState], estimate: float | None) -> float:
    """What a burst measured: the fastest ``bw_sample`` span of goodput (``btl_bw``) or the estimator's
    capacity, whichever is more, but no more than the most the lanes' delivery-rate samples summed to at
    one sample. Goodput is ACKed bytes over our own sampling intervals, so a host stall (the receiver's or
    an emulator's) that holds ACKs back and then releases them at once reads as a span faster than the
    link: on 2 Gbit/s, 80 ms, a stall read as a 1.7x "queue" without loss, and the 0.2 s span after it
    1.16x the link, while the lanes' summed samples never passed 1.00x. The kernel's delivery-rate samples
    (BBR's) divide each ACK's delivered bytes by the longer of its send and ACK intervals, so a burst of
    late ACKs does not speed them up. Not a bound where the kernel gives none (0)."""
    reading = max(max((s.btl_bw for s in states), default=0.0), estimate or 0.0)
    delivered = max((sum(ln.delivery_rate or 0 for ln in s.lanes) for s in states), default=0)
    return min(reading, float(delivered)) if delivered > 0 else reading


# ---------------------------------------------------------------- warming a session as it opens
#: the shortest handshake RTT at which ``warm=None`` (auto) warms a session: across regions (20 ms and more);
#: a rack's or a metro link's (up to ~10 ms) lanes reach their rate within a few round trips and never pay
#: slow start noticeably. Between the two, not on either: at 20 ms itself, emulated 20 ms links (the
#: kernel's min RTT reads 19.9-20.3 ms there) were warmed in some runs and not in others. Warming pays at
#: 20 ms: on 400 Mbit/s, 0.1 % loss, warm vs cold, BBR 90-94 % vs 92 % of the link and CUBIC lanes 92-93 %
#: vs 84-89 % (the in-band probe's first overflow reads the capacity low on 4 slow-starting lanes), for
#: 0.6-0.9 s at connect and about as many queue drops as the in-band probe's own start (850-990 vs 710-730).
#: The transport's long path (``kvwire.tcp.LONG_PATH_RTT``): a session there opened every lane the warm-up
#: uses in its first dial round
WARM_MIN_RTT = LONG_PATH_RTT
#: the longest warm-up burst (``warm=None`` or ``True``) is this long or ``WARM_ROUNDS`` of the path's round
#: trips, whichever is longer (``warm_seconds``); it ends sooner once the pipe reads full. BBR's STARTUP
#: doubles a round trip from ten segments a lane, so the ramp to a bandwidth-delay product is counted in
#: round trips, not seconds: on 2 Gbit/s, 80 ms, 0.01 % loss with 16 lanes the pipe read full 0.8-1.1 s
#: (10-14 round trips) in, and a 1.0 s budget cut 1 warm-up in 3 off just before it (not measured, so the
#: controller started cold and a layer stream's first overflow read the capacity at 58 % of the link)
WARM_SECONDS = 1.0
WARM_ROUNDS = 16
#: ``KVWIRE_WARM=0`` (or ``off``/``false``/``no``): no automatic warm-up in this process (``warm=True`` or a
#: number of seconds still warms)
WARM_ENV = "KVWIRE_WARM"


def warm_enabled() -> bool:
    """Whether ``warm=None`` (the default) may warm sessions in this process (``$KVWIRE_WARM``)."""
    return os.environ.get(WARM_ENV, "1").strip().lower() not in ("0", "off", "false", "no")


def path_rtt(session: Session) -> float | None:
    """The path's round trip in seconds as the session's handshakes measured it (``Session.path_rtt``)."""
    return session.path_rtt()


def warm_skip_reason(session: Session) -> str:
    """Why ``warm=None`` leaves this session cold ('' to warm it): no controller of its own (turned off, or
    a ``LaneGroup``'s), or ``path_skip_reason``."""
    if warm_enabled() and session.link_control is None:
        return "the session has no congestion controller of its own"
    return path_skip_reason(session)


def path_skip_reason(session: Session) -> str:
    """Why a controlled session on this path would be left cold ('' to warm it): ``$KVWIRE_WARM`` off, a path
    shorter than ``WARM_MIN_RTT``, or a receiver that takes no probes (no ``max_probe_bytes``, or 0). For a
    session whose controller is attached later (``kvwire-bench``'s own)."""
    if not warm_enabled():
        return f"${WARM_ENV} is off"
    budget = session.server_limits.get("max_probe_bytes")
    if isinstance(budget, bool) or not isinstance(budget, int) or budget <= 0:
        return f"the receiver takes no probes (max_probe_bytes={budget!r})"
    rtt = path_rtt(session)
    if rtt is None or rtt < WARM_MIN_RTT:
        return "no RTT measured" if rtt is None else f"RTT {rtt * 1e3:.3g} ms < {WARM_MIN_RTT * 1e3:.3g} ms"
    return ""


def warm_seconds(session: Session) -> float:
    """The warm-up burst's budget on this session's path: ``WARM_SECONDS`` or ``WARM_ROUNDS`` round trips
    (``path_rtt``), whichever is longer."""
    return max(WARM_SECONDS, WARM_ROUNDS * (path_rtt(session) or 0.0))


def warm_up(session: Session, warm: bool | float | None = None) -> ProbeResult | None:
    """Warm a session that has just opened (``Session(warm=...)`` calls this): up to ``warm_seconds`` (or
    ``warm`` seconds) of probe sinks, ended as soon as the pipe reads full, then the drain; the lanes keep
    the congestion windows the burst opened, and the session's controller starts over paced at the measured
    capacity (``probe``, ``start_capacity``: a burst that ran its whole budget without reading the pipe full
    is a floor that is paced at and up-probed from). ``warm``: ``None`` only where ``warm_skip_reason``
    finds nothing against it; ``True`` or seconds regardless; ``False`` never. Returns the probe's result, or
    ``None`` when skipped (logged): a receiver that refuses probes, or a probe that failed while the session
    stays up, is not an error. Raises the failure when the session closed during it."""
    if warm is False:
        return None
    if warm is None:
        reason = warm_skip_reason(session)
        if reason:
            log.debug("kvwire: no warm-up of the session to %s:%s: %s", *session.address, reason)
            return None
    seconds = warm_seconds(session) if warm is None or warm is True else float(warm)
    # every lane the controller may use takes part, so none it opens for the measured capacity starts cold
    ctl = session.link_control
    lanes = max(session.active_lanes, min(ctl.config.max_lanes, session.max_lanes)) if ctl is not None else None
    try:
        result = probe(session, seconds=seconds, congestion=None, until_full=True, lanes=lanes)
    except ProbeRefused as e:
        log.info("kvwire: no warm-up of the session to %s:%s: %s", *session.address, e)
        return None
    except KvwireError as e:
        if session.closed:
            raise
        log.warning("kvwire: warm-up of the session to %s:%s failed: %s", *session.address, e)
        return None
    log.info("kvwire: session to %s:%s warmed in %.2f s (+%.2f s drain) with %d MB at %.4g Mbit/s%s",
             *session.address, result.seconds, result.drain_seconds, result.bytes_sent / 1e6,
             result.capacity * 8e-6, "" if result.measured else " (pipe not seen full)")
    return result



def _quiet(socks: list[socket.socket]) -> bool:
    """No lane has bytes unsent or unacknowledged (``TCP_INFO`` unacked and notsent_bytes both 0)."""
    return not any(info.unacked or info.notsent_bytes for info in sample(socks).values())  # closed: holds nothing


def _counters(socks: list[socket.socket]) -> dict[int, tuple[int, int]]:
    """Per socket (by descriptor): cumulative bytes sent and bytes retransmitted."""
    return {fd: (info.bytes_sent or 0, info.bytes_retrans or 0) for fd, info in sample(socks).items()}


def _loss(before: dict[int, tuple[int, int]], after: dict[int, tuple[int, int]]) -> float:
    sent = retrans = 0
    for key, (s1, r1) in after.items():
        if key in before:
            s0, r0 = before[key]
            sent += max(0, s1 - s0)
            retrans += max(0, r1 - r0)
    return min(1.0, retrans / sent) if sent else 0.0
