"""The engine-agnostic core of an engine adapter: one request's transfer from expect to its one terminal state.

Owns:

* ``Lease``: a request's hold on engine memory (blocks, state slots). Its ``release`` callback (the engine's
  "free these" or "report this request finished") runs exactly once, whichever way the transfer ended:
  done, failed, timed out or cancelled, or the adapter closing.
* ``GroupTables``: the translation from an engine's per-group block ids (vLLM's hybrid manager: one list per
  KV-cache group; a Mamba group's block is its layers' state slot) to the per-layer block tables and state
  slots the ``kvwire.cuda`` Stager/Unstager take.
* ``Outbox`` (prefill side): per request a ``StagingJob`` and an ``OutgoingTransfer`` to the decode endpoint
  over a reused session per endpoint; layers are staged and handed to the wire as the engine finishes them.
* ``Inbox`` (decode side): a ``Receiver`` whose transfers land in ``UnstagingJob`` buffers. The engine
  ``expect``s a request once its blocks are allocated; a transfer that arrives first is received into a
  bounded staging buffer laid out as the job's, which the job adopts (no second copy).

Leases end only in ``poll()`` (and ``close()``), on the engine's thread: the receiver's and the stager's
threads never wait for the engine, and the engine never frees a block a copy or a lane may still touch
(a transfer's buffers go back to the pool only after its handle resolved, which the transport does once no
lane writes into them, and after the copies into the cache finished).

Must not know: any engine's classes or call order (``kvwire.adapters.vllm`` and ``.sglang`` translate), the
transport's internals (public ``Session``/``Receiver``/handles only), how copies are planned (``kvwire.cuda``).
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar

from .._args import check_reason
from ..codec.compat import check_compatible
from ..codec.layout import REQUEST, ModelLayout, RequestSpec, plan_segments
from ..codec.parity import MAX_PARITY
from ..codec.parity import setting as parity_setting
from ..codec.reshard import ReshardPlan
from ..codec.transfer import State
from ..errors import KvwireError, LayoutError, LayoutMismatch, StatePositionMismatch
from ..probe import warm_up
from ..reshard import ReshardIncoming, ReshardOutgoing, ReshardReceiver, ReshardSender, sub_request_id
from ..tcp import IncomingTransfer, OutgoingTransfer, Receiver, Session

if TYPE_CHECKING:
    from ..codec.manifest import Manifest
    from ..cuda import PooledBuffer, Stager, StagingJob, Unstager, UnstagingJob

log = logging.getLogger("kvwire.adapters")

#: Seconds a receiving whose buffers the receiver took waits for the transfer's handle before its lease may
#: end without it (the receiver hands it over right after accepting; it only fails to if it then refused).
CLAIM_GRACE = 5.0

__all__ = ["Ended", "GroupTables", "Inbox", "Lease", "Outbox", "Receiving", "Sending"]


# ------------------------------------------------------------------ leases


@dataclass(frozen=True)
class Ended:
    """How one request's transfer ended: ``state`` is DONE, FAILED, TIMED_OUT or CANCELLED."""

    key: str
    state: State
    reason: str = ""

    @property
    def ok(self) -> bool:
        return self.state is State.DONE


class Lease:
    """A request's hold on engine memory. ``end`` runs ``release`` exactly once (the first call wins).

    ``key`` is the engine's request id. ``release(ended)`` is the engine's own action (free blocks and
    slots, or report the request finished so the engine frees them); an exception from it is logged, never
    raised into the transport or the engine's step.
    """

    def __init__(self, key: str, release: Callable[[Ended], None] | None = None) -> None:
        self.key = key
        self._release = release
        self._lock = threading.Lock()
        self.ended: Ended | None = None

    @property
    def live(self) -> bool:
        return self.ended is None

    def end(self, state: State, reason: str = "") -> bool:
        """Record the terminal state and release; False if the lease had ended already."""
        if not state.terminal:
            raise ValueError(f"{state} is not a terminal state")
        with self._lock:
            if self.ended is not None:
                return False
            self.ended = Ended(self.key, state, reason)
        if self._release is not None:
            try:
                self._release(self.ended)
            except Exception:  # noqa: BLE001 - the engine's callback must not break the lifecycle
                log.exception("release of %s failed", self.key)
        return True


# ------------------------------------------------------------------ engine groups -> kvwire tables


class GroupTables:
    """An engine's KV-cache groups over a kvwire layout: which layers each group's block ids serve.

    ``group_layers[g]`` lists the kvwire layer indices of engine group ``g`` (all token-indexed, or all
    state layers). ``tables(block_ids)`` turns the engine's per-group block ids (``block_ids[g]``) into the
    per-layer block tables and state slots ``Stager.begin`` / ``Unstager.prepare`` take: a token group's ids
    are its layers' block table; a state group has one block, which is its layers' slot.
    """

    def __init__(self, layout: ModelLayout, group_layers: Sequence[Sequence[int]]) -> None:
        self.layout = layout
        self.group_layers = [tuple(int(x) for x in g) for g in group_layers]
        self.state_groups: list[bool] = []
        seen: set[int] = set()
        for g, layers in enumerate(self.group_layers):
            kinds: set[str] = set()
            for la in layers:
                if not 0 <= la < layout.num_layers or la in seen:
                    raise LayoutError(f"group {g}: layer {la} is outside the layout or in two groups")
                seen.add(la)
                kinds.update(c.indexing for c in layout.layers[la].caches)
            if len(kinds) > 1:
                raise LayoutError(f"group {g} mixes token-indexed and state layers")
            self.state_groups.append(kinds == {REQUEST})
        missing = [la.index for la in layout.layers if la.caches and la.index not in seen]
        if missing:
            raise LayoutError(f"layers {missing[:8]} have caches but belong to no group")

    def tables(self, block_ids: Sequence[Sequence[int]]) -> tuple[dict[int, list[int]], dict[int, int]]:
        """Per-layer block tables and state slots for one request's per-group block ids."""
        if len(block_ids) != len(self.group_layers):
            raise LayoutMismatch(f"{len(block_ids)} block-id lists for {len(self.group_layers)} groups")
        tables: dict[int, list[int]] = {}
        slots: dict[int, int] = {}
        for g, (layers, ids) in enumerate(zip(self.group_layers, block_ids)):
            ids = [int(b) for b in ids]
            if self.state_groups[g]:
                if len(ids) != 1:
                    raise LayoutMismatch(f"state group {g} has {len(ids)} blocks for one request; one block "
                                         f"per request is supported (prefix caching of states is not)")
                slots.update((la, ids[0]) for la in layers)
            else:
                tables.update((la, ids) for la in layers)
        return tables, slots


# ------------------------------------------------------------------ prefill side


class _Entry(Protocol):
    @property
    def lease(self) -> Lease: ...

    @property
    def job(self) -> Any: ...  # a StagingJob or UnstagingJob with release(), or None


_E = TypeVar("_E", bound=_Entry)


class _Book(Generic[_E]):
    """The requests a side has in flight, by key: what ``Outbox`` and ``Inbox`` share. An entry has a ``lease``
    and a ``job`` (its staging job, or None); ``_end_settled`` ends the leases of those that resolved."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._active: dict[str, _E] = {}

    def get(self, key: str) -> _E | None:
        with self._lock:
            return self._active.get(key)

    @property
    def active(self) -> int:
        with self._lock:
            return len(self._active)

    def _end_settled(self, settle: Callable[[_E], Ended | None]) -> list[Ended]:
        with self._lock:
            items = list(self._active.items())
        ended: list[Ended] = []
        for key, entry in items:
            verdict = settle(entry)
            if verdict is None:
                continue
            if entry.job is not None:
                entry.job.release()  # waits for copies still reading or writing the engine's blocks
            with self._lock:
                self._active.pop(key, None)
            if entry.lease.end(verdict.state, verdict.reason):
                ended.append(verdict)
        return ended


class Sending:
    """One request leaving: its staging job, its transfer, its lease. Made by ``Outbox.begin``."""

    def __init__(self, lease: Lease, job: StagingJob | None, out: OutgoingTransfer | ReshardOutgoing | None,
                 error: str = "") -> None:
        self.lease = lease
        self.job = job
        self.out = out
        self.error = error
        self.finished = False
        self.staged: set[int] = set()

    @property
    def layers(self) -> list[int]:
        """Layers that carry bytes, in send order."""
        return self.job.layers if self.job is not None else []

    def stage(self, layer: int) -> None:
        """Stage ``layer`` (its compute is done) and hand it to the wire when in host memory."""
        if self.error or self.job is None or self.out is None or layer in self.staged:
            return
        if layer not in self.job.placement.by_layer:
            return
        self.staged.add(layer)
        try:
            self.job.stage_and_send(self.out, layer)
        except Exception as e:  # noqa: BLE001 - reported through the lease
            self.fail(f"staging layer {layer}: {type(e).__name__}: {e}")

    def finish(self) -> None:
        """Stage the layers not staged yet and end the transfer's writing (idempotent)."""
        if self.finished or self.error or self.job is None or self.out is None:
            return
        for layer in self.job.layers:
            self.stage(layer)
        self.finished = True
        if self.error:
            return
        out = self.out

        def close(_f: Any) -> None:
            try:
                out.finish()
            except Exception as e:  # noqa: BLE001 - a dead transfer: its own state says why
                log.debug("finish after end: %s", e)

        pending = [f for f in (st.sent for st in self.job.staged.values()) if f is not None]
        if not pending:
            close(None)
            return
        remaining = [len(pending)]
        lock = threading.Lock()

        def one_sent(f: Any) -> None:
            if f.exception() is not None:
                self.fail(f"writing a layer: {f.exception()}")
                return
            with lock:
                remaining[0] -= 1
                last = remaining[0] == 0
            if last:
                close(None)

        for f in pending:
            f.add_done_callback(one_sent)

    def fail(self, reason: str) -> None:
        if not self.error:
            self.error = reason
        if self.out is not None and not self.out.finished:
            self.out.cancel(reason)

    def settled(self) -> Ended | None:
        """The terminal state once the transfer resolved (or failed before it started), else None."""
        if self.out is None:
            return Ended(self.lease.key, State.FAILED, self.error or "no transfer")
        if not self.out.finished:
            return None
        state, reason = self.out.state, self.out.reason
        if self.error and state is State.CANCELLED:
            state, reason = State.FAILED, self.error
        return Ended(self.lease.key, state, reason)


def tail_parity_setting(value: Any, name: str) -> int | None:
    """An engine's tail parity setting (``kvwire.connect(tail_parity=...)``), checked where the engine is
    configured: unset (``None``) or ``"auto"``: ``None``, ``kvwire.connect``'s default (parity on a long path
    when zfec is installed); else an int in 0..8, and zfec installed when it is not 0. ``LayoutError`` names
    ``name``."""
    if isinstance(value, str):  # (from the environment, or a config file's string)
        text = value.strip()
        if text.lower() == "auto":
            return None
        if not text.isdigit():
            raise LayoutError(f"{name} must be an int in 0..{MAX_PARITY} or 'auto', not {value!r}")
        value = int(text)
    try:
        return parity_setting(value)
    except (ValueError, KvwireError) as e:
        raise LayoutError(f"{name}: {e}") from None


class Outbox(_Book["Sending"]):
    """Prefill side: stream requests' layers from the engine cache to decode endpoints.

    ``connect(host, port)`` opens a session (default ``kvwire.connect`` with ``session_kwargs``); one session
    per endpoint is kept and reopened if it died. ``timeout``: each transfer's deadline.
    """

    def __init__(self, stager: Stager, *, timeout: float = 120.0, connect: Callable[..., Session] | None = None,
                 **session_kwargs: Any) -> None:
        self.stager = stager
        self.layout = stager.layout
        self.timeout = timeout
        self._connect = connect
        self._session_kwargs = session_kwargs
        self._sessions: dict[tuple[str, int], Session] = {}
        super().__init__()

    def session(self, host: str, port: int) -> Session:
        key = (host, int(port))
        s = self._sessions.get(key)
        if s is None or not s.healthy:
            if s is not None:
                s.close()
            if self._connect is not None:
                s = self._connect(host, int(port))
            else:
                s = Session(host, int(port), **{"warm_up": warm_up, **self._session_kwargs})  # (kvwire.connect's)
            self._sessions[key] = s
        return s

    def begin(self, key: str, request: RequestSpec, endpoint: tuple[str, int],
              block_tables: Mapping[Any, Sequence[int]], state_slot: int | Mapping[int, int] | None,
              release: Callable[[Ended], None] | None = None) -> Sending:
        """Start ``request`` (engine id ``key``) towards ``endpoint``. Never raises for a transport or layout
        problem: the returned ``Sending`` ends FAILED with the reason at the next ``poll``."""
        lease = Lease(key, release)
        job = out = None
        try:
            if key in self._active:
                raise KvwireError(f"request {key!r} is already being sent")
            job = self.stager.begin(request, block_tables, state_slot)
            out = self.session(*endpoint).send(self.layout, request, timeout=self.timeout)
            sending = Sending(lease, job, out)
        except Exception as e:  # noqa: BLE001 - reported through the lease
            if job is not None:
                job.release()
            sending = Sending(lease, None, None, f"{type(e).__name__}: {e}")
        with self._lock:  # a duplicate still gets its own entry: every lease ends at a poll
            self._active[key if key not in self._active else f"{key}#dup{id(sending)}"] = sending
        return sending

    def begin_resharded(self, key: str, request: RequestSpec, plan: ReshardPlan, rank: int,
                        endpoints: Mapping[int, tuple[str, int]], block_tables: Mapping[Any, Sequence[int]],
                        state_slot: int | Mapping[int, int] | None,
                        release: Callable[[Ended], None] | None = None) -> Sending:
        """``begin`` for prefill rank ``rank`` of ``plan`` (decode TP differs): ``endpoints[d]`` is decode rank
        ``d``'s receiver; each gets only its slices (``kvwire.reshard``). Same lease and failure rules."""
        lease = Lease(key, release)
        job = None
        try:
            if key in self._active:
                raise KvwireError(f"request {key!r} is already being sent")
            job = self.stager.begin(request, block_tables, state_slot)
            sessions = {d: self.session(*endpoints[d]) for d in plan.targets(rank)}
            sending = Sending(lease, job, ReshardSender(plan, rank, sessions).send(request, timeout=self.timeout))
        except Exception as e:  # noqa: BLE001 - reported through the lease
            if job is not None:
                job.release()
            sending = Sending(lease, None, None, f"{type(e).__name__}: {e}")
        with self._lock:
            self._active[key if key not in self._active else f"{key}#dup{id(sending)}"] = sending
        return sending

    def cancel(self, key: str, reason: str = "cancelled by the engine") -> None:
        """The engine aborted ``key``'s send: its transfer is cancelled, its lease ends FAILED at the next
        ``poll``. ``reason`` is a ``str`` (``TypeError`` else, nothing changed)."""
        check_reason(reason)
        s = self.get(key)
        if s is not None:
            s.fail(reason)

    def poll(self) -> list[Ended]:
        """End the leases of transfers that resolved since the last call (their buffers are back in the pool
        once the transfer ended; the engine's blocks are released by the lease)."""
        return self._end_settled(lambda sending: sending.settled())

    def close(self, grace: float = 0.0) -> list[Ended]:
        """Cancel what is in flight (after up to ``grace`` seconds for it to finish), end every lease, close
        the sessions."""
        ended: list[Ended] = []
        deadline = time.monotonic() + grace
        while self.active and time.monotonic() < deadline:
            ended += self.poll()
            time.sleep(0.01)
        with self._lock:
            items = list(self._active.values())
        for s in items:
            s.fail("adapter closed")
        deadline = time.monotonic() + 10
        while self.active and time.monotonic() < deadline:
            out = self.poll()
            ended += out
            if self.active and not out:
                time.sleep(0.01)
        ended += self.poll()
        with self._lock:
            left = list(self._active.values())
            self._active.clear()
        for s in left:  # a transport that did not resolve in time: the lease still ends
            if s.lease.end(State.CANCELLED, "adapter closed"):
                ended.append(Ended(s.lease.key, State.CANCELLED, "adapter closed"))
        for sess in self._sessions.values():
            sess.close()
        self._sessions.clear()
        return ended


# ------------------------------------------------------------------ decode side


class Receiving:
    """One request arriving: its unstaging job (once blocks are allocated), its transfer handle, its lease."""

    def __init__(self, lease: Lease, request: RequestSpec, deadline: float) -> None:
        self.lease = lease
        self.request = request
        self.deadline = deadline
        self.job: UnstagingJob | None = None
        self.handle: IncomingTransfer | ReshardIncoming | None = None
        self.verdict: tuple[State, str] | None = None  # decided, waiting for the handle to resolve
        self.claimed_at: float | None = None  # the receiver was handed the job's buffers; its handle follows

    def decide(self, state: State, reason: str) -> None:
        if self.verdict is None:
            self.verdict = (state, reason)
        h = self.handle
        if h is not None and not h.finished:
            h.cancel(reason)

    def settled(self, now: float) -> Ended | None:
        h = self.handle
        if self.verdict is None:
            if h is None:
                if now > self.deadline:
                    self.decide(State.TIMED_OUT, "the transfer never started")
            elif h.finished:
                if h.state is not State.DONE:
                    self.decide(h.state, h.reason)
                else:
                    assert self.job is not None
                    try:
                        self.job.wait_all(timeout=0)
                    except TimeoutError:
                        return None  # verified, still being copied into the cache
                    except Exception as e:  # noqa: BLE001 - a layer that could not be unstaged
                        self.decide(State.FAILED, f"unstaging: {type(e).__name__}: {e}")
                    else:
                        self.decide(State.DONE, "")
            elif now > self.deadline:
                self.decide(State.TIMED_OUT, "transfer deadline passed")
        if self.verdict is None or (h is not None and not h.finished):
            return None
        if h is None and self.claimed_at is not None and now - self.claimed_at < CLAIM_GRACE:
            return None  # lanes may write the buffers: wait for the handle (``_arrived``), then its end
        return Ended(self.lease.key, *self.verdict)


@dataclass
class _Early:
    """A transfer that arrived before the engine expected it: received into a staging buffer (``nbytes`` of
    it; for one prefill rank's slice of a re-sharded request, its ``layout`` and per-segment ``views``)."""

    request: RequestSpec
    buffer: PooledBuffer
    deadline: float
    nbytes: int
    handle: IncomingTransfer | None = None
    layout: ModelLayout | None = None
    views: list[Any] | None = None


def _is_slice(request_id: str) -> bool:
    """``<request>@<prefill rank>><decode rank>``: one prefill rank's slice transfer (``kvwire.reshard``)."""
    ranks = request_id.rpartition("@")[2].split(">")
    return "@" in request_id and len(ranks) == 2 and all(r.isdigit() for r in ranks)


class Inbox(_Book["Receiving"]):
    """Decode side: a ``Receiver`` whose transfers land in the engine cache through an ``Unstager``.

    ``expect(key, request, tables, slots)`` once the engine allocated the request's blocks. A transfer that
    arrives before that is received into a buffer of the unstager's pool laid out as the job's (at most
    ``staging_bytes`` in all, refused beyond) and adopted by the job at ``expect``; one nobody expects within
    ``timeout`` is cancelled. ``receiver_kwargs`` go to ``Receiver`` (``host``, ``port``, ``key``...).
    """

    def __init__(self, unstager: Unstager, *, timeout: float = 120.0, staging_bytes: int = 1 << 30,
                 **receiver_kwargs: Any) -> None:
        self.unstager = unstager
        self.layout = unstager.layout
        self.timeout = timeout
        self.staging_bytes = staging_bytes
        super().__init__()  # entries by kvwire request id
        self._early: dict[str, _Early] = {}
        self._early_bytes = 0
        receiver_kwargs.setdefault("transfer_timeout", timeout)
        self.receiver = Receiver(allocator=self._allocate, on_transfer=self._arrived, **receiver_kwargs)

    @property
    def address(self) -> tuple[str, int]:
        return self.receiver.address

    @property
    def staged(self) -> set[str]:
        """Request ids received (or being received) into a staging buffer that nobody expects yet."""
        with self._lock:
            return set(self._early)

    # ---- receiver threads
    def _allocate(self, m: Manifest) -> list[Any]:
        """Where an arriving transfer's bytes go: the expecting job's buffers, or a staging buffer."""
        rid = m.request.request_id
        with self._lock:
            r = self._active.get(rid)
            if r is not None:
                if r.job is None or r.handle is not None or r.verdict is not None:
                    raise KvwireError(f"request {rid!r} is not waiting for a transfer")
                try:
                    _check_manifest(m, self.layout)
                    _same_payload(r.request, m.request)
                except KvwireError as e:  # refused: this request's bytes will not come
                    r.decide(State.FAILED, f"{type(e).__name__}: {e}")
                    raise
                r.claimed_at = time.monotonic()
                return r.job.lend()
            if rid in self._early:
                raise KvwireError(f"request {rid!r} was already received")
            if _is_slice(rid) and m.layout is not None:  # checked against the plan at expect_resharded
                segments = [s.nbytes for s in plan_segments(m.layout, m.request)]
                offsets = [sum(segments[:i]) for i in range(len(segments))]
                total = sum(segments)
            else:
                _check_manifest(m, self.layout)
                placement = self.unstager.placement(m.request)
                segments = [s.nbytes for s in placement.segments]
                offsets, total = list(placement.offsets), placement.total
            if self._early_bytes + total > self.staging_bytes:
                raise KvwireError(f"staging full: {self._early_bytes} + {total} bytes exceed {self.staging_bytes}")
            buf = self.unstager.pool.acquire(total)
            host = buf.tensor()
            views = [host[o : o + n] for o, n in zip(offsets, segments)]
            self._early[rid] = _Early(m.request, buf, time.monotonic() + self.timeout, total,
                                      layout=m.layout if _is_slice(rid) else None, views=views)
            self._early_bytes += total
            return views

    def _arrived(self, h: IncomingTransfer) -> None:
        rid = h.request_id
        with self._lock:
            r = self._active.get(rid)
            early = self._early.get(rid)
            if r is not None and r.handle is None and r.job is not None:
                r.handle = h
            elif early is not None and early.handle is None:
                early.handle = h
                return
            else:
                r = None
        if r is None:
            h.cancel("not expected")
            return
        assert r.job is not None
        r.job.attach(h)
        if r.verdict is not None and not h.finished:  # cancelled or timed out while the transfer began
            h.cancel(r.verdict[1])

    # ---- engine thread
    def expect(self, key: str, request: RequestSpec, block_tables: Mapping[Any, Sequence[int]],
               state_slot: int | Mapping[int, int] | None, release: Callable[[Ended], None] | None = None,
               timeout: float | None = None) -> Receiving:
        """The engine allocated ``request``'s blocks: receive into them. Never raises for a layout or
        transport problem: the returned ``Receiving`` ends FAILED at the next ``poll``."""
        lease = Lease(key, release)
        r = Receiving(lease, request, time.monotonic() + (timeout if timeout is not None else self.timeout))
        rid = request.request_id
        with self._lock:
            if rid in self._active:
                r.decide(State.FAILED, f"request {rid!r} is already expected")
                self._active[f"{rid}#dup{id(r)}"] = r
                return r
            early = self._early.pop(rid, None)
            if early is not None:
                self._early_bytes -= early.nbytes
            try:
                if early is not None:
                    _same_payload(request, early.request)
                r.job = self.unstager.prepare(request, block_tables, state_slot,
                                              buffer=early.buffer if early is not None else None)
            except Exception as e:  # noqa: BLE001 - reported through the lease
                r.decide(State.FAILED, f"{type(e).__name__}: {e}")
                if early is not None:
                    r.handle = early.handle
                    if early.handle is not None and not early.handle.finished:
                        early.handle.cancel(r.verdict[1] if r.verdict else "refused")
                    self._release_when_resolved(early.handle, early.buffer.release)
            else:
                if early is not None:
                    r.handle = early.handle
            self._active[rid] = r
        if r.job is not None and r.handle is not None:
            r.job.attach(r.handle)
        return r

    def expect_resharded(self, key: str, request: RequestSpec, plan: ReshardPlan, rank: int,
                         block_tables: Mapping[Any, Sequence[int]], state_slot: int | Mapping[int, int] | None,
                         release: Callable[[Ended], None] | None = None, timeout: float | None = None) -> Receiving:
        """``expect`` for decode rank ``rank`` of ``plan`` (prefill TP differs): one transfer from each of
        ``plan.sources(rank)`` lands in this job's buffers; a failing one fails the request naming its prefill
        rank. A prefill rank's slice that arrived first was received into a staging buffer (bounded as for
        ``expect``); it must carry the plan's slice layout and is scattered into place from there. ``cancel``
        reaches the request from the moment this is called: its buffers go back to the pool once every prefill
        rank's transfer has ended, without a ``poll``."""
        lease = Lease(key, release)
        seconds = timeout if timeout is not None else self.timeout
        r = Receiving(lease, request, time.monotonic() + seconds)
        rid = request.request_id
        subs = {p: sub_request_id(rid, p, rank) for p in plan.sources(rank)} if 0 <= rank < plan.decode_tp else {}
        with self._lock:  # registered first: ``cancel`` reaches it from now on (its job: below)
            if rid in self._active:
                r.decide(State.FAILED, f"request {rid!r} is already expected")
                self._active[f"{rid}#dup{id(r)}"] = r
                return r
            self._active[rid] = r
        grace = time.monotonic() + CLAIM_GRACE  # an early slice's handle follows its allocation at once
        while True:
            with self._lock:
                if not any(self._early[s].handle is None for s in subs.values() if s in self._early) \
                        or time.monotonic() > grace:
                    break
            time.sleep(0.001)
        with self._lock:
            early = {p: e for p, s in subs.items() if (e := self._early.pop(s, None)) is not None}
            self._early_bytes -= sum(e.nbytes for e in early.values())
        adopted: dict[int, tuple[IncomingTransfer, Sequence[Any]]] = {}
        try:
            for p, e in early.items():
                if e.handle is None or e.layout is None or e.views is None:
                    raise KvwireError(f"prefill rank {p}'s early slice has no transfer")
                if e.layout.fingerprint() != plan.slice_layout(p, rank).fingerprint():
                    raise LayoutMismatch(f"prefill rank {p} sent a slice of another plan")
                _same_payload(request, e.request)
                adopted[p] = (e.handle, e.views)
            job = self.unstager.prepare(request, block_tables, state_slot)
            buffers = job.lend()  # (a cancel from here on leaves them to the transfers: ``attach`` below)
            r.job = job
            r.handle = ReshardReceiver(plan, rank, self.receiver).expect(request, buffers, timeout=seconds,
                                                                         early=adopted)
        except Exception as e:  # noqa: BLE001 - reported through the lease
            if r.job is not None:  # (no transfer has its buffers: ``ReshardReceiver.expect`` raises only then)
                r.job.release()
                r.job = None
            r.decide(State.FAILED, f"{type(e).__name__}: {e}")
            for early_slice in early.values():
                if early_slice.handle is not None and not early_slice.handle.finished:
                    early_slice.handle.cancel(r.verdict[1] if r.verdict else "refused")
                self._release_when_resolved(early_slice.handle, early_slice.buffer.release)
            return r
        for early_slice in early.values():  # freed once nothing scatters from it any more
            r.handle.add_done_callback(functools.partial(self._release_early, early_slice))
        r.job.attach(r.handle)
        if r.verdict is not None:  # cancelled while registered without a job: ``cancel`` could not reach one
            r.job.cancel(r.verdict[1], timeout=0)
        return r

    def _release_early(self, e: _Early, _future: Any = None) -> None:
        self._release_when_resolved(e.handle, e.buffer.release)

    def cancel(self, rid: str, reason: str = "cancelled by the engine") -> None:
        """The engine aborted ``rid``: its transfer is cancelled and its job's buffers go back to the pool at
        once, or as soon as no lane writes and no copy reads them (never waiting on the engine's thread); its
        lease ends CANCELLED at the next ``poll``. ``reason`` is a ``str`` (``TypeError`` else, checked before
        anything is decided)."""
        check_reason(reason)
        r = self.get(rid)
        if r is not None:
            r.decide(State.CANCELLED, reason)
            if r.job is not None:
                r.job.cancel(reason, timeout=0)

    def _release_when_resolved(self, h: IncomingTransfer | None, fn: Callable[[], None]) -> None:
        if h is None:
            fn()
        else:
            h.add_done_callback(lambda _f: fn())

    def poll(self) -> list[Ended]:
        """End the leases of requests whose transfer resolved and whose bytes are in the cache (or failed),
        and drop early arrivals nobody expected in time."""
        now = time.monotonic()
        with self._lock:
            stale = [(rid, e) for rid, e in self._early.items() if now > e.deadline]
            for rid, e in stale:
                del self._early[rid]
                self._early_bytes -= e.nbytes
        for _rid, e in stale:
            if e.handle is not None and not e.handle.finished:
                e.handle.cancel("no request expected this transfer in time")
            self._release_when_resolved(e.handle, e.buffer.release)
        return self._end_settled(lambda r: r.settled(now))

    def close(self) -> list[Ended]:
        """Cancel everything, end every lease, close the receiver."""
        with self._lock:
            items = list(self._active.values())
        for r in items:
            r.decide(State.CANCELLED, "adapter closed")
        self.receiver.close()  # resolves every handle
        ended = self.poll()
        with self._lock:
            left = list(self._active.values())
            self._active.clear()
            early = list(self._early.values())
            self._early.clear()
            self._early_bytes = 0
        for r in left:
            if r.job is not None:
                r.job.release()
            if r.lease.end(State.CANCELLED, "adapter closed"):
                ended.append(Ended(r.lease.key, State.CANCELLED, "adapter closed"))
        for e in early:
            e.buffer.release()
        return ended


def _check_manifest(m: Manifest, layout: ModelLayout) -> None:
    if m.layout is None:
        raise LayoutMismatch("the transfer names no layout")
    check_compatible(m.layout, layout)


def _same_payload(mine: RequestSpec, theirs: RequestSpec) -> None:
    """The sender's request carries exactly the tokens and state this side planned for."""
    if mine.state_position != theirs.state_position:
        raise StatePositionMismatch(
            f"request {mine.request_id}: state taken after {theirs.state_position} tokens, this side resumes "
            f"at {mine.state_position} (N vs N-1 convention mismatch?)")
    if dict(mine.prefix_hit) != dict(theirs.prefix_hit):
        raise LayoutMismatch(f"request {mine.request_id}: prefix hits {dict(theirs.prefix_hit)} vs "
                             f"{dict(mine.prefix_hit)}")

