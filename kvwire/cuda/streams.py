"""The CUDA side of a stager or unstager: its side stream, events, the event-waiter thread, the device
scratch and the upload of block-id tensors.

Owns every call into ``torch.cuda`` that staging makes, in one small class (``Device``), so a test can
stand in for CUDA with stub streams and events and run the GPU control flow on CPU tensors. Must not know:
layouts, plans, pools, sockets. torch is imported lazily.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .paged import PagedCache

if TYPE_CHECKING:
    import torch


class Completer:
    """A thread that waits on CUDA events in submission order and runs each one's callback."""

    def __init__(self, name: str) -> None:
        self._q: queue.Queue[tuple[Any, Callable[[BaseException | None], None]] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, event: Any, fn: Callable[[BaseException | None], None]) -> None:
        self._q.put((event, fn))

    def _run(self) -> None:
        while True:
            item = self._q.get()
            if item is None:
                return
            event, fn = item
            err: BaseException | None = None
            try:
                event.synchronize()  # releases the GIL; blocking-sync events sleep instead of spinning
            except BaseException as e:  # noqa: BLE001 - a CUDA error belongs to the layer, not the thread
                err = e
            fn(err)

    def close(self) -> None:
        self._q.put(None)
        self._thread.join(10)


class Device:
    """One stager's or unstager's CUDA resources. ``cuda`` False (a CPU cache): no stream, no thread;
    every method still works so the callers have one code path.

    ``lock`` is held while one layer's copies are enqueued: layers share the scratch, so the copies of two
    layers must not interleave on the stream.
    """

    def __init__(self, cache: PagedCache, stream: Any, timing: bool, name: str) -> None:
        self.cuda = cache.is_cuda
        self.device = cache.device
        self.timing = timing
        self.lock = threading.Lock()
        self._scratch_lock = threading.Lock()
        self._scratch: torch.Tensor | None = None
        self.stream: Any = None
        self.completer: Completer | None = None
        if self.cuda:
            import torch

            self.stream = stream if stream is not None else torch.cuda.Stream(device=self.device)
            self.completer = Completer(name)

    # ---- the torch.cuda calls (a CPU test overrides these five)
    def event(self, timing: bool = False) -> Any:
        import torch

        return torch.cuda.Event(enable_timing=timing or self.timing, blocking=True)

    def on(self, stream: Any) -> contextlib.AbstractContextManager[Any]:
        """Make ``stream`` current (allocations and copies inside go to it)."""
        if not self.cuda:
            return contextlib.nullcontext()
        import torch

        return torch.cuda.stream(stream)

    def current_stream(self) -> Any:
        import torch

        return torch.cuda.current_stream(self.device)

    def record_stream(self, t: torch.Tensor, stream: Any) -> None:
        t.record_stream(stream)

    def pin(self, t: torch.Tensor) -> torch.Tensor:
        return t.pin_memory()

    # ---- built on them
    def upload(self, host: torch.Tensor) -> tuple[torch.Tensor, Any, Any]:
        """``host`` (an index tensor) on the cache's device: ``(tensor, ready event, keep-alive)``. GPU: one
        non-blocking copy from pinned memory on our stream, an event after it; CPU: ``host`` itself."""
        if not self.cuda:
            return host, None, None
        pinned = self.pin(host)
        with self.on(self.stream):
            dev = pinned.to(self.device, non_blocking=True)
            ready = self.event()
            ready.record(self.stream)
        return dev, ready, pinned  # the pinned source stays referenced until the job ends

    def scratch(self, nbytes: int) -> torch.Tensor:
        """The first ``nbytes`` of this device's scratch, grown when too small. Allocated while our stream
        is current, so the caching allocator reuses its memory only in that stream's order; every layer
        that uses it runs on our stream (or on one ordered with it). A grown scratch replaces the old one,
        which lives on while plans still hold views of it."""
        import torch

        with self._scratch_lock:
            if self._scratch is None or self._scratch.numel() < nbytes:
                self._scratch = None
                with self.on(self.stream):
                    self._scratch = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
            return self._scratch[:nbytes]

    @property
    def scratch_bytes(self) -> int:
        s = self._scratch
        return 0 if s is None else int(s.numel())

    def close(self) -> None:
        if self.completer is not None:
            self.completer.close()
            self.completer = None
        with self._scratch_lock:
            self._scratch = None
