"""Receiver-side transfer handle: layers become readable as they are verified.

Owns: ``IncomingTransfer`` (what the decode engine holds: ``wait_layer``, ``layers()``, ``on_layer``,
``result``, ``cancel``, per-lane accounting) and its terminal-state bookkeeping. Must not know: sockets'
I/O or the wire format; the receiver's session (``rxsession.py``) drives it under the session lock.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from ..codec import frames as F
from ..codec.layout import ModelLayout
from ..codec.manifest import Manifest
from ..codec.plan import ChunkPlan
from ..codec.transfer import ReceiverTransfer, State
from .callbacks import Callbacks
from .handle import LayerOutcome

if TYPE_CHECKING:
    from .rxsession import RxSession
    from .wire import Channel

log = logging.getLogger("kvwire.tcp")


class IncomingTransfer(LayerOutcome):
    """Receiver-side handle of one transfer. Layers become readable as ``wait_layer`` returns."""

    def __init__(self, request_id: str, dest: Any = None, layout: ModelLayout | None = None,
                 state_position: int | None = None, deadline: float | None = None,
                 callbacks: Callbacks | None = None) -> None:
        super().__init__(callbacks)
        self.request_id = request_id
        self.dest = dest
        self.layout = layout
        self.state_position = state_position
        self.deadline = deadline
        self.manifest: Manifest | None = None
        self.plan: ChunkPlan | None = None
        self.views: list[memoryview] = []
        self._lane_bytes: dict[int, int] = {}
        # internal, guarded by the session lock
        self._sm: ReceiverTransfer | None = None
        self._writers = 0
        self._pending: tuple[State, str] | None = None
        self._pending_since = 0.0
        self._writing: set[Channel] = set()
        self._session: RxSession | None = None

    # ---- caller API
    def lane_sockets(self) -> dict[int, socket.socket]:
        """The live lane sockets of the session carrying this transfer, by lane index (for TCP_INFO)."""
        s = self._session
        if s is None:
            return {}
        with s.lock:
            return {i: ch.sock for i, ch in s.lanes.items() if not ch.closed}

    def lane_bytes(self) -> dict[int, int]:
        """Payload bytes of this transfer received so far on each lane (re-sent chunks counted again)."""
        with self._cond:
            return dict(self._lane_bytes)

    def on_layer(self, fn: Callable[[int], None]) -> None:
        """Call ``fn(layer)`` as each layer is verified, in that order and before the handle's done
        callbacks, from the receiver's callback pool (never a lane or control thread: a slow callback
        delays only this handle's later callbacks). Layers verified before the call are reported at
        once, on the calling thread."""
        with self._cond:
            done = sorted(self.layer_times)
            if not self.finished:  # an ended transfer keeps no callback (it may hold this handle)
                self._layer_callbacks.append(fn)
        for layer in done:
            fn(layer)

    def layers(self, timeout: float | None = None) -> Iterator[int]:
        """Yield layer indices in the order they become ready, until every layer with bytes is in."""
        seen: set[int] = set()
        end = None if timeout is None else time.monotonic() + timeout
        while True:
            with self._cond:
                while True:
                    fresh = [i for i in self.layer_times if i not in seen]
                    total = len(self.plan.layer_chunks) if self.plan is not None else None
                    if fresh or (total is not None and len(seen) == total) or self.finished:
                        break
                    left = None if end is None else end - time.monotonic()
                    if left is not None and left <= 0:
                        raise TimeoutError("no layer arrived in time")
                    self._cond.wait(left if left is not None else 1.0)
            fresh.sort(key=lambda i: self.layer_times[i])
            for i in fresh:
                seen.add(i)
                yield i
            if self.plan is not None and len(seen) == len(self.plan.layer_chunks):
                return
            if not fresh and self.finished:
                self.result(0)
                return

    def cancel(self, reason: str = "cancelled by receiver") -> None:
        s = self._session
        if s is None:
            with self._cond:
                self._resolve(State.CANCELLED, reason)
                self._cond.notify_all()
            return
        s.end(self, State.CANCELLED, reason, notify=F.CANCEL)

    # ---- receiver internals
    def _layer_ready(self, layer: int, t: float) -> None:
        with self._cond:
            self.layer_times[layer] = t
            cbs = list(self._layer_callbacks)
            self._cond.notify_all()
        for fn in cbs:
            self._call_soon(fn, layer)

    def _finish(self, state: State, reason: str) -> None:
        with self._cond:
            self._resolve(state, reason)
            self._layer_callbacks.clear()  # they may hold this handle: no cycle outlives the transfer
            self._cond.notify_all()
