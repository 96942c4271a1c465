"""The sender's connections: how they are dialled and authenticated, and what a lane knows of itself.

Owns: ``Dialer`` (TCP connect with typed ``ConnectError``/``ConnectTimeout``, TLS, the control handshake,
lane authentication, dialling several lanes concurrently and the one immediate retry when a session
opens) and ``Lane`` (one data connection: its channel, liveness, send counters, and the signs that its
receiver dropped it or stopped reading it: ``peer_gone``, ``stalled``). Must not know: transfers,
chunks or the chunk queue, the session's threads, generations or locks, congestion policy (the
caller's ``on_lane_open`` hook runs as each lane connects).
"""

from __future__ import annotations

import errno
import fcntl
import logging
import select
import socket
import ssl
import struct
import termios
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from ..codec import frames as F
from ..congestion.group import LaneHook
from ..congestion.tcpinfo import read_pacing_rate, read_pacing_unsent, try_read
from ..errors import ConnectError, ConnectTimeout, KvwireError
from ..sockopts import UNSENT_MIN, SocketOptionError, set_unsent_limit, tune, unsent_limit
from ._auth import SessionKeys, client_handshake, client_lane
from ._wire import Channel
from .transport import Stream

log = logging.getLogger("kvwire.tcp")

#: a path whose TCP handshake took this long or more is long (``tcpinfo.handshake_rtt`` of the control
#: connection): a session on it that may grow its lanes (its controller's ``max_lanes``) opens them all in
#: its first dial round, parked until used, since every later round costs three of its round trips (TCP,
#: then the lane's challenge and proof) and blocks whoever asked for the lanes (the controller's thread, a
#: warm-up). A rack's or a metro link's paths (up to ~10 ms) stay on the lanes asked for.
#: ``kvwire.probe.WARM_MIN_RTT`` is this too: a session on such a path is warmed on every lane its
#: controller may use
LONG_PATH_RTT = 0.015
#: a lane that dies within this many seconds of (re)opening waits before its next re-dial (``Lane.redial_delay``);
#: one that does so ``MAX_QUICK_DEATHS`` times in a row is given up (the session fails once no lane is left)
LANE_SETTLE = 1.0
MAX_QUICK_DEATHS = 10


@dataclass(frozen=True)
class LaneInfo:
    """What a session says of one of its lanes (``Session.lane_info()``): a snapshot."""

    index: int
    sock: socket.socket  #: for TCP_INFO (an unconnected socket while the lane is being re-dialled)
    bytes_sent: int  #: payload bytes put on the lane, re-sends included
    chunks_sent: int
    alive: bool  #: connected
    active: bool  #: pulls chunks (``Session.set_active_lanes``); a parked lane stays connected


class Lane:
    """One data connection of a session. Its counters have one writer (the lane's thread)."""

    def __init__(self, index: int, ch: Stream | None) -> None:
        self.index = index
        # None: it failed to open with the session and its thread re-dials it; until then an unconnected
        # socket stands in, so whoever looks at lane sockets (metrics, the bench) finds one
        self.ch: Stream = ch if ch is not None else Channel(socket.socket(), F.DEFAULT_LIMITS)
        self.alive = ch is not None
        self.chunks_sent = 0
        self.bytes_sent = 0
        self.progress_at = time.monotonic()  # last sign the receiver reads this lane (see stalled)
        self.unsent = 0  # bytes in the socket's send queue when last looked at
        self.unsent_bound = 0  # the TCP_NOTSENT_LOWAT set on the socket (0: none; see bound_unsent)
        self._retrans_closed = 0  # segments retransmitted on the channels this lane closed (see close)
        self.opened_at = time.monotonic()  # when its channel last (re)opened
        #: how long the next re-dial waits first: doubles each time the lane dies within ``LANE_SETTLE`` s of
        #: opening (a receiver that cuts every new lane at once was re-dialled 7,323 times in 5 s), else 0
        self.redial_delay = 0.0
        self.quick_deaths = 0  # times in a row it died within ``LANE_SETTLE`` s of opening
        self._channel = threading.Lock()  # close, reopened and retransmits: one channel's count is read once

    def sending(self, nbytes: int) -> None:
        """A chunk of ``nbytes`` payload is about to be written: counted now, since the receiver may verify and
        acknowledge it (ending its transfer) before the write returns, and whoever reads the counters once
        the transfer ended must find its bytes there."""
        self.chunks_sent += 1
        self.bytes_sent += nbytes

    def sent(self) -> None:
        """The chunk went into the socket: that counts as progress."""
        self.progress_at, self.unsent = time.monotonic(), _unsent(self.ch.sock)

    def close(self) -> None:
        """Close the lane's channel, keeping what its socket retransmitted (``retransmits``): the kernel's
        count goes with the socket. Idempotent."""
        with self._channel:
            self._retrans_closed += _retransmitted(self.ch.sock)
            self.ch.close()

    def retransmits(self) -> int:
        """TCP segments retransmitted on this lane since it first opened: on the channels it closed (a lane
        re-dialled after a failure) and on the current one (``TCP_INFO`` total_retrans). One getsockopt."""
        with self._channel:
            return self._retrans_closed + _retransmitted(self.ch.sock)

    def reopened(self, ch: Stream) -> None:
        """The lane was re-dialled: ``ch`` replaces its dead channel."""
        with self._channel:
            self.ch = ch
        self.alive = True
        self.progress_at = self.opened_at = time.monotonic()
        self.unsent_bound = 0

    def bound_unsent(self) -> None:
        """Before a chunk is written: hold at most ``UNSENT_SECONDS`` of the lane's current sending rate
        unsent (``sockopts.unsent_limit`` of the kernel's pacing rate, a cap included; no bound where that
        is beyond any send buffer, as on loopback). A send buffer sized for a long path takes seconds of a
        paced lane's share at once, so chunks written to it wait there while other lanes idle, and a layer
        written last queues behind earlier ones; bounded, a write returns once the socket is nearly
        drained and the next chunk goes to whichever lane is free. Re-set only when it moves by a quarter."""
        want = unsent_limit(read_pacing_rate(self.ch.sock))
        have = self.unsent_bound
        if want == have or (want and have and abs(want - have) < have // 4):
            return
        try:
            set_unsent_limit(self.ch.sock, want)
            self.unsent_bound = want
        except SocketOptionError:
            pass  # (a closed socket: the write that follows fails the lane)

    def backlogged(self) -> bool:
        """The lane holds more unsent than twice ``unsent_limit`` of the rate its kernel paces it at now, plus
        what a write may put past its bound (``UNSENT_MIN``; one ``TCP_INFO`` read): its rate fell after its
        bound was set (a pacing cap lowered, its BBR's estimate down), so what it holds takes longer than the
        bound meant to leave, and a chunk it took now would wait behind that. Once a streamed layer's chunk
        went on a lane whose kernel paced it at 12 of its 120 Mbit/s, behind 446 kB it held unsent: it
        arrived 551 ms after it went, where its layer's others took 60-80 ms. Never on an unbounded lane."""
        rate, unsent = read_pacing_unsent(self.ch.sock)
        bound = unsent_limit(rate)
        return bool(bound) and unsent > 2 * bound + UNSENT_MIN

    def drain(self, timeout: float) -> None:
        """Bound the lane's unsent bytes at its rate now (``bound_unsent``) and wait up to ``timeout`` for the
        socket to be down to half that (the kernel's writable mark)."""
        self.bound_unsent()
        try:
            select.select([], [self.ch.sock], [], timeout)
        except (OSError, ValueError):
            time.sleep(timeout)  # (a socket closing meanwhile: the caller sees it next)

    def stalled(self, timeout: float, acked_at: float = float("-inf")) -> bool:
        """An idle lane with chunks in flight (the caller knows it has some): the receiver has neither
        acknowledged one of them (the last at ``acked_at``, monotonic) nor taken a byte off the socket's
        send queue for ``timeout``. Catches a peer that stopped reading as well as a blackhole, with the
        control connection healthy."""
        now = time.monotonic()
        unsent = _unsent(self.ch.sock)
        if unsent < self.unsent:
            self.progress_at = now
        elif acked_at > self.progress_at:
            self.progress_at = acked_at
        self.unsent = unsent
        return now - self.progress_at > timeout

    def peer_gone(self) -> bool:
        """Receivers never write on a lane after its WELCOME: readable means EOF or reset (on TLS, unless
        the record was only a session ticket)."""
        sock = self.ch.sock
        try:
            r, _, _ = select.select([sock], [], [], 0)
            if not r:
                return False
            if isinstance(sock, ssl.SSLSocket):
                old = sock.gettimeout()
                sock.settimeout(0)
                try:
                    sock.recv(1)
                except ssl.SSLWantReadError:
                    return False
                finally:
                    sock.settimeout(old)
            return True
        except (OSError, ValueError):
            return True


class Dialer:
    """Opens a session's connections to one receiver (the TCP ``transport.Connector``). ``keys`` is set
    by ``handshake``; lanes authenticate against the latest one."""

    def __init__(self, host: str, port: int, *, key: bytes, ssl_context: ssl.SSLContext | None,
                 server_hostname: str, connect_timeout: float, peer_timeout: float, stall_timeout: float,
                 limits: F.Limits, on_lane_open: Callable[[], LaneHook | None]) -> None:
        self.address = (host, port)
        self.key = key
        self.ssl_context = ssl_context
        self.server_hostname = server_hostname
        self.connect_timeout = connect_timeout
        self.peer_timeout = peer_timeout
        self.stall_timeout = stall_timeout
        self.limits = limits
        self.on_lane_open = on_lane_open  # read as each lane connects: the session's hook may change
        self.keys: SessionKeys | None = None

    def open(self) -> Channel:
        """A connected (and, with TLS, wrapped) channel; nothing sent on it yet."""
        host, port = self.address
        try:
            sock = socket.create_connection(self.address, timeout=self.connect_timeout)
        except socket.gaierror as e:
            raise ConnectError(host, port, f"cannot resolve the name ({e.strerror})", e.errno) from e
        except TimeoutError as e:
            raise ConnectTimeout(host, port, f"no answer within connect_timeout={self.connect_timeout:g} s",
                                 errno.ETIMEDOUT) from e
        except OSError as e:
            raise ConnectError(host, port, e.strerror or str(e) or type(e).__name__, e.errno) from e
        try:
            tune(sock, self.peer_timeout)
            if self.ssl_context is not None:
                sock = self.ssl_context.wrap_socket(sock, server_hostname=self.server_hostname)
        except BaseException:
            sock.close()
            raise
        return Channel(sock, self.limits)

    def handshake(self, ctrl: Channel, lanes: int) -> dict[str, Any]:
        """Authenticate ``ctrl`` as a new session's control connection announcing ``lanes``; sets
        ``keys`` and returns the receiver's limits. Typed errors name ``host:port``; ``ctrl`` is left
        for the caller to close."""
        host, port = self.address
        try:
            keys, server_limits = client_handshake(ctrl, self.key, lanes, self.peer_timeout)
        except (ConnectError, ssl.SSLError):
            raise
        except TimeoutError as e:
            raise ConnectTimeout(host, port, f"no handshake reply within connect_timeout={self.connect_timeout:g}"
                                 " s", errno.ETIMEDOUT) from e
        except OSError as e:
            raise ConnectError(host, port, f"connection lost during the handshake: {e}", e.errno) from e
        ctrl.sock.settimeout(None)
        self.keys = keys
        return server_limits

    def open_lane(self, index: int) -> Channel:
        """Connect and authenticate lane ``index`` of the current session, then run ``on_lane_open``."""
        assert self.keys is not None, "handshake() first"
        ch = self.open()
        host, port = self.address
        try:
            client_lane(ch, self.key, self.keys, index)
            ch.sock.settimeout(self.stall_timeout)
        except BaseException as e:
            ch.close()
            if isinstance(e, TimeoutError) and not isinstance(e, ConnectError):  # typed and named as the control's
                raise ConnectTimeout(host, port, f"lane {index}: no handshake reply within connect_timeout="
                                     f"{self.connect_timeout:g} s", errno.ETIMEDOUT) from e
            if isinstance(e, OSError) and not isinstance(e, (ConnectError, ssl.SSLError)):
                raise ConnectError(host, port, f"lane {index}: connection lost during the handshake: {e}",
                                   e.errno) from e
            raise
        hook = self.on_lane_open()
        if hook is not None:
            try:
                hook(index, ch.sock)
            except Exception:  # a congestion knob the kernel refused must not cost the lane
                pass
        return ch

    def dial_each(self, indices: Sequence[int], concurrency: int) -> list[Channel | BaseException]:
        """Open lanes ``indices`` concurrently: each costs a TCP connect plus a round trip of lane
        authentication (more with TLS), so on a long link dialling them one after another would cost
        ~2 RTT per lane. At most ``concurrency`` at once (the receiver bounds handshakes in flight).
        Returns each lane's channel or the error that stopped it."""
        if len(indices) <= 1:
            try:
                return [self.open_lane(i) for i in indices]
            except (OSError, KvwireError) as e:
                return [e]
        with ThreadPoolExecutor(min(len(indices), concurrency), "kvwire-dial") as pool:
            futures = [pool.submit(self.open_lane, i) for i in indices]
            results: list[Channel | BaseException] = []
            for f in futures:
                try:
                    results.append(f.result())
                except BaseException as e:  # noqa: BLE001 - handed back to the caller
                    results.append(e)
        return results

    def open_lanes(self, n: int, concurrency: int) -> list[Lane]:
        """Lanes 0..n-1 of a new session. A lane that fails is retried once at once; lanes that still
        fail come back not alive (their thread re-dials them). Raises the first error when none opens."""
        results = self.dial_each(range(n), concurrency)
        again = [i for i, r in enumerate(results) if isinstance(r, BaseException)]
        if again and len(again) < n:  # one bad lane handshake: try those once more at once
            for i, r in zip(again, self.dial_each(again, concurrency)):
                results[i] = r
        if all(isinstance(r, BaseException) for r in results):
            raise next(r for r in results if isinstance(r, BaseException))
        opened = [Lane(i, r if isinstance(r, Channel) else None) for i, r in enumerate(results)]
        if again:
            log.warning("kvwire: %d of %d lanes did not open; re-dialling them", n - sum(
                lane.alive for lane in opened), n)
        return opened

    def dial_lanes(self, indices: range, concurrency: int) -> tuple[list[Lane], BaseException | None]:
        """Open lanes ``indices`` (see ``dial_each``). Returns the lanes of the longest run from
        ``indices.start`` that opened (lane indices stay contiguous), and the first error; lanes past a
        failure are closed."""
        results = self.dial_each(indices, concurrency)
        opened: list[Lane] = []
        err: BaseException | None = None
        for i, r in zip(indices, results):
            if isinstance(r, BaseException):
                err = err or r
            elif err is None:
                opened.append(Lane(i, r))
            else:
                r.close()
        return opened, err


def _unsent(sock: socket.socket) -> int:
    """Bytes in the socket's send queue, not yet acknowledged by the peer's kernel (SIOCOUTQ); -1
    where the platform does not say (then only acknowledgements count as progress)."""
    try:
        return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0"))[0]
    except (OSError, ValueError, AttributeError):
        return -1


def _retransmitted(sock: socket.socket) -> int:
    """``TCP_INFO`` total_retrans of ``sock``; 0 once it is closed (or not TCP)."""
    info = try_read(sock)
    return (info.total_retrans or 0) if info is not None else 0
