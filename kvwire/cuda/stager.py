"""Staging: gather a request's cache layer by layer into pinned host memory; scatter it on the receiver.

Owns: the host placement of a request's segments (one pooled buffer; each layer's segments adjacent, each
segment 256-byte aligned, so a layer is one contiguous span), block-table gathers and scatters (whole
blocks with ``index_select(out=)`` / ``index_copy_``, a misaligned first block and a partial last block
with ``copy_`` into views), the side CUDA stream and events, the thread that waits on events, and the
per-layer readiness API on both sides. Must not know: sockets, lanes, frames. The transport is reached
through duck typing only: a *writer* has ``write_layer(layer, buffers)`` (an ``OutgoingTransfer``), a
*source* has ``on_layer(fn)`` and optionally ``manifest`` and ``add_done_callback`` (an
``IncomingTransfer``), a *receiver* has ``expect(request_id, buffers, layout=, state_position=)``.

Data path, GPU: sender, per layer on the stager's stream (after the caller's event, or after the work
already queued on the current stream): gather into a device scratch laid out like the host span, then one
``copy_(non_blocking=True)`` D2H into the pinned span; an event marks it ready and a waiter thread
resolves the layer. Receiver, per verified layer: one H2D of the pinned span into scratch, then scatter
into the decode cache at the receiver's own block ids and state slot. The engine's streams never wait.
CPU tensors take the same code synchronously, gathering straight into (scattering straight from) the
host buffer with no scratch. The host bytes handed to ``write_layer`` are views of the pooled buffer:
nothing is copied between staging and the socket.

All gathers and scatters move raw bytes (viewed as the widest integer word the strides allow), so every
dtype, float8 included, is carried bit-exactly and never converted.
"""

from __future__ import annotations

import concurrent.futures
import queue
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from ..codec.layout import ModelLayout, RequestSpec, Segment, plan_segments
from ..errors import KvwireError, LayoutMismatch
from .paged import PagedCache
from .pool import PinnedPool, PooledBuffer

if TYPE_CHECKING:
    import torch

ALIGN = 256
DEFAULT_POOL_BYTES = 4 << 30

_WORDS = ((8, "int64"), (4, "int32"), (2, "int16"))


def _round_up(n: int, a: int) -> int:
    return -(-n // a) * a


def _fits(t: torch.Tensor, w: int) -> bool:
    if t.dim() == 0 or t.shape[-1] % w or t.storage_offset() % w or t.stride(-1) != 1:
        return False
    return all(st % w == 0 for st, n in zip(t.stride()[:-1], t.shape[:-1]) if n > 1)


def _as_words(*byte_tensors: torch.Tensor) -> list[torch.Tensor]:
    """The uint8 tensors viewed as the widest integer word all of them allow (strides, offsets, sizes)."""
    import torch

    for w, name in _WORDS:
        if all(_fits(t, w) for t in byte_tensors):
            try:
                return [t.view(getattr(torch, name)) for t in byte_tensors]
            except RuntimeError:  # a stride rule torch applies that _fits does not model
                continue
    return list(byte_tensors)


class _Placement:
    """Where each segment of a request lives in one host buffer, and each layer's contiguous span."""

    def __init__(self, layout: ModelLayout, request: RequestSpec, align: int = ALIGN) -> None:
        self.segments: list[Segment] = plan_segments(layout, request)
        self.offsets: list[int] = []
        self.by_layer: dict[int, list[int]] = {}
        pos = 0
        for s in self.segments:
            pos = _round_up(pos, align)
            self.offsets.append(pos)
            pos += s.nbytes
            self.by_layer.setdefault(s.layer, []).append(s.index)
        self.total = pos
        self.spans: dict[int, tuple[int, int]] = {}
        for layer, idx in self.by_layer.items():
            self.spans[layer] = (self.offsets[idx[0]], self.offsets[idx[-1]] + self.segments[idx[-1]].nbytes)

    @property
    def payload_bytes(self) -> int:
        return sum(s.nbytes for s in self.segments)


def _group_ranges(layout: ModelLayout, segments: Sequence[Segment]) -> dict[str, tuple[int, int]]:
    """Per token group, the union ``[start, stop)`` of the tokens its segments carry."""
    out: dict[str, tuple[int, int]] = {}
    for s in segments:
        cache = layout.layers[s.layer].caches[s.cache]
        if s.token_count:
            a, b = out.get(cache.group, (s.token_start, s.token_start + s.token_count))
            out[cache.group] = (min(a, s.token_start), max(b, s.token_start + s.token_count))
    return out


def _check_request(cache: PagedCache, placement: _Placement, block_tables: Mapping[str, Sequence[int]],
                   state_slot: int | None, unique: bool) -> dict[str, list[int]]:
    """Block tables and slot fit the cache and the request: ``LayoutMismatch`` before any byte moves."""
    bs = cache.block_size
    tables: dict[str, list[int]] = {}
    for group, (start, stop) in _group_ranges(cache.layout, placement.segments).items():
        if group not in block_tables:
            raise LayoutMismatch(f"no block table for group {group!r} (tokens {start}..{stop} are shipped)")
        table = [int(b) for b in block_tables[group]]
        first, last = start // bs, (stop - 1) // bs
        if len(table) <= last:
            raise LayoutMismatch(f"block table {group!r} has {len(table)} blocks; tokens up to {stop} need "
                                 f"{last + 1} at block size {bs}")
        used = table[first : last + 1]
        limit = cache.num_blocks(group)
        bad = [b for b in used if not 0 <= b < limit]
        if bad:
            raise LayoutMismatch(f"block table {group!r}: block ids {bad[:4]} outside [0, {limit})")
        if unique and len(set(used)) != len(used):
            raise LayoutMismatch(f"block table {group!r} repeats a block among the ones written")
        tables[group] = table
    if any(not s.token_count for s in placement.segments):
        if state_slot is None or not 0 <= state_slot < cache.num_slots:
            raise LayoutMismatch(f"state slot {state_slot} outside [0, {cache.num_slots})")
    return tables


def _full_block_runs(placement: _Placement, layout: ModelLayout, bs: int) -> set[tuple[str, int, int]]:
    """(group, first full block, count) of every segment's whole-block middle part."""
    runs = set()
    for s in placement.segments:
        if not s.token_count:
            continue
        p, stop = s.token_start, s.token_start + s.token_count
        if p % bs:
            p = min(stop, (p // bs + 1) * bs)
        k = (stop - p) // bs
        if k:
            runs.add((layout.layers[s.layer].caches[s.cache].group, p // bs, k))
    return runs


class _Completer:
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


class _Device:
    """The CUDA side of a stager or unstager: its stream, the event waiter, index tensors on the device."""

    def __init__(self, cache: PagedCache, stream: Any, timing: bool, name: str) -> None:
        import torch

        self.cuda = cache.is_cuda
        self.device = cache.device
        self.timing = timing
        #: move each layer through a device scratch and one span copy (always on a GPU; settable on CPU
        #: so that CPU tests exercise the GPU path's placement arithmetic)
        self.via_scratch = self.cuda
        self.stream: Any = None
        self.completer: _Completer | None = None
        if self.cuda:
            self.stream = stream if stream is not None else torch.cuda.Stream(device=self.device)
            self.completer = _Completer(name)

    def event(self, timing: bool = False) -> Any:
        import torch

        return torch.cuda.Event(enable_timing=timing or self.timing, blocking=True)

    def index_tensors(self, tables: dict[str, list[int]], runs: set[tuple[str, int, int]]
                      ) -> tuple[dict[tuple[str, int, int], torch.Tensor], Any, Any]:
        """Block-id tensors of each run, on the cache's device. GPU: copied on our stream, with an event."""
        import torch

        host = {r: torch.tensor(tables[r[0]][r[1] : r[1] + r[2]], dtype=torch.int64) for r in runs}
        if not self.cuda:
            return host, None, None
        pinned = {r: t.pin_memory() for r, t in host.items()}
        with torch.cuda.stream(self.stream):
            dev = {r: t.to(self.device, non_blocking=True) for r, t in pinned.items()}
            ev = self.event()
            ev.record(self.stream)
        return dev, ev, pinned  # the pinned sources stay referenced until the job ends

    def close(self) -> None:
        if self.completer is not None:
            self.completer.close()
            self.completer = None


def _engine_and_region(cache: PagedCache, seg: Segment, region: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Word views of the segment's engine memory and of its ``nbytes`` region (token-major or state)."""
    import torch

    st = cache.storage(seg.layer, seg.cache)
    if st.token_indexed:
        eng = st.paged_views()[seg.tensor].view(torch.uint8)
        reg = region.view(seg.token_count, *eng.shape[2:])
    else:
        eng = st.slot_views()[seg.tensor].view(torch.uint8)
        reg = region.view(*eng.shape[1:])
    e, r = _as_words(eng, reg)
    return e, r


def _move_segment(cache: PagedCache, seg: Segment, region: torch.Tensor, table: Sequence[int] | None,
                  slot: int | None, ids: Mapping[tuple[str, int, int], torch.Tensor], to_region: bool
                  ) -> None:
    """Copy one segment between engine memory and its region: gather (``to_region``) or scatter."""
    import torch

    eng, reg = _engine_and_region(cache, seg, region)
    if not seg.token_count:
        assert slot is not None
        if to_region:
            reg.copy_(eng[slot], non_blocking=True)
        else:
            eng[slot].copy_(reg, non_blocking=True)
        return
    assert table is not None
    bs = cache.block_size
    group = cache.layout.layers[seg.layer].caches[seg.cache].group
    p, stop, pos = seg.token_start, seg.token_start + seg.token_count, 0

    def piece(n: int) -> None:
        b, off = divmod(p, bs)
        e, r = eng[table[b], off : off + n], reg[pos : pos + n]
        if to_region:
            r.copy_(e, non_blocking=True)
        else:
            e.copy_(r, non_blocking=True)

    if p % bs:  # a first block entered mid-way (SWA windows, unaligned prefix hits)
        n = min(bs - p % bs, stop - p)
        piece(n)
        p, pos = p + n, pos + n
    k = (stop - p) // bs
    if k:
        r = reg[pos : pos + k * bs].view(k, bs, *reg.shape[1:])
        idx = ids[(group, p // bs, k)]
        if to_region:
            torch.index_select(eng, 0, idx, out=r)
        else:
            eng.index_copy_(0, idx, r)
        p, pos = p + k * bs, pos + k * bs
    if p < stop:  # a partial last block
        piece(stop - p)


# ====================================================================== sender side


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
        """The per-segment host views, once the bytes are there (builtin TimeoutError if not in time)."""
        try:
            return self.future.result(timeout)
        except concurrent.futures.TimeoutError:
            raise TimeoutError(f"layer {self.layer} not staged after {timeout}s") from None

    def wait_sent(self, timeout: float | None = None) -> None:
        """After ``stage_and_send``: wait until the views were handed to the writer (raises its error)."""
        if self.sent is None:
            raise ValueError("layer was staged without a writer")
        try:
            self.sent.result(timeout)
        except concurrent.futures.TimeoutError:
            raise TimeoutError(f"layer {self.layer} not handed to the writer after {timeout}s") from None

    def add_done_callback(self, fn: Callable[[StagedLayer], None]) -> None:
        """``fn(self)`` once staged (or failed), from the waiter thread, or now if already done."""
        self.future.add_done_callback(lambda _f: fn(self))

    def _resolve(self, err: BaseException | None) -> None:
        self.ready_at = time.monotonic()
        if err is None:
            self.future.set_result(self.views)
        else:
            self.future.set_exception(err)


class StagingJob:
    """One request on the sender: its pinned buffer, block tables and state slot; stage layers into it.

    Get one from ``Stager.begin``. Keep it (and the cache blocks it reads) alive until the transfer ended:
    ``release_when_done(outgoing_transfer)`` returns the buffer to the pool then.
    """

    def __init__(self, stager: Stager, request: RequestSpec, placement: _Placement,
                 tables: dict[str, list[int]], slot: int | None, buffer: PooledBuffer) -> None:
        self.stager = stager
        self.request = request
        self.placement = placement
        self.tables = tables
        self.state_slot = slot
        self.buffer = buffer
        self._host = buffer.tensor()
        self._ids, self._ids_ready, self._ids_keep = stager._dev.index_tensors(
            tables, _full_block_runs(placement, stager.layout, stager.cache.block_size))
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

    def views(self, layer: int) -> list[torch.Tensor]:
        """The host region of ``layer``: one uint8 view per segment, in plan order."""
        p = self.placement
        return [self._host[p.offsets[i] : p.offsets[i] + p.segments[i].nbytes]
                for i in p.by_layer.get(layer, [])]

    def stage(self, layer: int, *, wait_event: Any = None, stream: Any = None) -> StagedLayer:
        """Gather ``layer`` into its host region; returns at once on a GPU (resolves when the copy is done).

        ``wait_event``: a CUDA event the gather waits for (the layer's compute done); without one it waits
        for the work already queued on the current stream. ``stream``: run on this stream instead of the
        stager's. CPU caches are gathered synchronously.
        """
        if self._released:
            raise KvwireError("staging job was released")
        with self._lock:
            if layer in self.staged:
                raise ValueError(f"layer {layer} staged twice")
            staged = StagedLayer(layer, self.views(layer), 0)
            self.staged[layer] = staged
        idx = self.placement.by_layer.get(layer)
        if not idx:
            staged._resolve(None)
            return staged
        staged.nbytes = sum(self.placement.segments[i].nbytes for i in idx)
        dev = self.stager._dev
        try:
            if dev.cuda:
                self._stage_cuda(layer, staged, wait_event, stream)
            else:
                if dev.via_scratch:
                    self._gather_via_scratch(layer)
                else:
                    self._gather(layer, self._host, 0)
                staged._resolve(None)
        except BaseException as e:
            if not staged.done():
                staged._resolve(e)
            raise
        return staged

    def _gather(self, layer: int, target: torch.Tensor, base: int) -> None:
        """Gather the layer's segments into ``target``: the host buffer, or a scratch holding the layer's
        span from byte ``base``."""
        p, cache = self.placement, self.stager.cache
        for i in p.by_layer[layer]:
            seg = p.segments[i]
            group = cache.layout.layers[seg.layer].caches[seg.cache].group
            region = target[p.offsets[i] - base : p.offsets[i] - base + seg.nbytes]
            _move_segment(cache, seg, region, self.tables.get(group), self.state_slot, self._ids, True)

    def _gather_via_scratch(self, layer: int) -> None:
        """Gather into a device scratch laid out like the layer's host span, then one copy to the host.
        On a GPU this runs inside the stream context: the scratch is freed to that stream, so its
        memory is reused only by work ordered after this layer's D2H."""
        import torch

        lo, hi = self.placement.spans[layer]
        scratch = torch.empty(hi - lo, dtype=torch.uint8, device=self.stager._dev.device)
        self._gather(layer, scratch, lo)
        self._host[lo:hi].copy_(scratch, non_blocking=True)  # the one D2H of this layer

    def _stage_cuda(self, layer: int, staged: StagedLayer, wait_event: Any, stream: Any) -> None:
        import torch

        dev = self.stager._dev
        s = stream if stream is not None else dev.stream
        if wait_event is not None:
            s.wait_event(wait_event)
        else:
            s.wait_stream(torch.cuda.current_stream(dev.device))
        if self._ids_ready is not None:
            s.wait_event(self._ids_ready)
        with torch.cuda.stream(s):
            start = None
            if dev.timing:
                start = dev.event(True)
                start.record(s)
            self._gather_via_scratch(layer)
            done = dev.event()
            done.record(s)
            if s is not dev.stream:
                for t in self._ids.values():
                    t.record_stream(s)
        if start is not None:
            staged.gpu_events = (start, done)
        assert dev.completer is not None
        dev.completer.submit(done, staged._resolve)

    def stage_and_send(self, writer: Any, layer: int, *, wait_event: Any = None, stream: Any = None
                       ) -> StagedLayer:
        """``stage`` then ``writer.write_layer(layer, views)`` as soon as the bytes are in host memory.

        ``staged.wait_sent()`` waits for the hand-over and raises what ``write_layer`` raised. Layers
        without bytes are not written.
        """
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
        """Stage and hand over every layer with bytes, in order; then ``writer.finish()`` if ``finish``."""
        staged = [self.stage_and_send(writer, layer) for layer in self.layers if layer not in self.staged]
        end = None if timeout is None else time.monotonic() + timeout
        for s in staged:
            s.wait_sent(None if end is None else max(0.0, end - time.monotonic()))
        if finish:
            writer.finish()
        return staged

    def wait(self, timeout: float | None = None) -> None:
        """Until every layer staged so far is in host memory (raises a layer's error)."""
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
            self._host = None
            self._ids_keep = None
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
    """Sender side: gathers requests' layers from a ``PagedCache`` into pooled pinned host buffers.

    One per engine (per device). ``stream``: the side stream to run on (default: a new one). ``timing``:
    record start/end CUDA events per layer (benchmarks). ``close()`` stops the waiter thread.
    """

    def __init__(self, cache: PagedCache, pool: PinnedPool | None = None, *, stream: Any = None,
                 timing: bool = False, align: int = ALIGN) -> None:
        self.cache = cache
        self.layout = cache.layout
        self.pool = pool if pool is not None else PinnedPool(DEFAULT_POOL_BYTES, backend="torch")
        self.align = align
        self._dev = _Device(cache, stream, timing, "kvwire-stager")

    @property
    def stream(self) -> Any:
        return self._dev.stream

    def begin(self, request: RequestSpec, block_tables: Mapping[str, Sequence[int]],
              state_slot: int | None = None, *, acquire_timeout: float = 0.0) -> StagingJob:
        """Plan ``request``, check its block tables (per group) and state slot, take a host buffer.

        ``LayoutMismatch`` if the tables or slot do not fit; ``PoolExhausted`` if no buffer frees up
        within ``acquire_timeout`` seconds.
        """
        placement = _Placement(self.layout, request, self.align)
        tables = _check_request(self.cache, placement, block_tables, state_slot, unique=False)
        buf = self.pool.acquire(placement.total, block=acquire_timeout > 0, timeout=acquire_timeout)
        try:
            return StagingJob(self, request, placement, tables, state_slot, buf)
        except BaseException:
            buf.release()
            raise

    def close(self) -> None:
        self._dev.close()

    def __enter__(self) -> Stager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ====================================================================== receiver side


class UnstagingJob:
    """One request on the receiver: pinned buffers to receive into, and per-layer scatter into the cache.

    Register ``buffers`` with the receiver (``expect_on(receiver)`` does it and ``attach``es), then
    ``wait_layer(i)`` returns once layer ``i`` is in the destination cache.
    """

    def __init__(self, unstager: Unstager, request: RequestSpec, placement: _Placement,
                 tables: dict[str, list[int]], slot: int | None, buffer: PooledBuffer) -> None:
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
        self._ids, self._ids_ready, self._ids_keep = unstager._dev.index_tensors(
            tables, _full_block_runs(placement, unstager.layout, unstager.cache.block_size))
        self._cond = threading.Condition()
        self.arrived_at: dict[int, float] = {}
        self.done_at: dict[int, float] = {}
        self.gpu_events: dict[int, tuple[Any, Any]] = {}
        self._errors: dict[int, BaseException] = {}
        self._transfer_error: BaseException | None = None
        self._pending = 0
        self._released = False
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

    # ---- wiring to a transport
    def expect_on(self, receiver: Any, *, check_state_position: bool = True, timeout: float | None = None
                  ) -> Any:
        """``receiver.expect(...)`` with this job's buffers, layout and state position; then ``attach``."""
        handle = receiver.expect(self.request.request_id, self.buffers, layout=self.unstager.layout,
                                 state_position=self.request.state_position if check_state_position else None,
                                 timeout=timeout)
        self.attach(handle)
        return handle

    def attach(self, source: Any) -> None:
        """Unstage each layer ``source`` reports verified (``source.on_layer``); a failed source fails the
        layers that had not arrived."""
        self.source = source
        if hasattr(source, "add_done_callback"):
            source.add_done_callback(self._source_done)
        source.on_layer(self.layer_arrived)

    def _source_done(self, fut: concurrent.futures.Future[Any]) -> None:
        err = fut.exception()
        if err is not None:
            with self._cond:
                self._transfer_error = err
                self._cond.notify_all()

    def layer_arrived(self, layer: int) -> None:
        """Layer ``layer``'s bytes are complete and verified in ``buffers``: queue its scatter."""
        with self._cond:
            if self._released:
                return
            if layer in self.arrived_at:
                return
            self.arrived_at[layer] = time.monotonic()
            self._pending += 1
        self.unstager._submit(self, layer)

    # ---- the scatter (worker thread)
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

    def _unstage(self, layer: int) -> None:
        try:
            if layer not in self.placement.by_layer:
                raise LayoutMismatch(f"layer {layer} carries no bytes in this request")
            self._check_manifest(layer)
            dev = self.unstager._dev
            if dev.cuda:
                self._unstage_cuda(layer)
                return
            if dev.via_scratch:
                self._scatter_via_scratch(layer)
            else:
                self._scatter(layer, self._host, 0)
        except BaseException as e:  # noqa: BLE001 - reported to wait_layer
            self._layer_done(layer, e)
            return
        self._layer_done(layer, None)

    def _scatter(self, layer: int, source: torch.Tensor, base: int) -> None:
        p, cache = self.placement, self.unstager.cache
        for i in p.by_layer[layer]:
            seg = p.segments[i]
            group = cache.layout.layers[seg.layer].caches[seg.cache].group
            region = source[p.offsets[i] - base : p.offsets[i] - base + seg.nbytes]
            _move_segment(cache, seg, region, self.tables.get(group), self.state_slot, self._ids, False)

    def _scatter_via_scratch(self, layer: int) -> None:
        """One copy of the layer's host span to a device scratch, then the scatter from it."""
        import torch

        lo, hi = self.placement.spans[layer]
        scratch = torch.empty(hi - lo, dtype=torch.uint8, device=self.unstager._dev.device)
        scratch.copy_(self._host[lo:hi], non_blocking=True)  # the one H2D of this layer
        self._scatter(layer, scratch, lo)

    def _unstage_cuda(self, layer: int) -> None:
        import torch

        dev = self.unstager._dev
        s = dev.stream
        if self._ids_ready is not None:
            s.wait_event(self._ids_ready)
        with torch.cuda.stream(s):
            start = None
            if dev.timing:
                start = dev.event(True)
                start.record(s)
            self._scatter_via_scratch(layer)
            done = dev.event()
            done.record(s)
        if start is not None:
            self.gpu_events[layer] = (start, done)
        assert dev.completer is not None
        dev.completer.submit(done, lambda err: self._layer_done(layer, err))

    def _layer_done(self, layer: int, err: BaseException | None) -> None:
        with self._cond:
            if err is None:
                self.done_at[layer] = time.monotonic()
            else:
                self._errors[layer] = err
            self._pending -= 1
            self._cond.notify_all()

    # ---- caller API
    def wait_layer(self, layer: int, timeout: float | None = None) -> None:
        """Return once ``layer`` is in the destination cache (at once for layers without bytes).

        Raises the layer's error (``LayoutMismatch``...), the transfer's error if it ended before the
        layer arrived, or builtin ``TimeoutError``.
        """
        if layer not in self.placement.by_layer:
            if not 0 <= layer < self.unstager.layout.num_layers:
                raise ValueError(f"no layer {layer}")
            return
        end = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while layer not in self.done_at:
                if layer in self._errors:
                    raise self._errors[layer]
                if self._transfer_error is not None and layer not in self.arrived_at:
                    raise self._transfer_error
                left = None if end is None else end - time.monotonic()
                if left is not None and left <= 0:
                    raise TimeoutError(f"layer {layer} not unstaged after {timeout}s")
                self._cond.wait(left if left is not None else 1.0)

    def wait_all(self, timeout: float | None = None) -> None:
        end = None if timeout is None else time.monotonic() + timeout
        for layer in self.layers:
            self.wait_layer(layer, None if end is None else max(0.0, end - time.monotonic()))

    def release(self) -> None:
        """Return the buffers to the pool (after scatters in flight finished). The receiver must no longer
        write into them: release after the transfer ended."""
        with self._cond:
            first = not self._released
            self._released = True
            while first and self._pending:
                self._cond.wait(1.0)
        if not first:  # another thread is releasing: return once it is done
            self._release_done.wait()
            return
        try:
            self._host = None
            self.buffers = []
            self._ids_keep = None
            self.buffer.release()
        finally:
            self._release_done.set()

    def __enter__(self) -> UnstagingJob:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class Unstager:
    """Receiver side: scatters verified layers from pooled pinned buffers into a ``PagedCache``.

    A worker thread takes layers as they are verified (receiver callbacks stay short) and, on a GPU,
    queues one H2D plus the scatter per layer on the unstager's stream.
    """

    def __init__(self, cache: PagedCache, pool: PinnedPool | None = None, *, stream: Any = None,
                 timing: bool = False, align: int = ALIGN) -> None:
        self.cache = cache
        self.layout = cache.layout
        self.pool = pool if pool is not None else PinnedPool(DEFAULT_POOL_BYTES, backend="torch")
        self.align = align
        self._dev = _Device(cache, stream, timing, "kvwire-unstager-wait")
        self._q: queue.Queue[tuple[UnstagingJob, int] | None] = queue.Queue()
        self._worker: threading.Thread | None = None
        self._lock = threading.Lock()
        self._closed = False

    @property
    def stream(self) -> Any:
        return self._dev.stream

    def prepare(self, request: RequestSpec, block_tables: Mapping[str, Sequence[int]],
                state_slot: int | None = None, *, acquire_timeout: float = 0.0) -> UnstagingJob:
        """Plan ``request`` (the receiver's view: its prefix hits, its state position), check the
        receiver's block tables (ids in range and distinct) and slot, take pinned receive buffers."""
        placement = _Placement(self.layout, request, self.align)
        tables = _check_request(self.cache, placement, block_tables, state_slot, unique=True)
        buf = self.pool.acquire(placement.total, block=acquire_timeout > 0, timeout=acquire_timeout)
        try:
            return UnstagingJob(self, request, placement, tables, state_slot, buf)
        except BaseException:
            buf.release()
            raise

    def _submit(self, job: UnstagingJob, layer: int) -> None:
        with self._lock:
            if self._closed:
                job._layer_done(layer, KvwireError("unstager closed"))
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
            job._unstage(layer)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            worker = self._worker
            self._q.put(None)
        if worker is not None:
            worker.join(10)
        self._dev.close()

    def __enter__(self) -> Unstager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
