"""The thin actuator of the congestion policy: ``LaneController`` feeds ``LinkState`` snapshots to
``policy.decide``, applies the decision's pacing cap and algorithm to the sockets it is handed
(``apply_decision``) and reports the wanted lane count through a callback.

Owns: the controller's current state and history, which sockets were last paced, the split of the
aggregate pacing over them, and restarting a paced BBR lane's algorithm as it wakes once its min RTT
filter nears the age at which the kernel would hold it in PROBE_RTT (``MIN_RTT_REFRESH``; not at a window
PROBE_RTT or a timeout shrank: ``RESTART_MIN_CWND``), or as soon as two samples find the kernel pacing it
far under its cap while it holds bytes unsent (``COLLAPSED_SHARE``). Must not know:
the policy's rules (``policy``, ``rules``), how samples are taken, sessions or lanes beyond the sockets
and the callback.

The policy's names (``ControllerConfig``, ``Decision``, ``Mode``, ``decide``, ``start_lanes``...) are
also importable from here, where callers have always found them.
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable, Sequence
from dataclasses import replace

from ..sockopts import SocketOptionError, restart_congestion, set_knobs
from .decision import ControllerConfig, ControllerState, Decision, Mode
from .estimator import LaneKey, LaneState, LinkState
from .policy import decide, initial_state
from .rules import (
    PIPE_GROWTH,
    PIPE_ROUNDS,
    lane_window_for,
    lanes_for,
    mathis_rate,
    pipe_step,
    start_lanes,
    window_lanes,
)
from .split import idle_lanes, lane_rates
from .tcpinfo import try_read

__all__ = [
    "PIPE_GROWTH", "PIPE_ROUNDS", "ControllerConfig", "ControllerState", "Decision", "LaneController", "Mode",
    "apply_decision", "decide", "initial_state", "lane_window_for", "lanes_for", "mathis_rate", "pipe_step",
    "start_lanes", "window_lanes",
]

log = logging.getLogger("kvwire.congestion")
_MSS = 1448  # (a window in bytes counted in packets: TCP_INFO's MSS on a 1500-byte path)

#: a paced BBR lane that picks up work this long after its algorithm last started is restarted first
#: (``restart_congestion``; the window and the pacing cap stay), which starts its min RTT filter over: the
#: kernel's BBR holds a lane at 4 packets for 200 ms (PROBE_RTT) once that filter is 10 s old, and on a
#: steady path nothing renews it sooner (only a sample strictly below the min does). A streamed layer's
#: chunks that sat on a lane then arrived 300 ms late; restarted as it wakes, a lane enters PROBE_RTT only
#: when it has been busy for 10 s on end (a bulk transfer, which loses 2 % to it and no latency)
MIN_RTT_REFRESH = 8.0
#: ... but not while its window is under this (packets: TCP's initial window; PROBE_RTT holds 4, a timeout 1):
#: restarted then, BBR's STARTUP grows it from there, a round trip per doubling, where PROBE_RTT gives the
#: window it saved back within 200 ms. A streamed layer's chunk sat 500 ms on a lane restarted that way (its
#: window 92 packets, STARTUP, 340 ms after the restart, on an 80 ms path whose lanes hold ~1800)
RESTART_MIN_CWND = 10
#: a paced BBR lane that holds bytes unsent while its kernel paces it under this share of its cap, two samples
#: running, is restarted (``restart_congestion``): BBR's own bandwidth estimate fell far under the rate the
#: controller gives the lane, and in PROBE_BW it grows back by a quarter every eight round trips. Lanes read at
#: 5.7, 12 and 19 of their 118-136 Mbit/s caps (an 80 ms path, no loss event of theirs in view), and the
#: streamed layer's chunks on them arrived 0.4-1.7 s late; restarted, STARTUP is back at the cap within a
#: round trip or two
COLLAPSED_SHARE = 0.25
#: ... at most this often a lane (seconds)
REVIVE_INTERVAL = 1.0


class LaneController:
    """Thin actuator around ``decide``: ``monitor.subscribe(controller.on_state)``.

    ``sockets_provider`` gives the lane sockets to pace; ``set_lanes`` (optional) is told the wanted
    lane count when it changes — the session hook that parks or opens lanes — and may return the count
    it could put in effect (a lane that failed to open): the decision then takes that count, keeping
    the aggregate pacing. The aggregate is split evenly over the sockets the provider gives (a dead
    lane's share goes to the others; a ``LaneGroup`` gives only its busy members' lanes), except at a
    request's tail, where lanes that finished give their share to the lanes still sending
    (``split.lane_rates``). Sockets are touched only when the decision, that set of sockets or which of
    them are idle changes (new lanes get theirs from the session's lane-open hook). ``lane_events``: each
    lane says when it picks up work (``lane_busy``, before its first byte): the split is redone then, not at
    the next sample, and idle lanes keep an even share (``split.lane_rates``' ``woken``), so a request's
    first round trip is not paced at the idle lanes' reserve. Thread-safe: samples arrive on the monitor's
    thread, those events on the lanes'.
    """

    def __init__(self, config: ControllerConfig | None = None,
                 sockets_provider: Callable[[], Sequence[socket.socket]] | None = None,
                 set_lanes: Callable[[int], int | None] | None = None, capacity: float | None = None,
                 lane_events: bool = False) -> None:
        self.config = config or ControllerConfig()
        self.lane_events = lane_events
        self.state = initial_state(self.config, capacity)
        self.sockets_provider = sockets_provider
        self.set_lanes = set_lanes
        self.history: list[tuple[float, Decision]] = [(0.0, self.state.decision)]
        self._paced: frozenset[int] = frozenset()  # the sockets (fds) the decision was last applied to
        self._idle: frozenset[LaneKey] = frozenset()  # ... and those of them that were idle (``split``)
        self._woke: dict[LaneKey, float] = {}  # lanes that picked up work (``lane_busy``), and when
        self._sampled_at: float | None = None  # the last sample's time: the next one covers the time since
        self._lock = threading.RLock()  # the split (``_idle``, ``_woke``) and putting it on the sockets
        self._started: dict[LaneKey, float] = {}  # when each lane's algorithm was last restarted (lane_busy)
        self._slow: set[LaneKey] = set()  # lanes that read ``collapsed`` at the last sample (``_revive``)
        self._revived: dict[LaneKey, float] = {}  # ... and when each was last restarted for it
        self.applied = 0  # how many times a decision was put on the sockets (``apply``)

    @property
    def decision(self) -> Decision:
        return self.state.decision

    def observe(self, link: LinkState) -> Decision:
        """Advance the policy by one state; returns the (possibly unchanged) decision."""
        before = self.state.decision
        self.state = decide(self.state, link, self.config)
        if self.state.decision != before:
            self.history.append((link.timestamp, self.state.decision))
            log.info("lane controller: %s", self.state.decision)
        return self.state.decision

    def _lanes_in_effect(self, got: int, now: float) -> Decision:
        """The session runs ``got`` lanes, not the decision's: take that count, same aggregate pacing."""
        d = self.state.decision
        log.warning("lane controller: wanted %d lanes, %d in effect", d.lanes, got)
        total = d.total_pacing
        pacing = None if total is None else max(1, total // got)
        nd = replace(d, lanes=got, pacing_rate=pacing, reason=f"{d.reason} (only {got} lanes opened)")
        self.state = replace(self.state, decision=nd)
        self.history.append((now, nd))
        return nd

    def on_state(self, link: LinkState) -> None:
        """Subscriber entry point: decide, then act on the lane hook and the sockets."""
        before = self.state.decision
        d = self.observe(link)
        if d != before and self.set_lanes is not None and d.lanes != before.lanes:
            got = self.set_lanes(d.lanes)
            if got is not None and got != d.lanes:
                d = self._lanes_in_effect(got, link.timestamp)
        if self.sockets_provider is None:
            return
        sockets = self.sockets_provider()
        fds = frozenset(s.fileno() for s in sockets)
        with self._lock:
            # a lane that picked up work within the interval this sample covers, or after it, was not idle
            # all of it, whatever the sample read (its first chunk may not have been written yet)
            since = self._sampled_at
            woke = {k for k, t in self._woke.items() if since is None or t >= since}
            self._woke = {k: t for k, t in self._woke.items() if t >= link.timestamp}
            self._sampled_at = link.timestamp
            self._revive(link, d, sockets)
            idle = (idle_lanes(link) & fds) - woke if d.pacing_rate is not None else frozenset()
            if d == before and fds == self._paced and idle == self._idle:
                return
            self._paced, self._idle = fds, idle
            self.apply(d, sockets, restart=d.restart and d != before)

    def _revive(self, link: LinkState, d: Decision, sockets: Sequence[socket.socket]) -> None:
        """Restart the algorithm of each paced BBR lane that ``collapsed`` at this sample and the one before
        (at most every ``REVIVE_INTERVAL``); the restart also counts for ``MIN_RTT_REFRESH``. Under the lock."""
        if d.congestion != "bbr" or d.pacing_rate is None:
            self._slow.clear()
            return
        by_fd: dict[LaneKey, socket.socket] = {s.fileno(): s for s in sockets}
        slow = {ln.lane for ln in link.lanes if collapsed(ln)}
        for lane in slow & self._slow:
            sock = by_fd.get(lane)
            if sock is None or link.timestamp - self._revived.get(lane, float("-inf")) < REVIVE_INTERVAL:
                continue
            self._revived[lane] = self._started[lane] = link.timestamp
            try:
                restart_congestion(sock)
                log.info("lane controller: restarted a lane's BBR paced under %.0f%% of its cap",
                         COLLAPSED_SHARE * 100)
            except SocketOptionError:
                pass  # (a lane closing meanwhile)
        self._slow = slow

    def lane_busy(self, lane: LaneKey, now: float, sockets: Sequence[socket.socket],
                  shown: Callable[[], Decision] | None = None, sock: socket.socket | None = None) -> bool:
        """Lane ``lane`` (a socket's fd, ``sock``) picked up work at ``now`` (the samples' clock). A paced BBR
        lane whose algorithm started ``MIN_RTT_REFRESH`` ago or more (or never, that this controller saw) is
        restarted. When the split had it idle, it is not any more: the decision (``shown()``, default the
        controller's: whoever caps the aggregate from outside passes its capped one) goes on ``sockets``
        again at once, so the lane paces at its full share from its first chunk, and True. False: nothing
        changed (the common case, and cheap: every lane that waited for work calls this as it picks some
        up)."""
        with self._lock:
            self._woke[lane] = now
            d = self.state.decision
            if sock is not None and d.congestion == "bbr" and d.pacing_rate is not None:
                started = self._started.get(lane)
                if (started is None or now - started >= MIN_RTT_REFRESH) and _window(sock) >= RESTART_MIN_CWND:
                    self._started[lane] = now
                    try:  # (only under a pacing cap: unpaced, STARTUP would double the lane's rate)
                        restart_congestion(sock)
                    except SocketOptionError:
                        pass  # (a lane closing meanwhile)
            if lane not in self._idle:
                return False
            self._idle = self._idle - {lane}
            self.apply(shown() if shown is not None else self.state.decision, sockets)
            return True

    def apply(self, d: Decision, sockets: Sequence[socket.socket], restart: bool = False) -> None:
        """Put ``d`` on ``sockets``: its aggregate pacing split evenly over them or, at a request's tail (some
        lanes idle at the last sample), moved from the lanes that finished to those still sending
        (``split.lane_rates``). Counted in ``applied`` (whoever caps the aggregate from outside, as
        ``LinkControl``'s share does, re-applies its cap after this)."""
        with self._lock:
            self.applied += 1
            total = d.total_pacing
            if total is None or not self._idle:
                apply_decision(d, sockets, share=len(sockets), restart=restart)
                return
            rates = lane_rates(total, [s.fileno() for s in sockets], self._idle, woken=self.lane_events)
            for s in sockets:
                apply_decision(replace(d, pacing_rate=rates[s.fileno()]), [s], restart=restart)


def collapsed(ln: LaneState) -> bool:
    """``ln`` holds bytes unsent while its kernel paces it under ``COLLAPSED_SHARE`` of its cap, with a
    window of ``RESTART_MIN_CWND`` packets or more (not PROBE_RTT's, whose pacing rate stays)."""
    return bool(ln.notsent_bytes and ln.pacing_rate and ln.max_pacing_rate and ln.cwnd_bytes
                and ln.pacing_rate < COLLAPSED_SHARE * ln.max_pacing_rate
                and ln.cwnd_bytes >= RESTART_MIN_CWND * _MSS)


def _window(sock: socket.socket) -> int:
    """``sock``'s congestion window in packets (``RESTART_MIN_CWND`` where unreadable: the restart goes ahead)."""
    info = try_read(sock)
    return info.snd_cwnd if info is not None and info.snd_cwnd is not None else RESTART_MIN_CWND


def apply_decision(d: Decision, sockets: Sequence[socket.socket], share: int | None = None,
                   restart: bool = False) -> list[tuple[socket.socket, SocketOptionError]]:
    """Set ``d``'s pacing cap and algorithm on every socket; returns the sockets that refused (a dead
    lane is normal, so this does not raise). The algorithm is only set where it differs. Each socket
    gets ``d.pacing_rate``, or with ``share`` the aggregate ``d.total_pacing`` split ``share`` ways.
    ``restart``: re-initialise each socket's algorithm too (``restart_congestion``)."""
    rate = d.pacing_rate
    if share is not None and d.total_pacing is not None:
        rate = max(1, d.total_pacing // max(1, share))
    failed: list[tuple[socket.socket, SocketOptionError]] = []
    for s in sockets:
        try:
            set_knobs(s, congestion=d.congestion, pacing=rate, restart=restart)
        except SocketOptionError as e:
            failed.append((s, e))
    return failed
