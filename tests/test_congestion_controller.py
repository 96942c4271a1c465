"""LaneController policy (pure, on synthetic LinkStates) and its actuator (on real sockets)."""

from __future__ import annotations

import math
import socket
import struct
import threading
from collections.abc import Iterator
from dataclasses import replace

import pytest
from helpers import wait_until

from kvwire.congestion.controller import (
    MIN_RTT_REFRESH,
    ControllerConfig,
    ControllerState,
    Decision,
    LaneController,
    Mode,
    apply_decision,
    decide,
    initial_state,
    lane_window_for,
    lanes_for,
    mathis_rate,
    start_lanes,
    window_lanes,
)
from kvwire.congestion.estimator import LinkState
from kvwire.congestion.rules import loss_lanes
from kvwire.congestion.tcpinfo import read_tcp_info
from kvwire.sockopts import get_congestion, get_pacing_rate, set_congestion

TCP_CC_INFO = 26  # (linux/tcp.h; Python's socket module does not name it)


def ls(t: float, goodput: float, *, q: float = 1.0, loss: float = 0.0, busy: float = 1.0,
       btl_bw: float | None = None, capacity: float | None = None, rwnd: float = 0.0,
       competing: float | None = None, min_rtt: float = 0.02) -> LinkState:
    return LinkState(timestamp=t, goodput=goodput, btl_bw=goodput if btl_bw is None else btl_bw,
                     capacity=capacity, utilization=None, available_bw=None, min_rtt=min_rtt, srtt=min_rtt * q,
                     queueing_ratio=q, loss_rate=loss, busy=busy, rwnd_limited=rwnd, sndbuf_limited=0.0,
                     congested=False, saturated=q >= 1.25, competing_bw=competing)


def feed(st: ControllerState, cfg: ControllerConfig, states: list[LinkState]) -> ControllerState:
    for s in states:
        st = decide(st, s, cfg)
    return st


CFG = ControllerConfig(initial_lanes=4, max_lanes=16, queue_persist=0.0)  # one reading drains here
C = 48e6  # bytes/s: 400 Mbit/s of payload, roughly
PACE = CFG.pace_gain


def cruising(cfg: ControllerConfig = CFG, t: float = 1.0, cap: float = C) -> ControllerState:
    # (the probe's bandwidth stopped growing cfg.full_pipe before t: the pipe is full at t)
    st = feed(initial_state(cfg), cfg, [ls(0.0, 0.0), ls(t - cfg.full_pipe, cap), ls(t, cap, q=2.0, capacity=cap)])
    assert st.mode in (Mode.CRUISE, Mode.POLITE), st
    return st


def test_probe_runs_unpaced_with_bbr_until_the_capacity_is_known() -> None:
    st = initial_state(CFG)
    assert st.mode is Mode.PROBE and st.decision.pacing_rate is None and st.decision.congestion == "bbr"
    st = feed(st, CFG, [ls(0.0, 0.0), ls(0.3, 30e6, q=2.0, capacity=30e6)])
    assert st.mode is Mode.PROBE  # capacity seen, but before probe_min: BBR's startup is still ramping
    st = decide(st, ls(0.9, C, q=2.0, capacity=C), CFG)
    # a queue, past probe_min, but the bandwidth grew 60 % since the last sample: the pipe is not full yet
    # (a queue that reads while BBR's startup still ramps is host delay); BBR's rule: < 25 % growth in 3 RTTs
    assert st.mode is Mode.PROBE and st.decision.pacing_rate is None
    st = decide(st, ls(0.9 + CFG.full_pipe / 2, 1.2 * C, q=2.0, capacity=C), CFG)
    assert st.mode is Mode.PROBE  # growing < 25 %, but not yet for full_pipe
    st = decide(st, ls(0.9 + CFG.full_pipe, 1.2 * C, q=2.0, capacity=C), CFG)
    assert st.mode is Mode.CRUISE and st.decision.pacing_rate == int(PACE * C) // 4
    st = feed(initial_state(CFG), CFG, [ls(0.0, 0.0), ls(4.1, 20e6)])  # never saturated
    assert st.mode is Mode.CRUISE and st.decision.pacing_rate is None


def test_the_first_probe_ends_when_the_queue_overflows() -> None:
    """Unpaced lanes starting on a shallow queue overflow it (the issue's lossy row: 4 BBR lanes lost a fifth
    of their packets for half a second, 96 % of a 9 s transfer's retransmits): the first interval that
    overflows ends PROBE, paced under the capacity it gave, before ``probe_min``. Negative controls: a
    standing queue with random loss only waits for ``probe_min``; so does a re-probe (its capacity is the
    collapsed one until the queue has stood), and ``overflow_ends_probe=False``."""
    overflow = replace(ls(0.3, 30e6, q=2.0, loss=0.12, capacity=C), overflowing=True)
    st = feed(initial_state(CFG), CFG, [ls(0.0, 0.0), overflow])
    assert st.mode is Mode.CRUISE and st.decision.pacing_rate == int(PACE * C) // 4
    assert "overflowing" in st.decision.reason
    standing = ls(0.3, 30e6, q=2.0, loss=0.001, capacity=C)
    assert feed(initial_state(CFG), CFG, [ls(0.0, 0.0), standing]).mode is Mode.PROBE
    off = replace(CFG, overflow_ends_probe=False)
    assert feed(initial_state(off), off, [ls(0.0, 0.0), overflow]).mode is Mode.PROBE
    reprobing = replace(decide(initial_state(CFG), ls(0.0, 0.0), CFG), reprobed_at=0.0)
    assert decide(reprobing, overflow, CFG).mode is Mode.PROBE


def test_idle_lanes_are_not_judged() -> None:
    st = cruising()
    assert decide(st, ls(3.0, 1e6, q=3.0, busy=0.1, capacity=C), CFG) == st


def test_a_standing_queue_drains_below_capacity_then_cruises_at_the_new_capacity() -> None:
    st = cruising()
    st = decide(st, ls(1.1, C, q=1.6, capacity=C), CFG)
    assert st.mode is Mode.CRUISE  # within settle of the last change
    half = C / 2  # the bottleneck halved; the estimator follows it under the queue
    st = decide(st, ls(1.5, half, q=3.0, capacity=half), CFG)
    # 2 x 20 ms of queue to empty in drain_time (0.2 s): pace at 80 % of the new capacity
    assert st.mode is Mode.DRAIN and st.decision.pacing_rate == int(0.8 * half) // 4
    st = decide(st, ls(1.7, half, q=1.5, capacity=half), CFG)
    assert st.mode is Mode.DRAIN
    st = decide(st, ls(1.9, half, q=1.05, capacity=half), CFG)
    assert st.mode is Mode.CRUISE and st.decision.pacing_rate == int(PACE * half) // 4


def test_drain_depth_follows_the_queue_and_the_falling_capacity() -> None:
    deep = decide(cruising(), ls(1.5, C, q=8.0, capacity=C), CFG)  # 140 ms of queue: the deepest drain
    assert deep.mode is Mode.DRAIN and deep.decision.pacing_rate == int(CFG.drain_gain * C) // 4
    shallow = decide(cruising(), ls(1.5, C, q=1.35, capacity=C), CFG)  # an up-probe's few ms: a light one
    assert shallow.mode is Mode.DRAIN and shallow.decision.pacing_rate == int(CFG.drain_gain_max * C) // 4
    # the rate drop is still being measured when the drain starts: the drain follows the estimate down
    st = decide(cruising(), ls(1.5, C, q=3.0, capacity=0.7 * C), CFG)
    first = st.decision.pacing_rate
    st = decide(st, ls(1.6, C / 2, q=3.0, capacity=C / 2), CFG)
    assert st.mode is Mode.DRAIN and first is not None and st.decision.pacing_rate == int(0.8 * C / 2) // 4
    assert st.changed_at == 1.5  # still the same drain: drain_max counts from its start
    same = decide(st, ls(1.7, C / 2, q=3.0, capacity=0.51 * C), CFG)
    assert same.decision == st.decision  # never re-paced up within a drain


def test_a_drain_goes_no_deeper_than_the_buffer_the_bottleneck_showed() -> None:
    """A queue deeper than the bottleneck's buffer (``LinkState.max_queue``, from its overflows) is delay
    elsewhere (a host stall): the drain empties only what the buffer can hold. Seen: a 20 ms queue on 80 ms
    read 2.25 at the first request after a warm-up (100 ms) and drained the lanes at half the link. Negative
    control: with no buffer known, the same reading drains at the deepest gain."""
    stall = ls(1.5, C, q=2.25, capacity=C, min_rtt=0.08)
    bounded = decide(cruising(), replace(stall, max_queue=0.03), CFG)  # 30 ms in drain_time 0.2 s: 0.85
    assert bounded.mode is Mode.DRAIN and bounded.decision.pacing_rate == int(0.85 * C) // 4
    unknown = decide(cruising(), stall, CFG)
    assert unknown.mode is Mode.DRAIN and unknown.decision.pacing_rate == int(CFG.drain_gain * C) // 4


def test_drain_gives_up_after_drain_max() -> None:
    st = decide(cruising(), ls(1.5, C, q=3.0, capacity=C), CFG)
    assert st.mode is Mode.DRAIN
    st = decide(st, ls(1.5 + CFG.drain_max, C, q=1.6, capacity=C), CFG)
    assert st.mode is Mode.CRUISE


def test_cruise_repaces_when_the_estimate_moves_and_up_probes_periodically() -> None:
    st = cruising()
    same = decide(st, ls(2.0, C, capacity=C * 1.01), CFG)
    assert same.decision == st.decision  # within repace: no churn on the sockets
    st = decide(st, ls(2.1, C, capacity=C * 1.2), CFG)
    assert st.decision.pacing_rate == int(PACE * C * 1.2) // 4 and st.mode is Mode.CRUISE
    st = decide(st, ls(1.0 + CFG.upprobe_interval + 0.1, C, capacity=C * 1.2), CFG)
    assert st.mode is Mode.UPPROBE and st.decision.pacing_rate == int(1.1 * C * 1.2) // 4
    t = st.changed_at
    assert t is not None
    st = decide(st, ls(t + CFG.upprobe_time, C * 1.3, capacity=C * 1.3), CFG)  # it paid: bigger capacity ...
    assert st.mode is Mode.UPPROBE and st.decision.pacing_rate == int(1.2 * C * 1.3) // 4  # ... probe on, further
    t = st.changed_at
    assert t is not None
    st = decide(st, ls(t + CFG.upprobe_time, C * 1.3, capacity=C * 1.3), CFG)  # that was all of it
    assert st.mode is Mode.CRUISE and st.decision.pacing_rate == int(PACE * C * 1.3) // 4
    st = feed(st, CFG, [ls(t + CFG.upprobe_time + CFG.upprobe_interval + 0.1, C, capacity=C * 1.3)])
    assert st.mode is Mode.UPPROBE
    st = decide(st, ls(st.changed_at + 0.1, C, q=1.5, capacity=C * 1.3), CFG)  # type: ignore[operator]
    assert st.mode is Mode.DRAIN  # that one only filled the queue


def test_lanes_follow_the_path_bbr_few_loss_based_many() -> None:
    st = cruising()
    st = decide(st, ls(1.5, C, capacity=C), CFG)
    assert st.decision.lanes == 4  # BBR: 2 x BDP (1.9 MB) fits in one 4 MiB window: no need to grow
    big = ControllerConfig(initial_lanes=2, min_lanes=2, max_lanes=16, lane_window=4 * 2**20)
    st = cruising(big, cap=1e9)  # 8 Gbit/s x 20 ms: 2 x BDP = 40 MB -> 10 lanes
    st = decide(st, ls(1.5, 1e9, capacity=1e9), big)
    assert st.decision.lanes == 10 and st.decision.pacing_rate == int(PACE * 1e9) // 10
    cubic = ControllerConfig(initial_lanes=4, congestion="cubic")
    st = cruising(cubic)
    st = decide(st, ls(1.5, 12e6, loss=1e-3, capacity=C), cubic)  # Mathis: ~2.8 MB/s per lane
    assert st.decision.lanes == 16
    st = decide(st, ls(1.5, 12e6, loss=1e-3, capacity=C, rwnd=0.9), cubic)
    st2 = decide(cruising(cubic), ls(1.5, 12e6, loss=1e-3, capacity=C, rwnd=0.9), cubic)
    assert st2.decision.lanes == 4  # receiver-window-bound: more lanes would not help
    calm = decide(st, ls(3.0, C, loss=0.0, capacity=C), cubic)
    assert calm.decision.lanes == 16  # loss-based lanes keep their count when the loss they see moves
    st = decide(cruising(big, cap=1e9), ls(1.5, 1e9, capacity=1e9), big)
    kept = decide(st, ls(3.0, 1e8, capacity=1e8), big)
    assert kept.decision.lanes == 10  # the best estimate of the last best_window still needs them
    few = decide(kept, ls(3.0 + big.best_window, 1e8, capacity=1e8), big)
    assert few.decision.lanes == 5  # then BBR lanes follow the BDP down, by at most half a step


def test_polite_mode_cubic_paces_to_a_fair_share_while_others_are_present() -> None:
    cfg = ControllerConfig(initial_lanes=4, polite=True, polite_share=0.5, polite_hold=2.0, upprobe_interval=10.0,
                           queue_persist=0.0)
    st = cruising(cfg)
    assert st.mode is Mode.POLITE and st.decision.congestion == "cubic"
    assert st.decision.pacing_rate == int(PACE * C) // 4  # alone: takes the link
    early = decide(st, ls(2.0, C * 0.6, q=2.5, capacity=C, competing=C * 0.4), cfg)
    assert early.mode is Mode.DRAIN  # too soon after our own change to blame others: drain it
    st = decide(st, ls(2.4, C * 0.6, q=2.5, capacity=C, competing=C * 0.4), cfg)
    assert st.decision.pacing_rate == int(0.5 * C) // 4 and st.mode is Mode.POLITE
    st = decide(st, ls(2.9, C * 0.5, q=2.5, capacity=C, competing=C * 0.5), cfg)
    assert st.mode is Mode.POLITE  # the other flow's queue is not drained away by us
    st = decide(st, ls(4.4, C * 0.5, q=1.0, capacity=C, competing=0.0), cfg)
    assert st.decision.pacing_rate == int(0.5 * C) // 4  # held for polite_hold
    st = decide(st, ls(5.0, C * 0.5, q=1.0, capacity=C, competing=0.0), cfg)
    assert st.decision.pacing_rate == int(PACE * C) // 4  # gone: the link again


def test_polite_mode_reads_a_queue_that_returns_after_a_drain_as_a_competing_flow() -> None:
    cfg = ControllerConfig(initial_lanes=4, polite=True, queue_persist=0.0)
    st = decide(cruising(cfg), ls(1.4, C * 0.8, q=2.5, capacity=C), cfg)
    assert st.mode is Mode.DRAIN
    st = decide(st, ls(1.6, C * 0.7, q=1.05, capacity=C), cfg)
    assert st.mode is Mode.POLITE and st.decision.pacing_rate == int(PACE * C) // 4
    st = decide(st, ls(2.0, C * 0.8, q=2.5, capacity=C), cfg)
    assert st.mode is Mode.POLITE and st.decision.pacing_rate == int(0.5 * C) // 4
    assert "sharing" in st.decision.reason


def test_lanes_stay_within_bounds() -> None:
    cfg = ControllerConfig(min_lanes=2, initial_lanes=4, max_lanes=6, congestion="reno")
    st = feed(cruising(cfg), cfg, [ls(1.0 + 0.5 * i, 1e6, loss=0.05, capacity=C) for i in range(1, 20)])
    assert 2 <= st.decision.lanes <= 6 and st.decision.pacing_rate is not None and st.decision.pacing_rate > 0


def test_config_validation_and_start_lanes() -> None:
    with pytest.raises(ValueError):
        ControllerConfig(min_lanes=4, initial_lanes=2)
    with pytest.raises(ValueError):
        ControllerConfig(polite_share=1.5)
    with pytest.raises(ValueError):
        ControllerConfig(drain_gain=0.99)
    with pytest.raises(ValueError):
        ControllerConfig(drain_gain=0.6, drain_gain_max=0.5)
    assert mathis_rate(0.02, 1e-3) == pytest.approx(1448 / 0.02 * 1.22 / 1e-3 ** 0.5)
    cfg = ControllerConfig(max_lanes=16)
    assert lanes_for(1e6, 4e6, cfg) == 4
    assert lanes_for(37.5e6, 4 * 2**20, cfg) == 9
    assert lanes_for(1e9, 1e6, cfg) == 16


def test_actuator_sets_pacing_and_algorithm(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    dead = socket.socket()
    dead.close()
    failed = apply_decision(Decision(2, 5_000_000, "reno", Mode.DRAIN, "test"), [a, b, dead])
    assert [s for s, _ in failed] == [dead]
    assert get_pacing_rate(a) == get_pacing_rate(b) == 5_000_000
    assert get_congestion(a) == get_congestion(b) == "reno"
    apply_decision(Decision(2, None, None, Mode.CRUISE, "test"), [a])
    assert get_pacing_rate(a) is None and get_congestion(a) == "reno"


def test_lane_controller_drives_sockets_and_lane_hook(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    wanted: list[int] = []
    lanes = [a, b]
    cfg = ControllerConfig(initial_lanes=2, min_lanes=1, max_lanes=16, lane_window=4 * 2**20)
    ctl = LaneController(cfg, sockets_provider=lambda: list(lanes), set_lanes=wanted.append)
    ctl.on_state(ls(0.0, 0.0))
    ctl.on_state(ls(0.5, 1e9, q=2.0, capacity=1e9))
    assert get_pacing_rate(a) is None and ctl.decision.mode is Mode.PROBE
    ctl.on_state(ls(1.0, 1e9, q=2.0, capacity=1e9))
    assert ctl.decision.mode is Mode.CRUISE and get_pacing_rate(a) == get_pacing_rate(b) == int(PACE * 1e9) // 2
    assert get_congestion(a) == "bbr"
    ctl.on_state(ls(1.4, 1e9, capacity=1e9))  # 8 Gbit/s x 20 ms needs 10 lanes
    assert wanted == [10] and ctl.decision.pacing_rate == int(PACE * 1e9) // 10
    assert get_pacing_rate(a) == int(PACE * 1e9) // 2  # the two lanes there carry the aggregate until more open
    assert [d.mode for _, d in ctl.history] == [Mode.PROBE, Mode.CRUISE, Mode.CRUISE]
    lanes.remove(b)  # a lane dies: the decision is the same, the survivor takes its share
    ctl.on_state(ls(1.5, 1e9, capacity=1e9))
    assert get_pacing_rate(a) == int(PACE * 1e9) and get_pacing_rate(b) == int(PACE * 1e9) // 2


def test_a_capacity_probed_beforehand_skips_the_in_band_probe() -> None:
    st = initial_state(CFG, capacity=C)
    assert st.mode is Mode.CRUISE and st.decision.pacing_rate == int(PACE * C) // 4
    st = feed(st, CFG, [ls(0.0, 0.0, capacity=C), ls(0.5, C * PACE, capacity=C)])
    assert st.mode is Mode.CRUISE and st.decision.pacing_rate == int(PACE * C) // 4
    polite = ControllerConfig(polite=True)
    assert initial_state(polite, capacity=C).mode is Mode.POLITE
    assert initial_state(polite, capacity=C).decision.congestion == "cubic"


def test_a_capacity_probed_beforehand_is_up_probed_after_settle_once_then_at_the_usual_wait() -> None:
    """A warm-up's short burst may read the capacity low (0.77x of a 2 Gbit/s, 80 ms link once: the lanes then
    cruised at three quarters of it for 1.5 s). Cruising pacing-limited on a clear link, the first up-probe
    after such a start comes at ``settle``; the next ones at ``upprobe_clear`` as before. Negative controls: a
    start without a beforehand capacity, and the same start once a drain measured the link, wait as usual."""
    cfg = CFG
    st = feed(initial_state(cfg, capacity=C), cfg, [ls(0.0, 0.0, capacity=C)])
    assert st.unconfirmed == C and st.mode is Mode.CRUISE
    clear = replace(ls(cfg.settle + 0.01, PACE * C, capacity=C), pacing_limited=True)
    up = decide(st, clear, cfg)
    assert up.mode is Mode.UPPROBE and up.unconfirmed is None, up.decision
    assert up.changed_at is not None
    done = decide(up, ls(up.changed_at + cfg.upprobe_time, PACE * C, capacity=C), cfg)  # it did not pay
    assert done.mode is Mode.CRUISE and done.changed_at is not None
    again = replace(ls(done.changed_at + cfg.settle + 0.01, PACE * C, capacity=C), pacing_limited=True)
    assert decide(done, again, cfg).mode is Mode.CRUISE  # the usual upprobe_clear from here
    later = replace(again, timestamp=done.changed_at + cfg.upprobe_clear + 0.01)
    assert decide(done, later, cfg).mode is Mode.UPPROBE
    # negative controls: an in-band probe's capacity, and a beforehand one a drain has since measured
    assert cruising(cfg).unconfirmed is None
    drained = decide(st, ls(cfg.settle + 0.01, C, q=2.0, capacity=C), cfg)
    assert drained.mode is Mode.DRAIN and drained.unconfirmed is None
    assert decide(replace(st, unconfirmed=None), clear, cfg).mode is Mode.CRUISE
    # ... and one the estimator has since measured lower (the burst read high): paced at the lower one, the
    # lanes get all it allows, but that is no sign of more link
    lower = replace(ls(cfg.settle + 0.01, 0.8 * PACE * C, capacity=0.8 * C), pacing_limited=True)
    assert decide(st, lower, cfg).mode is Mode.CRUISE


def test_loss_bound_lanes_grow_while_goodput_grows() -> None:
    """CUBIC under random loss never shows the queue that tells the capacity: lanes are added while
    each sits at its Mathis rate and the last step paid, first aiming at the rate slow start reached."""
    cfg = ControllerConfig(initial_lanes=4, max_lanes=32, congestion="cubic")
    one = mathis_rate(0.02, 1e-3)  # ~2.8 MB/s per lane
    st = decide(initial_state(cfg), ls(0.0, 0.0), cfg)
    early = decide(st, ls(1.0, 4 * one, loss=1e-3, btl_bw=C), cfg)
    assert early.decision.lanes == 4  # goodput averages still reach back before the lanes settled
    st = decide(st, ls(1.4, 4 * one, loss=1e-3, btl_bw=C), cfg)
    assert st.decision.lanes == math.ceil(C / one) == 18 and st.mode is Mode.PROBE and st.grown_from == 4 * one
    assert decide(st, ls(2.0, 18 * one, loss=1e-3, btl_bw=C), cfg).decision.lanes == 18  # too soon again
    grew = decide(st, ls(2.8, 15 * one, loss=1e-3, btl_bw=C), cfg)
    assert grew.decision.lanes == 27  # it paid: half as many again
    stuck = decide(st, ls(2.8, 4.2 * one, loss=1e-3, btl_bw=C), cfg)
    assert stuck.decision.lanes == 18  # it did not: stop growing
    queued = decide(st, ls(2.8, 15 * one, q=1.5, loss=1e-3, btl_bw=C), cfg)
    assert queued.decision.lanes == 18  # a queue: the loss is congestive, no more lanes
    bbr = ControllerConfig(initial_lanes=4, max_lanes=32)
    st = decide(initial_state(bbr), ls(0.0, 0.0), bbr)
    assert decide(st, ls(1.4, 0.9 * C, loss=1e-3, btl_bw=C), bbr).decision.lanes == 4  # beats Mathis: not bound
    polite = ControllerConfig(initial_lanes=4, max_lanes=32, polite=True)
    st = decide(initial_state(polite), ls(0.0, 0.0), polite)
    alone = decide(st, ls(1.4, 4 * one, loss=1e-3, btl_bw=C), polite)
    assert alone.decision.lanes == 18 and alone.decision.congestion == "cubic"  # polite, alone on a lossy link
    st = decide(replace(alone, competing_at=2.0), ls(2.8, 15 * one, loss=1e-3, btl_bw=C), polite)
    assert st.decision.lanes == 18  # another flow seen 0.8 s ago: no more lanes while sharing
    assert decide(st, ls(4.1, 15 * one, loss=1e-3, btl_bw=C), polite).decision.lanes == 27  # gone: grow again


def test_polite_lanes_follow_the_mathis_rule_only_while_alone() -> None:
    cfg = ControllerConfig(initial_lanes=4, max_lanes=64, polite=True)
    st = cruising(cfg)
    alone = decide(st, ls(1.5, 12e6, loss=1e-3, capacity=C), cfg).decision
    assert alone.lanes == loss_lanes(C, 0.02, 1e-3) == 35  # ~2.8 MB/s a lane at its Mathis rate: half of it each
    sharing = replace(st, competing_at=1.2)
    assert decide(sharing, ls(1.5, 12e6, loss=1e-3, capacity=C), cfg).decision.lanes == 4


def test_loss_based_lanes_are_paced_at_half_their_mathis_rate() -> None:
    """A paced CUBIC lane that a random loss cut to 0.7 of its cap cannot take a peer's idle share: the lane
    count keeps each lane's cap at half its Mathis rate, so the backoffs cost the aggregate ~3 %, not ~13 %
    (one Mathis rate a lane: 18 lanes on 400 Mbit/s, 20 ms, 0.1 % loss; measured there: 20 lanes, 89 %)."""
    cfg = ControllerConfig(initial_lanes=4, max_lanes=64, congestion="cubic")
    st = cruising(cfg)
    for loss in (1e-4, 1e-3, 3e-3):
        d = decide(st, ls(1.5, C, loss=loss, capacity=C), cfg).decision
        one = mathis_rate(0.02, loss)
        assert d.lanes == loss_lanes(C, 0.02, loss)
        assert d.total_pacing is not None and d.pacing_rate is not None
        assert d.pacing_rate <= 0.5 * one < C / (d.lanes - 1)  # half a Mathis rate a lane, not less
        assert d.lanes > math.ceil(C / one)  # (the count at one Mathis rate a lane: more than that)
    assert loss_lanes(C, 0.02, 1e-3) == 35 and math.ceil(C / mathis_rate(0.02, 1e-3)) == 18
    assert decide(st, ls(1.5, C, loss=1e-2, capacity=C), cfg).decision.lanes == cfg.max_lanes  # (109 wanted)
    assert loss_lanes(C, 0.02, 0.0) == loss_lanes(C, 0.02, 1e-6)  # no loss measured: clamped, not a division by 0
    # a queue: the loss is congestive and no reason for lanes; nor for BBR, which ignores random loss
    assert decide(st, ls(1.5, C, q=1.5, loss=1e-3, capacity=C), cfg).decision.lanes == 4
    bbr = ControllerConfig(initial_lanes=4, max_lanes=64)
    assert decide(cruising(bbr), ls(1.5, C, loss=1e-3, capacity=C), bbr).decision.lanes == 4


def test_the_decision_takes_the_lane_count_the_session_could_open(pair: tuple[socket.socket, socket.socket]) -> None:
    """A lane that fails to open (peer refuses, route gone) must not leave the aggregate paced for lanes
    that do not exist: the decision keeps its total rate over the lanes in effect."""
    a, b = pair
    asked: list[int] = []

    def opens_at_most_three(n: int) -> int:
        asked.append(n)
        return min(n, 3)

    cfg = ControllerConfig(initial_lanes=2, min_lanes=1, max_lanes=16, lane_window=4 * 2**20)
    ctl = LaneController(cfg, sockets_provider=lambda: [a, b], set_lanes=opens_at_most_three)
    ctl.on_state(ls(0.0, 0.0))
    ctl.on_state(ls(0.8, 1e9))  # (the probe's bandwidth stops growing: the pipe is full at 1.0)
    ctl.on_state(ls(1.0, 1e9, q=2.0, capacity=1e9))
    ctl.on_state(ls(1.4, 1e9, capacity=1e9))  # wants 10 lanes
    assert asked == [10]
    assert ctl.decision.lanes == 3 and ctl.decision.total_pacing == pytest.approx(PACE * 1e9, rel=1e-6)
    assert ctl.decision.pacing_rate == int(PACE * 1e9) // 3 and "only 3 lanes" in ctl.decision.reason
    assert get_pacing_rate(a) == ctl.decision.total_pacing // 2  # split over the sockets the provider gives
    assert ctl.history[-1][1] == ctl.decision


def test_lanes_the_path_asks_for_mid_cruise_do_not_start_the_up_probe_wait_over() -> None:
    """Cruising pacing-limited on a clear 80 ms path, the lane count grows as the estimate does (14 -> 15 -> 16
    on a 2 Gbit/s link); each change used to start ``upprobe_clear`` over, and two of them kept the link paced
    at 0.8x of it for 2.6 s. The wait runs from when the cruise began; a lane change still gets ``settle``.
    Negative control: the same state whose cruise began at the lane change waits the whole ``upprobe_clear``."""
    cfg = ControllerConfig(initial_lanes=4, max_lanes=16, queue_persist=0.0)
    cap = 1.2e8  # 2 x 9.6 MB in flight at 80 ms: 10 lanes of 2 MiB
    st = initial_state(cfg, capacity=cap, lanes=4)  # (a warm-up's capacity, confirmed: the usual wait)
    st = replace(st, unconfirmed=None)

    def clear(t: float, c: float = cap) -> LinkState:
        return replace(ls(t, PACE * c, capacity=c, min_rtt=0.08), pacing_limited=True)

    st = decide(st, clear(1.0), cfg)  # the cruise begins
    st = decide(st, clear(1.0 + cfg.settle), cfg)
    assert st.mode is Mode.CRUISE and st.decision.lanes == 10 and "lanes for the path" in st.decision.reason
    grown = 1.0 + cfg.settle
    t = 1.0 + cfg.upprobe_clear + 0.01  # upprobe_clear after the cruise began, less than that after the lanes grew
    assert t - grown >= cfg.settle and t - grown < cfg.upprobe_clear
    up = decide(st, clear(t), cfg)
    assert up.mode is Mode.UPPROBE, up.decision
    late = decide(replace(st, mode_at=grown), clear(t), cfg)
    assert late.mode is Mode.CRUISE and late.decision == st.decision
    soon = decide(replace(st, mode_at=0.0), clear(grown + cfg.settle / 2), cfg)  # (lanes just added settle first)
    assert soon.decision == st.decision


def test_up_probes_that_pay_take_growing_steps_and_start_over_when_one_does_not() -> None:
    """A capacity that doubled (a competitor left, a rate came back) is found in a few probes."""
    st = cruising()
    st = decide(st, ls(1.0 + CFG.upprobe_interval + 0.1, C, capacity=C), CFG)
    gains, cap = [], C
    for _ in range(5):
        assert st.mode is Mode.UPPROBE and st.changed_at is not None
        gains.append(round(st.decision.total_pacing / cap, 2))  # type: ignore[operator]
        cap = st.decision.total_pacing  # the link takes all of it: the estimate follows
        st = decide(st, ls(st.changed_at + CFG.upprobe_time, cap, capacity=cap), CFG)
    assert gains == [1.1, 1.2, 1.4, 1.5, 1.5]
    assert st.changed_at is not None
    st = decide(st, ls(st.changed_at + CFG.upprobe_time, cap, capacity=cap), CFG)  # this one did not pay
    assert st.mode is Mode.CRUISE and st.upprobe_streak == 0
    st = feed(st, CFG, [ls(st.changed_at + CFG.upprobe_interval + 0.1, cap, capacity=cap)])  # type: ignore[operator]
    assert st.mode is Mode.UPPROBE and st.decision.total_pacing == int(1.1 * cap) // 4 * 4
    st = decide(st, ls(st.changed_at + 0.1, cap, q=1.5, capacity=cap), CFG)  # type: ignore[operator]
    assert st.mode is Mode.DRAIN and st.upprobe_streak == 0
    with pytest.raises(ValueError):
        ControllerConfig(upprobe_gain=1.3, upprobe_gain_max=1.2)


def test_an_up_probe_pays_when_the_lanes_delivered_more_though_the_estimate_lagged() -> None:
    """The estimator's goodput average lags an up-probe's ramp: a 1.1x probe whose lanes delivered 1.07x of
    the start (``btl_bw``) at no queue moved the estimate 1.3 % (on 2 Gbit/s, 80 ms, read at 0.64x). That
    paid: the next probe follows at once with the next step. Negative control: lanes that delivered no more
    than the start end it in CRUISE."""
    st = cruising()
    up = decide(st, ls(1.0 + CFG.upprobe_interval + 0.1, C, capacity=C), CFG)
    assert up.mode is Mode.UPPROBE and up.changed_at is not None
    end = up.changed_at + CFG.upprobe_time
    paid = decide(up, ls(end, 1.02 * C, btl_bw=1.07 * C, capacity=1.013 * C), CFG)
    assert paid.mode is Mode.UPPROBE and paid.upprobe_streak == 1, paid.decision
    assert "delivery grew" in paid.decision.reason
    flat = decide(up, ls(end, 1.0 * C, btl_bw=1.01 * C, capacity=1.013 * C), CFG)
    assert flat.mode is Mode.CRUISE and flat.upprobe_streak == 0, flat.decision


def test_an_up_probe_that_paid_less_than_half_its_step_met_a_limit_and_the_ladder_stops() -> None:
    """At 0.97x of a 2 Gbit/s, 80 ms link a 1.2x up-probe delivered 1.06x: it paid, but the link, not the
    probe, set the rate; the 1.4x step after it overflowed the 20 ms queue (2 % loss) and the drain ran at half
    the link for 0.3 s. A probe whose gain was under half its step, and which made a queue on the way, cruises at
    the grown estimate. Negative controls: one that carried more than half its step climbs on; so does one
    whose lanes got all its pacing at the end, and one that made no queue at all (the lanes' own ramp held
    them: BBR takes a raised cap over a cycle of 8 round trips; stopped there, bursty requests on a 2 Gbit/s
    link were paced at 0.67x of it for 9 s)."""
    st = cruising()
    up = decide(st, ls(1.0 + CFG.upprobe_interval + 0.1, C, capacity=C), CFG)
    assert up.changed_at is not None
    up = decide(up, ls(up.changed_at + 0.2, 1.1 * C, capacity=1.1 * C), CFG)  # 1.1x carried whole: 1.2x next
    assert up.mode is Mode.UPPROBE and up.upprobe_streak == 1 and up.changed_at is not None
    base, pacing = 1.1 * C, up.decision.total_pacing
    assert pacing == pytest.approx(1.2 * base, rel=1e-6)
    end = up.changed_at + CFG.upprobe_time
    clear = up
    up = decide(up, ls(up.changed_at + 0.2, 1.03 * base, q=1.2, capacity=1.02 * base), CFG)  # a queue, short of drain
    assert up.mode is Mode.UPPROBE and up.probe_queue == pytest.approx(1.2)
    found = decide(up, ls(end, 1.04 * base, btl_bw=1.06 * base, capacity=1.04 * base), CFG)
    assert found.mode is Mode.CRUISE and found.upprobe_streak == 0, found.decision
    assert "less than half its step" in found.decision.reason
    assert found.decision.total_pacing == pytest.approx(PACE * 1.04 * base, rel=1e-3)
    climbs = decide(up, ls(end, 1.12 * base, btl_bw=1.12 * base, capacity=1.12 * base), CFG)
    assert climbs.mode is Mode.UPPROBE and climbs.upprobe_streak == 2, climbs.decision
    assert climbs.decision.total_pacing == pytest.approx(1.4 * 1.12 * base, rel=1e-3)
    # the lanes get all the probe's pacing now: the link carries it, the estimate lags (or a host stall held the
    # probe's samples back): it climbs on
    lagging = replace(ls(end, 1.04 * base, btl_bw=1.06 * base, capacity=1.04 * base), pacing_limited=True)
    on = decide(up, lagging, CFG)
    assert on.mode is Mode.UPPROBE and on.upprobe_streak == 2, on.decision
    ramping = decide(clear, ls(end, 1.04 * base, btl_bw=1.06 * base, capacity=1.04 * base, q=1.08), CFG)
    assert ramping.mode is Mode.UPPROBE and ramping.upprobe_streak == 2, ramping.decision


def test_an_up_probe_whose_estimate_caught_up_with_its_pacing_steps_up_at_once() -> None:
    """An up-probe the link carried whole (the estimate reached the probe's pacing, no queue) has nothing more
    to show: the next step follows at once instead of at ``upprobe_time``. From a warm-up read at 0.75x, a bulk
    transfer's ladder of 0.5 s steps spent ~1.3 s under a 2 Gbit/s, 80 ms link (88-89 % over 3.9 s). Negative
    controls: an estimate still short of the pacing, and one with a queue standing, ride the probe out."""
    st = cruising()
    up = decide(st, ls(1.0 + CFG.upprobe_interval + 0.1, C, capacity=C), CFG)
    assert up.mode is Mode.UPPROBE and up.changed_at is not None and up.decision.total_pacing is not None
    t = up.changed_at + 0.2  # well inside upprobe_time
    pacing = up.decision.total_pacing
    step = decide(up, ls(t, 0.98 * pacing, capacity=0.98 * pacing), CFG)
    assert step.mode is Mode.UPPROBE and step.upprobe_streak == 1, step.decision
    assert step.decision.total_pacing == int(1.2 * 0.98 * pacing) // 4 * 4
    short = decide(up, ls(t, 1.05 * C, capacity=1.05 * C), CFG)
    assert short.decision == up.decision and short.upprobe_streak == 0
    queued = decide(up, ls(t, 0.98 * pacing, q=1.2, capacity=0.98 * pacing), CFG)
    assert queued.decision == up.decision


def test_start_lanes_carry_the_start_rate_over_the_handshake_rtt_within_the_send_buffer_ceiling() -> None:
    cfg = ControllerConfig()  # 1 Gbit/s, 4..16 lanes, 2 MiB a lane
    mib = 2**20
    # 2 x 125 MB/s x 80 ms = 20 MB in flight: 10 lanes of 2 MiB (tcp_wmem max 4 MiB holds ~half in payload)
    assert start_lanes(0.080, cfg, lane_window=lane_window_for(4 * mib, cfg)) == 10
    assert lane_window_for(4 * mib, cfg) == 2 * mib and lane_window_for(None, cfg) == cfg.lane_window
    assert start_lanes(0.080, cfg, lane_window=4 * mib) == 5  # a larger send buffer needs fewer lanes
    assert start_lanes(0.080, cfg, capacity=250e6) == 16  # the last estimate (2 Gbit/s): capped at max_lanes
    assert start_lanes(0.040, cfg) == 5  # the 1 Gbit/s, 40 ms link
    # short paths, a LAN, no RTT, sizing off: the lanes the caller asked for, never fewer
    assert start_lanes(0.020, cfg) == 4
    assert start_lanes(0.0002, cfg, capacity=1e10) == 4
    assert start_lanes(None, cfg) == 4
    # loss-based lanes, the capacity measured (a warm-up opened every lane): all of them, loss not yet known
    cubic = ControllerConfig(initial_lanes=4, max_lanes=32, congestion="cubic")
    assert start_lanes(0.020, cubic, capacity=48e6) == 32
    assert start_lanes(0.020, cubic) == 4  # (capacity unknown: the lanes grow while goodput does)
    assert start_lanes(0.0002, cubic, capacity=48e6) == 4  # (a LAN: never)
    assert start_lanes(0.020, cfg, capacity=48e6) == 4  # (BBR: its window rule)
    assert start_lanes(0.080, replace(cfg, start_rate=None)) == 4
    assert start_lanes(0.020, replace(cfg, initial_lanes=12)) == 12
    assert start_lanes(0.080, replace(cfg, max_lanes=8)) == 8
    with pytest.raises(ValueError):
        ControllerConfig(start_rate=0)
    # the controller's own lane rule agrees: measuring the start rate asks for no other count
    st = initial_state(cfg, lanes=start_lanes(0.080, cfg))
    assert st.decision.lanes == 10 and st.mode is Mode.PROBE
    assert window_lanes(125e6, 0.080, cfg.lane_window) == 10


def test_lanes_far_below_the_capacity_while_busy_are_re_probed_but_not_over_a_request_gap() -> None:
    """BBR lanes that deliver under half the capacity with work queued, no queue and no pacing limit have
    low bandwidth estimates of their own (after a stall): re-probe. The same low goodput averaged over a
    window holding an idle gap between two requests (lanes busy 65 % of it) is not a slow link: re-probing
    there restarted every lane into STARTUP as the next request's burst began (the burst row's queue)."""
    cfg = ControllerConfig(initial_lanes=4, max_lanes=4, queue_persist=0.0)
    st = cruising(cfg)
    t = 1.0 + cfg.settle + cfg.judge_after + 0.1
    gap = decide(st, ls(t, 0.4 * C, busy=0.65, capacity=C), cfg)
    assert gap.mode is Mode.CRUISE and not gap.decision.restart, gap.decision
    busy = decide(st, ls(t, 0.4 * C, busy=1.0, capacity=C), cfg)  # the negative control: really underused
    assert busy.mode is Mode.PROBE and busy.decision.restart, busy.decision


def test_an_up_probe_that_overflows_a_shallow_queue_ends_at_once() -> None:
    """On 80 ms with a 20 ms drop-tail queue the queueing ratio tops out at 1.25, under drain_ratio: an
    up-probe above the link never reads "a queue" and ran its whole upprobe_time dropping packets (the
    stream row, after a warm-up that read the link at 108 %: cruising at 107 % and up-probing to 119 %
    for 0.5 s every 3 s). Overflowing (the queue at its top and congestive loss) ends it and drains; the
    same ratio without the loss does not."""
    cfg = CFG
    st = cruising(cfg)
    assert st.changed_at is not None
    up = decide(st, ls(st.changed_at + cfg.upprobe_interval + 0.01, PACE * C, capacity=C), cfg)
    assert up.mode is Mode.UPPROBE and up.changed_at is not None
    t = up.changed_at + 0.1  # well inside upprobe_time
    full = replace(ls(t, C, q=1.25, loss=0.03, capacity=C, min_rtt=0.08), overflowing=True)
    over = decide(up, full, cfg)
    assert over.mode is Mode.DRAIN and over.decision.total_pacing is not None
    assert over.decision.total_pacing < C, over.decision
    standing = decide(up, replace(full, overflowing=False, loss_rate=0.0), cfg)  # the negative control
    assert standing.mode is Mode.UPPROBE, standing.decision


def test_lanes_busy_with_nothing_queued_are_not_re_probed() -> None:
    """A prefill writing layers at half the link's rate keeps every lane busy (TCP counts data in flight,
    and a chunk a round trip keeps some in flight) at half the capacity, with the lanes' sockets empty half
    the time: the sender, not BBR, is what is slow. Re-probing there went unpaced mid-request and overflowed
    the queue (the stream row). With work queued in every sample it is the lanes: re-probe."""
    cfg = ControllerConfig(initial_lanes=4, max_lanes=4, queue_persist=0.0)
    st = cruising(cfg)
    t = 1.0 + cfg.settle + cfg.judge_after + 0.1
    streaming = decide(st, replace(ls(t, 0.45 * C, busy=1.0, capacity=C), unqueued=0.5), cfg)
    assert streaming.mode is Mode.CRUISE and not streaming.decision.restart, streaming.decision
    queued = decide(st, replace(ls(t, 0.45 * C, busy=1.0, capacity=C), unqueued=0.05), cfg)  # the negative control
    assert queued.mode is Mode.PROBE and queued.decision.restart, queued.decision


def test_an_estimate_below_what_the_lanes_delivered_unpaced_is_probed_back_to_it_once() -> None:
    """The probe saw the lanes deliver 2 x C unpaced, but a false queue (host delay) set the capacity to C:
    cruising pacing-limited with no queue, the controller up-probes straight back to 2 x C after settle
    (not 10 % every upprobe_clear); if that fills a queue, 2 x C is forgotten and the steps are the usual."""
    cfg = CFG
    st = feed(initial_state(cfg), cfg, [ls(0.0, 0.0), ls(0.6, 2 * C), ls(1.0, C, btl_bw=2 * C, q=2.0, capacity=C)])
    assert st.mode is Mode.CRUISE and st.delivered == 2 * C
    pl = replace(ls(1.0 + cfg.settle + 0.01, PACE * C, capacity=C), pacing_limited=True)
    up = decide(st, pl, cfg)
    assert up.mode is Mode.UPPROBE and up.decision.total_pacing == int(2 * C) // 4 * 4, up.decision
    assert up.delivered is None  # once
    assert up.changed_at is not None
    full = decide(up, ls(up.changed_at + 0.1, 1.2 * C, q=1.5, capacity=1.2 * C), cfg)
    assert full.mode is Mode.DRAIN
    # the negative control: without the unpaced evidence (delivered == the capacity), the usual 1.5 s wait
    st2 = replace(st, delivered=C)
    assert decide(st2, pl, cfg).mode is Mode.CRUISE


def test_an_estimate_that_fell_in_one_step_is_probed_back_to_once_a_gradual_fall_is_not() -> None:
    """A host stall reads as a queue with little acked: the estimate falls by half in one step. Once the
    drain is over and the lanes cruise at their cap with no queue, one up-probe goes back to the estimate
    from before the fall (a real drop fills the queue at once and is then believed)."""
    cfg = CFG
    st = cruising(cfg)
    st = decide(st, ls(1.5, 0.5 * C, q=2.0, capacity=0.5 * C), cfg)
    assert st.mode is Mode.DRAIN and st.delivered == C
    st = decide(st, ls(1.7, 0.5 * C, q=1.0, capacity=0.5 * C), cfg)
    assert st.mode is Mode.CRUISE
    up = decide(st, replace(ls(1.7 + cfg.settle + 0.01, 0.49 * C, capacity=0.5 * C), pacing_limited=True), cfg)
    assert up.mode is Mode.UPPROBE and up.decision.total_pacing == int(C) // 4 * 4, up.decision
    # the negative control: the same fall in steps of a fifth each is followed, not probed back to (nor to
    # the start's unpaced delivery, forgotten here): the usual up-probe wait and step follow
    st = replace(cruising(cfg), delivered=None)
    t, c = 1.5, C
    while c > 0.55 * C:
        c *= 0.8
        st = decide(st, ls(t, c, capacity=c), cfg)
        t += 0.1
    assert st.delivered is None
    slow = decide(st, replace(ls(t + cfg.settle, 0.99 * c, capacity=c), pacing_limited=True), cfg)
    assert slow.mode is Mode.CRUISE, slow.decision


def _bbr_bandwidth(sock: socket.socket) -> int:
    """The kernel BBR's bandwidth estimate of ``sock`` (``TCP_CC_INFO``'s ``tcp_bbr_info``, bytes/s): 0 right
    after its algorithm (re)started, before an ACK brings a delivery-rate sample."""
    lo, hi = struct.unpack_from("=2I", sock.getsockopt(socket.IPPROTO_TCP, TCP_CC_INFO, 20))
    return hi << 32 | lo


class _BbrPair:
    """A loopback connection whose sending end ``c`` runs BBR, a thread draining the other end, and
    ``traffic()``: 32 MB sent and all of it ACKed (the kernel's bandwidth estimate is a real sample again,
    and no ACK can bring one between a restart and the reading after it)."""

    def __init__(self) -> None:
        self.srv = socket.create_server(("127.0.0.1", 0))
        self.c = socket.create_connection(self.srv.getsockname())
        self.peer, _ = self.srv.accept()
        self.stop = threading.Event()
        self.reader = threading.Thread(target=self._sink, daemon=True)
        self.reader.start()
        set_congestion(self.c, "bbr")

    def _sink(self) -> None:
        while not self.stop.is_set() and self.peer.recv(1 << 20):
            pass

    def traffic(self) -> None:
        block = bytes(1 << 20)
        for _ in range(32):
            self.c.sendall(block)
        assert wait_until(lambda: not (read_tcp_info(self.c).unacked or read_tcp_info(self.c).notsent_bytes), 5)
        assert _bbr_bandwidth(self.c) > 0

    def close(self) -> None:
        self.stop.set()
        for s in (self.c, self.peer, self.srv):
            s.close()
        self.reader.join(5)


@pytest.fixture
def bbr() -> Iterator[_BbrPair]:
    p = _BbrPair()
    try:
        yield p
    finally:
        p.close()


def test_a_paced_bbr_lane_that_wakes_restarts_its_algorithm_once_per_min_rtt_refresh(bbr: _BbrPair) -> None:
    """``lane_busy`` (a lane picking up work after it waited) restarts a paced BBR lane's algorithm the first
    time and then once ``MIN_RTT_REFRESH`` has passed since, so its min RTT filter never ages into PROBE_RTT
    (4 packets for 200 ms) while it carries a layer: the kernel's bandwidth estimate reads 0 right after a
    restart and keeps its value otherwise. Negative control: an unpaced (probing) controller never restarts
    a lane (STARTUP there would double its rate)."""
    c = bbr.c
    fd = c.fileno()
    paced = LaneController(CFG, capacity=C)
    assert paced.decision.pacing_rate is not None and paced.decision.congestion == "bbr"
    probing = LaneController(CFG)
    assert probing.decision.pacing_rate is None
    bbr.traffic()
    probing.lane_busy(fd, 100.0, [c], sock=c)
    probing.lane_busy(fd, 100.0 + MIN_RTT_REFRESH, [c], sock=c)
    assert _bbr_bandwidth(c) > 0, "an unpaced lane was restarted"
    paced.lane_busy(fd, 100.0, [c], sock=c)  # first seen: restarted
    assert _bbr_bandwidth(c) == 0 and get_congestion(c) == "bbr"
    bbr.traffic()
    paced.lane_busy(fd, 100.0 + MIN_RTT_REFRESH / 2, [c], sock=c)
    assert _bbr_bandwidth(c) > 0, "restarted again before MIN_RTT_REFRESH"
    paced.lane_busy(fd, 100.0 + MIN_RTT_REFRESH, [c], sock=c)
    assert _bbr_bandwidth(c) == 0


def test_a_paced_bbr_lane_paced_far_under_its_cap_with_bytes_waiting_is_restarted_at_the_second_sample(
        bbr: _BbrPair) -> None:
    """``LaneController.on_state``: a paced BBR lane that holds bytes unsent while its kernel paces it under
    ``COLLAPSED_SHARE`` of its cap (BBR's own estimate fell far under the controller's rate) two samples running
    has its algorithm restarted (its bandwidth estimate reads 0 right after), at most every ``REVIVE_INTERVAL``.
    Negative controls: one such sample; a lane near its cap; one with nothing unsent; one at PROBE_RTT's 4
    packets; an unpaced (probing) controller."""
    from kvwire.congestion.controller import COLLAPSED_SHARE, REVIVE_INTERVAL
    from kvwire.congestion.estimator import LaneState

    c = bbr.c

    def lane(rate_share: float, notsent: int = 200_000, cwnd: int = 1000) -> LaneState:
        cap = 15_000_000
        return LaneState(lane=c.fileno(), goodput=0.0, srtt=0.08, min_rtt=0.08, cwnd_bytes=cwnd * 1448,
                         loss_rate=0.0, busy=1.0, rwnd_limited=0.0, sndbuf_limited=0.0, delivery_rate=None,
                         pacing_rate=int(rate_share * cap), max_pacing_rate=cap, notsent_bytes=notsent, ca_state=0)

    t = [100.0]

    def sample(ctl: LaneController, ln: LaneState) -> None:
        t[0] += 0.05
        ctl.on_state(replace(ls(t[0], C, capacity=C), lanes=(ln,)))

    bbr.traffic()
    paced = LaneController(CFG, sockets_provider=lambda: [c], capacity=C)
    assert paced.decision.pacing_rate is not None and paced.decision.congestion == "bbr"
    collapsed = COLLAPSED_SHARE / 2
    for ln in (lane(0.9), lane(collapsed, notsent=0), lane(collapsed, cwnd=4)):  # none of these, ever
        sample(paced, ln)
        sample(paced, ln)
        assert _bbr_bandwidth(c) > 0, ln
    sample(paced, lane(collapsed))
    assert _bbr_bandwidth(c) > 0, "restarted on one sample"
    sample(paced, lane(collapsed))
    assert _bbr_bandwidth(c) == 0 and get_congestion(c) == "bbr"
    bbr.traffic()
    sample(paced, lane(collapsed))
    sample(paced, lane(collapsed))
    assert _bbr_bandwidth(c) > 0, f"restarted again within {REVIVE_INTERVAL} s"
    t[0] += REVIVE_INTERVAL
    sample(paced, lane(collapsed))
    assert _bbr_bandwidth(c) == 0
    bbr.traffic()
    probing = LaneController(CFG, sockets_provider=lambda: [c])
    assert probing.decision.pacing_rate is None
    for _ in range(3):
        sample(probing, lane(collapsed))
    assert _bbr_bandwidth(c) > 0, "an unpaced lane was restarted"
