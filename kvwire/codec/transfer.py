"""Transfer state machines for both ends, sans-IO.

Owns: which chunks are ready, in flight, verified or acknowledged; when a layer is complete; the
whole-transfer digest; the one-way move to exactly one terminal state. Must not know: sockets,
threads, clocks or buffers. The I/O layer calls these under its own lock and acts on what they return.
"""

from __future__ import annotations

import enum
import struct
from collections import deque
from dataclasses import dataclass, field

import xxhash

from ..errors import ProtocolError
from .frames import Header
from .manifest import Manifest
from .plan import ChunkPlan, check_chunk


class State(enum.Enum):
    ACTIVE = "active"
    DONE = "done"
    FAILED = "failed"
    TIMED_OUT = "timed_out"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self is not State.ACTIVE


#: the terminal states' values, in declaration order (counters and metrics are keyed by them)
TERMINAL_STATES: tuple[str, ...] = tuple(s.value for s in State if s.terminal)


def terminal_counter(state: State, sink: bool) -> str:
    """The counter a transfer ending in ``state`` adds one to: ``probes_<state>`` for a sink transfer (a
    capacity probe), ``transfers_<state>`` for any other. Both engines count their ends under these keys."""
    return f"{'probes' if sink else 'transfers'}_{state.value}"


#: every ``terminal_counter`` key: transfers' first, then probes', each in ``TERMINAL_STATES`` order
TERMINAL_COUNTERS: tuple[str, ...] = tuple(terminal_counter(s, sink) for sink in (False, True)
                                           for s in State if s.terminal)

def transfer_digest(hashes: list[int]) -> int:
    """Whole-transfer digest: xxh3_64 over the chunk hashes in chunk order."""
    return xxhash.xxh3_64_intdigest(struct.pack(f"<{len(hashes)}Q", *hashes))


@dataclass
class _Terminal:
    state: State = State.ACTIVE
    reason: str = ""

    def end(self, state: State, reason: str = "") -> bool:
        """Move to a terminal state once; later calls are ignored and return False."""
        if self.state.terminal:
            return False
        self.state, self.reason = state, reason
        return True


# ---------------------------------------------------------------- receiver


@dataclass(frozen=True)
class ChunkVerdict:
    ack: bool  # False: NACK, ask for a re-send
    layers_ready: tuple[int, ...] = ()
    all_verified: bool = False


@dataclass
class ReceiverTransfer:
    manifest: Manifest
    plan: ChunkPlan
    status: _Terminal = field(default_factory=_Terminal)

    def __post_init__(self) -> None:
        n = self.plan.num_chunks
        self.verified = bytearray(n)
        self.hashes = [0] * n
        self.remaining = n
        self.layer_remaining = {layer: len(r) for layer, r in self.plan.layer_chunks.items()}
        self.layers_done: set[int] = set()
        self.bad_chunks = 0
        self.writing: set[int] = set()  # chunks a lane is reading into the destination now (one writer each)
        self.dropped: set[int] = set()  # of those, chunks whose other copy was drained meanwhile
        # The last layer's parity groups (``codec.parity``): their chunks, data and parity, are read into the
        # driver's scratch rows (a lane stalled mid-chunk then holds no destination byte), then data rows are placed.
        self.groups = self.manifest.tail_groups
        self.rows = bytearray(self.groups.rows if self.groups else 0)  # by row: verified in scratch (data: or placed)
        self.placing: set[int] = set()  # data chunks of the groups being copied from their row into place
        self.rebuilding: set[int] = set()  # data chunks of the groups being rebuilt from the other rows
        self.parity_reading: set[int] = set()  # parity chunks a lane is reading now
        self.tail_digests: dict[int, tuple[int, ...]] = {}  # by group: its data digests, from a verified parity
        self.unrebuildable: set[int] = set()  # groups whose rebuild failed: their copies on the wire answer

    @property
    def state(self) -> State:
        return self.status.state

    def admit(self, h: Header) -> bool:
        """A chunk header arrived. True: read it into the destination, then call ``received`` (or
        ``abandon`` if the read broke off). False: drain and drop it.

        One writer per chunk: a copy of a chunk that is verified, or that another copy is being read
        into right now (a re-send after a lane was presumed dead), is dropped, so a verified byte is
        never overwritten and two copies never interleave. Raises ProtocolError when the header does
        not name a planned chunk of this transfer.
        """
        g = self.groups
        if g is not None and g.is_parity(h.chunk):
            g.check_parity_header(h)
            if self.manifest.hashed and not h.flags & 1:
                raise ProtocolError(f"parity chunk {h.chunk} carries no hash on a hashed transfer")
            if self.state is not State.ACTIVE or self.rows[g.row(h.chunk)] or h.chunk in self.parity_reading:
                return False
            self.parity_reading.add(h.chunk)
            return True
        check_chunk(self.plan, h.chunk, h.offset, h.length, h.layer)
        if self.manifest.hashed and not h.flags & 1:
            raise ProtocolError(f"chunk {h.chunk} carries no hash on a hashed transfer")
        if self.state is not State.ACTIVE or self.verified[h.chunk] or h.chunk in self.rebuilding:
            return False
        if h.chunk in self.writing:
            self.dropped.add(h.chunk)
            return False
        self.writing.add(h.chunk)
        return True

    def abandon(self, chunk: int) -> bool:
        """The admitted copy of ``chunk`` broke off mid-read (its lane died). True: another copy was
        dropped meanwhile, so the sender may hold it as in flight: the caller asks for a re-send."""
        self.writing.discard(chunk)
        if chunk in self.dropped:
            self.dropped.discard(chunk)
            return not self.verified[chunk] and not self.state.terminal
        return False

    # ---- the last layer's parity groups (``codec.parity``)
    def in_tail(self, chunk: int) -> bool:
        """``chunk`` (a wire index) is read into a scratch row, not into its destination."""
        return self.groups is not None and self.groups.covers(chunk)

    def parity_read(self, h: Header, computed: int | None, digests: tuple[int, ...]) -> bool:
        """An admitted parity chunk is in its row; ``digests``: its trailer. False: it failed its hash (the
        row stays empty; parity is never sent again)."""
        self.parity_reading.discard(h.chunk)
        assert self.groups is not None
        if self.state.terminal or (self.manifest.hashed and computed != h.digest):
            return False
        self.rows[self.groups.row(h.chunk)] = 1
        self.tail_digests.setdefault(self.groups.group(h.chunk), digests)
        return True

    def tail_read(self, h: Header, computed: int | None) -> str:
        """An admitted data chunk of the group is in its row, ``computed`` its xxh3_64 (None: unhashed).
        ``"place"``: copy it into its destination, then call ``received``; ``"bad"``: it failed its hash
        (``received`` was called: NACK it); ``"dup"``: it is verified or rebuilt meanwhile, or the transfer
        ended (answer as a drained copy)."""
        assert self.groups is not None
        if self.state.terminal or self.verified[h.chunk] or h.chunk in self.rebuilding:
            self.writing.discard(h.chunk)
            self.dropped.discard(h.chunk)
            return "dup"
        if self.manifest.hashed and computed != h.digest:
            self.received(h, computed)
            return "bad"
        self.rows[self.groups.row(h.chunk)] = 1
        self.placing.add(h.chunk)
        return "place"

    def place_failed(self, chunk: int) -> None:
        """Copying ``chunk``'s verified row into place broke off: the row is dropped (its group counts it
        missing again) and the chunk waits for another copy."""
        assert self.groups is not None
        self.placing.discard(chunk)
        self.writing.discard(chunk)
        self.dropped.discard(chunk)
        self.rows[self.groups.row(chunk)] = 0

    def tail_abandoned(self, chunk: int) -> bool:
        """The admitted copy of a group chunk broke off mid-read: as ``abandon``."""
        if chunk in self.parity_reading:
            self.parity_reading.discard(chunk)
            return False
        return self.abandon(chunk)

    def claim_rebuild(self, chunk: int) -> tuple[int, ...]:
        """The data chunks of ``chunk``'s group to rebuild now: those neither verified, placed nor being
        rebuilt whose rows are empty, once ``k`` of the group's chunks are in: its verified data chunks (in
        their destination, where the rebuild reads them) and verified parity rows (one at least, and its
        digests known on a hashed transfer); each is then being rebuilt until ``received`` (or
        ``rebuild_failed``)."""
        g = self.groups
        if g is None or self.state.terminal or g.group(chunk) in self.unrebuildable:
            return ()
        i = g.group(chunk)
        have = self.present(i)
        if len(have) < g.k(i) or not g.is_parity(have[-1]):  # (parity last: none unless the last one is)
            return ()
        if self.manifest.hashed and i not in self.tail_digests:
            return ()
        out = tuple(c for c in g.data(i) if not self.verified[c] and not self.rows[g.row(c)]
                    and c not in self.rebuilding and c not in self.placing)
        self.rebuilding.update(out)
        return out

    def present(self, group: int) -> list[int]:
        """What a rebuild of ``group`` reads: its verified data chunks (in their destination), then its verified
        parity chunks (in their rows)."""
        g = self.groups
        assert g is not None
        return [*(c for c in g.data(group) if self.verified[c]),
                *(c for c in g.parity(group) if self.rows[g.row(c)])]

    def rebuild_failed(self, chunks: tuple[int, ...]) -> None:
        """Rebuilding ``chunks`` broke off, or a rebuilt one failed its check: their copies on the wire answer
        for them, and their group is not rebuilt again."""
        self.rebuilding.difference_update(chunks)
        assert self.groups is not None
        self.unrebuildable.update(self.groups.group(c) for c in chunks)

    def received(self, h: Header, computed: int | None) -> ChunkVerdict:
        """The admitted copy's bytes are in place; ``computed`` is their xxh3_64 (None when hashing is
        off). A NACK answers every copy of the chunk, a dropped one included. A chunk of a parity group
        comes here once placed from its row or rebuilt."""
        self.writing.discard(h.chunk)
        self.dropped.discard(h.chunk)
        self.placing.discard(h.chunk)
        self.rebuilding.discard(h.chunk)
        if self.state.terminal or self.verified[h.chunk]:
            return ChunkVerdict(ack=True)
        if self.manifest.hashed and computed != h.digest:
            self.bad_chunks += 1
            return ChunkVerdict(ack=False)
        self.verified[h.chunk] = 1
        self.hashes[h.chunk] = h.digest if self.manifest.hashed else 0
        self.remaining -= 1
        self.layer_remaining[h.layer] -= 1
        ready: tuple[int, ...] = ()
        if self.layer_remaining[h.layer] == 0:
            self.layers_done.add(h.layer)
            ready = (h.layer,)
        return ChunkVerdict(ack=True, layers_ready=ready, all_verified=self.remaining == 0)

    def on_done(self, digest: int) -> bool:
        """Sender says every chunk was acknowledged. True: done; False: failed (see status.reason)."""
        if self.state.terminal:
            return self.state is State.DONE
        if self.remaining:
            self.status.end(State.FAILED, f"sender finished with {self.remaining} chunks unverified")
            return False
        if self.manifest.hashed and digest != transfer_digest(self.hashes):
            self.status.end(State.FAILED, "whole-transfer digest mismatch")
            return False
        self.status.end(State.DONE)
        return True


# ---------------------------------------------------------------- sender

_WAITING, _QUEUED, _INFLIGHT, _ACKED = 0, 1, 2, 3
#: times one chunk may be asked for again as ``lost`` (its copy broke off as a lane died: no failed check, so
#: not a retry): generous for lanes that really die, a bound for a receiver that says it of every chunk (a
#: 46 MB transfer was re-sent 1,200 times over, 56.7 GB in 15 s, and with no deadline for ever)
MAX_LOST_RESENDS = 16


@dataclass
class SenderTransfer:
    manifest: Manifest
    plan: ChunkPlan
    max_retries: int = 3
    status: _Terminal = field(default_factory=_Terminal)

    def __post_init__(self) -> None:
        n = self.plan.num_chunks
        self.chunk_state = bytearray(n)
        self.hashes = [0] * n
        self.retries = [0] * n
        self.lost = [0] * n  # times each chunk was asked for again as lost (``MAX_LOST_RESENDS``)
        self.queue: deque[int] = deque()
        self.unacked = n
        self.unsent = n  # chunks not yet sent once
        self._sent_once = bytearray(n)
        self.accepted = False
        self.layers_written: set[int] = set()
        self.done_sent = False
        self._layer_unacked = {layer: len(r) for layer, r in self.plan.layer_chunks.items()}
        self.acked_layers: list[int] = []  # layers whose every chunk the receiver verified, in that order
        #: the last layer's parity groups (``codec.parity``): their parity chunks (indices from ``num_chunks``)
        #: go out once each, unacknowledged, never re-sent, as soon as every data chunk of the layer was taken:
        #: behind the data on every lane, so parity never delays a data byte, and it lands about one parity
        #: chunk's wire time after the data (a lane a loss held back lands up to a round trip after it). They
        #: go in waves, each group's first parity chunk before any group's second: one lane held back (the
        #: common case) misses a chunk of every group, and the first wave lands first and rebuilds them all
        self.groups = self.manifest.tail_groups
        self._untaken = self.groups.count if self.groups else 0
        self._taken = bytearray(n)
        self._parity: deque[int] = deque()

    @property
    def state(self) -> State:
        return self.status.state

    def layer_ready(self, layer: int) -> None:
        if layer in self.layers_written:
            raise ValueError(f"layer {layer} written twice")
        self.layers_written.add(layer)
        for c in self.plan.layer_chunks.get(layer, ()):
            self.chunk_state[c] = _QUEUED
            self.queue.append(c)

    def next_chunk(self, early: int = 0) -> int | None:
        """The next chunk a lane should send, or None (nothing ready, ended, or not accepted and the next
        chunk is longer than ``early``: the payload bytes the receiver's early window still allows)."""
        if self.state.terminal or (not self.accepted and early <= 0):
            return None
        if self._parity and self.accepted:  # the layer's parity, behind its data
            return self._parity.popleft()
        queue = self.queue
        while queue:
            c = queue[0]
            if self.chunk_state[c] != _QUEUED:
                queue.popleft()
                continue
            if not self.accepted and self.plan.lengths[c] > early:
                return None
            queue.popleft()
            self.chunk_state[c] = _INFLIGHT
            g = self.groups
            if g is not None and g.covers(c) and not self._taken[c]:
                self._taken[c] = 1
                self._untaken -= 1
                if not self._untaken:  # in waves: every group's first parity chunk, then every group's second...
                    self._parity.extend(g.parity(i)[j] for j in range(g.m) for i in range(g.groups))
            return c
        return None

    def has_ready(self) -> bool:
        return self.accepted and not self.state.terminal and bool(self.queue or self._parity)

    def sent(self, chunk: int, digest: int) -> None:
        if chunk >= self.plan.num_chunks:
            return  # parity: not part of the whole-transfer digest
        self.hashes[chunk] = digest
        if not self._sent_once[chunk]:
            self._sent_once[chunk] = 1
            self.unsent -= 1

    def done_early(self) -> bool:
        """True once, as the last chunk goes out for the first time: the caller sends DONE with ``digest()``
        now, before the ACKs, to a receiver that holds it until every chunk is verified (``done_early`` in
        its WELCOME limits). Every chunk's hash is known then; a re-send (NACK, a lane lost) carries the same
        bytes, so the same hash."""
        if self.unsent or self.done_sent or self.state.terminal:
            return False
        self.done_sent = True
        return True

    def done_due(self) -> bool:
        """True once, when every chunk is acknowledged and its hash known: the caller sends DONE with
        ``digest()``. A chunk the receiver rebuilt from tail parity is acknowledged without its copy, and can
        be before the lane that took it (the last data chunk: taking it let the parity go) hashed it: DONE
        then waits for that lane's ``sent`` (it went with the last ACK and a 0 for that hash: the receiver
        failed the transfer, "whole-transfer digest mismatch")."""
        if self.unacked or self.unsent or self.done_sent or self.state.terminal:
            return False
        self.done_sent = True
        return True

    def on_ack(self, chunks: list[int]) -> bool:
        """True when this ack completes the set (``done_due``): the caller sends DONE with ``digest()``. Layers
        it completes are appended to ``acked_layers`` (their source buffers are no longer needed)."""
        for c in chunks:
            if not 0 <= c < len(self.chunk_state):
                raise ProtocolError(f"ack for chunk {c} outside plan")
            if self.chunk_state[c] == _INFLIGHT:
                self.chunk_state[c] = _ACKED
                self.unacked -= 1
                layer = self.plan.layers[c]
                self._layer_unacked[layer] -= 1
                if self._layer_unacked[layer] == 0:
                    self.acked_layers.append(layer)
        return self.done_due()

    def on_complete(self) -> None:
        """The receiver verified every chunk (COMPLETE): layers whose last ACK it had not read yet (an early
        DONE's COMPLETE can overtake an ACK another lane's thread was still writing) count as acked, in
        plan order."""
        for layer, chunks in self.plan.layer_chunks.items():
            if chunks and self._layer_unacked[layer] > 0:
                self._layer_unacked[layer] = 0
                self.acked_layers.append(layer)

    def on_nack(self, chunks: list[int], lost: bool = False) -> None:
        """The receiver wants these chunks again: they failed verification, or (``lost``) the copy it
        was reading broke off while it dropped another, which does not count as a retry (``MAX_LOST_RESENDS``
        of those per chunk at most)."""
        for c in chunks:
            if not 0 <= c < len(self.chunk_state):
                raise ProtocolError(f"nack for chunk {c} outside plan")
            if self.chunk_state[c] != _INFLIGHT:
                continue
            if lost:
                self.lost[c] += 1
                if self.lost[c] > MAX_LOST_RESENDS:
                    self.status.end(State.FAILED, f"the receiver asked for chunk {c} again as lost "
                                                  f"{self.lost[c]} times")
                    return
            else:
                self.retries[c] += 1
                if self.retries[c] > self.max_retries:
                    self.status.end(State.FAILED, f"chunk {c} failed verification {self.retries[c]} times")
                    return
            self.chunk_state[c] = _QUEUED
            self.queue.appendleft(c)

    def requeue(self, chunks: list[int]) -> None:
        """A lane died with these chunks in flight: send them again on another lane."""
        for c in chunks:
            if self.chunk_state[c] == _INFLIGHT:
                self.chunk_state[c] = _QUEUED
                self.queue.appendleft(c)

    def digest(self) -> int:
        return transfer_digest(self.hashes) if self.manifest.hashed else 0
