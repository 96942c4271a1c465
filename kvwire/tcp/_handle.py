"""Transfer outcome: exactly one terminal state, observable by blocking, future, callback or await.

Owns: the mapping from a state machine's terminal state to a ``concurrent.futures.Future`` and to
the typed exceptions callers see. Must not know: sockets or the wire format.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import numbers
import os
import threading
import time
from collections.abc import Callable, Generator
from typing import Any

from .._args import check_wait_timeout
from ..codec.transfer import State
from ..errors import KvwireError, LayoutMismatch, TransferCancelled, TransferFailed, TransferTimedOut
from ._callbacks import Callbacks
from ._fork import check_process

log = logging.getLogger("kvwire.tcp")

_EXC = {State.FAILED: TransferFailed, State.TIMED_OUT: TransferTimedOut, State.CANCELLED: TransferCancelled}


class _Future(concurrent.futures.Future[Any]):
    """A future whose done callbacks run on a ``Callbacks`` pool instead of the thread that resolves
    it (a protocol thread), and are dropped once run (so they hold nothing afterwards). One added once
    the future is done is queued there too (``concurrent.futures`` would run it at once, on the adding
    thread): behind the handle's callbacks queued before it, never beside them."""

    def __init__(self, callbacks: Callbacks | None, key: object) -> None:
        super().__init__()
        self._callbacks = callbacks
        self._key = key
        self._invoked = False  # the done callbacks were handed to the pool: later ones go straight there

    def cancel(self) -> bool:
        """A transfer is cancelled through its handle (``cancel()``), never through its future."""
        return False

    def add_done_callback(self, fn: Callable[[concurrent.futures.Future[Any]], object]) -> None:
        if not callable(fn):  # (it would fail on the pool, logged, long after this call returned)
            raise TypeError(f"add_done_callback takes a callable fn(future), not {type(fn).__name__}")
        if self._callbacks is None:
            super().add_done_callback(fn)
            return
        with self._condition:  # (against _invoke_callbacks: queued in the order added)
            if not self._invoked:
                self._done_callbacks.append(fn)
                return
            self._callbacks.submit(self._key, fn, self)

    def _invoke_callbacks(self) -> None:
        with self._condition:
            self._invoked = True
            fns: list[Callable[[concurrent.futures.Future[Any]], object]] = self._done_callbacks  # type: ignore[has-type]
            self._done_callbacks = []  # type: ignore[var-annotated]
            if self._callbacks is not None:  # queued under the lock: in order with add_done_callback's
                for fn in fns:
                    self._callbacks.submit(self._key, fn, self)
                return
        for fn in fns:  # (no pool: here, as concurrent.futures does, but not under the lock)
            try:
                fn(self)
            except Exception:  # noqa: BLE001 - as concurrent.futures does
                log.exception("exception calling callback for %r", self)


class Outcome:
    """Resolved once. ``result`` returns the handle or raises TransferFailed/TimedOut/Cancelled.

    Done callbacks (``add_done_callback``, ``future.add_done_callback``) run on the session's or
    receiver's callback pool, after the handle's layer callbacks, never on a protocol thread, nor on the
    adding thread when the handle has already ended (they are queued behind its earlier callbacks). The
    future's value is None (``result()`` and ``await`` give the handle), so the handle and its future
    form no reference cycle: an ended handle's buffers are freed as soon as the caller drops it.
    """

    def __init__(self, callbacks: Callbacks | None = None) -> None:
        self._callback_key = object()  # orders this handle's callbacks; not the handle: no cycle
        self._callbacks = callbacks
        self.future: concurrent.futures.Future[Any] = _Future(callbacks, self._callback_key)
        self._state = State.ACTIVE
        self._reason = ""
        self._lock = threading.Lock()
        self._pid = os.getpid()  # (in a child forked from it nothing would ever end the handle: ``_fork``)

    @property
    def state(self) -> State:
        return self._state

    @property
    def reason(self) -> str:
        return self._reason

    @property
    def finished(self) -> bool:
        return self._state.terminal

    def resolve(self, state: State, reason: str = "") -> bool:
        """Move to the terminal ``state`` (once; later calls are ignored and return False). For the
        driver that carries the transfer, never for its user (who calls ``cancel``)."""
        return self._resolve(state, reason)

    def _resolve(self, state: State, reason: str = "") -> bool:
        with self._lock:
            if self._state.terminal:
                return False
            self._state, self._reason = state, reason
        if state is State.DONE:
            self.future.set_result(None)
        else:
            self.future.set_exception(_EXC[state](reason or state.value))
        return True

    def call_soon(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run user code ``fn(*args)`` off the calling (protocol) thread, in order with this handle's
        other callbacks; inline where the handle has no pool."""
        self._call_soon(fn, *args)

    def _queue_calls(self, calls: list[tuple[Callable[..., Any], tuple[Any, ...]]]
                     ) -> list[tuple[Callable[..., Any], tuple[Any, ...]]]:
        """Queue ``calls`` (``(fn, args)``) on this handle's pool, in order behind its calls queued so
        far, and return ``[]``; where the handle has no pool, return them for the caller to run (by
        ``_call_soon``) once it has released its locks. Called under the lock that orders the events
        the calls report, so that they are queued in the order the events happened: it only enqueues."""
        if self._callbacks is None:
            return calls
        for fn, args in calls:
            self._callbacks.submit(self._callback_key, fn, *args)
        return []

    def _call_soon(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run user code ``fn(*args)`` off the calling (protocol) thread, in order with this handle's
        other callbacks; inline where the handle has no pool."""
        if self._callbacks is not None:
            self._callbacks.submit(self._callback_key, fn, *args)
            return
        try:
            fn(*args)
        except Exception:  # noqa: BLE001 - user code must not take a protocol thread down
            log.exception("callback %r failed", fn)

    def result(self, timeout: float | None = None) -> Any:
        """Wait for the terminal state; returns this handle when done. Builtin TimeoutError if this
        wait (not the transfer) times out. ``KvwireError`` at once in a forked child (``_fork``) while it runs:
        the threads that would end it are in the parent. ``timeout``: seconds (<= 0: no wait) or ``None``;
        ``TypeError`` for a non-number, ``ValueError`` for NaN or infinity."""
        timeout = check_wait_timeout("timeout", timeout)
        if not self.finished:
            check_process(self._pid, "transfer")
        try:
            exc = self.future.exception(timeout)
        except concurrent.futures.TimeoutError:
            raise TimeoutError(f"still {self._state.value} after waiting {timeout}s") from None
        if exc is not None:  # a fresh exception: the stored one would keep this frame (and self) alive
            raise type(exc)(*exc.args) from None
        return self

    def add_done_callback(self, fn: Callable[[concurrent.futures.Future[Any]], None]) -> None:
        """``fn(future)`` once the handle ends, on its callback pool. ``KvwireError`` at once in a forked child
        while it runs (``_fork``: nothing there would end it, and the pool's threads are the parent's)."""
        if not self.finished:
            check_process(self._pid, "transfer")
        self.future.add_done_callback(fn)

    def __await__(self) -> Generator[Any, None, Any]:
        yield from asyncio.wrap_future(self.future).__await__()
        return self


class LayerOutcome(Outcome):
    """An outcome whose layers become ready one by one (a transfer, or a request gathered from several):
    ``layer_times`` (layer -> when it became ready), ``layers_ready`` and ``wait_layer``. The owner records a
    layer in ``layer_times`` under ``_cond`` and notifies it; ``_layer_callbacks`` are the ``on_layer``
    callbacks it owes."""

    _ended = "transfer"  # what wait_layer says ended without the layer

    def __init__(self, callbacks: Callbacks | None = None) -> None:
        super().__init__(callbacks)
        self.layer_times: dict[int, float] = {}
        self.started = time.monotonic()
        self._cond = threading.Condition()
        self._layer_callbacks: list[Callable[[int], None]] = []

    @property
    def layers_ready(self) -> set[int]:
        with self._cond:
            return set(self.layer_times)

    def _layer_count(self) -> int | None:
        """How many layers the outcome's layout has, when it is known (``wait_layer`` refuses others at once)."""
        return None

    def wait_layer(self, layer: int, timeout: float | None = None) -> None:
        """Return once ``layer`` is ready; raise if the outcome ended without it. ``LayoutMismatch`` at once
        for a layer that is not an int, is negative, or is past the layout's last one when the layout is known;
        ``timeout`` as ``result``'s."""
        timeout = check_wait_timeout("timeout", timeout)
        n = self._layer_count()
        if (isinstance(layer, bool) or not isinstance(layer, numbers.Integral) or layer < 0
                or (n is not None and layer >= n)):
            span = f" (0..{n - 1})" if n is not None else ""
            raise LayoutMismatch(f"layer {layer!r} is not a layer of the layout{span}")
        if not self.finished:
            check_process(self._pid, "transfer")
        end = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while layer not in self.layer_times:
                if self.finished:
                    self.result(0)  # raises the terminal error
                    raise KvwireError(f"{self._ended} done but layer {layer} is not in it")
                left = None if end is None else end - time.monotonic()
                if left is not None and left <= 0:
                    raise TimeoutError(f"layer {layer} not ready after {timeout}s")
                self._cond.wait(left if left is not None else 1.0)
