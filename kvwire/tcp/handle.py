"""Transfer outcome: exactly one terminal state, observable by blocking, future, callback or await.

Owns: the mapping from a state machine's terminal state to a ``concurrent.futures.Future`` and to
the typed exceptions callers see. Must not know: sockets or the wire format.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Callable, Generator
from typing import Any

from ..codec.transfer import State
from ..errors import TransferCancelled, TransferFailed, TransferTimedOut

_EXC = {State.FAILED: TransferFailed, State.TIMED_OUT: TransferTimedOut, State.CANCELLED: TransferCancelled}


class Outcome:
    """Resolved once. ``result`` returns the value or raises TransferFailed/TimedOut/Cancelled."""

    def __init__(self) -> None:
        self.future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        self._state = State.ACTIVE
        self._reason = ""
        self._lock = threading.Lock()

    @property
    def state(self) -> State:
        return self._state

    @property
    def reason(self) -> str:
        return self._reason

    @property
    def finished(self) -> bool:
        return self._state.terminal

    def _resolve(self, state: State, reason: str = "", value: Any = None) -> bool:
        with self._lock:
            if self._state.terminal:
                return False
            self._state, self._reason = state, reason
        if state is State.DONE:
            self.future.set_result(value)
        else:
            self.future.set_exception(_EXC[state](reason or state.value))
        return True

    def result(self, timeout: float | None = None) -> Any:
        """Wait for the terminal state. Builtin TimeoutError if this wait (not the transfer) times out."""
        try:
            return self.future.result(timeout)
        except concurrent.futures.TimeoutError:
            raise TimeoutError(f"still {self._state.value} after waiting {timeout}s") from None

    def add_done_callback(self, fn: Callable[[concurrent.futures.Future[Any]], None]) -> None:
        self.future.add_done_callback(fn)

    def __await__(self) -> Generator[Any, None, Any]:
        return asyncio.wrap_future(self.future).__await__()
