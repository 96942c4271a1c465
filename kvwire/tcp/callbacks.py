"""User callbacks, run off the protocol threads.

Owns: ``Callbacks``, a small pool of worker threads (started on demand, gone after a second idle) that runs user
code: transfer futures' done callbacks, ``on_layer``, ``on_layer_acked``, ``on_transfer``. Calls
submitted under one key run one at a time, in submission order (a handle's layers before its outcome);
different keys run side by side, on at most ``workers`` threads. Submitting never blocks, so a slow
or blocking callback delays only the callbacks queued behind it, never acks, COMPLETE, heartbeats or
other transfers. Must not know: sockets, transfers or the wire format.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from typing import Any

log = logging.getLogger("kvwire.tcp")


class Callbacks:
    """Per-key ordered, pool-wide concurrent execution of user callbacks (see module docstring)."""

    def __init__(self, name: str, workers: int = 4, idle: float = 1.0) -> None:
        self.name = name
        self.workers = workers
        self.idle = idle  # seconds a worker waits for more work before it exits
        self._lock = threading.Lock()
        self._work_ready = threading.Condition(self._lock)
        self._waiting = 0  # idle workers waiting on _work_ready
        self._queues: dict[object, deque[tuple[Callable[..., Any], tuple[Any, ...]]]] = {}
        self._ready: deque[object] = deque()  # keys with calls queued and no worker on them
        self._running = 0

    def submit(self, key: object, fn: Callable[..., Any], *args: Any) -> None:
        """Queue ``fn(*args)`` behind the calls already queued under ``key``; returns at once."""
        with self._lock:
            q = self._queues.get(key)
            if q is None:
                self._queues[key] = q = deque()
                self._ready.append(key)
            q.append((fn, args))
            start = False
            if self._ready and self._waiting:
                self._work_ready.notify()
            elif self._ready and self._running < self.workers:
                start = True
                self._running += 1
        if start:
            threading.Thread(target=self._work, name=f"kvwire-{self.name}", daemon=True).start()

    def _work(self) -> None:
        while True:
            with self._lock:
                if not self._ready:
                    self._waiting += 1
                    self._work_ready.wait(self.idle)
                    self._waiting -= 1
                if not self._ready:
                    self._running -= 1
                    return
                key = self._ready.popleft()
                q = self._queues[key]
            while True:
                with self._lock:
                    if not q:
                        del self._queues[key]
                        break
                    fn, args = q.popleft()
                try:
                    fn(*args)
                except BaseException:  # noqa: BLE001 - user code must not take the worker down
                    log.exception("kvwire callback %r failed", fn)
                del fn, args
