"""The sending session's data lanes at work: each lane's thread pulls chunks, hashes and sends them.

Owns: ``LanePump`` (the loop of one lane's thread: ask the engine for the next chunk under the session's
lock, hash it, pass it through the ``ChunkStage``, bound the lane's unsent backlog to its rate
(``Lane.bound_unsent``: chunks go to free lanes, not behind seconds of earlier ones; a lane whose rate fell
below what it holds takes none until that drains: ``Lane.backlogged``), write it on the
lane's ``Stream``; wait while nothing is ready, and say so (``on_busy``) when a lane that waited picks
up work; notice a lane the receiver dropped or stopped reading; re-queue a dead lane's chunks and
re-dial it for ``peer_timeout``), and how many lanes pull chunks (``active``). Must not know: control
messages, transfers' states or deadlines (the engine's), the control connection, congestion policy.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence

import xxhash

from ..codec import frames as F
from ..codec.txengine import Action, SenderEngine
from ..errors import KvwireError
from ._lanes import LANE_SETTLE, MAX_QUICK_DEATHS, Dialer, Lane, LaneHook
from ._outgoing import OutgoingTransfer
from .transport import IDENTITY, ChunkRef, ChunkStage

log = logging.getLogger("kvwire.tcp")

#: how long a backlogged lane waits for its socket to drain before it looks again (``LanePump._wait_backlog``)
BACKLOG_POLL = 0.05


class LanePump:
    """Runs a session's lanes against its engine, under its lock.

    Parameters:
        engine: the session's ``SenderEngine`` (called only with ``cond`` held).
        cond: the session's lock.
        handles: the session's handles by transfer id (read under ``cond``: a handle is there while the
            engine has its transfer).
        dialer: re-dials a lane that died.
        active: lanes with index >= this pull no new chunks (``Session.set_active_lanes``).
        stall_timeout: a lane with chunks in flight and no sign of the receiver reading it this long is
            given up and re-dialled.
        peer_timeout: how long a dead lane is re-dialled before it is left down.
        alive_lanes: how many of the session's lanes are up.
        fail: ``fail(reason, gen)``: the session's connection failed (the last lane is gone).
        abort: ``abort(transfer_id, reason)``: that transfer cannot go on (the stage failed on a chunk of
            it, by raising or by changing its length); it ends failed, the lane carries on.
        act: ``act(actions, gen)`` performs the engine's actions (outside the lock): the early DONE that
            the last chunk to go out brings.
        stage: every chunk passes ``stage.outgoing`` after hashing, before the wire.
        on_busy: gives the hook (or None) called with ``(lane index, socket)`` on the lane's thread, outside
            the lock, as a lane that waited for work picks up a chunk (before the chunk is written).
    """

    def __init__(self, engine: SenderEngine, cond: threading.Condition, handles: Mapping[int, OutgoingTransfer],
                 dialer: Dialer, *, active: int, stall_timeout: float, peer_timeout: float,
                 alive_lanes: Callable[[], int], fail: Callable[[str, int], None],
                 abort: Callable[[int, str], None], act: Callable[[Sequence[Action], int], None],
                 stage: ChunkStage = IDENTITY,
                 on_busy: Callable[[], LaneHook | None] = lambda: None) -> None:
        self.engine = engine
        self.cond = cond
        self.handles = handles
        self.dialer = dialer
        self.active = active
        self.stall_timeout = stall_timeout
        self.peer_timeout = peer_timeout
        self.alive_lanes = alive_lanes
        self.fail = fail
        self.abort = abort
        self.act = act
        self.stage = stage  #: every chunk passes ``stage.outgoing`` after hashing, before the wire
        self.on_busy = on_busy

    def run(self, lane: Lane, gen: int) -> None:
        """The thread of ``lane`` in connection generation ``gen``: until that generation stops, or the
        lane is gone for good."""
        if not lane.alive and not self._lost(lane, ConnectionError("lane did not open"), gen):
            return
        eng, cond, index = self.engine, self.cond, lane.index
        while True:
            if not self._wait_backlog(lane, gen):
                if self._lost(lane, ConnectionError("lane closed by the receiver or stalled"), gen):
                    continue
                return
            with cond:
                pick = eng.pick(index) if index < self.active and eng.current(gen) else None
                waited = pick is None
                while pick is None and eng.current(gen):
                    busy = eng.lane_busy(index)
                    cond.wait(0.05 if busy else 0.5)
                    pick = eng.pick(index) if index < self.active and eng.current(gen) else None
                    if pick is None and busy and (lane.peer_gone() or lane.stalled(self.stall_timeout,
                                                                                   eng.acked_at(index))):
                        break  # idle with chunks in flight, and the receiver dropped or stopped reading it
                stopped = not eng.current(gen)
                # the engine picks only a transfer it has, and its handle is there until the engine ends it
                h, chunk = (self.handles[pick[0]], pick[1]) if pick is not None else (None, 0)
            if h is None:
                # outside the lock: re-dialling takes a while, and the other lanes carry on meanwhile
                if not stopped and self._lost(lane, ConnectionError("lane closed by the receiver or stalled"), gen):
                    continue
                return
            if waited:
                hook = self.on_busy()
                if hook is not None:
                    try:
                        hook(index, lane.ch.sock)
                    except Exception:  # noqa: BLE001 - a hook's failure must not end the lane
                        log.exception("on_lane_busy hook failed on lane %d", index)
            try:
                self._send_chunk(lane, h, chunk, gen)
            except (OSError, ValueError) as e:
                if not self._lost(lane, e, gen):
                    return
            h = None  # an idle lane holds no handle (its buffers are freed when the transfer ends)

    def _wait_backlog(self, lane: Lane, gen: int) -> bool:
        """Before ``lane`` takes a chunk: while it is ``backlogged`` (what it holds unsent would take more than
        twice its bound to leave at the rate its kernel paces it now), it waits for that to drain, and the
        other lanes take the chunks meanwhile. False: the receiver dropped the lane or stopped reading it
        meanwhile (``stalled``: a lane that drains, however slowly, is not)."""
        while self.engine.current(gen) and lane.backlogged():
            lane.drain(BACKLOG_POLL)
            with self.cond:
                acked = self.engine.acked_at(lane.index)
            if lane.peer_gone() or lane.stalled(self.stall_timeout, acked):
                return False
        return True

    def _send_chunk(self, lane: Lane, h: OutgoingTransfer, chunk: int, gen: int) -> None:
        plan, tid = h.plan, h.transfer_id
        if chunk < plan.num_chunks:
            pieces = h.pieces(chunk)
            layer, offset, length = plan.layers[chunk], plan.offsets[chunk], plan.lengths[chunk]
        else:  # a parity chunk of the last layer (``codec.parity``): computed at the first one's turn
            assert h.tail is not None
            try:
                pieces = h.tail.payload(chunk)
            except Exception:  # noqa: BLE001 - parity is a bonus: without it the data chunks still answer
                log.exception("tail parity chunk %d of transfer %d not sent", chunk, tid)
                return
            layer, offset, length = h.tail.groups.layer, 0, h.tail.length(chunk)
        digest: int | None = None
        if h.manifest.hashed:
            if len(pieces) == 1:
                digest = xxhash.xxh3_64_intdigest(pieces[0])
            else:
                x = xxhash.xxh3_64()
                for p in pieces:
                    x.update(p)
                digest = x.intdigest()
        if chunk < plan.num_chunks:
            with self.cond:
                done = self.engine.sent(tid, chunk, digest or 0)
            if done:
                self.act(done, gen)  # (the early DONE: the receiver holds it until the chunks are verified)
        stage = self.stage
        if stage is not IDENTITY:
            try:
                pieces = stage.outgoing(ChunkRef(lane.index, tid, chunk, length), pieces)
                staged = sum(memoryview(p).nbytes for p in pieces)
                if staged != length:
                    raise ValueError(f"it returned {staged} bytes for a {length}-byte chunk")
            except OSError:
                raise  # the lane's (a stage may act on the lane itself, as fault injection does)
            except Exception as e:  # the stage is user code: its failure is the transfer's, not the lane's
                self.abort(tid, f"chunk stage failed on chunk {chunk}: {type(e).__name__}: {e}")
                return
        lane.bound_unsent()
        lane.sending(length)
        h.bytes_sent += length
        lane.ch.send_parts([F.pack_data_header(tid, chunk, layer, offset, length, digest), *pieces])
        lane.sent()

    def _lost(self, lane: Lane, err: BaseException, gen: int) -> bool:
        """Re-queue the lane's unacknowledged chunks, then try to reconnect it for ``peer_timeout``.
        False: lane gone (or its generation stopped)."""
        lane.alive = False
        lane.close()
        eng, cond = self.engine, self.cond
        with cond:
            eng.lane_lost(lane.index, gen)
            cond.notify_all()
        # a lane cut again as soon as it opened (a receiver that drops every new lane) backs off, doubling,
        # and is given up after MAX_QUICK_DEATHS such deaths in a row
        quick = time.monotonic() - lane.opened_at < LANE_SETTLE
        lane.quick_deaths = lane.quick_deaths + 1 if quick else 0
        lane.redial_delay = min(max(0.05, 2 * lane.redial_delay), 1.0) if quick else 0.0
        if lane.quick_deaths > MAX_QUICK_DEATHS:
            log.warning("lane %d given up: cut within %.1f s of opening %d times in a row (last: %s)", lane.index,
                        LANE_SETTLE, lane.quick_deaths, err)
            if eng.current(gen) and self.alive_lanes() == 0:
                self.fail(f"every lane is down: each was cut within {LANE_SETTLE:g} s of opening "
                          f"{lane.quick_deaths} times in a row (last error: {err})", gen)
            return False
        if lane.redial_delay:
            with cond:
                cond.wait_for(lambda: not eng.current(gen), lane.redial_delay)
        deadline = time.monotonic() + self.peer_timeout
        delay = 0.05
        while eng.current(gen) and time.monotonic() < deadline:
            try:
                ch = self.dialer.open_lane(lane.index)
            except (OSError, KvwireError):
                with cond:
                    cond.wait_for(lambda: not eng.current(gen), delay)
                delay = min(delay * 2, 1.0)
                continue
            with cond:
                if not eng.current(gen):
                    ch.close()
                    return False
                lane.reopened(ch)
                eng.lane_reopened()
            return True
        if eng.current(gen) and self.alive_lanes() == 0:
            self.fail(f"every lane is down (last error: {err})", gen)
        return False
