"""M prefill ranks to N decode ranks: each prefill rank sends each decode rank only the slices a
``ReshardPlan`` gives it, and they land in the decode rank's own buffers.

Owns: ``ReshardSender``/``ReshardOutgoing`` (one prefill rank: one ``Session`` per decode rank it feeds, one
transfer per target; strided pieces gathered into a contiguous buffer, contiguous ones sent from the
caller's memory; its done callbacks on its own key of the first target session's callback pool),
``ReshardReceiver``/``ReshardIncoming`` (one decode rank: one ``Receiver``, one expected transfer per
contributing prefill rank; contiguous pieces received straight into the destination, strided
ones into a staging buffer scattered as soon as their layer is verified; ``wait_layer(i)`` once every
contributing rank's part of layer ``i`` is in; its ``on_layer`` and done callbacks queued, in that order, on
its own key of the receiver's callback pool, never run by a source's callback; the request fails, naming the
prefill rank, when any contributing transfer fails; once its outcome is decided its sources are cancelled and
no scatter starts, and it is announced only when no scatter is running and every source has ended, so that no
lane writes into its buffers any more: its done callbacks free the destination and any early staging). Must not
know: the wire, lanes, sockets or torch: it is built on ``Session.send``/``Receiver.expect`` and their handles
only, and reaches memory through ``kvwire.buffers``.

Transfers are keyed ``"<request_id>@<prefill rank>><decode rank>"``; each carries the plan's slice layout,
so a sender with another plan is refused by the receiver's layout check before a byte lands.
"""

from __future__ import annotations

import functools
import numbers
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.lib.stride_tricks import as_strided

from .buffers import byte_view, segment_views
from .codec.layout import RequestSpec, plan_segments
from .codec.reshard import ReshardPlan, SliceCopy
from .codec.transfer import State
from .errors import KvwireError, LayoutMismatch
from .tcp import LayerOutcome, Outcome, Receiver, Session
from .tcp._callbacks import Callbacks

if TYPE_CHECKING:
    from .tcp import IncomingTransfer, OutgoingTransfer


def sub_request_id(request_id: str, prefill_rank: int, decode_rank: int) -> str:
    """The id of the transfer from ``prefill_rank`` to ``decode_rank`` for ``request_id``."""
    return f"{request_id}@{prefill_rank}>{decode_rank}"


def _sub_request(request: RequestSpec, p: int, d: int) -> RequestSpec:
    return RequestSpec(sub_request_id(request.request_id, p, d), request.num_tokens, request.state_position,
                       dict(request.prefix_hit), dict(request.block_ids))


def _rows(buf: memoryview, offset: int, stride: int, c: SliceCopy, writable: bool) -> np.ndarray:
    """The ``(rows, row_bytes)`` strided view of ``c``'s bytes in ``buf`` (bounds checked first)."""
    end = offset + (c.rows - 1) * stride + c.row_bytes
    if offset < 0 or end > len(buf):
        raise LayoutMismatch(f"slice rows [{offset}, {end}) outside a {len(buf)}-byte segment")
    a = np.frombuffer(buf, dtype=np.uint8)[offset:end]
    return as_strided(a, shape=(c.rows, c.row_bytes), strides=(stride, 1), writeable=writable)


def gather(src: memoryview, c: SliceCopy) -> memoryview | np.ndarray:
    """The slice's bytes from a prefill rank's segment: a view when contiguous, else one strided copy."""
    if c.src_contiguous:
        if c.src_offset + c.nbytes > len(src):
            raise LayoutMismatch(f"slice [{c.src_offset}, +{c.nbytes}) outside a {len(src)}-byte segment")
        return src[c.src_offset: c.src_offset + c.nbytes]
    return np.ascontiguousarray(_rows(src, c.src_offset, c.src_stride, c, False)).reshape(-1)


def scatter(dst: memoryview, c: SliceCopy, data: Any) -> None:
    """Write a received slice (``data``: its ``nbytes`` contiguous bytes) into a decode rank's segment."""
    rows = np.frombuffer(byte_view(data), dtype=np.uint8).reshape(c.rows, c.row_bytes)
    _rows(dst, c.dst_offset, c.dst_stride, c, True)[...] = rows


class ReshardOutgoing(Outcome):
    """One request on one prefill rank: ``write_layer`` with this rank's own segments of a layer (as for an
    ``OutgoingTransfer`` of its layout), ``finish()``, then ``result()``. Done once every target is; failed
    once all ended and any did not, naming each such decode rank (the others still get their slices). Its
    done callbacks go to ``callbacks`` (a session's pool) under a key of its own, as a plain handle's do:
    never run by a target's callback, nor on the adding thread once the request has ended."""

    def __init__(self, plan: ReshardPlan, rank: int, request: RequestSpec,
                 transfers: Mapping[int, OutgoingTransfer], callbacks: Callbacks | None = None) -> None:
        super().__init__(callbacks)
        self.plan, self.rank, self.request = plan, rank, request
        self.transfers = dict(transfers)
        own = plan_segments(plan.prefill, request)
        self._own_by_layer: dict[int, list[int]] = {}
        for s in own:
            self._own_by_layer.setdefault(s.layer, []).append(s.index)
        self._own_sizes = [s.nbytes for s in own]
        self._copies: dict[int, dict[int, list[SliceCopy]]] = {}
        for d in self.transfers:
            by_layer: dict[int, list[SliceCopy]] = {}
            for s, c in zip(plan_segments(plan.slice_layout(rank, d), _sub_request(request, rank, d)),
                            plan.copies(rank, d, request)):
                by_layer.setdefault(s.layer, []).append(c)
            self._copies[d] = by_layer
        # gathered buffers by (decode rank, layer): the transport does not copy them; dropped once acked
        self._keep: dict[tuple[int, int], list[np.ndarray]] = {}
        self._targets_lock = threading.Lock()
        self._ended: dict[int, str] = {}
        for d, t in self.transfers.items():
            t.add_done_callback(self._on_target_done(d, t))
            t.on_layer_acked(functools.partial(self._acked, d))
        if not self.transfers:
            self._resolve(State.DONE)

    def write_layer(self, layer: int, buffers: Sequence[Any]) -> None:
        """Hand over this rank's segments of ``layer`` (in order). Not copied unless a piece is strided."""
        own = self._own_by_layer.get(layer, [])
        if len(buffers) != len(own):
            raise LayoutMismatch(f"layer {layer} has {len(own)} segments on this rank, got {len(buffers)} buffers")
        views = {}
        for i, b in zip(own, buffers):
            v = byte_view(b)
            if len(v) != self._own_sizes[i]:
                raise LayoutMismatch(f"segment {i} of layer {layer} needs {self._own_sizes[i]} bytes, "
                                     f"buffer has {len(v)}")
            views[i] = v
        for d, t in self.transfers.items():
            copies = self._copies[d].get(layer)
            if copies:
                parts = [gather(views[c.src_segment], c) for c in copies]
                gathered = [p for p in parts if isinstance(p, np.ndarray)]
                if gathered:
                    with self._targets_lock:
                        self._keep[(d, layer)] = gathered
                t.write_layer(layer, parts)

    def write_all(self, buffers: Sequence[Any]) -> None:
        """Every segment of this rank at once, in ``plan_segments`` order."""
        if len(buffers) != len(self._own_sizes):
            raise LayoutMismatch(f"{len(self._own_sizes)} segments, got {len(buffers)} buffers")
        for layer, idx in self._own_by_layer.items():
            self.write_layer(layer, [buffers[i] for i in idx])

    def finish(self) -> ReshardOutgoing:
        for t in self.transfers.values():
            t.finish()
        return self

    def cancel(self, reason: str = "cancelled by sender") -> None:
        for t in self.transfers.values():
            t.cancel(reason)

    def gathered_bytes(self) -> int:
        """Bytes of gathered (strided) pieces held for the transport: released per layer once acknowledged."""
        with self._targets_lock:
            return sum(a.nbytes for parts in self._keep.values() for a in parts)

    def bytes_sent(self) -> dict[int, int]:
        """Payload bytes sent so far to each decode rank (re-sent chunks counted again)."""
        return {d: t.bytes_sent for d, t in self.transfers.items()}

    def _acked(self, d: int, layer: int) -> None:
        """Decode rank ``d`` verified ``layer``: nothing of it is re-sent, its gathered copies can go."""
        with self._targets_lock:
            self._keep.pop((d, layer), None)

    def _on_target_done(self, d: int, t: OutgoingTransfer) -> Callable[[Any], None]:
        return lambda _f: self._target_done(d, t)

    def _target_done(self, d: int, t: OutgoingTransfer) -> None:
        with self._targets_lock:
            self._ended[d] = "" if t.state is State.DONE else f"decode rank {d}: {t.state.value}: {t.reason}"
            if len(self._ended) < len(self.transfers):
                return
            failures = [r for _, r in sorted(self._ended.items()) if r]
            self._keep.clear()
        self._resolve(State.FAILED if failures else State.DONE, "; ".join(failures))


def _rank(plan: ReshardPlan, rank: Any, side: str) -> int:
    """An int rank of ``plan``'s ``side``: a float or bool rank is a ``TypeError`` (0.0 would name the
    transfers ``r@0.0>0``, which no receiver expects: every rank would wait out its timeout)."""
    if not isinstance(plan, ReshardPlan):
        raise TypeError(f"plan must be a ReshardPlan (plan_reshard), not {type(plan).__name__}")
    if isinstance(rank, bool) or not isinstance(rank, numbers.Integral):
        raise TypeError(f"rank must be an int ({side} rank), not {type(rank).__name__}")
    r, tp = int(rank), plan.prefill_tp if side == "prefill" else plan.decode_tp
    if not 0 <= r < tp:
        raise ValueError(f"{side} rank {r} outside tp {tp}")
    return r


class ReshardSender:
    """Prefill rank ``rank`` of ``plan``: ``sessions[d]`` reaches decode rank ``d`` (needed for every
    ``plan.targets(rank)``)."""

    def __init__(self, plan: ReshardPlan, rank: int, sessions: Mapping[int, Session]) -> None:
        rank = _rank(plan, rank, "prefill")
        if not isinstance(sessions, Mapping):
            raise TypeError(f"sessions must be a mapping of decode rank to Session, not {type(sessions).__name__}")
        bad = {d: type(s).__name__ for d, s in sessions.items() if not isinstance(s, Session)}
        if bad:
            raise TypeError(f"sessions must map decode ranks to kvwire Sessions; not one: {bad}")
        missing = [d for d in plan.targets(rank) if d not in sessions]
        if missing:
            raise KvwireError(f"prefill rank {rank} feeds decode ranks {plan.targets(rank)}: no session for {missing}")
        self.plan, self.rank, self.sessions = plan, rank, dict(sessions)

    def send(self, request: RequestSpec, *, timeout: float | None = 300.0, hashing: bool | None = None
             ) -> ReshardOutgoing:
        """Start this rank's transfers of ``request`` (one per target decode rank)."""
        started: dict[int, OutgoingTransfer] = {}
        targets = self.plan.targets(self.rank)
        try:
            for d in targets:
                sub = _sub_request(request, self.rank, d)
                started[d] = self.sessions[d].send(self.plan.slice_layout(self.rank, d), sub, timeout=timeout,
                                                   hashing=hashing)
        except BaseException:
            for t in started.values():
                t.cancel("sibling transfer could not start")
            raise
        pool = self.sessions[targets[0]].callbacks if targets else Callbacks("tx-callbacks")  # (none: ends at once)
        return ReshardOutgoing(self.plan, self.rank, request, started, pool)


class ReshardIncoming(LayerOutcome):
    """One request on one decode rank. ``wait_layer(i)`` returns once every contributing prefill rank's
    part of layer ``i`` is verified and in place; ``result()`` once all of them are. Its user callbacks go
    to ``callbacks`` (the receiver's pool) under a key of its own: one at a time, each layer once, in the
    order the layers completed, then the done callbacks; a slow one delays only those behind it, never a
    source's scatters or outcome."""

    _ended = "request"

    def __init__(self, plan: ReshardPlan, rank: int, request: RequestSpec,
                 callbacks: Callbacks | None = None) -> None:
        super().__init__(callbacks)
        self.plan, self.rank, self.request = plan, rank, request
        self.sources: dict[int, IncomingTransfer] = {}
        self._need: dict[int, set[int]] = {}  # layer -> prefill ranks whose part has not arrived
        self._scatters: dict[tuple[int, int], list[tuple[memoryview, SliceCopy, Any]]] = {}
        self._done_sources: set[int] = set()
        self._over: set[int] = set()  # prefill ranks whose transfer is terminal (none of its lanes writes)
        self._scattering = 0  # _arrived calls writing into the destination (or reading early staging) now
        self._ending: tuple[State, str] | None = None  # decided; announced once no scatter runs and no source

    # ---- caller API
    def on_layer(self, fn: Callable[[int], None]) -> None:
        """``fn(layer)`` as each layer completes (every contributing prefill rank's part of it is verified and
        in place), in that order, before the done callbacks, one call at a time with this request's other
        callbacks, on the receiver's callback pool. Layers completed before the call are reported first, in
        the order they completed: queued like the later ones, never run on the calling thread. On a request
        that has ended they are queued behind its done callbacks. ``TypeError`` for a non-callable ``fn``."""
        if not callable(fn):
            raise TypeError(f"on_layer takes a callable fn(layer), not {type(fn).__name__}")
        with self._cond:  # (_arrived and the outcome queue theirs under it: these go in between, in order)
            if self._ending is None:  # an ended (or ending) request keeps no callback
                self._layer_callbacks.append(fn)
            inline = self._queue_calls([(fn, (layer,)) for layer in self.layer_times])  # (completion order)
        for f, args in inline:  # (only a handle without a pool)
            self.call_soon(f, *args)

    def bytes_received(self) -> dict[int, int]:
        """Payload bytes received so far from each prefill rank (re-sent chunks counted again)."""
        return {p: sum(h.lane_bytes().values()) for p, h in self.sources.items()}

    def cancel(self, reason: str = "cancelled by receiver") -> None:
        """End the request ``cancelled`` (and its sources): at once, or once the scatters in progress (copies
        into the destination, at most one layer per source) finish and every source has ended (the transport
        resolves a transfer once none of its lanes writes into it: the chunks being placed now); no scatter
        starts afterwards. Returns at once: the last of them to end announces it."""
        self._fail(State.CANCELLED, reason, None)

    # ---- wiring (ReshardReceiver.expect: add every source, then start)
    def add_source(self, p: int, h: IncomingTransfer, layers: set[int],
                    scatters: dict[int, list[tuple[memoryview, SliceCopy, Any]]]) -> None:
        with self._cond:
            self.sources[p] = h
            for layer in layers:
                self._need.setdefault(layer, set()).add(p)
            for layer, items in scatters.items():
                self._scatters[(p, layer)] = items

    def start(self) -> None:
        """Every source is added: follow their layers and outcomes."""
        for p, h in self.sources.items():
            h.on_layer(functools.partial(self._arrived, p))
            h.add_done_callback(functools.partial(self._source_finished, p, h))
        if not self.sources:
            with self._cond:
                self._end(State.DONE, "")

    def _arrived(self, p: int, layer: int) -> None:
        with self._cond:  # (none starts once the outcome is decided, which waits for those running: _end)
            if self._ending is not None:
                return
            items = self._scatters.pop((p, layer), [])
            self._scattering += 1
        failed = ""
        try:  # copied outside the lock: other sources' layers and outcomes do not wait for it
            for dst, c, staged in items:
                scatter(dst, c, staged)
        except Exception as e:  # noqa: BLE001 - the request fails; its layer would never complete
            failed = f"scattering prefill rank {p}'s part of layer {layer} failed: {type(e).__name__}: {e}"
        finally:
            with self._cond:
                self._scattering -= 1
                self._announce()
        if failed:
            self._fail(State.FAILED, failed, None)
            return
        with self._cond:
            waiting = self._need.get(layer)
            if waiting is None or p not in waiting:
                return
            waiting.discard(p)
            if waiting or self._ending is not None:
                return
            self.layer_times[layer] = time.monotonic()
            self._cond.notify_all()
            inline = self._queue_calls([(fn, (layer,)) for fn in self._layer_callbacks])  # (in completion order)
        for fn, args in inline:  # (only a handle without a pool)
            self.call_soon(fn, *args)

    def _source_finished(self, p: int, h: IncomingTransfer, _future: Any) -> None:
        self._source_done(p, h)

    def _source_done(self, p: int, h: IncomingTransfer) -> None:
        with self._cond:  # (an outcome decided already may have waited for this source's lanes: _announce)
            self._over.add(p)
            self._announce()
        if h.state is not State.DONE:
            state = State.TIMED_OUT if h.state is State.TIMED_OUT else State.FAILED
            self._fail(state, f"prefill rank {p} ({sub_request_id(self.request.request_id, p, self.rank)}): "
                              f"{h.state.value}: {h.reason}", p)
            return
        with self._cond:  # resolved under it: the done callbacks are queued behind every layer's
            self._done_sources.add(p)
            if len(self._done_sources) < len(self.sources) or len(self.layer_times) < len(self._need):
                return
            self._end(State.DONE, "")

    def _fail(self, state: State, reason: str, culprit: int | None) -> None:
        with self._cond:  # (as _source_done: behind the layers queued so far, before any replayed later)
            if not self._end(state, reason):
                return
        for q, other in self.sources.items():
            if q != culprit and not other.finished:
                other.cancel(f"request failed on decode rank {self.rank}: {reason}")

    def _end(self, state: State, reason: str) -> bool:
        """Under ``_cond``: decide the outcome (once; False if it was). No scatter starts afterwards, and it is
        announced (state, waiters, done callbacks) once the scatters running now are over and every source
        has ended (``_fail`` cancels them): by the last of these to finish, else at once. Its done callbacks
        tell the user the destination and the early staging buffers are free: nothing may write into or read
        from them after that (a source's lane neither: it may receive straight into the destination)."""
        if self._ending is not None:
            return False
        self._ending = (state, reason)
        self._layer_callbacks.clear()
        self._scatters.clear()
        self._announce()
        return True

    def _announce(self) -> None:
        """Under ``_cond``: resolve the decided outcome if no scatter is running and every source has ended
        (queued behind the layers)."""
        if self._ending is None or self._scattering or len(self._over) < len(self.sources):
            return
        if self._resolve(*self._ending):
            self._cond.notify_all()


class ReshardReceiver:
    """Decode rank ``rank`` of ``plan``, receiving on ``receiver`` (its own ``kvwire.Receiver``)."""

    def __init__(self, plan: ReshardPlan, rank: int, receiver: Receiver) -> None:
        rank = _rank(plan, rank, "decode")
        if not isinstance(receiver, Receiver):
            raise TypeError(f"receiver must be a kvwire Receiver, not {type(receiver).__name__}")
        self.plan, self.rank, self.receiver = plan, rank, receiver

    def expect(self, request: RequestSpec, buffers: Any, *, timeout: float | None = None,
               early: Mapping[int, tuple[IncomingTransfer, Sequence[Any]]] | None = None) -> ReshardIncoming:
        """Register this rank's destination for ``request``: one buffer per segment of
        ``plan_segments(plan.decode, request)``, or one buffer of their total size (as ``Receiver.expect``).

        ``early[p]``: prefill rank ``p``'s slice transfer that arrived before this call, with the buffers (one
        per segment of ``slice_layout(p, rank)``) it is being received into; the caller checked its layout.
        Its pieces are scattered into place as its layers verify (those already verified at once, on the
        receiver's callback pool).

        An error registering one prefill rank's transfer (its id already expected, the receiver closed) is
        raised only while no rank's is registered yet: nothing was handed ``buffers`` (``early``'s transfers
        are cancelled), reuse them at once. Past that it is the returned handle's: FAILED, naming that rank,
        the other sources cancelled, and announced once every one has ended (one that began may be writing
        into ``buffers``: free them from its done callbacks, as for any failure)."""
        plan, d = self.plan, self.rank
        views = segment_views(buffers, plan_segments(plan.decode, request), writable=True)
        h = ReshardIncoming(plan, d, request, self.receiver.callbacks)
        try:
            for p in plan.sources(d):
                sub = _sub_request(request, p, d)
                layout = plan.slice_layout(p, d)
                staged_early = (early or {}).get(p)
                dest: list[Any] = []
                layers: set[int] = set()
                scatters: dict[int, list[tuple[memoryview, SliceCopy, Any]]] = {}
                for k, (s, c) in enumerate(zip(plan_segments(layout, sub), plan.copies(p, d, request))):
                    layers.add(s.layer)
                    target = views[c.dst_segment]
                    if staged_early is not None:
                        scatters.setdefault(s.layer, []).append((target, c, staged_early[1][k]))
                    elif c.dst_contiguous:
                        dest.append(target[c.dst_offset: c.dst_offset + c.nbytes])
                    else:
                        staged = np.empty(c.nbytes, dtype=np.uint8)
                        dest.append(staged)
                        scatters.setdefault(s.layer, []).append((target, c, staged))
                if staged_early is not None:
                    sub_h = staged_early[0]
                else:
                    sub_h = self.receiver.expect(sub.request_id, dest, layout=layout,
                                                 state_position=request.state_position, timeout=timeout)
                h.add_source(p, sub_h, layers, scatters)
        except Exception as e:
            if not h.sources:  # (nothing holds ``buffers``: the caller's error to handle)
                for other, _bufs in (early or {}).values():
                    other.cancel("sibling expectation could not be registered")
                raise
            for q, (other, _bufs) in (early or {}).items():  # (its end, too, is followed: its staging)
                if q not in h.sources:
                    h.add_source(q, other, set(), {})
            # decided before the sources are followed: none scatters, each is cancelled, the last to end announces
            h._fail(State.FAILED, f"prefill rank {p} ({sub_request_id(request.request_id, p, d)}) could not be "
                                  f"expected: {type(e).__name__}: {e}", None)
        except BaseException:  # (interrupted: nothing is followed any more; cancelled, the transfers end soon)
            for other in h.sources.values():
                other.cancel("sibling expectation could not be registered")
            for q, (other, _bufs) in (early or {}).items():
                if q not in h.sources:
                    other.cancel("sibling expectation could not be registered")
            raise
        h.start()
        return h


__all__ = ["ReshardIncoming", "ReshardOutgoing", "ReshardReceiver", "ReshardSender", "gather", "scatter",
           "sub_request_id"]
