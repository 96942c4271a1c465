"""The sending end: a session of one control connection plus N data lanes, reused across transfers.

Owns: ``Session`` (the public object) and ``connect``: the session's parameters, its one lock, its
protocol engine (``codec.txengine.SenderEngine``: the transfers, which chunk goes next, chunks in flight
per lane, control messages, deadlines, heartbeats, counters, connection generations), starting transfers,
its views for metrics and congestion control, and closing. Its connection generations, their threads
(control reader, monitor, one per lane, reconnect) and doing what the engine decides (control frames
out, handles resolved, sockets closed, the whole session re-established after a failure,
``reconnect=True``) are its base's, ``_txconnection.SenderConnection``. Lanes pull chunks (a slow lane
takes fewer) through ``txlanes.LanePump``; dialling, authenticating and a lane's own stall signs are
``_lanes.py``'s; user callbacks go to a ``Callbacks`` pool. Must not know:
torch/cupy, which control message is legal when (the engine's), congestion policy (it exposes its lane
sockets, and hands its ``link_control`` argument to ``kvwire.congestion.control.for_session`` or a
``LaneGroup``), nor how a session is warmed (``warm`` goes to the ``warm_up`` callable it was handed,
``kvwire.probe.warm_up`` from ``kvwire.connect``: the probe is built on this module, which cannot import it).
"""

from __future__ import annotations

import itertools
import math
import os
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from .._args import (
    check_callable,
    check_flag,
    check_host,
    check_int,
    check_key,
    check_limits,
    check_port,
    check_seconds,
    check_stage,
    check_timeout,
)
from ..codec import frames as F
from ..codec import parity
from ..codec.layout import ModelLayout, RequestSpec
from ..codec.manifest import Manifest, build_manifest, max_chunk_size
from ..codec.plan import DEFAULT_CHUNK, spread_chunk_size
from ..codec.transfer import SenderTransfer
from ..codec.txengine import SenderEngine
from ..congestion.control import LinkControl, for_session, session_config
from ..congestion.controller import ControllerConfig
from ..congestion.group import LaneGroup
from ..congestion.tcpinfo import handshake_rtt
from ..errors import KvwireError
from ._auth import SessionKeys
from ._callbacks import Callbacks
from ._fork import check_process, forked
from ._lanes import LONG_PATH_RTT, Dialer, Lane, LaneHook, LaneInfo
from ._outgoing import OutgoingTransfer
from ._tail import TailEncoder
from ._txconnection import SenderConnection
from ._txlanes import LanePump
from .transport import IDENTITY, ChunkStage, Stream

if TYPE_CHECKING:  # (for the annotations only: kvwire.probe imports this module)
    from ..probe import ProbeResult

#: ``tail_parity=None`` (the default): parity chunks a group of the last layer gets on a long path
#: (``LONG_PATH_RTT``, by the handshake) when zfec imports here; none on a shorter one, where a loss costs
#: little. Streaming 8k-token Qwen3-Next over 2 Gbit/s, 80 ms (prefill at half the link rate), 2 against
#: none, 110 requests each: exposed tail p50 / p99 / worst 151 / 215 / 244 ms vs 170 / 259 / 1869 ms at
#: 0.01 % loss; p50 / worst 122-133 / 138-145 vs 123-126 / 126-130 ms without loss (2 cores shared with the
#: link's emulator; ``benchmarks/results/tail-parity-2026-12-03.txt``); 3 did no better than 2 and costs more
AUTO_TAIL_PARITY = 2

#: ``warm_up(session, warm)``: warms a session that has just opened and returns what it measured (a
#: ``kvwire.probe.ProbeResult``) or None when it did not (``kvwire.probe.warm_up``; ``Session(warm_up=...)``)
WarmUp = Callable[["Session", "bool | float | None"], "ProbeResult | None"]


def _check_warm(warm: object, warm_up: WarmUp | None) -> None:
    if warm is not None and not isinstance(warm, bool):
        if not isinstance(warm, (int, float)):
            raise TypeError(f"warm must be None, True, False or a number of seconds, not {warm!r}")
        if not 0 < warm < math.inf:
            raise ValueError(f"warm must be a positive number of seconds, got {warm!r}")
    if warm is not None and warm is not False and warm_up is None:
        raise ValueError(f"warm={warm!r} needs a warm_up to run (kvwire.connect hands in kvwire.probe.warm_up; "
                         "Session(..., warm_up=kvwire.probe.warm_up))")


class Session(SenderConnection):
    """A connection to one receiver: ``send()`` transfers over it, ``close()`` when done.

    Opening it connects and authenticates the control connection and ``lanes`` data connections; it
    raises ``ConnectError`` (an ``OSError``; ``ConnectTimeout`` after ``connect_timeout``) naming
    ``host:port`` when the receiver cannot be reached, ``AuthenticationError`` when the key differs.
    A bad argument (a port outside 1..65535, a duration that is not a positive finite number of seconds,
    a key that is not ``bytes``/``str``, ...) is a ``TypeError`` or ``ValueError`` before anything opens.

    Parameters:
        host: the receiver's address or name (as given to ``Receiver``; IPv4, IPv6 or a DNS name).
        port: the receiver's port (``Receiver.address[1]``).
        lanes: data connections (TCP lanes) opened at once, 1..256; chunks are striped over them.
        key: the pre-shared key the receiver was given (``bytes`` or ``str``); ``None``: none.
        ssl_context: a client ``ssl.SSLContext`` to run every connection over TLS; ``None``: plain TCP.
        server_hostname: the name the receiver's certificate is checked against (default ``host``).
        chunk_size: payload bytes per chunk (each chunk is hashed, acknowledged and re-sent alone), from
            ``kvwire.codec.frames.MIN_CHUNK`` (64 KiB) to what ``limits.max_chunk`` allows (about 11 MiB by
            default: ``kvwire.codec.manifest.max_chunk_size``, as a receiver checks it); a transfer whose
            largest layer has fewer than about four chunks per lane of the session is cut finer, down to
            256 KiB, so the lanes share it out as they free up (``kvwire.codec.plan.spread_chunk_size``).
        hashing: xxh3_64 per chunk, checked by the receiver (a bad chunk is NACKed and re-sent).
        peer_timeout: seconds of silence from the receiver after which transfers and the session fail.
        heartbeat: seconds between heartbeats on an idle control connection (shortened to a quarter
            of the receiver's ``peer_timeout`` where that is shorter: each end says its own in the handshake).
        connect_timeout: seconds for each TCP connect and the handshake that follows it.
        max_retries: re-sends of one chunk after failed hash checks before its transfer fails.
        limits: the lengths and counts this side accepts from the receiver (``kvwire.codec.frames.Limits``).
        max_lanes: the most lanes ``set_active_lanes`` may grow to (default ``max(lanes, 16)``, or the
            ``max_lanes`` of a ``ControllerConfig`` given as ``link_control`` when that is more).
        on_lane_open: ``fn(lane_index, socket)`` called each time a lane connects, before it carries
            data, after the congestion controller's own hook (``set_control_hooks``: it sets the lane's
            pacing and algorithm); assigning ``session.on_lane_open`` later replaces this one only.
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
        chunk_stage: what every data chunk passes through after hashing, before the wire
            (``transport.ChunkStage``; a transform keeps the length). A stage that raises (an
            ``OSError`` aside: that is the lane's failure) or changes a chunk's length fails that
            transfer at once; the lane carries on. ``chunk_stage`` may be replaced while the session
            runs (tests inject faults so: ``kvwire.testing.faults``).
        warm: warm the lanes before ``connect`` returns, so the first transfer does not pay slow start
            (``kvwire.probe.warm_up``): up to 1 s or 16 round trips of probe traffic (sink transfers the receiver
            discards), ended as soon as the pipe reads full; the session's controller then paces at the
            measured capacity, and ``warmup`` says what it cost. ``None`` (the default): only when the
            session has its own controller, the handshake's RTT is 15 ms or more (``kvwire.probe``'s
            ``WARM_MIN_RTT``), and the receiver takes probes (``$KVWIRE_WARM=0`` turns this off
            process-wide); ``True`` or a number of seconds (the longest burst): regardless of the RTT;
            ``False``: never. A receiver that refuses probes leaves the session cold (logged), not failed.
        warm_up: what warming runs, ``fn(session, warm)`` (``kvwire.probe.warm_up``, which
            ``kvwire.connect`` passes; the probe is built on this transport, so it is handed in). ``None``
            (the default here): the session is never warmed, and ``warm`` must be ``None`` or ``False``.
        tail_parity: Reed-Solomon parity chunks (0..8) per group of each transfer's last layer
            (``kvwire.codec.parity``): the layer's chunks are coded in groups of as many as there are active
            lanes, the parity is encoded (on a thread of its own) while the layer's data goes out and is sent
            behind it, and the receiver rebuilds a group from any of its chunks but that many, so lanes held
            back by a lost packet (a round trip on a long path) do not hold the last layer. Costs
            ``tail_parity / lanes`` more bytes of the last layer, sent after its data, and an encode of it.
            Needs ``zfec`` on both ends (``pip install 'kvwire[fec]'``; ``KvwireError`` here without it); a
            receiver without it gets no parity. 0: none. ``None`` (the default): ``AUTO_TAIL_PARITY`` on a
            path whose handshake RTT is ``LONG_PATH_RTT`` (15 ms) or more, when zfec imports here; none on a
            shorter path or without zfec. ``Session.tail_parity`` says what was chosen.

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
                 link_control: bool | ControllerConfig | LaneGroup = True,
                 chunk_stage: ChunkStage = IDENTITY, warm: bool | float | None = None,
                 warm_up: WarmUp | None = None, tail_parity: int | None = None) -> None:
        # every argument is checked before a socket or a thread is opened: nothing to clean up on a bad one
        host = check_host(host)
        port = check_port(port, lo=1)
        lanes = check_int("lanes", lanes, 1, 256)
        if max_lanes is not None:
            max_lanes = check_int("max_lanes", max_lanes, lanes, 256)
        key_bytes = check_key(key)
        check_limits(limits)
        chunk_size = check_int("chunk_size", chunk_size, F.MIN_CHUNK, max_chunk_size(limits))
        peer_timeout = check_seconds("peer_timeout", peer_timeout)
        heartbeat = check_seconds("heartbeat", heartbeat)
        connect_timeout = check_seconds("connect_timeout", connect_timeout)
        max_retries = check_int("max_retries", max_retries, 0)
        check_callable("on_lane_open", on_lane_open)
        check_flag("hashing", hashing)
        check_flag("reconnect", reconnect)
        check_stage(chunk_stage)
        _check_warm(warm, warm_up)
        tail_parity = parity.setting(tail_parity)  # ValueError, or KvwireError without zfec
        if max_lanes is None:  # (a controller given its own lane ceiling may grow the session to it)
            wanted = link_control.max_lanes if isinstance(link_control, ControllerConfig) else 0
            max_lanes = min(256, max(lanes, 16, wanted))
        self.max_lanes = max_lanes
        self.on_lane_open = on_lane_open
        #: ``fn(lane_index, socket)`` called on the lane's thread as a lane that waited for work picks up a
        #: chunk, before it goes out (the session's ``LinkControl`` gives the lane its full pacing share
        #: there); keep it short: it delays that chunk
        self.on_lane_busy: LaneHook | None = None
        # the congestion controller's own pair (set_control_hooks): runs before the two above, and assigning
        # those never drops it
        self._control_hooks: tuple[LaneHook | None, LaneHook | None] = (None, None)
        self.address = (host, port)
        self.key = key_bytes
        self.ssl_context = ssl_context
        self.server_hostname = server_hostname or host
        self.chunk_size = chunk_size
        self.hashing = hashing
        #: parity chunks per group of each transfer's last layer (``tail_parity``, ``None`` resolved at connect)
        self.tail_parity = tail_parity or 0
        self.peer_timeout = peer_timeout
        #: a lane with chunks in flight and no sign of the receiver reading it for this long is re-dialled
        #: and its chunks re-sent on the others; also the longest a blocked send waits
        self.stall_timeout = peer_timeout / 2
        self.heartbeat = heartbeat
        self.connect_timeout = connect_timeout
        self.max_retries = max_retries
        self.limits = limits
        self._engine = SenderEngine(peer_timeout=peer_timeout, heartbeat=heartbeat, reconnect=reconnect)
        self._cond = threading.Condition()  # around every engine call; lanes and senders wait on it
        self._handles: dict[int, OutgoingTransfer] = {}  # added under _cond; removed as the engine ends them
        self._pid = os.getpid()  # the process it belongs to (``_fork``)
        self._ids = itertools.count(int.from_bytes(os.urandom(4), "little") << 20)
        self._threads: list[threading.Thread] = []
        self.lanes: list[Lane] = []
        self._retrans_gone = 0
        self.ctrl: Stream
        self.server_limits: dict[str, Any] = {}
        self._callbacks = Callbacks("tx-callbacks")  # user callbacks never run on a protocol thread
        self.reconnect = reconnect
        self._dialer = Dialer(host, port, key=self.key, ssl_context=ssl_context, server_hostname=self.server_hostname,
                              connect_timeout=connect_timeout, peer_timeout=peer_timeout,
                              stall_timeout=self.stall_timeout, limits=limits, on_lane_open=lambda: self._hook(0))
        self._pump = LanePump(self._engine, self._cond, self._handles, self._dialer, active=lanes,
                              stall_timeout=self.stall_timeout, peer_timeout=peer_timeout,
                              alive_lanes=lambda: self.alive_lanes, fail=self._fail_session,
                              abort=self.abort_transfer, act=self._act, stage=chunk_stage,
                              on_busy=lambda: self._hook(1))
        self._link_control: LinkControl | None = None
        self._group: LaneGroup | None = None
        #: what warming the session as it opened measured and cost (a ``kvwire.probe.ProbeResult``: its
        #: ``seconds``, ``drain_seconds``, ``bytes_sent``, ``capacity``), or None: not warmed (see ``warm``)
        self.warmup: ProbeResult | None = None
        # a controller of its own may use up to its max_lanes: on a long path they are all opened at once
        config = None if isinstance(link_control, LaneGroup) else session_config(link_control, lanes, max_lanes)
        self._establish(lanes, wide=config.max_lanes if config is not None else None)
        if tail_parity is None:
            self.tail_parity = self._auto_tail_parity()
        try:
            if isinstance(link_control, LaneGroup):
                self._group = link_control
                link_control.add(self)
            else:
                self._link_control = for_session(self, config or False, lanes, self.max_lanes, host)
            if warm is not False and warm_up is not None:
                self.warmup = warm_up(self, warm)
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------ public
    def set_control_hooks(self, on_open: LaneHook | None, on_busy: LaneHook | None) -> None:
        """The hooks of the congestion controller that drives this session (``LinkControl``, a
        ``LaneGroup``'s): ``on_open`` as each lane connects, ``on_busy`` as a lane that waited for work picks
        some up, each before the user's ``on_lane_open`` / ``on_lane_busy``, in a slot of their own, so that
        assigning those later never drops the controller's. ``None, None`` detaches."""
        self._control_hooks = (on_open, on_busy)

    @property
    def callbacks(self) -> Callbacks:
        """The pool that runs this session's user callbacks: a handle built on its transfers (a
        ``ReshardOutgoing``) queues its own there, so that ``close()`` drains them too."""
        return self._callbacks

    @property
    def control_hooks(self) -> tuple[LaneHook | None, LaneHook | None]:
        """``(on_open, on_busy)`` as ``set_control_hooks`` last set them."""
        return self._control_hooks

    def _hook(self, which: int) -> LaneHook | None:
        """What a lane runs as it opens (0) or wakes (1): the controller's hook, then the user's; None
        when neither is set (the lane path skips the call)."""
        control = self._control_hooks[which]
        user = self.on_lane_open if which == 0 else self.on_lane_busy
        if control is None or user is None:
            return control or user

        def both(index: int, sock: socket.socket) -> None:
            try:
                control(index, sock)
            finally:  # (the user's runs even when the controller's knob was refused)
                user(index, sock)
        return both

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

        ``layout`` is a ``ModelLayout`` (``kvwire.load_layout(name)`` for a preset), ``request`` a
        ``RequestSpec``, ``timeout`` seconds (positive, finite) or ``None``, ``hashing`` a bool or ``None`` (the
        session's), ``sink`` a bool: ``TypeError``/``ValueError`` else.
        ``KvwireError`` in a child forked from the process that opened the session (``_fork``).
        """
        check_process(self._pid, "session")
        if not isinstance(layout, ModelLayout):
            hint = " (pass kvwire.load_layout(name) for a preset)" if isinstance(layout, str) else ""
            raise TypeError(f"layout must be a ModelLayout, not {type(layout).__name__}{hint}")
        if not isinstance(request, RequestSpec):
            raise TypeError(f"request must be a RequestSpec, not {type(request).__name__}")
        timeout = check_timeout("timeout", timeout)
        check_flag("hashing", hashing, none_ok=True)
        check_flag("sink", sink)
        total = layout.kv_bytes_per_token() * request.state_position + layout.state_bytes_per_request()
        theirs = self.server_limits.get("max_transfer_bytes")
        if type(theirs) is not int or theirs < 0:  # absent, or malformed (nan, "64G", a list): not a bound
            theirs = total
        cap = min(self.limits.max_transfer_bytes, theirs)
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
        chunk = spread_chunk_size(m.segments, self._pump.active, self.chunk_size)
        if chunk != m.chunk_size:  # the largest layer gets chunks for every lane (see spread_chunk_size)
            m = replace(m, chunk_size=chunk)
        m = self._with_parity(m)
        sm = SenderTransfer(m, m.plan(), self.max_retries)
        deadline = None if timeout is None else time.monotonic() + timeout
        h = OutgoingTransfer(self, sm, deadline, self._callbacks)
        if sm.groups is not None:
            h.tail = TailEncoder(sm.groups, h.pieces, hashed)
        eng = self._engine
        with self._cond:
            if eng.down and not eng.closed:  # reconnect=True: give the session a moment to come back
                self._cond.wait_for(lambda: not eng.down or eng.closed, self.connect_timeout)
            begin = eng.start(sm, deadline)  # raises when closed or down
            self._handles[tid] = h
            ctrl, gen = self.ctrl, eng.gen
        self._send(begin, gen, ctrl)
        return h

    def _auto_tail_parity(self) -> int:
        """``tail_parity=None``: ``AUTO_TAIL_PARITY`` on a long path (the handshakes' RTT, ``LONG_PATH_RTT`` or
        more) when zfec imports here, else 0."""
        if not parity.available():
            return 0
        rtt = self.path_rtt()
        return AUTO_TAIL_PARITY if rtt is not None and rtt >= LONG_PATH_RTT else 0

    def _with_parity(self, m: Manifest) -> Manifest:
        """``m`` with tail parity (``tail_parity`` chunks per group, as many as the receiver takes) over groups
        of as many of the last layer's chunks as there are active lanes (at least 2 per parity chunk).
        Unchanged for a sink or a receiver that takes none."""
        par = min(self.tail_parity, parity.parse_offer(self.server_limits))
        if not par or m.sink or not m.total_bytes:
            return m
        size = min(parity.MAX_GROUP, max(self._pump.active, 2 * par))
        return replace(m, group_size=size, parity=par)

    @property
    def chunk_stage(self) -> ChunkStage:
        """What every data chunk passes through after hashing, before the wire (may be replaced)."""
        return self._pump.stage

    @chunk_stage.setter
    def chunk_stage(self, stage: ChunkStage) -> None:
        self._pump.stage = stage

    @property
    def closed(self) -> bool:
        """True once ``close()`` ran or the session failed (``failure`` says why; with ``reconnect``
        only ``close()`` closes it); ``send`` then raises."""
        return self._engine.closed

    @property
    def failure(self) -> str:
        """Why the connection failed last ('' if it never did)."""
        return self._engine.failure

    @property
    def last_seen(self) -> float:
        """When the receiver was last heard from (``time.monotonic()``)."""
        return self._engine.last_seen

    @property
    def keys(self) -> SessionKeys:
        """The keys of the current connection generation (its session id): lanes authenticate with them."""
        assert self._dialer.keys is not None  # set by the handshake that opened the session
        return self._dialer.keys

    @property
    def healthy(self) -> bool:
        """Open, connected, and at least one lane up: a new transfer can make progress now."""
        return not self._engine.closed and not self._engine.down and self.alive_lanes > 0

    @property
    def alive_lanes(self) -> int:
        return sum(1 for lane in self.lanes if lane.alive)

    @property
    def active_lanes(self) -> int:
        """How many lanes pull chunks (``set_active_lanes``); parked lanes stay connected."""
        return self._pump.active

    def stats(self) -> dict[str, int]:
        """Cumulative counters since the session opened, for metrics: ``bytes_sent``/``chunks_sent``
        (payload put on the lanes, re-sends included), ``chunks_nacked`` (failed the receiver's hash
        check), ``chunks_requeued`` (in flight on a lane that died), ``lane_reconnects``, ``session_reconnects``,
        ``transfers_<state>`` and ``probes_<state>`` per terminal state, ``retransmits`` (TCP segments the
        kernel retransmitted on every lane the session opened: parked ones, and lanes closed or re-dialled
        since, whose sockets took their own counts with them); and the current ``transfers_in_flight``,
        ``lanes_alive``, ``lanes_active``. Cheap: single-writer counters and one ``TCP_INFO`` read a lane."""
        with self._cond:
            out = self._engine.counts()
            out["transfers_in_flight"] = self._engine.in_flight()
            lanes, gone = list(self.lanes), self._retrans_gone
        out["retransmits"] = gone + sum(lane.retransmits() for lane in lanes)
        out["bytes_sent"] = sum(lane.bytes_sent for lane in lanes)
        out["chunks_sent"] = sum(lane.chunks_sent for lane in lanes)
        out["lanes_alive"] = sum(1 for lane in lanes if lane.alive)
        out["lanes_active"] = self._pump.active
        return out

    @property
    def busy(self) -> bool:
        """A transfer (or probe) is in flight: its lanes carry, or are about to carry, data."""
        with self._cond:
            return self._engine.busy

    def lane_sockets(self) -> list[socket.socket]:
        """The live sockets of the active lanes (for TCP_INFO probing and pacing by kvwire.congestion)."""
        with self._cond:
            return [lane.ch.sock for lane in self.lanes
                    if lane.alive and lane.index < self._pump.active]

    def path_rtt(self) -> float | None:
        """The path's round trip in seconds as the session's handshakes measured it: the least ``TCP_INFO`` min
        RTT of its control connection and lanes (None where the kernel gives none)."""
        return handshake_rtt([self.control_socket(), *self.lane_sockets()])

    def control_socket(self) -> socket.socket:
        """The control connection's socket (for TCP_INFO: what the session's control messages cost on the wire)."""
        with self._cond:
            return self.ctrl.sock

    def lane_info(self) -> list[LaneInfo]:
        """A snapshot of every lane opened so far (parked and down ones included), by index: its socket
        (for TCP_INFO), payload bytes and chunks put on it, whether it is up and whether it pulls chunks.
        For metrics and the bench; cheap (reads single-writer counters)."""
        with self._cond:
            lanes, active = list(self.lanes), self._pump.active
        return [LaneInfo(lane.index, lane.ch.sock, lane.bytes_sent, lane.chunks_sent, lane.alive,
                         lane.index < active) for lane in lanes]

    def close(self) -> None:
        """End the transfers in flight (``cancelled``), say BYE and close the connections; once. In a child
        forked from the process that opened the session, nothing: the connections are the parent's (``_fork``)."""
        if forked(self._pid):
            return
        self.detach_link_control()
        group, self._group = self._group, None
        if group is not None:
            group.remove(self)
        with self._cond:
            if self._engine.closed:
                return
            actions = self._engine.close()  # CANCEL and end each transfer, then BYE unless down
            ctrl, lanes = self.ctrl, list(self.lanes)
            self._cond.notify_all()
        self._act(actions)
        ctrl.close()
        for lane in lanes:
            lane.close()
        me = threading.current_thread()
        for t in list(self._threads):
            if t is not me:
                t.join(5)
        self._callbacks.drain(5.0)  # the outcomes just delivered run before close returns (bounded)

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def connect(host: str, port: int, *, lanes: int = 4, key: bytes | str | None = None,
            ssl_context: ssl.SSLContext | None = None, server_hostname: str | None = None,
            chunk_size: int = DEFAULT_CHUNK, hashing: bool = True, peer_timeout: float = 10.0,
            heartbeat: float = 1.0, connect_timeout: float = 5.0, max_retries: int = 3,
            limits: F.Limits = F.DEFAULT_LIMITS, max_lanes: int | None = None,
            on_lane_open: LaneHook | None = None, reconnect: bool = False,
            link_control: bool | ControllerConfig | LaneGroup = True, chunk_stage: ChunkStage = IDENTITY,
            warm: bool | float | None = None, warm_up: WarmUp | None = None,
            tail_parity: int | None = None) -> Session:
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
        heartbeat: seconds between heartbeats on an idle control connection (shortened to a quarter
            of the receiver's ``peer_timeout`` where that is shorter: each end says its own in the handshake).
        connect_timeout: seconds for each TCP connect and the handshake that follows it.
        max_retries: re-sends of one chunk after failed hash checks before its transfer fails.
        limits: the lengths and counts accepted from the receiver (``kvwire.codec.frames.Limits``).
        max_lanes: the most lanes ``Session.set_active_lanes`` may grow to (default ``max(lanes, 16)``, or
            the ``max_lanes`` of a ``ControllerConfig`` given as ``link_control`` when that is more).
        on_lane_open: ``fn(lane_index, socket)`` called as each lane connects, before it carries data.
        reconnect: after the receiver dies or goes silent, fail the transfers in flight and dial it again
            in the background (``Session``); later sends work once it is back.
        link_control: congestion control, on by default (``True``); ``False`` turns it off, a
            ``ControllerConfig`` sets its policy, a ``LaneGroup`` shares one controller over several
            sessions (see ``Session``).
        chunk_stage: what every data chunk passes through before the wire (see ``Session``).
        warm: on a long path, warm the lanes with a short capacity probe before returning (``None``, the
            default: when the session has its own controller, the RTT is 15 ms or more and the receiver
            takes probes; ``True``/seconds: always; ``False``: never; see ``Session``). Costs up to 1 s
            or 16 round trips and that long's worth of link bytes once per session: right for persistent sessions, not
            for a connection per request. ``Session.warmup`` says what it cost.
        warm_up: what warming runs (``kvwire.connect`` passes ``kvwire.probe.warm_up``; ``None``: never
            warmed, see ``Session``).
        tail_parity: Reed-Solomon parity chunks per group of each transfer's last layer, so that lanes a lost
            packet held back do not hold it (see ``Session``). ``None``, the default: ``AUTO_TAIL_PARITY`` (2)
            on a path of 15 ms or more when zfec is installed (``kvwire[fec]``), else none; 0: none.
    """
    return Session(host, port, lanes=lanes, key=key, ssl_context=ssl_context, server_hostname=server_hostname,
                   chunk_size=chunk_size, hashing=hashing, peer_timeout=peer_timeout, heartbeat=heartbeat,
                   connect_timeout=connect_timeout, max_retries=max_retries, limits=limits, max_lanes=max_lanes,
                   on_lane_open=on_lane_open, reconnect=reconnect, link_control=link_control,
                   chunk_stage=chunk_stage, warm=warm, warm_up=warm_up, tail_parity=tail_parity)
