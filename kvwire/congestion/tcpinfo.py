"""Read ``TCP_INFO`` and set the per-socket congestion knobs (pacing cap, congestion algorithm).

Owns: the ``struct tcp_info`` field offsets (checked with ``offsetof`` against linux-libc-dev 6.1, plus
the 6.7 additions), a parser that reads only the fields inside the length the kernel returned (older
kernels return less; a missing field is ``None``), ``SO_MAX_PACING_RATE`` and ``TCP_CONGESTION``.
Must not know: lanes, sessions, estimation or policy.
"""

from __future__ import annotations

import errno
import socket
import struct
from dataclasses import dataclass, fields
from pathlib import Path

from ..errors import KvwireError

#: ``SO_MAX_PACING_RATE`` from ``asm-generic/socket.h``; Python 3.11 has no constant for it.
SO_MAX_PACING_RATE = 47
#: ``~0UL``: the kernel's "no pacing cap".
UNLIMITED_PACING = (1 << 64) - 1
#: Asking for more than the kernel has is fine: it returns ``min(asked, sizeof(struct tcp_info))``.
_TCP_INFO_ASK = 512

#: ``tcpi_ca_state`` values (``enum tcp_ca_state``).
CA_OPEN, CA_DISORDER, CA_CWR, CA_RECOVERY, CA_LOSS = range(5)


class TcpInfoUnavailable(KvwireError):
    """``TCP_INFO`` could not be read (not a TCP socket, closed, or not supported here)."""


class SocketOptionError(KvwireError):
    """The kernel refused a congestion knob (pacing cap or congestion algorithm)."""


class UnknownCongestionAlgorithm(SocketOptionError):
    """The congestion algorithm is not available (or not allowed) on this kernel."""


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


def set_pacing_rate(sock: socket.socket, bytes_per_s: int | None) -> None:
    """Cap ``sock``'s send rate with ``SO_MAX_PACING_RATE`` (TCP's internal pacing; no fq needed).

    ``None`` removes the cap. The value is a 64-bit byte rate (Linux >= 4.20 reads 64 bits).
    """
    if bytes_per_s is None:
        value = UNLIMITED_PACING
    elif bytes_per_s <= 0:
        raise ValueError(f"pacing rate must be positive, got {bytes_per_s}")
    else:
        value = min(int(bytes_per_s), UNLIMITED_PACING)
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_MAX_PACING_RATE, struct.pack("=Q", value))
    except (OSError, ValueError) as e:
        raise SocketOptionError(f"SO_MAX_PACING_RATE={value} refused: {e}") from e


def get_pacing_rate(sock: socket.socket) -> int | None:
    """The pacing cap in bytes/s, or ``None`` when uncapped."""
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, SO_MAX_PACING_RATE, 8)
    except (OSError, ValueError) as e:
        raise SocketOptionError(f"SO_MAX_PACING_RATE unreadable: {e}") from e
    value = struct.unpack("=Q" if len(raw) >= 8 else "=I", raw[:8] if len(raw) >= 8 else raw[:4])[0]
    # a 32-bit reply of ~0U also means "no cap"
    return None if value in (UNLIMITED_PACING, 0xFFFFFFFF) else value


def set_congestion(sock: socket.socket, name: str) -> None:
    """Choose ``sock``'s congestion algorithm (``TCP_CONGESTION``), e.g. ``"bbr"`` or ``"cubic"``."""
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, name.encode())
    except OSError as e:
        if e.errno in (errno.ENOENT, errno.EPERM):
            raise UnknownCongestionAlgorithm(
                f"congestion algorithm {name!r} not available here "
                f"(available: {', '.join(available_congestion_algorithms()) or 'unknown'}): {e}") from e
        raise SocketOptionError(f"TCP_CONGESTION={name!r} refused: {e}") from e
    except ValueError as e:
        raise SocketOptionError(f"TCP_CONGESTION={name!r} refused: {e}") from e


def restart_congestion(sock: socket.socket) -> None:
    """Re-initialise ``sock``'s congestion algorithm (to ``reno`` and back): BBR starts over in STARTUP
    (its bandwidth filter emptied, doubling its rate each round trip) instead of growing a bandwidth it
    measured under a pacing cap by 25 % every eight round trips. Setting the same name is a no-op in the
    kernel, hence the detour."""
    name = get_congestion(sock)
    if name != "reno":
        set_congestion(sock, "reno")
    set_congestion(sock, name)


def get_congestion(sock: socket.socket) -> str:
    """``sock``'s congestion algorithm name."""
    try:
        raw = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, 16)
    except (OSError, ValueError) as e:
        raise SocketOptionError(f"TCP_CONGESTION unreadable: {e}") from e
    return raw.split(b"\0", 1)[0].decode()


def _sysctl_words(name: str) -> tuple[str, ...]:
    try:
        return tuple(Path("/proc/sys/net/ipv4", name).read_text().split())
    except OSError:
        return ()


def available_congestion_algorithms() -> tuple[str, ...]:
    """Congestion algorithms the kernel has loaded (root may pick any of them)."""
    return _sysctl_words("tcp_available_congestion_control")


def allowed_congestion_algorithms() -> tuple[str, ...]:
    """Algorithms an unprivileged process may pick (``tcp_allowed_congestion_control``)."""
    return _sysctl_words("tcp_allowed_congestion_control")
