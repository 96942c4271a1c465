"""Sender-side transfer handle: layers are handed over as prefill produces them.

Owns: ``OutgoingTransfer`` (what the prefill engine holds: ``write_layer``/``write_all``, ``finish``,
``cancel``, ``result``, per-layer acknowledgements for freeing staging early) and ``TransferDriver``, the
few calls it makes on whatever drives it. Must not know: sockets, the wire format, the session's lock or
its protocol engine; the driver (``sender.Session``) sends its chunks and resolves it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from .._args import check_reason
from ..buffers import byte_view
from ..codec.transfer import SenderTransfer, State
from ..errors import KvwireError, LayoutMismatch
from ._callbacks import Callbacks
from ._fork import check_process
from ._handle import Outcome
from ._tail import TailEncoder

log = logging.getLogger("kvwire.tcp")


class TransferDriver(Protocol):
    """What a handle asks of the session that drives it (``sender.Session``)."""

    def layer_written(self, transfer_id: int, layer: int) -> None:
        """The layer's views are in place on the handle: queue its chunks."""
        ...

    def finish_transfer(self, transfer_id: int) -> None:
        """No more layers (a transfer without chunks is complete now)."""
        ...

    def cancel_transfer(self, transfer_id: int, reason: str) -> None: ...


def _check_dtype(buffer: Any, want: str | None, what: str) -> None:
    """A typed buffer (a numpy array, a torch tensor) must have the layout's dtype ``want``: a float16 tensor
    where the layout says bfloat16 has the right byte count and would arrive as garbage. ``uint8`` buffers
    are raw bytes (staging regions, views) and untyped buffers (bytes, memoryviews) carry no dtype: both pass."""
    dtype = getattr(buffer, "dtype", None)
    if want is None or dtype is None:
        return
    name = str(dtype).removeprefix("torch.")
    if name not in ("uint8", want):
        raise LayoutMismatch(f"{what} is {want} by the layout; the buffer is {name} (pass that dtype, or its "
                             f"bytes as uint8)")


class OutgoingTransfer(Outcome):
    """Sender-side handle: ``write_layer`` as layers become ready, then ``finish()``.

    ``sm``: the transfer's machine, driven by the driver's engine; the handle only reads it."""

    def __init__(self, driver: TransferDriver, sm: SenderTransfer, deadline: float | None,
                 callbacks: Callbacks | None = None) -> None:
        super().__init__(callbacks)
        self._driver = driver
        self._sm = sm
        self.manifest = sm.manifest
        self.plan = sm.plan
        self.deadline = deadline
        self.views: list[memoryview | None] = [None] * len(sm.manifest.segments)
        self._by_layer: dict[int, list[int]] = {}
        layout = sm.manifest.layout
        self._num_layers = layout.num_layers if layout is not None else 1 + max(
            (seg.layer for seg in sm.manifest.segments), default=-1)
        for seg in sm.manifest.segments:
            self._by_layer.setdefault(seg.layer, []).append(seg.index)
        #: each segment's dtype, by the layout (None without one): a typed buffer must carry it
        self._dtypes: list[str | None] = [
            None if layout is None else layout.layers[seg.layer].caches[seg.cache].tensors[seg.tensor].dtype
            for seg in sm.manifest.segments]
        self.started = time.monotonic()
        self.bytes_sent = 0  #: payload bytes put on the lanes (re-sends included); the driver adds to it
        #: the last layer's parity payloads (``codec.parity``), when the transfer has one; set by the driver
        self.tail: TailEncoder | None = None
        self._written: set[int] = set()
        self._acked_lock = threading.Lock()
        self._acked: list[int] = []  # layers reported acked, in order
        self._acked_callbacks: list[Callable[[int], None]] = []

    @property
    def transfer_id(self) -> int:
        return self.manifest.transfer_id

    def pieces(self, chunk: int) -> list[memoryview]:
        """Data chunk ``chunk``'s payload: views of the segments it covers (its layer was written)."""
        out = []
        for seg, a, b in self.plan.pieces(chunk):
            v = self.views[seg]
            assert v is not None
            out.append(v[a:b])
        return out

    def write_layer(self, layer: int, buffers: Sequence[Any]) -> None:
        """Hand over layer ``layer``'s tensors (its segments, in order). Buffers are not copied: keep
        them unchanged until the transfer ends. ``LayoutMismatch`` for a layer, count, byte size or dtype
        (of a numpy array or torch tensor: the layout's, or uint8 bytes) that does not fit the layout."""
        check_process(self._pid, "transfer")
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < self._num_layers:
            raise LayoutMismatch(f"layer {layer!r} is not a layer of the layout (0..{self._num_layers - 1})")
        if isinstance(buffers, (str, bytes)) or not isinstance(buffers, Sequence):
            raise LayoutMismatch(f"write_layer takes a list of buffers, one per segment; got {type(buffers).__name__}")
        segs = self._by_layer.get(layer, [])
        if len(buffers) != len(segs):
            raise LayoutMismatch(f"layer {layer} has {len(segs)} segments, got {len(buffers)} buffers")
        views = [byte_view(b) for b in buffers]
        for i, v in zip(segs, views):
            need = self.manifest.segments[i].nbytes
            if len(v) != need:
                raise LayoutMismatch(f"segment {i} of layer {layer} needs {need} bytes, buffer has {len(v)}")
        for i, b in zip(segs, buffers):
            _check_dtype(b, self._dtypes[i], f"segment {i} of layer {layer} ({self.manifest.segments[i].name})")
        if layer in self._written:
            raise ValueError(f"layer {layer} written twice")
        for i, v in zip(segs, views):
            self.views[i] = v  # before the driver queues the chunks (it takes its lock: they are seen)
        self._written.add(layer)
        self._driver.layer_written(self.transfer_id, layer)
        if self.tail is not None and layer == self.tail.groups.layer:
            self.tail.start()  # the parity's encode runs while the lanes carry the layer's data

    def write_all(self, buffers: Sequence[Any]) -> None:
        """Every segment at once (one buffer per segment, in manifest order)."""
        if len(buffers) != len(self.manifest.segments):
            raise LayoutMismatch(f"{len(self.manifest.segments)} segments, got {len(buffers)} buffers")
        for layer, segs in self._by_layer.items():
            self.write_layer(layer, [buffers[i] for i in segs])

    @property
    def layers_acked(self) -> list[int]:
        """Layers the receiver has verified in full, in the order it did: their buffers may be reused."""
        with self._acked_lock:
            return list(self._acked)

    def on_layer_acked(self, fn: Callable[[int], None]) -> None:
        """Call ``fn(layer)`` (from the session's callback pool, never a protocol thread) once the receiver has
        verified every chunk of ``layer``: from then on nothing of that layer is re-sent, so its source
        buffers (a pinned staging region, say) may be released before the whole transfer ends. Layers are
        reported in the order they were acked (``layers_acked``), before the handle's done callbacks, one
        call at a time with the handle's other callbacks. Layers acked before the call are reported first:
        queued on that pool like the later ones, never run on the calling thread, so ``on_layer_acked``
        returns at once (possibly before ``fn`` has seen them) and may be called holding locks that ``fn``
        takes. On a handle that has ended, its layers are queued behind the done callbacks already queued.
        Layers without bytes are never reported. ``TypeError`` for a ``fn`` that is not callable; ``KvwireError``
        in a forked child while it runs (``_fork``)."""
        if not callable(fn):
            raise TypeError(f"on_layer_acked takes a callable fn(layer), not {type(fn).__name__}")
        if not self.finished:
            check_process(self._pid, "transfer")
        with self._acked_lock:  # (layers_verified and resolve queue theirs under it: these go in between)
            if not self.finished:  # an ended transfer keeps no callback (it may hold this handle)
                self._acked_callbacks.append(fn)
            inline = self._queue_calls([(fn, (layer,)) for layer in self._acked])
        for f, args in inline:  # (only a handle without a pool: it runs its callbacks inline)
            self._call_soon(f, *args)

    def retries(self, chunk: int) -> int:
        """Times ``chunk`` was sent again after failing the receiver's hash check (for tests and metrics)."""
        return self._sm.retries[chunk]

    # ------------------------------------------------------------ called by the driver
    def layers_verified(self, layers: Sequence[int]) -> None:
        """The receiver verified every chunk of ``layers`` (newly, in order): hand them to the
        ``on_layer_acked`` callbacks, each exactly once."""
        with self._acked_lock:  # queued under the lock: in the order acked, between any replays of on_layer_acked
            self._acked.extend(layers)
            inline = self._queue_calls([(fn, (layer,)) for layer in layers for fn in self._acked_callbacks])
        for fn, args in inline:  # (only a handle without a pool)
            self._call_soon(fn, *args)

    def resolve(self, state: State, reason: str = "") -> bool:
        """The transfer ended: settle the outcome once (False: it had) and drop the callbacks (they may
        hold the handle: no cycle outlives the transfer)."""
        if self._callbacks is None:  # (done callbacks run inline here: not under the lock)
            settled = super().resolve(state, reason)
            with self._acked_lock:
                self._acked_callbacks.clear()
            return settled
        with self._acked_lock:  # the done callbacks are only queued: behind every layer call queued so far
            settled = super().resolve(state, reason)
            self._acked_callbacks.clear()
        return settled

    # ------------------------------------------------------------ user
    def finish(self) -> Outcome:
        """No more layers. Returns this handle; ``result()`` waits for the receiver's confirmation."""
        check_process(self._pid, "transfer")
        missing = [layer for layer in self._by_layer if layer not in self._written]
        if missing:
            raise KvwireError(f"finish() before layers {missing[:8]} were written")
        if self.plan.num_chunks == 0:
            self._driver.finish_transfer(self.transfer_id)
        return self

    def cancel(self, reason: str = "cancelled by sender") -> None:
        """End the transfer ``cancelled`` and tell the receiver ``reason`` (a ``str``: ``TypeError`` else, and
        nothing cancelled; the receiver is told its first ``messages.MAX_REASON`` characters)."""
        check_process(self._pid, "transfer")
        self._driver.cancel_transfer(self.transfer_id, check_reason(reason))
