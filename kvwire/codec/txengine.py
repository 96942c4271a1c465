"""The sending end's protocol engine, sans-IO: a session's transfers and what each control message does.

Owns: the table of a session's transfers (``SenderTransfer`` machines, deadlines), the round-robin choice of the
next chunk for a lane (the last layer's parity chunks right after its data, ``codec.parity``), which lane holds
which chunk in flight and re-queueing them when a lane dies, the control messages from the receiver (legal per
``rules.SENDER_RECEIVES``; ACCEPT, REJECT, ACK, NACK with its ``held``/``lost`` variants, COMPLETE, ERROR, CANCEL,
HEARTBEAT, BYE), DONE with the whole-transfer digest (after the last ACK, once every chunk's hash is known; or, to a
receiver that holds an early one, as the last chunk first goes out), deadlines, heartbeats and peer silence computed
from the ``now`` it is given, the layouts the receiver already knows, the early window (``codec.early``: chunks of a
transfer not yet accepted go out while the receiver's advertised window has room, each charged until the receiver's
ACCEPT or REJECT of that transfer releases it), the counters, and the session's open/down/closed state with its
connection generations (a reconnect starts a new one). Inputs are method calls; outputs are actions the driver
performs (``Send``, ``Ended``, ``Fail`` from ``codec.actions``, shared with the receiver's engine; ``LayersAcked``,
``ChunksQueued`` defined here). Must not know: sockets, threads, locks, clocks, payload bytes or buffers (chunk
indices, lengths and digests only), handles or user callbacks. The driver (``kvwire.tcp._sender``) holds one lock
around every call.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import KvwireError, ProtocolError
from . import frames as F
from .actions import Ended, Fail, Send
from .early import EarlyLedger, EarlyWindow
from .handshake import heartbeat_for
from .messages import parse_chunks, reason, wire_reason
from .rules import NACK_LOST, SENDER_RECEIVES, SENDER_TRANSFER, Conn, Offer, advance, answers
from .transfer import TERMINAL_COUNTERS, SenderTransfer, State, terminal_counter

#: the counter keys ``counts()`` always has
COUNT_KEYS: tuple[str, ...] = ("chunks_nacked", "chunks_requeued", "lane_reconnects", "session_reconnects",
                               *TERMINAL_COUNTERS)


@dataclass(frozen=True)
class LayersAcked:
    """The receiver verified every chunk of these layers of the transfer, newly, in this order."""

    transfer_id: int
    layers: tuple[int, ...]


@dataclass(frozen=True)
class ChunksQueued:
    """Chunks became ready to send (or the session's state changed): wake the lanes."""


Action = Send | Ended | Fail | LayersAcked | ChunksQueued
_NOTHING: tuple[Action, ...] = ()
_QUEUED = ChunksQueued()


class _Entry:
    """One transfer of the table: its machine, deadline and how many acked layers were reported."""

    __slots__ = ("sm", "deadline", "reported")

    def __init__(self, sm: SenderTransfer, deadline: float | None) -> None:
        self.sm = sm
        self.deadline = deadline
        self.reported = 0


class SenderEngine:
    """The protocol state of one sending session, across its connection generations.

    Parameters:
        peer_timeout: seconds of silence from the receiver after which the connection fails.
        heartbeat: seconds between heartbeats (shortened, per connection, to fit the ``peer_timeout`` the
            receiver said in its WELCOME: ``handshake.heartbeat_for``).
        reconnect: a failed connection leaves the session down (waiting for ``opened``), not closed.
    """

    def __init__(self, *, peer_timeout: float, heartbeat: float, reconnect: bool = False) -> None:
        self.peer_timeout = peer_timeout
        self.configured_heartbeat = heartbeat
        self.heartbeat = heartbeat  #: this connection's (``opened``)
        self.reconnect = reconnect
        self.conn = Conn.CLOSED  # the control connection, from the sender's side (OPEN once ``opened``)
        self.gen = 0  #: connection generation; work of an older one is ignored
        self.closed = False  #: ``close()`` ran, or the connection failed without ``reconnect``
        self.down = False  #: ``reconnect``: the connection failed and is being re-established
        self.failure = ""  #: why the connection failed last
        self.last_seen = 0.0  #: when the receiver was last heard from
        self._last_hb = float("-inf")
        self._transfers: dict[int, _Entry] = {}
        self._rr: deque[int] = deque()
        self._inflight: dict[tuple[int, int], int] = {}  # (transfer id, chunk) -> lane index
        self._lane_load: Counter[int] = Counter()  # lane index -> chunks it holds in flight
        self._acked_at: dict[int, float] = {}  # lane index -> last acknowledgement of a chunk it carried
        self._known_layouts: set[bytes] = set()
        self._early = EarlyLedger(None)  # early bytes handed out, by transfer, until its ACCEPT/REJECT is read
        self._done_early = False  # the receiver holds a DONE until every chunk is verified: send it at the last send
        self._counts: Counter[str] = Counter()

    # ------------------------------------------------------------ session
    def opened(self, now: float, early: EarlyWindow | None = None, done_early: bool = False,
               receiver_timeout: object = None) -> int:
        """A new connection generation is up (authenticated, lanes open): returns its number. Chunks
        in flight and known layouts belonged to the old receiver session. ``early``: the window its
        receiver advertised (``codec.early.parse``; None: chunks wait for ACCEPT). ``done_early``: its
        receiver holds a DONE that arrives before every chunk is verified (``codec.early.parse_done_early``):
        DONE goes as the last chunk goes out, not one round trip later, after its ACK. ``receiver_timeout``:
        the ``peer_timeout`` its WELCOME ``limits`` said (``handshake.PEER_TIMEOUT_KEY``; None when it said
        none): heartbeats come often enough for it. ``KvwireError`` if closed."""
        if self.closed:
            raise KvwireError("session closed")
        self.gen += 1
        if self.gen > 1:
            self._counts["session_reconnects"] += 1
        self.conn = Conn.OPEN
        self.down = False
        self._inflight.clear()
        self._lane_load.clear()
        self._acked_at.clear()
        self._known_layouts.clear()
        self._early = EarlyLedger(early)
        self._done_early = done_early
        self.last_seen = now
        self._last_hb = float("-inf")
        self.heartbeat = heartbeat_for(self.configured_heartbeat, receiver_timeout)
        return self.gen

    def current(self, gen: int) -> bool:
        """Generation ``gen`` is the live one (the session neither closed, failed nor reconnected since)."""
        return not self.closed and not self.down and self.gen == gen

    def fail(self, reason: str, gen: int | None = None) -> list[Action]:
        """The connection failed (``gen``: only if that generation is still the live one): every
        transfer ends failed, then ``Fail``. Nothing when already failed, closed or stale."""
        if self.closed or self.down or (gen is not None and gen != self.gen):
            return []
        self.failure = reason
        if self.reconnect:
            self.down = True
        else:
            self.closed = True
        self.conn = Conn.CLOSED
        out: list[Action] = []
        for tid in list(self._transfers):
            self._end(tid, State.FAILED, reason, None, out)
        out.append(Fail(reason, self.reconnect))
        return out

    def close(self) -> list[Action]:
        """The user closes the session: every transfer is cancelled (CANCEL each), then BYE unless
        the connection is down. Nothing when already closed."""
        if self.closed:
            return []
        was_down = self.down
        self.closed = True
        self.conn = Conn.CLOSED
        out: list[Action] = []
        for tid in list(self._transfers):
            self._end(tid, State.CANCELLED, "session closed", F.CANCEL, out)
        if not was_down:
            out.append(Send(F.BYE))
        return out

    # ------------------------------------------------------------ transfers
    def start(self, sm: SenderTransfer, deadline: float | None) -> Send:
        """A new transfer, driven by ``sm`` from now on (its handle may read it, never change it): the
        BEGIN to send. The layout goes along the first time this receiver session sees its fingerprint.
        ``KvwireError`` when the session is closed or down or the id is in use."""
        if self.closed:
            raise KvwireError(f"session closed: {self.failure or 'closed'}")
        if self.down:
            raise KvwireError(f"session reconnecting (it failed: {self.failure})")
        manifest = sm.manifest
        tid = manifest.transfer_id
        if tid in self._transfers:
            raise KvwireError(f"transfer id {tid} is in use")
        self._transfers[tid] = _Entry(sm, deadline)
        self._rr.append(tid)
        with_layout = manifest.fingerprint not in self._known_layouts
        self._known_layouts.add(manifest.fingerprint)
        return Send(F.BEGIN, manifest.to_wire(with_layout=with_layout))

    def layer_ready(self, tid: int, layer: int) -> bool:
        """Layer ``layer`` of ``tid`` was handed over: its chunks queue. False: the transfer has ended.
        ``ValueError`` when the layer was written before."""
        e = self._transfers.get(tid)
        if e is None:
            return False
        e.sm.layer_ready(layer)
        return True

    def finish(self, tid: int) -> Sequence[Action]:
        """No more layers: a transfer without chunks is complete now (DONE)."""
        e = self._transfers.get(tid)
        if e is None or e.sm.plan.num_chunks:
            return _NOTHING
        return [Send(F.DONE, {"tid": tid, "digest": e.sm.digest()})] if e.sm.done_due() else _NOTHING

    def cancel(self, tid: int, reason: str) -> list[Action]:
        """The user cancels ``tid``: CANCEL to the receiver, then ``Ended``. Nothing if it has ended."""
        out: list[Action] = []
        self._end(tid, State.CANCELLED, reason, F.CANCEL, out)
        return out

    def abort(self, tid: int, reason: str) -> list[Action]:
        """The driver cannot carry ``tid`` on (its chunk stage failed on a chunk of it): CANCEL to the
        receiver, then ``Ended`` failed. Nothing if it has ended."""
        out: list[Action] = []
        self._end(tid, State.FAILED, reason, F.CANCEL, out)
        return out

    @property
    def early_window(self) -> EarlyWindow | None:
        """The early window this generation's receiver advertised (None: every chunk waits for ACCEPT)."""
        return self._early.window

    def early_held(self) -> int:
        """Early payload bytes handed out whose transfers' ACCEPT or REJECT has not been read yet."""
        return self._early.total

    @property
    def busy(self) -> bool:
        """A transfer is in flight."""
        return bool(self._transfers)

    def in_flight(self) -> int:
        """Transfers started and not yet ended."""
        return len(self._transfers)

    # ------------------------------------------------------------ lanes (the hot path: plain values)
    def pick(self, lane: int) -> tuple[int, int] | None:
        """The next chunk for ``lane`` as ``(transfer id, chunk)``, round-robin over the transfers, now
        in flight on that lane; None when nothing is ready. A transfer not yet accepted hands out a
        chunk only while the receiver's early window has room for it (charged here)."""
        rr = self._rr
        for _ in range(len(rr)):
            tid = rr[0]
            rr.rotate(-1)
            e = self._transfers.get(tid)
            if e is None:
                continue
            sm = e.sm
            if sm.accepted:
                c = sm.next_chunk()
            else:
                c = sm.next_chunk(self._early.room(tid))
                if c is not None:
                    self._early.charge(tid, sm.plan.lengths[c])
            if c is not None:
                if c < sm.plan.num_chunks:  # (tail parity goes once, unacknowledged: ``codec.parity``)
                    self._inflight[(tid, c)] = lane
                    self._lane_load[lane] += 1
                return tid, c
        return None

    def sent(self, tid: int, chunk: int, digest: int) -> Sequence[Action]:
        """The chunk's hash (0 when unhashed), for the whole-transfer digest; it goes on the wire next. To a
        receiver that takes an early DONE, the last chunk to go out the first time brings the DONE; to any, the
        last hash of a transfer whose every chunk is acknowledged already (one rebuilt from parity) does."""
        e = self._transfers.get(tid)
        if e is None:
            return _NOTHING
        e.sm.sent(chunk, digest)
        if e.sm.done_early() if self._done_early else e.sm.done_due():
            return [Send(F.DONE, {"tid": tid, "digest": e.sm.digest()})]
        return _NOTHING

    def lane_busy(self, lane: int) -> bool:
        """``lane`` holds chunks in flight."""
        return self._lane_load[lane] > 0

    def acked_at(self, lane: int) -> float:
        """When a chunk ``lane`` carried was last acknowledged (a sign the receiver reads it); -inf: never."""
        return self._acked_at.get(lane, float("-inf"))

    def lane_lost(self, lane: int, gen: int) -> int:
        """``lane`` of generation ``gen`` died: its chunks in flight queue again for the other lanes.
        Returns how many (0 for a stale generation)."""
        if gen != self.gen:
            return 0
        lost = [k for k, v in self._inflight.items() if v == lane]
        self._counts["chunks_requeued"] += len(lost)
        for tid, chunk in lost:
            del self._inflight[(tid, chunk)]
            e = self._transfers.get(tid)
            if e is not None:
                e.sm.requeue([chunk])
        self._lane_load.pop(lane, None)
        return len(lost)

    def lane_reopened(self) -> None:
        """A lane was re-dialled (counted)."""
        self._counts["lane_reconnects"] += 1

    # ------------------------------------------------------------ control
    def receive(self, kind: str, body: dict[str, Any], now: float) -> Sequence[Action]:
        """One control message from the receiver. ``ProtocolError`` when it is illegal in the
        connection's state or malformed (the driver fails the connection with it)."""
        self.conn = advance(SENDER_RECEIVES, self.conn, kind, "sender")
        self.last_seen = now
        if kind == F.HEARTBEAT:
            return _NOTHING
        if kind == F.BYE:
            return self.fail("control connection: receiver closed the session")
        tid = body.get("tid")
        about = NACK_LOST if kind == F.NACK and body.get("lost") is True else kind  # rules.SENDER_TRANSFER's name
        if type(tid) is int and self._early.pending(tid) and answers(Offer.OFFERED, about):
            self._early.release(tid)  # the receiver released its count of the early bytes before it sent this
        e = self._transfers.get(tid) if type(tid) is int else None
        if e is not None and not e.sm.accepted and SENDER_TRANSFER[Offer.OFFERED].get(about) is Offer.ACCEPTED:
            e.sm.accepted = True  # an ACK may overtake the ACCEPT (another connection): it was activated
        if e is None:
            if kind == F.ERROR and tid is None:
                return self.fail(f"control connection: receiver error: {reason(body)}")
            return _NOTHING  # a late message for an ended transfer
        assert type(tid) is int
        if kind == F.ACK or kind == F.NACK:
            chunks = parse_chunks(body, kind, e.sm.plan.num_chunks)
            if kind == F.NACK and body.get("held") is True:
                self._release(tid, chunks, now)  # the other copy's verdict comes later
                return _NOTHING
            return self._on_ack(tid, e, chunks, kind == F.ACK, body.get("lost") is True, now)
        if kind == F.ACCEPT:
            return (_QUEUED,)  # accepted, its early charge released (above)
        out: list[Action] = []
        why = reason(body)  # (text, at most messages.MAX_REASON characters: a 1 MiB one became the error's)
        if kind == F.COMPLETE and not e.sm.done_sent:  # it answers DONE: a receiver that says it first is broken
            self._end(tid, State.FAILED, "the receiver sent COMPLETE before this side sent DONE", F.CANCEL, out)
        elif kind == F.COMPLETE:
            e.sm.on_complete()  # (every layer is verified: those whose ACK it overtook are reported first)
            if e.reported < len(e.sm.acked_layers):
                out.append(LayersAcked(tid, tuple(e.sm.acked_layers[e.reported:])))
                e.reported = len(e.sm.acked_layers)
            self._end(tid, State.DONE, "", None, out)
        elif kind == F.REJECT:
            # (the receiver may not keep the layout this BEGIN taught or named: it keeps a bounded number,
            # least recently used first, ``rxengine.LAYOUT_TENSORS_KEPT``; the next BEGIN carries it again)
            self._known_layouts.discard(e.sm.manifest.fingerprint)
            self._end(tid, State.FAILED, f"receiver rejected the transfer: {why}", None, out)
        elif kind == F.ERROR and body.get("state") == State.TIMED_OUT.value:
            self._end(tid, State.TIMED_OUT, f"receiver timed out: {why}", None, out)
        elif kind == F.ERROR:
            self._end(tid, State.FAILED, f"receiver failed the transfer: {why}", None, out)
        elif kind == F.CANCEL:
            self._end(tid, State.CANCELLED, f"cancelled by receiver: {why}", None, out)
        else:  # legal on an open connection but not about a transfer (none such today)
            raise ProtocolError(f"unexpected {kind!r} from receiver")
        return out

    def tick(self, now: float) -> list[Action]:
        """Time passes: the receiver silent too long fails the connection; a heartbeat when one is due;
        transfers past their deadline time out (CANCEL each)."""
        if self.conn is not Conn.OPEN:
            return []
        if now - self.last_seen > self.peer_timeout:
            return self.fail(f"receiver silent for {now - self.last_seen:.1f}s", self.gen)
        out: list[Action] = []
        if now - self._last_hb >= self.heartbeat:
            self._last_hb = now
            out.append(Send(F.HEARTBEAT))
        late = [tid for tid, e in self._transfers.items() if e.deadline is not None and now > e.deadline]
        for tid in late:
            self._end(tid, State.TIMED_OUT, "transfer deadline passed", F.CANCEL, out)
        return out

    def counts(self) -> dict[str, int]:
        """The counters (every ``COUNT_KEYS`` key): ended transfers and probes by state, chunks
        NACKed and re-queued, lane and session reconnects."""
        out = dict.fromkeys(COUNT_KEYS, 0)
        out.update(self._counts)
        return out

    # ------------------------------------------------------------ internals
    def _on_ack(self, tid: int, e: _Entry, chunks: list[int], ok: bool, lost: bool, now: float) -> Sequence[Action]:
        self._release(tid, chunks, now)
        sm = e.sm
        if not ok:
            sm.on_nack(chunks, lost)
            self._counts["chunks_requeued" if lost else "chunks_nacked"] += len(chunks)
            if sm.state is State.FAILED:
                out: list[Action] = []
                self._end(tid, State.FAILED, sm.status.reason, F.CANCEL, out)
                return out
            return (_QUEUED,)
        finished = sm.on_ack(chunks)
        acked = sm.acked_layers
        if e.reported == len(acked) and not finished:
            return _NOTHING
        result: list[Action] = []
        if e.reported < len(acked):
            result.append(LayersAcked(tid, tuple(acked[e.reported:])))
            e.reported = len(acked)
        if finished:
            result.append(Send(F.DONE, {"tid": tid, "digest": sm.digest()}))
        return result

    def _release(self, tid: int, chunks: list[int], now: float) -> None:
        """The lanes that carried ``chunks`` hold them no longer: a sign the receiver reads them."""
        for c in chunks:
            lane = self._inflight.pop((tid, c), None)
            if lane is not None:
                self._lane_load[lane] -= 1
                self._acked_at[lane] = now

    def _end(self, tid: int, state: State, reason: str, notify: str | None, out: list[Action]) -> None:
        e = self._transfers.pop(tid, None)
        if e is None:
            return
        e.sm.status.end(state, reason)
        self._counts[terminal_counter(state, e.sm.manifest.sink)] += 1
        try:
            self._rr.remove(tid)
        except ValueError:
            pass
        if e.sm.plan.num_chunks:
            for k in [k for k in self._inflight if k[0] == tid]:
                self._lane_load[self._inflight.pop(k)] -= 1
        if notify is not None:
            out.append(Send(notify, {"tid": tid, "reason": wire_reason(reason), "state": state.value}))
        out.append(Ended(tid, state, reason))
