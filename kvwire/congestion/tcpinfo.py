"""Read ``TCP_INFO``: the one reader and parser of it in kvwire.

Owns: the ``struct tcp_info`` field offsets (checked with ``offsetof`` against linux-libc-dev 6.1, plus
the 6.7 additions), a parser that reads only the fields inside the length the kernel returned (older
kernels return less; a missing field is ``None``), reading one socket (``read_tcp_info``; ``try_read``
where a closed socket is normal; ``read_pacing_rate``, ``read_pacing_unsent``: the fields a lane reads per
chunk), a round of
sockets keyed by descriptor (``sample``: what ``LinkMonitor`` and ``kvwire.probe`` take) and
``LaneCounters``, the cumulative counters of lanes whose sockets get replaced (what ``kvwire-bench``
reports per lane on both ends).
Must not know: sessions, estimation or policy. Setting socket options is ``kvwire.sockopts``'s (the knob
functions this module had are still found here, with a ``DeprecationWarning``).
"""

from __future__ import annotations

import socket
import struct
import threading
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, fields
from typing import Any

from .. import sockopts
from ..errors import KvwireError
from ..sockopts import UNLIMITED_PACING

__all__ = ["CA_CWR", "CA_DISORDER", "CA_LOSS", "CA_OPEN", "CA_RECOVERY", "TCP_INFO_FIELDS", "UNLIMITED_PACING",
           "LaneCounters", "TcpInfo", "TcpInfoUnavailable", "parse_tcp_info", "read_pacing_rate", "read_pacing_unsent",
           "read_tcp_info", "sample", "try_read"]
#: Asking for more than the kernel has is fine: it returns ``min(asked, sizeof(struct tcp_info))``.
_TCP_INFO_ASK = 512

#: ``tcpi_ca_state`` values (``enum tcp_ca_state``).
CA_OPEN, CA_DISORDER, CA_CWR, CA_RECOVERY, CA_LOSS = range(5)


class TcpInfoUnavailable(KvwireError):
    """``TCP_INFO`` could not be read (not a TCP socket, closed, or not supported here)."""


# field name -> (offset, struct format); all native byte order, as the kernel fills them.
_LAYOUT: dict[str, tuple[int, str]] = {
    "state": (0, "B"),
    "ca_state": (1, "B"),
    "retransmits": (2, "B"),
    "rto_us": (8, "I"),
    "snd_mss": (16, "I"),
    "rcv_mss": (20, "I"),
    "unacked": (24, "I"),
    "lost": (32, "I"),
    "retrans": (36, "I"),
    "pmtu": (60, "I"),
    "rtt_us": (68, "I"),
    "rttvar_us": (72, "I"),
    "snd_ssthresh": (76, "I"),
    "snd_cwnd": (80, "I"),
    "total_retrans": (100, "I"),
    "pacing_rate": (104, "Q"),
    "max_pacing_rate": (112, "Q"),
    "bytes_acked": (120, "Q"),
    "bytes_received": (128, "Q"),
    "notsent_bytes": (144, "I"),
    "min_rtt_us": (148, "I"),
    "delivery_rate": (160, "Q"),
    "busy_time_us": (168, "Q"),
    "rwnd_limited_us": (176, "Q"),
    "sndbuf_limited_us": (184, "Q"),
    "delivered": (192, "I"),
    "bytes_sent": (200, "Q"),
    "bytes_retrans": (208, "Q"),
    "snd_wnd": (228, "I"),
    "rcv_wnd": (232, "I"),
    "total_rto": (240, "H"),
}
_PARSERS = {name: (off, struct.Struct("=" + fmt)) for name, (off, fmt) in _LAYOUT.items()}
_APP_LIMITED_BYTE = 7  # bit 0: tcpi_delivery_rate_app_limited


@dataclass(frozen=True, slots=True)
class TcpInfo:
    """One ``TCP_INFO`` snapshot. Units: bytes, bytes/s, microseconds, segments (cwnd, retrans).

    Every field but ``length`` is ``None`` when the kernel's ``struct tcp_info`` is too short for it.
    Counters (``bytes_*``, ``*_us`` times, ``total_retrans``) are cumulative since the socket opened.
    """

    length: int
    state: int | None = None
    ca_state: int | None = None
    retransmits: int | None = None
    rto_us: int | None = None
    snd_mss: int | None = None
    rcv_mss: int | None = None
    unacked: int | None = None
    lost: int | None = None
    retrans: int | None = None
    pmtu: int | None = None
    rtt_us: int | None = None
    rttvar_us: int | None = None
    snd_ssthresh: int | None = None
    snd_cwnd: int | None = None
    total_retrans: int | None = None
    pacing_rate: int | None = None
    max_pacing_rate: int | None = None
    bytes_acked: int | None = None
    bytes_received: int | None = None
    notsent_bytes: int | None = None
    min_rtt_us: int | None = None
    delivery_rate: int | None = None
    delivery_rate_app_limited: bool | None = None
    busy_time_us: int | None = None
    rwnd_limited_us: int | None = None
    sndbuf_limited_us: int | None = None
    delivered: int | None = None  # segments delivered (cumulatively ACKed or SACKed), wraps at 2**32
    bytes_sent: int | None = None
    bytes_retrans: int | None = None
    snd_wnd: int | None = None
    rcv_wnd: int | None = None
    total_rto: int | None = None

    @property
    def cwnd_bytes(self) -> int | None:
        """Congestion window in bytes (``snd_cwnd * snd_mss``), as iperf3 reports it."""
        if self.snd_cwnd is None or self.snd_mss is None:
            return None
        return self.snd_cwnd * self.snd_mss


TCP_INFO_FIELDS = tuple(f.name for f in fields(TcpInfo))


def parse_tcp_info(raw: bytes | bytearray | memoryview) -> TcpInfo:
    """Parse a raw ``struct tcp_info`` of any length; fields beyond ``len(raw)`` are ``None``."""
    n = len(raw)
    values: dict[str, int | bool | None] = {
        name: s.unpack_from(raw, off)[0] for name, (off, s) in _PARSERS.items() if off + s.size <= n
    }
    if n > _APP_LIMITED_BYTE:
        values["delivery_rate_app_limited"] = bool(raw[_APP_LIMITED_BYTE] & 1)
    return TcpInfo(length=n, **values)  # type: ignore[arg-type]


def read_tcp_info(sock: socket.socket) -> TcpInfo:
    """``getsockopt(TCP_INFO)`` on ``sock`` (plain or TLS), parsed. Raises ``TcpInfoUnavailable``."""
    try:
        raw = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_ASK)
    except (OSError, ValueError) as e:  # ValueError: closed socket object (fileno -1)
        raise TcpInfoUnavailable(f"TCP_INFO unavailable: {e}") from e
    return parse_tcp_info(raw)


def try_read(sock: socket.socket) -> TcpInfo | None:
    """``read_tcp_info``, or ``None`` where the socket is closed or not TCP (a lane that went away)."""
    try:
        return read_tcp_info(sock)
    except TcpInfoUnavailable:
        return None


def read_pacing_rate(sock: socket.socket) -> int | None:
    """The rate the kernel paces ``sock`` at now (``tcpi_pacing_rate``: its congestion control's, under any
    ``SO_MAX_PACING_RATE`` cap), bytes/s; ``None`` when unpaced or unreadable. Cheap: one field, no parse."""
    off, fmt = _PARSERS["pacing_rate"]
    try:
        raw = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, off + fmt.size)
    except (OSError, ValueError):
        return None
    if len(raw) < off + fmt.size:
        return None
    rate = int(fmt.unpack_from(raw, off)[0])
    return None if rate in (UNLIMITED_PACING, 0) else rate


def read_pacing_unsent(sock: socket.socket) -> tuple[int | None, int]:
    """``read_pacing_rate`` and the bytes the socket holds unsent (``tcpi_notsent_bytes``; 0 unreadable), from
    one ``TCP_INFO`` read of the fields up to them: a lane reads this before it takes a chunk."""
    off, fmt = _PARSERS["notsent_bytes"]
    try:
        raw = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, off + fmt.size)
    except (OSError, ValueError):
        return None, 0
    if len(raw) < off + fmt.size:
        return None, 0
    p_off, p_fmt = _PARSERS["pacing_rate"]
    rate = int(p_fmt.unpack_from(raw, p_off)[0])
    return (None if rate in (UNLIMITED_PACING, 0) else rate), int(fmt.unpack_from(raw, off)[0])


def handshake_rtt(socks: Iterable[socket.socket]) -> float | None:
    """The path's round trip in seconds as these sockets measured it: the least ``TCP_INFO`` min RTT (srtt
    where the kernel keeps no min) over the open ones, which a TCP handshake alone already sets; None where
    the kernel gives none."""
    rtts = [us for us in (i.min_rtt_us or i.rtt_us for i in sample(socks).values()) if us]
    return min(rtts) / 1e6 if rtts else None


def sample(socks: Iterable[socket.socket]) -> dict[int, TcpInfo]:
    """One ``TCP_INFO`` per open TCP socket of ``socks``, keyed by file descriptor (closed ones left out)."""
    out: dict[int, TcpInfo] = {}
    for s in socks:
        fd = s.fileno()
        if fd >= 0 and (info := try_read(s)) is not None:
            out[fd] = info
    return out


#: ``tcpi_state`` values of a socket that has read its peer's FIN (CLOSE_WAIT, LAST_ACK, CLOSING): the kernel's
#: ``bytes_received`` then counts the FIN's sequence number too, one more than the payload
_FIN_RECEIVED = frozenset({8, 9, 11})


class LaneCounters:
    """Cumulative ``TCP_INFO`` counters (``bytes_sent``, ``bytes_received``, ``total_retrans`` ...) per lane
    across the sockets it has had: a reconnected lane's new socket counts from zero again, so a lane's total
    is the sum, over its sockets, of each one's last reading (a closed socket's last reading stands).
    ``lane`` is the caller's lane number. Thread-safe."""

    def __init__(self, counters: Iterable[str]) -> None:
        self.counters = tuple(counters)
        unknown = [c for c in self.counters if c not in TCP_INFO_FIELDS]
        if unknown:
            raise ValueError(f"not TCP_INFO fields: {unknown}")
        self._last: dict[int, dict[socket.socket, dict[str, int]]] = {}
        self._lock = threading.Lock()

    def read(self, lane: int, sock: socket.socket) -> TcpInfo | None:
        """Read ``sock`` (one of ``lane``'s sockets, new or known) and keep its counters; ``None`` (the last
        reading standing) when it is closed or not TCP."""
        info = try_read(sock)
        with self._lock:
            last = self._last.setdefault(lane, {}).setdefault(sock, dict.fromkeys(self.counters, 0))
            if info is not None:
                for name in self.counters:
                    value = getattr(info, name)
                    if value is not None and name == "bytes_received" and info.state in _FIN_RECEIVED:
                        value -= 1  # (the payload only: a lane read after its sender closed it read one byte more)
                    if value is not None:
                        last[name] = max(last[name], value)  # two readers racing: the later reading wins
        return info

    def total(self, lane: int, counter: str) -> int:
        """``counter`` summed over ``lane``'s sockets (0 for a lane never read)."""
        with self._lock:
            return sum(last[counter] for last in self._last.get(lane, {}).values())

    def sockets(self, lane: int) -> list[socket.socket]:
        """The sockets ``lane`` has had, in the order they were first read."""
        with self._lock:
            return list(self._last.get(lane, {}))

    def lanes(self) -> list[int]:
        with self._lock:
            return list(self._last)


#: knob functions that moved to ``kvwire.sockopts`` (found here still, with a DeprecationWarning)
_MOVED = ("SO_MAX_PACING_RATE", "SocketOptionError", "UnknownCongestionAlgorithm", "set_pacing_rate",
          "get_pacing_rate", "set_congestion", "get_congestion", "restart_congestion",
          "available_congestion_algorithms", "allowed_congestion_algorithms")


def __getattr__(name: str) -> Any:
    if name in _MOVED:
        warnings.warn(f"kvwire.congestion.tcpinfo.{name} moved to kvwire.sockopts.{name}", DeprecationWarning,
                      stacklevel=2)
        return getattr(sockopts, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
