"""Congestion control is on by default for every session, can be turned off, configured or shared, and
stays hands off on loopback. Real sessions and receivers on 127.0.0.1."""

from __future__ import annotations

import os
import threading
import time

import numpy as np
import pytest
from helpers import wait_until

import kvwire
from kvwire import Receiver, RequestSpec, connect
from kvwire.congestion.control import LinkControl
from kvwire.congestion.controller import ControllerConfig, Mode
from kvwire.congestion.group import LaneGroup
from kvwire.probe import probe
from kvwire.sockopts import get_congestion, get_pacing_rate
from kvwire.testing.fixtures import load_fixture

LAYOUT = load_fixture("tiny-qwen3-next")
REQ = RequestSpec("r", 256, 256)


def _send(session: kvwire.Session) -> None:
    segs = kvwire.plan_segments(LAYOUT, REQ)
    h = session.send(LAYOUT, REQ)
    h.write_all([np.full(s.nbytes, 7, np.uint8) for s in segs])
    assert h.finish().result(30) is not None


def get_default_congestion() -> str:
    with open("/proc/sys/net/ipv4/tcp_congestion_control") as f:
        return f.read().strip()


def _monitors() -> int:
    return sum(1 for t in threading.enumerate() if t.name == "kvwire-linkmon")


@pytest.fixture
def rx() -> kvwire.Receiver:
    with Receiver("127.0.0.1", 0, allocator=lambda m: np.zeros(m.total_bytes, np.uint8)) as r:
        yield r


def test_connect_attaches_a_controller_that_starts_with_the_first_transfer(rx: kvwire.Receiver) -> None:
    before = _monitors()
    with connect(*rx.address, lanes=3) as s:
        ctl = s.link_control
        assert isinstance(ctl, LinkControl)
        assert ctl.config.initial_lanes == 3 and ctl.config.max_lanes == s.max_lanes
        assert _monitors() == before, "an idle session costs no thread"
        _send(s)
        assert _monitors() == before + 1 and wait_until(lambda: ctl.latest() is not None, 5)
        assert s.active_lanes == 3
    assert wait_until(lambda: _monitors() == before, 5), "closed with the session"
    assert s.link_control is None


def test_loopback_is_left_alone_unpaced(rx: kvwire.Receiver) -> None:
    with connect(*rx.address, lanes=2) as s:
        for _ in range(5):
            _send(s)
        ctl = s.link_control
        assert ctl is not None and wait_until(lambda: len(ctl.controller.history) >= 1 and ctl.latest() is not None, 5)
        assert ctl.decision.mode is Mode.PROBE and ctl.decision.pacing_rate is None
        assert all(get_pacing_rate(x) is None for x in s.lane_sockets())
        assert s.active_lanes == 2


def test_turned_off_configured_or_by_environment(rx: kvwire.Receiver, monkeypatch: pytest.MonkeyPatch) -> None:
    with connect(*rx.address, lanes=2, link_control=False) as s:
        assert s.link_control is None
        _send(s)
    cfg = ControllerConfig(initial_lanes=2, min_lanes=2, max_lanes=4, upprobe_interval=9.0)
    with connect(*rx.address, lanes=2, link_control=cfg) as s:
        assert s.link_control is not None and s.link_control.config is cfg
    monkeypatch.setenv("KVWIRE_LINK_CONTROL", "0")
    with connect(*rx.address, lanes=2) as s:
        assert s.link_control is None
    with pytest.raises(TypeError):
        connect(*rx.address, lanes=2, link_control="yes")  # type: ignore[arg-type]


def test_a_controller_config_with_more_lanes_lets_the_session_open_them(rx: kvwire.Receiver) -> None:
    """``link_control=ControllerConfig(max_lanes=32)`` (the issue's CUBIC row: loss-bound lanes need about
    capacity / Mathis rate of them) grows the session to 32 lanes; before, the session's own default
    ceiling of 16 held it ("wanted 32 lanes, 16 in effect"). An explicit ``max_lanes`` still wins."""
    cfg = ControllerConfig(congestion="cubic", max_lanes=32)
    with connect(*rx.address, lanes=4, link_control=cfg) as s:
        assert s.max_lanes == 32
        assert s.set_active_lanes(32) == 32 and len(s.lane_sockets()) == 32
        _send(s)
    with connect(*rx.address, lanes=4, link_control=cfg, max_lanes=8) as s:
        assert s.max_lanes == 8 and s.set_active_lanes(32) == 8
    with connect(*rx.address, lanes=4, link_control=ControllerConfig(max_lanes=8)) as s:
        assert s.max_lanes == 16  # (the default ceiling stays when the controller's is lower)


def test_one_controller_shared_by_sessions_through_a_lane_group(rx: kvwire.Receiver) -> None:
    group = LaneGroup()
    egress = LinkControl(group, ControllerConfig(initial_lanes=2, min_lanes=2))
    try:
        with connect(*rx.address, lanes=2, link_control=group) as a, connect(*rx.address, lanes=2) as b:
            assert a.link_control is None and group.members == [a]
            group.add(b)  # a session with its own default controller hands it over on joining
            assert b.link_control is None and group.members == [a, b]
            _send(a)
            _send(b)
        # a session that joined through link_control=group leaves it as it closes; one added by hand stays
        # until removed by hand (as LaneGroup always worked)
        assert len(group.members) == 1 and group.members[0] is b
    finally:
        egress.close()


def test_an_explicit_link_control_replaces_the_default_and_keeps_the_users_lane_hook(
        rx: kvwire.Receiver) -> None:
    opened: list[int] = []
    with connect(*rx.address, lanes=2, on_lane_open=lambda i, sock: opened.append(i)) as s:
        assert s.link_control is not None
        ctl = LinkControl(s, ControllerConfig(initial_lanes=2, min_lanes=2, max_lanes=4))
        try:
            assert s.link_control is None, "one controller per session"
            s.set_active_lanes(3)  # a new lane: the controller paces it, then the user's hook runs
            assert opened[-1] == 2
        finally:
            ctl.close()
        assert s.on_lane_open is not None and s.on_lane_open != ctl._on_lane_open  # noqa: SLF001


def test_lane_hooks_the_user_sets_after_connect_run_after_the_controllers_and_never_replace_them(
        rx: kvwire.Receiver) -> None:
    """The session's controller has its hooks in a slot of their own (``Session.set_control_hooks``):
    assigning ``on_lane_open`` / ``on_lane_busy`` after ``connect()`` adds the user's, run after the
    controller's. A lane opened afterwards gets the controller's algorithm (reno here, not the system's
    default) before the user's hook sees it; once the controller closes, the user's hooks alone remain."""
    opened: list[tuple[int, str]] = []
    woke: list[int] = []
    cfg = ControllerConfig(initial_lanes=2, min_lanes=2, max_lanes=4, congestion="reno")
    with connect(*rx.address, lanes=2, link_control=cfg) as s:
        ctl = s.link_control
        assert ctl is not None and get_default_congestion() != "reno"
        s.on_lane_open = lambda i, sock: opened.append((i, get_congestion(sock)))
        s.on_lane_busy = lambda i, sock: woke.append(i)
        assert s.set_active_lanes(3) == 3
        assert opened == [(2, "reno")], "the controller's hook ran first, then the user's"
        assert s.control_hooks == (ctl._on_lane_open, ctl._on_lane_busy)  # noqa: SLF001
        seen: list[int] = []
        busy = ctl.controller.lane_busy  # (the controller's own handler of the event, wrapped to see it run)
        ctl.controller.lane_busy = (  # type: ignore[method-assign]
            lambda fd, *a, **kw: seen.append(fd) or busy(fd, *a, **kw))
        _send(s)
        assert woke and seen, "a waking lane runs the controller's busy hook and the user's"
        s.detach_link_control()
        assert s.control_hooks == (None, None) and s.on_lane_open is not None and s.on_lane_busy is not None
        assert s.set_active_lanes(4) == 4
        assert opened[-1] == (3, get_default_congestion())  # no controller any more: the user's hook alone


def test_probe_pauses_the_sessions_controller_and_restarts_it_from_the_result() -> None:
    with Receiver("127.0.0.1", 0, max_probe_bytes=64 << 20) as rx, connect(*rx.address, lanes=2) as s:
        ctl = s.link_control
        assert ctl is not None
        before = len(ctl.controller.history)
        r = probe(s, seconds=0.3)
        assert r.bytes_sent > 0
        assert len(ctl.controller.history) == before + 1  # started over
        assert ctl.decision.mode is (Mode.CRUISE if r.saturated else Mode.PROBE)


def test_controllers_of_one_destination_join_one_share(rx: kvwire.Receiver, monkeypatch: pytest.MonkeyPatch) -> None:
    """Processes on this host sending to one host split the path through a LinkShare (two sessions of one
    process stand in for two processes here: the records are files, per controller)."""
    # a share of this test's own: other processes on this machine sending to 127.0.0.1 would join the
    # default one (as they should: they share that path)
    monkeypatch.setenv("KVWIRE_LINK_SHARE", f"test-{os.getpid()}-{time.monotonic_ns()}")
    with connect(*rx.address, lanes=2) as a, connect(*rx.address, lanes=2) as b:
        ca, cb = a.link_control, b.link_control
        assert ca is not None and cb is not None and ca.share is not None and cb.share is not None
        assert ca.share.dir == cb.share.dir
        _send(a)
        _send(b)
        assert wait_until(lambda: len(ca.share.others()) == 1 and len(cb.share.others()) == 1, 5)
        # on loopback nothing is measured: no capacity, so the share caps nothing
        assert ca.shared_cap is None and all(get_pacing_rate(x) is None for x in a.lane_sockets())
    assert not ca.share.others() and not cb.share.others(), "records removed as the sessions close"
    monkeypatch.setenv("KVWIRE_LINK_SHARE", "off")
    with connect(*rx.address, lanes=2) as c:
        assert c.link_control is not None and c.link_control.share is None
