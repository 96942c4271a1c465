"""The receiving end of one session, sans-IO: what to do with each control message, chunk and tick.

Owns: the legality of the sender's control messages (``rules.RECEIVER_RECEIVES``; an illegal one raises
``ProtocolError``), parsing their bodies (``manifest.py``, ``messages.py``), per-session admission
(transfer ids in flight or recently ended, the per-session bound, capacity probes' size), the table of
admitted transfers (each a ``ReceiverTransfer`` with its deadline), chunk admission and verdicts (ACK,
NACK, "held" when another copy is being read, "lost" when the read copy broke off after another was
dropped), early chunks (``codec.early``: a chunk whose transfer is not yet activated or refused is
charged to the session's early window, past which it is a ``ProtocolError``, and its lane waits for the
answer; still unanswered after the wait, it is drained and asked for again with NACK "lost"), the early
DONE (with ``done_early``, advertised in the WELCOME limits: a DONE that arrives before every chunk is
verified is held, its digest compared and COMPLETE or ERROR sent as the last chunk is verified), the rule that
a transfer ends once but resolves only when no lane writes into it any more
(and cutting a lane stuck mid-chunk of an ended transfer), the last layer's parity groups (``codec.parity``:
a lane reading one of their chunks into the driver's scratch is no writer of its transfer; the verdicts on
them, ``tail_data``/``tail_parity``; which missing data chunks a group rebuilds once ``k`` of its chunks
are in, each then a writer until its ``chunk_done``), deadlines, heartbeats and peer silence from
the ``now`` it is given, the session's counters, and a DONE or CANCEL that comes while its transfer is admitted
but not yet activated or refused (the driver finds destinations off the control reader's thread: held, then
applied as it is activated). In the spirit of h11's ``Connection``: it takes
decoded frames and events and returns actions. Must not know: sockets, threads, locks, clocks,
payload bytes or buffers (a chunk is its header and its digest), handles or user callbacks, and
receiver-wide bounds or destinations (the driver decides those between ``Admit`` and ``activate``).

The driver (``kvwire.tcp._rxsession``) calls every method under its session lock and performs the
actions in order (a chunk's ``AwaitOffer`` is no action: see ``chunk_admit``): ``Send`` (a control frame
to the sender), ``Ended`` (resolve the transfer's handle:
emitted exactly once per activated transfer) and ``Fail`` (the session is over: close its connections;
the engine accepts nothing afterwards; never ``reconnect``), the actions both engines share
(``codec.actions``), and this end's own: ``CutLanes`` (close these lane connections) and ``Admit`` (find
the destination, then ``activate`` or ``refuse``). A chunk's answer is one
``ChunkResult`` (its verdict, the layers it completed, an ``Ended``, and the end an early DONE brings),
not a list: the lane path stays lean. Lanes are named by an id the driver gives each lane connection
(not its index: a reconnected lane is another connection).
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

from ..errors import KvwireError, ProtocolError
from . import frames as F
from .actions import Ended, Fail, Send
from .early import EarlyLedger, EarlyWindow
from .frames import Header, Limits
from .layout import ModelLayout
from .manifest import Manifest, parse_manifest
from .messages import parse_done, parse_end, wire_reason
from .plan import ChunkPlan
from .probe import sink_refusal
from .rules import RECEIVER_RECEIVES, Conn, advance
from .transfer import ReceiverTransfer, State, terminal_counter

#: recently ended transfer ids remembered per session (their late chunks are drained, their ids refused)
ENDED_KEPT = 4096
#: layouts a session may teach the receiver (later manifests must name one or carry their own) ...
MAX_LAYOUTS = 256
#: ... and the tensors they describe together, least recently used forgotten first. A parsed layout costs
#: ~0.5 kB a tensor (a 65,536-tensor layout fit one 1.5 MB BEGIN and held 30 MiB): kept without this bound a
#: session could hold 256 of them. A layout carries at most ``Limits.max_segments`` tensors (``parse_manifest``),
#: and a sender whose layout was forgotten is refused once, then carries it again (``SenderEngine``)
LAYOUT_TENSORS_KEPT = 8192
#: seconds a lane may keep writing into a transfer that ended before its connection is cut
UNSTICK_AFTER = 2.0
#: the answer that refuses a BEGIN, by the state the sender's handle ends in (``refuse``)
_REFUSALS = {State.FAILED: F.REJECT, State.CANCELLED: F.CANCEL, State.TIMED_OUT: F.ERROR}

#: why a BEGIN was REJECTed, as counted (``refused_<why>``) and labelled in metrics (never the free-text reason):
#: ``no_destination`` (not expected, and no allocator, or none it can be asked for: its layout is unknown here),
#: ``busy`` (over a bound: the receiver's bytes in flight or queued handles, the session's transfers, no memory
#: for its tail parity), ``allocator`` (the allocator raised or returned buffers that do not fit), ``mismatch``
#: (the expected buffers, layout or state position disagree), ``sink`` (a capacity probe not taken), ``invalid``
#: (a malformed BEGIN, a transfer id in use, more parity than advertised)
Refusal = Literal["no_destination", "busy", "allocator", "mismatch", "sink", "invalid"]
REFUSALS: tuple[str, ...] = get_args(Refusal)
#: every refusal counter key, in ``REFUSALS`` order
REFUSAL_COUNTERS: tuple[str, ...] = tuple(f"refused_{why}" for why in REFUSALS)


# ---------------------------------------------------------------- this end's actions (the shared ones: actions.py)


@dataclass(frozen=True, slots=True)
class Admit:
    """A manifest passed the session's checks: find its destination (and the receiver-wide bounds),
    then call ``activate`` or ``refuse``."""

    manifest: Manifest


@dataclass(frozen=True, slots=True)
class CutLanes:
    """Close these lane connections (by the driver's lane ids): each is stuck mid-chunk of an ended transfer."""

    lanes: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class AwaitOffer:
    """A chunk arrived before its transfer was activated or refused, inside the early window (charged):
    wait, bounded, until ``awaiting(transfer_id)`` is False, then call ``chunk_admit`` again with
    ``waited=True``. Nothing is read or allocated meanwhile: the payload waits in the socket."""

    transfer_id: int


Action = Send | Ended | Fail | Admit | CutLanes

#: the lane id a rebuilt tail chunk is written under (``chunk_done(t, REBUILDER, ...)``): no lane's
REBUILDER = -1


@dataclass(frozen=True, slots=True)
class TailStep:
    """What a chunk of the last layer's parity groups read into its scratch row leads to: ``place`` (copy the
    row into the destination, then ``chunk_done``), else ``reply`` to send; then the data chunks to ``rebuild``
    from the group's rows (each written, then ``chunk_done(t, REBUILDER, ...)``, or ``rebuild_failed``)."""

    place: bool
    reply: Send | None
    rebuild: tuple[int, ...]


def check_lane_control(kind: str) -> None:
    """A control message on an open data lane: only BYE (the lane closes) is legal there, anything else
    raises ``ProtocolError``. Stateless (a lane has no state but open), so a lane's reader calls it
    without its session's lock."""
    advance(RECEIVER_RECEIVES, Conn.LANE_OPEN, kind, "receiver")


def held_bytes(m: Manifest) -> int:
    """What an admitted transfer holds against a receiver's in-flight bound: its payload (none for a
    sink, which reads into shared scratch), its metadata (segments, plan, views) and its parity groups' scratch."""
    return m.metadata_bytes + (0 if m.sink else m.total_bytes) + m.tail_scratch_bytes


@dataclass(eq=False, slots=True)
class _Held:
    """What the sender said of a transfer while its destination was being found (``ReceiverEngine.admitting``)."""

    done: int | None = None  # its DONE's digest
    cancel: tuple[State | None, str] | None = None  # its CANCEL's state (None: cancelled) and reason


@dataclass(eq=False)
class RxTransfer:
    """The engine's record of one admitted transfer: its machine, deadline and the lanes writing into it."""

    machine: ReceiverTransfer
    deadline: float
    writers: int = 0
    writing: set[int] = field(default_factory=set)  # lane ids reading a chunk of it into its destination
    pending: tuple[State, str] | None = None  # ended while a lane writes: resolved when the last one stops
    pending_since: float = 0.0
    done_digest: int | None = None  # an early DONE's digest, held until every chunk is verified
    # lane ids reading a parity group's chunk into the driver's scratch rows (``codec.parity``): no writers of
    # the destination, but they hold the scratch, which stays charged to ``held`` until the last one leaves
    scratch_readers: set[int] = field(default_factory=set)
    ended_at: float = 0.0
    said: _Held | None = None  # what the sender said while it was admitted, applied by ``apply_held``

    @property
    def manifest(self) -> Manifest:
        return self.machine.manifest

    @property
    def plan(self) -> ChunkPlan:
        return self.machine.plan


@dataclass(frozen=True, slots=True)
class ChunkResult:
    """What a chunk read into its destination leads to: resolve ``ended`` (if any) first, then the
    ``layers`` became ready (at ``at``), then send ``reply`` (ACK or NACK; None when the read broke off)
    and ``lost`` (a NACK asking for the copy dropped while this one was read)."""

    reply: Send | None
    layers: tuple[int, ...] = ()
    at: float = 0.0
    ended: Ended | None = None
    lost: Send | None = None
    finished: tuple[Ended | Send, ...] = ()  # the held early DONE answered: perform after the reply, in order


# ---------------------------------------------------------------- engine


class ReceiverEngine:
    """One authenticated receiver session (its control connection is OPEN when this is made).

    Parameters: ``limits`` (what manifests may announce), ``max_transfers`` in flight on the session,
    ``max_probe_bytes`` (largest sink transfer; 0 refuses them), ``transfer_timeout``, ``peer_timeout``
    and ``heartbeat`` in seconds, ``now``: the clock reading the session starts at, ``early``: the
    early window advertised to this session's sender (None: a chunk before ACCEPT is a protocol error), and
    ``done_early``: this session's sender was told a DONE may come before every chunk is verified (held
    until they are; without it such a DONE fails the transfer, as a sender that finished with a hole), and
    ``parity``: the most tail parity chunks (``codec.parity``) it was told this end rebuilds from (0: none)."""

    def __init__(self, limits: Limits, *, max_transfers: int, max_probe_bytes: int, transfer_timeout: float,
                 peer_timeout: float, heartbeat: float, now: float, early: EarlyWindow | None = None,
                 done_early: bool = False, parity: int = 0) -> None:
        self.limits = limits
        self.parity = parity
        self.done_early = done_early
        self.max_transfers = max_transfers
        self.max_probe_bytes = max_probe_bytes
        self.transfer_timeout = transfer_timeout
        self.peer_timeout = peer_timeout
        self.heartbeat = heartbeat
        self.state = Conn.OPEN
        self.transfers: dict[int, RxTransfer] = {}  # in flight
        self.ended: OrderedDict[int, None] = OrderedDict()  # recently ended ids
        self.pending: dict[int, RxTransfer] = {}  # ended, a lane still writing
        self.lingering: dict[int, RxTransfer] = {}  # ended, a lane still reading into its tail scratch
        # admitted (``Admit`` returned), neither activated nor refused yet: the driver finds their destinations off
        # the thread that reads the control connection, so a DONE or CANCEL of one may come first; it is held here
        # (``_Held``) and applied as the transfer is activated
        self.admitting: dict[int, _Held] = {}
        self.layouts: OrderedDict[bytes, ModelLayout] = OrderedDict()  # by fingerprint, least recently used first
        self._layout_tensors = 0  # what the kept layouts describe together (``LAYOUT_TENSORS_KEPT``)
        self.last_seen = now
        self.last_sent = now
        self.held = 0  # held_bytes() of the transfers in flight
        self.early = EarlyLedger(early)  # early bytes arrived, by transfer, until it is activated or refused
        self._over = False  # Fail was returned
        self._counts: Counter[str] = Counter()

    # ---- queries
    @property
    def closed(self) -> bool:
        """``Fail`` was returned: nothing is accepted any more."""
        return self._over

    def counts(self) -> dict[str, int]:
        """The session's counters: ``bytes_received``, ``probe_bytes_received``, ``chunks_rejected``,
        ``transfers_<state>``, ``probes_<state>`` and ``refused_<why>`` (only those that happened)."""
        return dict(self._counts)

    def awaiting(self, tid: int) -> bool:
        """Chunks of ``tid`` arrived early and it is neither activated nor refused yet."""
        return self.early.pending(tid)

    def transfer(self, tid: int) -> RxTransfer | None:
        """The transfer in flight under ``tid``."""
        return self.transfers.get(tid)

    # ---- control messages
    def receive(self, kind: str, body: dict[str, Any], now: float) -> list[Action]:
        """One control message from the sender. ``ProtocolError`` when it is illegal in this state;
        ``ProtocolError``/``KvwireError`` when its body is malformed (the driver fails the session)."""
        self.state = advance(RECEIVER_RECEIVES, self.state, kind, "receiver")
        self.last_seen = now
        if kind == F.BEGIN:
            return self._begin(body, now)
        if kind == F.DONE:
            tid, digest = parse_done(body)
            if tid in self.admitting:
                self.admitting[tid].done = digest
                return []
            return self._done(tid, digest, now)
        if kind == F.CANCEL:
            tid, state, why = parse_end(body, F.CANCEL)
            if tid in self.admitting:
                self.admitting[tid].cancel = (state, why)
                return []
            return self._cancelled(tid, state, why, now)
        if kind == F.BYE:
            return self.close("sender closed the session")
        return []  # heartbeat

    def _done(self, tid: int, digest: int, now: float) -> list[Action]:
        """The sender's DONE of ``tid`` (its whole-transfer digest)."""
        t = self.transfers.get(tid)
        if t is None:
            return []  # ended already (cancelled, timed out): the sender was told
        if self.done_early and t.machine.remaining and not t.machine.state.terminal:
            t.done_digest = digest  # early: answered as the last chunk is verified (``chunk_done``)
            return []
        if t.machine.on_done(digest):
            return self.end(tid, State.DONE, "", now, notify=F.COMPLETE)
        return self.end(tid, State.FAILED, t.machine.status.reason, now, notify=F.ERROR)

    def _cancelled(self, tid: int, state: State | None, why: str, now: float) -> list[Action]:
        """The sender's CANCEL of ``tid``: it ended there (``state``: cancelled, failed or timed out)."""
        if tid not in self.transfers:
            return []
        if state is State.TIMED_OUT:
            return self.end(tid, State.TIMED_OUT, f"sender timed out: {why}", now)
        if state is State.FAILED:  # the sender's failure, with its reason
            return self.end(tid, State.FAILED, f"sender failed the transfer: {why}", now)
        return self.end(tid, State.CANCELLED, f"cancelled by sender: {why}", now)

    def _begin(self, body: dict[str, Any], now: float) -> list[Action]:
        try:
            m = parse_manifest(body, self.limits, self.layouts)
        except KvwireError as e:
            raw = body.get("tid")
            tid = raw if type(raw) is int else None
            self._answered(tid)
            self._counts["refused_invalid"] += 1
            return [self._send(F.REJECT, {"tid": tid, "reason": wire_reason(str(e))}, now)]
        self._keep_layout(m)
        why: Refusal = "sink"
        reason = sink_refusal(m, self.max_probe_bytes) if m.sink else ""
        if not reason and m.parity > self.parity:
            why = "invalid"
            reason = f"{m.parity} parity chunks asked, this receiver takes {self.parity} (zfec: kvwire[fec])"
        if not reason and (m.transfer_id in self.transfers or m.transfer_id in self.ended
                           or m.transfer_id in self.pending or m.transfer_id in self.admitting):
            reason, why = f"transfer id {m.transfer_id} already used on this session", "invalid"
        if not reason and len(self.transfers) + len(self.admitting) >= self.max_transfers:
            reason, why = "too many transfers in flight on this session", "busy"
        if reason:
            return self.refuse(m.transfer_id, reason, now, why=why)
        self.admitting[m.transfer_id] = _Held()
        return [Admit(m)]

    def _keep_layout(self, m: Manifest) -> None:
        """Remember ``m``'s layout for later manifests that name it, or mark it used, within ``MAX_LAYOUTS`` and
        ``LAYOUT_TENSORS_KEPT`` (the least recently used go first)."""
        fp, layout = m.fingerprint, m.layout
        if layout is None:
            return
        if fp in self.layouts:
            self.layouts.move_to_end(fp)
            return
        size = layout.num_tensors()
        while self.layouts and (len(self.layouts) >= MAX_LAYOUTS or self._layout_tensors + size > LAYOUT_TENSORS_KEPT):
            _, old = self.layouts.popitem(last=False)
            self._layout_tensors -= old.num_tensors()
        if size <= LAYOUT_TENSORS_KEPT:
            self.layouts[fp] = layout
            self._layout_tensors += size

    def activate(self, m: Manifest, now: float, deadline: float | None = None) -> list[Action]:
        """The driver found ``m``'s destination: the transfer is in flight (until ``deadline`` or the
        receiver's ``transfer_timeout``, whichever comes first) and the sender is told to go."""
        if self.closed:
            return self.refuse(m.transfer_id, "session closed", now)
        held = self.admitting.pop(m.transfer_id, None)
        if m.transfer_id in self.transfers or m.transfer_id in self.ended or m.transfer_id in self.pending:
            return self.refuse(m.transfer_id, f"transfer id {m.transfer_id} already used on this session", now)
        self.early.release(m.transfer_id)
        end = now + self.transfer_timeout
        self.transfers[m.transfer_id] = RxTransfer(ReceiverTransfer(m, m.plan()),
                                                   end if deadline is None else min(deadline, end))
        self.held += held_bytes(m)
        if held is not None and (held.cancel is not None or held.done is not None):
            self.transfers[m.transfer_id].said = held
        return [self._send(F.ACCEPT, {"tid": m.transfer_id}, now)]

    def apply_held(self, tid: int, now: float) -> list[Action]:
        """What the sender said of ``tid`` while its destination was being found, now that it is activated and
        its handle bound (the driver's next call after ``activate``): a CANCEL ends it, a DONE is taken as if
        it came now."""
        t = self.transfers.get(tid)
        said = t.said if t is not None else None
        if t is None or said is None:
            return []
        t.said = None
        if said.cancel is not None:
            return self._cancelled(tid, *said.cancel, now)
        assert said.done is not None
        return self._done(tid, said.done, now)

    def refuse(self, tid: int | None, reason: str, now: float, state: State = State.FAILED,
               why: Refusal = "invalid") -> list[Action]:
        """Refuse a transfer that was not activated: REJECT (``state`` failed), counted ``refused_<why>``
        (``REFUSALS``), or, for a request the receiver's user expected and that ended before it was
        placed, CANCEL (cancelled) or ERROR (timed out) carrying ``state``, so that the sender's handle ends
        in it, not failed; those count as ended here (``transfers_<state>``: never a sink's). All end it at
        the sender (``rules``)."""
        if tid is not None:
            self.admitting.pop(tid, None)
        if self._over:
            return []
        self._answered(tid)
        body: dict[str, Any] = {"tid": tid, "reason": wire_reason(reason)}
        if state is not State.FAILED:
            body["state"] = state.value
            self._counts[terminal_counter(state, False)] += 1
        else:
            self._counts[f"refused_{why}"] += 1
        return [self._send(_REFUSALS[state], body, now)]

    def _answered(self, tid: int | None) -> None:
        """``tid`` is refused: its early bytes no longer count and, with an early window, its id is
        remembered as ended, so chunks the sender sent before it read the REJECT are drained."""
        if tid is None:
            return
        self.early.release(tid)
        if self.early.window is not None and tid not in self.transfers and tid not in self.ended:
            self._remember(tid)

    def _remember(self, tid: int) -> None:
        self.ended[tid] = None
        while len(self.ended) > ENDED_KEPT:
            self.ended.popitem(last=False)

    def cancel(self, tid: int, reason: str, now: float) -> list[Action]:
        """The receiver's user cancels ``tid``; the sender is told (even when it ended already)."""
        return self.end(tid, State.CANCELLED, reason, now, notify=F.CANCEL)

    def end(self, tid: int, state: State, reason: str, now: float, notify: str | None = None) -> list[Action]:
        """Move ``tid`` to a terminal state. ``Ended`` now when no lane writes into it, else when the last
        writer stops (``chunk_done``/``chunk_abandoned``). ``notify``: tell the sender with this kind."""
        out: list[Action] = []
        t = self.transfers.pop(tid, None)
        if t is not None:
            t.machine.status.end(state, reason)
            m = t.manifest
            self.held -= held_bytes(m)
            if t.scratch_readers:  # its scratch is held until they leave (or are cut)
                self.held += m.tail_scratch_bytes
                t.ended_at = now
                self.lingering[tid] = t
            self._counts[terminal_counter(state, m.sink)] += 1
            self._remember(tid)
            if t.writers == 0:
                out.append(Ended(tid, state, reason))
            else:
                t.pending, t.pending_since = (state, reason), now
                self.pending[tid] = t
        if notify is not None and not self._over:
            out.append(self._send(notify, {"tid": tid, "reason": wire_reason(reason), "state": state.value}, now))
        return out

    def close(self, reason: str) -> list[Action]:
        """End the session (the driver's close, a protocol error, a lost connection): every transfer in
        flight fails with ``reason``; then ``Fail``. Nothing the second time."""
        if self._over:
            return []
        self._over, self.state = True, Conn.CLOSED
        self.early.clear()
        out: list[Action] = []
        for tid in list(self.transfers):
            out += self.end(tid, State.FAILED, reason, self.last_seen)
        out.append(Fail(reason))
        return out

    def tick(self, now: float) -> list[Action]:
        """Peer silence (the session fails), a heartbeat due, transfer deadlines, lanes stuck mid-chunk
        of an ended transfer for ``UNSTICK_AFTER`` seconds."""
        if self.closed:
            return []
        if now - self.last_seen > self.peer_timeout:
            return self.close(f"peer silent for {now - self.last_seen:.1f}s")
        out: list[Action] = []
        if now - self.last_sent >= self.heartbeat:
            out.append(self._send(F.HEARTBEAT, {}, now))
        for tid in [tid for tid, t in self.transfers.items() if now > t.deadline]:
            out += self.end(tid, State.TIMED_OUT, "transfer deadline passed", now, notify=F.ERROR)
        stuck = tuple(lane for t in self.pending.values() if now - t.pending_since > UNSTICK_AFTER
                      for lane in t.writing) + tuple(lane for t in self.lingering.values()
                                                     if now - t.ended_at > UNSTICK_AFTER for lane in t.scratch_readers)
        if stuck:
            out.append(CutLanes(stuck))
        return out

    # ---- chunks (the lane path: no action lists)
    def chunk_admit(self, lane: int, h: Header, waited: bool = False) -> RxTransfer | AwaitOffer | None:
        """A chunk header arrived on lane ``lane``. The transfer: read the payload into its destination,
        then call ``chunk_done`` (or ``chunk_abandoned`` if the read broke off). None: drain the payload,
        then call ``chunk_drained``. ``AwaitOffer``: the transfer is not activated or refused yet and the
        chunk fits the early window (charged to it): wait for the answer, then call again with ``waited``
        (still unanswered then: None). ``ProtocolError`` for a chunk past the early window, a chunk of
        a transfer never seen without one, or a header outside the transfer's plan."""
        t = self.transfers.get(h.transfer_id)
        if t is None:
            tid = h.transfer_id
            if tid in self.ended or waited or self._over:
                return None
            if self.early.window is None:
                raise ProtocolError(f"chunk for unknown transfer {tid}")
            self.early.charge(tid, h.length)  # ProtocolError past the window: the sender broke it
            self._counts["early_bytes"] += h.length
            return AwaitOffer(tid)
        if not t.machine.admit(h):
            return None
        if t.machine.in_tail(h.chunk):  # read into scratch (``tail_data``): no writer of the destination
            t.scratch_readers.add(lane)
        else:
            t.writers += 1
            t.writing.add(lane)
        return t

    def chunk_drained(self, h: Header, now: float) -> Send | None:
        """A copy that was not written has been drained: ACK it if the chunk is verified, or say the copy
        being read answers for it (NACK ``held``)."""
        t = self.transfers.get(h.transfer_id)
        if self._over:
            return None
        if t is None:
            if not self.early.pending(h.transfer_id):
                return None  # ended or refused: the sender was told
            # early, and still unanswered after the wait: the sender sends it again (not a failed check)
            self._counts["early_chunks_dropped"] += 1
            return self._send(F.NACK, {"tid": h.transfer_id, "c": [h.chunk], "lost": True}, now)
        if h.chunk >= t.plan.num_chunks:
            return None  # parity is never answered
        if t.machine.verified[h.chunk]:
            return self._send(F.ACK, {"tid": h.transfer_id, "c": [h.chunk]}, now)
        if h.chunk in t.machine.writing:  # the verdict on the copy being read answers both
            return self._send(F.NACK, {"tid": h.transfer_id, "c": [h.chunk], "held": True}, now)
        return None

    def chunk_done(self, t: RxTransfer, lane: int, h: Header, computed: int | None, now: float) -> ChunkResult:
        """The admitted copy's payload is in place; ``computed``: its xxh3_64 (None when unhashed)."""
        verdict = t.machine.received(h, computed)
        ended = self._writer_left(t, lane)
        m = t.machine.manifest
        if self._over:  # the session is gone: nobody to answer, and its transfers ended, so the verdict
            return ChunkResult(None, (), now, ended)  # checked no hash: not bytes_received (verified bytes)
        if verdict.ack:
            self._counts["probe_bytes_received" if m.sink else "bytes_received"] += h.length
            if lane == REBUILDER:
                self._counts["chunks_rebuilt"] += 1
            reply = self._send(F.ACK, {"tid": h.transfer_id, "c": [h.chunk]}, now)
        else:
            self._counts["chunks_rejected"] += 1
            reply = self._send(F.NACK, {"tid": h.transfer_id, "c": [h.chunk]}, now)
        finished: tuple[Ended | Send, ...] = ()
        if verdict.all_verified and t.done_digest is not None and self.transfers.get(h.transfer_id) is t:
            ok = t.machine.on_done(t.done_digest)  # the held early DONE, answered now
            state, why = (State.DONE, "") if ok else (State.FAILED, t.machine.status.reason)
            finished = tuple(a for a in self.end(h.transfer_id, state, why, now,
                                                 notify=F.COMPLETE if ok else F.ERROR)
                             if isinstance(a, (Ended, Send)))
        return ChunkResult(reply, verdict.layers_ready, now, ended, finished=finished)

    def chunk_abandoned(self, t: RxTransfer, lane: int, h: Header, now: float) -> ChunkResult:
        """The admitted copy broke off mid-read (its lane died)."""
        lost = None
        if t.machine.abandon(h.chunk) and not self._over:  # the copy dropped meanwhile is gone too: ask for another
            lost = self._send(F.NACK, {"tid": h.transfer_id, "c": [h.chunk], "lost": True}, now)
        return ChunkResult(None, ended=self._writer_left(t, lane), lost=lost)

    # ---- the last layer's parity groups (``codec.parity``): its chunks are read into the driver's scratch rows first
    def tail_data(self, t: RxTransfer, lane: int, h: Header, computed: int | None, now: float) -> TailStep:
        """An admitted data chunk of a parity group is in its scratch row (``computed``: its xxh3_64, None
        when unhashed). ``place``: copy the row into the destination (lane ``lane`` writes into the transfer
        now), then call ``chunk_done``; else send ``reply`` (if any). Then rebuild ``rebuild``."""
        self._reader_left(t, lane)
        verdict = t.machine.tail_read(h, computed)
        reply = None
        if verdict == "place":
            t.writers += 1
            t.writing.add(lane)
        elif self._over:
            pass
        elif verdict == "bad":
            self._counts["chunks_rejected"] += 1
            reply = self._send(F.NACK, {"tid": h.transfer_id, "c": [h.chunk]}, now)
        elif t.machine.verified[h.chunk] and self.transfers.get(h.transfer_id) is t:
            reply = self._send(F.ACK, {"tid": h.transfer_id, "c": [h.chunk]}, now)
        return TailStep(verdict == "place", reply, self._claim(t, h.chunk))

    def tail_parity(self, t: RxTransfer, lane: int, h: Header, computed: int | None,
                    digests: tuple[int, ...]) -> TailStep:
        """An admitted parity chunk is in its scratch row, ``digests`` its trailer: what to rebuild now."""
        self._reader_left(t, lane)
        if not t.machine.parity_read(h, computed, digests):
            if not t.machine.state.terminal:
                self._counts["parity_rejected"] += 1  # (failed its hash)
            return TailStep(False, None, ())
        self._counts["parity_chunks"] += 1
        return TailStep(False, None, self._claim(t, h.chunk))

    def tail_abandoned(self, t: RxTransfer, lane: int, h: Header, now: float) -> Send | None:
        """The admitted copy of a parity group's chunk broke off mid-read (it wrote no destination byte): the
        NACK asking for a copy dropped meanwhile, if any."""
        self._reader_left(t, lane)
        if t.machine.tail_abandoned(h.chunk) and not self._over:
            return self._send(F.NACK, {"tid": h.transfer_id, "c": [h.chunk], "lost": True}, now)
        return None

    def rebuild_failed(self, t: RxTransfer, chunks: tuple[int, ...], now: float) -> ChunkResult:
        """Rebuilding ``chunks`` broke off, or a rebuilt one failed its check: their group is not rebuilt again,
        and those not verified nor being read are asked for again (NACK ``lost``: a copy that arrived
        meanwhile was drained for the rebuild)."""
        self._counts["rebuilds_failed"] += len(chunks)
        t.machine.rebuild_failed(chunks)
        ended = None
        for _ in chunks:
            ended = self._writer_left(t, REBUILDER) or ended
        again = [c for c in chunks if not t.machine.verified[c] and c not in t.machine.writing]
        lost = None
        if again and not self._over and not t.machine.state.terminal:
            lost = self._send(F.NACK, {"tid": t.manifest.transfer_id, "c": again, "lost": True}, now)
        return ChunkResult(None, ended=ended, lost=lost)

    def tail_place_failed(self, t: RxTransfer, lane: int, h: Header, now: float) -> ChunkResult:
        """Copying a verified row into its destination broke off: the row is dropped and the chunk asked for
        again (NACK ``lost``); lane ``lane`` writes no more."""
        t.machine.place_failed(h.chunk)
        lost = None
        if not self._over and not t.machine.state.terminal:
            lost = self._send(F.NACK, {"tid": h.transfer_id, "c": [h.chunk], "lost": True}, now)
        return ChunkResult(None, ended=self._writer_left(t, lane), lost=lost)

    def _reader_left(self, t: RxTransfer, lane: int) -> None:
        t.scratch_readers.discard(lane)
        tid = t.manifest.transfer_id
        if not t.scratch_readers and self.lingering.get(tid) is t:
            del self.lingering[tid]
            self.held -= t.manifest.tail_scratch_bytes

    def tail_claim(self, t: RxTransfer, chunk: int) -> tuple[int, ...]:
        """After a data chunk of a parity group was placed and verified: the chunks of its group to rebuild
        now (each then written by ``REBUILDER``, or released with ``rebuild_failed``)."""
        return self._claim(t, chunk)

    def _claim(self, t: RxTransfer, chunk: int) -> tuple[int, ...]:
        out = t.machine.claim_rebuild(chunk)
        t.writers += len(out)  # each is written into the destination by the rebuilder (``REBUILDER``)
        return out

    def _writer_left(self, t: RxTransfer, lane: int) -> Ended | None:
        t.writers -= 1
        t.writing.discard(lane)
        if t.writers or t.pending is None:
            return None
        self.pending.pop(t.manifest.transfer_id, None)
        state, reason = t.pending
        t.pending = None
        return Ended(t.manifest.transfer_id, state, reason)

    def _send(self, kind: str, body: dict[str, Any], now: float) -> Send:
        """Every frame the engine sends goes through here (never once ``Fail`` was returned)."""
        assert not self._over
        self.last_sent = now
        return Send(kind, body)
