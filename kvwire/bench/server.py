"""The ``kvwire-bench -s`` server: the listening role. It accepts control connections and runs each test in
the direction the client asks for.

Owns: the control port (one test at a time, like iperf3; at most ``MAX_CONTROL_CONNECTIONS`` connections, of
them ``MAX_HANDSHAKES`` unauthenticated, cut by a ``HandshakeGate``), the handshake (its authentication
failures counted, in ``kvwire_auth_failures_total`` with ``--metrics-port``) and the ``busy`` answer,
then the test: the receiving side (``receiving.ReceivingSide``) answers a sending client, or, when the client
asks ``reverse`` (``-R``), this end sends (``reverse.serve_reverse``) on the same control connection. A
client that vanishes ends its test and the server goes on serving; a server stopped (SIGTERM, Ctrl-C) ends the
test in progress at once and tells its client why. Logs one line per test and hands its record to
``on_test`` (``-J``). Must not know: how either direction measures, reports or plots.
"""

from __future__ import annotations

import secrets
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .. import __version__
from ..sockopts import no_delay
from ..tcp import HandshakeGate, Ticket, host_port, listen
from .control import BenchChannel, server_handshake
from .errors import PeerAuthFailed, PeerError, PeerGone
from .options import KEY_ENV
from .receiving import ReceiverConfig, ReceivingSide, Test
from .reverse import serve_reverse

#: control connections: at most this many at once (one runs a test, the rest are told "busy" or are
#: mid-handshake); of those at most MAX_HANDSHAKES unauthenticated (half per source, the oldest of the
#: busiest source cut to make room), each cut after CONTROL_HANDSHAKE_TIMEOUT s in all.
MAX_CONTROL_CONNECTIONS = 32
MAX_HANDSHAKES = 16
CONTROL_HANDSHAKE_TIMEOUT = 5.0
#: an authenticated client finding a test in progress waits this long for it to end before it is told "busy":
#: the slot is freed when this side reads the last client's bye or close, which back-to-back runs can beat
SLOT_WAIT = 2.0
#: on close (SIGTERM, Ctrl-C), how long the server waits for its connection threads once it has woken them
#: (a test's reader ends at once; one checking the last request's bytes or faulting in buffers takes longer)
STOP_WAIT = 5.0
#: what a client whose test the server stops is told
SHUTTING_DOWN = "the kvwire-bench server is shutting down"


@dataclass
class ServerConfig(ReceiverConfig):
    port: int = 5211
    one_off: bool = False
    #: called once per test with its record (``-J`` on the server prints a document built from it)
    on_test: Callable[[dict[str, Any]], None] | None = None


class BenchServer:
    """Listens at once; ``serve()`` runs until ``close()`` (or after one test with ``one_off``)."""

    def __init__(self, cfg: ServerConfig, log: Callable[[str], None] = print) -> None:
        self.cfg = cfg
        self.log = log
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._shut = False
        self._threads: list[threading.Thread] = []
        self.last_test_ok: bool | None = None
        self._gate = HandshakeGate(MAX_HANDSHAKES, MAX_HANDSHAKES // 2, CONTROL_HANDSHAKE_TIMEOUT)
        self._listener = listen(cfg.bind, cfg.port)
        try:
            self.side = ReceivingSide(cfg, log, keep_results=cfg.on_test is not None)
        except BaseException:
            self._listener.close()
            raise
        self.address: tuple[str, int] = self._listener.getsockname()[:2]
        self.data_address = self.side.data_address
        self.metrics_server = self.side.metrics_server
        #: control connections that failed authentication (a wrong --key); with --metrics-port they are in
        #: kvwire_auth_failures_total{listen="kvwire-bench-control"}, beside the data port's {listen="kvwire-bench"}
        self.auth_failures = 0
        if self.side.metrics is not None:
            self.side.metrics.counter("kvwire_auth_failures_total", "Connections that failed authentication.",
                                      lambda: self.auth_failures, listen="kvwire-bench-control")
        #: listening beyond loopback with no key or client certificates (``insecure_warning`` says so)
        self.insecure = self.side.insecure

    def insecure_warning(self) -> str:
        """The warning ``kvwire-bench -s`` prints when anyone who reaches its ports can run tests on it."""
        ports = f"ports {self.address[1]} and {self.data_address[1]}"
        return (f"kvwire-bench: warning: listening on {self.address[0]} ({ports}) without --key or client "
                f"certificates: anyone who can reach them can run tests here and make this server hold up to "
                f"{self.cfg.pool_bytes / 2**30:.1f} GiB of buffers (--pool-bytes); pass --key (or "
                f"${KEY_ENV}), or -B 127.0.0.1")

    # ---------------------------------------------------------------- serving
    def serve(self) -> int:
        """Accept control connections until closed (or, with ``one_off``, until the test ended). Returns 0,
        or 1 when a one-off test failed (or was stopped before it completed)."""
        self._listener.settimeout(0.5)
        while not self._closed.is_set():
            self._gate.reap()
            try:
                sock, addr = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                break
            with self._lock:
                self._threads = [x for x in self._threads if x.is_alive()]
                if len(self._threads) >= MAX_CONTROL_CONNECTIONS or self._closed.is_set():
                    sock.close()
                    continue
                ticket = self._gate.admit(sock, addr[0])
                peer = host_port(addr)
                t = threading.Thread(target=self._client, args=(sock, ticket, peer),
                                     name="kvwire-bench-ctl", daemon=True)
                t.start()
                self._threads.append(t)
        self._stop_clients()
        return 1 if self.cfg.one_off and self.last_test_ok is False else 0

    def stop(self) -> None:
        """Ask ``serve()`` to return (safe from a signal handler: it wakes a blocked ``accept``); a test in
        progress is ended, its client told the server is shutting down. Then call ``close()``."""
        self._closed.set()
        try:
            socket.socket.shutdown(self._listener, socket.SHUT_RDWR)  # accept() returns at once
        except OSError:
            pass

    def close(self) -> None:
        """Stop serving: no more connections, the tests in progress ended (their clients told why) and
        their threads waited for (``STOP_WAIT`` s at most), then the data port and the metrics closed."""
        self.stop()
        with self._lock:
            if self._shut:
                return
            self._shut = True
        try:
            self._listener.close()
        except OSError:
            pass
        self._stop_clients()
        self.side.close()

    def _stop_clients(self) -> None:
        """Cut the handshakes in progress, wake each running test's reader (its thread ends the test and
        tells the client why) and wait for the connection threads, ``STOP_WAIT`` s in all at most."""
        with self._lock:  # serve() admits no connection after this
            self._closed.set()
            threads = list(self._threads)
        self._gate.close()
        self.side.interrupt(SHUTTING_DOWN)
        end = time.monotonic() + STOP_WAIT
        for t in threads:
            if t is not threading.current_thread():
                t.join(max(0.0, end - time.monotonic()))

    def _client(self, sock: socket.socket, ticket: Ticket, peer: str) -> None:
        test: Test | None = None
        ch: BenchChannel | None = None
        authed = False
        try:
            no_delay(sock)
            sock.settimeout(CONTROL_HANDSHAKE_TIMEOUT)  # per read; the gate cuts the handshake in all
            if self.cfg.ssl_context is not None:
                # wrap without I/O first, so the gate can cut a TLS handshake that dribbles
                sock = ticket.sock = self.cfg.ssl_context.wrap_socket(sock, server_side=True,
                                                                      do_handshake_on_connect=False)
                sock.do_handshake()
            ch = BenchChannel(sock, peer)
            run = secrets.token_hex(4)
            server_handshake(ch, self.cfg.key, {"data_port": self.data_address[1], "run": run,
                                                "server": f"kvwire-bench {__version__}",
                                                "pool_bytes": self.cfg.pool_bytes},
                             ticket.deadline)
            authed = True
            self._gate.done(ticket)
            test, busy = self.side.open_test(run, ch, peer, wait=SLOT_WAIT)
            if busy is not None:
                ch.tell("error", reason=f"server busy with a test for {busy.peer}; try again when it ends")
                return
            assert test is not None
            ch.tell("ok")
            self.log(f"Accepted connection from {peer} (test {run})")
            self._run_test(test)
        except (PeerError, PeerGone, OSError, ssl.SSLError) as e:
            if isinstance(e, PeerAuthFailed):
                with self._lock:
                    self.auth_failures += 1
            if self._closed.is_set() and authed:
                # woken as the server closes: not the client's doing; it is told why
                assert ch is not None
                self._last_word(ch)
                self.log(f"Connection from {peer} closed{' mid-test' if test is not None else ''}: "
                         f"the server is shutting down")
            elif self._closed.is_set() and test is None:
                pass  # a handshake cut as the server closes: nothing to report
            else:
                stage = "during the handshake (wrong --key, TLS mismatch or not a kvwire-bench client)" \
                    if test is None else "mid-test"
                self.log(f"Connection from {peer} ended {stage}: {type(e).__name__}: {e or 'timed out'}")
        finally:
            self._gate.done(ticket)
            if test is not None:
                self._end_test(test)
            if ch is not None:
                ch.close()
            else:
                try:
                    sock.close()
                except OSError:
                    pass

    @staticmethod
    def _last_word(ch: BenchChannel) -> None:
        """Tell a client whose test (or wait for one) the server ends why, within a second: its reader takes it
        before the end of the stream (a plain test's client keeps its document, with this as the reason
        there is no summary; a ``-R`` client is refused with it)."""
        try:
            ch.sock.settimeout(1.0)
            ch.tell("error", reason=SHUTTING_DOWN)
        except (OSError, ValueError):
            pass

    def _run_test(self, test: Test) -> None:
        """The receiving side answers the client until it says bye, or asks this end to send (``-R``)."""
        while (msg := self.side.serve(test)) is not None:
            if msg["op"] != "reverse":
                test.ch.tell("error", reason=f"unknown op {msg['op']!r}")
                continue
            try:
                peer_host = str(test.ch.sock.getpeername()[0])
            except OSError as e:
                test.ch.tell("error", reason=f"cannot tell the client's address: {e}")
                continue
            test.reverse = serve_reverse(test.ch, test.run, peer_host, self.cfg.key, msg, self.log,
                                         pool=self.side.pool)
            test.completed = bool(test.reverse.get("completed"))
            return

    def _end_test(self, test: Test) -> None:
        self.side.end_test(test)
        ok = test.completed and test.requests_failed == 0
        if test.reverse is not None:
            ok = test.completed and bool(test.reverse.get("verified"))
        if test.completed:
            self.log(f"Test {test.run} from {test.peer}: {test.requests_ok} requests verified, "
                     f"{test.requests_failed} failed, {test.bytes_verified} bytes checked byte for byte")
        elif self._closed.is_set():
            self.log(f"Test {test.run} from {test.peer} ended before completing: {SHUTTING_DOWN}")
        else:
            self.log(f"Test {test.run} from {test.peer} ended before completing; still serving")
        self.last_test_ok = ok
        if self.cfg.on_test is not None:
            try:
                self.cfg.on_test(self._record(test))
            except Exception as e:  # noqa: BLE001 - a report must not stop the server
                self.log(f"test report: {type(e).__name__}: {e}")
        if self.cfg.one_off:
            self.stop()
            self.side.interrupt(SHUTTING_DOWN)  # a client waiting for the slot gets no second test

    def _record(self, test: Test) -> dict[str, Any]:
        """What this end saw of a finished test: the receiving side's record, or with ``-R`` the sending
        side's document."""
        if test.reverse is not None:
            return {"role": "sender", "run": test.run, "peer": test.peer, "completed": test.completed,
                    **{k: v for k, v in test.reverse.items() if k != "completed"}}
        return {"role": "receiver", "run": test.run, "peer": test.peer, "completed": test.completed,
                **self.side.record(test)}
