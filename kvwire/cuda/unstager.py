"""Receiver-side staging: copy verified layers from pinned receive buffers into a paged cache.

Owns: ``Unstager`` (one per engine device: side stream, a worker thread that takes layers as they are
verified so receiver callbacks stay short, waiter thread, device scratch, the ``h2d`` path) and
``UnstagingJob`` (one request: its pooled receive buffers, the receiver's own block tables and state slot,
per-layer copy plans built once in ``prepare``, ``wait_layer``, its one terminal ``state``, and ``cancel``:
its transfer cancelled, its buffers back in the pool once nothing writes or reads them). Must not know:
sockets, lanes, frames, how copy plans are made (``plan``) or how CUDA is driven (``streams``). The
transport is reached through duck typing only: a *source* has ``on_layer(fn)`` and optionally
``manifest``, ``add_done_callback``, ``cancel(reason)``, ``finished`` and ``result(timeout)`` (an
``IncomingTransfer``), a *receiver* has ``expect(request_id, buffers, layout=, state_position=)``.

Data path, GPU, per verified layer on the unstager's stream: ``direct`` (each run of consecutive
destination blocks straight from its place in the pinned span) or ``scratch`` (one copy of the span into
the device scratch, then the scatter at the receiver's block ids and state slot), then an event; the
waiter thread marks the layer done. CPU caches run the same plans synchronously on the worker thread.
"""

from __future__ import annotations

import concurrent.futures
import queue
import threading
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from .._args import check_reason, check_wait, check_wait_timeout
from ..codec.layout import RequestSpec, Segment
from ..codec.transfer import State
from ..errors import KvwireError, LayoutMismatch, TransferCancelled, TransferTimedOut
from .paged import PagedCache
from .plan import (
    ALIGN,
    LayerPlan,
    Placement,
    bind_indices,
    check_layer,
    check_mode,
    check_request,
    check_slot,
    plan_layers,
    run_ops,
)
from .pool import PinnedPool, PooledBuffer
from .stager import DEFAULT_POOL_BYTES
from .streams import Device

if TYPE_CHECKING:
    import torch

#: Seconds ``UnstagingJob.cancel`` waits by default for a copy in progress and for its transfer to stop writing
#: (past it the buffers go back to the pool when the last of them ends, not later)
CANCEL_WAIT = 5.0


class UnstagingJob:
    """One request on the receiver: pinned buffers to receive into, and per-layer copies into the cache.

    Register ``buffers`` with the receiver (``expect_on(receiver)`` does it and ``attach``es; a receiver handed
    them otherwise is told with ``lend``), then ``wait_layer(i)`` returns once layer ``i`` is in the destination
    cache. ``state`` is ACTIVE until the job's one terminal state: DONE (every layer in the cache), FAILED (a
    layer could not be copied, or the transfer failed before it brought every layer), TIMED_OUT or CANCELLED
    (the transfer's, or ``cancel``'s).
    """

    def __init__(self, unstager: Unstager, request: RequestSpec, placement: Placement,
                 tables: dict[str | int, list[int]], slot: int | Mapping[int, int] | None,
                 buffer: PooledBuffer) -> None:
        self.unstager = unstager
        self.request = request
        self.placement = placement
        self.tables = tables
        self.state_slot = slot
        self.buffer = buffer
        self._host = buffer.tensor()
        p = placement
        self.buffers: list[torch.Tensor] = [self._host[o : o + s.nbytes]
                                            for o, s in zip(p.offsets, p.segments)]
        dev = unstager.device
        self.plans: dict[int, LayerPlan] = plan_layers(
            unstager.cache, placement, tables, slot, self._host, mode=unstager.h2d, to_host=False,
            on_device=dev.cuda, scratch=dev.scratch)
        self._ids, self._ids_ready, self._ids_keep = bind_indices(self.plans, dev.upload)
        self._cond = threading.Condition()
        self.arrived_at: dict[int, float] = {}
        self.done_at: dict[int, float] = {}
        self.gpu_events: dict[int, tuple[Any, Any]] = {}
        self._errors: dict[int, BaseException] = {}
        self._transfer_error: BaseException | None = None
        self._pending = 0  # layers queued or being copied
        self._running: set[int] = set()  # layers whose copies started (and have not finished)
        self._cancelled: str | None = None  # cancel()'s reason
        self._lent = False  # a transport was handed the buffers: they are its until its source ends
        self._released = False
        self._freed = False
        self._release_done = threading.Event()
        self.source: Any = None

    @property
    def segments(self) -> list[Segment]:
        return self.placement.segments

    @property
    def layers(self) -> list[int]:
        return list(self.placement.by_layer)

    @property
    def layers_done(self) -> set[int]:
        with self._cond:
            return set(self.done_at)

    @property
    def state(self) -> State:
        with self._cond:
            return self._state()

    def _state(self) -> State:
        """The job's state (``_cond`` held). Once terminal it stays: ``cancel`` ends only an ACTIVE job, a
        layer is reported once, and the transfer's error counts only while a layer it never brought is missing."""
        if self._cancelled is not None:
            return State.CANCELLED
        if self._errors:
            return State.FAILED
        wanted = self.placement.by_layer
        if all(la in self.done_at for la in wanted):
            return State.DONE
        err = self._transfer_error
        if err is not None and any(la not in self.arrived_at for la in wanted):
            if isinstance(err, TransferCancelled):
                return State.CANCELLED
            return State.TIMED_OUT if isinstance(err, TransferTimedOut) else State.FAILED
        return State.ACTIVE

    # ---- wiring to a transport
    def expect_on(self, receiver: Any, *, check_state_position: bool = True, timeout: float | None = None
                  ) -> Any:
        """``receiver.expect(...)`` with this job's buffers, layout and state position; then ``attach``."""
        handle = receiver.expect(self.request.request_id, self.lend(), layout=self.unstager.layout,
                                 state_position=self.request.state_position if check_state_position else None,
                                 timeout=timeout)
        self.attach(handle)
        return handle

    def lend(self) -> list[torch.Tensor]:
        """``buffers``, for a transport to receive into: until a source is ``attach``ed and has ended,
        ``cancel`` leaves them to it (``release`` is then the owner's word that nothing writes them)."""
        with self._cond:
            self._lent = True
            return list(self.buffers)

    def attach(self, source: Any) -> None:
        """Unstage each layer ``source`` reports verified (``source.on_layer``); a failed source fails the
        layers that had not arrived. A job cancelled already cancels ``source``."""
        with self._cond:  # (against cancel: it sees the source, or the source sees it cancelled)
            self.source = source
            cancelled = self._cancelled
        if hasattr(source, "add_done_callback"):
            source.add_done_callback(self._source_done)
        source.on_layer(self.layer_arrived)
        if cancelled is not None:
            self._cancel_source(source, cancelled)
            self._free_when_idle()

    def _source_done(self, fut: concurrent.futures.Future[Any]) -> None:
        err = fut.exception()
        if err is not None:
            with self._cond:
                self._transfer_error = err
                self._cond.notify_all()
        self._free_when_idle()

    def layer_arrived(self, layer: int) -> None:
        """Layer ``layer``'s bytes are complete and verified in ``buffers``: queue its copies."""
        with self._cond:
            if self._released or self._cancelled is not None:
                return
            if layer in self.arrived_at:
                return
            self.arrived_at[layer] = time.monotonic()
            self._pending += 1
        self.unstager.submit(self, layer)

    # ---- the copies (worker thread)
    def _check_manifest(self, layer: int) -> None:
        m = getattr(self.source, "manifest", None)
        if m is None:
            return
        segs = m.segments
        for i in self.placement.by_layer.get(layer, []):
            mine = self.placement.segments[i]
            theirs = segs[i] if i < len(segs) else None
            key = ("layer", "cache", "tensor", "nbytes", "token_start", "token_count")
            if theirs is None or any(getattr(theirs, k) != getattr(mine, k) for k in key):
                raise LayoutMismatch(f"segment {i} ({mine.name}): the transfer carries {theirs}, this job "
                                     f"expects tokens {mine.token_start}+{mine.token_count}")

    def start_layer(self, layer: int) -> bool:
        """``layer``'s copies may start now: False once the job is cancelled (``cancel`` counted it as never
        started); else it counts as running until ``mark_layer_done``."""
        with self._cond:
            if self._cancelled is not None:
                return False
            self._running.add(layer)
            return True

    def unstage(self, layer: int) -> None:
        """Run ``layer``'s copies into the cache (the unstager's worker thread); the outcome goes to
        ``mark_layer_done``, now on a CPU cache, when the copies' event fires on a GPU. Nothing for a layer
        queued before the job was cancelled."""
        if not self.start_layer(layer):
            return
        try:
            plan = self.plans.get(layer)
            if plan is None:
                raise LayoutMismatch(f"layer {layer} carries no bytes in this request")
            self._check_manifest(layer)
            dev = self.unstager.device
            if dev.cuda:
                self._unstage_cuda(plan)
                return
            with dev.lock:
                run_ops(plan.ops)
        except BaseException as e:  # noqa: BLE001 - reported to wait_layer
            self.mark_layer_done(layer, e)
            return
        self.mark_layer_done(layer, None)

    def _unstage_cuda(self, plan: LayerPlan) -> None:
        dev = self.unstager.device
        s = dev.stream
        layer = plan.layer
        with dev.lock:
            if self._ids_ready is not None:
                s.wait_event(self._ids_ready)
            with dev.on(s):
                start = None
                if dev.timing:
                    start = dev.event(True)
                    start.record(s)
                run_ops(plan.ops)
                done = dev.event()
                done.record(s)  # after the layer's last copy
            if start is not None:
                self.gpu_events[layer] = (start, done)
            assert dev.completer is not None
            dev.completer.submit(done, lambda err: self.mark_layer_done(layer, err))

    def mark_layer_done(self, layer: int, err: BaseException | None) -> None:
        """``layer``'s copies finished (``err`` None) or failed: wakes ``wait_layer``."""
        with self._cond:
            if err is None:
                self.done_at[layer] = time.monotonic()
            elif self._cancelled is None:  # (a cancelled job keeps its one terminal state)
                self._errors[layer] = err
            self._running.discard(layer)
            self._pending -= 1
            self._cond.notify_all()
        self._free_when_idle()

    # ---- caller API
    def wait_layer(self, layer: int, timeout: float | None = None) -> None:
        """Return once ``layer`` is in the destination cache (at once for layers without bytes).

        Raises the layer's error (``LayoutMismatch``...), the transfer's error if it ended before the
        layer arrived, ``TransferCancelled`` at once for any layer once the job was cancelled (its buffers
        may be back in the pool), or builtin ``TimeoutError``. ``layer`` must be one of the layout's
        (``TypeError`` for a bool or a string, ``LayoutMismatch`` outside it, as ``Stager``'s ``stage``).
        ``timeout``: seconds (<= 0: no wait) or ``None``; ``TypeError`` for a non-number, ``ValueError`` for NaN
        or infinity (``_args.check_wait_timeout``).
        """
        layer = check_layer(layer, self.unstager.layout.num_layers)
        timeout = check_wait_timeout("timeout", timeout)
        end = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self._cancelled is not None or layer not in self.done_at:
                if self._cancelled is not None:
                    raise TransferCancelled(self._cancelled)
                if layer not in self.placement.by_layer:
                    return
                if layer in self._errors:
                    raise self._errors[layer]
                if self._transfer_error is not None and layer not in self.arrived_at:
                    raise self._transfer_error
                left = None if end is None else end - time.monotonic()
                if left is not None and left <= 0:
                    raise TimeoutError(f"layer {layer} not unstaged after {timeout}s")
                self._cond.wait(left if left is not None else 1.0)

    def wait_all(self, timeout: float | None = None) -> None:
        """Every layer in the cache (``timeout`` and errors as ``wait_layer``'s)."""
        timeout = check_wait_timeout("timeout", timeout)
        end = None if timeout is None else time.monotonic() + timeout
        for layer in self.layers:
            self.wait_layer(layer, None if end is None else max(0.0, end - time.monotonic()))

    def result(self, timeout: float | None = None) -> UnstagingJob:
        """``wait_all``, then this job: every layer is in the cache (raises as ``wait_layer`` does)."""
        self.wait_all(timeout)
        return self

    def cancel(self, reason: str = "cancelled by the decode side", timeout: float = CANCEL_WAIT) -> bool:
        """The request is not wanted any more: end the job CANCELLED (False, and the state kept, when it had
        ended already), cancel its transfer (the sender is told ``reason``), drop the copies not started, and
        return the buffers to the pool once the copy in progress finished and the transfer stopped writing:
        before returning when both happen within ``timeout`` seconds, else as the last of them does (never
        later). A layer copied meanwhile is whole in the cache and in ``layers_done``; every other never is.
        Idempotent, from any thread (a layer callback too); ``wait_layer``/``result`` then raise
        ``TransferCancelled``. ``TypeError``/``ValueError`` for a reason that is not a ``str`` or a bad
        ``timeout``, and nothing cancelled."""
        check_reason(reason)
        wait = check_wait("timeout", timeout)
        with self._cond:
            first = self._state() is State.ACTIVE
            if first:
                self._cancelled = reason
                never = [la for la in self.arrived_at if la not in self.done_at and la not in self._errors
                         and la not in self._running]  # queued, not started: ``start_layer`` refuses them
                self._pending -= len(never)
                self._cond.notify_all()
            source = self.source
        if first and source is not None:
            self._cancel_source(source, reason)
        end = time.monotonic() + wait
        if source is not None and hasattr(source, "result") and not getattr(source, "finished", True):
            try:  # (the transport resolves it once no lane writes into the buffers)
                source.result(max(0.0, end - time.monotonic()))
            except Exception:  # noqa: BLE001 - cancelled, or not ended in time: _free_when_idle decides
                pass
        with self._cond:
            while self._pending and time.monotonic() < end:
                self._cond.wait(end - time.monotonic())
        self._free_when_idle(force=True)
        return first

    @staticmethod
    def _cancel_source(source: Any, reason: str) -> None:
        if hasattr(source, "cancel") and not getattr(source, "finished", False):
            source.cancel(reason)

    def _free_when_idle(self, force: bool = False) -> None:
        """After ``cancel`` (``force``: its call; else once it ran): return the buffers if no copy runs and
        no transport may write into them."""
        with self._cond:
            if (self._cancelled is None and not force) or self._pending:
                return
            src = self.source
            if not self._freed and ((src is None and self._lent)
                                    or (src is not None and not getattr(src, "finished", True))):
                return
        self._free()

    def release(self) -> None:
        """Return the buffers to the pool (after copies in flight finished). The receiver must no longer
        write into them: release after the transfer ended."""
        with self._cond:
            first = not self._released
            self._released = True
            while first and self._pending:
                self._cond.wait(1.0)
        if not first:  # another thread is releasing: return once it is done
            self._release_done.wait()
            return
        self._free()

    def _free(self) -> None:
        """The buffers back to the pool (once; the caller made sure nothing reads or writes them), or, when
        another thread is returning them, once it has."""
        with self._cond:
            other = self._freed
            self._freed = self._released = True  # (no layer is taken any more)
        if other:
            self._release_done.wait()
            return
        try:
            self.plans = {}
            self._host = None
            self.buffers = []
            self._ids = self._ids_keep = None
            self.buffer.release()
        finally:
            self._release_done.set()

    def __enter__(self) -> UnstagingJob:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class Unstager:
    """Receiver side: copies verified layers from pooled pinned buffers into a ``PagedCache``.

    ``h2d``: ``direct`` (each run of consecutive destination blocks straight from the pinned span),
    ``scratch`` (one copy of the layer's span to a device scratch, then the scatter) or ``auto`` (per
    layer, whichever takes fewer copies; see ``plan``).
    """

    def __init__(self, cache: PagedCache, pool: PinnedPool | None = None, *, stream: Any = None,
                 timing: bool = False, align: int = ALIGN, h2d: str = "auto") -> None:
        self.cache = cache
        self.layout = cache.layout
        self.h2d = check_mode(h2d)
        self.pool = pool if pool is not None else PinnedPool(DEFAULT_POOL_BYTES, backend="torch")
        self.align = align
        self.device = Device(cache, stream, timing, "kvwire-unstager-wait")  # its jobs run their copies through it
        self._q: queue.Queue[tuple[UnstagingJob, int] | None] = queue.Queue()
        self._worker: threading.Thread | None = None
        self._lock = threading.Lock()
        self._closed = False

    @property
    def stream(self) -> Any:
        return self.device.stream

    def prepare(self, request: RequestSpec, block_tables: Mapping[Any, Sequence[int]],
                state_slot: int | Mapping[int, int] | None = None, *, acquire_timeout: float = 0.0,
                buffer: PooledBuffer | None = None) -> UnstagingJob:
        """Plan ``request`` (the receiver's view: its prefix hits, its state position), check the
        receiver's block tables (ids in range and distinct) and slot, take pinned receive buffers, and
        build every layer's copies.

        ``buffer``: a pooled buffer already laid out as ``placement(request)`` that holds (or is receiving)
        the request's bytes, e.g. one a receiver's allocator handed out before the engine had allocated
        blocks; the job takes it over (and releases it). On an error it stays the caller's."""
        wait = check_wait("acquire_timeout", acquire_timeout)
        state_slot = check_slot(state_slot)
        placement = Placement(self.layout, request, self.align)
        tables = check_request(self.cache, placement, block_tables, state_slot, unique=True)
        if buffer is not None and buffer.nbytes < placement.total:
            raise LayoutMismatch(f"buffer of {buffer.nbytes} bytes for a {placement.total}-byte placement")
        buf = buffer if buffer is not None else self.pool.acquire(placement.total, block=wait > 0,
                                                                  timeout=wait)
        try:
            job = UnstagingJob(self, request, placement, tables, state_slot, buf)
        except BaseException:
            if buffer is None:
                buf.release()
            raise
        if buffer is not None:  # (it may be receiving: its transfer is attached next)
            job.lend()
        return job

    def placement(self, request: RequestSpec) -> Placement:
        """Where each of ``request``'s segments lives in the buffer ``prepare`` takes or makes."""
        return Placement(self.layout, request, self.align)

    def submit(self, job: UnstagingJob, layer: int) -> None:
        """Queue ``job``'s ``layer`` for the worker thread (started on first use); fails it once closed."""
        with self._lock:
            if self._closed:
                if job.start_layer(layer):
                    job.mark_layer_done(layer, KvwireError("unstager closed"))
                return
            if self._worker is None:
                self._worker = threading.Thread(target=self._run, name="kvwire-unstager", daemon=True)
                self._worker.start()
            self._q.put((job, layer))

    def _run(self) -> None:
        while True:
            item = self._q.get()
            if item is None:
                return
            job, layer = item
            job.unstage(layer)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            worker = self._worker
            self._q.put(None)
        if worker is not None:
            worker.join(10)
        self.device.close()

    def __enter__(self) -> Unstager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
