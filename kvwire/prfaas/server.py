"""The reference PrfaaS prefill server: prefill instances that stream each layer's KV to decode peers.

Owns: the job queue and the prefill instances (one worker thread each), the pluggable layer producer
(``SimulatedPrefill`` by default: paced by a ``PrefillProfile``, filling the ``workload`` pattern; a
real engine plugs in its stager), one kvwire ``Session`` per decode peer (reused, re-dialled after a
failure), per-request reports (queue, prefill, exposed transfer tail, bytes) and a ``LinkMonitor`` on all
sessions' lane sockets, whose ``LinkState`` it hands to whoever routes (the ``Router``).
Uses only kvwire's public API plus ``LinkMonitor``/``LinkState``.
Must not know: routing policy, thresholds, the throughput model's search, or kvwire internals.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import kvwire

from ..codec.layout import Segment
from ..congestion.control import LinkControl
from ..congestion.controller import ControllerConfig
from ..congestion.estimator import LinkEstimator, LinkState
from ..congestion.group import LaneGroup
from ..congestion.monitor import LinkMonitor
from ..metrics import Metrics
from ..probe import probe
from .model import PrefillProfile
from .sessions import Peer, SessionPool
from .workload import segment_pattern

log = logging.getLogger("kvwire.prfaas")



@dataclass(frozen=True)
class PrefillJob:
    """One request to prefill: its kvwire request, the decode peer, and the length that paces compute."""

    request: kvwire.RequestSpec
    peer: Peer
    length: float  # incremental tokens as the profile counts them (may differ from request.num_tokens)
    submitted: float


#: ``producer(job, layer, segments)`` returns the layer's buffers (one per segment, in order) once the
#: layer is computed; it runs on the instance's thread and may block for the compute.
LayerProducer = Callable[[PrefillJob, int, Sequence[Segment]], Sequence[Any]]


@dataclass
class JobReport:
    request_id: str
    peer: Peer
    bytes: int
    queued_s: float  # submit → an instance picks it up
    prefill_s: float  # first layer started → last layer handed to kvwire
    tail_s: float  # last layer handed over → decode side confirmed every byte (exposed transfer)
    state: str  # kvwire.State value: done / failed / timed_out / cancelled
    reason: str = ""

    @property
    def ok(self) -> bool:
        return self.state == kvwire.State.DONE.value


class SimulatedPrefill:
    """Default producer: sleeps T_prefill(length) × time_scale spread evenly over the layers, then fills
    each segment with ``workload.segment_pattern`` (what the decode side checks)."""

    def __init__(self, layout: kvwire.ModelLayout, profile: PrefillProfile, time_scale: float = 1.0) -> None:
        self.layout = layout
        self.profile = profile
        self.time_scale = time_scale
        self._started: dict[str, float] = {}
        self._lock = threading.Lock()

    def __call__(self, job: PrefillJob, layer: int, segments: Sequence[Segment]) -> list[Any]:
        rid = job.request.request_id
        now = time.monotonic()
        with self._lock:  # layers of one job come in order from one thread; jobs run side by side
            if layer == 0:
                self._started[rid] = now
            start = self._started.get(rid, now)
            if layer == self.layout.num_layers - 1:
                self._started.pop(rid, None)
        per_layer = self.profile.t_prefill(job.length) * self.time_scale / self.layout.num_layers
        delay = start + (layer + 1) * per_layer - now
        if delay > 0:
            time.sleep(delay)
        return [segment_pattern(rid, seg) for seg in segments]


@dataclass
class _Slot:
    job: PrefillJob
    future: Future[JobReport] = field(default_factory=Future)


class PrfaasServer:
    """``submit(request, peer)`` → ``Future[JobReport]``; ``link_state()`` for the router; ``close()``.

    One session per decode peer, shared by the instances. ``link_control``: pace the decode sessions
    with one ``LinkControl`` of that config over a ``LaneGroup`` of them all — they share the egress, so
    one controller measures and splits it instead of one per peer competing for it (across datacenters:
    otherwise every burst of unpaced lanes fills the bottleneck queue, which the router reads as
    congestion); the first session is measured with ``probe_seconds`` of ``kvwire.probe`` first, if
    positive (that probe warms its lanes: it is not warmed again as it opens; later sessions are).
    ``metrics``: report sessions, the link control ("egress"), the link and the queue depth.
    """

    def __init__(self, layout: kvwire.ModelLayout, producer: LayerProducer | None = None, *,
                 profile: PrefillProfile | None = None, instances: int = 1, lanes: int = 4,
                 key: bytes | str | None = None, transfer_timeout: float = 120.0,
                 monitor_interval: float = 0.1, estimator: LinkEstimator | None = None,
                 session_options: dict[str, Any] | None = None, metrics: Metrics | None = None,
                 link_control: ControllerConfig | None = None, probe_seconds: float = 0.0) -> None:
        if producer is None:
            if profile is None:
                raise ValueError("give a producer, or a profile for the simulated one")
            producer = SimulatedPrefill(layout, profile)
        self.layout = layout
        self.producer = producer
        self.lanes = lanes
        self.key = key
        self.transfer_timeout = transfer_timeout
        self.session_options = dict(session_options or {})
        self.link_control = link_control
        self.probe_seconds = probe_seconds
        self._group = LaneGroup()
        self._sessions = SessionPool(self._dial, name="PrfaaS server", on_new=self._join, on_drop=self._group.remove)
        self._egress: LinkControl | None = None  # over _group, from the first session on
        self._egress_lock = threading.Lock()
        self._lock = threading.Lock()
        self._jobs: queue.Queue[_Slot | None] = queue.Queue()
        self._waiting = 0
        self._running = 0
        self._closed = False
        self._subscribers: list[Callable[[LinkState], None]] = []
        self.monitor = LinkMonitor(self._sessions.lane_sockets, interval=monitor_interval, estimator=estimator)
        self.monitor.subscribe(self._from_monitor)
        self.monitor.start()
        self.metrics = metrics
        self._unregister: list[Callable[[], None]] = []
        if metrics is not None:  # the link to the decode side, the queue, and each session as it opens
            metrics.watch(self.monitor, name="prfaas")
            me = weakref.ref(self)  # the gauge must not keep a dropped server alive
            self._unregister.append(metrics.gauge(
                "kvwire_prfaas_queue_depth", "Requests waiting for or in prefill.",
                lambda: None if (srv := me()) is None else srv.queue_depth))
        self._workers = [threading.Thread(target=self._work, name=f"prfaas-instance{i}", daemon=True)
                         for i in range(instances)]
        for w in self._workers:
            w.start()

    # ------------------------------------------------------------ public
    def submit(self, request: kvwire.RequestSpec, peer: Peer, length: float | None = None) -> Future[JobReport]:
        job = PrefillJob(request, peer, float(request.num_tokens if length is None else length), time.monotonic())
        slot = _Slot(job)
        with self._lock:
            if self._closed:
                raise kvwire.KvwireError("PrfaaS server closed")
            self._waiting += 1
        self._jobs.put(slot)
        return slot.future

    @property
    def queue_depth(self) -> int:
        """Requests waiting for an instance or being prefilled (the paper's PrfaaS queue depth)."""
        with self._lock:
            return self._waiting + self._running

    @property
    def waiting(self) -> int:
        """Requests waiting for an instance (what the router's short loop counts as a queue)."""
        with self._lock:
            return self._waiting

    def lane_sockets(self) -> list[Any]:
        """Every live lane socket of every decode-peer session (what the LinkMonitor samples)."""
        return self._sessions.lane_sockets()

    def link_state(self) -> LinkState | None:
        """The egress as the router should see it: the egress ``LinkControl``'s estimate once there is
        one (``link_control``: it paces the lanes, so it knows the capacity even when no queue shows
        it), else the ``LinkMonitor``'s over every lane."""
        egress = self._egress
        state = egress.latest() if egress is not None else None
        return state if state is not None else self.monitor.latest()

    def subscribe(self, callback: Callable[[LinkState], None]) -> Callable[[], None]:
        """``callback(state)`` for every new ``link_state()`` (on a monitor thread); returns unsubscribe."""
        with self._lock:
            self._subscribers.append(callback)

        def unsubscribe() -> None:
            with self._lock:
                if callback in self._subscribers:
                    self._subscribers.remove(callback)
        return unsubscribe

    def _from_monitor(self, state: LinkState) -> None:
        if self._egress is None:
            self._publish(state)

    def _publish(self, state: LinkState) -> None:
        with self._lock:
            subscribers = list(self._subscribers)
        for cb in subscribers:
            try:
                cb(state)
            except Exception:
                log.exception("prfaas: link subscriber %r failed", cb)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        for _ in self._workers:
            self._jobs.put(None)
        for w in self._workers:
            w.join(30)
        self.monitor.stop()
        for remove in self._unregister:
            remove()
        with self._egress_lock:
            egress, self._egress = self._egress, None
        if egress is not None:
            egress.close()
        self._sessions.close()

    def __enter__(self) -> PrfaasServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------ internals
    def _dial(self, peer: Peer) -> kvwire.Session:
        options = dict(self.session_options)
        if self.link_control is not None and self.probe_seconds > 0 and self._egress is None:
            # the egress's first session: ``_join`` probes it for ``probe_seconds``, which warms its lanes too;
            # warming it as it opens as well would probe it twice (later sessions are warmed as usual)
            options.setdefault("warm", False)
        return kvwire.connect(peer[0], peer[1], lanes=self.lanes, key=self.key, **options)

    def _join(self, session: kvwire.Session, peer: Peer) -> None:
        """Report a new decode session to ``metrics`` and put it under the egress's ``LinkControl``
        (``link_control``), which the first session starts, after measuring the link for
        ``probe_seconds`` if asked (a probe that failed or stayed below the link leaves the in-band
        probe to LinkControl)."""
        name = f"{peer[0]}:{peer[1]}"
        if self.metrics is not None:
            self.metrics.watch(session, name=name)
        if self.link_control is None:
            return
        with self._egress_lock:
            if self._egress is not None:
                self._group.add(session)
                return
            capacity = None
            if self.probe_seconds > 0:
                try:
                    p = probe(session, seconds=self.probe_seconds)
                    capacity = p.capacity if p.saturated else None
                except kvwire.KvwireError as e:
                    log.warning("probe of %s failed: %s", name, e)
            if capacity is not None:  # the router's view of the egress knows it too: utilization from the start
                self.monitor.seed_capacity(capacity)
            self._group.add(session)
            egress = LinkControl(self._group, self.link_control, interval=self.monitor.interval,
                                        capacity=capacity)
            egress.subscribe(self._publish)
            self._egress = egress
        if self.metrics is not None:
            self.metrics.watch(self._egress, name="egress")

    def _work(self) -> None:
        while True:
            slot = self._jobs.get()
            if slot is None:
                return
            with self._lock:
                self._waiting -= 1
                self._running += 1
            try:
                self._prefill(slot)
            except Exception as e:  # a failed job must still resolve; the instance keeps serving
                log.exception("prfaas: %s failed", slot.job.request.request_id)
                if not slot.future.done():
                    job = slot.job
                    slot.future.set_result(JobReport(job.request.request_id, job.peer, 0,
                                                     0.0, 0.0, 0.0, kvwire.State.FAILED.value, repr(e)))
            finally:
                with self._lock:
                    self._running -= 1

    def _prefill(self, slot: _Slot) -> None:
        job = slot.job
        started = time.monotonic()
        segments = kvwire.plan_segments(self.layout, job.request)
        by_layer: dict[int, list[Segment]] = {}
        for seg in segments:
            by_layer.setdefault(seg.layer, []).append(seg)
        out = self._sessions.get(job.peer).send(self.layout, job.request, timeout=self.transfer_timeout)
        keep: list[Any] = []  # buffers must outlive the transfer
        try:
            for layer in range(self.layout.num_layers):
                bufs = self.producer(job, layer, by_layer.get(layer, []))
                if layer in by_layer:
                    out.write_layer(layer, bufs)
                    keep.append(bufs)
            out.finish()
        except BaseException:
            out.cancel("prefill failed")
            raise
        produced = time.monotonic()
        nbytes = sum(s.nbytes for s in segments)

        def done(_: Future[Any]) -> None:
            keep.clear()
            slot.future.set_result(JobReport(job.request.request_id, job.peer, nbytes, started - job.submitted,
                                             produced - started, time.monotonic() - produced,
                                             out.state.value, out.reason))

        out.add_done_callback(done)
