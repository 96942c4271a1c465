"""The sending end: a session of one control connection plus N data lanes, reused across transfers.

Owns: ``Session`` (the public object) and ``connect``; the shared chunk queue (lanes pull, so a slow lane
takes fewer chunks; transfers are interleaved round-robin), per-lane in-flight tracking, re-sending the
chunks of a lane that died or stalled on the others while its thread re-dials it, the control
connection's messages, heartbeats and deadlines, and (``reconnect=True``) re-establishing the whole
session after a failure, one connection generation of threads at a time. Dialling, authenticating and a
lane's own stall signs are ``lanes.py``'s. Drives the sans-IO ``SenderTransfer``; user callbacks go to a
``Callbacks`` pool. Must not know: torch/cupy, congestion policy (it exposes its lane sockets, and hands
its ``link_control`` argument to ``kvwire.congestion.control.for_session`` or a ``LaneGroup``).
"""

from __future__ import annotations

import itertools
import logging
import os
import socket
import ssl
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from typing import Any

import xxhash

from ..codec import frames as F
from ..codec.layout import ModelLayout, RequestSpec
from ..codec.manifest import build_manifest
from ..codec.plan import DEFAULT_CHUNK
from ..codec.transfer import TERMINAL_STATES, SenderTransfer, State
from ..congestion.control import LinkControl, for_session
from ..congestion.controller import ControllerConfig
from ..congestion.group import LaneGroup
from ..errors import KvwireError, ProtocolError
from .auth import SessionKeys
from .callbacks import Callbacks
from .lanes import Dialer, Lane, LaneHook, LaneInfo
from .outgoing import OutgoingTransfer
from .wire import send_parts

log = logging.getLogger("kvwire.tcp")

#: test-only fault hook: called with (lane index, transfer id, chunk, payload pieces) before a send;
#: may return replacement pieces (to corrupt a chunk in flight). Never set in production.
FaultHook = Callable[[int, int, int, list[memoryview]], "list[memoryview] | None"]
#: lanes dialled at once when a session opens or grows (see ``Dialer.dial_each``); read at each dial
DIAL_CONCURRENCY = 16
_STAT_KEYS = ("chunks_nacked", "chunks_requeued", "lane_reconnects", "session_reconnects",
              *(f"transfers_{t}" for t in TERMINAL_STATES),
              *(f"probes_{t}" for t in TERMINAL_STATES))


class Session:
    """A connection to one receiver: ``send()`` transfers over it, ``close()`` when done.

    Opening it connects and authenticates the control connection and ``lanes`` data connections; it
    raises ``ConnectError`` (an ``OSError``; ``ConnectTimeout`` after ``connect_timeout``) naming
    ``host:port`` when the receiver cannot be reached, ``AuthenticationError`` when the key differs.

    Parameters:
        host: the receiver's address or name (as given to ``Receiver``; IPv4, IPv6 or a DNS name).
        port: the receiver's port (``Receiver.address[1]``).
        lanes: data connections (TCP lanes) opened at once, 1..256; chunks are striped over them.
        key: the pre-shared key the receiver was given (``bytes`` or ``str``); ``None``: none.
        ssl_context: a client ``ssl.SSLContext`` to run every connection over TLS; ``None``: plain TCP.
        server_hostname: the name the receiver's certificate is checked against (default ``host``).
        chunk_size: payload bytes per chunk (each chunk is hashed, acknowledged and re-sent alone).
        hashing: xxh3_64 per chunk, checked by the receiver (a bad chunk is NACKed and re-sent).
        peer_timeout: seconds of silence from the receiver after which transfers and the session fail.
        heartbeat: seconds between heartbeats on an idle control connection.
        connect_timeout: seconds for each TCP connect and the handshake that follows it.
        max_retries: re-sends of one chunk after failed hash checks before its transfer fails.
        limits: the lengths and counts this side accepts from the receiver (``kvwire.Limits``).
        max_lanes: the most lanes ``set_active_lanes`` may grow to (default ``max(lanes, 16)``).
        on_lane_open: ``fn(lane_index, socket)`` called each time a lane connects, before it carries
            data (where ``kvwire.congestion`` applies pacing and the congestion algorithm).
        link_control: congestion control (``kvwire.congestion``): ``True`` (the default) a ``LinkControl``
            of the session's own — lanes probed unpaced first (BBR), then paced just under the measured
            capacity, lanes added while socket windows are the limit, re-probed when it reads low; hands
            off on a LAN (min RTT under 1 ms); ``$KVWIRE_LINK_CONTROL=0`` turns the default off
            process-wide. ``False``: none. A ``ControllerConfig``: one with that policy. A ``LaneGroup``:
            join it, so one ``LinkControl(group)`` measures and paces several sessions to one bottleneck
            together. See ``link_control``.
        reconnect: when the connection to the receiver fails (it died, restarted, went silent), fail the
            transfers in flight as usual (each ends ``failed``, once) but keep the session: it dials
            the receiver again in the background (backing off up to 2 s between tries) until it is back
            or ``close()``; ``send`` meanwhile waits up to ``connect_timeout`` for it, then raises.
            Without it the session is closed for good (``closed``, ``failure``).

    A lane that fails to open is retried at once; if it fails again the session opens with the lanes
    that did and keeps re-dialling the missing ones for ``peer_timeout``. Only when no lane opens does
    opening fail.
    """

    def __init__(self, host: str, port: int, *, lanes: int = 4, key: bytes | str | None = None,
                 ssl_context: ssl.SSLContext | None = None, server_hostname: str | None = None,
                 chunk_size: int = DEFAULT_CHUNK, hashing: bool = True, peer_timeout: float = 10.0,
                 heartbeat: float = 1.0, connect_timeout: float = 5.0, max_retries: int = 3,
                 limits: F.Limits = F.DEFAULT_LIMITS, max_lanes: int | None = None,
                 on_lane_open: LaneHook | None = None, reconnect: bool = False,
                 link_control: bool | ControllerConfig | LaneGroup = True) -> None:
        if not 1 <= lanes <= 256:
            raise ValueError("lanes must be in 1..256")
        if max_lanes is not None and not lanes <= max_lanes <= 256:
            raise ValueError("max_lanes must be in lanes..256")
        self.max_lanes = max_lanes if max_lanes is not None else max(lanes, 16)
        self.on_lane_open = on_lane_open
        self._active = lanes  # lanes with index >= this pull no new chunks (set_active_lanes)
        self.address = (host, port)
        self.key = key.encode() if isinstance(key, str) else (key or b"")
        self.ssl_context = ssl_context
        self.server_hostname = server_hostname or host
        self.chunk_size = chunk_size
        self.hashing = hashing
        self.peer_timeout = peer_timeout
        #: a lane with chunks in flight and no sign of the receiver reading it for this long is re-dialled
        #: and its chunks re-sent on the others; also the longest a blocked send waits
        self.stall_timeout = peer_timeout / 2
        self.heartbeat = heartbeat
        self.connect_timeout = connect_timeout
        self.max_retries = max_retries
        self.limits = limits
        self.fault_hook: FaultHook | None = None
        self._cond = threading.Condition()
        self._transfers: dict[int, OutgoingTransfer] = {}
        self._rr: deque[int] = deque()
        self._inflight: dict[tuple[int, int], Lane] = {}
        self._ids = itertools.count(int.from_bytes(os.urandom(4), "little") << 20)
        self._known_layouts: set[bytes] = set()
        self._threads: list[threading.Thread] = []
        self._closed = False
        self.failure = ""
        self.last_seen = time.monotonic()
        self.lanes: list[Lane] = []
        self._counts: Counter[str] = Counter()  # ended transfers by state, re-sends, reconnects (under _cond)
        self._callbacks = Callbacks("tx-callbacks")  # user callbacks never run on a protocol thread
        self.reconnect = reconnect
        self._gen = 0  # connection generation: threads of an older one stop
        self._down = False  # reconnect=True: the connection failed and is being re-established
        self._dialer = Dialer(host, port, key=self.key, ssl_context=ssl_context, server_hostname=self.server_hostname,
                              connect_timeout=connect_timeout, peer_timeout=peer_timeout,
                              stall_timeout=self.stall_timeout, limits=limits, on_lane_open=lambda: self.on_lane_open)
        self._link_control: LinkControl | None = None
        self._group: LaneGroup | None = None
        self._establish(lanes)
        try:
            if isinstance(link_control, LaneGroup):
                self._group = link_control
                link_control.add(self)
            else:
                self._link_control = for_session(self, link_control, lanes, self.max_lanes, host)
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------ public
    @property
    def link_control(self) -> LinkControl | None:
        """The congestion controller this session owns (``link_control=True``, the default, or a
        ``ControllerConfig``), or ``None``: turned off, or handed over to another ``LinkControl`` or a
        ``LaneGroup``. It starts with the first transfer and closes with the session."""
        return self._link_control

    def detach_link_control(self) -> None:
        """Close the controller this session owns, leaving the lanes to another (``LinkControl(session)``
        and ``LaneGroup.add(session)`` call this, so no two controllers drive one session)."""
        ctl, self._link_control = self._link_control, None
        if ctl is not None:
            ctl.close()

    def send(self, layout: ModelLayout, request: RequestSpec, *, timeout: float | None = 300.0,
             hashing: bool | None = None, sink: bool = False) -> OutgoingTransfer:
        """Start a transfer: the manifest goes out now, chunks as layers are written.

        ``sink=True``: a capacity probe (see ``kvwire.probe``): the receiver discards the payload and
        delivers nothing; always unhashed. Refused here when the receiver did not announce
        ``max_probe_bytes`` (an older receiver would treat it as an ordinary transfer).
        """
        total = layout.kv_bytes_per_token() * request.state_position + layout.state_bytes_per_request()
        cap = min(self.limits.max_transfer_bytes, int(self.server_limits.get("max_transfer_bytes", total)))
        if total > cap:
            raise KvwireError(f"transfer of up to {total} bytes exceeds the {cap}-byte limit")
        if sink and "max_probe_bytes" not in self.server_limits:
            raise KvwireError("the receiver does not support sink transfers (it announces no max_probe_bytes)")
        ctl = self._link_control
        if ctl is not None and not sink:
            ctl.start()  # (no thread for a session that never sends; a probe's sinks pause it)
        tid = next(self._ids) & ((1 << 64) - 1)
        hashed = False if sink else self.hashing if hashing is None else hashing
        m = build_manifest(tid, layout, request, self.chunk_size, hashed, sink)
        sm = SenderTransfer(m, m.plan(), self.max_retries)
        h = OutgoingTransfer(self, sm, None if timeout is None else time.monotonic() + timeout)
        with self._cond:
            if self._down and not self._closed:  # reconnect=True: give the session a moment to come back
                self._cond.wait_for(lambda: not self._down or self._closed, self.connect_timeout)
            if self._closed:
                raise KvwireError(f"session closed: {self.failure or 'closed'}")
            if self._down:
                raise KvwireError(f"session reconnecting (it failed: {self.failure})")
            self._transfers[tid] = h
            self._rr.append(tid)
            with_layout = m.fingerprint not in self._known_layouts
            self._known_layouts.add(m.fingerprint)
            ctrl, gen = self.ctrl, self._gen
        try:
            ctrl.send(F.BEGIN, m.to_wire(with_layout=with_layout))
        except OSError as e:
            self._fail_session(f"control connection lost: {e}", gen)
        return h

    @property
    def closed(self) -> bool:
        """True once ``close()`` ran or the session failed (``failure`` says why; with ``reconnect``
        only ``close()`` closes it); ``send`` then raises."""
        return self._closed

    @property
    def keys(self) -> SessionKeys:
        """The keys of the current connection generation (its session id): lanes authenticate with them."""
        assert self._dialer.keys is not None  # set by the handshake that opened the session
        return self._dialer.keys

    @property
    def healthy(self) -> bool:
        """Open, connected, and at least one lane up: a new transfer can make progress now."""
        return not self._closed and not self._down and self.alive_lanes > 0

    @property
    def alive_lanes(self) -> int:
        return sum(1 for lane in self.lanes if lane.alive)

    @property
    def active_lanes(self) -> int:
        """How many lanes pull chunks (``set_active_lanes``); parked lanes stay connected."""
        return self._active

    def stats(self) -> dict[str, int]:
        """Cumulative counters since the session opened, for metrics: ``bytes_sent``/``chunks_sent``
        (payload put on the lanes, re-sends included), ``chunks_nacked`` (failed the receiver's hash
        check), ``chunks_requeued`` (in flight on a lane that died), ``lane_reconnects``, ``session_reconnects``,
        ``transfers_<state>`` and ``probes_<state>`` per terminal state; and the current
        ``transfers_in_flight``, ``lanes_alive``, ``lanes_active``. Cheap: reads single-writer counters."""
        with self._cond:
            out = {k: 0 for k in _STAT_KEYS}
            out.update(self._counts)
            out["transfers_in_flight"] = len(self._transfers)
            lanes = list(self.lanes)
        out["bytes_sent"] = sum(lane.bytes_sent for lane in lanes)
        out["chunks_sent"] = sum(lane.chunks_sent for lane in lanes)
        out["lanes_alive"] = sum(1 for lane in lanes if lane.alive)
        out["lanes_active"] = self._active
        return out

    @property
    def busy(self) -> bool:
        """A transfer (or probe) is in flight: its lanes carry, or are about to carry, data."""
        with self._cond:
            return bool(self._transfers)

    def lane_sockets(self) -> list[socket.socket]:
        """The live sockets of the active lanes (for TCP_INFO probing and pacing by kvwire.congestion)."""
        with self._cond:
            return [lane.ch.sock for lane in self.lanes
                    if lane.alive and lane.index < self._active]

    def lane_info(self) -> list[LaneInfo]:
        """A snapshot of every lane opened so far (parked and down ones included), by index: its socket
        (for TCP_INFO), payload bytes and chunks put on it, whether it is up and whether it pulls chunks.
        For metrics and the bench; cheap (reads single-writer counters)."""
        with self._cond:
            lanes, active = list(self.lanes), self._active
        return [LaneInfo(lane.index, lane.ch.sock, lane.bytes_sent, lane.chunks_sent, lane.alive,
                         lane.index < active) for lane in lanes]

    def set_active_lanes(self, n: int) -> int:
        """Use ``n`` lanes from now on (clamped to 1..``max_lanes``); returns the count in effect.

        Lanes with index >= ``n`` stop pulling new chunks (chunks they already took still complete) and
        stay connected, parked, for a later raise; raising past the opened count opens new lanes (dialled
        concurrently; the caller waits for them). A lane that fails to open leaves the count at the lanes
        that did, in index order.
        """
        n = max(1, min(self.max_lanes, int(n)))
        with self._cond:
            if self._closed or self._down:
                return self._active
            have, gen = len(self.lanes), self._gen
        opened, err = self._dialer.dial_lanes(range(have, n), DIAL_CONCURRENCY)
        if err is not None:
            log.warning("kvwire: %d of %d new lanes opened: %s", len(opened), n - have, err)
        with self._cond:
            if self._stopped(gen) or len(self.lanes) != have:
                for lane in opened:
                    lane.ch.close()
                return self._active
            self.lanes.extend(opened)
            self._active = min(n, len(self.lanes))
            self._cond.notify_all()
        for lane in opened:
            self._start(self._lane_loop, f"kvwire-lane{lane.index}", lane, gen)
        return self._active

    def close(self) -> None:
        self.detach_link_control()
        group, self._group = self._group, None
        if group is not None:
            group.remove(self)
        with self._cond:
            if self._closed:
                return
            self._closed = True
            pending = list(self._transfers.values())
            ctrl, lanes, down = self.ctrl, list(self.lanes), self._down
            self._cond.notify_all()
        for h in pending:
            self._end(h, State.CANCELLED, "session closed", notify=F.CANCEL)
        if not down:
            try:
                ctrl.send(F.BYE)
            except OSError:
                pass
        ctrl.close()
        for lane in lanes:
            lane.ch.close()
        me = threading.current_thread()
        for t in list(self._threads):
            if t is not me:
                t.join(5)
        self._callbacks.drain(5.0)  # the outcomes just delivered run before close returns (bounded)

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------ connecting
    def _establish(self, lanes: int) -> None:
        """Connect and authenticate the control connection, open the lanes (see the class docstring),
        then start a new generation of threads. Raises when the receiver cannot be reached or no lane
        opens; leaves nothing open then."""
        ctrl = self._dialer.open()
        opened: list[Lane] = []
        try:
            server_limits = self._dialer.handshake(ctrl, lanes)  # lanes authenticate against this session
            opened = self._dialer.open_lanes(lanes, DIAL_CONCURRENCY)
            with self._cond:
                if self._closed:
                    raise KvwireError("session closed")
                self._gen += 1
                gen = self._gen
                if gen > 1:
                    self._counts["session_reconnects"] += 1
                self.ctrl, self.server_limits, self.lanes = ctrl, server_limits, opened
                self._inflight.clear()
                self._known_layouts.clear()  # a new receiver session knows no layout yet
                self.last_seen = time.monotonic()
                self._down = False
                self._cond.notify_all()
        except BaseException:
            ctrl.close()
            for lane in opened:
                lane.ch.close()
            raise
        self._threads = [t for t in self._threads if t.is_alive()]
        self._start(self._control_loop, "kvwire-ctl", gen)
        self._start(self._monitor_loop, "kvwire-hb", gen)
        for lane in opened:
            self._start(self._lane_loop, f"kvwire-lane{lane.index}", lane, gen)

    def _stopped(self, gen: int) -> bool:
        """Threads of generation ``gen`` stop: the session closed, failed, or reconnected since."""
        return self._closed or self._down or self._gen != gen

    def _reconnect_loop(self) -> None:
        """reconnect=True, after a failure: dial the receiver until it is back or the session closes."""
        delay = 0.1
        while True:
            with self._cond:
                if self._cond.wait_for(lambda: self._closed, delay):
                    return
                lanes = len(self.lanes) or self._active
            try:
                self._establish(lanes)
            except (OSError, KvwireError) as e:
                log.info("kvwire: reconnecting to %s:%s: %s", *self.address, e)
                delay = min(delay * 2, 2.0)
                continue
            log.info("kvwire: session to %s:%s re-established", *self.address)
            return

    def _start(self, fn: Callable[..., None], name: str, *args: Any) -> None:
        t = threading.Thread(target=fn, args=args, name=name, daemon=True)
        self._threads.append(t)
        t.start()

    # ------------------------------------------------------------ lanes
    def _pick(self) -> tuple[OutgoingTransfer, int] | None:
        for _ in range(len(self._rr)):
            tid = self._rr[0]
            self._rr.rotate(-1)
            h = self._transfers.get(tid)
            if h is None:
                continue
            c = h._sm.next_chunk()
            if c is not None:
                return h, c
        return None

    def _lane_loop(self, lane: Lane, gen: int) -> None:
        if not lane.alive and not self._lane_lost(lane, ConnectionError("lane did not open"), gen):
            return
        while True:
            with self._cond:
                pick = self._pick() if lane.index < self._active and not self._stopped(gen) else None
                while pick is None and not self._stopped(gen):
                    busy = any(v is lane for v in self._inflight.values())
                    self._cond.wait(0.05 if busy else 0.5)
                    pick = self._pick() if lane.index < self._active else None
                    if pick is None and busy and (lane.peer_gone() or lane.stalled(self.stall_timeout)):
                        break  # idle with chunks in flight, and the receiver dropped or stopped reading it
                stopped = self._stopped(gen)
                if pick is not None:
                    self._inflight[(pick[0].transfer_id, pick[1])] = lane
            if pick is None:
                # outside the lock: re-dialling takes a while, and the other lanes carry on meanwhile
                if not stopped and self._lane_lost(lane, ConnectionError("lane closed by the receiver or stalled"),
                                                   gen):
                    continue
                return
            try:
                self._send_chunk(lane, *pick)
            except (OSError, ValueError) as e:
                pick = None
                if not self._lane_lost(lane, e, gen):
                    return
            pick = None  # an idle lane holds no handle (its buffers are freed when the transfer ends)

    def _send_chunk(self, lane: Lane, h: OutgoingTransfer, chunk: int) -> None:
        pieces = []
        for seg, a, b in h.plan.pieces(chunk):
            v = h.views[seg]
            assert v is not None
            pieces.append(v[a:b])
        digest: int | None = None
        if h.manifest.hashed:
            if len(pieces) == 1:
                digest = xxhash.xxh3_64_intdigest(pieces[0])
            else:
                x = xxhash.xxh3_64()
                for p in pieces:
                    x.update(p)
                digest = x.intdigest()
        with self._cond:
            h._sm.sent(chunk, digest or 0)
        if self.fault_hook is not None:
            pieces = self.fault_hook(lane.index, h.transfer_id, chunk, pieces) or pieces
        hdr = F.pack_data_header(h.transfer_id, chunk, h.plan.layers[chunk], h.plan.offsets[chunk],
                                 h.plan.lengths[chunk], digest)
        send_parts(lane.ch.sock, [hdr, *pieces])
        lane.sent(h.plan.lengths[chunk])
        h.bytes_sent += h.plan.lengths[chunk]

    def _lane_lost(self, lane: Lane, err: BaseException, gen: int) -> bool:
        """Re-queue the lane's unacknowledged chunks, then try to reconnect it for ``peer_timeout``.
        False: lane gone (or its generation stopped)."""
        lane.alive = False
        lane.ch.close()
        self._requeue(lane)
        deadline = time.monotonic() + self.peer_timeout
        delay = 0.05
        while not self._stopped(gen) and time.monotonic() < deadline:
            try:
                ch = self._dialer.open_lane(lane.index)
            except (OSError, KvwireError):
                with self._cond:
                    self._cond.wait_for(lambda: self._stopped(gen), delay)
                delay = min(delay * 2, 1.0)
                continue
            with self._cond:
                if self._stopped(gen):
                    ch.close()
                    return False
                lane.reopened(ch)
                self._counts["lane_reconnects"] += 1
            return True
        if not self._stopped(gen) and self.alive_lanes == 0:
            self._fail_session(f"every lane is down (last error: {err})", gen)
        return False

    def _requeue(self, lane: Lane) -> None:
        with self._cond:
            lost = [k for k, v in self._inflight.items() if v is lane]
            self._counts["chunks_requeued"] += len(lost)
            for tid, chunk in lost:
                del self._inflight[(tid, chunk)]
                h = self._transfers.get(tid)
                if h is not None:
                    h._sm.requeue([chunk])
            self._cond.notify_all()

    # ------------------------------------------------------------ control
    def _control_loop(self, gen: int) -> None:
        ctrl = self.ctrl
        try:
            while True:
                kind, body = ctrl.read_control()
                self.last_seen = time.monotonic()
                if kind == F.HEARTBEAT:
                    continue
                if kind == F.BYE:
                    raise ConnectionError("receiver closed the session")
                self._dispatch(kind, body)
        except (OSError, KvwireError) as e:
            self._fail_session(f"control connection: {e}", gen)

    def _dispatch(self, kind: str, body: dict[str, Any]) -> None:
        """One message about a transfer (its own frame: the handle is not kept between messages)."""
        tid = body.get("tid")
        h = self._transfers.get(tid) if isinstance(tid, int) else None
        if h is None:
            if kind == F.ERROR and tid is None:
                raise ConnectionError(f"receiver error: {body.get('reason')}")
            return  # late message for an ended transfer
        if kind == F.ACCEPT:
            with self._cond:
                h._sm.accepted = True
                self._cond.notify_all()
        elif kind == F.ACK or kind == F.NACK:
            chunks = body.get("c")
            if not isinstance(chunks, list) or not all(isinstance(c, int) for c in chunks):
                raise ProtocolError("malformed ack")
            if kind == F.NACK and body.get("held") is True:
                self._on_held(h, chunks)
            else:
                self._on_ack(h, chunks, kind == F.ACK, lost=body.get("lost") is True)
        elif kind == F.COMPLETE:
            self._end(h, State.DONE, "")
        elif kind == F.REJECT:
            self._end(h, State.FAILED, f"receiver rejected the transfer: {body.get('reason')}")
        elif kind == F.ERROR and body.get("state") == State.TIMED_OUT.value:
            self._end(h, State.TIMED_OUT, f"receiver timed out: {body.get('reason')}")
        elif kind == F.ERROR:
            self._end(h, State.FAILED, f"receiver failed the transfer: {body.get('reason')}")
        elif kind == F.CANCEL:
            self._end(h, State.CANCELLED, f"cancelled by receiver: {body.get('reason')}")
        else:
            raise ProtocolError(f"unexpected {kind!r} from receiver")

    def _on_ack(self, h: OutgoingTransfer, chunks: list[int], ok: bool, lost: bool = False) -> None:
        with self._cond:
            self._release(h, chunks)
            if ok:
                finished = h._sm.on_ack(chunks)
            else:
                h._sm.on_nack(chunks, lost)
                self._counts["chunks_requeued" if lost else "chunks_nacked"] += len(chunks)
                finished = False
                self._cond.notify_all()
            failed = h._sm.state is State.FAILED
        if failed:
            self._end(h, State.FAILED, h._sm.status.reason, notify=F.CANCEL)
            return
        if ok:
            h._report_acked()
        if finished:
            self._send_done(h)

    def _on_held(self, h: OutgoingTransfer, chunks: list[int]) -> None:
        """The receiver dropped this copy because another copy of the chunk (on a lane presumed dead) is
        still being read: the lane that carried it did its part; the chunk stays in flight, owned by
        no lane, until the receiver's verdict on the other copy (ACK, NACK, or NACK "lost")."""
        with self._cond:
            self._release(h, chunks)

    def _release(self, h: OutgoingTransfer, chunks: list[int]) -> None:
        """The lanes that carried ``chunks`` of ``h`` hold them no longer, and that is a sign the receiver
        reads them (caller holds ``_cond``)."""
        now = time.monotonic()
        for c in chunks:
            lane = self._inflight.pop((h.transfer_id, c), None)
            if lane is not None:
                lane.progress_at = now

    def _send_done(self, h: OutgoingTransfer) -> None:
        try:
            self.ctrl.send(F.DONE, {"tid": h.transfer_id, "digest": h._sm.digest()})
        except OSError as e:
            self._fail_session(f"control connection lost: {e}")

    def _end(self, h: OutgoingTransfer, state: State, reason: str, notify: str | None = None) -> None:
        with self._cond:
            h._sm.status.end(state, reason)
            if self._transfers.pop(h.transfer_id, None) is None:
                return
            self._counts[f"{'probes' if h.manifest.sink else 'transfers'}_{state.value}"] += 1
            try:
                self._rr.remove(h.transfer_id)
            except ValueError:
                pass
            for k in [k for k in self._inflight if k[0] == h.transfer_id]:
                del self._inflight[k]
        if notify is not None:
            try:
                self.ctrl.send(notify, {"tid": h.transfer_id, "reason": reason, "state": state.value})
            except OSError:
                pass
        h._resolve(state, reason)
        h._acked_callbacks.clear()  # they may hold the handle: no cycle outlives the transfer

    def _fail_session(self, reason: str, gen: int | None = None) -> None:
        """The connection failed: every transfer in flight fails with ``reason``; the session closes,
        or (``reconnect``) re-establishes itself in the background. ``gen``: only if still current."""
        with self._cond:
            if self._closed or self._down or (gen is not None and gen != self._gen):
                return
            self.failure = reason
            handles = list(self._transfers.values())
            if self.reconnect:
                self._down = True
            else:
                self._closed = True
            ctrl, lanes = self.ctrl, list(self.lanes)
            self._cond.notify_all()
        for h in handles:
            self._end(h, State.FAILED, reason)
        ctrl.close()
        for lane in lanes:
            lane.ch.close()
        if self.reconnect:
            log.warning("kvwire: session to %s:%s failed (%s); reconnecting", *self.address, reason)
            self._start(self._reconnect_loop, "kvwire-reconnect")

    def _monitor_loop(self, gen: int) -> None:
        tick = min(self.heartbeat, 0.25)
        last_hb = 0.0
        ctrl = self.ctrl
        while True:
            with self._cond:
                if self._cond.wait_for(lambda: self._stopped(gen), tick):
                    return
            now = time.monotonic()
            if now - self.last_seen > self.peer_timeout:
                self._fail_session(f"receiver silent for {now - self.last_seen:.1f}s", gen)
                return
            if now - last_hb >= self.heartbeat:
                last_hb = now
                try:
                    ctrl.send(F.HEARTBEAT)
                except OSError:
                    pass
            self._expire(now)

    def _expire(self, now: float) -> None:
        """Time out transfers past their deadline (its own frame: no handle outlives the tick)."""
        with self._cond:
            late = [h for h in self._transfers.values() if h.deadline is not None and now > h.deadline]
        for h in late:
            self._end(h, State.TIMED_OUT, "transfer deadline passed", notify=F.CANCEL)


def connect(host: str, port: int, *, lanes: int = 4, key: bytes | str | None = None,
            ssl_context: ssl.SSLContext | None = None, server_hostname: str | None = None,
            chunk_size: int = DEFAULT_CHUNK, hashing: bool = True, peer_timeout: float = 10.0,
            heartbeat: float = 1.0, connect_timeout: float = 5.0, max_retries: int = 3,
            limits: F.Limits = F.DEFAULT_LIMITS, max_lanes: int | None = None,
            on_lane_open: LaneHook | None = None, reconnect: bool = False,
            link_control: bool | ControllerConfig | LaneGroup = True) -> Session:
    """Open a session to the kvwire receiver at ``host:port``: one per peer, reused across requests.

    Raises ``ConnectError`` naming ``host:port`` (refused, unresolvable, unreachable; ``ConnectTimeout``
    after ``connect_timeout``), ``AuthenticationError`` on a key mismatch.

    Parameters:
        host: the receiver's address or name.
        port: the receiver's port (``Receiver.address[1]``).
        lanes: data connections (TCP lanes) opened at once, 1..256.
        key: the receiver's pre-shared key (``bytes`` or ``str``); ``None``: none.
        ssl_context: a client ``ssl.SSLContext`` for TLS on every connection; ``None``: plain TCP.
        server_hostname: the name the receiver's certificate is checked against (default ``host``).
        chunk_size: payload bytes per chunk (the unit of hashing, acknowledgement and re-sending).
        hashing: xxh3_64 per chunk, checked by the receiver.
        peer_timeout: seconds of silence from the receiver after which its transfers fail.
        heartbeat: seconds between heartbeats on an idle control connection.
        connect_timeout: seconds for each TCP connect and the handshake that follows it.
        max_retries: re-sends of one chunk after failed hash checks before its transfer fails.
        limits: the lengths and counts accepted from the receiver (``kvwire.Limits``).
        max_lanes: the most lanes ``Session.set_active_lanes`` may grow to (default ``max(lanes, 16)``).
        on_lane_open: ``fn(lane_index, socket)`` called as each lane connects, before it carries data.
        reconnect: after the receiver dies or goes silent, fail the transfers in flight and dial it again
            in the background (``Session``); later sends work once it is back.
        link_control: congestion control, on by default (``True``); ``False`` turns it off, a
            ``ControllerConfig`` sets its policy, a ``LaneGroup`` shares one controller over several
            sessions (see ``Session``).
    """
    return Session(host, port, lanes=lanes, key=key, ssl_context=ssl_context, server_hostname=server_hostname,
                   chunk_size=chunk_size, hashing=hashing, peer_timeout=peer_timeout, heartbeat=heartbeat,
                   connect_timeout=connect_timeout, max_retries=max_retries, limits=limits, max_lanes=max_lanes,
                   on_lane_open=on_lane_open, reconnect=reconnect, link_control=link_control)
