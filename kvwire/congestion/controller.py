"""Lane-count, pacing and congestion-algorithm policy, fed ``LinkState`` snapshots.

Owns: ``decide`` — a pure step function ``(ControllerState, LinkState, ControllerConfig) -> ControllerState``
whose state carries the history the policy needs (baselines, settle timer, pending probe) — and the
thin actuator ``LaneController`` that applies the decision's pacing cap and algorithm to the sockets
it is handed and reports the wanted lane count through a callback.
Must not know: how samples are taken, sessions or lanes beyond the sockets and the callback.

Policy, after §3.3 of the TCP bulk-transfer note (BBR's STARTUP / PROBE_BW, at lane granularity):

- Nothing is judged until ``settle`` seconds after the last change, nor while the lanes are
  app-limited (``busy`` below ``min_busy``: no data to send says nothing about the link).
- PRESSURE (queueing ratio above ``backoff_ratio``, or loss rising while goodput is flat) -> BACKOFF:
  one lane fewer, and every lane paced at ``pace_gain * btl_bw / lanes`` to drain the standing queue.
- STARTUP: double the lanes while goodput grows by ``grow_gain`` per step; after ``flat_steps`` steps
  without growth, undo the last useless doubling and CRUISE. Receiver-window-limited links never grow.
- CRUISE: every ``probe_interval`` seconds probe — raise the pacing cap by 25% (or lift it), or add
  ``max(1, lanes // 4)`` lanes when unpaced — and keep the probe only if goodput rose by ``keep_gain``;
  a probe that raised pressure is simply undone.
- POLITE (``polite_share`` set): pace the aggregate to that share of the capacity (configured or
  probed, else BtlBw), with ``polite_congestion`` on every lane; lanes are left as they are.
"""

from __future__ import annotations

import logging
import math
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from enum import Enum

from .estimator import LinkState
from .tcpinfo import SocketOptionError, get_congestion, set_congestion, set_pacing_rate

log = logging.getLogger("kvwire.congestion")


class Mode(str, Enum):
    STARTUP = "startup"
    CRUISE = "cruise"
    BACKOFF = "backoff"
    POLITE = "polite"


@dataclass(frozen=True)
class ControllerConfig:
    min_lanes: int = 1
    max_lanes: int = 16
    initial_lanes: int = 4
    settle: float = 1.0  # seconds after a change before it is judged (>= the estimator's stats window)
    min_busy: float = 0.5
    grow_gain: float = 1.25
    keep_gain: float = 1.10
    flat_steps: int = 3  # settled samples without growth that end STARTUP
    probe_interval: float = 4.0  # seconds between CRUISE probes
    backoff_ratio: float = 1.25
    loss_rise: float = 2.0  # loss is "rising" above loss_rise x its baseline ...
    loss_floor: float = 1e-3  # ... and above this floor
    rwnd_limited: float = 0.3  # receiver-bound above this share of busy time: adding lanes won't help
    pace_gain: float = 0.9
    probe_pacing_gain: float = 1.25
    polite_share: float | None = None
    congestion: str | None = None  # algorithm for every lane; None leaves the sockets' own
    polite_congestion: str | None = "cubic"
    lossy_congestion: str | None = None  # e.g. "bbr": used when loss is high but queues are not

    def __post_init__(self) -> None:
        if not 1 <= self.min_lanes <= self.initial_lanes <= self.max_lanes:
            raise ValueError("need 1 <= min_lanes <= initial_lanes <= max_lanes")
        if self.polite_share is not None and not 0 < self.polite_share <= 1:
            raise ValueError("polite_share must be in (0, 1]")
        if not 0 < self.pace_gain <= 1 or self.probe_pacing_gain <= 1:
            raise ValueError("need 0 < pace_gain <= 1 < probe_pacing_gain")


@dataclass(frozen=True)
class Decision:
    """What the lanes should do: how many, each one's pacing cap (bytes/s, None = none), which CC."""

    lanes: int
    pacing_rate: int | None
    congestion: str | None
    mode: Mode
    reason: str


@dataclass(frozen=True)
class ControllerState:
    decision: Decision
    changed_at: float | None = None  # timestamp of the last change; None before the first state
    baseline_goodput: float = 0.0  # goodput when the last change was made
    baseline_loss: float = 0.0
    flat: int = 0  # settled STARTUP samples without growth
    before_probe: Decision | None = None  # to revert a probe (or a doubling) that did not pay

    @property
    def mode(self) -> Mode:
        return self.decision.mode


def initial_state(cfg: ControllerConfig) -> ControllerState:
    mode = Mode.POLITE if cfg.polite_share is not None else Mode.STARTUP
    cc = cfg.polite_congestion if mode is Mode.POLITE else cfg.congestion
    return ControllerState(Decision(cfg.initial_lanes, None, cc, mode, "initial"))


def decide(st: ControllerState, link: LinkState, cfg: ControllerConfig) -> ControllerState:
    """One policy step. Pure: the same inputs give the same output; nothing is touched."""
    now = link.timestamp
    if st.changed_at is None:
        return replace(st, changed_at=now, baseline_goodput=link.goodput, baseline_loss=link.loss_rate)
    if now - st.changed_at < cfg.settle or link.busy < cfg.min_busy:
        return st
    if cfg.polite_share is not None:
        return _polite(st, link, cfg)
    d = st.decision
    q = link.queueing_ratio
    grew = link.goodput >= st.baseline_goodput * cfg.keep_gain
    loss_rising = link.loss_rate > max(cfg.loss_floor, cfg.loss_rise * st.baseline_loss) and not grew
    if (q is not None and q > cfg.backoff_ratio) or loss_rising:
        lanes = max(cfg.min_lanes, d.lanes - 1)
        bw = link.btl_bw or link.goodput
        pace = int(cfg.pace_gain * bw / lanes) if bw > 0 else d.pacing_rate
        why = f"queueing ratio {q:.2f}" if q is not None and q > cfg.backoff_ratio else (
            f"loss rising to {link.loss_rate:.2%}")
        if st.before_probe is not None:  # the last step up caused it: undo just that
            b = st.before_probe
            return _change(st, link, Decision(b.lanes, b.pacing_rate, b.congestion, Mode.BACKOFF,
                                              f"{why}: probe undone"))
        return _change(st, link, Decision(lanes, pace, _cc(link, cfg, d.congestion), Mode.BACKOFF, why))
    cc = _cc(link, cfg, d.congestion)
    if d.mode is Mode.STARTUP:
        return _startup(st, link, cfg, cc)
    return _cruise(st, link, cfg, cc)


def _change(st: ControllerState, link: LinkState, d: Decision,
            before_probe: Decision | None = None) -> ControllerState:
    """A new decision: restart the settle timer and the baselines it will be judged against."""
    return ControllerState(d, link.timestamp, link.goodput, link.loss_rate, 0, before_probe)


def _cc(link: LinkState, cfg: ControllerConfig, current: str | None) -> str | None:
    """Non-congestive loss (loss without a standing queue) favours a rate-based CC such as BBR."""
    q = link.queueing_ratio
    if cfg.lossy_congestion and link.loss_rate >= cfg.loss_floor and (q is None or q <= cfg.backoff_ratio):
        return cfg.lossy_congestion
    return current if current is not None else cfg.congestion


def _startup(st: ControllerState, link: LinkState, cfg: ControllerConfig, cc: str | None) -> ControllerState:
    d = st.decision
    grew = link.goodput >= st.baseline_goodput * cfg.grow_gain
    can_grow = d.lanes < cfg.max_lanes and link.rwnd_limited <= cfg.rwnd_limited
    if grew and can_grow:
        lanes = min(cfg.max_lanes, d.lanes * 2)
        nd = Decision(lanes, d.pacing_rate, cc, Mode.STARTUP, f"goodput grew to {link.goodput:.3g} B/s")
        return _change(st, link, nd, before_probe=d)
    flat = 0 if grew else st.flat + 1
    if can_grow and flat < cfg.flat_steps:
        return replace(st, flat=flat, decision=replace(d, congestion=cc))
    # growth stopped (or cannot continue): undo a doubling that did not pay, then cruise
    keep = st.before_probe if st.before_probe is not None and not grew else d
    nd = Decision(keep.lanes, keep.pacing_rate, cc, Mode.CRUISE, "startup done")
    return _change(st, link, nd)


def _cruise(st: ControllerState, link: LinkState, cfg: ControllerConfig, cc: str | None) -> ControllerState:
    d = st.decision
    if st.before_probe is not None:  # judge the pending probe
        if link.goodput >= st.baseline_goodput * cfg.keep_gain:
            nd = replace(d, congestion=cc, mode=Mode.CRUISE, reason="probe kept")
        else:
            nd = replace(st.before_probe, congestion=cc, mode=Mode.CRUISE, reason="probe reverted")
        return _change(st, link, nd)
    assert st.changed_at is not None
    if link.timestamp - st.changed_at < cfg.probe_interval:
        return replace(st, decision=replace(d, congestion=cc, mode=Mode.CRUISE))
    if d.pacing_rate is not None:
        pace = int(d.pacing_rate * cfg.probe_pacing_gain)
        limit = link.capacity or 0.0
        nd = Decision(d.lanes, None if limit and pace * d.lanes >= limit else pace, cc, Mode.CRUISE,
                      "probe: pacing up")
    elif d.lanes < cfg.max_lanes and link.rwnd_limited <= cfg.rwnd_limited:
        nd = Decision(min(cfg.max_lanes, d.lanes + max(1, d.lanes // 4)), None, cc, Mode.CRUISE,
                      "probe: more lanes")
    else:
        return replace(st, decision=replace(d, congestion=cc, mode=Mode.CRUISE))
    return _change(st, link, nd, before_probe=replace(d, mode=Mode.CRUISE))


def _polite(st: ControllerState, link: LinkState, cfg: ControllerConfig) -> ControllerState:
    assert cfg.polite_share is not None
    d = st.decision
    cap = link.capacity or link.btl_bw
    pace = int(cfg.polite_share * cap / d.lanes) if cap > 0 else d.pacing_rate
    if pace == d.pacing_rate and d.congestion == cfg.polite_congestion:
        return st
    nd = Decision(d.lanes, pace, cfg.polite_congestion, Mode.POLITE,
                  f"fair share {cfg.polite_share:.0%} of {cap:.3g} B/s")
    return _change(st, link, nd)


class LaneController:
    """Thin actuator around ``decide``: ``monitor.subscribe(controller.on_state)``.

    ``sockets_provider`` gives the lane sockets to pace; ``set_lanes`` (optional) is told the wanted
    lane count when it changes — the session hook that parks or opens lanes.
    """

    def __init__(self, config: ControllerConfig | None = None,
                 sockets_provider: Callable[[], Sequence[socket.socket]] | None = None,
                 set_lanes: Callable[[int], None] | None = None) -> None:
        self.config = config or ControllerConfig()
        self.state = initial_state(self.config)
        self.sockets_provider = sockets_provider
        self.set_lanes = set_lanes
        self.history: list[Decision] = [self.state.decision]

    @property
    def decision(self) -> Decision:
        return self.state.decision

    def observe(self, link: LinkState) -> Decision:
        """Advance the policy by one state; returns the (possibly unchanged) decision."""
        before = self.state.decision
        self.state = decide(self.state, link, self.config)
        if self.state.decision != before:
            self.history.append(self.state.decision)
            log.info("lane controller: %s", self.state.decision)
        return self.state.decision

    def on_state(self, link: LinkState) -> None:
        """Subscriber entry point: decide, then act on the sockets and the lane hook."""
        before = self.state.decision
        d = self.observe(link)
        if self.sockets_provider is not None:
            apply_decision(d, self.sockets_provider())
        if self.set_lanes is not None and d.lanes != before.lanes:
            self.set_lanes(d.lanes)


def apply_decision(d: Decision,
                   sockets: Sequence[socket.socket]) -> list[tuple[socket.socket, SocketOptionError]]:
    """Set ``d``'s pacing cap and algorithm on every socket; returns the sockets that refused (a dead
    lane is normal, so this does not raise). The algorithm is only set where it differs."""
    failed: list[tuple[socket.socket, SocketOptionError]] = []
    for s in sockets:
        try:
            set_pacing_rate(s, d.pacing_rate)
            if d.congestion is not None and get_congestion(s) != d.congestion:
                set_congestion(s, d.congestion)
        except SocketOptionError as e:
            failed.append((s, e))
    return failed


def lanes_for(bdp_bytes: float, window_cap_bytes: float, cfg: ControllerConfig) -> int:
    """Starting lane count from the note: ``max(4, ceil(BDP / per-socket window cap))``, clamped."""
    want = max(4, math.ceil(bdp_bytes / window_cap_bytes)) if window_cap_bytes > 0 else cfg.max_lanes
    return max(cfg.min_lanes, min(cfg.max_lanes, want))
