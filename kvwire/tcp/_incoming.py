"""Receiver-side transfer handle: layers become readable as they are verified.

Owns: ``IncomingTransfer`` (what the decode engine holds: ``wait_layer``, ``layers()``, ``on_layer``,
``result``, ``cancel``, per-lane accounting) and its terminal-state bookkeeping, and ``TransferDriver``:
the little it needs from whoever carries the transfer (cancel it, the lane sockets). A façade: the
driver (``_rxsession.py``) calls its public methods (``bind``, ``add_lane_bytes``, ``layer_ready``,
``resolve``) and it calls only the driver's. Must not know: sockets' I/O, the wire format, the protocol
engine or the session.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any, Protocol

from .._args import check_reason, check_wait_timeout
from ..codec.layout import ModelLayout
from ..codec.manifest import Manifest
from ..codec.plan import ChunkPlan
from ..codec.transfer import ReceiverTransfer, State
from ._callbacks import Callbacks
from ._fork import check_process
from ._handle import LayerOutcome

log = logging.getLogger("kvwire.tcp")


class TransferDriver(Protocol):
    """What a handle asks of the session carrying its transfer."""

    def cancel_transfer(self, transfer_id: int, reason: str) -> None:
        """End the transfer CANCELLED (resolving this handle) and tell the sender."""
        ...

    def lane_sockets(self) -> dict[int, socket.socket]: ...


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
        self._driver: TransferDriver | None = None
        self._machine: ReceiverTransfer | None = None

    # ---- driver API
    def bind(self, driver: TransferDriver, manifest: Manifest, plan: ChunkPlan, views: list[memoryview],
             deadline: float, machine: ReceiverTransfer) -> bool:
        """The transfer was admitted into ``views`` (of ``dest``) on ``driver``'s session, until ``deadline``.
        ``machine``: the engine's state machine of it, kept read-only for ``machine``. False, and nothing
        bound, when the handle ended meanwhile (its user cancelled it between the admission and this): the
        driver must end the transfer too, or it would go on into buffers its user was told are free."""
        with self._cond:  # (against cancel: it binds first, or the handle is already cancelled)
            if self.finished:
                return False
            self.manifest, self.plan, self.views, self.deadline = manifest, plan, views, deadline
            self._driver, self._machine = driver, machine
            return True

    def add_lane_bytes(self, lane: int, n: int) -> None:
        with self._cond:
            self._lane_bytes[lane] = self._lane_bytes.get(lane, 0) + n

    def layer_ready(self, layer: int, t: float) -> None:
        """Every chunk of ``layer`` is verified (at monotonic time ``t``): wake waiters, queue ``on_layer``."""
        with self._cond:  # queued under the lock: in the order the layers were recorded, before the outcome
            self.layer_times[layer] = t
            self._cond.notify_all()
            inline = self._queue_calls([(fn, (layer,)) for fn in self._layer_callbacks])
        for fn, args in inline:  # (only a handle without a pool)
            self.call_soon(fn, *args)

    def resolve(self, state: State, reason: str = "") -> bool:
        """The terminal state (once; later calls are ignored and return False)."""
        with self._cond:
            first = self._resolve(state, reason)
            self._layer_callbacks.clear()  # they may hold this handle: no cycle outlives the transfer
            self._cond.notify_all()
        return first

    def _layer_count(self) -> int | None:
        return self.layout.num_layers if self.layout is not None else None

    @property
    def machine(self) -> ReceiverTransfer | None:
        """The protocol engine's state machine of this transfer (verified chunks, retries seen, bad
        chunks), once admitted. Read-only: for tests and diagnostics."""
        return self._machine

    # ---- caller API
    def lane_sockets(self) -> dict[int, socket.socket]:
        """The live lane sockets of the session carrying this transfer, by lane index (for TCP_INFO)."""
        d = self._driver
        return {} if d is None else d.lane_sockets()

    def lane_bytes(self) -> dict[int, int]:
        """Payload bytes of this transfer received so far on each lane (re-sent chunks counted again)."""
        with self._cond:
            return dict(self._lane_bytes)

    def on_layer(self, fn: Callable[[int], None]) -> None:
        """Call ``fn(layer)`` as each layer is verified, in that order and before the handle's done
        callbacks, from the receiver's callback pool (never a lane or control thread: a slow callback
        delays only this handle's later callbacks), one call at a time with the handle's other callbacks.
        Layers verified before the call are reported first, in the order they were verified: queued on
        that pool like the later ones, never run on the calling thread, so ``on_layer`` returns at once
        (possibly before ``fn`` has seen them) and may be called holding locks that ``fn`` takes. On a
        handle that has ended, its layers are queued behind the done callbacks already queued.
        ``TypeError`` for a ``fn`` that is not callable; ``KvwireError`` in a forked child while it runs (``_fork``)."""
        if not callable(fn):
            raise TypeError(f"on_layer takes a callable fn(layer), not {type(fn).__name__}")
        if not self.finished:
            check_process(self._pid, "transfer")
        with self._cond:  # (layer_ready and resolve queue theirs under it: these go in between, in order)
            if not self.finished:  # an ended transfer keeps no callback (it may hold this handle)
                self._layer_callbacks.append(fn)
            inline = self._queue_calls([(fn, (layer,)) for layer in self.layer_times])  # (verification order)
        for f, args in inline:  # (only a handle without a pool: it runs its callbacks inline)
            self.call_soon(f, *args)

    def layers(self, timeout: float | None = None) -> Iterator[int]:
        """Yield layer indices in the order they become ready, until every layer with bytes is in. ``timeout``
        (for them all) as ``result``'s, checked at the call."""
        timeout = check_wait_timeout("timeout", timeout)
        if not self.finished:
            check_process(self._pid, "transfer")
        return self._layers(timeout)

    def _layers(self, timeout: float | None) -> Iterator[int]:
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
        """End the transfer ``cancelled`` and tell the sender ``reason`` (a ``str``: ``TypeError`` else, and
        nothing cancelled; the sender is told its first ``messages.MAX_REASON`` characters)."""
        check_reason(reason)
        check_process(self._pid, "transfer")
        with self._cond:  # (bind takes it too: a transfer being admitted now is bound first, or refused)
            d, m = self._driver, self.manifest
            if d is None or m is None:
                self._resolve(State.CANCELLED, reason)
                self._cond.notify_all()
                return
        d.cancel_transfer(m.transfer_id, reason)
