"""LaneController policy (pure, on synthetic LinkStates) and its actuator (on real sockets)."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from kvwire.congestion.controller import (
    ControllerConfig,
    ControllerState,
    Decision,
    LaneController,
    Mode,
    apply_decision,
    decide,
    initial_state,
    lanes_for,
)
from kvwire.congestion.estimator import LinkState
from kvwire.congestion.tcpinfo import get_congestion, get_pacing_rate


def ls(t: float, goodput: float, *, q: float = 1.0, loss: float = 0.0, busy: float = 1.0,
       btl_bw: float | None = None, capacity: float | None = None, rwnd: float = 0.0) -> LinkState:
    return LinkState(timestamp=t, goodput=goodput, btl_bw=goodput if btl_bw is None else btl_bw,
                     capacity=capacity, utilization=None, available_bw=None, min_rtt=0.02, srtt=0.02 * q,
                     queueing_ratio=q, loss_rate=loss, busy=busy, rwnd_limited=rwnd, sndbuf_limited=0.0,
                     congested=False, saturated=False)


def feed(st: ControllerState, cfg: ControllerConfig, states: list[LinkState]) -> ControllerState:
    for s in states:
        st = decide(st, s, cfg)
    return st


CFG = ControllerConfig(initial_lanes=2, max_lanes=16, settle=1.0, flat_steps=2, probe_interval=4.0)


def test_holds_until_settled_and_while_app_limited() -> None:
    st = feed(initial_state(CFG), CFG, [ls(0.0, 0.0), ls(0.5, 50e6)])
    assert st.decision.lanes == 2 and st.mode is Mode.STARTUP  # 0.5 s < settle
    st = decide(st, ls(1.5, 50e6, busy=0.1), CFG)
    assert st.decision.lanes == 2  # idle lanes say nothing about the link


def test_startup_doubles_while_goodput_grows_then_undoes_useless_doubling() -> None:
    st = feed(initial_state(CFG), CFG, [ls(0.0, 10e6), ls(1.1, 20e6)])
    assert st.decision.lanes == 4 and st.mode is Mode.STARTUP
    st = decide(st, ls(2.2, 40e6), CFG)
    assert st.decision.lanes == 8
    # the link is full at 40: doubling to 8 lanes brings nothing
    st = feed(st, CFG, [ls(3.3, 41e6), ls(3.4, 40e6)])
    assert st.mode is Mode.CRUISE and st.decision.lanes == 4
    assert st.decision.pacing_rate is None


def test_startup_stops_at_max_lanes_and_when_receiver_bound() -> None:
    cfg = ControllerConfig(initial_lanes=4, max_lanes=6, settle=1.0)
    st = feed(initial_state(cfg), cfg, [ls(0.0, 10e6), ls(1.1, 20e6)])
    assert st.decision.lanes == 6
    st = decide(st, ls(2.2, 40e6), cfg)
    assert st.decision.lanes == 6 and st.mode is Mode.CRUISE
    st = feed(initial_state(cfg), cfg, [ls(0.0, 10e6), ls(1.1, 20e6, rwnd=0.8)])
    assert st.decision.lanes == 4 and st.mode is Mode.CRUISE


def test_queue_inflation_backs_off_and_paces_below_btl_bw() -> None:
    st = feed(initial_state(CFG), CFG, [ls(0.0, 10e6), ls(1.1, 11e6), ls(1.2, 11e6)])
    assert st.mode is Mode.CRUISE and st.decision.lanes == 2
    st = decide(st, ls(2.5, 50e6, q=2.5, btl_bw=50e6), CFG)
    assert st.mode is Mode.BACKOFF and st.decision.lanes == 1
    assert st.decision.pacing_rate == int(0.9 * 50e6 / 1)
    assert "queueing ratio" in st.decision.reason
    # with the queue drained it cruises on, paced, then probes the pacing up by 25%
    st = decide(st, ls(3.6, 45e6, q=1.05), CFG)
    assert st.mode is Mode.CRUISE and st.decision.pacing_rate == int(0.9 * 50e6)
    st = decide(st, ls(6.4, 45e6, q=1.05), CFG)
    assert st.decision.pacing_rate == int(0.9 * 50e6)  # probe_interval not reached
    st = decide(st, ls(7.0, 45e6, q=1.05), CFG)
    assert st.decision.pacing_rate == int(int(0.9 * 50e6) * 1.25)
    # that probe inflated the queue: it is undone, nothing more
    st = decide(st, ls(8.1, 46e6, q=1.6), CFG)
    assert st.mode is Mode.BACKOFF and st.decision.pacing_rate == int(0.9 * 50e6) and st.decision.lanes == 1


def test_rising_loss_with_flat_goodput_backs_off_but_steady_random_loss_does_not() -> None:
    cfg = ControllerConfig(initial_lanes=4, settle=1.0, flat_steps=1, probe_interval=100.0)
    st = feed(initial_state(cfg), cfg, [ls(0.0, 20e6, loss=0.002), ls(1.1, 21e6, loss=0.002)])
    assert st.mode is Mode.CRUISE and st.decision.lanes == 4
    st = feed(st, cfg, [ls(2.2 + i, 21e6, loss=0.002) for i in range(5)])
    assert st.mode is Mode.CRUISE and st.decision.lanes == 4  # random loss at its baseline: no reaction
    st = decide(st, ls(8.0, 21e6, loss=0.01), cfg)
    assert st.mode is Mode.BACKOFF and st.decision.lanes == 3 and "loss" in st.decision.reason


def test_cruise_probe_keeps_lanes_that_pay_and_reverts_those_that_do_not() -> None:
    cfg = ControllerConfig(initial_lanes=4, settle=1.0, flat_steps=1, probe_interval=2.0)
    st = feed(initial_state(cfg), cfg, [ls(0.0, 20e6), ls(1.1, 21e6)])
    assert st.mode is Mode.CRUISE and st.decision.lanes == 4
    st = decide(st, ls(3.2, 21e6), cfg)
    assert st.decision.lanes == 5 and st.decision.reason == "probe: more lanes"
    st = decide(st, ls(4.3, 21e6), cfg)
    assert st.decision.lanes == 4 and st.decision.reason == "probe reverted"
    st = decide(st, ls(6.4, 21e6), cfg)
    assert st.decision.lanes == 5
    st = decide(st, ls(7.5, 30e6), cfg)
    assert st.decision.lanes == 5 and st.decision.reason == "probe kept"


def test_polite_mode_paces_to_a_fair_share_with_cubic() -> None:
    cfg = ControllerConfig(initial_lanes=4, polite_share=0.5)
    st = initial_state(cfg)
    assert st.mode is Mode.POLITE and st.decision.congestion == "cubic"
    st = feed(st, cfg, [ls(0.0, 80e6), ls(1.1, 80e6, capacity=100e6)])
    assert st.decision.pacing_rate == int(0.5 * 100e6 / 4) and st.decision.lanes == 4
    st = decide(st, ls(2.2, 80e6, q=3.0, btl_bw=60e6), cfg)  # no capacity known: share of BtlBw
    assert st.decision.pacing_rate == int(0.5 * 60e6 / 4) and st.mode is Mode.POLITE


def test_non_congestive_loss_switches_to_the_lossy_algorithm() -> None:
    cfg = ControllerConfig(initial_lanes=4, settle=1.0, congestion="cubic", lossy_congestion="bbr")
    st = feed(initial_state(cfg), cfg, [ls(0.0, 10e6, loss=0.002), ls(1.1, 20e6, loss=0.002)])
    assert st.decision.congestion == "bbr"
    cfg2 = ControllerConfig(initial_lanes=4, settle=1.0, congestion="cubic", lossy_congestion="bbr")
    st2 = feed(initial_state(cfg2), cfg2, [ls(0.0, 10e6), ls(1.1, 20e6)])
    assert st2.decision.congestion == "cubic"  # no loss: configured algorithm


def test_lanes_stay_within_bounds_under_long_pressure() -> None:
    cfg = ControllerConfig(min_lanes=2, initial_lanes=4, settle=1.0)
    st = feed(initial_state(cfg), cfg, [ls(float(i) * 1.1, 20e6, q=3.0) for i in range(20)])
    assert st.decision.lanes == 2 and st.decision.pacing_rate is not None and st.decision.pacing_rate > 0


def test_config_validation_and_start_lanes() -> None:
    with pytest.raises(ValueError):
        ControllerConfig(min_lanes=4, initial_lanes=2)
    with pytest.raises(ValueError):
        ControllerConfig(polite_share=1.5)
    cfg = ControllerConfig(max_lanes=16)
    assert lanes_for(1e6, 4e6, cfg) == 4
    assert lanes_for(37.5e6, 4 * 2**20, cfg) == 9
    assert lanes_for(1e9, 1e6, cfg) == 16


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    srv = socket.create_server(("127.0.0.1", 0))
    cli = socket.create_connection(srv.getsockname())
    acc, _ = srv.accept()
    srv.close()
    try:
        yield cli, acc
    finally:
        cli.close()
        acc.close()


def test_actuator_sets_pacing_and_algorithm(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    dead = socket.socket()
    dead.close()
    failed = apply_decision(Decision(2, 5_000_000, "reno", Mode.BACKOFF, "test"), [a, b, dead])
    assert [s for s, _ in failed] == [dead]
    assert get_pacing_rate(a) == get_pacing_rate(b) == 5_000_000
    assert get_congestion(a) == get_congestion(b) == "reno"
    apply_decision(Decision(2, None, None, Mode.CRUISE, "test"), [a])
    assert get_pacing_rate(a) is None and get_congestion(a) == "reno"


def test_lane_controller_drives_sockets_and_lane_hook(pair: tuple[socket.socket, socket.socket]) -> None:
    a, _ = pair
    wanted: list[int] = []
    ctl = LaneController(CFG, sockets_provider=lambda: [a], set_lanes=wanted.append)
    ctl.on_state(ls(0.0, 10e6))
    ctl.on_state(ls(1.1, 20e6))
    assert wanted == [4] and ctl.decision.lanes == 4
    ctl.on_state(ls(2.2, 20e6, q=2.0, btl_bw=20e6))  # the doubling filled a queue: undone
    assert wanted == [4, 2] and ctl.decision.mode is Mode.BACKOFF
    assert get_pacing_rate(a) is None
    ctl.on_state(ls(3.3, 20e6, q=2.0, btl_bw=20e6))  # still queueing: pace
    assert get_pacing_rate(a) == int(0.9 * 20e6 / 1) and wanted == [4, 2, 1]
    assert [d.lanes for d in ctl.history] == [2, 4, 2, 1]
