"""Socket knobs: the one place kvwire sets (and reads back) options on a TCP socket.

Owns: connection tuning (``tune``: no Nagle, ``TCP_USER_TIMEOUT``, keepalive probes), the per-socket
congestion knobs (``SO_MAX_PACING_RATE``, ``TCP_CONGESTION``; ``restart_congestion``), a bound on the unsent
backlog for a sending rate (``TCP_NOTSENT_LOWAT``: ``unsent_limit``), what the kernel offers
(``available_congestion_algorithms``) and the typed errors when it refuses. ``kvwire.tcp`` tunes its lanes
and control connections here, ``kvwire.congestion`` paces and picks algorithms here, ``kvwire.probe`` and
``kvwire.bench`` (``-C``, ``--fq-rate``) too.
Must not know: lanes, sessions, ``TCP_INFO`` (``kvwire.congestion.tcpinfo`` reads that), estimation or policy.

Why here: a leaf at the top of the package (it imports only the standard library and ``kvwire.errors``), so
``tcp/``, ``congestion/`` and ``bench/`` all import it without a cycle; inside ``congestion/`` it would make
the transport's connection tuning depend on the congestion package for options that are not congestion's.
"""

from __future__ import annotations

import errno
import socket
import struct
from pathlib import Path

from .errors import KvwireError

#: ``SO_MAX_PACING_RATE`` from ``asm-generic/socket.h``; Python 3.11 has no constant for it.
SO_MAX_PACING_RATE = 47
#: ``~0UL``: the kernel's "no pacing cap" (also what ``TCP_INFO``'s ``max_pacing_rate`` reads then).
UNLIMITED_PACING = (1 << 64) - 1

#: keepalive probes on idle connections: first after KEEPALIVE_IDLE s, then every KEEPALIVE_INTERVAL s.
#: Parked lanes carry nothing for minutes; without probes a NAT or firewall between datacenters drops
#: their state after its idle timeout (often 350 s or less) while the kernel default waits 2 hours.
KEEPALIVE_IDLE = 15
KEEPALIVE_INTERVAL = 5
KEEPALIVE_COUNT = 3

#: a lane keeps at most this long of its sending rate unsent (``unsent_limit``, ``TCP_NOTSENT_LOWAT``): a write
#: blocks until the socket is down to it, so what is written next waits behind at most this much. 30 ms
#: leaves the writer 15 ms (the kernel wakes writers at half the mark) to have the next chunk ready.
UNSENT_SECONDS = 0.03
#: ... and never less than this many bytes (a few dozen packets: slow lanes still get whole bursts)
UNSENT_MIN = 64 * 1024
#: ... and a bound of this or more is none (0): beyond any send buffer (loopback runs at tens of GB/s)
UNSENT_NO_BOUND = 256 * 1024 * 1024


class SocketOptionError(KvwireError):
    """The kernel refused a socket knob (pacing cap or congestion algorithm)."""


class UnknownCongestionAlgorithm(SocketOptionError):
    """The congestion algorithm is not available (or not allowed) on this kernel."""


def no_delay(sock: socket.socket) -> None:
    """Turn Nagle off: control messages go out at once (a control connection needs no more than this)."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def tune(sock: socket.socket, user_timeout_s: float | None = None) -> None:
    """No Nagle; unacknowledged data or unanswered keepalives fail the connection after
    ``user_timeout_s``; idle connections send keepalives (see ``KEEPALIVE_IDLE``)."""
    no_delay(sock)
    if user_timeout_s and hasattr(socket, "TCP_USER_TIMEOUT"):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, int(user_timeout_s * 1000))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for name, value in (("TCP_KEEPIDLE", KEEPALIVE_IDLE), ("TCP_KEEPINTVL", KEEPALIVE_INTERVAL),
                        ("TCP_KEEPCNT", KEEPALIVE_COUNT)):
        if hasattr(socket, name):  # Linux; other systems keep their defaults
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)


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


def unsent_limit(bytes_per_s: int | None) -> int:
    """The unsent backlog (``TCP_NOTSENT_LOWAT``) for a socket sending at ``bytes_per_s``: ``UNSENT_SECONDS``
    of it, at least ``UNSENT_MIN``; 0 (the system default: no bound) when the rate is unknown or the bound
    reaches ``UNSENT_NO_BOUND`` (loopback, a LAN: beyond any send buffer anyway)."""
    if bytes_per_s is None or bytes_per_s <= 0:
        return 0
    lowat = max(UNSENT_MIN, int(bytes_per_s * UNSENT_SECONDS))
    return lowat if lowat < UNSENT_NO_BOUND else 0


def set_unsent_limit(sock: socket.socket, nbytes: int) -> None:
    """Hold at most ``nbytes`` unsent in ``sock`` (``TCP_NOTSENT_LOWAT``; 0: the system default, no bound):
    a blocking write returns once the socket is down to it, so what is written next waits behind at
    most that much. Raises ``SocketOptionError`` when refused (or not on this platform)."""
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT, int(nbytes))
    except (OSError, ValueError, AttributeError) as e:
        raise SocketOptionError(f"TCP_NOTSENT_LOWAT={nbytes} refused: {e}") from e


def get_unsent_limit(sock: socket.socket) -> int:
    """``sock``'s ``TCP_NOTSENT_LOWAT`` (0: the system default)."""
    try:
        return int(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT))
    except (OSError, ValueError, AttributeError) as e:
        raise SocketOptionError(f"TCP_NOTSENT_LOWAT unreadable: {e}") from e


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


def get_congestion(sock: socket.socket) -> str:
    """``sock``'s congestion algorithm name."""
    try:
        raw = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, 16)
    except (OSError, ValueError) as e:
        raise SocketOptionError(f"TCP_CONGESTION unreadable: {e}") from e
    return raw.split(b"\0", 1)[0].decode()


def restart_congestion(sock: socket.socket) -> None:
    """Re-initialise ``sock``'s congestion algorithm (to ``reno`` and back): BBR starts over in STARTUP
    (its bandwidth filter emptied, doubling its rate each round trip) instead of growing a bandwidth it
    measured under a pacing cap by 25 % every eight round trips. Setting the same name is a no-op in the
    kernel, hence the detour."""
    name = get_congestion(sock)
    if name != "reno":
        set_congestion(sock, "reno")
    set_congestion(sock, name)


def set_knobs(sock: socket.socket, *, congestion: str | None = None, pacing: int | None = None,
              restart: bool = False) -> None:
    """``congestion`` (set only where it differs, so a socket's algorithm state is not reset for nothing;
    or, with ``restart``, re-initialised when it is the same) and a ``pacing`` cap in bytes/s (``None``:
    uncapped). Raises ``SocketOptionError`` (``UnknownCongestionAlgorithm``) when the kernel refuses."""
    set_pacing_rate(sock, pacing)
    if congestion is not None and get_congestion(sock) != congestion:
        set_congestion(sock, congestion)
    elif restart:
        restart_congestion(sock)


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


def default_congestion() -> str:
    """The kernel's default algorithm for new sockets (``tcp_congestion_control``); ``""`` if unreadable."""
    words = _sysctl_words("tcp_congestion_control")
    return words[0] if words else ""
