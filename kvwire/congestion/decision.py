"""The congestion controller's vocabulary: its configuration (``ControllerConfig``), the modes of its
policy (``Mode``), what it decides (``Decision``: lanes, pacing, algorithm) and what the policy remembers
between steps (``ControllerState``). Values only.

Owns: those four types and the checks of a config's consistency. Must not know: the policy that moves
between the modes (``policy``), the rules it sizes lanes by (``rules``), sockets, samples or sessions.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class Mode(str, Enum):
    PROBE = "probe"
    CRUISE = "cruise"
    DRAIN = "drain"
    UPPROBE = "upprobe"
    POLITE = "polite"


@dataclass(frozen=True)
class ControllerConfig:
    """Times in seconds, rates in bytes/s, ratios are srtt/min_rtt."""

    min_lanes: int = 2
    max_lanes: int = 16
    initial_lanes: int = 4
    congestion: str | None = "bbr"  # algorithm for every lane; None leaves the sockets' own
    # the kernel paces payload bytes and the capacity is measured in payload bytes (tcpi_delivered x MSS),
    # so headers cancel out: 0.99 leaves 1 % for measurement error, less than a queue needs to stand
    pace_gain: float = 0.99
    drain_gain: float = 0.5  # the deepest drain (a queue of a whole rate drop) ...
    drain_gain_max: float = 0.9  # ... and the shallowest (the small queue an up-probe leaves)
    drain_time: float = 0.2  # aim to empty the measured queue in this long
    drain_ratio: float = 1.3
    # a queue must read above drain_ratio this long (two samples) before a drain: one late packet of a
    # starved emulator, or a delayed ACK, reads as a queue for one sample
    queue_persist: float = 0.1
    drained_ratio: float = 1.1
    drain_max: float = 1.5
    settle: float = 0.3
    repace: float = 0.03
    probe_min: float = 0.8
    full_pipe: float = 0.2  # the probe's pipe is full once btl_bw grew < 25 % for 3 RTTs, and at least this
    probe_timeout: float = 4.0
    # ... but the first probe ends sooner, at the first interval in which the queue overflows
    # (``LinkState.overflowing``): the link is full then, and unpaced lanes only drop packets
    overflow_ends_probe: bool = True
    upprobe_interval: float = 3.0
    upprobe_clear: float = 1.5  # ... this soon when the lanes get all the pacing allows and no queue stands
    upprobe_gain: float = 1.1
    upprobe_gain_max: float = 1.5  # the largest step of a run of up-probes that paid
    upprobe_time: float = 0.5  # the estimator's raise_span: its goodput average sees a whole up-probe
    min_busy: float = 0.5
    # a goodput average is judged against the capacity (``_underused``) only when the lanes had data in
    # flight this share of its window, and work queued in their sockets in this share of its samples
    # (``LinkState.unqueued``): an idle gap between two requests, or a sender writing at half the link's
    # rate, is not a slow link
    full_busy: float = 0.9
    rwnd_limited: float = 0.3  # receiver-bound above this share of busy time: more lanes won't help
    window_limited: float = 0.3  # lanes held by a socket window this share of busy time: add lanes
    # payload one lane can have in flight: tcp_wmem[2] (4 MiB by default) holds about half of it in payload
    # once the kernel's per-packet overhead is counted (measured: ~265 Mbit/s a lane at 80 ms, ~2.6 MB)
    lane_window: float = 2 * 2**20
    # the lanes a controller starts with are sized (``start_lanes``) so the socket windows are not the first
    # limit below this rate (bytes/s; the last capacity estimate replaces it when there is one): 1 Gbit/s,
    # a cross-datacenter link's share for one engine (the links are 1 and 2 Gbit/s); beyond it the
    # window-bound lanes double while it pays. None: start at ``initial_lanes``
    start_rate: float | None = 1e9 / 8
    polite: bool = False
    polite_share: float = 0.5
    polite_congestion: str | None = "cubic"
    polite_hold: float = 2.0
    judge_after: float = 1.0  # the estimator's stats window: goodput averages reach back this far
    grow_gain: float = 0.15  # loss-bound lanes keep growing while each step raises goodput by this much
    recover_ratio: float = 0.5  # an estimate below this x the recent best, while we get all we pace: re-probe
    best_window: float = 30.0  # how long the best estimate is remembered
    recover_loss: float = 0.01  # ... and loss below this (a long path's random loss, not an overflowing queue)
    # re-probes that did not bring the estimate back wait reprobe_hold, then twice that, and so on up to
    # reprobe_hold_max (a link that really fell costs a short unpaced burst every few seconds until
    # best_window forgets the old best; a fault that was still on at a re-probe is re-probed at most
    # reprobe_hold_max after it ends: uncapped, a 10 s fault had doubled the wait to 8 s and the link came
    # back to 80 % 9.2-9.9 s after the fault, by up-probe steps from 2 % of it)
    reprobe_hold: float = 1.0
    reprobe_hold_max: float = 4.0
    lan_rtt: float = 0.001  # a min RTT below this is a LAN: left in PROBE, unpaced, lanes unchanged

    def __post_init__(self) -> None:
        if not 1 <= self.min_lanes <= self.initial_lanes <= self.max_lanes:
            raise ValueError("need 1 <= min_lanes <= initial_lanes <= max_lanes")
        if not 0 < self.polite_share <= 1:
            raise ValueError("polite_share must be in (0, 1]")
        if not (0 < self.drain_gain <= self.drain_gain_max < self.pace_gain <= 1 < self.upprobe_gain
                <= self.upprobe_gain_max):
            raise ValueError("need 0 < drain_gain <= drain_gain_max < pace_gain <= 1 < upprobe_gain "
                             "<= upprobe_gain_max")
        if not 0 < self.reprobe_hold <= self.reprobe_hold_max:
            raise ValueError("need 0 < reprobe_hold <= reprobe_hold_max")
        if self.drain_time <= 0:
            raise ValueError("drain_time must be positive")
        if not 1 <= self.drained_ratio < self.drain_ratio:
            raise ValueError("need 1 <= drained_ratio < drain_ratio")
        if self.lane_window <= 0 or (self.start_rate is not None and self.start_rate <= 0):
            raise ValueError("lane_window and start_rate must be positive")

    @property
    def algorithm(self) -> str | None:
        return self.polite_congestion if self.polite else self.congestion


@dataclass(frozen=True)
class Decision:
    """What the lanes should do: how many, each one's pacing cap (bytes/s, None = none), which CC."""

    lanes: int
    pacing_rate: int | None
    congestion: str | None
    mode: Mode
    reason: str
    restart: bool = False  # re-initialise the lanes' congestion algorithm as this decision is applied

    @property
    def total_pacing(self) -> int | None:
        return None if self.pacing_rate is None else self.pacing_rate * self.lanes


@dataclass(frozen=True)
class ControllerState:
    decision: Decision
    changed_at: float | None = None  # when the mode (or the lane count) last changed
    mode_at: float | None = None  # when the mode last changed (a lane-count change within it leaves it)
    competing_at: float | None = None  # last time competing traffic was seen (polite mode)
    drained_at: float | None = None  # when the last DRAIN ended
    lanes_at: float | None = None  # when loss-bound lanes were last added (capacity unknown)
    grown_from: float | None = None  # goodput just before that step
    upprobe_streak: int = 0  # up-probes in a row that paid (the next one's step doubles with each)
    best: float | None = None  # the best capacity estimate of the last best_window ...
    best_at: float | None = None  # ... and when it was seen
    reprobed_at: float | None = None  # when the last re-probe started
    reprobes: int = 0  # re-probes since the estimate was last within recover_ratio of the best
    queue_at: float | None = None  # when the current run of queue readings above drain_ratio began
    pipe_bw: float | None = None  # PROBE: btl_bw when it last grew by 25 % ...
    pipe_at: float | None = None  # ... and when
    delivered: float | None = None  # the highest btl_bw the lanes reached unpaced, not yet probed back to ...
    delivered_at: float | None = None  # ... and when (forgotten after best_window)
    last_capacity: float | None = None  # the estimate of the previous step
    probe_base: float | None = None  # the capacity an up-probe started from
    probe_queue: float = 1.0  # the most the queueing ratio read during the current up-probe
    # the capacity a burst before the first byte measured (a warm-up), while nothing has tried it: a short
    # burst reads it anywhere from 0.77x to 1.2x of a 2 Gbit/s, 80 ms link, so the first up-probe comes after
    # ``settle`` on a clear link instead of ``upprobe_clear``. None once an up-probe or a drain ran, or the
    # estimate fell below it (then it read high, not low)
    unconfirmed: float | None = None

    @property
    def mode(self) -> Mode:
        return self.decision.mode
