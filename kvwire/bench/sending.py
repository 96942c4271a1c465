"""The sending side of a test, whichever end dialled: one run against a receiving side, measured end to end.

Owns: building the request stream (KV mode: the model's layout, layer by layer, paced like a prefill;
raw mode: repeated transfers of the synthetic layout), filling each request's payload with the run's
pattern, driving ``kvwire.connect``/``send``/``write_layer``/``finish``, sampling lanes, pairing each
request with the receiving side's verification result and per-layer times (mapped onto this host's clock)
and collecting CPU usage; the order of a test's steps (``--probe`` before it, ``--adaptive``'s controller
for its length: ``adaptive`` does both). ``kvwire-bench -c`` runs it against the server; the server runs it
for ``-R``. Returns a ``RunResult``; it prints nothing (``report`` does). Must not know: the output formats,
how the server is started (``loopback``), argument parsing or the link controller's policy.
"""

from __future__ import annotations

import functools
import itertools
import resource
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from ..codec.layout import ModelLayout, RequestSpec
from ..errors import KvwireError, PoolExhausted, TransferError
from ..probe import path_skip_reason, start_capacity
from ..sockopts import SocketOptionError, get_congestion, set_knobs
from ..tcp import Session, connect
from .adaptive import Adaptive, control_bytes_sent, run_probe
from .errors import BadMessage, PeerError, PeerGone, UsageError
from .messages import read_summary
from .options import Options, client_ssl_context
from .payload import Pattern, PayloadPlan, load_model, raw_tokens
from .pool import BufferPool, Lease
from .requester import Requester
from .sampler import Sampler, lane_addresses

#: seconds the client still waits for the server's results and summary once its session has failed
GONE_GRACE = 5.0
#: how far outside the test a server's clock reading may land on this side's clock, beyond the offset's uncertainty
CLOCK_SLACK = 1.0


@dataclass
class RequestRecord:
    index: int
    request_id: str
    nbytes: int
    t0: float = 0.0  # client monotonic clock when send() was called
    produced: dict[int, float] = field(default_factory=dict)  # layer -> write_layer time
    done_at: float | None = None
    state: str = "pending"
    reason: str = ""
    fill_cpu: float = 0.0
    server: dict[str, Any] | None = None  # the server's result message

    @property
    def verified(self) -> bool:
        return self.state == "done" and self.server is not None and bool(self.server.get("ok"))


@dataclass
class RunResult:
    opts: Options
    layout: ModelLayout
    tokens: int
    plan: PayloadPlan
    welcome: dict[str, Any]
    data_port: int
    clock_offset: float  # server clock minus client clock
    clock_uncertainty: float
    t_start: float
    t_end: float
    requests: list[RequestRecord]
    intervals: list[dict[str, Any]]
    series: list[tuple[float, list[int]]]
    lanes: list[dict[str, Any]]
    connected: list[dict[str, Any]]
    control_wire_bytes: int
    cpu_user: float
    cpu_system: float
    fill_cpu: float  # payload filling inside the measured window (excluded from the sender's CPU)
    server: dict[str, Any]
    congestion: str
    error: str = ""
    probe: dict[str, Any] | None = None  # --probe: the probe's result (Probed.to_dict())
    link_control: dict[str, Any] | None = None  # --adaptive: the controller's summary (Adaptive.summary())
    tail_parity: int = 0  # the session's parity chunks per group of the last layer (--tail-parity, or its auto)
    #: the receiving side sent a message this side could not take (a field of the wrong type or out of range)
    #: after the test had started: what was measured is kept, ``error`` says why it ends there
    bad_message: BadMessage | None = None


Callback = Callable[[dict[str, Any]], None]


def resolve_layout(o: Options) -> tuple[ModelLayout, int]:
    """The layout and tokens per request the options ask for."""
    if o.model is None:
        return load_model("raw"), raw_tokens(o.length)
    try:
        return load_model(o.model, tp_size=o.tp), o.tokens
    except KvwireError as e:
        raise UsageError(f"--model {o.model!r}: {e}") from None


def _pacing(o: Options) -> int | None:
    """``--fq-rate`` (bits/s) as the per-lane pacing cap in bytes/s."""
    return max(1, o.fq_rate // 8) if o.fq_rate else None


def _knobs(o: Options) -> Callable[[socket.socket], None] | None:
    """What ``-C`` and ``--fq-rate`` set on a lane socket (``kvwire.sockopts``); ``None`` when neither is given."""
    if not (o.congestion or o.fq_rate):
        return None
    return functools.partial(set_knobs, congestion=o.congestion or None, pacing=_pacing(o))


class _Runner:
    """The request loop: ``concurrency`` workers, each with its own payload buffer."""

    def __init__(self, o: Options, session: Session, ctl: Requester, layout: ModelLayout, tokens: int,
                 plan: PayloadPlan, pattern: Pattern, on_request: Callback | None, leases: list[Lease],
                 max_seconds: float | None = None) -> None:
        self.o, self.session, self.ctl, self.layout, self.tokens = o, session, ctl, layout, tokens
        self.plan, self.pattern, self.on_request = plan, pattern, on_request
        self.total = plan.total_bytes
        self.buffers = [lease.view for lease in leases]
        self.max_seconds = max_seconds  # no request starts this long after the test began
        self.filled: dict[int, str] = {}  # worker -> request id its buffer holds
        self.records: list[RequestRecord] = []
        self._lock = threading.Lock()
        self._counter = itertools.count()
        self._started_bytes = 0
        self.t_start = 0.0

    def rid(self, k: int) -> str:
        return f"{self.ctl.run}/{k}"

    def prefill(self) -> float:
        """Fill the first request of each worker before the clock starts. Returns CPU seconds."""
        cpu = time.thread_time()
        for w in range(self.o.concurrency):
            self.pattern.fill(self.buffers[w][: self.total], self.rid(w))
            self.filled[w] = self.rid(w)
        return time.thread_time() - cpu

    def _next(self) -> int | None:
        with self._lock:
            if self.session.failure:
                return None
            k = next(self._counter)
            o = self.o
            if o.requests is not None and k >= o.requests:
                return None
            if o.duration is not None and time.monotonic() >= self.t_start + o.duration:
                return None
            if self.max_seconds is not None and time.monotonic() >= self.t_start + self.max_seconds:
                return None
            if o.nbytes is not None and self._started_bytes >= o.nbytes:
                return None
            self._started_bytes += self.total
            return k

    def _unverified(self) -> int:
        """Requests started and not failed at the sender whose server result has not arrived."""
        with self._lock:
            recs = list(self.records)
        return sum(1 for r in recs if r.state != "failed" and r.request_id not in self.ctl.results)

    def _wait_for_room(self) -> bool:
        """Until at most ``concurrency - 1`` other requests wait for the server's check; False (start nothing
        more) once the session failed, ``-t`` ran out or ``--timeout`` passed first. A frozen server answers no
        check and its control channel stays open: the wait re-checks every second, and a client whose server
        was stopped (SIGSTOP) had printed empty intervals for 20 s past its -t, waiting out the 300 s timeout."""
        o, deadline = self.o, time.monotonic() + self.o.timeout
        while not self.ctl.wait_until(lambda: self._unverified() <= o.concurrency - 1,
                                      min(1.0, max(0.0, deadline - time.monotonic()))):
            now = time.monotonic()
            if (self.session.failure or now >= deadline or self.ctl.error is not None
                    or (o.duration is not None and now >= self.t_start + o.duration)):
                return False
        return self.ctl.error is None

    def run(self) -> None:
        self.t_start = time.monotonic()
        workers = [threading.Thread(target=self._worker, args=(w,), name=f"kvwire-bench-req{w}", daemon=True)
                   for w in range(self.o.concurrency)]
        for t in workers:
            t.start()
        for t in workers:
            t.join()

    def _worker(self, w: int) -> None:
        buf = self.buffers[w][: self.total]
        views = self.plan.layer_views(buf)
        step = self.o.prefill_ms / 1000.0
        while True:
            k = self._next()
            if k is None:
                return
            # at most `concurrency` requests may wait for the server's check besides this one: the server
            # holds concurrency + 1 pre-faulted buffers, and a lagging check must pace the sender, not
            # make the server fault fresh buffers mid-transfer
            if not self._wait_for_room():
                return
            rec = RequestRecord(k, self.rid(k), self.total)
            with self._lock:
                self.records.append(rec)
            if self.filled.get(w) != rec.request_id:
                cpu = time.thread_time()
                self.pattern.fill(buf, rec.request_id)
                rec.fill_cpu = time.thread_time() - cpu
                self.filled[w] = rec.request_id
            self.ctl.expect_result(rec.request_id)
            rec.t0 = time.monotonic()
            try:
                h = self.session.send(self.layout, RequestSpec(rec.request_id, self.tokens, self.tokens),
                                      timeout=self.o.timeout, hashing=self.o.hashing)
                for layer in self.layout.layers:
                    i = layer.index
                    if step > 0:
                        wait = rec.t0 + (i + 1) * step - time.monotonic()
                        if wait > 0:
                            time.sleep(wait)
                    if i in views:
                        h.write_layer(i, views[i])
                    rec.produced[i] = time.monotonic()
                h.finish()
                h.result(self.o.timeout + 5.0)
                rec.state = "done"
            except (TransferError, KvwireError, TimeoutError, OSError) as e:
                rec.state, rec.reason = "failed", f"{type(e).__name__}: {e}"
            rec.done_at = time.monotonic()
            if self.on_request is not None:
                self.on_request({"request_id": rec.request_id, "state": rec.state, "reason": rec.reason,
                                 "seconds": rec.done_at - rec.t0, "bytes": rec.nbytes})


def run_sender(o: Options, on_start: Callback | None = None, on_interval: Callback | None = None,
               on_request: Callback | None = None, progress: Callable[[str], None] | None = None,
               ctl: Requester | None = None, pool: BufferPool | None = None,
               max_seconds: float | None = None) -> RunResult:
    """Run one test: the sending side. Raises PeerError/UsageError before the test starts; failures during
    it are recorded (a message from the receiving side that is not what it must be ends the test early, as
    its ``bad_message``). ``progress(line)`` is told what the set-up is doing while it takes seconds (buffers,
    payloads). ``ctl``: the control channel to the receiving side when the caller has one (``-R``: the
    server sends over the client's connection; it stays the caller's to close), else this dials
    ``o.host``/``o.port``. ``pool``: the payload buffers are taken from it (``-R``: the server's pool, so
    ``--pool-bytes`` bounds them; a test whose ``concurrency`` payloads do not fit is refused with a
    UsageError before anything is allocated or dialled) and given back at the end; else they are the
    process's own. ``max_seconds``: no request starts later than this after the test began (``-R``: the
    server's bound on one test), and a ``--prefill-ms-per-layer`` pacing one request longer is refused."""
    say = progress or (lambda _line: None)
    layout, tokens = resolve_layout(o)
    plan = PayloadPlan.build(layout, RequestSpec("plan", tokens, tokens))
    if plan.total_bytes == 0:
        raise UsageError(f"a request of {tokens} tokens of {layout.name} carries no bytes")
    if pool is not None and -(-plan.total_bytes // 8) * 8 * o.concurrency > pool.cap_bytes:
        raise UsageError(f"{o.concurrency} payload(s) of {plan.total_bytes} bytes exceed the sending side's "
                         f"buffer pool of {pool.cap_bytes} bytes (--pool-bytes on the server)")
    if max_seconds is not None and o.prefill_ms / 1000.0 * len(layout.layers) > max_seconds:
        raise UsageError(f"--prefill-ms-per-layer {o.prefill_ms:g} paces one request of {len(layout.layers)} "
                         f"layers past the sending side's {max_seconds:g} s bound")
    ssl_context = client_ssl_context(o)
    owned = ctl is None
    if ctl is None:
        say(f"Setting up: connecting to {o.host} port {o.port}")
        ctl = Requester.connect(o.host, o.port, o.key, ssl_context, o.connect_timeout)
    session: Session | None = None
    adaptive: Adaptive | None = None
    leases: list[Lease] = []
    try:
        offset, uncertainty = ctl.clock_offset()
        session = _open_session(o, ctl.data_port, ssl_context)
        knobs = _knobs(o)
        try:  # with --adaptive: -C only, checked here; the controller sets the lanes from then on
            for sock in session.lane_sockets() if knobs is not None else ():
                set_knobs(sock, congestion=o.congestion or None, pacing=_pacing(o))
        except KvwireError as e:
            raise UsageError(str(e)) from None
        o = replace(o, warm=resolve_warm(session, o))
        probed = run_probe(session, o) if o.probe_seconds is not None or o.warm else None
        if o.adaptive:
            knobs = None  # lanes opened or re-dialled get the controller's settings, not these
            # (--warm seeds as kvwire.connect's warm-up does: from a pipe seen full, by a queue or BBR's rule, or
            # a floor from a burst that ran long enough: kvwire.probe.start_capacity; --probe from a queue only)
            seed = None if probed is None else (start_capacity(probed.result) if o.warm
                                                else probed.result.capacity if probed.result.saturated else None)
            adaptive = Adaptive(session, o, capacity=seed or None,
                                delivered=probed.result.delivered if probed is not None and o.warm else None)
        # one buffer more than the requests in flight: a finished request's buffer is still being checked
        # when the next one arrives, and a fresh buffer would be page-faulted in the middle of a transfer
        buffers = o.concurrency + 1 if o.requests is None else min(o.concurrency + 1, o.requests)
        t = time.monotonic()
        say(f"Setting up: the server prepares {buffers} destination buffer(s) of {plan.total_bytes / 1e6:.1f} MB")
        ctl.call("prepare", "prepared", timeout=600.0, size=plan.total_bytes, count=buffers, seed=o.seed)
        congestion = _congestion_of(session)
        say(f"Setting up: server ready in {time.monotonic() - t:.1f} s; filling {o.concurrency} payload(s) of "
            f"{plan.total_bytes / 1e6:.1f} MB here")
        t = time.monotonic()
        leases = _take_buffers(pool, plan.total_bytes, o.concurrency)
        runner = _Runner(o, session, ctl, layout, tokens, plan, Pattern(o.seed), on_request, leases, max_seconds)
        runner.prefill()
        say(f"Setting up: payloads ready in {time.monotonic() - t:.1f} s")
        connected = [c for lane in session.lane_info() if (c := lane_addresses(lane.index, lane.sock)) is not None]
        if on_start is not None:
            on_start({"connected": connected, "welcome": ctl.welcome, "layout": layout, "tokens": tokens,
                      "bytes_per_request": plan.total_bytes, "data_port": ctl.data_port,
                      "congestion": congestion}
                     | ({"probe": probed.to_dict()} if probed is not None else {})
                     | ({"link_control": adaptive.config_info()} if adaptive is not None else {}))
        ctl.call("start", "started")
        ru0 = resource.getrusage(resource.RUSAGE_SELF)
        t_start = time.monotonic()
        if adaptive is not None:
            adaptive.start(t_start)
        sampler = Sampler(session.lane_info, o.interval, t_start, on_interval, knobs,
                          extra=adaptive.interval_extra if adaptive is not None else None)
        sampler.start()
        runner.t_start = t_start
        runner.run()
        ru1 = resource.getrusage(resource.RUSAGE_SELF)
        t_end = max([r.done_at for r in runner.records if r.done_at is not None], default=time.monotonic())
        sampler.stop(t_end)
        link_control = None
        if adaptive is not None:
            adaptive.close()
            link_control = adaptive.summary()
        done = [r.request_id for r in runner.records if r.state == "done"]
        results = _wait_results(ctl, session, done, timeout=120.0)
        others = ctl.wait_results([r.request_id for r in runner.records if r.state != "done"], timeout=1.0)
        for rec in runner.records:
            rec.server = results.get(rec.request_id) or others.get(rec.request_id)
        end_error = ""
        bad: BadMessage | None = None
        try:  # a server whose session already failed is likely gone: do not wait long for its summary
            summary = read_summary(ctl.call("end", "summary", timeout=GONE_GRACE if session.failure else 60.0),
                                   ctl.who)
        except (PeerGone, PeerError) as e:  # the run is recorded all the same, every request with its state
            summary, end_error = {}, f"no summary from the server: {e}"
            if isinstance(e, BadMessage):
                bad = e
        if bad is None and isinstance(ctl.error, BadMessage):  # a result, or a flood of messages
            bad = ctl.error
        late = _drop_implausible_times(summary, runner.records, offset, t_start - uncertainty - CLOCK_SLACK,
                                       time.monotonic() + uncertainty + CLOCK_SLACK, ctl.who)
        if late is not None:  # the document says so, as for any bad message after the start
            bad, end_error = bad or late, "; ".join(x for x in (end_error, str(late)) if x)
        lanes = sampler.lane_totals()
        if probed is not None:
            probed.exclude(lanes, summary.get("lanes") or [])
        ctrl_sent = control_bytes_sent(session)
        if probed is not None:
            ctrl_sent = max(0, ctrl_sent - probed.control_bytes)
        fill_cpu = sum(r.fill_cpu for r in runner.records)
        return RunResult(
            opts=o, layout=layout, tokens=tokens, plan=plan, welcome=ctl.welcome, data_port=ctl.data_port,
            clock_offset=offset, clock_uncertainty=uncertainty, t_start=t_start, t_end=t_end,
            requests=sorted(runner.records, key=lambda r: r.index), intervals=sampler.intervals,
            series=sampler.series, lanes=lanes, connected=connected,
            control_wire_bytes=ctrl_sent,
            cpu_user=ru1.ru_utime - ru0.ru_utime, cpu_system=ru1.ru_stime - ru0.ru_stime, fill_cpu=fill_cpu,
            server=summary, congestion=congestion, error="; ".join(x for x in (session.failure, end_error) if x),
            probe=probed.to_dict() if probed is not None else None, link_control=link_control,
            tail_parity=session.tail_parity, bad_message=bad)
    finally:
        if adaptive is not None:
            adaptive.close()
        if session is not None:
            session.close()
        if pool is not None:
            for lease in leases:
                pool.give(lease)
        if owned:
            ctl.close()


def _drop_implausible_times(summary: dict[str, Any], records: list[RequestRecord], offset: float, lo: float,
                            hi: float, who: str) -> BadMessage | None:
    """Removes the server's clock readings (``summary.last_verified``, each result's layer times) that land outside
    ``[lo, hi]`` once moved onto this side's clock, and names the first in a BadMessage: a reading before the test
    began or after its summary came is a broken or lying server, and kept it would skew goodput and exposed tails
    (a ``last_verified`` at the server's boot made the receive time 1e-9 s). None when all are in range."""
    first: str | None = None

    def outside(t: float) -> bool:
        return not lo <= t - offset <= hi

    last = summary.get("last_verified")
    if isinstance(last, (int, float)) and outside(last):
        first = f"summary.last_verified: {last - offset - lo:+.3f} s from the test's start on this side's clock"
        del summary["last_verified"]
    for rec in records:
        layers = (rec.server or {}).get("layers") or []
        if any(outside(t) for _, t in layers):
            first = first or (f"result.layers of {rec.request_id}: a layer verified outside the test "
                              "on this side's clock")
            rec.server = {**(rec.server or {}), "layers": [x for x in layers if not outside(x[1])]}
    return None if first is None else BadMessage(f"{who} sent a bad {first}")


def _take_buffers(pool: BufferPool | None, size: int, count: int) -> list[Lease]:
    """``count`` payload buffers of ``size`` bytes: from ``pool`` when given (a PoolExhausted is a UsageError;
    those taken go back), else fresh ones."""
    if pool is None:
        own = BufferPool(-(-size // 8) * 8 * count)
        return [own.take(size) for _ in range(count)]
    leases: list[Lease] = []
    try:
        for _ in range(count):
            leases.append(pool.take(size))
    except PoolExhausted as e:
        for lease in leases:
            pool.give(lease)
        raise UsageError(f"the sending side's buffers: {e}") from None
    return leases


def _wait_results(ctl: Requester, session: Session, rids: list[str], timeout: float) -> dict[str, Any]:
    """The server's results for ``rids``: up to ``timeout``, or ``GONE_GRACE`` once the session has
    failed (the server is likely gone, and its results with it)."""
    end = time.monotonic() + timeout
    while True:
        left = end - time.monotonic()
        got = ctl.wait_results(rids, min(1.0, max(0.0, left)))
        if len(got) == len(rids) or left <= 0 or ctl.error is not None:
            return got
        if session.failure:
            return ctl.wait_results(rids, min(GONE_GRACE, max(0.0, left)))


def _open_session(o: Options, port: int, ssl_context: ssl.SSLContext | None) -> Session:
    """``kvwire.connect`` to the server's data port; failures become a PeerError naming the port."""
    try:
        return connect(o.host, port, lanes=o.lanes, key=o.key, ssl_context=ssl_context,
                       server_hostname=o.tls_name or o.host, chunk_size=o.chunk_size,
                       hashing=o.hashing, connect_timeout=max(o.connect_timeout, 2.0),
                       tail_parity=o.tail_parity,
                       link_control=False)  # the test attaches its own (Adaptive) when o.adaptive
    except (KvwireError, OSError) as e:
        raise PeerError(f"kvwire data connection to {o.host}:{port} failed: {type(e).__name__}: {e}") from None


def resolve_warm(session: Session, o: Options) -> bool:
    """``--warm``/``--no-warm`` as given; neither: as ``kvwire.connect()`` warms a session, with the link
    controller on, no ``--probe``, and nothing against the path (``kvwire.probe.path_skip_reason``: a path of
    ``WARM_MIN_RTT`` or more, a receiver that takes probes, ``$KVWIRE_WARM`` not off). The bench's session is
    opened without a controller (the test attaches its own), so ``warm_skip_reason`` would always say no."""
    if o.warm is not None:
        return o.warm
    return o.adaptive and o.probe_seconds is None and not path_skip_reason(session)


def _congestion_of(session: Session) -> str:
    socks = session.lane_sockets()
    try:
        return get_congestion(socks[0]) if socks else ""
    except SocketOptionError:
        return ""


__all__ = ["RequestRecord", "RunResult", "resolve_layout", "run_sender"]
