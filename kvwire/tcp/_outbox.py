"""A receiver session's control frames, written by a thread of their own.

Owns: the frames queued for one session's control connection and the thread that writes them (``run``).
Whoever has a frame for the sender (the monitor's heartbeats, an admission's ACCEPT or REJECT, a lane
reader's ACKs) puts it in with ``send`` and goes on: a sender that stops reading its control connection
blocks this writer alone, never a thread the receiver shares between sessions (the monitor that ticks every
session, expected requests' deadlines). Its bounds: at most ``MAX_QUEUED`` frames wait; one write may make
no progress for ``stall`` s (``SO_SNDTIMEO`` on the socket: a write that gets nowhere returns); past either,
``on_stuck(reason)`` runs once, on the writer, and later frames are dropped; so it does when a write fails
otherwise (the connection lost, a frame that cannot be encoded: the reason names the error). ``close()``
stops taking frames and wakes the session's reader (the connection's read side is shut); the writer writes
what is queued (``FLUSH_WAIT`` s at most) and ends; ``abort()`` fails a write in progress at once. Whoever owns
the connection closes it once the writer ended (``wait``). Must not know: sessions, engines, what the frames say.
"""

from __future__ import annotations

import socket
import ssl
import struct
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from .transport import Stream

#: frames that may wait for the writer: far beyond what a reading sender leaves queued (its socket buffer
#: takes them as they come), far below memory that matters (a REJECT of a 256-character id is ~380 B)
MAX_QUEUED = 4096
#: after ``close()``, how long the writer goes on writing the frames queued before it (CANCELs, the ERROR)
FLUSH_WAIT = 1.0


def _send_timeout(sock: socket.socket, seconds: float) -> None:
    """``SO_SNDTIMEO``: a blocking write that can move no byte for ``seconds`` returns (EAGAIN); reads, on the
    session's reader thread, keep blocking."""
    whole = int(seconds)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", whole, int((seconds - whole) * 1e6)))
    except OSError:
        pass  # not a kernel socket (a test's stream): the queue bound still holds


#: what a write that moved no byte for ``SO_SNDTIMEO`` raises (plain socket, TLS)
_NO_PROGRESS = (BlockingIOError, TimeoutError, ssl.SSLWantWriteError)


class ControlOutbox:
    """The control frames of one session, in order, written by ``run`` (see the module)."""

    def __init__(self, stream: Stream, *, stall: float, on_stuck: Callable[[str], None]) -> None:
        self.stream = stream
        self.stall = stall
        self.on_stuck = on_stuck
        self._cond = threading.Condition()
        self._queue: deque[tuple[str, dict[str, Any] | None]] = deque()
        self._closing = False
        self._stuck: str | None = None  # why the writer gave up (frames are dropped from then on)
        self._ended = threading.Event()

    def send(self, kind: str, body: dict[str, Any] | None = None) -> None:
        """Queue one frame; never blocks. Past ``MAX_QUEUED`` the session is stuck (its sender reads nothing)."""
        with self._cond:
            if self._closing or self._stuck is not None:
                return
            if len(self._queue) >= MAX_QUEUED:
                self._stuck = f"the sender read none of {MAX_QUEUED} control frames queued for it"
                self._queue.clear()
            else:
                self._queue.append((kind, body))
            self._cond.notify()

    def close(self) -> None:
        """Take no more frames; wake the session's reader (its read side shut); the writer flushes what is
        queued and closes the connection. Idempotent; never blocks."""
        with self._cond:
            if self._closing:
                return
            self._closing = True
            self._cond.notify()
        self._shutdown(socket.SHUT_RD)

    def abort(self) -> None:
        """``close()``, and a write in progress fails now (the connection is shut both ways): no flush."""
        self.close()
        self._shutdown(socket.SHUT_RDWR)

    def wait(self, timeout: float) -> bool:
        """Whether the writer ended within ``timeout`` s (the connection may then be closed)."""
        return self._ended.wait(timeout)

    def _shutdown(self, how: int) -> None:
        try:  # (the base class's: an SSLSocket's own shutdown drops its SSL object under the reader)
            socket.socket.shutdown(self.stream.sock, how)
        except OSError:
            pass

    def run(self) -> None:
        """The writer: until closed and flushed, or stuck (then ``on_stuck`` runs here)."""
        _send_timeout(self.stream.sock, self.stall)
        flush_by: float | None = None
        try:
            while True:
                with self._cond:
                    while not self._queue and not self._closing and self._stuck is None:
                        self._cond.wait()
                    if self._stuck is not None:
                        break
                    if self._closing:
                        flush_by = flush_by or time.monotonic() + FLUSH_WAIT
                        if not self._queue or time.monotonic() > flush_by:
                            return
                    kind, body = self._queue.popleft()
                try:
                    self.stream.send(kind, body)
                except Exception as e:  # noqa: BLE001 - any failure ends the writer by on_stuck, never silently
                    with self._cond:
                        if self._closing:
                            return
                        self._stuck = ("the sender took no control bytes for "
                                       f"{self.stall:g} s" if isinstance(e, _NO_PROGRESS)
                                       else f"control connection lost: {e}" if isinstance(e, OSError)
                                       else f"sending a {kind} control frame failed: {type(e).__name__}: {e}")
                        self._queue.clear()
                    break
            self.on_stuck(self._stuck or "")
        finally:
            self._ended.set()
