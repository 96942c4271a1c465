"""Per-lane interval sampling on the sending side: bytes, retransmits, RTT and cwnd, like iperf3's intervals.

Owns: a thread that reads each lane's byte counter every ``fine`` seconds (kept for plots) and, every
``interval`` seconds, closes an interval record per lane plus a SUM row from ``TCP_INFO`` (through
``kvwire.congestion.tcpinfo``); re-applying the socket options (``-C``, ``--fq-rate``) to lanes that were
reconnected; counting wire bytes per socket across reconnects; taking in lanes the session opened during
the test (the lane list it is given may grow). Must not know: payloads, the control channel, output formats
(records are plain dicts shaped like iperf3's ``intervals[]``) or what an ``extra`` hook adds to them.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..congestion.tcpinfo import TcpInfo, TcpInfoUnavailable, read_tcp_info, set_congestion, set_pacing_rate
from ..errors import KvwireError


def lane_socket(lane: Any) -> socket.socket:
    """The socket of a ``kvwire.tcp.sender`` lane (``lane.ch.sock``)."""
    sock: socket.socket = lane.ch.sock
    return sock


@dataclass
class SocketOptions:
    """What ``-C`` and ``--fq-rate`` ask for on every lane socket."""

    congestion: str | None = None
    pacing_bits_per_s: int | None = None

    def apply(self, sock: socket.socket) -> None:
        """Raise SocketOptionError / UnknownCongestionAlgorithm when the kernel refuses."""
        if self.congestion:
            set_congestion(sock, self.congestion)
        if self.pacing_bits_per_s:
            set_pacing_rate(sock, max(1, self.pacing_bits_per_s // 8))


def tcp_info(sock: socket.socket) -> TcpInfo | None:
    try:
        return read_tcp_info(sock)
    except TcpInfoUnavailable:
        return None


@dataclass
class _LaneTrack:
    bytes_at_interval: int = 0
    retrans_base: int = 0  # total_retrans of the current socket at the last interval
    retrans_total: int = 0
    wire_closed: int = 0  # bytes_sent of replaced sockets
    wire_last: int = 0  # bytes_sent of the current socket when last read
    sock_id: int = 0
    rtts: list[int] = field(default_factory=list)
    max_cwnd: int = 0
    max_pacing_rate: int | None = None


class Sampler:
    """Start with ``start()``; ``stop(t_end)`` closes the last (partial) interval and joins the thread."""

    def __init__(self, lanes: Sequence[Any], interval: float, t_start: float,
                 on_interval: Callable[[dict[str, Any]], None] | None = None,
                 options: SocketOptions | None = None, fine: float = 0.02,
                 extra: Callable[[], dict[str, Any]] | None = None) -> None:
        """``lanes``: the session's lane list (lanes appended to it later are taken in as they appear).
        ``extra``: called as each interval closes; its keys are added to the record (beside ``streams``
        and ``sum``)."""
        self._source = lanes
        self.lanes = list(lanes)
        self.extra = extra
        self.interval = interval
        self.t_start = t_start
        self.on_interval = on_interval
        self.options = options or SocketOptions()
        self.fine = min(fine, interval) if interval > 0 else fine
        self.intervals: list[dict[str, Any]] = []
        self.series: list[tuple[float, list[int]]] = [(0.0, [lane.bytes_sent for lane in self.lanes])]
        self._tracks = [_LaneTrack(bytes_at_interval=lane.bytes_sent) for lane in self.lanes]
        self._configured: set[int] = set()
        self._last_edge = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="kvwire-bench-sampler", daemon=True)
        for i, lane in enumerate(self.lanes):
            sock = lane_socket(lane)
            self._configured.add(id(sock))
            info = tcp_info(sock)
            track = self._tracks[i]
            track.sock_id = id(sock)
            if info is not None:
                track.retrans_base = info.total_retrans or 0
                track.wire_last = info.bytes_sent or 0

    def start(self) -> None:
        self._thread.start()

    def stop(self, t_end: float) -> None:
        self._stop.set()
        self._thread.join(5)
        self._grow()
        rel = max(t_end - self.t_start, self._last_edge)
        self._sample_fine(rel)
        unreported = any(lane.bytes_sent != t.bytes_at_interval for lane, t in zip(self.lanes, self._tracks))
        if self.interval > 0 and (rel - self._last_edge > 1e-3 or unreported):
            # the last edge may fall after t_end (the thread closed it while the last send returned): bytes
            # counted since still get an interval, so the intervals always add up to the totals
            self._close_interval(max(rel, self._last_edge + 1e-3))

    def _grow(self) -> None:
        """Take in lanes opened since (a controller raising the lane count); their bytes count from 0."""
        for lane in list(self._source[len(self.lanes):]):
            self.lanes.append(lane)
            self._tracks.append(_LaneTrack())

    def _loop(self) -> None:
        next_edge = self.interval
        while not self._stop.wait(self.fine):
            rel = time.monotonic() - self.t_start
            self._grow()
            self._reconfigure()
            self._sample_fine(rel)
            if self.interval > 0 and rel >= next_edge:
                self._close_interval(rel)
                next_edge += self.interval
                while next_edge <= rel:
                    next_edge += self.interval

    def _reconfigure(self) -> None:
        for lane in self.lanes:
            sock = lane_socket(lane)
            if lane.alive and id(sock) not in self._configured:
                self._configured.add(id(sock))
                try:
                    self.options.apply(sock)
                except (KvwireError, OSError, ValueError):
                    pass  # it was accepted on the first sockets; a reconnect race is not worth failing over

    def _sample_fine(self, rel: float) -> None:
        self.series.append((rel, [lane.bytes_sent for lane in self.lanes]))

    def _read(self, i: int) -> TcpInfo | None:
        lane, track = self.lanes[i], self._tracks[i]
        sock = lane_socket(lane)
        info = tcp_info(sock) if lane.alive else None
        if id(sock) != track.sock_id:  # the lane reconnected: counters start again on the new socket
            track.sock_id = id(sock)
            track.wire_closed += track.wire_last
            track.wire_last = 0
            track.retrans_base = 0
        if info is not None:
            if info.total_retrans is not None:
                track.retrans_total += max(0, info.total_retrans - track.retrans_base)
                track.retrans_base = info.total_retrans
            if info.bytes_sent is not None:
                track.wire_last = info.bytes_sent
            if info.rtt_us is not None:
                track.rtts.append(info.rtt_us)
            if info.cwnd_bytes is not None:
                track.max_cwnd = max(track.max_cwnd, info.cwnd_bytes)
            if info.max_pacing_rate is not None:
                track.max_pacing_rate = info.max_pacing_rate
        return info

    def _close_interval(self, rel: float) -> None:
        start, end = self._last_edge, rel
        seconds = max(end - start, 1e-9)
        streams: list[dict[str, Any]] = []
        for i, lane in enumerate(self.lanes):
            track = self._tracks[i]
            before = track.retrans_total
            info = self._read(i)
            nbytes = lane.bytes_sent - track.bytes_at_interval
            track.bytes_at_interval = lane.bytes_sent
            streams.append({
                "socket": i,
                "start": start,
                "end": end,
                "seconds": seconds,
                "bytes": nbytes,
                "bits_per_second": nbytes * 8 / seconds,
                "retransmits": track.retrans_total - before,
                "snd_cwnd": info.cwnd_bytes if info is not None else None,
                "snd_wnd": info.snd_wnd if info is not None else None,
                "rtt": info.rtt_us if info is not None else None,
                "rttvar": info.rttvar_us if info is not None else None,
                "pmtu": info.pmtu if info is not None else None,
                "omitted": False,
                "sender": True,
                "alive": bool(lane.alive),
            })
        rtts = [s["rtt"] for s in streams if s["rtt"] is not None]
        cwnds = [s["snd_cwnd"] for s in streams if s["snd_cwnd"] is not None]
        total = sum(s["bytes"] for s in streams)
        record = {
            "streams": streams,
            "sum": {
                "start": start,
                "end": end,
                "seconds": seconds,
                "bytes": total,
                "bits_per_second": total * 8 / seconds,
                "retransmits": sum(s["retransmits"] for s in streams),
                "rtt": sum(rtts) / len(rtts) if rtts else None,
                "snd_cwnd": sum(cwnds) if cwnds else None,
                "active_lanes": sum(1 for s in streams if s["alive"]),
                "omitted": False,
                "sender": True,
            },
        }
        if self.extra is not None:
            record.update(self.extra())
        self._last_edge = end
        self.intervals.append(record)
        if self.on_interval is not None:
            self.on_interval(record)

    # ---------------------------------------------------------------- totals
    def lane_totals(self) -> list[dict[str, Any]]:
        """Per lane over the whole run: retransmits, cwnd and RTT extremes, wire bytes (TCP payload)."""
        out = []
        for i, lane in enumerate(self.lanes):
            self._read(i)
            t = self._tracks[i]
            rtts = t.rtts
            out.append({
                "socket": i,
                "bytes": lane.bytes_sent,
                "chunks": lane.chunks_sent,
                "retransmits": t.retrans_total,
                "max_snd_cwnd": t.max_cwnd or None,
                "max_rtt": max(rtts) if rtts else None,
                "min_rtt": min(rtts) if rtts else None,
                "mean_rtt": int(sum(rtts) / len(rtts)) if rtts else None,
                "wire_bytes": t.wire_closed + t.wire_last,
                "max_pacing_rate": t.max_pacing_rate,  # bytes/s, as the kernel reports it
            })
        return out
