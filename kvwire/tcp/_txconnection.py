"""The sending session's connection machinery: the base ``Session`` is built on.

Owns: ``SenderConnection`` — opening a connection generation (control connection, handshake, lanes) and
its threads (control reader, heartbeat monitor, one per lane, the reconnect loop), growing it by new lanes
(``set_active_lanes``), telling the protocol engine (``codec.txengine.SenderEngine``) what the handles did
and performing what it decides: control frames out, handles resolved, sockets closed, the session failed
or re-established. Must not know: the session's public face and parameters (``_sender.Session``),
congestion control, warm-up, torch/cupy, which control message is legal when (the engine's).

The attributes declared on the class are set up by ``Session.__init__`` before the first connection.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from .._args import check_int
from ..codec import early
from ..codec import frames as F
from ..codec.actions import Ended, Fail, Send
from ..codec.handshake import PEER_TIMEOUT_KEY
from ..codec.txengine import Action, LayersAcked, SenderEngine
from ..congestion.tcpinfo import handshake_rtt
from ..errors import KvwireError
from ._fork import check_process
from ._lanes import LONG_PATH_RTT, Dialer, Lane
from ._outgoing import OutgoingTransfer
from ._txlanes import LanePump
from .transport import Stream

log = logging.getLogger("kvwire.tcp")

#: lanes dialled at once when a session opens or grows (see ``Dialer.dial_each``); read at each dial
DIAL_CONCURRENCY = 16
#: control frames whose loss fails the connection (others are best effort: the reader notices)
_MUST_SEND = frozenset({F.BEGIN, F.DONE})


class SenderConnection:
    """One sending session's connection generations, threads and engine actions (see the module)."""

    address: tuple[str, int]
    heartbeat: float
    max_lanes: int
    lanes: list[Lane]
    _retrans_gone: int  # segments retransmitted on the lanes of the connections before this one
    ctrl: Stream
    server_limits: dict[str, Any]
    _engine: SenderEngine
    _cond: threading.Condition  # around every engine call; lanes and senders wait on it
    _handles: dict[int, OutgoingTransfer]
    _threads: list[threading.Thread]
    _dialer: Dialer
    _pump: LanePump
    _pid: int  # the process the session belongs to (``_fork``)

    # ------------------------------------------------------------ for the handles (outgoing.TransferDriver)
    def layer_written(self, transfer_id: int, layer: int) -> None:
        """A handle's layer is in place: its chunks queue for the lanes."""
        with self._cond:
            self._engine.layer_ready(transfer_id, layer)
            self._cond.notify_all()

    def finish_transfer(self, transfer_id: int) -> None:
        """A handle has no more layers (one without chunks is complete now)."""
        with self._cond:
            actions = self._engine.finish(transfer_id)
        self._act(actions)

    def cancel_transfer(self, transfer_id: int, reason: str) -> None:
        """The user cancels a transfer: CANCEL to the receiver, the handle ends ``cancelled``."""
        with self._cond:
            actions = self._engine.cancel(transfer_id, reason)
        self._act(actions)

    def abort_transfer(self, transfer_id: int, reason: str) -> None:
        """The lanes cannot carry a transfer on (the chunk stage failed on it): it ends ``failed``."""
        with self._cond:
            actions = self._engine.abort(transfer_id, reason)
        self._act(actions)

    def set_active_lanes(self, n: int) -> int:
        """Use ``n`` lanes from now on (at most ``max_lanes``: more is clamped); returns the count in effect.

        Lanes with index >= ``n`` stop pulling new chunks (chunks they already took still complete) and
        stay connected, parked, for a later raise; raising past the opened count opens new lanes (dialled
        concurrently; the caller waits for them). A lane that fails to open leaves the count at the lanes
        that did, in index order. ``n``: an ``int`` >= 1 (``TypeError``/``ValueError`` else, nothing changed;
        before, ``'x'`` was int()'s ValueError and ``2.7`` or ``-3`` were taken as 2 and 1).
        """
        check_process(self._pid, "session")
        n = min(self.max_lanes, check_int("n", n, 1))
        with self._cond:
            if self._engine.closed or self._engine.down:
                return self._pump.active
            have, gen = len(self.lanes), self._engine.gen
        opened, err = self._dialer.dial_lanes(range(have, n), DIAL_CONCURRENCY)
        if err is not None:
            log.warning("kvwire: %d of %d new lanes opened: %s", len(opened), n - have, err)
        with self._cond:
            if not self._engine.current(gen) or len(self.lanes) != have:
                for lane in opened:
                    lane.close()
                return self._pump.active
            self.lanes.extend(opened)
            self._pump.active = min(n, len(self.lanes))
            self._cond.notify_all()
        for lane in opened:
            self._start(self._pump.run, f"kvwire-lane{lane.index}", lane, gen)
        return self._pump.active

    # ------------------------------------------------------------ connecting
    def _establish(self, lanes: int, wide: int | None = None) -> None:
        """Connect and authenticate the control connection, open the lanes (see the class docstring),
        then start a new generation of threads. Raises when the receiver cannot be reached or no lane
        opens; leaves nothing open then. ``wide``: on a long path (``LONG_PATH_RTT``, by the control
        connection's TCP handshake) open this many lanes instead, in the same dial round; those past the
        active count are parked."""
        ctrl = self._dialer.open()
        opened: list[Lane] = []
        try:
            rtt = handshake_rtt([ctrl.sock])
            if wide is not None and wide > lanes and rtt is not None and rtt >= LONG_PATH_RTT:
                lanes = min(wide, self.max_lanes)
            server_limits = self._dialer.handshake(ctrl, lanes)  # lanes authenticate against this session
            opened = self._dialer.open_lanes(lanes, DIAL_CONCURRENCY)
            with self._cond:
                # raises once the session is closed; chunks may go before ACCEPT within the receiver's early window
                gen = self._engine.opened(time.monotonic(), early.parse(server_limits),
                                          early.parse_done_early(server_limits), server_limits.get(PEER_TIMEOUT_KEY))
                self._retrans_gone += sum(lane.retransmits() for lane in self.lanes)  # (a connection before)
                self.ctrl, self.server_limits, self.lanes = ctrl, server_limits, opened
                self._cond.notify_all()
        except BaseException:
            ctrl.close()
            for lane in opened:
                lane.close()
            raise
        self._threads = [t for t in self._threads if t.is_alive()]
        self._start(self._control_loop, "kvwire-ctl", gen)
        self._start(self._monitor_loop, "kvwire-hb", gen)
        for lane in opened:
            self._start(self._pump.run, f"kvwire-lane{lane.index}", lane, gen)

    def _reconnect_loop(self) -> None:
        """reconnect=True, after a failure: dial the receiver until it is back or the session closes, whatever
        a try fails of (each is logged; the next waits longer, 2 s at most)."""
        delay = 0.1
        eng = self._engine
        told = False  # a try's unexpected failure was logged with its traceback (once: the tries go on every 2 s)
        while True:
            with self._cond:
                if self._cond.wait_for(lambda: eng.closed, delay):
                    return
                lanes = len(self.lanes) or self._pump.active
            try:
                self._establish(lanes)
            except (OSError, KvwireError) as e:
                log.info("kvwire: reconnecting to %s:%s: %s", *self.address, e)
                delay = min(delay * 2, 2.0)
                continue
            except Exception as e:  # noqa: BLE001 - a try that failed otherwise (a frame that cannot be written):
                # before, it ended this thread, the session down for good but never closed
                if told:  # (before, a traceback a try for as long as it lasted)
                    log.info("kvwire: reconnecting to %s:%s failed again: %s: %s", *self.address, type(e).__name__, e)
                else:
                    log.warning("kvwire: reconnecting to %s:%s failed", *self.address, exc_info=True)
                    told = True
                delay = min(delay * 2, 2.0)
                continue
            log.info("kvwire: session to %s:%s re-established", *self.address)
            return

    def _start(self, fn: Callable[..., None], name: str, *args: Any) -> None:
        t = threading.Thread(target=fn, args=args, name=name, daemon=True)
        self._threads.append(t)
        t.start()

    # ------------------------------------------------------------ doing what the engine decided
    def _act(self, actions: Sequence[Action], gen: int | None = None) -> None:
        """Perform the engine's actions, outside the lock, in order."""
        for a in actions:
            if isinstance(a, Send):
                self._send(a, gen)
            elif isinstance(a, Ended):
                h = self._handles.pop(a.transfer_id, None)
                if h is not None:
                    h.resolve(a.state, a.reason)
            elif isinstance(a, LayersAcked):
                h = self._handles.get(a.transfer_id)
                if h is not None:
                    h.layers_verified(a.layers)
            elif isinstance(a, Fail):
                self._closed_connection(a)
            # ChunksQueued: the caller notified the lanes under the lock

    def _send(self, a: Send, gen: int | None, ctrl: Stream | None = None) -> None:
        """One control frame; losing a BEGIN or DONE fails the connection, the rest are best effort. Any other
        error (a frame that cannot be encoded, a broken stream) fails the connection naming it, whatever the
        frame: its framing can no longer be trusted. Nothing propagates, so the actions after this one (a
        transfer's ``Ended`` among them) still run, and no protocol thread dies of it."""
        try:
            (ctrl or self.ctrl).send(a.kind, a.body)
        except OSError as e:
            if a.kind in _MUST_SEND:
                self._fail_session(f"control connection lost: {e}", gen if a.kind == F.BEGIN else None)
        except Exception as e:  # noqa: BLE001 - before: the handle's Ended was skipped, or the monitor died
            log.error("kvwire: sending a %s control frame failed", a.kind, exc_info=True)
            self._fail_session(f"sending a {a.kind} control frame failed: {type(e).__name__}: {e}", gen)

    def _fail_session(self, reason: str, gen: int | None = None) -> None:
        """The connection failed: every transfer in flight fails with ``reason``; the session closes,
        or (``reconnect``) re-establishes itself in the background. ``gen``: only if still current."""
        with self._cond:
            actions = self._engine.fail(reason, gen)
            self._cond.notify_all()
        self._act(actions)

    def _closed_connection(self, a: Fail) -> None:
        """After the engine's ``Fail``: close the connection's sockets; reconnect if the session does."""
        self.ctrl.close()
        for lane in list(self.lanes):
            lane.close()
        if a.reconnect:
            log.warning("kvwire: session to %s:%s failed (%s); reconnecting", *self.address, a.reason)
            self._start(self._reconnect_loop, "kvwire-reconnect")

    # ------------------------------------------------------------ threads
    def _control_loop(self, gen: int) -> None:
        ctrl = self.ctrl
        eng = self._engine
        try:
            while True:
                kind, body = ctrl.read_control()
                with self._cond:
                    if not eng.current(gen):
                        return
                    actions = eng.receive(kind, body, time.monotonic())
                    if actions:
                        self._cond.notify_all()
                if actions:
                    self._act(actions, gen)
        except (OSError, KvwireError) as e:
            self._fail_session(f"control connection: {e}", gen)

    def _monitor_loop(self, gen: int) -> None:
        eng = self._engine
        tick = min(eng.heartbeat, 0.25)  # (this generation's: ``opened`` fitted it to the receiver's timeout)
        while True:
            with self._cond:
                if self._cond.wait_for(lambda: not eng.current(gen), tick):
                    return
                actions = eng.tick(time.monotonic())  # silence, heartbeat due, deadlines
                if actions:
                    self._cond.notify_all()
            self._act(actions, gen)
