"""How the lanes are paced and sampled: the aggregate split over them (``kvwire.congestion.split``), pure
and on real sockets, and the sampling period of a probe (``control.sampling_interval``)."""

from __future__ import annotations

import socket
import time
from dataclasses import replace

import numpy as np

from kvwire import Receiver, RequestSpec, connect, load_layout, plan_segments
from kvwire.congestion.control import LinkControl, sampling_interval
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


def _tail(pair: tuple[socket.socket, socket.socket], events: bool = False) -> tuple[LaneController, int]:
    """Two paced lanes on real sockets; the sample at 1.1 s finds b done (idle)."""
    a, b = pair
    cfg = ControllerConfig(initial_lanes=2, min_lanes=1, max_lanes=2, queue_persist=0.0)
    ctl = LaneController(cfg, sockets_provider=lambda: [a, b], lane_events=events)
    busy = (lane(a.fileno(), busy=1.0, notsent=1 << 20), lane(b.fileno(), busy=1.0, notsent=1 << 20))
    ctl.on_state(link(0.0, capacity=None))
    ctl.on_state(link(0.5, busy, capacity=None))
    ctl.on_state(link(1.0, busy, q=2.0))
    assert ctl.decision.mode is Mode.CRUISE and ctl.decision.total_pacing is not None
    ctl.on_state(link(1.1, (busy[0], lane(b.fileno(), busy=0.0, notsent=0))))
    return ctl, ctl.decision.total_pacing


def test_a_lane_that_picks_up_work_gets_its_full_share_at_once(pair: tuple[socket.socket, socket.socket]) -> None:
    """A request's start: the lane idle at the last sample (at the reserve) picks up a chunk (``lane_busy``,
    the lane's event) and is paced at its even share from then on, not at the reserve until the next
    sample. A sample that covers the time it woke (it arrives late, or still reads the lane idle: its first
    chunk may not be written yet) does not take the share back; a later one that finds it idle again does.
    Negative control: without the event the lane keeps the reserve until a sample sees it busy."""
    a, b = pair
    ctl, total = _tail(pair)
    low = int(0.25 * (total // 2))
    assert get_pacing_rate(b) == low
    applied = ctl.applied
    assert not ctl.lane_busy(a.fileno(), 1.15, [a, b])  # a was sending: nothing to change, sockets untouched
    assert ctl.applied == applied
    assert ctl.lane_busy(b.fileno(), 1.15, [a, b])
    assert get_pacing_rate(a) == get_pacing_rate(b) == total // 2
    assert not ctl.lane_busy(b.fileno(), 1.16, [a, b])  # once
    stale = (lane(a.fileno(), busy=1.0, notsent=1 << 20), lane(b.fileno(), busy=0.0, notsent=0))
    ctl.on_state(link(1.14, stale))  # taken before b picked up its chunk
    assert get_pacing_rate(b) == total // 2
    ctl.on_state(link(1.3, stale))  # covers 1.14-1.3: b woke in it, so it was not idle all of it
    assert get_pacing_rate(b) == total // 2
    ctl.on_state(link(1.4, stale))  # b idle all of 1.3-1.4: done again
    assert get_pacing_rate(b) == low and get_pacing_rate(a) == total - low

    control, _ = _tail(pair)  # negative control: no event, the stale sample keeps b at the reserve
    control.on_state(link(1.14, stale))
    assert get_pacing_rate(b) == low


def test_lanes_that_say_when_they_wake_keep_an_even_share_while_idle(
        pair: tuple[socket.socket, socket.socket]) -> None:
    """With lane events, an idle lane is not lowered (a raised cap takes effect only as the lane's ACKs
    come back: held at the reserve, it would pace its next first round trip at a quarter); the lane still
    sending takes the whole aggregate, and is lowered back to an even share as the idle one wakes."""
    a, b = pair
    ctl, total = _tail(pair, events=True)
    assert get_pacing_rate(b) == total // 2 and get_pacing_rate(a) == total
    assert ctl.lane_busy(b.fileno(), 1.15, [a, b])
    assert get_pacing_rate(a) == get_pacing_rate(b) == total // 2
    assert lane_rates(1000, [1, 2, 3, 4], {2, 3, 4}, woken=True) == {1: 1000, 2: 250, 3: 250, 4: 250}
    assert lane_rates(1000, [1, 2, 3, 4], {3, 4}, woken=True) == {1: 500, 2: 500, 3: 250, 4: 250}


def test_link_control_takes_the_sessions_lane_busy_event(pair: tuple[socket.socket, socket.socket]) -> None:
    """``LinkControl`` hooks a session's ``on_lane_busy`` (a hook the session had runs after it, and is put
    back on close), and so splits with idle lanes kept at an even share; the lane's event re-splits the
    pacing the share caps, not the controller's own."""
    a, b = pair
    called: list[int] = []

    class Lanes:  # a session's hooks over the two real sockets
        on_lane_open = None

        def __init__(self) -> None:
            self.on_lane_busy = lambda i, s: called.append(i)

        def lane_sockets(self) -> list[socket.socket]:
            return [a, b]

        def set_active_lanes(self, n: int) -> int:
            return n

    session = Lanes()
    prior = session.on_lane_busy
    cfg = ControllerConfig(initial_lanes=2, min_lanes=1, max_lanes=2, queue_persist=0.0)
    ctl = LinkControl(session, cfg, capacity=C, start=False)
    try:
        assert session.on_lane_busy != prior
        total = ctl.decision.total_pacing
        assert total is not None
        ctl.shared_cap = total // 2  # (as the share sets it while another process sends)
        ctl.controller.apply(replace(ctl.decision, pacing_rate=ctl.shared_cap // 2), [a, b])
        now = time.monotonic()
        ctl.controller.on_state(link(now, (lane(a.fileno(), busy=1.0, notsent=1), lane(b.fileno(), busy=0.0,
                                                                                         notsent=0))))
        assert get_pacing_rate(b) == total // 2 and get_pacing_rate(a) == total  # (idle b is not lowered)
        session.on_lane_busy(7, b)
        assert called == [7]
        assert get_pacing_rate(a) == get_pacing_rate(b) == ctl.shared_cap // 2
    finally:
        ctl.close()
    assert session.on_lane_busy is prior


def test_a_sessions_lanes_say_when_they_pick_up_work_after_waiting(no_leaks: None) -> None:
    """The event's source, on a real session over loopback: each lane that carries chunks of a request
    sent after a pause raises ``on_lane_busy`` as it picks up its first chunk (on its own thread, with its
    socket), not once per chunk: ~100 chunks over 2 lanes raise it once per lane per request."""
    layout = load_layout("qwen3-next-80b-a3b")
    calls: list[tuple[float, int, int]] = []
    with Receiver() as rx, connect(*rx.address, lanes=2, chunk_size=64 * 1024, link_control=False) as s:
        s.on_lane_busy = lambda i, sock: calls.append((time.monotonic(), i, sock.fileno()))
        fds = {sk.fileno() for sk in s.lane_sockets()}
        for n in range(2):
            req = RequestSpec(f"busy-{n}", 256, 256)
            src = [np.full(sg.nbytes, n + 1, np.uint8) for sg in plan_segments(layout, req)]
            rx.expect(req.request_id, [np.zeros(a.nbytes, np.uint8) for a in src], layout=layout)
            time.sleep(0.2)  # the lanes wait for work
            before = {ln.index: ln.chunks_sent for ln in s.lane_info()}
            t0 = time.monotonic()
            h = s.send(layout, req)
            h.write_all(src)
            h.finish().result(20)
            sent = {ln.index: ln.chunks_sent - before[ln.index] for ln in s.lane_info()}
            mine = [(i, fd) for t, i, fd in calls if t >= t0]
            assert sum(sent.values()) >= 50
            assert sorted(i for i, _ in mine) == sorted(i for i, c in sent.items() if c), (mine, sent)
            assert {fd for _, fd in mine} <= fds
