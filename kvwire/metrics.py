"""Prometheus metrics: kvwire's counters and the link signals, read when scraped.

    metrics = Metrics()                           # from kvwire.metrics import Metrics
    metrics.watch(session, name="decode-7")       # a Session: what it sent
    metrics.watch(receiver)                       # a Receiver: what it took in
    metrics.watch(link_control, name="dc2")       # a LinkControl (or LinkMonitor): the LinkState
    metrics.gauge("myengine_queue_depth", "Requests waiting.", lambda: engine.queue_depth)
    metrics.counter("kvwire_auth_failures_total", "...", lambda: n, listen="mine")  # counted elsewhere
    server = metrics.serve("0.0.0.0", 9464)       # GET /metrics; server.close()

Owns: which objects are reported (held weakly: a closed, dropped session simply disappears), samples the
caller reads itself (``gauge``, ``counter``: a counter named like one of kvwire's joins that family), the
text exposition format (0.0.4) with its escaping, and a small threaded HTTP server (bounded connections,
each with a deadline). Must not know:
the wire format or transport internals; it reads ``stats()``, ``latest()`` and ``decision`` only.
Nothing is counted on the data path here: the transport keeps its own counters and this pulls them.
"""

from __future__ import annotations

import math
import re
import threading
import weakref
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler
from itertools import chain
from typing import Any

from ._args import check_port
from .codec.rxengine import REFUSALS
from .codec.transfer import TERMINAL_STATES
from .congestion.control import LinkControl
from .congestion.monitor import LinkMonitor
from .tcp import GatedHTTPServer, HandshakeGate, Receiver, Session

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# (metric, type, help, stats key) per role; counters end in _total
_SENDER = (
    ("kvwire_sent_bytes_total", "counter", "Payload bytes put on the lanes, re-sends included.", "bytes_sent"),
    ("kvwire_sent_chunks_total", "counter", "Chunks put on the lanes, re-sends included.", "chunks_sent"),
    ("kvwire_nacked_chunks_total", "counter", "Chunks the receiver's hash check rejected (re-sent).",
     "chunks_nacked"),
    ("kvwire_requeued_chunks_total", "counter", "Chunks in flight on a lane that died (re-sent on others).",
     "chunks_requeued"),
    ("kvwire_lane_reconnects_total", "counter", "Lanes re-dialled after a failure.", "lane_reconnects"),
    ("kvwire_retransmitted_segments_total", "counter",
     "TCP segments retransmitted on the session's lanes (lanes closed since included).", "retransmits"),
    ("kvwire_sender_lanes_alive", "gauge", "Connected lanes.", "lanes_alive"),
    ("kvwire_sender_lanes_active", "gauge", "Lanes pulling chunks (the rest are parked).", "lanes_active"),
    ("kvwire_sender_transfers_in_flight", "gauge", "Transfers started and not yet ended.", "transfers_in_flight"),
)
_RECEIVER = (
    ("kvwire_received_bytes_total", "counter", "Payload bytes received and verified.", "bytes_received"),
    ("kvwire_received_probe_bytes_total", "counter", "Capacity-probe bytes received and discarded.",
     "probe_bytes_received"),
    ("kvwire_rejected_chunks_total", "counter", "Chunks that failed their hash check (NACKed).", "chunks_rejected"),
    ("kvwire_parity_chunks_total", "counter", "Tail parity chunks received and verified.", "parity_chunks"),
    ("kvwire_rebuilt_chunks_total", "counter", "Data chunks rebuilt from tail parity before their copy arrived.",
     "chunks_rebuilt"),
    ("kvwire_auth_failures_total", "counter", "Connections that failed authentication.", "auth_failures"),
    ("kvwire_refused_connections_total", "counter", "Connections closed at once: over the bounds.",
     "connections_refused"),
    ("kvwire_handshakes_cut_total", "counter",
     "Unauthenticated connections cut: past the handshake deadline or to make room for a newer one.",
     "handshakes_cut"),
    ("kvwire_receiver_sessions", "gauge", "Authenticated sessions.", "sessions"),
    ("kvwire_receiver_lanes", "gauge", "Connected lanes over all sessions.", "lanes"),
    ("kvwire_receiver_transfers_in_flight", "gauge", "Transfers begun and not yet ended.", "transfers_in_flight"),
)
_BUILTIN_GAUGES = frozenset(m for m, kind, _, _ in (*_SENDER, *_RECEIVER) if kind == "gauge")
# LinkState attribute -> (metric, help)
_LINK = (
    ("goodput", "kvwire_link_goodput_bytes_per_second", "Payload delivery rate over the lanes."),
    ("btl_bw", "kvwire_link_bottleneck_bytes_per_second", "Windowed max of goodput (BBR's bottleneck bandwidth)."),
    ("capacity", "kvwire_link_capacity_bytes_per_second", "Probed or configured capacity of the path."),
    ("available_bw", "kvwire_link_available_bytes_per_second", "Headroom: capacity minus goodput."),
    ("competing_bw", "kvwire_link_competing_bytes_per_second", "What other traffic takes of the capacity."),
    ("utilization", "kvwire_link_utilization_ratio", "Goodput over capacity."),
    ("queueing_ratio", "kvwire_link_queueing_ratio", "Smoothed RTT over min RTT (1: no queue)."),
    ("min_rtt", "kvwire_link_min_rtt_seconds", "Minimum RTT seen on the lanes."),
    ("srtt", "kvwire_link_srtt_seconds", "Smoothed RTT of the lanes."),
    ("loss_rate", "kvwire_link_loss_ratio", "Retransmitted over sent bytes."),
    ("busy", "kvwire_link_busy_ratio", "Fraction of the window the lanes had data to send."),
    ("congested", "kvwire_link_congested", "1 while the estimator flags the link as congested."),
    ("max_queue", "kvwire_link_max_queue_seconds",
     "Deepest queue the bottleneck has shown it holds (from its overflows), in seconds at the capacity."),
    ("stalled", "kvwire_link_stalled",
     "1 while the queue reads deeper than the bottleneck holds, without loss: delay elsewhere (a busy host)."),
)


def escape(value: str) -> str:
    """A label value as the text format wants it: backslash, double quote and newline escaped."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _fmt(v: float) -> str:
    if isinstance(v, bool):
        return "1" if v else "0"
    if isinstance(v, int):
        return str(v)
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return repr(float(v))


class Metrics:
    """A set of watched sessions, receivers and link controls, rendered on demand (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._watched: list[tuple[str, str, weakref.ref[Any]]] = []  # (role, name, object)
        # metric -> (kind, help, [(labels, read)]): the caller's own samples (gauge, counter)
        self._custom: dict[str, tuple[str, str, list[tuple[str, Callable[[], float | None]]]]] = {}

    def watch(self, obj: Session | Receiver | LinkControl | LinkMonitor, name: str | None = None) -> None:
        """Report ``obj`` under the label ``name`` (default: its peer or listening address). A
        ``LinkMonitor`` gives the link signals without a controller's lanes, pacing and mode."""
        if isinstance(obj, Session):
            role, default = "sender", f"{obj.address[0]}:{obj.address[1]}"
        elif isinstance(obj, Receiver):
            role, default = "receiver", f"{obj.address[0]}:{obj.address[1]}"
        elif isinstance(obj, (LinkControl, LinkMonitor)):
            role, default = "link", "link"
        else:
            raise TypeError(f"can watch a Session, Receiver, LinkControl or LinkMonitor, not {type(obj).__name__}")
        with self._lock:
            self._watched.append((role, name or default, weakref.ref(obj)))

    def gauge(self, metric: str, text: str, read: Callable[[], float | None], **labels: str) -> Callable[[], None]:
        """One more gauge sample, ``read()`` at each scrape (None, or an exception: no sample). Samples
        of one ``metric`` with different ``labels`` share its family (the first ``text`` is its help).
        Returns ``remove()``: the sample is no longer rendered (its family goes with its last sample)."""
        if not re.fullmatch(r"[a-zA-Z_:][a-zA-Z0-9_:]*", metric) or metric.endswith("_total"):
            raise ValueError(f"bad gauge name {metric!r}")
        return self._add("gauge", metric, text, read, labels)

    def counter(self, metric: str, text: str, read: Callable[[], float | None], **labels: str) -> Callable[[], None]:
        """One more counter sample (``metric`` ends in ``_total``; ``read()`` returns the count so far), as
        ``gauge`` otherwise. Named like one of kvwire's own counters (``kvwire_auth_failures_total`` ...), the
        sample joins that family: what a caller counts itself (a handshake of its own) shows up where an
        operator already looks; its ``labels`` must then differ from those of the watched objects' samples."""
        if not re.fullmatch(r"[a-zA-Z_:][a-zA-Z0-9_:]*_total", metric) or metric in _BUILTIN_GAUGES:
            raise ValueError(f"bad counter name {metric!r}")
        return self._add("counter", metric, text, read, labels)

    def _add(self, kind: str, metric: str, text: str, read: Callable[[], float | None],
             labels: dict[str, str]) -> Callable[[], None]:
        if not all(re.fullmatch(r"[a-zA-Z_][a-zA-Z0-9_]*", k) for k in labels):
            raise ValueError(f"bad label names {sorted(labels)}")
        entry = (",".join(f'{k}="{escape(v)}"' for k, v in labels.items()), read)
        with self._lock:
            self._custom.setdefault(metric, (kind, text, []))[2].append(entry)

        def remove() -> None:
            with self._lock:
                family = self._custom.get(metric)
                if family is not None and entry in family[2]:
                    family[2].remove(entry)
                    if not family[2]:
                        del self._custom[metric]
        return remove

    def _live(self, role: str) -> Iterator[tuple[str, Any]]:
        with self._lock:
            self._watched = [w for w in self._watched if w[2]() is not None]
            items = [(name, ref()) for r, name, ref in self._watched if r == role]
        return ((name, obj) for name, obj in items if obj is not None)

    def render(self) -> str:
        """The text exposition of everything watched (one HELP/TYPE per family, families in order)."""
        out: list[str] = []
        with self._lock:
            custom = {m: (kind, text, list(samples)) for m, (kind, text, samples) in self._custom.items()}

        def own(metric: str) -> Iterator[tuple[str, float]]:
            """The caller's samples of one of kvwire's families (rendered with it, not again after)."""
            family = custom.pop(metric, None)
            return _read_all(family[2]) if family is not None else iter(())

        for role, label, table in (("sender", "peer", _SENDER), ("receiver", "listen", _RECEIVER)):
            stats = [(name, obj.stats()) for name, obj in self._live(role)]
            for metric, kind, text, key in table:
                _family(out, metric, kind, text,
                        chain(((f'{label}="{escape(n)}"', st[key]) for n, st in stats), own(metric)))
            family = "kvwire_sent_transfers_total" if role == "sender" else "kvwire_received_transfers_total"
            for prefix, metric, text in (("transfers", family, "Transfers ended, by terminal state."),
                                         ("probes", family.replace("transfers", "probes"),
                                          "Capacity probes ended, by terminal state.")):
                _family(out, metric, "counter", text,
                        chain(((f'{label}="{escape(n)}",state="{t}"', st[f"{prefix}_{t}"])
                               for n, st in stats for t in TERMINAL_STATES), own(metric)))
            if role == "receiver":
                _family(out, "kvwire_refused_transfers_total", "counter",
                        f"Transfers refused before they began, by reason ({', '.join(REFUSALS)}).",
                        chain(((f'{label}="{escape(n)}",reason="{why}"', st[f"refused_{why}"])
                               for n, st in stats for why in REFUSALS), own("kvwire_refused_transfers_total")))
        links = [(name, ctl.latest(), getattr(ctl, "decision", None)) for name, ctl in self._live("link")]
        for attr, metric, text in _LINK:
            _family(out, metric, "gauge", text, ((f'link="{escape(n)}"', getattr(s, attr)) for n, s, _ in links
                                                 if s is not None and getattr(s, attr) is not None))
        controlled = [(n, d) for n, _, d in links if d is not None]
        _family(out, "kvwire_link_lanes", "gauge", "Lanes the controller wants.",
                ((f'link="{escape(n)}"', d.lanes) for n, d in controlled))
        _family(out, "kvwire_link_pacing_bytes_per_second", "gauge", "Aggregate pacing cap (absent: unpaced).",
                ((f'link="{escape(n)}"', d.total_pacing) for n, d in controlled if d.total_pacing is not None))
        _family(out, "kvwire_link_mode", "gauge", "1 for the controller's current mode.",
                ((f'link="{escape(n)}",mode="{d.mode.value}"', 1) for n, d in controlled))
        for metric, (kind, text, samples) in custom.items():
            _family(out, metric, kind, text, _read_all(samples))
        return "".join(out)

    def serve(self, host: str = "127.0.0.1", port: int = 0) -> MetricsServer:
        """Serve ``GET /metrics`` on a daemon thread until ``close()``. ``ValueError`` for a port outside 0..65535
        (the socket layer would wrap 70000 to 4464)."""
        return MetricsServer(self.render, host, check_port(port))


def _read_all(samples: list[tuple[str, Callable[[], float | None]]]) -> Iterator[tuple[str, float]]:
    for labels, read in samples:
        try:
            v = read()
        except Exception:  # a gauge that cannot be read now has no sample; the scrape goes on
            continue
        if v is not None:
            yield labels, v


def _family(out: list[str], metric: str, kind: str, text: str, samples: Iterator[tuple[str, Any]]) -> None:
    lines = [f"{metric}{{{labels}}} {_fmt(v)}\n" if labels else f"{metric} {_fmt(v)}\n" for labels, v in samples]
    if lines:
        out += [f"# HELP {metric} {text}\n", f"# TYPE {metric} {kind}\n", *lines]


class MetricsServer:
    """``GET /metrics`` (and ``/``) over HTTP; anything else is 404. ``address`` is where it listens."""

    def __init__(self, render: Callable[[], str], host: str, port: int) -> None:
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - the http.server name
                if self.path.split("?", 1)[0] not in ("/metrics", "/"):
                    self.send_error(404)
                    return
                body = render().encode()
                self.send_response(200)
                self.send_header("Content-Type", CONTENT_TYPE)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass  # scrapes are not news

        gate = HandshakeGate(MAX_SCRAPES, MAX_SCRAPES // 2, SCRAPE_TIMEOUT)  # idle or slow clients hold nothing
        self._httpd = GatedHTTPServer(host, port, Handler, gate, SCRAPE_TIMEOUT, name="kvwire-scrape")
        self.address: tuple[str, int] = self._httpd.server_address[:2]  # type: ignore[assignment]
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="kvwire-metrics", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(5)

    def __enter__(self) -> MetricsServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


#: connections served at once (a new one cuts the oldest of the busiest source) and seconds each may take
MAX_SCRAPES = 16
SCRAPE_TIMEOUT = 5.0
