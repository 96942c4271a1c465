"""``LinkControl``: the adaptive link controller attached to one sending session (or a ``LaneGroup``).

Owns: wiring a ``LinkMonitor`` (TCP_INFO of the session's active lanes every ``interval``), its
``LinkEstimator`` and a ``LaneController`` to the session's hooks — ``lane_sockets()`` (what to
sample and pace), ``set_active_lanes(n)`` (the lane count), a lane-open hook (a lane connected or
reconnected gets the current pacing cap and algorithm before it carries data) and, where the session has
it, a lane-busy hook (a lane that waited for work picked some up: if the last sample had it idle, the
split of the pacing gives it its full share at once, ``LaneController.lane_busy``), both through the
session's ``set_control_hooks`` slot where it has one (``kvwire.Session``: the user's ``on_lane_open`` /
``on_lane_busy`` run after them, whenever assigned), else as its ``on_lane_open`` / ``on_lane_busy`` with
the hook it had chained after (a ``LaneGroup``) — and publishing every ``LinkState`` to subscribers;
``for_session``, the controller a session gets by default (``Session(link_control=...)``), with a
``LinkShare`` named after its destination (the aggregate pacing capped at a fair share while other
processes' controllers use the same path), and pausing one while ``kvwire.probe`` owns the lanes. Must
not know: transfers, the wire format, how the session picks chunks; the session is used only through
those hooks (a duck-typed ``Controllable``; a session that owns a default controller hands its lanes over
through ``detach_link_control()`` when another ``LinkControl`` or a ``LaneGroup`` takes them).
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import Protocol

from .controller import (
    ControllerConfig,
    Decision,
    LaneController,
    Mode,
    apply_decision,
    initial_state,
    lane_window_for,
    start_lanes,
)
from .estimator import EstimatorConfig, LinkEstimator, LinkState
from .monitor import LinkMonitor, Subscriber
from .share import LinkShare, Peer, fair_share, share_name
from .tcpinfo import handshake_rtt

#: the kernel's ceiling on a socket's send buffer under autotuning (``tcp_wmem``: min, default, max)
_TCP_WMEM = "/proc/sys/net/ipv4/tcp_wmem"


class Controllable(Protocol):
    """What ``LinkControl`` needs of a session (``kvwire.Session`` has it)."""

    on_lane_open: Callable[[int, socket.socket], None] | None
    # (optional: ``on_lane_busy``, the same signature, called as a lane that waited for work picks some up;
    # and ``set_control_hooks(on_open, on_busy)`` with ``control_hooks``: a slot for the controller's)

    def lane_sockets(self) -> list[socket.socket]: ...

    def set_active_lanes(self, n: int) -> int: ...


class LinkControl:
    """``ctl = LinkControl(session)``; ``ctl.subscribe(cb)``; ``ctl.latest()``; ``ctl.close()``.

    Starts in PROBE (lanes unpaced, the configured algorithm — BBR by default — finds the bottleneck
    with the first traffic), then paces the aggregate just under the estimated capacity; see
    ``controller`` for the policy. ``config.polite`` makes it yield to competing flows. ``capacity``
    (bytes/s of TCP payload), when known from ``kvwire.probe`` or an earlier run, seeds the estimate and
    skips the in-band PROBE: the lanes are paced under it from the first byte. ``delivered`` (bytes/s, with
    a ``capacity``): the most the link was seen delivering meanwhile, where that is more than the capacity
    (a burst's fastest goodput span, which the lanes' delivery-rate samples did not confirm): the first
    up-probe goes straight to it, once (``controller``'s ``delivered``). Lanes are sampled every
    ``interval``, every ``probe_interval`` while a probe runs with no capacity known (``sampling_interval``).
    """

    def __init__(self, session: Controllable, config: ControllerConfig | None = None, *,
                 interval: float = 0.1, estimator: EstimatorConfig | None = None,
                 capacity: float | None = None, delivered: float | None = None, start: bool = True,
                 share: LinkShare | None = None, probe_interval: float | None = 0.025) -> None:
        detach = getattr(session, "detach_link_control", None)
        if callable(detach):
            detach()  # the session's default controller hands its lanes over to this one
        self.session = session
        self.config = config or ControllerConfig()
        self.estimator = LinkEstimator(estimator or EstimatorConfig(
            bw_sample=0.2, capacity_follows_queue=not self.config.polite))
        if capacity is not None:
            self.estimator.seed_capacity(capacity, time.monotonic())  # (the monitor's clock, below)
        self._busy_hooked = hasattr(session, "on_lane_busy")  # (a ``LaneGroup`` has no such event)
        self.controller = LaneController(self.config, session.lane_sockets, self._set_lanes, capacity,
                                         lane_events=self._busy_hooked)
        self._clock = time.monotonic  # the monitor's: a lane's busy event is set against the samples' times
        self.monitor = LinkMonitor(session.lane_sockets, interval, self.estimator, clock=self._clock)
        self.interval, self.probe_interval = interval, probe_interval
        self.share = share
        self._paused = False
        self._start_lock = threading.Lock()
        self.shared_cap: float | None = None  # the aggregate pacing the share allows now (None: no cap)
        self._shared_fds: frozenset[int] = frozenset()
        self._shared_applied = -1  # the controller's ``applied`` count when the share's cap was last put on
        self._link_best: tuple[float, float] | None = None  # (capacity, wall time) published to the share
        # a session with a slot for its controller's hooks (``kvwire.Session``) runs its user's after them,
        # whatever the user assigns later; another Controllable (a ``LaneGroup``) has ours in its own hook
        # attributes, a hook it had chained after ours
        self._slot = callable(getattr(session, "set_control_hooks", None))
        self._prior_hook = None if self._slot else session.on_lane_open
        self._prior_busy: Callable[[int, socket.socket], None] | None = (
            None if self._slot else getattr(session, "on_lane_busy", None))
        if self._slot:
            session.set_control_hooks(self._on_lane_open, self._on_lane_busy)  # type: ignore[attr-defined]
        else:
            session.on_lane_open = self._on_lane_open
            if self._busy_hooked:
                session.on_lane_busy = self._on_lane_busy  # type: ignore[attr-defined]
        self.controller.history.clear()
        self._begin(capacity, 0.0, delivered)
        apply_decision(self.decision, session.lane_sockets())
        self.monitor.subscribe(self._control)
        if start:
            self.start()

    @property
    def decision(self) -> Decision:
        return self.controller.decision

    @property
    def history(self) -> list[tuple[float, Decision]]:
        """``(LinkState timestamp, decision)`` for every change of decision."""
        return list(self.controller.history)

    def subscribe(self, callback: Subscriber) -> Callable[[], None]:
        """``callback(LinkState)`` after every sample (on the monitor thread); returns unsubscribe."""
        return self.monitor.subscribe(callback)

    def latest(self) -> LinkState | None:
        return self.monitor.latest()

    def start(self) -> None:
        """Start sampling (``start=False`` at construction defers it); idempotent."""
        with self._start_lock:
            if not self.monitor.running and not self.monitor.stopped:
                self.monitor.start()

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Leave the lanes alone for the block (``kvwire.probe`` sets pacing and algorithms itself); the
        sampling goes on. After it the current decision is applied again (``resume`` to restart it)."""
        self._paused = True
        try:
            yield
        finally:
            self._paused = False
            apply_decision(self.decision, self.session.lane_sockets(), share=len(self.session.lane_sockets()))

    def resume(self, capacity: float | None = None, delivered: float | None = None,
               buffer: float | None = None) -> None:
        """Start the policy over (PROBE; or, given a ``capacity`` measured meanwhile, paced under it from
        now on, that capacity seeding the estimate and sizing the lanes, and ``delivered`` as in the
        constructor) and apply it to the lanes. ``buffer`` (bytes): a queue the probe saw overflow
        (``ProbeResult.buffer``): the bottleneck holds no more, so a lossless "queue" much deeper is delay
        elsewhere (``LinkState.max_queue``)."""
        if capacity is not None:
            self.monitor.seed_capacity(capacity)
        if buffer is not None and buffer > 0:
            self.monitor.seed_buffer(buffer)
        latest = self.latest()
        self._begin(capacity, latest.timestamp if latest is not None else 0.0, delivered)
        apply_decision(self.decision, self.session.lane_sockets(), share=len(self.session.lane_sockets()))

    def close(self) -> None:
        """Stop sampling and detach from the session (the sockets keep their last settings)."""
        self.monitor.stop()
        if self.share is not None:
            self.share.close()
        if self._slot:
            if self.session.control_hooks == (self._on_lane_open, self._on_lane_busy):  # type: ignore[attr-defined]
                self.session.set_control_hooks(None, None)  # type: ignore[attr-defined]
            return
        if self.session.on_lane_open == self._on_lane_open:
            self.session.on_lane_open = self._prior_hook
        if self._busy_hooked and getattr(self.session, "on_lane_busy", None) == self._on_lane_busy:
            self.session.on_lane_busy = self._prior_busy  # type: ignore[attr-defined]

    def __enter__(self) -> LinkControl:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------ hooks
    def _begin(self, capacity: float | None, now: float, delivered: float | None = None) -> None:
        """Start the policy (``initial_state``) with the lanes ``_start_lanes`` sizes, opened on the session;
        ``delivered`` above ``capacity`` is kept as the state's ``delivered`` (the samples' clock: forgotten
        after ``best_window`` like the in-band probe's)."""
        self.controller.state = initial_state(self.config, capacity, *self._start_lanes(capacity))
        self.controller.history.append((now, self.decision))
        got = self.session.set_active_lanes(self.decision.lanes)
        if got != self.decision.lanes:  # (a lane that would not open: keep the count in effect)
            self.controller.state = initial_state(self.config, capacity, got, "fewer lanes opened")
            self.controller.history.append((now, self.decision))
        if capacity is not None and delivered is not None and delivered > capacity:
            self.controller.state = replace(self.controller.state, delivered=delivered, delivered_at=self._clock())

    def _start_lanes(self, capacity: float | None) -> tuple[int, str]:
        """The lane count to start with (``controller.start_lanes``) and why: the path's RTT from the lanes'
        handshakes (their ``TCP_INFO`` min RTT), the send-buffer ceiling from ``tcp_wmem``, the rate from
        ``capacity`` or else the best link estimate another controller of the share published."""
        rtt = handshake_rtt(self.session.lane_sockets())
        if capacity is None and self.share is not None:
            known = [p.capacity for p in self.share.others(time.time()) if p.capacity]
            capacity = max(known) if known else None
        window = lane_window_for(send_buffer_ceiling(), self.config)
        n = start_lanes(rtt, self.config, capacity, window)
        if n == self.config.initial_lanes or rtt is None:
            return n, ""
        rate = capacity if capacity is not None else self.config.start_rate or 0.0
        return n, (f"{n} lanes for {rate * 8e-6:.4g} Mbit/s over {rtt * 1e3:.3g} ms at {window / 2**20:.3g} MiB "
                   f"a lane")

    def _set_lanes(self, n: int) -> int:
        return self.session.set_active_lanes(n)

    def _control(self, state: LinkState) -> None:
        if self._paused:
            return
        before = self.controller.decision
        self.controller.on_state(state)
        if self.share is not None:
            self._share(state, before)
        self.monitor.interval = sampling_interval(self.decision, state, self.config, self.interval,
                                                  self.probe_interval)

    def _share(self, state: LinkState, before: Decision) -> None:
        """Publish this controller's record; while other controllers of the share are active, the share sets
        the aggregate pacing: its water-filled fair share of the link in CRUISE (up or down: the others'
        queue would otherwise drain every one of them towards nothing), times ``upprobe_gain_max`` in an
        up-probe (the link may have grown), at most the share in PROBE and DRAIN; and the controller's best
        estimate is its share, so a share well below what it measured alone is no collapse to re-probe.
        Alone, nothing is changed. The link is the best capacity any of them measured within
        ``best_window``, or their summed goodput if larger."""
        assert self.share is not None
        d, now = self.decision, time.time()
        if state.capacity and (self._link_best is None or state.capacity >= self._link_best[0]
                               or now - self._link_best[1] > self.config.best_window):
            self._link_best = (state.capacity, now)
        wants = not state.app_limited and (state.pacing_limited or d.total_pacing is None) and state.busy > 0
        me = Peer(state.goodput, self._link_best[0] if self._link_best else None, wants, now)
        self.share.publish(me)
        others = self.share.others(now)
        fair = fair_share(me, others) if others else None
        cap: int | None = None
        if fair:
            st = self.controller.state
            if st.best is None or st.best > fair:
                self.controller.state = replace(st, best=fair, best_at=state.timestamp)
            if d.mode is Mode.UPPROBE:
                cap = int(fair * self.config.upprobe_gain_max)
            elif d.mode in (Mode.PROBE, Mode.DRAIN):
                cap = int(fair) if d.total_pacing is None or fair < d.total_pacing else None
            else:
                cap = int(fair)
        if cap is None and self.shared_cap is None:
            return
        socks = self.session.lane_sockets()
        fds = frozenset(s.fileno() for s in socks)
        if (cap is not None and self.shared_cap is not None and d == before and fds == self._shared_fds
                and abs(cap - self.shared_cap) <= 0.02 * self.shared_cap
                and self.controller.applied == self._shared_applied):
            return  # (no churn on the sockets for a share that barely moved, and the controller left them)
        self.shared_cap, self._shared_fds = cap, fds
        self.controller.apply(self._shown(), socks)  # (split as the controller splits: a request's tail included)
        self._shared_applied = self.controller.applied

    def _shown(self) -> Decision:
        """The decision as the lanes get it: the controller's, its aggregate capped by the share's."""
        d, cap = self.decision, self.shared_cap
        return d if cap is None else Decision(d.lanes, max(1, int(cap) // d.lanes), d.congestion, d.mode, d.reason)

    def _on_lane_open(self, index: int, sock: socket.socket) -> None:
        d = self.decision  # its share of the aggregate, counting it among the lanes that pace (at least d.lanes)
        if not self._paused:
            apply_decision(d, [sock], share=max(d.lanes, len(self.session.lane_sockets()) + 1))
        if self._prior_hook is not None:
            self._prior_hook(index, sock)

    def _on_lane_busy(self, index: int, sock: socket.socket) -> None:
        """A lane that waited for work picked some up (on its own thread, before its chunk goes out). (The
        share's cap goes on with it; its next sample re-applies it anyway: ``applied`` moved.)"""
        if not self._paused:
            try:
                fd = sock.fileno()
            except (OSError, ValueError):
                fd = -1
            if fd >= 0:
                self.controller.lane_busy(fd, self._clock(), self.session.lane_sockets(), self._shown, sock)
        if self._prior_busy is not None:
            self._prior_busy(index, sock)



def sampling_interval(d: Decision, state: LinkState, cfg: ControllerConfig, interval: float,
                      probe_interval: float | None) -> float:
    """The sampling period after ``state`` under decision ``d``: ``probe_interval`` while a probe runs
    unpaced on a WAN path (min RTT at least ``cfg.lan_rtt``) with no capacity known yet, else ``interval``.
    Lanes in STARTUP double their rate every round trip: on 400 Mbit/s, 20 ms, a one-BDP queue went from
    empty to overflowing in about 50 ms, and every interval until the controller sees the overflow
    (``policy._end_probe_on_overflow``) adds a fifth of its packets to the start's retransmits."""
    wan = state.min_rtt is not None and state.min_rtt >= cfg.lan_rtt
    if probe_interval is not None and d.mode is Mode.PROBE and d.pacing_rate is None and wan and state.capacity is None:
        return min(interval, probe_interval)
    return interval


def send_buffer_ceiling() -> int | None:
    """The most a socket's send buffer grows to under autotuning (``tcp_wmem``'s max), or None unreadable."""
    try:
        with open(_TCP_WMEM) as f:
            return int(f.read().split()[2])
    except (OSError, ValueError, IndexError):
        return None


#: ``KVWIRE_LINK_CONTROL=0`` (or ``off``/``false``/``no``): sessions get no controller unless given one
LINK_CONTROL_ENV = "KVWIRE_LINK_CONTROL"


def default_enabled() -> bool:
    """Whether ``Session(link_control=True)`` (the default) attaches a controller here."""
    return os.environ.get(LINK_CONTROL_ENV, "1").strip().lower() not in ("0", "off", "false", "no")


def session_config(spec: object, lanes: int, max_lanes: int) -> ControllerConfig | None:
    """The policy of the controller a session gets for its ``link_control`` argument, or None for none of
    its own: ``True`` (unless ``$KVWIRE_LINK_CONTROL`` is off) the default policy, starting at the session's
    ``lanes`` and growing up to its ``max_lanes``; a ``ControllerConfig``, that policy; ``False``/``None``,
    none. Raises ``TypeError`` for anything else (a ``LaneGroup`` is the session's to join, not this)."""
    if spec is False or spec is None or (spec is True and not default_enabled()):
        return None
    if spec is True:
        base = ControllerConfig()
        spec = ControllerConfig(min_lanes=min(base.min_lanes, lanes), initial_lanes=lanes,
                                max_lanes=max(lanes, max_lanes))
    if not isinstance(spec, ControllerConfig):
        raise TypeError(f"link_control must be True, False, a ControllerConfig or a LaneGroup, not {spec!r}")
    return spec


def for_session(session: Controllable, spec: object, lanes: int, max_lanes: int,
                host: str | None = None) -> LinkControl | None:
    """The controller a session gets for its ``link_control`` argument (``session_config``: the default
    policy, a ``ControllerConfig``'s, or none). Not started: the session starts it with its first transfer
    (an idle session costs no thread). ``host``: the session's destination, naming the ``LinkShare`` its
    controller joins (``share_name``: controllers of this host's processes sending to that host split the
    path evenly)."""
    config = session_config(spec, lanes, max_lanes)
    if config is None:
        return None
    share = None
    name = share_name(host) if host is not None else None
    if name is not None:
        try:
            share = LinkShare(name)
        except OSError:  # no /dev/shm here: each controller on its own
            share = None
    return LinkControl(session, config, start=False, share=share)
