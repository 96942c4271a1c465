"""Sample ``TCP_INFO`` of live sockets on a thread and publish ``LinkState`` to subscribers.

Owns: ``LinkMonitor`` — the sampling thread (fixed period), the socket provider call, keying samples by
file descriptor, feeding a ``LinkEstimator``, the subscriber list and the latest state. Sockets that are
closed or not TCP are skipped; a failing provider or subscriber is logged and never stops the thread.
Must not know: sessions (it only calls the provider), policy (subscribers decide what to do).
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable, Sequence

from .estimator import LaneKey, LinkEstimator, LinkState
from .tcpinfo import TcpInfo, sample

log = logging.getLogger("kvwire.congestion")

SocketsProvider = Callable[[], Sequence[socket.socket]]
Subscriber = Callable[[LinkState], None]


class LinkMonitor:
    """``with LinkMonitor(session.lane_sockets, interval=0.1) as mon: mon.subscribe(cb)``.

    Callbacks run on the monitor thread, in subscription order; keep them short. ``poll()`` takes one
    sample synchronously (also usable without ``start()``).
    """

    def __init__(self, sockets_provider: SocketsProvider, interval: float = 0.1,
                 estimator: LinkEstimator | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if interval <= 0:
            raise ValueError("interval must be positive")
        self.sockets_provider = sockets_provider
        self.interval = interval
        self.estimator = estimator or LinkEstimator()
        self._clock = clock
        self._lock = threading.Lock()  # serialises polls (estimator is not thread-safe)
        self._cond = threading.Condition()
        self._subscribers: list[Subscriber] = []
        self._latest: LinkState | None = None
        self._published = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def seed_capacity(self, bytes_per_s: float) -> None:
        """``LinkEstimator.seed_capacity`` between two samples (an active probe's result)."""
        with self._lock:
            self.estimator.seed_capacity(bytes_per_s, self._clock())

    def seed_buffer(self, queued: float) -> None:
        """``LinkEstimator.seed_buffer`` between two samples (an active probe's overflow)."""
        with self._lock:
            self.estimator.seed_buffer(queued, self._clock())

    # ------------------------------------------------------------ subscribers
    def subscribe(self, callback: Subscriber) -> Callable[[], None]:
        """Call ``callback(state)`` after every sample; returns a function that unsubscribes."""
        with self._cond:
            self._subscribers.append(callback)

        def unsubscribe() -> None:
            with self._cond:
                if callback in self._subscribers:
                    self._subscribers.remove(callback)

        return unsubscribe

    def latest(self) -> LinkState | None:
        """The most recent state, or ``None`` before the first sample."""
        with self._cond:
            return self._latest

    def wait_next(self, timeout: float | None = None) -> LinkState | None:
        """Block until a state newer than the current one is published; ``None`` on timeout."""
        with self._cond:
            seen = self._published
            self._cond.wait_for(lambda: self._published > seen, timeout)
            return self._latest if self._published > seen else None

    # ------------------------------------------------------------ sampling
    def sample(self) -> dict[LaneKey, TcpInfo]:
        """One ``TCP_INFO`` per live TCP socket from the provider, keyed by file descriptor."""
        try:
            socks = list(self.sockets_provider())
        except Exception:  # the provider belongs to someone else; keep sampling
            log.exception("link monitor: sockets provider failed")
            return {}
        return {fd: info for fd, info in sample(socks).items()}  # closed or not TCP: the lane is gone, left out

    def poll(self) -> LinkState:
        """Sample now, update the estimate, publish it, return it."""
        with self._lock:
            t0 = self._clock()
            samples = self.sample()
            # stamp the middle of the round: a thread descheduled mid-round skews both intervals less
            state = self.estimator.update((t0 + self._clock()) / 2, samples)
        with self._cond:
            self._latest = state
            self._published += 1
            subscribers = list(self._subscribers)
            self._cond.notify_all()
        for cb in subscribers:
            try:
                cb(state)
            except Exception:
                log.exception("link monitor: subscriber %r failed", cb)
        return state

    # ------------------------------------------------------------ thread
    def start(self) -> LinkMonitor:
        if self._thread is not None:
            raise RuntimeError("LinkMonitor already started")
        self._thread = threading.Thread(target=self._run, name="kvwire-linkmon", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop sampling and join the thread (idempotent)."""
        self._stop.set()
        t = self._thread
        if t is not None and t is not threading.current_thread():
            t.join(timeout)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def stopped(self) -> bool:
        """``stop()`` was called (it cannot be started again)."""
        return self._stop.is_set()

    def __enter__(self) -> LinkMonitor:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self) -> None:
        next_t = time.monotonic()
        while not self._stop.is_set():
            try:
                self.poll()
            except Exception:  # never let one bad round kill the monitor
                log.exception("link monitor: sampling round failed")
            next_t += self.interval
            delay = next_t - time.monotonic()
            if delay < 0:  # fell behind (CPU starved): skip the missed ticks, keep the period
                next_t = time.monotonic()
                delay = 0.0
            self._stop.wait(delay)
