"""One kvwire session per peer, for the processes of the PrfaaS deployment that send caches.

Owns: ``SessionPool``: the session to each peer, dialled on first use by one caller while others asking for the
same peer wait for it (never two dials to one peer), replaced when it is no longer healthy, and all closed by
``close`` (after which ``get`` raises). Hooks let the owner put a new session under its link control
(``on_new``, which may raise: the session is then closed) and take an old one out (``on_drop``).
Must not know: what is sent, routing, metrics, or kvwire internals (public ``Session`` API only).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import kvwire

from ..errors import KvwireError

Peer = tuple[str, int]


class SessionPool:
    def __init__(self, dial: Callable[[Peer], kvwire.Session], *, name: str = "session pool",
                 on_new: Callable[[kvwire.Session, Peer], None] | None = None,
                 on_drop: Callable[[kvwire.Session], None] | None = None) -> None:
        self._dial, self._name = dial, name
        self._on_new = on_new
        self._on_drop = on_drop
        self._lock = threading.Lock()
        self._sessions: dict[Peer, kvwire.Session] = {}
        self._dialling: dict[Peer, threading.Lock] = {}
        self._closed = False

    def get(self, peer: Peer) -> kvwire.Session:
        """The one healthy session to ``peer`` (dialled now if there is none)."""
        with self._lock:
            dialling = self._dialling.setdefault(peer, threading.Lock())
        with dialling:
            with self._lock:
                if self._closed:
                    raise KvwireError(f"{self._name} closed")
                old = self._sessions.pop(peer, None)
                if old is not None and old.healthy:
                    self._sessions[peer] = old
                    return old
            if old is not None:
                self._drop(old)
            fresh = self._dial(peer)
            try:
                if self._on_new is not None:
                    self._on_new(fresh, peer)
            except BaseException:
                self._drop(fresh)
                raise
            with self._lock:
                closed = self._closed
                if not closed:
                    self._sessions[peer] = fresh
            if closed:
                self._drop(fresh)
                raise KvwireError(f"{self._name} closed")
            return fresh

    def sessions(self) -> list[kvwire.Session]:
        with self._lock:
            return list(self._sessions.values())

    def lane_sockets(self) -> list[Any]:
        """Every live lane socket of every session (what a ``LinkMonitor`` samples)."""
        return [s for session in self.sessions() for s in session.lane_sockets()]

    def close(self) -> None:
        with self._lock:
            self._closed = True
            sessions, self._sessions = list(self._sessions.values()), {}
        for s in sessions:
            self._drop(s)

    def _drop(self, session: kvwire.Session) -> None:
        if self._on_drop is not None:
            self._on_drop(session)
        session.close()
