"""The sending side's end of a test's control channel: requests, asynchronous results, heartbeats, clock.

Owns: a reader thread that files the receiving side's per-request ``result`` messages (only for the request
ids this side issued, ``expect_result``: any other is dropped and counted) and hands every other message to
the caller waiting in ``call`` (at most ``MAX_UNANSWERED`` wait, each of ``MAX_REPLY_BYTES`` at most). A
result with a field that is not what it must be (``messages``), or more or larger messages than that, ends
the channel with a BadMessage, which ``call`` raises from then on (as it raises one for such a ``pong`` or
refusal). A heartbeat every second so the receiving side can tell a live sender from a vanished one;
estimating the receiving side's monotonic clock offset (NTP-style, best of several pings). Either role uses
it: the client of a plain test (``connect`` dials and authenticates), and the server of a ``-R`` test over
the connection the client opened. Must not know: sessions, payloads or reports.
"""

from __future__ import annotations

import queue
import ssl
import threading
import time
from collections.abc import Callable
from typing import Any

from .control import BenchChannel, client_connect, expect
from .errors import BadMessage, PeerGone
from .messages import read_pong, read_result

HEARTBEAT = 1.0
#: messages the peer may send that nobody has taken yet (replies wait for their ``call``; a peer that
#: answers once per request never has more than two waiting)
MAX_UNANSWERED = 16
#: bytes on the wire of a message that waits for its ``call`` (the largest, a ``summary``, is a few KiB)
MAX_REPLY_BYTES = 64 * 1024


class Requester:
    """Over an authenticated channel; ``welcome`` says ``run`` (the request ids' prefix) and ``data_port``;
    ``who``: the peer's role ("server", or "client" for the sending server of a ``-R`` test), as messages
    naming a bad field say it."""

    def __init__(self, ch: BenchChannel, welcome: dict[str, Any], who: str = "server") -> None:
        self.ch = ch
        self.welcome = welcome
        self.who = who
        self.results: dict[str, dict[str, Any]] = {}  # request id -> its result, for ids this side issued
        self.dropped = 0  # results for request ids this side did not issue
        self.error: BaseException | None = None
        self._issued: set[str] = set()
        self._cond = threading.Condition()
        self._replies: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self._closed = threading.Event()
        self._reader = threading.Thread(target=self._read_loop, name="kvwire-bench-ctl", daemon=True)
        self._beater = threading.Thread(target=self._beat_loop, name="kvwire-bench-hb", daemon=True)
        self._reader.start()
        self._beater.start()

    @classmethod
    def connect(cls, host: str, port: int, key: bytes, ssl_context: ssl.SSLContext | None,
                timeout: float) -> Requester:
        ch, welcome = client_connect(host, port, key, ssl_context, timeout)
        return cls(ch, welcome)

    @property
    def run(self) -> str:
        return str(self.welcome.get("run", ""))

    @property
    def data_port(self) -> int:
        port = self.welcome.get("data_port")
        return port if isinstance(port, int) else 0

    def expect_result(self, rid: str) -> None:
        """This side is about to send request ``rid``: its result is kept when it arrives."""
        with self._cond:
            self._issued.add(rid)

    def _read_loop(self) -> None:
        try:
            while True:
                msg = self.ch.recv(None)
                if msg["op"] == "hb":
                    continue
                if msg["op"] == "result":
                    rid = msg.get("rid")
                    with self._cond:
                        wanted = rid in self._issued if isinstance(rid, str) else True
                        if not wanted:
                            self.dropped += 1
                            continue
                    result = read_result(msg, self.who)
                    with self._cond:
                        self.results[result["rid"]] = result
                        self._cond.notify_all()
                elif self._replies.qsize() >= MAX_UNANSWERED:
                    raise BadMessage(f"{self.who} sent more than {MAX_UNANSWERED} messages nobody asked for "
                                     f"(the last: {str(msg['op'])[:40]!r})")
                elif self.ch.last_length > MAX_REPLY_BYTES:
                    raise BadMessage(f"{self.who} sent a {str(msg['op'])[:40]!r} message of {self.ch.last_length} "
                                     f"bytes (a reply has at most {MAX_REPLY_BYTES})")
                else:
                    self._replies.put(msg)
        except BaseException as e:  # noqa: BLE001 - any end of the reader ends the channel
            if not self._closed.is_set():
                self.error = e
            if isinstance(e, BadMessage):  # what such a peer left waiting is no answer to anything
                while not self._replies.empty():
                    self._replies.get_nowait()
            self._replies.put(None)
            with self._cond:
                self._cond.notify_all()

    def _beat_loop(self) -> None:
        while not self._closed.wait(HEARTBEAT):
            try:
                self.ch.tell("hb")
            except OSError:
                return

    def call(self, op: str, reply: str, timeout: float = 30.0, **fields: Any) -> dict[str, Any]:
        """Send ``op`` and wait for ``reply`` (or the server's error, raised as PeerError)."""
        try:
            self.ch.tell(op, **fields)
        except OSError as e:
            raise PeerGone(f"control connection to {self.ch.peer} lost: {e}") from None
        try:
            msg = self._replies.get(timeout=timeout)
        except queue.Empty:
            raise PeerGone(f"{self.ch.peer} did not answer {op!r} within {timeout:.0f} s") from None
        if msg is None:
            self._replies.put(None)
            if isinstance(self.error, BadMessage):  # the peer broke the protocol: say how, as a peer error
                raise BadMessage(str(self.error))
            raise PeerGone(f"control connection to {self.ch.peer} ended: {self.error or 'closed'}")
        return expect(msg, reply, self.ch.peer, self.who)

    def next_message(self, timeout: float) -> dict[str, Any] | None:
        """The next message that is not a request result; None when the channel ended or on timeout."""
        try:
            msg = self._replies.get(timeout=timeout)
        except queue.Empty:
            return None
        if msg is None:
            self._replies.put(None)
        return msg

    def wait_results(self, rids: list[str], timeout: float) -> dict[str, dict[str, Any]]:
        """The results that arrived for ``rids`` within ``timeout`` (all, unless the server is gone)."""
        end = time.monotonic() + timeout
        with self._cond:
            while not all(r in self.results for r in rids) and self.error is None:
                left = end - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            return {r: self.results[r] for r in rids if r in self.results}

    def wait_until(self, ready: Callable[[], bool], timeout: float) -> bool:
        """Wait (re-checking on every result that arrives) until ``ready()``; False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: ready() or self.error is not None, timeout)

    def clock_offset(self, rounds: int = 8) -> tuple[float, float]:
        """(server clock minus client clock, uncertainty) from the ping with the shortest round trip."""
        best: tuple[float, float] | None = None
        for _ in range(rounds):
            t0 = time.monotonic()
            pong = self.call("ping", "pong", timeout=5.0, t0=t0)
            t1 = time.monotonic()
            ts = read_pong(pong, self.who)  # a finite number, or a BadMessage
            rtt = t1 - t0
            if best is None or rtt < best[1] * 2:
                best = (ts - (t0 + t1) / 2, rtt / 2)
        return best if best is not None else (0.0, float("inf"))

    def close(self, bye: bool = True) -> None:
        """Say ``bye`` (unless not), close the channel and wait (2 s at most each) for the reader and
        heartbeat threads to stop: a heartbeat being written fails as the channel closes."""
        if self._closed.is_set():
            return
        self._closed.set()
        if bye:
            try:
                self.ch.tell("bye")
            except OSError:
                pass
        self.ch.close()
        self._reader.join(2)
        self._beater.join(2)
