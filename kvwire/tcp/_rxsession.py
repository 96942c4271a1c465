"""One receiver session's driver: its connections, its lock, and the actions of its protocol engine.

Owns: ``RxSession`` (the control connection and its ``ControlOutbox``, the data lanes by index, the handles
of its transfers by id, the session lock around every call into its ``ReceiverEngine``, the line of admitted
transfers waiting for one of at most ``MAX_ADMITTING`` admission threads), performing what the engine returns
(control frames, queued to the outbox: no thread waits on a sender that reads nothing; resolving handles,
cutting stuck lanes; a chunk's layers ready), and reading a lane's chunks into
their destinations through the ``transport.Stream`` (each chunk passes the ``ChunkStage`` after its payload
is in place and before its hash is checked); a chunk that came early (before its transfer was placed) waits
on the lane, bounded by ``early_wait``, for the engine's answer, and a chunk past the early window fails the
session; the last layer's chunks of a transfer with tail parity (``codec.parity``) go into its ``TailRows``
first, are placed from there, and a group the engine says can be rebuilt is rebuilt on the lane whose chunk
completed it. Must not know: what is legal when, admission decisions, verdicts,
deadlines or counters (``codec.rxengine``'s), listening, handshakes or authentication, destinations (the
receiver admits a transfer and hands over its views), receiver-wide limits, torch/cupy, congestion control.
"""

from __future__ import annotations

import itertools
import logging
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import xxhash

from ..codec import frames as F
from ..codec.actions import Ended, Fail, Send
from ..codec.manifest import Manifest
from ..codec.rxengine import (
    REBUILDER,
    Action,
    AwaitOffer,
    ChunkResult,
    CutLanes,
    ReceiverEngine,
    Refusal,
    RxTransfer,
    TailStep,
    check_lane_control,
)
from ..codec.transfer import State
from ..errors import EarlyWindowExceeded, ProtocolError
from ._auth import SessionKeys
from ._incoming import IncomingTransfer
from ._outbox import ControlOutbox
from ._tail import TailRows
from .transport import IDENTITY, ChunkRef, ChunkStage, Stream

log = logging.getLogger("kvwire.tcp")

#: a session's transfers being placed at once (each on a thread: the allocator is user code and may wait);
#: the rest of its admitted transfers wait in line, in order
MAX_ADMITTING = 16


class RxSession:
    """One authenticated session: its control connection, lanes, and the handles of its transfers."""

    def __init__(self, keys: SessionKeys, ctrl: Stream, peer: str, engine: ReceiverEngine,
                 stage: ChunkStage, peer_timeout: float, on_stuck: Callable[[str], None]) -> None:
        """``on_stuck(reason)``: the sender stopped reading its control connection (the owner closes the
        session; called on the outbox's writer thread, which its owner starts with ``outbox.run``)."""
        self.keys = keys
        self.ctrl = ctrl
        self.outbox = ControlOutbox(ctrl, stall=peer_timeout, on_stuck=on_stuck)
        self._admissions: deque[Manifest] = deque()  # admitted, waiting for an admission thread
        self._admitting = 0  # admission threads running
        self.peer = peer
        self._engine = engine
        self.stage = stage
        self.peer_timeout = peer_timeout  # a chunk's body that stops arriving for this long costs its lane
        self.lock = threading.Lock()  # around every engine call and the tables below
        self._answered = threading.Condition(self.lock)  # a transfer was placed or refused (early chunks wait)
        #: the longest an early chunk's lane waits for its transfer to be placed before draining it
        self.early_wait = min(1.0, peer_timeout / 4)
        self.lanes: dict[int, Stream] = {}  # by lane index
        self.handles: dict[int, IncomingTransfer] = {}  # activated and not yet resolved, by transfer id
        self.closed = False
        self._lane_conns: dict[int, Stream] = {}  # every lane connection being read, by the engine's lane id
        self._lane_ids = itertools.count()
        self._tails: dict[int, TailRows] = {}  # the last layer's scratch rows of transfers in flight, by id

    # ---- queries
    @property
    def heartbeat(self) -> float:
        """Seconds between this session's heartbeats (its own, fitted to its sender's ``peer_timeout``)."""
        return self._engine.heartbeat

    @property
    def transfers(self) -> dict[int, IncomingTransfer]:
        """The handles of the transfers in flight (admitted, not ended), by transfer id."""
        with self.lock:
            return {tid: self.handles[tid] for tid in self._engine.transfers if tid in self.handles}

    def counts(self) -> dict[str, int]:
        with self.lock:
            return self._engine.counts()

    def held(self) -> int:
        """What the transfers in flight hold against the receiver's in-flight bound (``rxengine.held_bytes``)."""
        with self.lock:
            return self._engine.held

    def lane_sockets(self) -> dict[int, socket.socket]:
        """The live lane sockets, by lane index (for TCP_INFO)."""
        with self.lock:
            return {i: ch.sock for i, ch in self.lanes.items() if not ch.closed}

    # ---- performing the engine's actions
    def send(self, kind: str, body: dict[str, Any] | None = None) -> None:
        """Queue a control frame for the sender (never blocks: ``ControlOutbox``)."""
        self.outbox.send(kind, body)

    # ---- admissions (the owner places each transfer on an admission thread)
    def queue_admission(self, m: Manifest) -> bool:
        """``m`` joins the line; True when the caller must start an admission thread (``next_admission``)."""
        with self.lock:
            self._admissions.append(m)
            if self._admitting >= MAX_ADMITTING:
                return False
            self._admitting += 1
            return True

    def next_admission(self) -> Manifest | None:
        """The next transfer in line for this admission thread; None: the line is empty, the thread ends."""
        with self.lock:
            if self._admissions:
                return self._admissions.popleft()
            self._admitting -= 1
            return None

    def perform(self, actions: list[Action]) -> str | None:
        """Carry out ``actions`` in order (outside the lock); the reason of a ``Fail`` among them, if any:
        the owner then closes the session. ``Admit`` is the owner's, before this."""
        fail = None
        for a in actions:
            if type(a) is Send:
                self.send(a.kind, a.body)
            elif type(a) is Ended:
                self._resolve(a)
            elif type(a) is CutLanes:
                self._cut(a.lanes)
            elif type(a) is Fail:
                fail = a.reason
        return fail

    def _resolve(self, a: Ended) -> None:
        self._tails.pop(a.transfer_id, None)  # (a lane still reading into a row holds its own reference)
        h = self.handles.pop(a.transfer_id, None)
        if h is not None:
            h.resolve(a.state, a.reason)

    def _cut(self, lanes: tuple[int, ...]) -> None:
        with self.lock:
            conns = [self._lane_conns[i] for i in lanes if i in self._lane_conns]
        for ch in conns:
            ch.close()

    # ---- inputs
    def receive(self, kind: str, body: dict[str, Any]) -> list[Action]:
        """A control message from the sender, through the engine (``ProtocolError`` when illegal)."""
        with self.lock:
            actions = self._engine.receive(kind, body, time.monotonic())
            self._answered.notify_all()  # a malformed BEGIN was refused
        return actions

    def tick(self, now: float) -> str | None:
        """The monitor's tick; the reason the session must close, if it must."""
        with self.lock:
            actions = self._engine.tick(now)
        return self.perform(actions)

    def activate(self, m: Manifest, h: IncomingTransfer, views: list[memoryview]) -> bool:
        """Start ``m`` into ``h``'s destination ``views`` and ACCEPT it; False (REJECT sent) when the
        session can no longer take it."""
        rows = None
        if m.tail_groups is not None:  # (allocated before the lock; its size counted in held_bytes, checked)
            try:
                rows = TailRows(m.tail_groups, m.plan())
            except MemoryError:
                self.refuse(m.transfer_id, f"no memory for its tail parity scratch ({m.tail_scratch_bytes} bytes)",
                            why="busy")
                return False
        with self.lock:
            now = time.monotonic()
            actions = self._engine.activate(m, now, h.deadline)
            t = self._engine.transfer(m.transfer_id)
            if t is not None:
                if h.bind(self, m, t.plan, views, t.deadline, t.machine):
                    self.handles[m.transfer_id] = h
                    if rows is not None:
                        self._tails[m.transfer_id] = rows
                    actions += self._engine.apply_held(m.transfer_id, now)  # a DONE or CANCEL that came first
                else:  # its user cancelled it as it was admitted: the sender is told (ACCEPT, then CANCEL)
                    actions += self._engine.cancel(m.transfer_id, h.reason or "cancelled by receiver", now)
            self._answered.notify_all()
        self.perform(actions)
        return t is not None

    def refuse(self, tid: int | None, reason: str, state: State = State.FAILED, why: Refusal = "invalid") -> None:
        """Refuse a transfer not activated: REJECT counted by ``why``, or, with ``state`` cancelled or timed out,
        its request ended here unplaced (``ReceiverEngine.refuse``)."""
        with self.lock:
            actions = self._engine.refuse(tid, reason, time.monotonic(), state, why)
            self._answered.notify_all()
        self.perform(actions)

    def cancel_transfer(self, transfer_id: int, reason: str) -> None:
        """The receiver's user cancels a transfer: it ends CANCELLED and the sender is told."""
        with self.lock:
            actions = self._engine.cancel(transfer_id, reason, time.monotonic())
        self.perform(actions)

    def close(self, reason: str) -> None:
        """Fail every transfer in flight with ``reason`` and close the session's connections (once)."""
        with self.lock:
            if self.closed:
                return
            self.closed = True
            actions = self._engine.close(reason)
            lanes = list(self.lanes.values())
            self._answered.notify_all()
        self.perform(actions)
        self.outbox.close()  # its writer flushes the frames just queued, then closes the connection
        for ch in lanes:
            ch.close()

    # ---- a lane
    def attach_lane(self, lane: int, ch: Stream, max_lanes: int) -> None:
        """An authenticated lane connection becomes lane ``lane`` (a reconnect replaces the old one);
        ``ProtocolError`` when the session is closed or has ``max_lanes`` already."""
        with self.lock:
            if self.closed or (lane not in self.lanes and len(self.lanes) >= max_lanes):
                raise ProtocolError("lane refused")
            old = self.lanes.get(lane)
            self.lanes[lane] = ch
        if old is not None:
            old.close()

    def detach_lane(self, lane: int, ch: Stream) -> None:
        with self.lock:
            if self.lanes.get(lane) is ch:
                del self.lanes[lane]

    def read_lane(self, ch: Stream, lane: int) -> None:
        """Read chunks into their destinations. An idle lane may wait for its next header forever (the
        session's monitor owns idleness; a header holds nothing), but a peer that stops sending a
        chunk's body for ``peer_timeout`` costs the lane, so a half-read chunk never holds its transfer."""
        scratch = memoryview(bytearray(256 * 1024))
        sock = ch.sock
        with self.lock:
            lane_id = next(self._lane_ids)
            self._lane_conns[lane_id] = ch
        try:
            while True:
                sock.settimeout(None)
                h = ch.read_header()
                sock.settimeout(self.peer_timeout)
                if h.kind == F.KIND_CONTROL:
                    kind, _ = ch.read_control_body(h)
                    check_lane_control(kind)  # only BYE: the lane ends
                    return
                self._read_chunk(ch, lane, lane_id, h, scratch)
        finally:
            with self.lock:
                del self._lane_conns[lane_id]

    def _read_chunk(self, ch: Stream, lane: int, lane_id: int, h: F.Header, scratch: memoryview) -> None:
        """One data chunk: into its destination, through the stage, verified, answered. Its own frame, so
        that nothing of a transfer (handle, destination view) stays referenced while the lane waits."""
        try:
            with self.lock:
                t = self._engine.chunk_admit(lane_id, h)
                if type(t) is AwaitOffer:  # early: no destination yet; the payload waits in the socket
                    tid = h.transfer_id
                    self._answered.wait_for(lambda: self.closed or not self._engine.awaiting(tid), self.early_wait)
                    t = self._engine.chunk_admit(lane_id, h, waited=True)
                assert not isinstance(t, AwaitOffer)
                handle = self.handles.get(h.transfer_id) if t is not None else None
                rows = self._tails.get(h.transfer_id) if t is not None and t.machine.in_tail(h.chunk) else None
        except EarlyWindowExceeded as e:  # past the early window: the sender broke the rule it was given
            self.send(F.ERROR, {"reason": str(e)})
            self.close(f"protocol error: {e}")
            raise
        if t is None:
            ch.skip(h.length, scratch)
            with self.lock:
                reply = self._engine.chunk_drained(h, time.monotonic())
            if reply is not None:
                self.send(reply.kind, reply.body)
            return
        assert handle is not None  # activate binds the handle and the engine's transfer under one lock
        if rows is not None:
            self._read_tail(ch, lane, lane_id, h, t, handle, rows)
            return
        result: ChunkResult | None = None
        try:
            hashed = t.manifest.hashed
            pieces = t.plan.pieces(h.chunk)
            stage = self.stage
            if stage is IDENTITY:  # each piece hashed as it lands, while it is in cache
                computed = _recv_hashed(ch, handle.views, pieces, hashed)
            else:  # the stage sees the whole chunk in place, then it is hashed
                views = [handle.views[seg][a:b] for seg, a, b in pieces]
                for view in views:
                    ch.recv_into(view)
                try:
                    stage.incoming(ChunkRef(lane, h.transfer_id, h.chunk, h.length), views)
                except Exception as e:  # noqa: BLE001 - the stage is the caller's code: it fails this transfer only
                    result = self._stage_failed(t, lane_id, h, f"{type(e).__name__}: {e}")
                    return
                computed = _digest(views) if hashed else None
            now = time.monotonic()
            with self.lock:
                result = self._engine.chunk_done(t, lane_id, h, computed, now)
                self._report(result, handle, lane, h.length)
        finally:
            if result is None:  # the read broke off: the writer leaves, a dropped copy is asked for again
                with self.lock:
                    lost = self._engine.chunk_abandoned(t, lane_id, h, time.monotonic())
                self._finish_chunk(lost, None)
        self._finish_chunk(result, handle, lane, h.length)

    def _read_tail(self, ch: Stream, lane: int, lane_id: int, h: F.Header, t: RxTransfer, handle: IncomingTransfer,
                   rows: TailRows) -> None:
        """One chunk of the last layer's parity groups (``codec.parity``): into a scratch row (a parity chunk's
        own, or a read row for a data chunk: a lane stalled in it holds no destination byte), verified; a data
        chunk is then placed, and whatever its group can rebuild now is."""
        read = None if rows.groups.is_parity(h.chunk) else rows.take()
        try:
            self._read_tail_into(ch, lane, lane_id, h, t, handle, rows, read)
        finally:
            if read is not None:
                rows.give(read)

    def _read_tail_into(self, ch: Stream, lane: int, lane_id: int, h: F.Header, t: RxTransfer,
                        handle: IncomingTransfer, rows: TailRows, read: memoryview | None) -> None:
        hashed = t.manifest.hashed
        view = rows.parity_view(h.chunk, h.length) if read is None else read[:h.length]
        step: TailStep | None = None
        failed = ""
        try:
            ch.recv_into(view)
            if self.stage is not IDENTITY:
                try:
                    self.stage.incoming(ChunkRef(lane, h.transfer_id, h.chunk, h.length), [view])
                except Exception as e:  # noqa: BLE001 - the stage is the caller's code: it fails this transfer only
                    failed = f"chunk stage failed on chunk {h.chunk}: {type(e).__name__}: {e}"
            if not failed:
                computed = xxhash.xxh3_64_intdigest(view) if hashed else None
                with self.lock:
                    if read is None:
                        step = self._engine.tail_parity(t, lane_id, h, computed, rows.digests(h.chunk))
                    else:
                        step = self._engine.tail_data(t, lane_id, h, computed, time.monotonic())
        finally:
            if step is None:  # the read broke off, or the stage failed: no destination byte was written
                now = time.monotonic()
                with self.lock:
                    lost = self._engine.tail_abandoned(t, lane_id, h, now)
                    actions = (self._engine.end(h.transfer_id, State.FAILED, failed, now, notify=F.ERROR)
                               if failed else [])
                if lost is not None:
                    self.send(lost.kind, lost.body)
                self.perform(actions)
        if step is None:
            return
        if step.reply is not None:
            self.send(step.reply.kind, step.reply.body)
        try:
            if step.place and read is not None:
                self._place(t, lane, lane_id, h, computed, handle, rows, read)
        finally:  # (the engine counts the claimed chunks as writers: they are rebuilt or released, whatever)
            if step.rebuild:
                self._rebuild(t, handle, rows, step.rebuild)

    def _place(self, t: RxTransfer, lane: int, lane_id: int, h: F.Header, computed: int | None,
               handle: IncomingTransfer, rows: TailRows, read: memoryview) -> None:
        """Copy a verified data chunk from its read row into its destination and have it verified as any
        chunk; then rebuild what its group can now (the chunk counts from its destination)."""
        result: ChunkResult | None = None
        rebuild: tuple[int, ...] = ()
        try:
            rows.place(read, h.chunk, handle.views)
            with self.lock:
                result = self._engine.chunk_done(t, lane_id, h, computed, time.monotonic())
                self._report(result, handle, lane, h.length)
                rebuild = self._engine.tail_claim(t, h.chunk)
        finally:
            try:
                if result is None:
                    with self.lock:
                        failed = self._engine.tail_place_failed(t, lane_id, h, time.monotonic())
                    self._finish_chunk(failed, None)
                else:
                    self._finish_chunk(result, handle, lane, h.length)
            finally:  # (claimed chunks count as writers: rebuilt or released, whatever)
                if rebuild:
                    self._rebuild(t, handle, rows, rebuild)

    def _rebuild(self, t: RxTransfer, handle: IncomingTransfer, rows: TailRows, chunks: tuple[int, ...]) -> None:
        """Rebuild data ``chunks`` of one group (claimed by the engine) from its verified chunks (data in their
        destination, parity in its rows), write each into its destination and have it verified against the
        digest its group's parity carried. Whatever goes wrong, every claimed chunk ends verified or released
        (``rebuild_failed``)."""
        g, plan, hashed, tid = rows.groups, t.plan, t.manifest.hashed, t.manifest.transfer_id
        i = g.group(chunks[0])
        left = list(chunks)
        try:
            with self.lock:
                present = t.machine.present(i)
                digests = t.machine.tail_digests.get(i)
            blocks = rows.rebuild(present, chunks, handle.views)
            for c in chunks:
                block = blocks[c]
                computed = xxhash.xxh3_64_intdigest(block) if hashed else None
                expect = digests[g.block_id(c)] if digests is not None and hashed else 0
                if hashed and computed != expect:  # (the sender's data changed under it): its copies answer
                    log.warning("rebuilt chunk %d of transfer %d failed its check", c, tid)
                    continue
                rows.write(c, block, handle.views)
                hdr = F.Header(F.KIND_DATA, F.FLAG_HASHED if hashed else 0, tid, c, plan.layers[c], plan.offsets[c],
                               plan.lengths[c], expect)
                with self.lock:
                    result = self._engine.chunk_done(t, REBUILDER, hdr, computed, time.monotonic())
                    self._report(result, handle)
                left.remove(c)
                self._finish_chunk(result, handle)
        except Exception as e:  # noqa: BLE001 - zfec's or a copy's failure leaves the chunks to their copies
            log.warning("rebuilding chunks %s of transfer %d failed: %s", left, tid, e)
        finally:
            if left:
                with self.lock:
                    released = self._engine.rebuild_failed(t, tuple(left), time.monotonic())
                self._finish_chunk(released, None)

    def _stage_failed(self, t: RxTransfer, lane_id: int, h: F.Header, why: str) -> ChunkResult:
        """The chunk stage raised: the transfer fails (the sender is told) and the lane reads on."""
        now = time.monotonic()
        with self.lock:
            actions = self._engine.end(h.transfer_id, State.FAILED, f"chunk stage failed on chunk {h.chunk}: {why}",
                                      now, notify=F.ERROR)
            left = self._engine.chunk_abandoned(t, lane_id, h, now)  # the writer leaves: the handle may resolve
        self.perform(actions)
        self._finish_chunk(left, None)
        return left

    def _report(self, r: ChunkResult, handle: IncomingTransfer, lane: int = 0, n: int = 0) -> None:
        """Under ``self.lock``, with the engine's verdict ``r`` on a chunk read into ``handle``'s destination:
        count its bytes and mark its layers ready (the handle records them and only queues its ``on_layer``
        calls), in the critical section that verified them, so that a DONE answered next, on the control
        thread or by another lane's chunk, finds every verified layer ready. (Done after the lock, a lane
        paused there saw its layer come in after the handle was DONE: missing from ``layer_times`` when
        ``result()`` returned, and never reported to ``on_layer``.) A verdict that also ends the transfer
        is left to ``_finish_chunk``, which resolves the handle first."""
        if r.ended is not None:
            return
        handle.add_lane_bytes(lane, n)
        for layer in r.layers:
            handle.layer_ready(layer, r.at)

    def _finish_chunk(self, r: ChunkResult, handle: IncomingTransfer | None, lane: int = 0, n: int = 0) -> None:
        """After the lock: what the verdict ``r`` asks (``handle``: None when no chunk was verified into it;
        else its bytes and layers were reported by ``_report``, unless ``r`` ended the transfer)."""
        if r.ended is not None:
            self._resolve(r.ended)
        if r.lost is not None:
            self.send(r.lost.kind, r.lost.body)
        if handle is None:
            return
        if r.ended is not None:  # (otherwise reported under the lock, by _report)
            handle.add_lane_bytes(lane, n)
            for layer in r.layers:  # before the ACK: DONE must find every layer ready
                handle.layer_ready(layer, r.at)
        if r.reply is not None:
            self.send(r.reply.kind, r.reply.body)
        if r.finished:  # the held early DONE answered: every layer is ready and the last ACK went first
            self.perform(list(r.finished))


def _recv_hashed(ch: Stream, dest: list[memoryview], pieces: list[tuple[int, int, int]], hashed: bool) -> int | None:
    """Receive a chunk's ``pieces`` (segment, start, end) into the ``dest`` segment views, hashing each
    piece right after it lands; its xxh3_64 (None when unhashed)."""
    if len(pieces) == 1:
        seg, a, b = pieces[0]
        view = dest[seg][a:b]
        ch.recv_into(view)
        return xxhash.xxh3_64_intdigest(view) if hashed else None
    hasher = xxhash.xxh3_64() if hashed else None
    for seg, a, b in pieces:
        view = dest[seg][a:b]
        ch.recv_into(view)
        if hasher is not None:
            hasher.update(view)
    return hasher.intdigest() if hasher is not None else None


def _digest(views: list[memoryview]) -> int:
    """The xxh3_64 of a chunk whose payload is ``views``, in order."""
    if len(views) == 1:
        return xxhash.xxh3_64_intdigest(views[0])
    hasher = xxhash.xxh3_64()
    for view in views:
        hasher.update(view)
    return hasher.intdigest()
