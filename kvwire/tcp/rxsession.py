"""One receiver session: its transfers from admission to a terminal state, and its data lanes.

Owns: ``RxSession`` (the per-session table of transfers and recently ended ids, the lanes by index, the
control replies it sends), ending a transfer (a handle resolves only once no lane writes into it),
closing the session, the sender's DONE and CANCEL, reading a lane's chunks into their destinations
with hash checks and ACK/NACK, and cutting a lane stuck mid-chunk of an ended transfer. Drives the
sans-IO ``ReceiverTransfer`` inside each ``IncomingTransfer`` under the session lock. Must not know:
listening, handshakes or authentication, destinations (the receiver admits a transfer and hands over its
views), receiver-wide limits, torch/cupy, congestion control.
"""

from __future__ import annotations

import socket
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import xxhash

from ..codec import frames as F
from ..codec.layout import ModelLayout
from ..codec.messages import parse_done, parse_end
from ..codec.transfer import State
from ..errors import ProtocolError
from .auth import SessionKeys
from .incoming import IncomingTransfer
from .wire import Channel, drain, recv_exact_into


@dataclass
class RxSession:
    """One authenticated session: its control channel, lanes, transfers in flight and recently ended."""

    keys: SessionKeys
    ctrl: Channel
    peer: str
    count: Callable[..., None]  # ``count(key, n=1)``: the receiver's stats counters
    peer_timeout: float  # a chunk's body that stops arriving for this long costs its lane
    lock: threading.Lock = field(default_factory=threading.Lock)
    lanes: dict[int, Channel] = field(default_factory=dict)
    transfers: dict[int, IncomingTransfer] = field(default_factory=dict)
    ended: OrderedDict[int, None] = field(default_factory=OrderedDict)
    layouts: dict[bytes, ModelLayout] = field(default_factory=dict)
    pending: set[IncomingTransfer] = field(default_factory=set)  # ended, a lane still writing
    last_seen: float = field(default_factory=time.monotonic)
    last_sent: float = field(default_factory=time.monotonic)
    closed: bool = False

    def send(self, kind: str, body: dict[str, Any] | None = None) -> None:
        try:
            self.ctrl.send(kind, body)
            self.last_sent = time.monotonic()
        except OSError:
            pass  # the control reader notices the dead connection and fails the session

    def cancelled_by_sender(self, body: dict[str, Any]) -> None:
        tid, state, why = parse_end(body, F.CANCEL)
        h = self.transfers.get(tid)  # a local of its own frame: not held until the next message
        if h is not None and state is State.TIMED_OUT:
            self.end(h, State.TIMED_OUT, f"sender timed out: {why}")
        elif h is not None and state is State.FAILED:  # the sender's failure, with its reason
            self.end(h, State.FAILED, f"sender failed the transfer: {why}")
        elif h is not None:
            self.end(h, State.CANCELLED, f"cancelled by sender: {why}")

    def done(self, body: dict[str, Any]) -> None:
        tid, digest = parse_done(body)
        h = self.transfers.get(tid)
        if h is None or h._sm is None:
            return  # ended already (cancelled, timed out): the sender was told
        with self.lock:
            ok = h._sm.on_done(digest)
            reason = h._sm.status.reason
        if ok:
            self.end(h, State.DONE, "", notify=F.COMPLETE)
        else:
            self.end(h, State.FAILED, reason, notify=F.ERROR)

    def end(self, h: IncomingTransfer, state: State, reason: str, notify: str | None = None) -> None:
        """Move a transfer to a terminal state; the handle resolves once no lane writes into it."""
        tid = h.manifest.transfer_id if h.manifest is not None else None
        with self.lock:
            if h._sm is not None:
                h._sm.status.end(state, reason)
            if tid is not None and self.transfers.pop(tid, None) is not None:
                assert h.manifest is not None
                self.count(f"{'probes' if h.manifest.sink else 'transfers'}_{state.value}")
                self.ended[tid] = None
                while len(self.ended) > 4096:
                    self.ended.popitem(last=False)
            resolve_now = h._writers == 0
            if not resolve_now and h._pending is None:
                h._pending, h._pending_since = (state, reason), time.monotonic()
                self.pending.add(h)
        if resolve_now:
            h._finish(state, reason)
        if notify is not None and tid is not None:
            self.send(notify, {"tid": tid, "reason": reason, "state": state.value})

    def close(self, reason: str) -> None:
        """Fail every transfer in flight with ``reason`` and close the session's connections (once)."""
        with self.lock:
            if self.closed:
                return
            self.closed = True
            handles = list(self.transfers.values())
            lanes = list(self.lanes.values())
        for h in handles:
            self.end(h, State.FAILED, reason)
        self.ctrl.close()
        for ch in lanes:
            ch.close()

    def read_lane(self, ch: Channel, lane: int) -> None:
        """Read chunks into their destinations. An idle lane may wait for its next header forever (the
        session's monitor owns idleness; a header holds nothing), but a peer that stops sending a
        chunk's body for ``peer_timeout`` costs the lane, so a half-read chunk never holds its transfer."""
        scratch = memoryview(bytearray(256 * 1024))
        sock = ch.sock
        while True:
            sock.settimeout(None)
            h = ch.read_header()
            sock.settimeout(self.peer_timeout)
            if h.kind == F.KIND_CONTROL:
                kind, _ = ch.read_control_body(h)
                if kind == F.BYE:
                    return
                raise ProtocolError(f"unexpected {kind!r} on a data lane")
            self._read_chunk(ch, lane, h, sock, scratch)

    def _read_chunk(self, ch: Channel, lane: int, h: F.Header, sock: socket.socket,
                    scratch: memoryview) -> None:
        """One data chunk: into its destination, verified, acked. Its own frame, so that nothing of a
        transfer (handle, destination view) stays referenced while the lane waits for the next header."""
        with self.lock:
            t = self.transfers.get(h.transfer_id)
            if t is None or t._sm is None:
                if h.transfer_id not in self.ended:
                    raise ProtocolError(f"chunk for unknown transfer {h.transfer_id}")
                write = False
            else:
                write = t._sm.admit(h)
                if write:
                    t._writers += 1
                    t._writing.add(ch)
        if not write:
            drain(sock, h.length, scratch)
            if t is not None and t._sm is not None:
                if t._sm.verified[h.chunk]:
                    self.send(F.ACK, {"tid": h.transfer_id, "c": [h.chunk]})
                elif h.chunk in t._sm.writing:  # the verdict on the copy being read answers both
                    self.send(F.NACK, {"tid": h.transfer_id, "c": [h.chunk], "held": True})
            return
        assert t is not None and t.plan is not None and t._sm is not None
        verdict = None
        try:
            pieces = t.plan.pieces(h.chunk)
            hasher = xxhash.xxh3_64() if len(pieces) > 1 and t._sm.manifest.hashed else None
            computed: int | None = None
            for seg, a, b in pieces:
                view = t.views[seg][a:b]
                recv_exact_into(sock, view)
                if hasher is not None:
                    hasher.update(view)
                elif t._sm.manifest.hashed:
                    computed = xxhash.xxh3_64_intdigest(view)
            if hasher is not None:
                computed = hasher.intdigest()
            with self.lock:
                verdict = t._sm.received(h, computed)
        finally:
            with self.lock:
                resend = verdict is None and t._sm.abandon(h.chunk)
                t._writers -= 1
                t._writing.discard(ch)
                pending = t._pending if t._writers == 0 else None
                if pending is not None:
                    self.pending.discard(t)
            if pending is not None:
                t._finish(*pending)
            if resend:  # the copy this lane dropped is gone too: ask for another
                self.send(F.NACK, {"tid": h.transfer_id, "c": [h.chunk], "lost": True})
        assert verdict is not None
        with t._cond:
            t._lane_bytes[lane] = t._lane_bytes.get(lane, 0) + h.length
        if not verdict.ack:
            self.count("chunks_rejected")
        else:
            self.count("probe_bytes_received" if t._sm.manifest.sink else "bytes_received", h.length)
        now = time.monotonic()
        for layer in verdict.layers_ready:  # before the ACK: DONE must find every layer ready
            t._layer_ready(layer, now)
        self.send(F.ACK if verdict.ack else F.NACK, {"tid": h.transfer_id, "c": [h.chunk]})

    def unstick(self, now: float) -> None:
        """A transfer that ended while a lane was mid-chunk: give the chunk 2 s, then cut the lane."""
        with self.lock:
            stuck = [ch for h in self.pending if now - h._pending_since > 2.0 for ch in h._writing]
        for ch in stuck:
            ch.close()
