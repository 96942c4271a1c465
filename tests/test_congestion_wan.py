"""The congestion stack on the emulated WAN link: a real CUBIC stream through WanLink, sampled by
LinkMonitor. The estimate must match the link (RTT, bottleneck rate, standing queue), follow the rate
halving mid-transfer, and the pacing actuator must take the queue away.

Needs root, iproute2 and iptables (skips with the reason otherwise).
"""

from __future__ import annotations

import socket
import statistics
import threading
import time
from collections.abc import Iterator

import pytest

from kvwire.congestion.estimator import EstimatorConfig, LinkEstimator, LinkState
from kvwire.congestion.monitor import LinkMonitor
from kvwire.congestion.tcpinfo import set_congestion, set_pacing_rate
from kvwire.testing.wan import WanLink, unavailable_reason

_REASON = unavailable_reason()
pytestmark = [pytest.mark.netns, pytest.mark.skipif(_REASON is not None, reason=_REASON or "")]

RATE_MBIT, RTT_MS = 40.0, 20.0


@pytest.fixture
def stream() -> Iterator[tuple[WanLink, socket.socket]]:
    """A WanLink and a client socket that a thread keeps full (CUBIC) until the test ends."""
    bdp = int(RATE_MBIT * 1e6 / 8 * RTT_MS / 1e3)
    # realtime: a starved emulator releases ACKs in bursts, which a max filter reads as extra bandwidth
    with WanLink(rtt_ms=RTT_MS, rate_mbit=RATE_MBIT, queue_bytes=2 * bdp, realtime=True) as link:
        with link.inside("server"):
            srv = socket.create_server((link.server_addr, 0))
        with link.inside("client"):
            cli = socket.socket()
        set_congestion(cli, "cubic")
        cli.connect(srv.getsockname())
        acc, _ = srv.accept()
        srv.close()
        stop = threading.Event()

        def drain() -> None:
            buf = bytearray(1 << 20)
            while acc.recv_into(buf):
                pass

        def push() -> None:
            chunk = b"k" * (256 << 10)
            try:
                while not stop.is_set():
                    cli.sendall(chunk)
            except OSError:
                pass

        threads = [threading.Thread(target=drain), threading.Thread(target=push)]
        for t in threads:
            t.start()
        try:
            yield link, cli
        finally:
            stop.set()
            cli.shutdown(socket.SHUT_RDWR)
            for t in threads:
                t.join(10)
            cli.close()
            acc.close()


def _collect(mon: LinkMonitor, seconds: float) -> list[LinkState]:
    out: list[LinkState] = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        s = mon.wait_next(1.0)
        if s is not None:
            out.append(s)
    return out


def test_estimate_tracks_the_link_through_a_rate_halving_and_pacing(
        stream: tuple[WanLink, socket.socket]) -> None:
    link, cli = stream
    payload = RATE_MBIT * 1e6 / 8 * 1448 / 1500  # TCP payload carried by the IP-layer rate
    est = LinkEstimator(EstimatorConfig(bw_window=1.0, stats_window=1.0))
    with LinkMonitor(lambda: [cli], interval=0.1, estimator=est) as mon:
        full = _collect(mon, 3.0)[10:]  # past slow start
        link.set_rate(RATE_MBIT / 2)
        _collect(mon, 1.5)
        halved = _collect(mon, 1.5)
        set_pacing_rate(cli, int(payload / 4))
        _collect(mon, 1.5)
        paced = _collect(mon, 1.5)

    last = full[-1]
    assert last.min_rtt is not None and RTT_MS / 1e3 <= last.min_rtt <= RTT_MS / 1e3 + 0.0015
    assert 0.8 * payload <= statistics.median(s.goodput for s in full) <= 1.03 * payload
    assert 0.8 * payload <= max(s.btl_bw for s in full) <= 1.2 * payload
    # CUBIC fills the drop-tail queue (2 BDP): srtt well above min_rtt, the capacity gets probed
    assert max(s.queueing_ratio or 0 for s in full) > 1.5
    assert any(s.saturated for s in full)
    assert last.capacity is not None and 0.8 * payload <= last.capacity <= 1.2 * payload

    # half the rate: goodput and (after its window) BtlBw follow
    assert 0.8 * payload / 2 <= statistics.median(s.goodput for s in halved) <= 1.05 * payload / 2
    assert max(s.btl_bw for s in halved) <= 1.2 * payload / 2

    # paced at a quarter of the original rate (half the new one): the standing queue drains
    assert 0.85 * payload / 4 <= statistics.median(s.goodput for s in paced) <= 1.05 * payload / 4
    assert statistics.median(s.queueing_ratio or 9 for s in paced) < 1.15
    assert paced[-1].utilization is not None and paced[-1].utilization < 0.7
