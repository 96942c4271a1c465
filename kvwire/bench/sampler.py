"""Per-lane interval sampling on the sending side: bytes, retransmits, RTT and cwnd, like iperf3's intervals.

Owns: a thread that reads each lane's byte counter every ``fine`` seconds (kept for plots) and, every
``interval`` seconds, closes an interval record per lane plus a SUM row from ``TCP_INFO`` (read through
``kvwire.congestion.tcpinfo``, whose ``LaneCounters`` carry wire bytes and retransmits across reconnects);
handing sockets it has not seen before to a ``reapply`` callback (``-C``/``--fq-rate`` on reconnected lanes);
taking in lanes the session opened during the test; a lane socket's addresses (``lane_addresses``, for both
sides' reports); that the intervals add up to the totals it reports (``lane_totals`` puts what the lanes
counted after ``stop`` in an interval of its own). Lanes come from ``Session.lane_info()`` snapshots, asked
for anew at every tick. Must not know: payloads, the control channel, output formats (records are plain
dicts shaped like iperf3's ``intervals[]``), what an ``extra`` hook adds to them, or which options
``reapply`` sets.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..congestion.tcpinfo import LaneCounters, TcpInfo
from ..errors import KvwireError
from ..tcp import LaneInfo

LaneInfoProvider = Callable[[], Sequence[LaneInfo]]


def lane_addresses(index: int, sock: socket.socket) -> dict[str, Any] | None:
    """A lane socket's addresses as iperf3's ``connected[]`` lists them (either side); ``None`` when it is
    not connected."""
    try:
        lh, lp = sock.getsockname()[:2]
        rh, rp = sock.getpeername()[:2]
    except OSError:
        return None
    return {"socket": index, "local_host": lh, "local_port": lp, "remote_host": rh, "remote_port": rp}


@dataclass
class _LaneTrack:
    bytes_at_interval: int = 0
    retrans_base: int = 0  # the lane's retransmits before the test
    retrans_at_interval: int = 0  # ... as of the last interval (what the intervals reported so far)
    rtts: list[int] = field(default_factory=list)
    max_cwnd: int = 0
    max_pacing_rate: int | None = None


class Sampler:
    """Start with ``start()``; ``stop(t_end)`` closes the last (partial) interval and joins the thread;
    ``lane_totals()`` then reads the lanes once more for the totals, and what they counted since ``stop`` goes
    into one more interval first, so the intervals add up to those totals."""

    def __init__(self, lane_info: LaneInfoProvider, interval: float, t_start: float,
                 on_interval: Callable[[dict[str, Any]], None] | None = None,
                 reapply: Callable[[socket.socket], None] | None = None, fine: float = 0.02,
                 extra: Callable[[float], dict[str, Any]] | None = None) -> None:
        """``lane_info``: ``Session.lane_info`` (lanes added later are taken in as they appear).
        ``reapply``: called with each lane socket not seen before (a lane re-dialled during the test).
        ``extra``: called as each interval closes, with the interval's end (seconds since ``t_start``); its
        keys are added to the record (beside ``streams`` and ``sum``). Whatever it reports should be as of
        that end: it is called after the end was read."""
        self._lane_info = lane_info
        self.lanes = list(lane_info())
        self.extra = extra
        self.interval = interval
        self.t_start = t_start
        self.on_interval = on_interval
        self.reapply = reapply
        self.fine = min(fine, interval) if interval > 0 else fine
        self.intervals: list[dict[str, Any]] = []
        self.series: list[tuple[float, list[int]]] = [(0.0, [lane.bytes_sent for lane in self.lanes])]
        self._tracks = [_LaneTrack(bytes_at_interval=lane.bytes_sent) for lane in self.lanes]
        self._counters = LaneCounters(("bytes_sent", "total_retrans"))
        self._seen: set[socket.socket] = set()
        self._last_edge = 0.0
        self._t_end: float | None = None  # set by stop(): the test's end, seconds since t_start
        self._lock = threading.Lock()  # the thread's ticks, stop() and lane_totals() one at a time
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="kvwire-bench-sampler", daemon=True)
        for i, lane in enumerate(self.lanes):
            self._seen.add(lane.sock)
            self._counters.read(i, lane.sock)
            track = self._tracks[i]
            track.retrans_base = track.retrans_at_interval = self._counters.total(i, "total_retrans")

    def start(self) -> None:
        self._thread.start()

    def stop(self, t_end: float) -> None:
        self._stop.set()
        self._thread.join(5)
        with self._lock:
            self._refresh()
            rel = max(t_end - self.t_start, self._last_edge)
            self._t_end = rel
            self._sample_fine(rel)
            if self.interval > 0 and (rel - self._last_edge > 1e-3 or self._unreported_bytes()):
                # the last edge may fall after t_end (the thread closed it while the last send returned): bytes
                # counted since still get an interval, so the intervals always add up to the totals
                self._close_interval(max(rel, self._last_edge + 1e-3))

    def _unreported_bytes(self) -> bool:
        return any(lane.bytes_sent != t.bytes_at_interval for lane, t in zip(self.lanes, self._tracks))

    def _refresh(self) -> None:
        """A fresh snapshot of every lane; lanes opened since (a controller raising the lane count) count
        their bytes from 0."""
        self.lanes = list(self._lane_info())
        while len(self._tracks) < len(self.lanes):
            self._tracks.append(_LaneTrack())

    def _loop(self) -> None:
        next_edge = self.interval
        while not self._stop.wait(self.fine):
            with self._lock:
                if self._stop.is_set():
                    return
                rel = time.monotonic() - self.t_start
                self._refresh()
                self._reconfigure()
                self._sample_fine(rel)
                if self.interval > 0 and rel >= next_edge:
                    self._close_interval(rel)
                    next_edge += self.interval
                    while next_edge <= rel:
                        next_edge += self.interval

    def _reconfigure(self) -> None:
        for lane in self.lanes:
            if lane.alive and lane.sock not in self._seen:
                self._seen.add(lane.sock)
                if self.reapply is not None:
                    try:
                        self.reapply(lane.sock)
                    except (KvwireError, OSError, ValueError):
                        pass  # it was accepted on the first sockets; a reconnect race is not worth failing over

    def _sample_fine(self, rel: float) -> None:
        self.series.append((rel, [lane.bytes_sent for lane in self.lanes]))

    def _read(self, i: int) -> TcpInfo | None:
        lane, track = self.lanes[i], self._tracks[i]
        info = self._counters.read(i, lane.sock) if lane.alive else None
        if info is not None:
            if info.rtt_us is not None:
                track.rtts.append(info.rtt_us)
            if info.cwnd_bytes is not None:
                track.max_cwnd = max(track.max_cwnd, info.cwnd_bytes)
            if info.max_pacing_rate is not None:
                track.max_pacing_rate = info.max_pacing_rate
        return info

    def _retransmits(self, i: int) -> int:
        """The lane's retransmits since the test started."""
        return self._counters.total(i, "total_retrans") - self._tracks[i].retrans_base

    def _close_interval(self, rel: float, infos: Sequence[TcpInfo | None] | None = None) -> None:
        """An interval from the last edge to ``rel``: what each lane counted since (``infos``: its ``TCP_INFO``
        as just read, else read now)."""
        start, end = self._last_edge, rel
        seconds = max(end - start, 1e-9)
        streams: list[dict[str, Any]] = []
        for i, lane in enumerate(self.lanes):
            track = self._tracks[i]
            info = self._read(i) if infos is None else infos[i]
            nbytes = lane.bytes_sent - track.bytes_at_interval
            track.bytes_at_interval = lane.bytes_sent
            retransmits = self._counters.total(i, "total_retrans") - track.retrans_at_interval
            track.retrans_at_interval += retransmits
            streams.append({
                "socket": i,
                "start": start,
                "end": end,
                "seconds": seconds,
                "bytes": nbytes,
                "bits_per_second": nbytes * 8 / seconds,
                "retransmits": retransmits,
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
            record.update(self.extra(end))
        self._last_edge = end
        self.intervals.append(record)
        if self.on_interval is not None:
            self.on_interval(record)

    # ---------------------------------------------------------------- totals
    def lane_totals(self) -> list[dict[str, Any]]:
        """Per lane over the whole run: retransmits, cwnd and RTT extremes, wire bytes (TCP payload), from one
        reading of the lanes. After ``stop``, what they counted since the last interval closed (a lane counts
        a chunk once its send returned, and the receiver may have acknowledged it first, ending the test
        before the count; a re-send or parity chunk still on its way) first goes into an interval of its
        own, so the intervals add up to these totals."""
        with self._lock:
            self._refresh()
            infos = [self._read(i) for i in range(len(self.lanes))]
            if self._t_end is not None and self.interval > 0 and (self._unreported_bytes() or any(
                    self._counters.total(i, "total_retrans") != t.retrans_at_interval
                    for i, t in enumerate(self._tracks[:len(self.lanes)]))):
                self._sample_fine(max(self._t_end, self._last_edge))
                self._close_interval(max(self._t_end, self._last_edge + 1e-3), infos)
            return self._totals()

    def _totals(self) -> list[dict[str, Any]]:
        out = []
        for i, lane in enumerate(self.lanes):
            t = self._tracks[i]
            rtts = t.rtts
            out.append({
                "socket": i,
                "bytes": lane.bytes_sent,
                "chunks": lane.chunks_sent,
                "retransmits": self._retransmits(i),
                "max_snd_cwnd": t.max_cwnd or None,
                "max_rtt": max(rtts) if rtts else None,
                "min_rtt": min(rtts) if rtts else None,
                "mean_rtt": int(sum(rtts) / len(rtts)) if rtts else None,
                "wire_bytes": self._counters.total(i, "bytes_sent"),
                "max_pacing_rate": t.max_pacing_rate,  # bytes/s, as the kernel reports it
            })
        return out
