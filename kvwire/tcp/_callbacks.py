"""User callbacks, run off the protocol threads.

Owns: ``Callbacks``, a small pool of worker threads (started on demand, gone after a second idle) that runs user
code: transfer futures' done callbacks, ``on_layer``, ``on_layer_acked``, ``on_transfer``. Calls
submitted under one key run one at a time, in submission order (a handle's layers before its outcome);
different keys run side by side, on at most ``workers`` threads. Submitting never blocks, so a slow
or blocking callback delays only the callbacks queued behind it, never acks, COMPLETE, heartbeats or
other transfers. ``drain`` is what ``close()`` of the owning Receiver/Session calls last: callbacks already
queued (a transfer's outcome, a stager releasing its buffers) run to the end before close returns, bounded
by a timeout, so a closed object's user code is not still running while the program tears down. Must not
know: sockets, transfers or the wire format.
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
        self._pending = 0  # calls submitted and not yet returned
        self._drained = threading.Condition(self._lock)
        self._local = threading.local()  # set on worker threads: drain() from a callback must not wait on itself

    def submit(self, key: object, fn: Callable[..., Any], *args: Any) -> None:
        """Queue ``fn(*args)`` behind the calls already queued under ``key``; returns at once."""
        with self._lock:
            q = self._queues.get(key)
            if q is None:
                self._queues[key] = q = deque()
                self._ready.append(key)
            q.append((fn, args))
            self._pending += 1
            start = False
            if self._ready and self._waiting:
                self._work_ready.notify()
            elif self._ready and self._running < self.workers:
                start = True
                self._running += 1
        if start:
            threading.Thread(target=self._work, name=f"kvwire-{self.name}", daemon=True).start()

    def drain(self, timeout: float = 10.0) -> bool:
        """Wait until every call submitted so far has returned (at most ``timeout`` s); True if it did.
        From a callback it returns at once (False if others are pending): it would wait on itself."""
        with self._lock:
            if getattr(self._local, "worker", False):
                return self._pending == 0
            return self._drained.wait_for(lambda: self._pending == 0, timeout)

    def _work(self) -> None:
        self._local.worker = True
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
                with self._lock:
                    self._pending -= 1
                    if not self._pending:
                        self._drained.notify_all()
