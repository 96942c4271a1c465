"""The ``kvwire-bench -s`` server: a kvwire Receiver plus the bench's control port.

Owns: accepting control connections (one test at a time, like iperf3), the allocator that places each
incoming transfer in a bounded pool buffer sized from its manifest, checking every received byte
against the run's pattern on a verifier thread, and reporting per-request results (state, verification,
per-layer verified-at-receiver times on this host's monotonic clock) and a CPU/memory summary back over
the control connection. A client that vanishes ends its test; its transfers are cancelled and their
buffers return to the pool, and the server goes on serving. Must not know: how the client paces layers,
reports or plots.
"""

from __future__ import annotations

import queue
import resource
import secrets
import socket
import ssl
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .. import __version__
from ..codec.manifest import Manifest
from ..codec.transfer import State
from ..congestion.tcpinfo import LaneCounters
from ..errors import InsecureReceiverWarning, PoolExhausted
from ..metrics import Metrics, MetricsServer
from ..sockopts import default_congestion, no_delay
from ..tcp.gate import HandshakeGate, Ticket
from ..tcp.receiver import IncomingTransfer, Receiver
from ..tcp.wire import host_port, listen
from .control import Channel, server_handshake
from .errors import BenchError, PeerError, PeerGone
from .options import KEY_ENV
from .payload import Pattern
from .pool import BufferPool, Lease
from .sampler import lane_addresses

HEARTBEAT_TIMEOUT = 10.0
#: control connections: at most this many at once (one runs a test, the rest are told "busy" or are
#: mid-handshake); of those at most MAX_HANDSHAKES unauthenticated (half per source, the oldest of the
#: busiest source cut to make room), each cut after CONTROL_HANDSHAKE_TIMEOUT s in all.
MAX_CONTROL_CONNECTIONS = 32
MAX_HANDSHAKES = 16
CONTROL_HANDSHAKE_TIMEOUT = 5.0


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


@dataclass
class ServerConfig:
    bind: str = "0.0.0.0"
    port: int = 5211
    data_port: int = 5212
    key: bytes = b""
    ssl_context: ssl.SSLContext | None = None
    pool_bytes: int = 16 * 1024**3
    verify_seed: int | None = None
    one_off: bool = False
    peer_timeout: float = HEARTBEAT_TIMEOUT
    #: serve kvwire.Metrics for the receiver and the buffer pool on (bind, metrics_port); None: off
    metrics_port: int | None = None
    #: called once per test with its record (``-J`` on the server prints a document built from it)
    on_test: Callable[[dict[str, Any]], None] | None = None


@dataclass
class _Test:
    run: str
    ch: Channel
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
    reverse: dict[str, Any] | None = None  # -R: the sending side's record (document or error)
    reverse_thread: threading.Thread | None = None

    def send(self, op: str, **fields: Any) -> None:
        try:
            self.ch.send(op, **fields)
        except OSError:
            pass  # the control reader notices and ends the test


@dataclass
class _Check:
    """The pattern check of one incoming transfer: which layers' byte ranges passed, what failed."""

    test: _Test
    h: IncomingTransfer
    ranges: dict[int, tuple[int, int]]  # layer -> flat byte range
    checked: set[int] = field(default_factory=set)
    bytes_checked: int = 0
    bad_blocks: int = 0
    first_bad: int = -1
    cpu: float = 0.0
    finished: bool = False


class BenchServer:
    """Listens at once; ``serve()`` runs until ``close()`` (or after one test with ``one_off``)."""

    def __init__(self, cfg: ServerConfig, log: Callable[[str], None] = print) -> None:
        self.cfg = cfg
        self.log = log
        self.pool = BufferPool(cfg.pool_bytes)
        self._lock = threading.Lock()
        self._tests: dict[str, _Test] = {}
        self._active: _Test | None = None
        self._leases: dict[str, Lease] = {}
        self._verify_q: queue.Queue[tuple[_Check, int | None] | None] = queue.Queue()
        self._closed = threading.Event()
        self._shut = False
        self.last_test_ok: bool | None = None
        self._gate = HandshakeGate(MAX_HANDSHAKES, MAX_HANDSHAKES // 2, CONTROL_HANDSHAKE_TIMEOUT)
        self._listener = listen(cfg.bind, cfg.port)
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", InsecureReceiverWarning)
                self.rx = Receiver(cfg.bind, cfg.data_port, key=cfg.key, ssl_context=cfg.ssl_context,
                                   allocator=self._allocate, on_transfer=self._on_transfer,
                                   peer_timeout=cfg.peer_timeout)
        except BaseException:
            self._listener.close()
            raise
        #: listening beyond loopback with no key or client certificates (``insecure_warning`` says so)
        self.insecure = any(issubclass(w.category, InsecureReceiverWarning) for w in caught)
        self.address: tuple[str, int] = self._listener.getsockname()[:2]
        self.data_address: tuple[str, int] = self.rx.address
        self.metrics_server: MetricsServer | None = None
        if cfg.metrics_port is not None:
            metrics = Metrics()
            metrics.watch(self.rx, name="kvwire-bench")
            metrics.gauge("kvwire_bench_pool_held_bytes", "Destination buffer bytes held by the pool.",
                          lambda: self.pool.held_bytes)
            try:
                self.metrics_server = metrics.serve(cfg.bind, cfg.metrics_port)
            except BaseException:
                self.rx.close()
                self._listener.close()
                raise
        self._verifier = threading.Thread(target=self._verify_loop, name="kvwire-bench-verify", daemon=True)
        self._verifier.start()

    def insecure_warning(self) -> str:
        """The warning ``kvwire-bench -s`` prints when anyone who reaches its ports can run tests on it."""
        ports = f"ports {self.address[1]} and {self.data_address[1]}"
        return (f"kvwire-bench: warning: listening on {self.address[0]} ({ports}) without --key or client "
                f"certificates: anyone who can reach them can run tests here and make this server hold up to "
                f"{self.cfg.pool_bytes / 2**30:.1f} GiB of buffers (--pool-bytes); pass --key (or "
                f"${KEY_ENV}), or -B 127.0.0.1")

    # ---------------------------------------------------------------- serving
    def serve(self) -> int:
        """Accept control connections until closed. Returns 0, or 1 when a one-off test failed."""
        self._listener.settimeout(0.5)
        threads: list[threading.Thread] = []
        while not self._closed.is_set():
            self._gate.reap()
            try:
                sock, addr = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                break
            threads = [x for x in threads if x.is_alive()]
            if len(threads) >= MAX_CONTROL_CONNECTIONS:
                sock.close()
                continue
            ticket = self._gate.admit(sock, addr[0])
            peer = host_port(addr)
            t = threading.Thread(target=self._client, args=(sock, ticket, peer),
                                 name="kvwire-bench-ctl", daemon=True)
            t.start()
            threads.append(t)
        for t in threads:
            t.join(5)
        return 0 if self.last_test_ok in (None, True) else 1

    def stop(self) -> None:
        """Ask ``serve()`` to return (safe from a signal handler); then call ``close()``."""
        self._closed.set()

    def close(self) -> None:
        self._closed.set()
        with self._lock:
            if self._shut:
                return
            self._shut = True
        try:
            self._listener.close()
        except OSError:
            pass
        self._gate.close()
        with self._lock:
            tests = list(self._tests.values())
        for test in tests:
            test.ch.close()
        self.rx.close()
        if self.metrics_server is not None:
            self.metrics_server.close()
        self._verify_q.put(None)
        self._verifier.join(5)

    def _client(self, sock: socket.socket, ticket: Ticket, peer: str) -> None:
        test: _Test | None = None
        try:
            no_delay(sock)
            sock.settimeout(CONTROL_HANDSHAKE_TIMEOUT)  # per read; the gate cuts the handshake in all
            if self.cfg.ssl_context is not None:
                # wrap without I/O first, so the gate can cut a TLS handshake that dribbles
                sock = ticket.sock = self.cfg.ssl_context.wrap_socket(sock, server_side=True,
                                                                      do_handshake_on_connect=False)
                sock.do_handshake()
            ch = Channel(sock, peer)
            run = secrets.token_hex(4)
            server_handshake(ch, self.cfg.key, {"data_port": self.data_address[1], "run": run,
                                                "server": f"kvwire-bench {__version__}",
                                                "pool_bytes": self.cfg.pool_bytes},
                             ticket.deadline)
            self._gate.done(ticket)
            with self._lock:
                busy = self._active
                if busy is None:
                    test = self._active = _Test(run, ch, peer)
                    self._tests[run] = test
            if busy is not None:
                ch.send("error", reason=f"server busy with a test for {busy.peer}; try again when it ends")
                ch.close()
                return
            ch.send("ok")
            self.log(f"Accepted connection from {peer} (test {run})")
            self._serve_test(test)  # type: ignore[arg-type]
        except (PeerError, PeerGone, OSError, ssl.SSLError) as e:
            stage = "during the handshake (wrong --key, TLS mismatch or not a kvwire-bench client)" \
                if test is None else "mid-test"
            self.log(f"Connection from {peer} ended {stage}: {type(e).__name__}: {e or 'timed out'}")
        finally:
            self._gate.done(ticket)
            if test is not None:
                self._end_test(test)
            else:
                try:
                    sock.close()
                except OSError:
                    pass

    def _serve_test(self, test: _Test) -> None:
        ch = test.ch
        while True:
            msg = ch.recv(timeout=self.cfg.peer_timeout)
            op = msg["op"]
            if op == "hb":
                continue
            if op == "ping":
                ch.send("pong", t=msg.get("t"), ts=time.monotonic())
            elif op == "prepare":
                self._prepare(test, msg)
            elif op == "start":
                reset_peak_rss()
                ru = resource.getrusage(resource.RUSAGE_SELF)
                test.cpu0, test.wall0 = (ru.ru_utime, ru.ru_stime), time.monotonic()
                test.rss_base = proc_status_bytes("VmRSS")
                ch.send("started", ts=test.wall0)
            elif op == "end":
                ch.send("summary", **self._summary(test))
            elif op == "reverse":
                self._start_reverse(test, msg)
            elif op == "bye":
                if test.reverse_thread is not None:
                    test.reverse_thread.join(5)
                test.completed = True
                return
            else:
                ch.send("error", reason=f"unknown op {op!r}")

    def _prepare(self, test: _Test, msg: dict[str, Any]) -> None:
        size, count, seed = msg.get("size"), msg.get("count"), msg.get("seed")
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (size, count, seed)):
            test.ch.send("error", reason="prepare needs int size, count and seed")
            return
        assert isinstance(size, int) and isinstance(count, int) and isinstance(seed, int)
        if size < 0 or not 0 < count <= 1024:
            test.ch.send("error", reason="prepare: size or count out of range")
            return
        t = time.monotonic()
        test.pattern = Pattern(self.cfg.verify_seed if self.cfg.verify_seed is not None else seed)
        try:
            fresh = self.pool.prefault(size, count)
        except PoolExhausted as e:
            test.ch.send("error", reason=str(e))
            return
        took = time.monotonic() - t
        self.log(f"Test {test.run}: {count} destination buffer(s) of {size / 1e6:.1f} MB ready in {took:.1f} s "
                 f"({fresh} newly faulted in)")
        test.ch.send("prepared", fresh=fresh, seconds=took)

    def _start_reverse(self, test: _Test, msg: dict[str, Any]) -> None:
        """``-R``: this server sends to the receiver the client started (see ``reverse``)."""
        from .reverse import serve_reverse

        if test.reverse_thread is not None:
            test.ch.send("error", reason="one reverse run per test")
            return
        try:
            peer_host = str(test.ch.sock.getpeername()[0])
        except OSError as e:
            test.ch.send("error", reason=f"cannot tell the client's address: {e}")
            return

        def run() -> None:
            test.reverse = serve_reverse(test.send, lambda: test.alive, peer_host, self.cfg.key, msg, self.log)

        test.reverse_thread = threading.Thread(target=run, name="kvwire-bench-reverse", daemon=True)
        test.reverse_thread.start()

    def _sample_lanes(self, test: _Test) -> None:
        """Read each known receiver lane socket's ``bytes_received`` (a closed one's last reading stands)."""
        for lane in test.lane_bytes.lanes():
            for sock in test.lane_bytes.sockets(lane):
                test.lane_bytes.read(lane, sock)

    def _lane_totals(self, test: _Test) -> list[dict[str, Any]]:
        self._sample_lanes(test)
        counters = test.lane_bytes
        return [{"socket": lane, "bytes": counters.total(lane, "bytes_received"),
                 "sockets": len(counters.sockets(lane))} for lane in sorted(counters.lanes())]

    def _summary(self, test: _Test) -> dict[str, Any]:
        with test.cond:
            test.cond.wait_for(lambda: test.outstanding == 0, timeout=30.0)
        ru = resource.getrusage(resource.RUSAGE_SELF)
        return {
            "lanes": self._lane_totals(test),
            "cpu_user": ru.ru_utime - test.cpu0[0],
            "cpu_system": ru.ru_stime - test.cpu0[1],
            "verify_cpu": test.verify_cpu,
            "wall": time.monotonic() - test.wall0,
            "rss_peak": proc_status_bytes("VmHWM"),
            "rss_base": test.rss_base,
            "pool_bytes": self.pool.held_bytes,
            "requests_ok": test.requests_ok,
            "requests_failed": test.requests_failed,
            "bytes_verified": test.bytes_verified,
            "first_begin": test.first_begin,
            "last_verified": test.last_verified,
            "congestion": default_congestion(),
        }

    def _end_test(self, test: _Test) -> None:
        with self._lock:
            test.alive = False
            self._tests.pop(test.run, None)
            if self._active is test:
                self._active = None
            handles = list(test.handles.values())
        for h in handles:
            if not h.finished:
                h.cancel("the kvwire-bench client went away")
        test.ch.close()
        ok = test.completed and test.requests_failed == 0
        if test.reverse is not None:
            ok = test.completed and bool(test.reverse.get("verified"))
        if test.completed:
            self.log(f"Test {test.run} from {test.peer}: {test.requests_ok} requests verified, "
                     f"{test.requests_failed} failed, {test.bytes_verified} bytes checked byte for byte")
        else:
            self.log(f"Test {test.run} from {test.peer} ended before completing; still serving")
        self.last_test_ok = ok
        if self.cfg.on_test is not None:
            try:
                self.cfg.on_test(self._record(test))
            except Exception as e:  # noqa: BLE001 - a report must not stop the server
                self.log(f"test report: {type(e).__name__}: {e}")
        if self.cfg.one_off:
            self._closed.set()

    def _record(self, test: _Test) -> dict[str, Any]:
        """What this side saw of a finished test (the server's ``-J`` document is built from it)."""
        if test.reverse is not None:
            return {"role": "sender", "run": test.run, "peer": test.peer, "completed": test.completed,
                    **test.reverse}
        ru = resource.getrusage(resource.RUSAGE_SELF)
        return {"role": "receiver", "run": test.run, "peer": test.peer, "completed": test.completed,
                "accepted_at": test.accepted_at, "data_port": self.data_address[1],
                "lanes": self._lane_totals(test),
                "connected": sorted(test.connected.values(), key=lambda c: (c["socket"], c["local_port"])),
                "results": list(test.results), "wall0": test.wall0,
                "cpu_user": ru.ru_utime - test.cpu0[0], "cpu_system": ru.ru_stime - test.cpu0[1],
                "verify_cpu": test.verify_cpu, "rss_peak": proc_status_bytes("VmHWM"),
                "rss_base": test.rss_base, "pool_bytes": self.pool.held_bytes,
                "requests_ok": test.requests_ok, "requests_failed": test.requests_failed,
                "bytes_verified": test.bytes_verified, "first_begin": test.first_begin,
                "last_verified": test.last_verified, "congestion": default_congestion()}

    # ---------------------------------------------------------------- transfers
    def _test_of(self, request_id: str) -> _Test | None:
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
        # kvwire.tcp.receiver acknowledges a layer's last chunk before it records the layer as ready, so
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
        if self.cfg.on_test is not None:
            test.results.append(result)
        test.send("result", **result)
