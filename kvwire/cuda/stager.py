"""Sender-side staging: copy a request's cache, layer by layer, from a paged cache into pinned host memory.

Owns: ``Stager`` (one per engine device: side stream, waiter thread, device scratch, the ``d2h`` path),
``StagingJob`` (one request: its pooled host buffer, block tables, state slot and per-layer copy plans,
built once in ``begin``) and ``StagedLayer`` (one layer's readiness: a future of its host views, hand-over
to a writer). Must not know: sockets, lanes, frames, how copy plans are made (``plan``) or how CUDA is
driven (``streams``). The transport is reached through duck typing only: a *writer* has
``write_layer(layer, buffers)`` (an ``OutgoingTransfer``).

Data path, GPU, per layer on the stager's stream (after the caller's event, or after the work already
queued on the current stream): the layer's planned copies (``direct``: each run of consecutive blocks
straight into its place in the pinned span; ``scratch``: gather into the device scratch, then one span
copy), then an event; the waiter thread resolves the layer when the event completes. The engine's streams
never wait. CPU caches run the same plans synchronously. The host bytes handed to ``write_layer`` are
views of the pooled buffer: nothing is copied between staging and the socket.
"""

from __future__ import annotations

import concurrent.futures
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from .._args import check_wait, check_wait_timeout
from ..codec.layout import RequestSpec, Segment
from ..errors import KvwireError
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
from .streams import Device

if TYPE_CHECKING:
    import torch

DEFAULT_POOL_BYTES = 4 << 30


class StagedLayer:
    """One layer being staged. Resolves (``result()``) to its per-segment host views once in host memory.

    ``enqueued_at``/``ready_at``/``written_at`` are ``time.monotonic()`` stamps (enqueue, data in host
    memory, handed to ``write_layer``); with ``timing`` on a GPU, ``gpu_events`` are the start and end
    CUDA events of its work on the stream.
    """

    def __init__(self, layer: int, views: list[torch.Tensor], nbytes: int) -> None:
        self.layer = layer
        self.views = views
        self.nbytes = nbytes
        self.enqueued_at = time.monotonic()
        self.ready_at: float | None = None
        self.written_at: float | None = None
        self.gpu_events: tuple[Any, Any] | None = None
        self.future: concurrent.futures.Future[list[torch.Tensor]] = concurrent.futures.Future()
        self.sent: concurrent.futures.Future[None] | None = None

    def done(self) -> bool:
        return self.future.done()

    def result(self, timeout: float | None = None) -> list[torch.Tensor]:
        """The per-segment host views, once the bytes are there (builtin TimeoutError if not in time).
        ``timeout``: seconds (<= 0: no wait) or ``None``; ``TypeError`` for a non-number, ``ValueError`` for NaN
        or infinity (``_args.check_wait_timeout``)."""
        timeout = check_wait_timeout("timeout", timeout)
        try:
            return self.future.result(timeout)
        except concurrent.futures.TimeoutError:
            raise TimeoutError(f"layer {self.layer} not staged after {timeout}s") from None

    def wait_sent(self, timeout: float | None = None) -> None:
        """After ``stage_and_send``: wait until the views were handed to the writer (raises its error).
        ``timeout`` as ``result``'s."""
        timeout = check_wait_timeout("timeout", timeout)
        if self.sent is None:
            raise ValueError("layer was staged without a writer")
        try:
            self.sent.result(timeout)
        except concurrent.futures.TimeoutError:
            raise TimeoutError(f"layer {self.layer} not handed to the writer after {timeout}s") from None

    def add_done_callback(self, fn: Callable[[StagedLayer], None]) -> None:
        """``fn(self)`` once staged (or failed), from the waiter thread, or now if already done."""
        self.future.add_done_callback(lambda _f: fn(self))

    def resolve(self, err: BaseException | None) -> None:
        """The layer is in host memory (``err`` None) or failed: called by its job, or by the event waiter on
        a GPU, once."""
        self.ready_at = time.monotonic()
        if err is None:
            self.future.set_result(self.views)
        else:
            self.future.set_exception(err)


class StagingJob:
    """One request on the sender: its pinned buffer, block tables and state slot; stage layers into it.

    Get one from ``Stager.begin``. Keep it (and the cache blocks it reads) alive until the transfer ended:
    ``release_when_done(outgoing_transfer)`` returns the buffer to the pool then. ``plans[layer].mode``
    says which path each layer takes (``direct``, ``scratch``, or ``gather`` on a CPU cache).
    """

    def __init__(self, stager: Stager, request: RequestSpec, placement: Placement,
                 tables: dict[str | int, list[int]], slot: int | Mapping[int, int] | None,
                 buffer: PooledBuffer) -> None:
        self.stager = stager
        self.request = request
        self.placement = placement
        self.tables = tables
        self.state_slot = slot
        self.buffer = buffer
        self._host = buffer.tensor()
        dev = stager.device
        self.plans: dict[int, LayerPlan] = plan_layers(
            stager.cache, placement, tables, slot, self._host, mode=stager.d2h, to_host=True, on_device=dev.cuda,
            scratch=dev.scratch)
        self._ids, self._ids_ready, self._ids_keep = bind_indices(self.plans, dev.upload)
        self.staged: dict[int, StagedLayer] = {}
        self._lock = threading.Lock()
        self._released = False
        self._release_done = threading.Event()

    @property
    def segments(self) -> list[Segment]:
        return self.placement.segments

    @property
    def layers(self) -> list[int]:
        """Layers that carry bytes, in send order."""
        return list(self.placement.by_layer)

    def _layer(self, layer: Any) -> int:
        """``layer`` as an int index of the layout (``plan.check_layer``): staging ``-1`` would stage nothing
        and send nothing."""
        return check_layer(layer, self.stager.layout.num_layers)

    def views(self, layer: int) -> list[torch.Tensor]:
        """The host region of ``layer``: one uint8 view per segment, in plan order (none for a layer
        without bytes in this request). ``KvwireError`` once the job was released (the region is the pool's)."""
        layer = self._layer(layer)
        if self._released or self._host is None:
            raise KvwireError("staging job was released")
        return self.placement.views(self._host, layer)

    def stage(self, layer: int, *, wait_event: Any = None, stream: Any = None) -> StagedLayer:
        """Copy ``layer`` into its host region; returns at once on a GPU (resolves when the copy is done).

        ``wait_event``: a CUDA event the copies wait for (the layer's compute done); without one they wait
        for the work already queued on the current stream. ``stream``: run on this stream instead of the
        stager's (ordered after the stager's earlier work, and its later work after this layer). CPU
        caches are copied synchronously. ``layer`` must be one of the layout's (``LayoutMismatch``).
        """
        layer = self._layer(layer)
        if self._released:
            raise KvwireError("staging job was released")
        with self._lock:
            if layer in self.staged:
                raise ValueError(f"layer {layer} staged twice")
            staged = StagedLayer(layer, self.views(layer), 0)
            self.staged[layer] = staged
        plan = self.plans.get(layer)
        if plan is None:
            staged.resolve(None)
            return staged
        staged.nbytes = plan.nbytes
        dev = self.stager.device
        try:
            if dev.cuda:
                self._stage_cuda(plan, staged, wait_event, stream)
            else:
                with dev.lock:
                    run_ops(plan.ops)
                staged.resolve(None)
        except BaseException as e:
            if not staged.done():
                staged.resolve(e)
            raise
        return staged

    def _stage_cuda(self, plan: LayerPlan, staged: StagedLayer, wait_event: Any, stream: Any) -> None:
        dev = self.stager.device
        own = dev.stream
        s = stream if stream is not None else own
        with dev.lock:
            if wait_event is not None:
                s.wait_event(wait_event)
            else:
                s.wait_stream(dev.current_stream())
            if s is not own:
                s.wait_stream(own)  # the scratch: earlier layers' copies out of it are done
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
            if s is not own:
                own.wait_stream(s)  # later layers' copies into the scratch wait for this one
                if self._ids is not None:
                    dev.record_stream(self._ids, s)
            if start is not None:
                staged.gpu_events = (start, done)
            assert dev.completer is not None
            dev.completer.submit(done, staged.resolve)

    def stage_and_send(self, writer: Any, layer: int, *, wait_event: Any = None, stream: Any = None
                       ) -> StagedLayer:
        """``stage`` then ``writer.write_layer(layer, views)`` as soon as the bytes are in host memory.

        ``staged.wait_sent()`` waits for the hand-over and raises what ``write_layer`` raised. Layers
        without bytes are not written.
        """
        layer = self._layer(layer)  # the int the writer takes
        staged = self.stage(layer, wait_event=wait_event, stream=stream)
        sent: concurrent.futures.Future[None] = concurrent.futures.Future()
        staged.sent = sent

        def hand_over(_s: StagedLayer) -> None:
            try:
                views = staged.future.result()
                if views:
                    writer.write_layer(layer, views)
                staged.written_at = time.monotonic()
                sent.set_result(None)
            except BaseException as e:  # noqa: BLE001 - reported through the future
                sent.set_exception(e)

        staged.add_done_callback(hand_over)
        return staged

    def send_all(self, writer: Any, *, finish: bool = True, timeout: float | None = 60.0
                 ) -> list[StagedLayer]:
        """Stage and hand over every layer with bytes, in order; then ``writer.finish()`` if ``finish``.
        ``timeout`` as ``StagedLayer.result``'s, checked before a layer is staged."""
        timeout = check_wait_timeout("timeout", timeout)
        staged = [self.stage_and_send(writer, layer) for layer in self.layers if layer not in self.staged]
        end = None if timeout is None else time.monotonic() + timeout
        for s in staged:
            s.wait_sent(None if end is None else max(0.0, end - time.monotonic()))
        if finish:
            writer.finish()
        return staged

    def wait(self, timeout: float | None = None) -> None:
        """Until every layer staged so far is in host memory (raises a layer's error). ``timeout`` as
        ``StagedLayer.result``'s."""
        timeout = check_wait_timeout("timeout", timeout)
        end = None if timeout is None else time.monotonic() + timeout
        for s in list(self.staged.values()):
            s.result(None if end is None else max(0.0, end - time.monotonic()))

    def release(self) -> None:
        """Return the buffer to the pool after in-flight copies into it finished. Only once the transfer
        no longer reads the views (it ended): see ``release_when_done``."""
        with self._lock:
            first = not self._released
            self._released = True
            pending = list(self.staged.values())
        if not first:  # another thread is releasing: return once it is done
            self._release_done.wait()
            return
        try:
            concurrent.futures.wait([s.future for s in pending])
            self.plans = {}
            self._host = None
            self._ids = self._ids_keep = None
            self.buffer.release()
        finally:
            self._release_done.set()

    def release_when_done(self, outcome: Any) -> None:
        """Release when ``outcome`` (anything with ``add_done_callback``, e.g. an OutgoingTransfer) ends."""
        outcome.add_done_callback(lambda _f: self.release())

    def __enter__(self) -> StagingJob:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class Stager:
    """Sender side: copies requests' layers from a ``PagedCache`` into pooled pinned host buffers.

    One per engine (per device). ``stream``: the side stream to run on (default: a new one). ``timing``:
    record start/end CUDA events per layer (benchmarks). ``d2h``: ``direct`` (each run of consecutive
    blocks straight into the pinned span), ``scratch`` (gather into a device scratch, one copy per layer)
    or ``auto`` (per layer, whichever takes fewer copies; see ``plan``). ``close()`` stops the waiter
    thread and frees the scratch.
    """

    def __init__(self, cache: PagedCache, pool: PinnedPool | None = None, *, stream: Any = None,
                 timing: bool = False, align: int = ALIGN, d2h: str = "auto") -> None:
        self.cache = cache
        self.layout = cache.layout
        self.d2h = check_mode(d2h)
        self.pool = pool if pool is not None else PinnedPool(DEFAULT_POOL_BYTES, backend="torch")
        self.align = align
        self.device = Device(cache, stream, timing, "kvwire-stager")  # its jobs run their copies through it

    @property
    def stream(self) -> Any:
        return self.device.stream

    def begin(self, request: RequestSpec, block_tables: Mapping[Any, Sequence[int]],
              state_slot: int | Mapping[int, int] | None = None, *, acquire_timeout: float = 0.0) -> StagingJob:
        """Plan ``request``, check its block tables (per group) and state slot, take a host buffer, and
        build every layer's copies (so that ``stage`` only enqueues them).

        ``LayoutMismatch`` if the tables or slot do not fit; ``PoolExhausted`` if no buffer frees up
        within ``acquire_timeout`` seconds (finite, >= 0; 0: at once).
        """
        wait = check_wait("acquire_timeout", acquire_timeout)
        state_slot = check_slot(state_slot)
        placement = Placement(self.layout, request, self.align)
        tables = check_request(self.cache, placement, block_tables, state_slot, unique=False)
        buf = self.pool.acquire(placement.total, block=wait > 0, timeout=wait)
        try:
            return StagingJob(self, request, placement, tables, state_slot, buf)
        except BaseException:
            buf.release()
            raise

    def close(self) -> None:
        self.device.close()

    def __enter__(self) -> Stager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
