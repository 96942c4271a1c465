"""``--adaptive`` / ``--polite`` / ``--probe`` on the sending side of a test.

Owns: the ``ControllerConfig`` the options ask for, attaching ``kvwire.congestion``'s ``LinkControl`` to the
test's session (started with the test, closed after it) and what the bench reports of it — the ``link``
view added to each interval record (the controller's latest ``LinkState`` without its per-lane list, plus
mode, lanes in effect and pacing) and the ``link_control`` summary with the decision history; running
``kvwire.probe`` on the session before the test and taking the bytes it put on the lanes back out of the
test's counts. Must not know: output formats, the control channel, payloads or how lanes are sampled for
the interval records (``sampler``).
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, fields
from typing import Any

from ..congestion.control import LinkControl
from ..congestion.controller import ControllerConfig, Decision
from ..congestion.estimator import LinkState
from ..congestion.tcpinfo import LaneCounters, try_read
from ..errors import KvwireError, ProbeRefused
from ..probe import ProbeResult, probe, warm_seconds
from ..tcp import Session
from .errors import PeerError
from .options import Options

#: seconds between the controller's TCP_INFO samples (LinkControl's default)
MONITOR_INTERVAL = 0.1
#: the controller's states kept to answer "the latest one at an interval's end" (64 × 0.1 s: longer than any
#: gap between an interval's end being read and its record being made)
_RECENT_STATES = 64
_STATE_KEYS = tuple(f.name for f in fields(LinkState) if f.name != "lanes")


def controller_config(o: Options) -> ControllerConfig:
    """``-P`` is the starting lane count (the controller may go from 2, or fewer when -P is, up to 16, or
    more when -P is); ``-C`` is the algorithm it puts on every lane (also in polite mode)."""
    base = ControllerConfig()
    n = o.lanes
    return ControllerConfig(min_lanes=min(base.min_lanes, n), initial_lanes=n, max_lanes=max(base.max_lanes, n),
                            congestion=o.congestion or base.congestion,
                            polite_congestion=o.congestion or base.polite_congestion, polite=o.polite)


def _decision(d: Decision, t: float | None) -> dict[str, Any]:
    return {"t": t, "mode": d.mode.value, "lanes": d.lanes, "pacing": d.total_pacing, "congestion": d.congestion,
            "reason": d.reason}


class Adaptive:
    """``LinkControl`` on ``session`` for one test: created before the test (it sets the lanes' algorithm and
    count at once), ``start(t_start)`` when the test starts (sampling then), ``close()`` after it."""

    def __init__(self, session: Session, o: Options, capacity: float | None = None,
                 delivered: float | None = None) -> None:
        self.session = session
        self.config = controller_config(o)
        self.capacity_seed = capacity
        self.control = LinkControl(session, self.config, interval=MONITOR_INTERVAL, capacity=capacity,
                                   delivered=delivered, start=False)
        self.t_start: float | None = None
        self._reported = 0  # decision changes already counted in an interval record
        self._recent: deque[LinkState] = deque(maxlen=_RECENT_STATES)
        self._recent_lock = threading.Lock()
        self.control.subscribe(self._keep)

    def _keep(self, state: LinkState) -> None:
        with self._recent_lock:
            self._recent.append(state)

    def _state_at(self, end: float | None) -> LinkState | None:
        """The latest state, or with ``end`` the latest taken at or before it (seconds since the start)."""
        if end is None:
            return self.control.latest()
        with self._recent_lock:
            for state in reversed(self._recent):
                if self._rel(state.timestamp) <= end:
                    return state
        return None

    def start(self, t_start: float) -> None:
        self.t_start = t_start
        self.control.monitor.start()

    def close(self) -> None:
        self.control.close()

    def _rel(self, t: float) -> float:
        return t - (self.t_start or 0.0)

    def link(self, end: float | None = None) -> dict[str, Any]:
        """The controller's latest view (its fields ``None`` before the first sample; with ``end``, the latest
        taken at or before it), the decision in force and the lanes in effect. ``timestamp`` is seconds since
        the start of the test."""
        state = self._state_at(end)
        d = self.control.decision
        if state is None:
            view: dict[str, Any] = dict.fromkeys(_STATE_KEYS)
        else:
            raw = state.to_dict()
            view = {k: raw[k] for k in _STATE_KEYS}
            view["timestamp"] = self._rel(state.timestamp)
        view.update(mode=d.mode.value, lanes=self.session.active_lanes, pacing=d.total_pacing,
                    congestion=d.congestion, reason=d.reason)
        return view

    def interval_extra(self, end: float) -> dict[str, Any]:
        """What the interval record ending at ``end`` (seconds since the start) gets: ``link`` =
        ``link(end)`` plus ``decisions`` (changes since the previous record). A state the monitor took after
        the end was read (the sampler reads it first) belongs to the next interval, not to this one."""
        changes = len(self.control.history) - 1
        new, self._reported = changes - self._reported, changes
        return {"link": self.link(end) | {"decisions": new}}

    def config_info(self) -> dict[str, Any]:
        c = self.config
        return {"polite": c.polite, "congestion": c.algorithm, "min_lanes": c.min_lanes,
                "initial_lanes": c.initial_lanes, "max_lanes": c.max_lanes, "interval": MONITOR_INTERVAL,
                "capacity_seed": self.capacity_seed}

    def summary(self) -> dict[str, Any]:
        """The whole test: the configuration, every decision (``t`` None for the initial one) and the last
        link view."""
        history = self.control.history
        d = self.control.decision
        return self.config_info() | {
            "decisions": len(history) - 1, "mode": d.mode.value, "lanes": self.session.active_lanes,
            "pacing": d.total_pacing, "reason": d.reason,
            "history": [_decision(dec, None if i == 0 else self._rel(t)) for i, (t, dec) in enumerate(history)],
            "last": self.link()}


# ---------------------------------------------------------------- --probe


@dataclass(frozen=True)
class LaneCounts:
    """What the probe put on one lane: chunk payload and chunks (the session's counters), TCP payload sent and
    acknowledged (``TCP_INFO``, over the lane's sockets: one re-dialled meanwhile counts from zero)."""

    bytes: int
    chunks: int
    wire_sent: int
    wire_acked: int


def _lane_counts(session: Session, wire: LaneCounters) -> dict[int, tuple[int, int, int, int]]:
    """Per lane now: ``LaneCounts``' four counters, cumulative."""
    out = {}
    for lane in session.lane_info():
        wire.read(lane.index, lane.sock)
        out[lane.index] = (lane.bytes_sent, lane.chunks_sent, wire.total(lane.index, "bytes_sent"),
                           wire.total(lane.index, "bytes_acked"))
    return out


@dataclass
class Probed:
    """A probe's result and what it put on each lane (to be left out of the test's counts)."""

    result: ProbeResult
    lanes: dict[int, LaneCounts]
    control_bytes: int = 0  # what the session's control connection sent meanwhile (the sinks' BEGINs)

    def to_dict(self) -> dict[str, Any]:
        """``ProbeResult.to_dict()`` without the per-sample states (``samples`` counts them)."""
        d = {k: v for k, v in self.result.to_dict().items() if k != "states"}
        d["samples"] = len(self.result.states)
        return d

    def exclude(self, lanes: list[dict[str, Any]], receiver_lanes: list[Any]) -> None:
        """Take the probe's bytes out of the sender's lane totals (``bytes``, ``chunks``, ``wire_bytes``)
        and the receiver's (``bytes``: what the lane's socket received; the probe's were all acknowledged
        before the test started, so they are its ``bytes_acked`` increase)."""
        for lane in lanes:
            p = self.lanes.get(lane["socket"])
            if p is not None:
                lane["bytes"] = max(0, lane["bytes"] - p.bytes)
                lane["chunks"] = max(0, lane["chunks"] - p.chunks)
                lane["wire_bytes"] = max(0, lane["wire_bytes"] - p.wire_sent)
        for rx in receiver_lanes:
            if isinstance(rx, dict) and isinstance(rx.get("bytes"), int):
                p = self.lanes.get(rx.get("socket", -1))
                if p is not None:
                    rx["bytes"] = max(0, rx["bytes"] - p.wire_acked)


def run_probe(session: Session, o: Options) -> Probed:
    """``kvwire.probe`` on the test's session (``-C``'s algorithm, else BBR), before any ``LinkControl`` is
    attached: for ``--probe`` seconds; or ``--warm``, as ``kvwire.connect``'s warm-up does (up to
    ``warm_seconds``, ended once the pipe reads full, on every lane the controller may use: none it opens
    later starts cold). A receiver that takes no probes, or a probe that fails, is a PeerError."""
    assert o.probe_seconds is not None or o.warm
    wire = LaneCounters(("bytes_sent", "bytes_acked"))
    before = _lane_counts(session, wire)
    ctrl_before = control_bytes_sent(session)
    lanes = max(o.lanes, controller_config(o).max_lanes) if o.warm and o.adaptive else None
    try:
        result = probe(session, seconds=o.probe_seconds or warm_seconds(session), congestion=o.congestion or "bbr",
                       until_full=bool(o.warm), lanes=lanes)
    except ProbeRefused as e:
        raise PeerError(f"{'--warm' if o.warm else '--probe'}: {e}") from None
    except KvwireError as e:
        raise PeerError(f"{'--warm' if o.warm else '--probe'} failed: {type(e).__name__}: {e}") from None
    after = _lane_counts(session, wire)
    # (a lane the probe opened counts from zero)
    used = {i: LaneCounts(*(x - y for x, y in zip(a, before.get(i, (0, 0, 0, 0))))) for i, a in after.items()}
    return Probed(result, used, max(0, control_bytes_sent(session) - ctrl_before))


def control_bytes_sent(session: Session) -> int:
    """TCP payload the session's control connection has sent (``TCP_INFO``)."""
    info = try_read(session.control_socket())
    return (info.bytes_sent or 0) if info is not None else 0


__all__ = ["Adaptive", "LaneCounts", "Probed", "control_bytes_sent", "controller_config", "run_probe"]
