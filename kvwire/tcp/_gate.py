"""Admission for unauthenticated connections: a bounded table of handshakes in progress.

Owns: how many connections may be mid-handshake (in all and per source address), the total deadline
of each handshake, and which one goes when the table is full: a new connection always gets in, and
the oldest handshake of the source holding the most slots is cut (``shutdown``, which wakes the
thread reading it, or the ``cut`` it was admitted with: an event loop's connection aborts its
transport). So a slow-loris flood can delay nobody by more than the time it takes to open as
many connections as the table holds, and a source cannot take more than ``per_source`` slots. The
owner calls ``reap()`` periodically (its monitor tick) to cut handshakes past their deadline.
Must not know: what the handshake says, sessions or transfers. Used by the library's ``Receiver``,
by the bench's control port, and (with ``cut``) by the PrfaaS HTTP servers (``prfaas.httpgate``).
"""

from __future__ import annotations

import socket
import threading
import time
from collections import Counter
from collections.abc import Callable


class Ticket:
    """One connection mid-handshake. ``sock`` may be replaced (TLS wraps it) before ``done``; ``cut``, when
    given, is how it is cut instead of shutting ``sock`` down (called under the gate's lock: it must not call
    back into the gate)."""

    __slots__ = ("sock", "source", "deadline", "pending", "cut")

    def __init__(self, sock: socket.socket | None, source: str, deadline: float,
                 cut: Callable[[], None] | None = None) -> None:
        self.sock = sock
        self.source = source
        self.deadline = deadline
        self.pending = True
        self.cut = cut


def _cut(t: Ticket) -> None:
    """Wake whoever reads ``t``'s connection (the base-class shutdown: an SSLSocket's own drops its SSL
    object), or call its ``cut``."""
    if t.cut is not None:
        t.cut()
        return
    if t.sock is None:
        return
    try:
        socket.socket.shutdown(t.sock, socket.SHUT_RDWR)
    except OSError:
        pass


class HandshakeGate:
    """At most ``max_pending`` handshakes, ``per_source`` per source, each cut after ``deadline`` s."""

    def __init__(self, max_pending: int, per_source: int, deadline: float) -> None:
        if max_pending < 1 or per_source < 1 or deadline <= 0:
            raise ValueError("max_pending and per_source must be >= 1, deadline > 0")
        self.max_pending = max_pending
        self.per_source = per_source
        self.deadline = deadline
        self._lock = threading.Lock()
        self._pending: dict[Ticket, None] = {}  # insertion order = age
        self._by_source: Counter[str] = Counter()
        self.evicted = 0
        self.expired = 0

    def __len__(self) -> int:
        with self._lock:
            return len(self._pending)

    def admit(self, sock: socket.socket | None, source: str, cut: Callable[[], None] | None = None) -> Ticket:
        """Register a new connection, cutting the handshake that must make room for it. ``cut``: how to cut
        this one (default: shut ``sock`` down)."""
        t = Ticket(sock, source, time.monotonic() + self.deadline, cut)
        with self._lock:
            if self._by_source[source] >= self.per_source:
                self._evict(source)
            elif len(self._pending) >= self.max_pending:
                self._evict(self._by_source.most_common(1)[0][0])
            self._pending[t] = None
            self._by_source[source] += 1
        return t

    def done(self, t: Ticket) -> None:
        """The handshake ended (authenticated, refused or failed): the slot is free. Idempotent."""
        with self._lock:
            self._drop(t)

    def reap(self, now: float | None = None) -> int:
        """Cut every handshake past its deadline; returns how many."""
        now = time.monotonic() if now is None else now
        with self._lock:
            late = [t for t in self._pending if t.deadline <= now]
            for t in late:
                self._drop(t)
                _cut(t)
            self.expired += len(late)
        return len(late)

    def close(self) -> None:
        """Cut every handshake in progress."""
        with self._lock:
            for t in list(self._pending):
                self._drop(t)
                _cut(t)

    def _evict(self, source: str) -> None:
        oldest = next(t for t in self._pending if t.source == source)
        self._drop(oldest)
        _cut(oldest)  # under the lock: a ticket is never cut after its done()
        self.evicted += 1

    def _drop(self, t: Ticket) -> None:
        if t.pending:
            t.pending = False
            del self._pending[t]
            self._by_source[t.source] -= 1
            if not self._by_source[t.source]:
                del self._by_source[t.source]
