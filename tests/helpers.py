"""Shared test helpers: resource counting, payloads and a verified transfer, a sender opened by hand (an
authenticated peer that follows no rule), peer processes for kill/silence tests, and a proxy that stalls one
connection."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from kvwire.codec import frames as F
from kvwire.codec.layout import ModelLayout, RequestSpec, plan_segments
from kvwire.congestion.estimator import LinkState
from kvwire.tcp import Channel, Receiver, Session, client_handshake
from kvwire.tcp._auth import SessionKeys  # noqa: PLC2701 - the keys a hand-made lane authenticates with
from kvwire.tcp.transport import ChunkRef


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def kvwire_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("kvwire")]


@contextlib.contextmanager
def default_signals(*sigs: signal.Signals) -> Iterator[None]:
    """Children started inside get ``sigs`` at their defaults, even where this process ignores them: a test
    run under ``nohup`` ignores SIGHUP, and one a shell started in the background ignores SIGINT, and an ignored
    signal stays ignored across ``exec`` where a handler does not (run that way, the tests that send a child
    SIGHUP or SIGINT waited for a child that never heard it). While inside, a signal of ``sigs`` that this
    process ignored is caught by a handler that does nothing; main thread only."""
    ignored = [s for s in sigs if signal.getsignal(s) == signal.SIG_IGN]
    for s in ignored:
        signal.signal(s, lambda *_: None)
    try:
        yield
    finally:
        for s in ignored:
            signal.signal(s, signal.SIG_IGN)


def wait_until(cond: Callable[[], bool], timeout: float = 10.0, step: float = 0.02) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(step)
    return cond()


def burst_sample(t: float, btl_bw: float, busy: float = 1.0, sndbuf: float = 0.0) -> LinkState:
    """A probe burst's sample on an 80 ms path with no queue: its fastest goodput span so far ``btl_bw``
    (bytes/s), busy share ``busy``, send-buffer-limited share ``sndbuf``."""
    return LinkState(timestamp=t, goodput=btl_bw, btl_bw=btl_bw, capacity=None, utilization=None,
                     available_bw=None, min_rtt=0.08, srtt=0.08, queueing_ratio=1.0, loss_rate=0.0, busy=busy,
                     rwnd_limited=0.0, sndbuf_limited=sndbuf, congested=False, saturated=False)


def payload(layout: ModelLayout, request: RequestSpec, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, s.nbytes, dtype=np.uint8) for s in plan_segments(layout, request)]


def send_verified(rx: Receiver, session: Session, layout: ModelLayout, request: RequestSpec, *, seed: int = 0,
                  timeout: float = 10.0) -> None:
    """One transfer of ``request``'s seeded payload from ``session`` into ``rx``, both ends waited for
    (``timeout`` each), then the destination compared with the source byte for byte."""
    src = payload(layout, request, seed)
    dst = np.zeros(sum(a.nbytes for a in src), np.uint8)
    h_rx = rx.expect(request.request_id, dst, layout=layout)
    h = session.send(layout, request)
    h.write_all(src)
    h.finish().result(timeout)
    h_rx.result(timeout)
    assert dst.tobytes() == b"".join(a.tobytes() for a in src)


def raw_sender(address: tuple[str, int], key: bytes) -> tuple[socket.socket, Channel, SessionKeys, dict[str, Any]]:
    """A sender's control connection opened by hand and authenticated with ``key`` (one lane announced): a
    peer that holds the key and then follows no rule. Returns its socket (the caller closes it), its
    ``Channel``, the session's keys (what a hand-made lane authenticates with) and the receiver's limits."""
    raw = socket.create_connection(address)
    ch = Channel(raw, F.DEFAULT_LIMITS)
    try:
        keys, limits = client_handshake(ch, key, 1)
    except BaseException:
        raw.close()
        raise
    return raw, ch, keys, limits


def next_control(ch: Channel) -> tuple[str, dict[str, Any]]:
    """The next control message on ``ch`` that is not a heartbeat."""
    kind, body = ch.read_control()
    while kind == F.HEARTBEAT:
        kind, body = ch.read_control()
    return kind, body


def peer(*args: str) -> subprocess.Popen[str]:
    """Start tests/peer_proc.py; its first stdout line is the port (receiver) or 'ready' (sender)."""
    here = os.path.dirname(__file__)
    return subprocess.Popen([sys.executable, os.path.join(here, "peer_proc.py"), *args],
                            stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})


class StallProxy:
    """TCP proxy to ``upstream`` that can stop forwarding one connection mid-stream.

    ``stall(client_port, nbytes)``: the connection from that local port of the client forwards only
    ``nbytes`` more bytes toward ``upstream`` and then stops reading from the client, as a peer that
    stopped reading would, until ``release()``; the other direction keeps flowing, and an end closed by
    either side (the upstream end, for a stalled connection) closes both. ``refuse_new``: connections
    arriving meanwhile are closed at once (a re-dial that cannot get through).
    """

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = self.listener.getsockname()
        self.limits: dict[int, int] = {}  # client port -> bytes still to forward
        self.stalled = threading.Event()  # set once a stalled connection stopped forwarding
        self.released = threading.Event()
        self.refuse_new = False
        self.lock = threading.Lock()
        self.socks: list[socket.socket] = []
        self.threads: list[threading.Thread] = []
        self._go(self._accept)

    def stall(self, client_port: int, nbytes: int) -> None:
        with self.lock:
            self.limits[client_port] = nbytes

    def release(self) -> None:
        self.released.set()

    def _go(self, fn: Callable[..., None], *args: object) -> None:
        t = threading.Thread(target=fn, args=args, name="stall-proxy", daemon=True)
        self.threads.append(t)
        t.start()

    def _accept(self) -> None:
        while True:
            try:
                c, addr = self.listener.accept()
            except OSError:
                return
            if self.refuse_new:
                c.close()
                continue
            try:
                u = socket.create_connection(self.upstream)
            except OSError:
                c.close()
                continue
            with self.lock:
                self.socks += [c, u]
            self._go(self._pump, c, u, addr[1])
            self._go(self._pump, u, c, None)

    def _pump(self, a: socket.socket, b: socket.socket, port: int | None) -> None:
        try:
            while data := a.recv(1 << 16):
                with self.lock:
                    limit = self.limits.get(port) if port is not None else None
                    if limit is not None:
                        self.limits[port] = max(0, limit - len(data))  # type: ignore[index]
                if limit is not None and limit < len(data):
                    b.sendall(data[:limit])
                    self.stalled.set()
                    self.released.wait()  # not reading from the client meanwhile
                    with self.lock:
                        self.limits.pop(port, None)  # type: ignore[arg-type]
                    data = data[limit:]
                b.sendall(data)
        except OSError:
            pass
        for s in (a, b):  # closed, not only shut down: unread bytes make it a reset, as a peer's close would
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def close(self) -> None:
        self.released.set()
        try:
            self.listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.listener.close()
        with self.lock:
            socks = list(self.socks)
        for s in socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()
        for t in self.threads:
            t.join(5)


def has_ipv6_loopback() -> bool:
    """This host can bind ``::1`` (IPv6 tests skip otherwise)."""
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


def bench_verdict(r: subprocess.CompletedProcess[str]) -> str:
    """A failed ``kvwire-bench`` run, short enough for an assertion message: its stderr and, from a ``-J``
    document, the top-level error and the verification verdict (each failed request's reason), else the
    end of its output. A whole run document would be cut before the part that says what went wrong."""
    try:
        doc = json.loads(r.stdout)
    except ValueError:
        return r.stderr + r.stdout[-3000:]
    verdict = {"error": doc.get("error"), "verification": (doc.get("kv") or {}).get("verification")}
    return r.stderr + json.dumps(verdict, indent=1)


@contextlib.contextmanager
def serving(server: Any) -> Iterator[int]:
    """A ``uvicorn.Server`` (``server``) on a fresh 127.0.0.1 port in a thread; yields the port; stops it after."""
    sock = socket.create_server(("127.0.0.1", 0), backlog=1024)
    t = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    t.start()
    end = time.monotonic() + 10
    while not server.started and time.monotonic() < end:
        time.sleep(0.02)
    assert server.started
    try:
        yield sock.getsockname()[1]
    finally:
        server.should_exit = True
        t.join(10)
        sock.close()


def read_response(c: socket.socket, timeout: float = 5.0) -> tuple[int, bytes]:
    """One HTTP response's status and body (Content-Length framed) from ``c``."""
    c.settimeout(timeout)
    data = b""
    while b"\r\n\r\n" not in data:
        part = c.recv(4096)
        if not part:
            raise ConnectionError(f"closed after {data[:60]!r}")
        data += part
    head, _, rest = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(rest) < length:
        part = c.recv(4096)
        if not part:
            raise ConnectionError("closed mid-body")
        rest += part
    assert len(rest) == length, "more than one response"
    return int(head.split(b" ", 2)[1]), rest


def closed_by_peer(c: socket.socket) -> bool:
    """Whether the server closed (or aborted) ``c``; never blocks."""
    try:
        c.setblocking(False)
        while True:
            data = c.recv(4096)
            if not data:
                return True
    except BlockingIOError:
        return False
    except OSError:
        return True
    finally:
        c.settimeout(5)


class HoldingStage:
    """A receiver chunk stage holding the first chunk it sees (its payload already in the destination) until
    ``release`` is set, so a test can act while a lane is mid-chunk; ``log`` records the stage's exit ("stage out")
    beside ``done`` (pass it as a handle's done callback)."""

    def __init__(self) -> None:
        self.entered, self.release = threading.Event(), threading.Event()
        self.log: list[str] = []

    def outgoing(self, ref: ChunkRef, pieces: list[memoryview]) -> list[memoryview]:
        return pieces

    def incoming(self, ref: ChunkRef, views: list[memoryview]) -> None:
        if not self.entered.is_set():
            self.entered.set()
            self.release.wait(20)
            self.log.append("stage out")

    def done(self, _future: object) -> None:
        self.log.append("done")


async def node_like_app(scope: Any, receive: Any, send: Any) -> None:
    """An ASGI app for the PrfaaS HTTP gate tests, to put behind ``ControlAuth`` as the node's routes are:
    ``/big`` streams 8 MiB in 64 KiB pieces (as ``/generate`` streams its tokens), any other path answers
    ``{"ok": true}``."""
    if scope["path"] == "/big":
        piece = b"x" * (64 << 10)
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-length", str(128 * len(piece)).encode())]})
        for n in range(128):
            await send({"type": "http.response.body", "body": piece, "more_body": n < 127})
        return
    out = b'{"ok": true}'
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(out)).encode())]})
    await send({"type": "http.response.body", "body": out})
