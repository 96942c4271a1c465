"""How the lanes are paced and sampled: the aggregate split over them (``kvwire.congestion.split``), pure
and on real sockets, and the sampling period of a probe (``control.sampling_interval``)."""

from __future__ import annotations

import socket
from dataclasses import replace

from kvwire.congestion.control import sampling_interval
from kvwire.congestion.controller import ControllerConfig, Decision, LaneController, Mode
from kvwire.congestion.estimator import LaneState, LinkState
from kvwire.congestion.split import idle_lanes, lane_rates
from kvwire.sockopts import get_pacing_rate

C = 48e6  # bytes/s: 400 Mbit/s of payload, roughly


def lane(key: int, *, busy: float, notsent: int | None) -> LaneState:
    return LaneState(lane=key, goodput=0.0, srtt=0.02, min_rtt=0.02, cwnd_bytes=None, loss_rate=0.0, busy=busy,
                     rwnd_limited=0.0, sndbuf_limited=0.0, delivery_rate=None, pacing_rate=None,
                     max_pacing_rate=None, notsent_bytes=notsent, ca_state=0)


def link(t: float, lanes: tuple[LaneState, ...] = (), *, q: float = 1.0, capacity: float | None = C) -> LinkState:
    return LinkState(timestamp=t, goodput=C, btl_bw=C, capacity=capacity, utilization=None, available_bw=None,
                     min_rtt=0.02, srtt=0.02 * q, queueing_ratio=q, loss_rate=0.0, busy=1.0, rwnd_limited=0.0,
                     sndbuf_limited=0.0, congested=False, saturated=q >= 1.25, lanes=lanes)


def test_the_aggregate_is_split_evenly_until_some_lanes_are_done() -> None:
    assert lane_rates(1000, [1, 2, 3, 4], set()) == {1: 250, 2: 250, 3: 250, 4: 250}
    assert lane_rates(1000, [1, 2, 3, 4], {1, 2, 3, 4}) == {1: 250, 2: 250, 3: 250, 4: 250}  # between requests
    tail = lane_rates(1000, [1, 2, 3, 4], {2, 3, 4})
    assert tail[2] == tail[3] == tail[4] == 62 and tail[1] == 1000 - 3 * 62  # the idle lanes' shares move
    assert sum(tail.values()) <= 1000
    many = lane_rates(46_000_000, list(range(32)), set(range(2, 32)))
    assert sum(many.values()) <= 46_000_000 and many[0] == many[1] > 10 * 46_000_000 // 32
    assert lane_rates(3, [1, 2, 3, 4], {2}) == {1: 1, 2: 1, 3: 1, 4: 1}  # never 0 (0 would mean unpaced)
    assert lane_rates(1000, [], set()) == {}


def test_a_lane_is_idle_only_with_nothing_in_flight_all_interval_and_nothing_unsent() -> None:
    states = (lane(1, busy=0.0, notsent=0), lane(2, busy=0.4, notsent=0), lane(3, busy=0.0, notsent=4096),
              lane(4, busy=1.0, notsent=0), lane(5, busy=0.0, notsent=None))
    assert idle_lanes(link(1.0, states)) == {1}


def test_lanes_that_finished_a_request_give_their_pacing_to_the_lanes_still_sending(
        pair: tuple[socket.socket, socket.socket]) -> None:
    """A request's tail on real sockets: the lane still sending gets the idle one's share (the aggregate is
    unchanged); once both send again, the split is even again. Unpaced (PROBE), nothing is split."""
    a, b = pair
    fa, fb = a.fileno(), b.fileno()
    cfg = ControllerConfig(initial_lanes=2, min_lanes=1, max_lanes=2, queue_persist=0.0)
    ctl = LaneController(cfg, sockets_provider=lambda: [a, b])
    ctl.on_state(link(0.0, capacity=None))
    ctl.on_state(link(0.5, (lane(fa, busy=1.0, notsent=1), lane(fb, busy=0.0, notsent=0)), capacity=None))
    assert ctl.decision.mode is Mode.PROBE and get_pacing_rate(a) is None and get_pacing_rate(b) is None
    busy = (lane(fa, busy=1.0, notsent=1 << 20), lane(fb, busy=1.0, notsent=1 << 20))
    ctl.on_state(link(1.0, busy, q=2.0))
    total = ctl.decision.total_pacing
    assert ctl.decision.mode is Mode.CRUISE and total is not None
    assert get_pacing_rate(a) == get_pacing_rate(b) == total // 2
    ctl.on_state(link(1.1, (busy[0], lane(fb, busy=0.0, notsent=0))))  # b's part of the request is done
    low = int(0.25 * (total // 2))
    assert get_pacing_rate(b) == low and get_pacing_rate(a) == total - low
    ctl.on_state(link(1.2, busy))  # the next request: both send again
    assert get_pacing_rate(a) == get_pacing_rate(b) == total // 2
    ctl.on_state(link(1.3, tuple(replace(x, busy=0.0, notsent_bytes=0) for x in busy)))  # both done
    assert get_pacing_rate(a) == get_pacing_rate(b) == total // 2


def test_a_probe_with_no_capacity_on_a_wan_path_is_sampled_faster() -> None:
    """Lanes in STARTUP overflow a shallow queue within ~50 ms: until a capacity is known, the unpaced probe
    is sampled every ``probe_interval``; on a LAN, once a capacity is known, or once paced: ``interval``."""
    cfg = ControllerConfig()
    probe = Decision(4, None, "bbr", Mode.PROBE, "initial")
    wan = link(0.2, capacity=None)
    assert sampling_interval(probe, wan, cfg, 0.1, 0.025) == 0.025
    assert sampling_interval(probe, wan, cfg, 0.1, None) == 0.1  # turned off
    assert sampling_interval(probe, replace(wan, min_rtt=50e-6), cfg, 0.1, 0.025) == 0.1  # loopback
    assert sampling_interval(probe, replace(wan, min_rtt=None), cfg, 0.1, 0.025) == 0.1  # no RTT yet
    assert sampling_interval(probe, link(0.2), cfg, 0.1, 0.025) == 0.1  # capacity known
    paced = Decision(4, 10_000_000, "bbr", Mode.CRUISE, "paced")
    assert sampling_interval(paced, wan, cfg, 0.1, 0.025) == 0.1
