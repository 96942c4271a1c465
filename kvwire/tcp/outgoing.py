"""Sender-side transfer handle: layers are handed over as prefill produces them.

Owns: ``OutgoingTransfer`` (what the prefill engine holds: ``write_layer``/``write_all``, ``finish``,
``cancel``, ``result``, per-layer acknowledgements for freeing staging early). Must not know: sockets or
the wire format; the session (``sender.py``) drives it under its lock and sends its chunks.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from ..buffers import byte_view
from ..codec import frames as F
from ..codec.transfer import SenderTransfer, State
from ..errors import KvwireError, LayoutMismatch
from .handle import Outcome

if TYPE_CHECKING:
    from .sender import Session

log = logging.getLogger("kvwire.tcp")


class OutgoingTransfer(Outcome):
    """Sender-side handle: ``write_layer`` as layers become ready, then ``finish()``."""

    def __init__(self, session: Session, sm: SenderTransfer, deadline: float | None) -> None:
        super().__init__(session._callbacks)
        self._session = session
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
        self.started = time.monotonic()
        self.bytes_sent = 0
        self._acked_callbacks: list[Callable[[int], None]] = []
        self._acked_reported = 0  # how many of _sm.acked_layers the callbacks have been given

    @property
    def transfer_id(self) -> int:
        return self.manifest.transfer_id

    def write_layer(self, layer: int, buffers: Sequence[Any]) -> None:
        """Hand over layer ``layer``'s tensors (its segments, in order). Buffers are not copied: keep
        them unchanged until the transfer ends."""
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
        with self._session._cond:
            for i, v in zip(segs, views):
                self.views[i] = v
            self._sm.layer_ready(layer)
            self._session._cond.notify_all()

    def write_all(self, buffers: Sequence[Any]) -> None:
        """Every segment at once (one buffer per segment, in manifest order)."""
        if len(buffers) != len(self.manifest.segments):
            raise LayoutMismatch(f"{len(self.manifest.segments)} segments, got {len(buffers)} buffers")
        for layer, segs in self._by_layer.items():
            self.write_layer(layer, [buffers[i] for i in segs])

    @property
    def layers_acked(self) -> list[int]:
        """Layers the receiver has verified in full, in the order it did: their buffers may be reused."""
        with self._session._cond:
            return list(self._sm.acked_layers)

    def on_layer_acked(self, fn: Callable[[int], None]) -> None:
        """Call ``fn(layer)`` (from the session's callback pool, never a protocol thread) once the receiver has
        verified every chunk of ``layer``: from then on nothing of that layer is re-sent, so its source
        buffers (a pinned staging region, say) may be released before the whole transfer ends. Layers
        acked before the call are reported at once. Layers without bytes are never reported."""
        with self._session._cond:
            if not self.finished:  # an ended transfer keeps no callback (it may hold this handle)
                self._acked_callbacks.append(fn)
            done = list(self._sm.acked_layers[: self._acked_reported])
        for layer in done:
            fn(layer)

    def _report_acked(self) -> None:
        """Hand layers newly acked to the callbacks, in order, each exactly once (control thread only)."""
        with self._session._cond:
            new = self._sm.acked_layers[self._acked_reported:]
            self._acked_reported += len(new)
            cbs = list(self._acked_callbacks)
        for layer in new:
            for fn in cbs:
                self._call_soon(fn, layer)

    def finish(self) -> Outcome:
        """No more layers. Returns this handle; ``result()`` waits for the receiver's confirmation."""
        missing = [layer for layer in self._by_layer if layer not in self._sm.layers_written]
        if missing:
            raise KvwireError(f"finish() before layers {missing[:8]} were written")
        if self.plan.num_chunks == 0:
            with self._session._cond:
                if self._sm.on_ack([]):
                    self._session._send_done(self)
        return self

    def cancel(self, reason: str = "cancelled by sender") -> None:
        self._session._end(self, State.CANCELLED, reason, notify=F.CANCEL)
