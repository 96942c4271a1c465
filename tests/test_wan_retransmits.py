"""A session's retransmit count (``Session.stats()["retransmits"]``, the metric
``kvwire_retransmitted_segments_total``) on an emulated lossy link: it counts every lane the session
opened, and keeps what a lane's socket retransmitted after the lane is closed (re-dialled after a failure,
or the session closed), where the kernel's own count goes with the socket — the negative control reads
the live sockets' ``TCP_INFO`` and loses it.

Needs root, iproute2 and iptables (skips with the reason otherwise); run under the WAN lock
(``flock /tmp/kvwire-wan.lock``) beside other emulated-link runs.
"""

from __future__ import annotations

import socket

import pytest
from helpers import wait_until

import kvwire
from kvwire.congestion.tcpinfo import try_read
from kvwire.probe import probe
from kvwire.testing.wan import WanLink, unavailable_reason

_REASON = unavailable_reason()
pytestmark = [pytest.mark.netns, pytest.mark.skipif(_REASON is not None, reason=_REASON or "")]


def _kernel_count(socks: list[socket.socket]) -> int:
    """What the kernel shows now: total_retrans of the sockets still open."""
    return sum((i.total_retrans or 0) for i in (try_read(s) for s in socks) if i is not None)


def test_retransmits_of_closed_and_redialled_lanes_are_kept() -> None:
    with WanLink(rtt_ms=10, rate_mbit=50, loss=0.02, realtime=True, seed=5) as link:
        with link.inside("server"):
            rx = kvwire.Receiver(link.server_addr, 0, key="k")
        try:
            with link.inside("client"):
                s = kvwire.connect(link.server_addr, rx.address[1], key="k", lanes=2, link_control=False,
                                   warm=False)
            try:
                probe(s, seconds=0.6, congestion=None)  # (sink traffic on both lanes: 2 % of it lost)
                first = s.lane_info()[0].sock
                lost_on_first = _kernel_count([first])
                before = s.stats()["retransmits"]
                assert lost_on_first > 0 and before == _kernel_count([x.sock for x in s.lane_info()]) > 0
                first.shutdown(socket.SHUT_RDWR)  # lane 0 fails at its next chunk and is re-dialled
                with link.inside("client"):
                    probe(s, seconds=0.6, congestion=None)
                assert wait_until(lambda: s.stats()["lane_reconnects"] >= 1, 10)
                assert s.lane_info()[0].sock is not first
                after = s.stats()["retransmits"]
                live = _kernel_count([x.sock for x in s.lane_info()])
                assert after >= before  # kept, and what both lanes lost since added
                # negative control: the live sockets no longer show what the closed one retransmitted
                assert after - live >= lost_on_first
            finally:
                s.close()
            assert _kernel_count([x.sock for x in s.lane_info()]) == 0  # (closed: the kernel shows nothing)
            assert s.stats()["retransmits"] >= after  # the session's count outlives its sockets
        finally:
            rx.close()
