"""Lanes sized at session start from the handshake RTT and the send-buffer ceiling, on an emulated long path:
a default session over 80 ms opens the lanes that carry ``ControllerConfig.start_rate`` (1 Gbit/s) before its
first transfer, instead of 4 send buffers the window-bound rule would double one decision at a time, and
for a capacity it is handed when it starts over (``resume``); a session without a controller on the same
link keeps the 4 it asked for.

Needs root, iproute2 and iptables (skips with the reason otherwise). 100 Mbit/s keeps the emulator light.
"""

from __future__ import annotations

import numpy as np
import pytest

import kvwire
from kvwire.congestion.control import send_buffer_ceiling
from kvwire.congestion.controller import ControllerConfig, lane_window_for, start_lanes
from kvwire.testing.fixtures import load_fixture
from kvwire.testing.wan import WanLink, unavailable_reason

_REASON = unavailable_reason()
pytestmark = [pytest.mark.netns, pytest.mark.skipif(_REASON is not None, reason=_REASON or "")]

LAYOUT = load_fixture("tiny-qwen3-next")
REQ = kvwire.RequestSpec("r", 256, 256)


def test_a_long_path_starts_with_the_lanes_its_rtt_and_send_buffers_need() -> None:
    window = lane_window_for(send_buffer_ceiling(), ControllerConfig())
    expected = start_lanes(0.080, ControllerConfig(), lane_window=window)  # 10 with tcp_wmem max 4 MiB
    assert expected > 4, "this host's send buffers carry 1 Gbit/s over 80 ms in 4 lanes: nothing to show"
    with WanLink(rtt_ms=80, rate_mbit=100, realtime=True, seed=31) as link:
        with link.inside("server"):
            rx = kvwire.Receiver(link.server_addr, 0, allocator=lambda m: np.zeros(m.total_bytes, np.uint8))
        try:
            with link.inside("client"):
                plain = kvwire.connect(link.server_addr, rx.address[1], lanes=4, link_control=False)
                s = kvwire.connect(link.server_addr, rx.address[1], lanes=4, warm=False)  # (the start, unwarmed)
            try:
                assert plain.active_lanes == 4, "no controller: the lanes asked for"
                ctl = s.link_control
                assert ctl is not None
                # (the emulator may add a millisecond or two to the handshake's RTT: one lane more at most)
                assert expected <= s.active_lanes <= expected + 1 and s.active_lanes == ctl.decision.lanes
                assert "lanes for 1000 Mbit/s" in ctl.history[0][1].reason
                assert all(i.alive for i in s.lane_info())
                segs = kvwire.plan_segments(LAYOUT, REQ)
                with link.inside("client"):
                    h = s.send(LAYOUT, REQ)
                    h.write_all([np.full(x.nbytes, 5, np.uint8) for x in segs])
                    assert h.finish().result(30) is not None
                # started over from a measured capacity (what kvwire.probe hands it): sized for that rate
                with link.inside("client"):
                    ctl.resume(capacity=250e6)  # 2 Gbit/s over 80 ms: 19 lanes' windows, capped at 16
                assert s.active_lanes == ctl.decision.lanes == 16 and ctl.decision.total_pacing is not None
                assert sum(i.alive and i.active for i in s.lane_info()) == 16
            finally:
                s.close()
                plain.close()
        finally:
            rx.close()
