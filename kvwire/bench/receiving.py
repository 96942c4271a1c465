"""The receiving side of a test, whichever end listens for the control connection: the bench's kvwire Receiver.

Owns: the kvwire ``Receiver`` and its allocator, which places each incoming transfer in a bounded pool
buffer sized from its manifest, checking every received byte against the run's pattern on a verifier
thread, the tests in progress (one at a time) and the receiving side's requests on a test's control
channel (``ping``, ``prepare``, ``start``, ``end``, ``bye``; ``serve`` hands any other message back to its
caller), reporting per-request results (state, verification, per-layer verified-at-receiver times on this
host's monotonic clock) and a CPU/memory summary back over that channel, and what it saw of a test
(``record``). A test that ends early has its transfers cancelled and their buffers returned to the pool.
Used by the bench server (the receiving end of a plain test) and by the client of a ``-R`` test (the
receiving end there). Must not know: who dialled whom, how the sending side paces layers, reports or plots.
"""

from __future__ import annotations

import queue
import resource
import socket
import ssl
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..codec import parity
from ..codec.manifest import Manifest
from ..codec.transfer import State
from ..congestion.tcpinfo import LaneCounters
from ..errors import InsecureReceiverWarning, PoolExhausted
from ..metrics import Metrics, MetricsServer
from ..sockopts import default_congestion
from ..tcp import IncomingTransfer, Receiver
from .control import BenchChannel
from .errors import BenchError
from .payload import Pattern
from .pool import BufferPool, Lease
from .sampler import lane_addresses

HEARTBEAT_TIMEOUT = 10.0


def proc_status_bytes(field_name: str) -> int | None:
    """A ``VmHWM``/``VmRSS``-style line of /proc/self/status, in bytes."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux ``clear_refs`` 5); False where that is not allowed."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _shut(sock: socket.socket, how: int) -> None:
    """Wake whoever reads ``sock`` without closing its descriptor (the base-class shutdown: an SSLSocket's
    own drops its SSL object under the reader)."""
    try:
        socket.socket.shutdown(sock, how)
    except OSError:
        pass


@dataclass
class ReceiverConfig:
    bind: str = "0.0.0.0"
    data_port: int = 5212
    key: bytes = b""
    ssl_context: ssl.SSLContext | None = None
    pool_bytes: int = 16 * 1024**3
    verify_seed: int | None = None
    peer_timeout: float = HEARTBEAT_TIMEOUT
    #: serve kvwire.metrics.Metrics for the receiver and the buffer pool on (bind, metrics_port); None: off
    metrics_port: int | None = None


@dataclass
class Test:
    """One test on the receiving side: its channel, transfers in progress, results and counters."""

    run: str
    ch: BenchChannel
    peer: str
    pattern: Pattern | None = None
    alive: bool = True
    handles: dict[str, IncomingTransfer] = field(default_factory=dict)
    outstanding: int = 0
    cond: threading.Condition = field(default_factory=threading.Condition)
    cpu0: tuple[float, float] = (0.0, 0.0)
    wall0: float = 0.0
    rss_base: int | None = None
    verify_cpu: float = 0.0
    requests_ok: int = 0
    requests_failed: int = 0
    bytes_verified: int = 0
    first_begin: float | None = None
    last_verified: float | None = None
    completed: bool = False
    accepted_at: float = field(default_factory=time.time)
    results: list[dict[str, Any]] = field(default_factory=list)
    lane_bytes: LaneCounters = field(default_factory=lambda: LaneCounters(("bytes_received",)))
    connected: dict[int, dict[str, Any]] = field(default_factory=dict)  # id(socket) -> its addresses
    reverse: dict[str, Any] | None = None  # -R: this end sent; the sending side's record (document or error)
    parity0: dict[str, int] = field(default_factory=dict)  # the receiver's tail parity counters at start

    def tell(self, op: str, **fields: Any) -> None:
        try:
            self.ch.tell(op, **fields)
        except OSError:
            pass  # the control reader notices and ends the test


@dataclass
class _Check:
    """The pattern check of one incoming transfer: which layers' byte ranges passed, what failed."""

    test: Test
    h: IncomingTransfer
    ranges: dict[int, tuple[int, int]]  # layer -> flat byte range
    checked: set[int] = field(default_factory=set)
    bytes_checked: int = 0
    bad_blocks: int = 0
    first_bad: int = -1
    cpu: float = 0.0
    finished: bool = False


class ReceivingSide:
    """Listens for data at once; tests come and go with ``open_test``/``serve``/``end_test``; ``close()``."""

    def __init__(self, cfg: ReceiverConfig, log: Callable[[str], None] = print, keep_results: bool = False) -> None:
        """``keep_results``: keep each request's result for ``record`` (the server's ``-J``)."""
        self.cfg = cfg
        self.log = log
        self.keep_results = keep_results
        self.pool = BufferPool(cfg.pool_bytes)
        self._lock = threading.Lock()
        self._slot_free = threading.Condition(self._lock)
        self._tests: dict[str, Test] = {}
        self._active: Test | None = None
        self._closing = False
        self._leases: dict[str, Lease] = {}
        self._verify_q: queue.Queue[tuple[_Check, int | None] | None] = queue.Queue()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", InsecureReceiverWarning)
            self.rx = Receiver(cfg.bind, cfg.data_port, key=cfg.key, ssl_context=cfg.ssl_context,
                               allocator=self._allocate, on_transfer=self._on_transfer,
                               peer_timeout=cfg.peer_timeout)
        #: listening beyond loopback with no key or client certificates (the server warns)
        self.insecure = any(issubclass(w.category, InsecureReceiverWarning) for w in caught)
        self.data_address: tuple[str, int] = self.rx.address
        self.metrics_server: MetricsServer | None = None
        #: what ``metrics_server`` serves (the server adds its control port's counts); None without metrics_port
        self.metrics: Metrics | None = None
        if cfg.metrics_port is not None:
            metrics = self.metrics = Metrics()
            metrics.watch(self.rx, name="kvwire-bench")
            metrics.gauge("kvwire_bench_pool_held_bytes", "Destination buffer bytes held by the pool.",
                          lambda: self.pool.held_bytes)
            try:
                self.metrics_server = metrics.serve(cfg.bind, cfg.metrics_port)
            except BaseException:
                self.rx.close()
                raise
        self._verifier = threading.Thread(target=self._verify_loop, name="kvwire-bench-verify", daemon=True)
        self._verifier.start()

    # ---------------------------------------------------------------- tests
    def open_test(self, run: str, ch: BenchChannel, peer: str,
                  wait: float = 0.0) -> tuple[Test | None, Test | None]:
        """``(the new test, None)``, or ``(None, the test in progress)`` when one is still running after
        ``wait`` s (a client that just said bye, or just closed, holds the slot until this side has read
        that: a client started right after it would otherwise be told "busy")."""
        with self._slot_free:
            self._slot_free.wait_for(lambda: self._active is None or self._closing, timeout=wait)
            if self._closing:
                raise OSError("the server is closing")
            busy = self._active
            if busy is not None:
                return None, busy
            test = self._active = self._tests[run] = Test(run, ch, peer)
        return test, None

    def serve(self, test: Test, deadline: float | None = None) -> dict[str, Any] | None:
        """Answer the sending side's requests on ``test``'s channel until it says ``bye`` (``None``, the test
        completed) or sends something that is not such a request (returned: the caller's to handle). Raises
        PeerError/PeerGone/OSError when the channel breaks or goes silent for ``peer_timeout`` s, and
        TimeoutError at ``deadline`` (``time.monotonic()``), however busy the peer keeps it."""
        ch = test.ch
        while True:
            wait = self.cfg.peer_timeout
            if deadline is not None:
                if (left := deadline - time.monotonic()) <= 0:
                    raise TimeoutError("past the deadline")
                wait = min(wait, left)
            msg = ch.recv(timeout=wait)
            op = msg["op"]
            if op == "hb":
                continue
            if op == "ping":
                ch.tell("pong", t0=msg.get("t0"), ts=time.monotonic())
            elif op == "prepare":
                self._prepare(test, msg)
            elif op == "start":
                reset_peak_rss()
                ru = resource.getrusage(resource.RUSAGE_SELF)
                test.cpu0, test.wall0 = (ru.ru_utime, ru.ru_stime), time.monotonic()
                test.rss_base = proc_status_bytes("VmRSS")
                test.parity0 = self._parity_counts()
                ch.tell("started", ts=test.wall0)
            elif op == "end":
                ch.tell("summary", **self._summary(test))
            elif op == "bye":
                test.completed = True
                return None
            else:
                return msg

    def _prepare(self, test: Test, msg: dict[str, Any]) -> None:
        size, count, seed = msg.get("size"), msg.get("count"), msg.get("seed")
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (size, count, seed)):
            test.ch.tell("error", reason="prepare needs int size, count and seed")
            return
        assert isinstance(size, int) and isinstance(count, int) and isinstance(seed, int)
        if size < 0 or not 0 < count <= 1024:
            test.ch.tell("error", reason="prepare: size or count out of range")
            return
        t = time.monotonic()
        test.pattern = Pattern(self.cfg.verify_seed if self.cfg.verify_seed is not None else seed)
        try:
            fresh = self.pool.prefault(size, count)
        except PoolExhausted as e:
            test.ch.tell("error", reason=str(e))
            return
        took = time.monotonic() - t
        self.log(f"Test {test.run}: {count} destination buffer(s) of {size / 1e6:.1f} MB ready in {took:.1f} s "
                 f"({fresh} newly faulted in)")
        test.ch.tell("prepared", fresh=fresh, seconds=took)

    def _sample_lanes(self, test: Test) -> None:
        """Read each known receiver lane socket's ``bytes_received`` (a closed one's last reading stands)."""
        for lane in test.lane_bytes.lanes():
            for sock in test.lane_bytes.sockets(lane):
                test.lane_bytes.read(lane, sock)

    def _lane_totals(self, test: Test) -> list[dict[str, Any]]:
        self._sample_lanes(test)
        counters = test.lane_bytes
        return [{"socket": lane, "bytes": counters.total(lane, "bytes_received"),
                 "sockets": len(counters.sockets(lane))} for lane in sorted(counters.lanes())]

    def _counts(self, test: Test) -> dict[str, Any]:
        """Lanes, CPU and memory since ``start``, and the verification counts."""
        ru = resource.getrusage(resource.RUSAGE_SELF)
        return {"lanes": self._lane_totals(test), "cpu_user": ru.ru_utime - test.cpu0[0],
                "cpu_system": ru.ru_stime - test.cpu0[1], "verify_cpu": test.verify_cpu,
                "rss_peak": proc_status_bytes("VmHWM"), "rss_base": test.rss_base, "pool_bytes": self.pool.held_bytes,
                "requests_ok": test.requests_ok, "requests_failed": test.requests_failed,
                "bytes_verified": test.bytes_verified, "first_begin": test.first_begin,
                "last_verified": test.last_verified, "congestion": default_congestion(),
                "parity": {k: n - test.parity0.get(k, 0) for k, n in self._parity_counts().items()}}

    def _parity_counts(self) -> dict[str, int]:
        """The receiver's tail parity counters (``Receiver.stats``), for this test's share of them."""
        st = self.rx.stats()
        return {k: int(st.get(k, 0)) for k in parity.COUNTERS}

    def _summary(self, test: Test) -> dict[str, Any]:
        """The ``summary`` the sending side asks for with ``end`` (once the last request is checked)."""
        with test.cond:
            test.cond.wait_for(lambda: test.outstanding == 0, timeout=30.0)
        return self._counts(test) | {"wall": time.monotonic() - test.wall0}

    def end_test(self, test: Test) -> None:
        """The test is over (completed or not): its unfinished transfers are cancelled (their buffers go back
        to the pool as they end); the channel is the caller's to close."""
        with self._lock:
            test.alive = False
            self._tests.pop(test.run, None)
            if self._active is test:
                self._active = None
                self._slot_free.notify()
            handles = list(test.handles.values())
        for h in handles:
            if not h.finished:
                h.cancel("the kvwire-bench client went away")

    def record(self, test: Test) -> dict[str, Any]:
        """What this side saw of a test: lanes, results, CPU, memory (the server's ``-J`` document is built
        from it)."""
        return self._counts(test) | {
            "accepted_at": test.accepted_at, "data_port": self.data_address[1], "wall0": test.wall0,
            "connected": sorted(test.connected.values(), key=lambda c: (c["socket"], c["local_port"])),
            "results": list(test.results)}

    def interrupt(self, reason: str = "this side is closing") -> None:
        """Take no more tests and wake each running test's control reader: its channel's read side is shut
        (the reader sees the end of the stream at once, ``reason`` in its PeerGone; the thread that owns the
        channel ends the test, may still write a last word to the peer, and closes it). Closing the
        descriptor here instead made a reader in another thread fail with EBADF (and could hit a descriptor
        reused meanwhile)."""
        with self._lock:
            self._closing = True
            self._slot_free.notify_all()
            tests = list(self._tests.values())
        for test in tests:
            test.ch.shut_reason = test.ch.shut_reason or reason
            _shut(test.ch.sock, socket.SHUT_RD)

    def close(self) -> None:
        """Stop: running tests' channels are shut both ways (their threads close them), then the data
        receiver, the metrics server and the verifier."""
        self.interrupt()
        with self._lock:
            tests = list(self._tests.values())
        for test in tests:
            _shut(test.ch.sock, socket.SHUT_RDWR)
        self.rx.close()
        if self.metrics_server is not None:
            self.metrics_server.close()
        self._verify_q.put(None)
        self._verifier.join(5)

    # ---------------------------------------------------------------- transfers
    def _test_of(self, request_id: str) -> Test | None:
        run = request_id.split("/", 1)[0]
        with self._lock:
            test = self._tests.get(run)
        return test if test is not None and test.alive else None

    def _allocate(self, m: Manifest) -> Any:
        """Receiver allocator: a pool buffer of exactly ``m.total_bytes`` for a running test's request."""
        rid = m.request.request_id
        test = self._test_of(rid)
        if test is None or test.pattern is None:
            raise BenchError(f"no prepared kvwire-bench test owns request {rid!r}")
        lease = self.pool.take(m.total_bytes)
        with self._lock:
            self._leases[rid] = lease
        return lease.view

    def _release(self, rid: str) -> None:
        """Back to the pool; only once the transfer is terminal (no lane writes into it any more)."""
        with self._lock:
            lease = self._leases.pop(rid, None)
        if lease is not None:
            self.pool.give(lease)

    def _on_transfer(self, h: IncomingTransfer) -> None:
        rid = h.request_id
        run = rid.split("/", 1)[0]
        with self._lock:
            test = self._tests.get(run)
            if test is not None:
                test.handles[rid] = h
        if test is None or h.plan is None:  # the client went away between the allocator and now
            h.add_done_callback(lambda _f: self._release(rid))
            h.cancel("the kvwire-bench client went away")
            return
        plan = h.plan
        ranges = {layer: (plan.offsets[r.start], plan.offsets[r.stop - 1] + plan.lengths[r.stop - 1])
                  for layer, r in plan.layer_chunks.items()}
        chk = _Check(test, h, ranges)
        for lane, sock in h.lane_sockets().items():
            if sock not in test.lane_bytes.sockets(lane):
                test.lane_bytes.read(lane, sock)
                if (addresses := lane_addresses(lane, sock)) is not None:
                    test.connected[id(sock)] = addresses
        self._sample_lanes(test)
        with test.cond:
            test.outstanding += 1
            if test.first_begin is None:
                test.first_begin = h.started
        if not test.alive:
            h.cancel("the kvwire-bench client went away")
        # each layer is checked as soon as the transport has verified it, so the pattern check runs
        # alongside the transfer and the buffer goes back to the pool right after the last layer
        h.on_layer(lambda layer: self._verify_q.put((chk, layer)))
        h.add_done_callback(lambda _f: self._verify_q.put((chk, None)))

    def _verify_loop(self) -> None:
        while True:
            item = self._verify_q.get()
            if item is None:
                return
            chk, layer = item
            if chk.finished:
                continue
            cpu = time.thread_time()
            try:
                if layer is not None:
                    self._check_layer(chk, layer)
                else:
                    self._finish(chk)
            except Exception as e:  # noqa: BLE001 - one bad request must not stop the verifier
                self.log(f"verifier: {type(e).__name__}: {e}")
            finally:
                chk.cpu += time.thread_time() - cpu
                if layer is None:
                    chk.finished = True
                    self._release(chk.h.request_id)
                    self._report(chk)

    def _check_layer(self, chk: _Check, layer: int) -> None:
        if layer in chk.checked or layer not in chk.ranges or chk.test.pattern is None:
            return
        with self._lock:
            lease = self._leases.get(chk.h.request_id)
        if lease is None:
            return
        lo, hi = chk.ranges[layer]
        v = chk.test.pattern.verify(lease.view, chk.h.request_id, lo, hi)
        chk.checked.add(layer)
        chk.bytes_checked += v.bytes_checked
        chk.bad_blocks += v.bad_blocks
        if v.first_bad_offset >= 0 and (chk.first_bad < 0 or v.first_bad_offset < chk.first_bad):
            chk.first_bad = v.first_bad_offset

    def _finish(self, chk: _Check) -> None:
        """The transfer is terminal: check what is left (all of it when it is done)."""
        h = chk.h
        if h.state is not State.DONE or not chk.test.alive:
            return
        # kvwire.tcp._receiver acknowledges a layer's last chunk before it records the layer as ready, so
        # the handle can resolve a moment before ``layer_times`` is complete: give it a moment
        end = time.monotonic() + 1.0
        while len(h.layer_times) < len(chk.ranges) and time.monotonic() < end:
            time.sleep(0.001)
        for layer in sorted(chk.ranges):
            self._check_layer(chk, layer)

    def _report(self, chk: _Check) -> None:
        h, test = chk.h, chk.test
        with self._lock:
            test.handles.pop(h.request_id, None)
        total = h.manifest.total_bytes if h.manifest is not None else 0
        ok = (h.state is State.DONE and chk.bad_blocks == 0 and chk.bytes_checked == total
              and len(chk.checked) == len(chk.ranges))
        times = sorted(h.layer_times.items())
        with test.cond:
            test.verify_cpu += chk.cpu
            if ok:
                test.requests_ok += 1
                test.bytes_verified += chk.bytes_checked
            else:
                test.requests_failed += 1
            if times:
                last = max(t for _, t in times)
                test.last_verified = max(test.last_verified or last, last)
            test.outstanding -= 1
            test.cond.notify_all()
        result = {"rid": h.request_id, "state": h.state.value, "reason": h.reason, "ok": ok, "bytes": total,
                  "checked": chk.bytes_checked, "bad_blocks": chk.bad_blocks, "first_bad": chk.first_bad,
                  "begun": h.started, "layers": [[layer, t] for layer, t in times], "verify_cpu": chk.cpu}
        if self.keep_results:
            test.results.append(result)
        test.tell("result", **result)
