"""The receiving end: a server that authenticates sessions and places transfers in caller buffers.

Owns: ``Receiver`` (the public object: ``expect``, ``next_transfer``, ``stats``, ``close``), the table of
sessions, running the session handshake on a control connection and feeding its messages to the session's
protocol engine (``codec.rxengine``: legality, per-session admission, verdicts, deadlines, counters),
lane authentication against its session, receiver-wide bounds (sessions, bytes in flight, queued
handles) and destination lookup (registered buffers or an allocator callback; an expected request that its
user cancelled or that timed out unplaced is refused as such, ``CANCELS_KEPT``), sink transfers (capacity
probes, read into one shared scratch buffer and never delivered), the threads it runs, and the monitor's
clock (expected requests that never came; each session's engine decides the rest). Accepting connections
is ``_accept.py``'s, a session's connections and lanes ``_rxsession.py``'s. User callbacks go to a
``Callbacks`` pool, never run on these threads. Must not know: torch/cupy (buffers arrive as views),
congestion control, which control message is legal when.
"""

from __future__ import annotations

import logging
import os
import ssl
import threading
import time
import warnings
from collections import Counter, OrderedDict, deque
from collections.abc import Callable
from typing import Any

from .._args import (
    check_callable,
    check_host,
    check_int,
    check_key,
    check_limits,
    check_port,
    check_seconds,
    check_stage,
    check_timeout,
    check_wait_timeout,
)
from ..buffers import check_destination, segment_views
from ..codec import frames as F
from ..codec import parity
from ..codec.early import DEFAULT_EARLY_BYTES, DONE_EARLY, EarlyWindow
from ..codec.handshake import PEER_TIMEOUT_KEY, heartbeat_for
from ..codec.layout import MAX_REQUEST_ID, ModelLayout, check_state_position, payload_bounds, utf8_text
from ..codec.manifest import Manifest, check_manifest_against
from ..codec.probe import SINK_MAX_SEGMENT
from ..codec.rxengine import REFUSAL_COUNTERS, Admit, ReceiverEngine, Refusal, held_bytes
from ..codec.transfer import TERMINAL_COUNTERS, State
from ..errors import InsecureReceiverWarning, KvwireError, LayoutError
from ._accept import Acceptor, is_loopback, verifies_clients
from ._auth import SessionKeys, lane_index, server_handshake, server_lane
from ._callbacks import Callbacks
from ._fork import check_process, forked
from ._incoming import IncomingTransfer
from ._outbox import FLUSH_WAIT
from ._rxsession import RxSession
from ._wire import Channel
from .transport import IDENTITY, ChunkStage

log = logging.getLogger("kvwire.receiver")


Allocator = Callable[[Manifest], Any]

#: expected requests whose handle was cancelled, or timed out, before their transfer was placed, remembered
#: (a cancelled one until the deadline its ``expect`` gave it, a timed-out one for ``transfer_timeout`` past
#: it; the oldest forgotten first past this many) so that a sender's BEGIN for one is refused with the handle's
#: reason and state (the sender's handle ends cancelled or timed out), never placed elsewhere
CANCELS_KEPT = 4096

#: why an expected request whose sender never began times out
NEVER_STARTED = "the sender never started this transfer"


_STAT_KEYS = ("bytes_received", "probe_bytes_received", "chunks_rejected", "auth_failures", "connections_refused",
              "handshakes_cut", "early_bytes", "early_chunks_dropped", *parity.COUNTERS, *TERMINAL_COUNTERS,
              *REFUSAL_COUNTERS)


class Receiver:
    """A kvwire server. Start with ``Receiver(...)`` (it listens at once), stop with ``close()``.

    Destinations: ``expect(request_id, buffers)`` registers buffers in advance and returns the handle;
    otherwise ``allocator(manifest)`` is called and returns one buffer of ``manifest.total_bytes`` or a
    list of buffers, one per segment. Handles of allocated transfers go to ``on_transfer`` when it is
    given (run on the receiver's callback pool; the receiver keeps no reference to them, so a handle,
    its buffer included, is freed once the callback's owner drops it) and otherwise queue for
    ``next_transfer()``, in arrival order, until taken: at most ``MAX_QUEUED`` of them; past that new
    allocator-placed transfers are rejected (nothing is allocated for them) until some are taken.

    Sink transfers (capacity probes from ``kvwire.probe``) of up to ``max_probe_bytes`` each (0 refuses
    them) are read into one receiver-wide 16 MiB scratch buffer and discarded: no allocator call, no
    registered buffer, nothing delivered, and only their metadata counted against ``max_inflight_bytes``.

    Parameters:
        host: the address to listen on, IPv4 or IPv6, literal or name (``"127.0.0.1"`` or ``"::1"``: this
            machine only; ``"0.0.0.0"``: every IPv4 interface; ``"::"``: every interface, IPv6 and IPv4
            where the platform is dual-stack). Any but loopback warns with ``InsecureReceiverWarning``
            unless ``key`` or client certificates authenticate the peers.
        port: the port to listen on, 0..65535; 0 picks a free one (read it back from ``address``).
        key: the pre-shared key every sender must prove (``bytes`` or ``str``); ``None``: none.
        ssl_context: a server ``ssl.SSLContext`` (certificate loaded; ``verify_mode=CERT_REQUIRED`` to
            require client certificates) to run every connection over TLS; ``None``: plain TCP.
        allocator: ``fn(manifest)`` returning the destination of a transfer nobody ``expect``-ed: one
            buffer of ``manifest.total_bytes`` or one buffer per segment; ``None``: such transfers are refused.
            Called only for a manifest whose segments match a layout (sent on the session) and whose
            size fits ``max_inflight_bytes`` (reserved while it runs), on a thread of its own for that transfer:
            it may wait (for GPU memory to free up) while the session carries on; its transfer is answered
            when it returns. It may be called from several threads at once.
        on_transfer: ``fn(handle)`` called with the handle of each allocator-placed transfer as it begins.
        limits: the lengths and counts accepted from senders (``kvwire.codec.frames.Limits``).
        max_sessions: sessions open at once; more are refused.
        max_lanes: data lanes per session.
        max_inflight_bytes: payload bytes of all transfers in flight together, plus what their metadata
            holds (``Manifest.metadata_bytes``); a transfer over it is refused.
        max_transfers_per_session: transfers in flight per session.
        transfer_timeout: seconds a transfer (or an ``expect``-ed request that never comes) may take.
        peer_timeout: seconds of silence from a sender after which its session and transfers fail.
        heartbeat: seconds between heartbeats on an idle control connection (shortened to a quarter
            of the sender's ``peer_timeout`` where that is shorter: each end says its own in the handshake).
        handshake_timeout: seconds a new connection has to authenticate, in all (not per read).
        max_handshakes: unauthenticated connections handled at once, at most half of them from one
            source address; a new one always gets in and the oldest of the busiest source is cut.
        max_probe_bytes: the largest capacity probe (sink transfer) accepted; 0 refuses probes.
        chunk_stage: what every data chunk passes after its payload is in place and before its hash
            is checked (``transport.ChunkStage``; a transform, or a fault injector in tests).
        early_bytes: payload bytes of one transfer a sender may send before its ACCEPT (twice that over a
            session's unanswered transfers together; ``codec.early``), advertised in the handshake, so a
            finished cache does not wait a round trip before its first chunk; 0 turns it off. Early chunks
            wait in their lane's socket (nothing is allocated for them) until the transfer is placed, at
            most ``min(1 s, peer_timeout / 4)``; then they are read in place, or drained and asked for
            again. A sender that sends more is a protocol error that ends its session.
    """

    #: allocator-placed handles waiting for ``next_transfer()`` (without ``on_transfer``) at most
    MAX_QUEUED = 1024

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        key: bytes | str | None = None,
        ssl_context: ssl.SSLContext | None = None,
        allocator: Allocator | None = None,
        on_transfer: Callable[[IncomingTransfer], None] | None = None,
        limits: F.Limits = F.DEFAULT_LIMITS,
        max_sessions: int = 64,
        max_lanes: int = 64,
        max_inflight_bytes: int = 64 * 1024**3,
        max_transfers_per_session: int = 1024,
        transfer_timeout: float = 300.0,
        peer_timeout: float = 10.0,
        heartbeat: float = 1.0,
        handshake_timeout: float = 5.0,
        max_handshakes: int = 128,
        max_probe_bytes: int = 4 * 1024**3,
        chunk_stage: ChunkStage = IDENTITY,
        early_bytes: int = DEFAULT_EARLY_BYTES,
    ) -> None:
        # checked before the listening socket or a thread opens (a 0 heartbeat would spin the monitor)
        host, port = check_host(host), check_port(port)
        key_bytes = check_key(key)
        for name, seconds in (("transfer_timeout", transfer_timeout), ("peer_timeout", peer_timeout),
                              ("heartbeat", heartbeat), ("handshake_timeout", handshake_timeout)):
            check_seconds(name, seconds)
        check_callable("allocator", allocator)
        check_callable("on_transfer", on_transfer)
        check_limits(limits)
        check_stage(chunk_stage)
        # (a str max_sessions killed the accept thread at the first connection: a listening, dead receiver)
        max_sessions, max_handshakes, max_transfers_per_session, max_inflight_bytes = (
            check_int(name, value, 1) for name, value in (
                ("max_sessions", max_sessions), ("max_handshakes", max_handshakes),
                ("max_transfers_per_session", max_transfers_per_session),
                ("max_inflight_bytes", max_inflight_bytes)))
        max_lanes = check_int("max_lanes", max_lanes, 0)  # (0: sessions authenticate, every lane is refused)
        max_probe_bytes = check_int("max_probe_bytes", max_probe_bytes, 0)  # (0 refuses probes)
        self.early = EarlyWindow.for_receiver(early_bytes)  # ValueError when negative
        self._parity = parity.available()  # tail groups (``codec.parity``) are rebuilt when zfec is here
        self.key = key_bytes
        self.ssl_context = ssl_context
        self.allocator = allocator
        self.on_transfer = on_transfer
        self.limits = limits
        self.max_sessions = max_sessions
        self.max_lanes = max_lanes
        self.max_inflight_bytes = max_inflight_bytes
        self.max_transfers_per_session = max_transfers_per_session
        self.transfer_timeout = transfer_timeout
        self.peer_timeout = peer_timeout
        self.heartbeat = heartbeat
        self.handshake_timeout = handshake_timeout
        self.max_handshakes = max_handshakes
        self.max_probe_bytes = max_probe_bytes
        self.chunk_stage = chunk_stage
        self._pid = os.getpid()  # the process it belongs to (``_fork``)
        self._sink_scratch: memoryview | None = None  # shared by every sink transfer; allocated on first use
        self._lock = threading.Lock()
        self._sessions: dict[bytes, RxSession] = {}
        self._expected: dict[str, IncomingTransfer] = {}
        # request id -> (state, reason, until) of an expected handle ended unplaced (``CANCELS_KEPT``)
        self._cancelled: OrderedDict[str, tuple[State, str, float]] = OrderedDict()
        self._callbacks = Callbacks("rx-callbacks")  # user callbacks never run on a protocol thread
        self._incoming: deque[IncomingTransfer] = deque()  # for next_transfer(), without on_transfer
        self._incoming_cond = threading.Condition(self._lock)
        self._threads: set[threading.Thread] = set()
        self._closed = threading.Event()
        self._counts: Counter[str] = Counter()  # see stats(); closed sessions' counts folded in; under _count_lock
        self._count_lock = threading.Lock()
        self._reserve_lock = threading.Lock()
        self._reserved = 0  # bytes admitted transfers reserved against max_inflight_bytes, not yet in flight
        self._acceptor = Acceptor(host, port, ssl_context=ssl_context, limits=limits, peer_timeout=peer_timeout,
                                  handshake_timeout=handshake_timeout, max_handshakes=max_handshakes,
                                  max_conns=max_sessions * (max_lanes + 1), spawn=self._spawn, count=self._count,
                                  on_control=self._control, on_lane=self._lane)
        self.address: tuple[str, int] = self._acceptor.address
        if not self.key and not verifies_clients(ssl_context) and not is_loopback(self.address[0]):
            warnings.warn(f"kvwire Receiver on {self.address[0]}:{self.address[1]} without a key or client "
                          f"certificates: anyone who can reach it can open sessions and fill its buffers "
                          f"(pass key=..., or bind 127.0.0.1)", InsecureReceiverWarning, stacklevel=2)
        self._acceptor.start()
        self._spawn(self._monitor_loop, "kvwire-monitor")

    # ------------------------------------------------------------ public
    def expect(self, request_id: str, buffers: Any, *, layout: ModelLayout | None = None,
               state_position: int | None = None, timeout: float | None = None) -> IncomingTransfer:
        """Register destination buffers for a request before it arrives; returns its handle.

        With ``layout``, a sender whose layout differs (dtype, layout tag, shape, TP) is rejected before
        a byte is written; with ``state_position``, so is a state taken at another token position.

        ``buffers``: one writable, C-contiguous buffer of the transfer's size, or one per segment (numpy
        arrays, bytearrays, memoryviews, CPU torch tensors). Checked here: ``InvalidBuffer`` for one
        that is not writable and contiguous; with ``layout``, ``LayoutMismatch`` for a size no request on
        that layout can have (with ``state_position`` too, bounded on both sides). ``timeout``: seconds
        until the request must have arrived and completed (default the receiver's ``transfer_timeout``).
        ``request_id`` is the sender's ``RequestSpec.request_id`` (a ``str``), ``layout`` a ``ModelLayout``
        (``kvwire.load_layout(name)``), ``timeout`` positive and finite: ``TypeError``/``ValueError`` else.
        ``KvwireError`` once the receiver is closed (nothing would end the handle), or in a child forked from the
        process that opened it (``_fork``).
        """
        check_process(self._pid, "receiver")
        if not isinstance(request_id, str):  # (a sender's request id is always one: an int would never match)
            raise TypeError(f"request_id must be a str, not {type(request_id).__name__}")
        if not 0 < len(request_id) <= MAX_REQUEST_ID:
            raise ValueError(f"request_id must be 1..{MAX_REQUEST_ID} characters, got {len(request_id)}")
        if not utf8_text(request_id):  # (no sender's RequestSpec takes it: it would never match)
            raise ValueError(f"request_id {request_id!r} is not UTF-8 text (a lone surrogate)")
        if layout is not None and not isinstance(layout, ModelLayout):
            hint = " (pass kvwire.load_layout(name) for a preset)" if isinstance(layout, str) else ""
            raise TypeError(f"layout must be a ModelLayout or None, not {type(layout).__name__}{hint}")
        check_timeout("timeout", timeout)
        if state_position is not None and (isinstance(state_position, bool) or not isinstance(state_position, int)
                                           or state_position < 0):
            raise LayoutError(f"state_position must be an int >= 0, got {state_position!r}")
        if self._closed.is_set():  # (checked again under the lock below, against a close() racing this call)
            raise KvwireError("receiver closed")
        if layout is not None:
            segments, nbytes = payload_bounds(layout, state_position)
            check_destination(buffers, segments, nbytes)
        else:
            check_destination(buffers, (0, 1 << 62), (0, None))
        deadline = time.monotonic() + (timeout if timeout is not None else self.transfer_timeout)
        h = IncomingTransfer(request_id, buffers, layout, state_position, deadline, self._callbacks)
        with self._lock:
            # close() sets _closed before it takes this lock to end every expected handle: registered here
            # first, this one is among them; after, the receiver is closed (nothing would end it)
            if self._closed.is_set():
                raise KvwireError("receiver closed")
            if request_id in self._expected:
                raise ValueError(f"request {request_id!r} already expected")
            self._expected[request_id] = h
            self._cancelled.pop(request_id, None)  # expected again: its earlier cancel no longer answers for it
        # cancelled (or timed out) before its sender began: withdrawn at once, so its buffers go free and a
        # late sender is refused instead of writing into them
        h.add_done_callback(lambda _f: self._withdraw(request_id, h))
        return h

    def _withdraw(self, request_id: str, h: IncomingTransfer) -> None:
        with self._lock:
            if self._expected.get(request_id) is h:
                del self._expected[request_id]
                self._remember_cancel(h)

    def _remember_cancel(self, h: IncomingTransfer, timing_out: str | None = None) -> None:
        """Under ``_lock``: ``h``, an expected handle that ended unplaced, keeps its request refused when its
        user cancelled it (until its deadline) or it timed out (``transfer_timeout`` more; ``CANCELS_KEPT``).
        ``timing_out``: the reason the monitor, which took ``h`` out of the table in this same step, is about to
        time it out with (unless it ended already): remembered as timed out before it is resolved."""
        state, reason = (State.TIMED_OUT, timing_out) if timing_out is not None and not h.finished \
            else (h.state, h.reason)
        if state not in (State.CANCELLED, State.TIMED_OUT) or h.deadline is None or self._closed.is_set():
            return
        until = h.deadline + (self.transfer_timeout if state is State.TIMED_OUT else 0.0)
        self._cancelled[h.request_id] = (state, reason, until)
        self._cancelled.move_to_end(h.request_id)
        while len(self._cancelled) > CANCELS_KEPT:
            self._cancelled.popitem(last=False)

    def next_transfer(self, timeout: float | None = None) -> IncomingTransfer:
        """The next allocator-placed transfer, in arrival order (ended ones included: a short transfer
        may be done before it is taken). Raises ``KvwireError`` when handles go to ``on_transfer``. ``timeout``:
        seconds (<= 0: no wait) or ``None``; ``TypeError`` for a non-number, ``ValueError`` for NaN or infinity."""
        timeout = check_wait_timeout("timeout", timeout)
        if self.on_transfer is not None:
            raise KvwireError("this receiver hands allocator-placed transfers to on_transfer, not next_transfer()")
        check_process(self._pid, "receiver")
        with self._incoming_cond:
            if not self._incoming_cond.wait_for(lambda: self._incoming or self._closed.is_set(), timeout):
                raise TimeoutError("no transfer arrived")
            if not self._incoming:
                raise KvwireError("receiver closed")
            return self._incoming.popleft()

    @property
    def sessions(self) -> int:
        with self._lock:
            return len(self._sessions)

    @property
    def callbacks(self) -> Callbacks:
        """The pool that runs this receiver's user callbacks: a handle built on its transfers (a
        ``ReshardIncoming``) queues its own there, so that ``close()`` drains them too."""
        return self._callbacks

    def close(self) -> None:
        """Stop listening, end every session and expected transfer; once. In a child forked from the process
        that opened the receiver, nothing: its sockets are the parent's (``_fork``)."""
        if forked(self._pid) or self._closed.is_set():
            return
        self._closed.set()
        self._acceptor.close()
        with self._lock:
            sessions = list(self._sessions.values())
            expected = list(self._expected.values())
            self._expected.clear()
            self._cancelled.clear()
            self._incoming_cond.notify_all()
        for s in sessions:
            self._close_session(s, "receiver closed")
        for h in expected:
            h.resolve(State.CANCELLED, "receiver closed")
        self._acceptor.cut_all()
        me = threading.current_thread()
        with self._lock:
            threads = list(self._threads)
        for t in threads:
            if t is not me:
                t.join(5)
        self._callbacks.drain(5.0)  # the outcomes just delivered run before close returns (bounded)

    def __enter__(self) -> Receiver:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def stats(self) -> dict[str, int]:
        """Cumulative counters since the receiver started, for metrics: ``bytes_received`` (payload
        chunks that passed their hash check, or unhashed ones), ``probe_bytes_received`` (sink transfers),
        ``chunks_rejected`` (failed the hash check: NACKed), ``early_bytes`` (payload whose header arrived
        before its transfer was placed: the early window at work), ``early_chunks_dropped`` (of those, chunks
        still unplaced after the wait: drained and asked for again), tail parity's (``codec.parity``)
        ``parity_chunks`` (verified parity chunks), ``parity_rejected`` (parity that failed its hash),
        ``chunks_rebuilt`` (data chunks rebuilt from their group, before their copies arrived) and
        ``rebuilds_failed`` (rebuilt chunks that failed their check: left to their copies),
        ``transfers_<state>`` and ``probes_<state>``
        per terminal state of transfers that began (a BEGIN refused because its expected request was cancelled
        or timed out here counts as cancelled or timed out), ``refused_<why>`` per BEGIN REJECTed otherwise, by
        ``codec.rxengine.REFUSALS`` (``no_destination``, ``busy``, ``allocator``, ``mismatch``, ``sink``,
        ``invalid``), ``auth_failures``,
        ``connections_refused`` (over the connection bound), ``handshakes_cut`` (unauthenticated connections cut
        to make room for a newer one or past the handshake deadline); and the current ``sessions``, ``lanes``,
        ``transfers_in_flight``, ``handshakes``."""
        out = dict.fromkeys(_STAT_KEYS, 0)
        with self._lock:  # a session's counts are folded into _counts as it leaves the table, under this lock
            sessions = list(self._sessions.values())
            with self._count_lock:
                out.update(self._counts)
            for x in sessions:
                for k, n in x.counts().items():
                    out[k] = out.get(k, 0) + n
        gate = self._acceptor.gate
        out["handshakes_cut"] = gate.evicted + gate.expired
        out["handshakes"] = len(gate)
        out["sessions"] = len(sessions)
        out["lanes"] = sum(len(x.lanes) for x in sessions)
        out["transfers_in_flight"] = sum(len(x.transfers) for x in sessions)
        return out

    # ------------------------------------------------------------ test-facing
    def live_sessions(self) -> list[RxSession]:
        """The sessions open now (for tests and diagnostics: their ``ctrl``, ``lanes``, ``transfers``)."""
        with self._lock:
            return list(self._sessions.values())

    def close_session(self, s: RxSession, reason: str) -> None:
        """Close one session as a lost connection would: its transfers fail with ``reason``. ``KvwireError`` in
        a child forked from the receiver's process (``_fork``: it would say BYE on the parent's connection)."""
        check_process(self._pid, "receiver")
        self._close_session(s, reason)

    def open_connections(self) -> int:
        """Connections open now, authenticated or not (for tests)."""
        return self._acceptor.open_connections()

    def _count(self, key: str, n: int = 1) -> None:
        with self._count_lock:
            self._counts[key] += n

    # ------------------------------------------------------------ threads
    def _spawn(self, fn: Callable[..., None], name: str, *args: Any) -> None:
        t = threading.Thread(target=self._run, args=(fn, args), name=name, daemon=True)
        with self._lock:  # started under the lock: close() never sees (and joins) a thread not yet started
            self._threads.add(t)
            t.start()

    def _run(self, fn: Callable[..., None], args: tuple[Any, ...]) -> None:
        try:
            fn(*args)
        finally:
            with self._lock:
                self._threads.discard(threading.current_thread())

    # ------------------------------------------------------------ control
    def _control(self, ch: Channel, hello: dict[str, Any], peer: str, authenticated: Callable[[], None]) -> None:
        with self._lock:
            full = len(self._sessions) >= self.max_sessions
        if full:
            ch.send(F.ERROR, {"reason": "receiver has too many sessions"})
            return
        limits = {"max_chunk": self.limits.max_chunk, "max_transfer_bytes": self.limits.max_transfer_bytes,
                  "max_probe_bytes": self.max_probe_bytes, **(self.early.advertise() if self.early else {}),
                  PEER_TIMEOUT_KEY: self.peer_timeout,  # (the sender heartbeats within it)
                  DONE_EARLY: True,  # (a DONE before the last chunk is verified is held: ``codec.early``)
                  **({parity.PARITY_KEY: parity.MAX_PARITY} if self._parity else {})}  # (tail groups rebuilt)
        sessions: list[RxSession] = []

        def register(keys: SessionKeys) -> None:
            # (again, under the lock: the count above was read before the handshake, and handshakes that
            # began together all read the table below the bound; a session past it is refused here)
            engine = ReceiverEngine(self.limits, max_transfers=self.max_transfers_per_session,
                                    max_probe_bytes=self.max_probe_bytes, transfer_timeout=self.transfer_timeout,
                                    peer_timeout=self.peer_timeout, now=time.monotonic(),
                                    heartbeat=heartbeat_for(self.heartbeat, hello.get(PEER_TIMEOUT_KEY)),
                                    early=self.early, done_early=True,
                                    parity=parity.MAX_PARITY if self._parity else 0)
            session = RxSession(keys, ch, peer, engine, self.chunk_stage, self.peer_timeout,
                                on_stuck=lambda reason: self._close_session(session, reason))
            with self._lock:
                full = len(self._sessions) >= self.max_sessions
                if not full:
                    self._sessions[keys.session_id] = session
            if full:
                ch.send(F.ERROR, {"reason": "receiver has too many sessions"})
                raise KvwireError(f"session from {peer} refused: {self.max_sessions} sessions open")
            sessions.append(session)

        server_handshake(ch, self.key, hello, limits, register)
        authenticated()
        s = sessions[0]
        ch.sock.settimeout(None)
        # from here on every frame to the sender goes through the session's outbox, written on this thread
        # (started after the WELCOME: a heartbeat queued meanwhile must not overtake it)
        self._spawn(s.outbox.run, "kvwire-rx-ctl-out")
        try:
            while True:
                kind, body = ch.read_control()
                actions = s.receive(kind, body)
                for a in actions:
                    if type(a) is Admit and s.queue_admission(a.manifest):  # (the engine bounds the line)
                        self._spawn(self._admissions, "kvwire-rx-admit", s)
                fail = s.perform(actions)
                if fail is not None:
                    self._close_session(s, fail)
                    return
        except KvwireError as e:  # malformed input is typed where it is parsed; it ends the session
            s.send(F.ERROR, {"reason": str(e)})
            self._close_session(s, f"protocol error: {e}")
        except OSError as e:
            self._close_session(s, f"control connection lost: {e}")
        finally:  # the connection is closed as this returns: the outbox's writer flushes first (bounded)
            s.outbox.close()
            if not s.outbox.wait(FLUSH_WAIT + 0.5):
                s.outbox.abort()  # a write that makes no progress: fail it now
                s.outbox.wait(1.0)

    def _admissions(self, s: RxSession) -> None:
        """An admission thread: the session's admitted transfers in line, one after another, until none waits
        (at most ``rxsession.MAX_ADMITTING`` such threads per session)."""
        while (m := s.next_admission()) is not None:
            self._admit(s, m)

    def _admit(self, s: RxSession, m: Manifest) -> None:
        """An admitted transfer to its destination (``_begin``), on an admission thread: the allocator is user
        code and may wait (for GPU memory a decode step frees), and meanwhile the session's heartbeats, DONEs,
        CANCELs and other BEGINs are read and answered (on the control reader's thread a 2.5 s allocator let a
        1 s ``peer_timeout`` fail the session as silent, and every transfer behind it waited)."""
        try:
            self._begin(s, m)
        except Exception as e:  # noqa: BLE001 - a bug here must not leave the transfer unanswered
            log.exception("admitting transfer %d failed", m.transfer_id)
            self._close_session(s, f"admitting transfer {m.transfer_id} failed: {type(e).__name__}: {e}")

    def _begin(self, s: RxSession, m: Manifest) -> None:
        """The session's engine admitted ``m``: the receiver-wide bound, then its destination. What ``m``
        holds is reserved against the bound until the session has it in flight (or refused it)."""
        need = held_bytes(m)
        reason = self._reserve(need)
        if reason:
            s.refuse(m.transfer_id, reason, why="busy")
            return
        try:
            self._place(s, m)
        finally:
            with self._reserve_lock:
                self._reserved -= need

    def _place(self, s: RxSession, m: Manifest) -> None:
        """``m``'s destination (a registered buffer, the allocator's, a sink's scratch), then in flight."""
        if m.sink:
            self._begin_sink(s, m)
            return
        with self._lock:
            h = self._expected.pop(m.request.request_id, None)
            if h is not None and h.finished:  # cancelled as it arrived (its withdrawal still queued)
                self._remember_cancel(h)
                h = None
            cancelled = self._cancelled.get(m.request.request_id) if h is None else None
        if cancelled is not None and time.monotonic() <= cancelled[2]:
            # its receiver cancelled it or gave up waiting: refused so, never handed to the allocator (before: a
            # REJECT "no destination registered" failed the sender, or the allocator placed what was given up)
            s.refuse(m.transfer_id, cancelled[1], cancelled[0])
            return
        registered = h is not None
        if not registered and self.on_transfer is None:
            with self._lock:
                full = len(self._incoming) >= self.MAX_QUEUED
            if full:
                s.refuse(m.transfer_id, f"receiver busy: {self.MAX_QUEUED} transfers not yet taken with "
                         "next_transfer()", why="busy")
                return
        why: Refusal = "mismatch" if registered else "allocator"  # (what a failure below is counted as)
        try:
            if h is None:
                if self.allocator is None or m.layout is None:
                    why = "no_destination"
                if self.allocator is None:
                    raise KvwireError(f"no destination registered for request {m.request.request_id!r}")
                if m.layout is None:  # its segments were checked against nothing: ask the allocator for nothing
                    raise KvwireError("manifest names a layout unknown on this session; the allocator needs one")
                h = IncomingTransfer(m.request.request_id, self.allocator(m), callbacks=self._callbacks)
            if h.layout is not None:
                check_manifest_against(m, h.layout)
            if h.state_position is not None:
                check_state_position(m.request, h.state_position)
            views = segment_views(h.dest, m.segments)
        except Exception as e:  # noqa: BLE001 - allocator is user code; every failure is a REJECT
            reason = f"{type(e).__name__}: {e}"
            if registered and h is not None:
                h.resolve(State.FAILED, reason)
            s.refuse(m.transfer_id, reason, why=why)
            return
        h.layout = h.layout or m.layout
        if not s.activate(m, h, views):
            h.resolve(State.FAILED, "session closed")
            return
        if not registered and self.on_transfer is not None:
            h.call_soon(self.on_transfer, h)
        elif not registered:
            with self._incoming_cond:
                self._incoming.append(h)
                self._incoming_cond.notify_all()

    def _begin_sink(self, s: RxSession, m: Manifest) -> None:
        """A capacity probe: every segment's view aliases the shared scratch buffer. Lanes racing on it is
        harmless (sinks are unhashed and the bytes are thrown away); the handle is never delivered but runs
        the ordinary state machine, so the transfer still ends in exactly one terminal state."""
        with self._lock:
            if self._sink_scratch is None:
                self._sink_scratch = memoryview(bytearray(SINK_MAX_SEGMENT))
            scratch = self._sink_scratch
        h = IncomingTransfer(m.request.request_id)
        if not s.activate(m, h, [scratch[: seg.nbytes] for seg in m.segments]):
            h.resolve(State.FAILED, "session closed")  # it closed since the admission: ended once all the same

    def _reserve(self, need: int) -> str:
        """Reserve ``need`` bytes (``held_bytes`` of an admitted manifest: payload, a sink's none, plus the
        metadata every transfer holds while in flight) under ``max_inflight_bytes``, or say why not. Checked
        and taken under one lock, with what other sessions reserved and have not put in flight yet: their
        allocators run between the check and the transfer's activation, and four sessions admitted at once
        had each seen the bound free and together held 2.7x it."""
        with self._lock:
            sessions = list(self._sessions.values())
        with self._reserve_lock:  # (each session's held() takes that session's lock: never the other way round)
            inflight = sum(x.held() for x in sessions) + self._reserved
            if inflight + need > self.max_inflight_bytes:
                return f"receiver busy: {inflight + need} bytes in flight exceeds {self.max_inflight_bytes}"
            self._reserved += need
        return ""

    def _close_session(self, s: RxSession, reason: str) -> None:
        s.close(reason)
        with self._lock:  # its counts move to the receiver's as it leaves the table (stats sees one or the other)
            if self._sessions.get(s.keys.session_id) is s:
                del self._sessions[s.keys.session_id]
                with self._count_lock:
                    self._counts.update(s.counts())

    # ------------------------------------------------------------ lanes
    def _lane(self, ch: Channel, body: dict[str, Any], authenticated: Callable[[], None]) -> None:
        sid = body.get("session")
        with self._lock:
            s = self._sessions.get(sid) if isinstance(sid, bytes) else None
        if s is None:
            ch.send(F.ERROR, {"reason": "unknown session"})
            return
        lane = lane_index(body)
        server_lane(ch, self.key, s.keys, lane)
        authenticated()
        s.attach_lane(lane, ch, self.max_lanes)  # ProtocolError: refused
        ch.send(F.WELCOME, {})
        ch.sock.settimeout(None)
        try:
            s.read_lane(ch, lane)
        except (OSError, KvwireError):
            pass
        finally:
            s.detach_lane(lane, ch)

    # ------------------------------------------------------------ monitor
    def _monitor_loop(self) -> None:
        tick = min(self.heartbeat, 0.25)
        while not self._closed.wait(tick):
            tick = self._monitor_tick(time.monotonic())

    def _monitor_tick(self, now: float) -> float:
        """Expected requests that never came; each session's engine tick (deadlines, silent peers,
        heartbeats, stuck lanes). Its own frame, so no handle stays referenced between ticks. Returns the
        time to the next tick (shorter while a session heartbeats more often: its sender's timeout is short)."""
        self._acceptor.gate.reap(now)
        with self._lock:
            sessions = list(self._sessions.values())
            late = [h for h in self._expected.values() if h.deadline is not None and now > h.deadline]
            for rid in [rid for rid, (_, _, until) in self._cancelled.items() if now > until]:
                del self._cancelled[rid]
            for h in late:  # taken out and remembered in one step: a BEGIN for it is never an unknown request
                del self._expected[h.request_id]
                self._remember_cancel(h, NEVER_STARTED)
        while late:  # popped: once resolved, no frame here holds the handle (and its buffers) any more
            h = late.pop()
            if not h.resolve(State.TIMED_OUT, NEVER_STARTED):
                with self._lock:
                    self._remember_cancel(h)  # (a cancel that won the race is remembered as one)
            del h
        for s in sessions:
            fail = s.tick(now)
            if fail is not None:
                self._close_session(s, fail)
        return min(self.heartbeat, 0.25, *(s.heartbeat for s in sessions))
