"""Warming a session on an emulated long path (``connect(warm=None)``, the default): the session's lanes
leave ``connect`` with their congestion windows open and its controller pacing at the measured capacity;
``warm=False`` on the same link leaves them at the initial window (the negative control); a receiver that
takes no probes is skipped without error; the first transfer after a warm connect arrives byte-exact.

Needs root, iproute2 and iptables (skips with the reason otherwise). 200 Mbit/s, 60 ms keeps the emulator
light; run under the WAN lock (``flock /tmp/kvwire-wan.lock``) beside other emulated-link runs.
"""

from __future__ import annotations

import statistics

import numpy as np
import pytest
from helpers import payload, send_verified

import kvwire
from kvwire.codec import parity
from kvwire.congestion.controller import ControllerConfig, Mode
from kvwire.congestion.tcpinfo import read_tcp_info
from kvwire.probe import WARM_MIN_RTT, ProbeResult, path_rtt, warm_skip_reason
from kvwire.tcp import LONG_PATH_RTT
from kvwire.tcp._sender import AUTO_TAIL_PARITY
from kvwire.testing.fixtures import load_fixture
from kvwire.testing.wan import WanLink, unavailable_reason

_REASON = unavailable_reason()
pytestmark = [pytest.mark.netns, pytest.mark.skipif(_REASON is not None, reason=_REASON or "")]

RATE_MBIT, RTT_MS = 200, 60
BDP_PACKETS = RATE_MBIT * 1e6 / 8 * RTT_MS / 1e3 / 1448  # ~1036
LAYOUT = load_fixture("tiny-qwen3-next")


def _cwnds(s: kvwire.Session) -> list[int]:
    return [read_tcp_info(x).snd_cwnd or 0 for x in s.lane_sockets()]


def test_a_long_path_session_is_warm_after_connect_and_warm_false_is_not() -> None:
    req = kvwire.RequestSpec("first", 4096, 4096)
    src = payload(LAYOUT, req, seed=3)
    dst = np.zeros(sum(a.nbytes for a in src), np.uint8)
    with WanLink(rtt_ms=RTT_MS, rate_mbit=RATE_MBIT, queue_bytes=int(RATE_MBIT * 1e6 / 8 * 0.02), realtime=True,
                 seed=41) as link:
        with link.inside("server"):
            rx = kvwire.Receiver(link.server_addr, 0, key="k")
            refusing = kvwire.Receiver(link.server_addr, 0, key="k", max_probe_bytes=0)
        try:
            with link.inside("client"):
                cold = kvwire.connect(link.server_addr, rx.address[1], key="k", warm=False)
                warm = kvwire.connect(link.server_addr, rx.address[1], key="k")
                skipped = kvwire.connect(link.server_addr, refusing.address[1], key="k")
            try:
                # negative control: the same link, no warm-up: every lane at the initial window
                assert cold.warmup is None and max(_cwnds(cold)) <= 20, _cwnds(cold)
                assert skipped.warmup is None and not skipped.closed  # no probes taken: skipped, not an error
                w = warm.warmup
                assert isinstance(w, ProbeResult), "auto warm-up on a 60 ms path"
                assert w.bytes_sent > 0 and w.drained and w.min_rtt is not None and w.min_rtt >= 0.05
                assert w.seconds <= 1.0 + 0.2
                cw = _cwnds(warm)
                # right after connect: the windows the burst opened, well above the initial 10 packets
                assert statistics.median(cw) >= 30 and sum(cw) >= BDP_PACKETS / 2, cw
                ctl = warm.link_control
                assert ctl is not None
                # the pipe was seen full within the burst: the controller starts paced at what was measured
                assert w.measured and w.stopped_full
                assert ctl.decision.mode is Mode.CRUISE and ctl.decision.total_pacing is not None
                assert 0.5 * RATE_MBIT < w.capacity * 8e-6 < 1.2 * RATE_MBIT
                h_rx = rx.expect(req.request_id, dst, layout=LAYOUT)
                with link.inside("client"):
                    h = warm.send(LAYOUT, req)
                    h.write_all(src)
                    assert h.finish().result(30) is not None
                h_rx.result(10)
            finally:
                for s in (cold, warm, skipped):
                    s.close()
        finally:
            rx.close()
            refusing.close()
    assert dst.tobytes() == b"".join(a.tobytes() for a in src)


@pytest.mark.parametrize("rtt_ms", [10, 20])
def test_the_auto_threshold_sits_between_a_metro_and_a_cross_region_link(rtt_ms: int) -> None:
    """``warm=None`` warms a 20 ms path every time and leaves a 10 ms one cold every time: the handshake RTT of
    either reads a few tenths of a ms off its nominal value, and ``WARM_MIN_RTT`` is several ms from both
    (at 20 ms itself, the 20 ms emulated links flipped between warmed and not run to run)."""
    with WanLink(rtt_ms=rtt_ms, rate_mbit=RATE_MBIT, queue_bytes=int(RATE_MBIT * 1e6 / 8 * 0.02), realtime=True,
                 seed=43) as link:
        with link.inside("server"):
            rx = kvwire.Receiver(link.server_addr, 0, key="k")
        try:
            with link.inside("client"):
                s = kvwire.connect(link.server_addr, rx.address[1], key="k")
            try:
                rtt = path_rtt(s)
                assert rtt is not None and abs(rtt * 1e3 - rtt_ms) < 1.5, rtt
                assert abs(rtt - WARM_MIN_RTT) > 0.003  # (the reading's spread is far below this margin)
                assert (s.warmup is not None) == (rtt_ms >= 20), (rtt, warm_skip_reason(s))
                # the same threshold opens every lane the controller may use at connect (LONG_PATH_RTT), and
                # turns tail parity on where zfec is installed
                assert len(s.lane_info()) == (s.max_lanes if rtt_ms >= 20 else 4)
                auto = AUTO_TAIL_PARITY if parity.available() else 0
                assert s.tail_parity == (auto if rtt_ms >= 20 else 0)
            finally:
                s.close()
        finally:
            rx.close()


def test_a_long_path_session_opens_every_lane_its_controller_may_use_in_one_dial_round() -> None:
    """On a path of ``LONG_PATH_RTT`` or more, a session with a controller of its own dials all of its
    ``max_lanes`` with the first ones (each later dial round costs three round trips, on whichever thread
    asked: the controller's, a warm-up's) and parks those past the controller's start count; growing to
    them afterwards opens no socket. Negative controls: without a controller, or with a ``ControllerConfig``
    of at most 4 lanes, the session opens the lanes asked for."""
    with WanLink(rtt_ms=RTT_MS, rate_mbit=RATE_MBIT, queue_bytes=int(RATE_MBIT * 1e6 / 8 * 0.02), realtime=True,
                 seed=44) as link:
        with link.inside("server"):
            rx = kvwire.Receiver(link.server_addr, 0, key="k")
        port = rx.address[1]
        sessions: list[kvwire.Session] = []
        try:
            with link.inside("client"):
                wide = kvwire.connect(link.server_addr, port, key="k", warm=False)
                plain = kvwire.connect(link.server_addr, port, key="k", warm=False, link_control=False)
                small = kvwire.connect(link.server_addr, port, key="k", warm=False,
                                       link_control=ControllerConfig(max_lanes=4))
            sessions += [wide, plain, small]
            infos = wide.lane_info()
            assert path_rtt(wide) is not None and path_rtt(wide) >= LONG_PATH_RTT
            assert len(infos) == wide.max_lanes == 16 and all(i.alive for i in infos)
            ctl = wide.link_control
            assert ctl is not None and 4 <= wide.active_lanes == ctl.decision.lanes < 16, ctl.decision
            assert [i.index for i in infos if i.active] == list(range(wide.active_lanes))  # the rest parked
            assert len(wide.lane_sockets()) == wide.active_lanes  # (what the controller samples and paces)
            socks = [i.sock for i in infos]
            with link.inside("client"):
                assert wide.set_active_lanes(16) == 16
            assert [i.sock for i in wide.lane_info()] == socks and all(i.active for i in wide.lane_info())
            assert [len(s.lane_info()) for s in (plain, small)] == [4, 4]
            assert plain.link_control is None and small.link_control is not None
            # the parked lanes carry data like the others once active
            with link.inside("client"):
                send_verified(rx, wide, LAYOUT, kvwire.RequestSpec("wide", 512, 512), seed=5, timeout=30)
        finally:
            for s in sessions:
                s.close()
            rx.close()
