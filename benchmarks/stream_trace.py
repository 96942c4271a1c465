"""Where a layer-streaming request's exposed tail goes: the ``stream`` must-show row, traced chunk by chunk.

    flock /tmp/kvwire-wan.lock python benchmarks/stream_trace.py [--requests 6] [--warm] [--rx] [--json out.json]

Owns: running the stream row's set-up (2 Gbit/s, 80 ms, 0.01 % loss, 20 ms drop-tail queue, 8k-token
Qwen3-Next produced at half the link's payload rate, kvwire-bench's sending side with its link controller)
with a pass-through ``ChunkStage`` on the sending session that records each chunk as a lane takes it (the
lane's pacing cap, the kernel's pacing rate and the bytes still unsent on it then), a thread reading every
lane's ``TCP_INFO`` each 10 ms (retransmits, congestion window, pacing rate, unsent and unacknowledged
bytes) and the emulator's drop counters each 50 ms; then, for each request's last layer, the budget of its
exposed tail: per chunk when a lane took it, when that lane's socket had everything acknowledged (minus
half the min RTT: when the receiver had it), and what slowed the slowest (bytes queued ahead of it on the
lane, a pacing rate under the cap, retransmits, a collapsed window). With ``--rx`` the server runs with a
recording chunk stage (``rx_trace_server.py``, beside this file): when the receiver read each chunk of the last
layer, when each of its parity groups had ``k`` chunks (could be rebuilt), and, for a tail that is an earlier
layer's, when that layer's chunks were read. Must not know: kvwire internals beyond
the public API (``Session.chunk_stage``, ``lane_info``, ``OutgoingTransfer.plan``) and the bench's document.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import struct
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wan_bench import PAYLOAD_FRACTION, Payload  # beside this file

import kvwire.bench.loopback as loopback
import kvwire.bench.sending as sending
import kvwire.congestion.controller as controller
import kvwire.sockopts as sockopts
from kvwire.bench.document import build_document
from kvwire.bench.loopback import LoopbackServer
from kvwire.bench.options import Options
from kvwire.congestion.tcpinfo import try_read
from kvwire.tcp.transport import ChunkRef
from kvwire.testing.netns import exec_prefix
from kvwire.testing.wan import WanLink

QWEN = "qwen3-next-80b-a3b"
SO_MAX_PACING_RATE = 47  # <asm-generic/socket.h>
UNPACED = 1 << 40  # a cap at or above this (or ~0U, read as -1) is no cap
POLL = 0.01
TCP_CC_INFO = 26  # <linux/tcp.h>
RX_SERVER = str(Path(__file__).with_name("rx_trace_server.py"))
RX_ENV = "KVWIRE_RX_TRACE"  # (rx_trace_server.py writes its rows there)


@dataclass
class Taken:
    """One chunk as a lane took it."""

    t: float
    lane: int
    tid: int
    chunk: int
    length: int
    cap: int  # SO_MAX_PACING_RATE, bytes/s
    rate: int  # tcpi_pacing_rate, bytes/s
    notsent: int  # bytes still unsent on the lane
    ca_state: int = 0  # the lane's tcpi_ca_state as it took the chunk (3 recovery, 4 loss: behind a hole)


@dataclass
class Seen:
    """One lane's TCP_INFO at one poll."""

    t: float
    lane: int
    retrans: int
    cwnd: int
    rate: int
    notsent: int
    unacked: int
    min_rtt: float
    acked: int = 0  # tcpi_bytes_acked
    ca_state: int = 0  # 0 open, 1 disorder, 2 CWR, 3 recovery, 4 loss (an RTO)
    backoff: int = 0  # tcpi_retransmits: RTOs in a row on the lane's head
    rtos: int = 0  # tcpi_total_rto (0 where the kernel has no such field)
    delivery: int = 0  # tcpi_delivery_rate, bytes/s
    app_limited: bool = False  # that sample app-limited
    rwnd_limited_us: int = 0  # time the receiver's window held the lane back (cumulative)
    snd_wnd: int = 0  # the receiver's advertised window
    bbr_bw: int = 0  # BBR's bandwidth estimate (TCP_CC_INFO), bytes/s; 0 under another algorithm
    bbr_gain: float = 0.0  # BBR's pacing gain now (1.0 cruising, 1.25/0.75 probing, 2.89 in STARTUP)
    cap: int = 0  # SO_MAX_PACING_RATE, bytes/s (0: none)


@dataclass
class Read:
    """One chunk as the receiver read it (rx_trace_server.py: its payload in, before its hash)."""

    t: float
    lane: int
    tid: int
    chunk: int
    length: int


CA_STATES = {0: "open", 1: "disorder", 2: "cwr", 3: "recovery", 4: "loss"}


class Tracer:
    """The pass-through ``ChunkStage`` (``outgoing`` records, ``incoming`` is never called on a sender) and
    the lane poller."""

    def __init__(self) -> None:
        self.session: Any = None
        self.taken: list[Taken] = []
        self.seen: list[Seen] = []
        self.handles: dict[str, Any] = {}
        self.restarts: list[tuple[float, int]] = []  # (when, lane) a lane's congestion control was restarted
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def recording_restarts(self, restart: Any) -> Any:
        """``restart`` (``sockopts.restart_congestion``) that also records which lane's algorithm it restarted."""
        def recorded(sock: socket.socket) -> None:
            lanes = {info.sock.fileno(): info.index for info in self.session.lane_info()} if self.session else {}
            self.restarts.append((time.monotonic(), lanes.get(sock.fileno(), -1)))
            restart(sock)
        return recorded

    def attach(self, session: Any) -> None:
        self.session = session
        session.chunk_stage = self
        self._thread.start()

    def _sockets(self) -> dict[int, socket.socket]:
        return {info.index: info.sock for info in self.session.lane_info() if info.alive}

    def outgoing(self, ref: ChunkRef, pieces: Sequence[Any]) -> Sequence[Any]:
        t = time.monotonic()
        sock = self._sockets().get(ref.lane)
        cap = rate = notsent = ca = 0
        if sock is not None:
            cap = pacing_cap(sock)
            ti = try_read(sock)
            if ti is not None:
                rate, notsent, ca = ti.pacing_rate or 0, ti.notsent_bytes or 0, ti.ca_state or 0
        self.taken.append(Taken(t, ref.lane, ref.transfer_id, ref.chunk, ref.length, cap, rate, notsent, ca))
        return pieces

    def incoming(self, ref: ChunkRef, views: Sequence[memoryview]) -> None:
        pass

    def _poll(self) -> None:
        while not self._stop.wait(POLL):
            now = time.monotonic()
            for lane, sock in self._sockets().items():
                ti = try_read(sock)
                if ti is not None:
                    self.seen.append(Seen(now, lane, ti.total_retrans or 0, ti.snd_cwnd or 0, ti.pacing_rate or 0,
                                          ti.notsent_bytes or 0, ti.unacked or 0, (ti.min_rtt_us or 0) / 1e6,
                                          ti.bytes_acked or 0, ti.ca_state or 0, ti.retransmits or 0,
                                          ti.total_rto or 0, ti.delivery_rate or 0,
                                          bool(ti.delivery_rate_app_limited), ti.rwnd_limited_us or 0,
                                          ti.snd_wnd or 0, *bbr_info(sock), pacing_cap(sock)))

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(2)

    def landed(self, c: Taken) -> tuple[float | None, list[Seen]]:
        """When the receiver had all of ``c``'s lane's bytes (the first poll after ``c`` was taken at which
        the lane had nothing unsent or unacknowledged, minus half its min RTT), and the polls until then."""
        polls = [s for s in self.seen if s.lane == c.lane and s.t >= c.t]
        for i, s in enumerate(polls):
            if s.notsent == 0 and s.unacked == 0:
                return s.t - POLL / 2 - s.min_rtt / 2, polls[: i + 1]
        return None, polls


def pacing_cap(sock: socket.socket) -> int:
    """The lane's ``SO_MAX_PACING_RATE`` in bytes/s (0: uncapped or unreadable)."""
    try:
        cap = sock.getsockopt(socket.SOL_SOCKET, SO_MAX_PACING_RATE)
    except OSError:
        return 0
    return 0 if cap < 0 or cap >= UNPACED else cap


def bbr_info(sock: socket.socket) -> tuple[int, float]:
    """BBR's bandwidth estimate (bytes/s) and pacing gain from ``TCP_CC_INFO`` (``struct tcp_bbr_info``)."""
    try:
        raw = sock.getsockopt(socket.IPPROTO_TCP, TCP_CC_INFO, 20)
    except OSError:
        return 0, 0.0
    if len(raw) < 20:
        return 0, 0.0
    lo, hi, _, gain, _ = struct.unpack("<5I", raw)
    return (hi << 32) | lo, gain / 256


def standstill(polls: Sequence[Seen]) -> list[Seen]:
    """The longest run of consecutive ``polls`` with bytes unacknowledged and nothing newly acknowledged."""
    best: list[Seen] = []
    run: list[Seen] = []
    for a, b in zip(polls, polls[1:], strict=False):
        run = (run or [a]) + [b] if b.unacked and b.acked == a.acked else []
        if run and (not best or run[-1].t - run[0].t > best[-1].t - best[0].t):
            best = run
    return best


def stalled(tr: Tracer, rec: Any, layer: int) -> str:
    """Why an earlier ``layer`` of ``rec`` was late, from the sender's side: of the lanes that carried its chunks,
    the one with the longest ``standstill`` (from when it took the layer's first chunk until it held nothing),
    with its retransmits, RTOs (and their backoff) and congestion states over it."""
    h = tr.handles.get(rec.request_id)
    if h is None:
        return "no handle"
    layers = h.plan.layers
    mine = [c for c in tr.taken if c.tid == h.transfer_id and c.chunk < len(layers) and layers[c.chunk] == layer]
    if not mine:
        return "no chunk of it seen"
    runs = {c.lane: standstill(tr.landed(c)[1]) for c in sorted(mine, key=lambda c: -c.t)}  # (each lane's first)
    lane, best = max(runs.items(), key=lambda kv: kv[1][-1].t - kv[1][0].t if kv[1] else -1.0)
    head = f"layer {layer}: {len(mine)} chunks on {len(runs)} lanes"
    if not best:
        return head + "; no lane stood still (TCP kept delivering: look past the sender's sockets)"
    states = sorted({CA_STATES.get(x.ca_state, str(x.ca_state)) for x in best})
    return (head + f"; the longest stand-still, lane {lane}: nothing acknowledged for "
            f"{(best[-1].t - best[0].t) * 1e3:.0f} ms from +{(best[0].t - rec.t0) * 1e3:.0f} ms after the request "
            f"began, with {best[0].unacked} packets out: retransmits +{best[-1].retrans - best[0].retrans}, RTOs "
            f"+{best[-1].rtos - best[0].rtos} (backoff up to {max(x.backoff for x in best)}), states "
            f"{'/'.join(states)}, cwnd down to {min(x.cwnd for x in best)}")


def budget(tr: Tracer, rec: Any, timeline: dict[str, Any]) -> dict[str, Any]:
    """The last layer's chunks of one request: when each was taken and landed, and why the last was late."""
    h = tr.handles.get(rec.request_id)
    last = timeline["layers"][-1]
    li = last["layer"]
    if h is None:
        return {"request": rec.request_id, "tail_ms": timeline["exposed_tail_ms"], "chunks": []}
    layers = h.plan.layers
    n = len(layers)

    def in_last(c: Taken) -> bool:  # (tail parity chunks, numbered past the plan, are the last layer's)
        return c.tid == h.transfer_id and (c.chunk >= n or layers[c.chunk] == li)
    produced = rec.produced.get(li, rec.t0)
    chunks = []
    per_lane: dict[int, int] = {}
    for c in tr.taken:
        if in_last(c):
            per_lane[c.lane] = per_lane.get(c.lane, 0) + 1
    for c in sorted((c for c in tr.taken if in_last(c)), key=lambda c: c.t):
        at, polls = tr.landed(c)
        before = [s for s in tr.seen if s.lane == c.lane and s.t <= c.t]
        retrans = (polls[-1].retrans - before[-1].retrans) if polls and before else 0
        chunks.append({
            "lane": c.lane, "chunk": c.chunk, "bytes": c.length, "taken_ms": (c.t - produced) * 1e3,
            "landed_ms": None if at is None else (at - produced) * 1e3,
            "queued_ahead_ms": c.notsent / c.cap * 1e3 if c.cap else None,
            "wire_at_cap_ms": c.length / c.cap * 1e3 if c.cap else None,
            "cap_mbit": c.cap * 8e-6, "kernel_rate_mbit": c.rate * 8e-6, "notsent": c.notsent,
            "min_kernel_rate_mbit": min((s.rate for s in polls), default=0) * 8e-6,
            "min_cwnd": min((s.cwnd for s in polls), default=0), "retrans": retrans,
            "chunks_on_lane": per_lane[c.lane], "ca_at_take": CA_STATES.get(c.ca_state, str(c.ca_state))})
    late = [(x["layer"], x["verified_ms"] - last["produced_ms"]) for x in timeline["layers"]
            if x["verified_ms"] is not None and last["produced_ms"] is not None]
    return {"request": rec.request_id, "tail_ms": timeline["exposed_tail_ms"], "layer": li, "late_layers": late,
            "layer_bytes": last["bytes"], "chunk_size": h.manifest.chunk_size, "chunks": chunks,
            "num_chunks": h.plan.num_chunks,
            "one_way_ms": statistics.median(s.min_rtt for s in tr.seen) / 2 * 1e3 if tr.seen else None}


def mode_at(history: Sequence[dict[str, Any]], timeline: dict[str, Any]) -> str:
    """The link controller's mode (and pacing) in force when the request's last layer was produced, and
    whether it changed during the tail that followed."""
    produced = timeline["layers"][-1]["produced_ms"]
    if produced is None or not history:
        return "-"
    at = timeline["start"] + produced / 1e3
    tail = (timeline["exposed_tail_ms"] or 0) / 1e3
    before = [d for d in history if (d["t"] or 0.0) <= at]
    during = [d for d in history if at < (d["t"] or 0.0) <= at + tail]
    d = before[-1] if before else history[0]
    out = f"{d['mode']} at {(d['pacing'] or 0) * 8e-6:.0f} Mbit/s"
    return out + "".join(f", then {x['mode']} at +{((x['t'] or 0.0) - at) * 1e3:.0f} ms" for x in during)


def rx_budget(tr: Tracer, rx: Sequence[Read], rec: Any, timeline: dict[str, Any]) -> dict[str, Any]:
    """The last layer at the receiver: when its data chunks were all read, when each parity group had ``k``
    of its chunks (decodable), and on which lane the last data chunk came (ms after the layer was produced)."""
    h = tr.handles.get(rec.request_id)
    if h is None:
        return {}
    g = h.manifest.tail_groups
    layers = h.plan.layers
    li = layers[-1]
    t0 = rec.produced.get(li, rec.t0)
    mine = {r.chunk: r for r in rx if r.tid == h.transfer_id}
    data = [c for c in h.plan.layer_chunks[li]]
    got = [mine[c] for c in data if c in mine]
    last = max(got, key=lambda r: r.t, default=None)
    out: dict[str, Any] = {"data_read": len(got), "data": len(data),
                           "data_in_ms": None if last is None or len(got) < len(data) else (last.t - t0) * 1e3,
                           "last_data_ms": None if last is None else (last.t - t0) * 1e3,
                           "last_data_lane": None if last is None else last.lane, "groups": []}
    out["reads"] = sorted([r.lane, r.chunk, (r.t - t0) * 1e3] for r in mine.values()
                          if r.chunk >= h.plan.layer_chunks[li].start)
    late = max(timeline["layers"], key=lambda x: x["verified_ms"] or 0.0)["layer"]
    if late != li:  # (the tail is an earlier layer's: when the receiver read each of its chunks)
        span = h.plan.layer_chunks[late]
        out["late_layer"] = late
        out["late_reads"] = sorted([r.lane, r.chunk, (r.t - t0) * 1e3] for r in mine.values() if r.chunk in span)
        out["late_unread"] = [c for c in span if c not in mine]
        taken = {c.chunk: c for c in tr.taken if c.tid == h.transfer_id and c.chunk in span}
        last = max((r for r in mine.values() if r.chunk in span), key=lambda r: r.t, default=None)
        if last is not None and last.chunk in taken:  # the sender's side of the chunk read last
            c = taken[last.chunk]
            polls = [x for x in tr.seen if x.lane == c.lane and c.t <= x.t <= last.t]
            out["late_chunk"] = {
                "chunk": c.chunk, "lane": c.lane, "taken_ms": (c.t - t0) * 1e3, "read_ms": (last.t - t0) * 1e3,
                "rx_lane": last.lane, "notsent_at_take": c.notsent,
                # (a receiver that stops reading closes its window: bytes wait unsent with nothing unacknowledged)
                "polls_unsent_nothing_out": sum(1 for x in polls if x.notsent and not x.unacked),
                "polls": len(polls), "max_notsent": max((x.notsent for x in polls), default=0),
                "retrans": (polls[-1].retrans - polls[0].retrans) if polls else 0,
                "kernel": lane_summary(polls),
                # its congestion control's restarts (controller.MIN_RTT_REFRESH) in the 3 s before the chunk went
                "restarts_ms": [(x - t0) * 1e3 for x, ln in tr.restarts if ln == c.lane and c.t - 3 <= x <= c.t]}
    if g is None:
        return out
    for i in range(g.groups):
        ts = sorted(mine[c].t for c in (*g.data(i), *g.parity(i)) if c in mine)
        k = g.k(i)
        out["groups"].append({"k": k, "read": len(ts),
                              "decodable_ms": (ts[k - 1] - t0) * 1e3 if len(ts) >= k else None,
                              "data_missing": sum(c not in mine for c in g.data(i))})
    return out


def lane_summary(polls: Sequence[Seen]) -> dict[str, Any]:
    """What a lane's kernel did over ``polls`` (medians, and the lowest pacing rate)."""
    if not polls:
        return {}
    med = statistics.median
    return {"pacing_mbit": med(x.rate for x in polls) * 8e-6, "min_pacing_mbit": min(x.rate for x in polls) * 8e-6,
            "delivery_mbit": med(x.delivery for x in polls) * 8e-6, "cwnd": med(x.cwnd for x in polls),
            "unacked": med(x.unacked for x in polls), "app_limited": sum(x.app_limited for x in polls),
            "rwnd_limited_ms": (polls[-1].rwnd_limited_us - polls[0].rwnd_limited_us) / 1e3,
            "snd_wnd_min": min(x.snd_wnd for x in polls), "min_rtt_ms": polls[-1].min_rtt * 1e3,
            "bbr_bw_mbit": med(x.bbr_bw for x in polls) * 8e-6, "bbr_gains": sorted({x.bbr_gain for x in polls}),
            "cap_mbit": med(x.cap for x in polls) * 8e-6, "min_cap_mbit": min(x.cap for x in polls) * 8e-6,
            "states": sorted({CA_STATES.get(x.ca_state, str(x.ca_state)) for x in polls})}


def rx_line(r: dict[str, Any]) -> str:
    gs = r["groups"]
    dec = [x["decodable_ms"] for x in gs]
    dec_s = "n/a" if not gs or None in dec else f"+{max(dec):.0f} ms"  # type: ignore[type-var]
    data_in = "not all read" if r["data_in_ms"] is None else f"+{r['data_in_ms']:.0f} ms"
    miss = sum(x["data_missing"] for x in gs)
    return (f"receiver: data read {r['data_read']}/{r['data']} ({data_in}; last read +{r['last_data_ms'] or 0:.0f} "
            f"on lane {r['last_data_lane']}); groups decodable by {dec_s} "
            f"({', '.join('-' if d is None else f'{d:.0f}' for d in dec)}); data chunks never read {miss}"
            + (f"; layer {r['late_layer']} (verified last): its chunks read "
               f"{', '.join(f'{c}@{x:+.0f}' for _, c, x in sorted(r['late_reads'], key=lambda v: v[2])[-4:])} "
               f"(last 4; ms after the last layer was produced), never read {r['late_unread']}"
               if "late_layer" in r else "")
            + (f"; chunk {r['late_chunk']['chunk']} went on lane {r['late_chunk']['lane']} at "
               f"{r['late_chunk']['taken_ms']:+.0f} ms (unsent ahead {r['late_chunk']['notsent_at_take']} B), read "
               f"{r['late_chunk']['read_ms']:+.0f}: between, {r['late_chunk']['polls_unsent_nothing_out']} of "
               f"{r['late_chunk']['polls']} polls had bytes unsent and none out (a closed window), unsent up to "
               f"{r['late_chunk']['max_notsent']} B, retransmits +{r['late_chunk']['retrans']}; the lane's kernel: "
               f"{json.dumps(r['late_chunk']['kernel'])}; its algorithm restarted at "
               f"{[round(x) for x in r['late_chunk']['restarts_ms']]} ms"
               if "late_chunk" in r else ""))


def why(c: dict[str, Any]) -> str:
    """What slowed a chunk, from its numbers."""
    out = []
    if c["chunks_on_lane"] > 1:
        out.append(f"{c['chunks_on_lane']} chunks of the layer on its lane")
    if c["queued_ahead_ms"] is None:
        out.append(f"unpaced lane ({c['notsent'] / 1e3:.0f} kB unsent ahead of it)")
    elif c["queued_ahead_ms"] > 5:
        out.append(f"{c['queued_ahead_ms']:.0f} ms of an earlier layer ahead of it")
    if c["retrans"]:
        out.append(f"{c['retrans']} retransmits")
    if c["min_cwnd"] and c["min_cwnd"] <= 10:
        out.append(f"cwnd down to {c['min_cwnd']} (BBR PROBE_RTT or a timeout)")
    elif c["cap_mbit"] and c["min_kernel_rate_mbit"] < 0.9 * c["cap_mbit"]:
        out.append(f"kernel pacing {c['min_kernel_rate_mbit']:.0f} of its {c['cap_mbit']:.0f} Mbit/s cap "
                   f"(BBR's 0.75 gain phase, or its bandwidth estimate under the cap)")
    return "; ".join(out) or "nothing seen"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=6)
    ap.add_argument("--warm", action="store_true", help="kvwire-bench --warm (as kvwire.connect() warms)")
    ap.add_argument("--json", default="", help="write every request's budget here")
    ap.add_argument("--chunk-size", type=int, default=0, help="the session's chunk size (default kvwire's)")
    ap.add_argument("--loss", type=float, default=0.0001,
                    help="the link's random loss, a fraction (the row's 0.0001; 0: what loss costs the tail)")
    ap.add_argument("--scale", type=float, default=1.0, help="the link's rate x this (the row's 2 Gbit/s at 1)")
    ap.add_argument("--tail-parity", type=int, default=None,
                    help="kvwire-bench --tail-parity M (default: kvwire.connect()'s, 2 on this path with zfec)")
    ap.add_argument("--rx", action="store_true",
                    help="run the server with a recording chunk stage (rx_trace_server.py): each last layer's "
                         "chunks as the receiver read them, its groups' decodable time")
    ap.add_argument("--refresh", type=float, default=None,
                    help="controller.MIN_RTT_REFRESH for this run, seconds (inf: lanes' algorithms never restarted)")
    a = ap.parse_args()
    if a.refresh is not None:
        controller.MIN_RTT_REFRESH = a.refresh
    rate = 2000 * a.scale
    full = rate * PAYLOAD_FRACTION * 1e6 / 8
    payload = Payload(QWEN, 8192)
    prefill_ms = payload.nbytes / (full / 2) / payload.layout.num_layers * 1e3
    tr = Tracer()
    opened = sending._open_session  # (the bench opens its own session: the tracer goes on as it opens)

    def open_traced(o: Options, port: int, ctx: Any) -> Any:
        s = opened(o, port, ctx)
        tr.attach(s)
        send = s.send

        def send_traced(layout: Any, request: Any, **kw: Any) -> Any:
            h = send(layout, request, **kw)
            tr.handles[request.request_id] = h
            return h
        s.send = send_traced
        return s
    sending._open_session = open_traced
    for mod in (controller, sockopts):  # (each calls its own name: the controller's import and set_knobs's)
        mod.restart_congestion = tr.recording_restarts(mod.restart_congestion)  # type: ignore[attr-defined]
    rx_out = ""
    if a.rx:
        rx_out = tempfile.mkstemp(prefix="kvwire-rx-", suffix=".json")[1]
        os.environ[RX_ENV] = rx_out
        serve = loopback.server_command
        loopback.server_command = lambda o, bind="127.0.0.1": [  # type: ignore[assignment]
            x if x != "-m" else RX_SERVER for x in serve(o, bind) if x != "kvwire.bench"]
    drops: list[tuple[float, int]] = []
    with WanLink(rtt_ms=80, loss=a.loss, rate_mbit=rate, queue_bytes=int(rate * 1e6 / 8 * 0.020), seed=16,
                 realtime=True) as link:
        o = Options(mode="client", host=link.server_addr, model=QWEN, tokens=8192, requests=a.requests,
                    prefill_ms=prefill_ms, adaptive=True, interval=0.0, warm=a.warm, tail_parity=a.tail_parity)
        if a.chunk_size:
            o.chunk_size = a.chunk_size
        done = threading.Event()

        def poll_drops() -> None:
            while not done.wait(0.05):
                drops.append((time.monotonic(), int(link.stats()["c2s"]["queue_drops"])))
        dp = threading.Thread(target=poll_drops, daemon=True)
        with LoopbackServer(o, bind=link.server_addr, prefix=exec_prefix(link.server_ns)) as server:
            o.port = server.port
            dp.start()
            try:
                with link.inside("client"):
                    res = sending.run_sender(o)
            finally:
                done.set()
                tr.stop()
                dp.join(2)
    kv = build_document(res)["kv"]
    warm = json.dumps({k: res.probe[k] for k in ("seconds", "capacity", "saturated")}) if res.probe else "cold"
    print(f"clock offset {res.clock_offset * 1e3:+.2f} ms (+-{res.clock_uncertainty * 1e3:.0f}); warm-up: {warm}")
    for d in (kv.get("link_control") or {}).get("history", []):
        print(f"  controller {d['t'] or 0:6.2f} s {d['mode']:8} {d['lanes']:2} lanes, pacing "
              f"{(d['pacing'] or 0) * 8e-6:5.0f} Mbit/s: {d['reason']}")
    history = (kv.get("link_control") or {}).get("history", [])
    rx = []
    if rx_out:
        with open(rx_out) as f:
            rx = [Read(*row) for row in json.load(f)]
        os.unlink(rx_out)
    out = []
    for rec, t in zip(res.requests, kv["timeline"]):
        b = budget(tr, rec, t)
        if rx:
            b["rx"] = rx_budget(tr, rx, rec, t)
        b["queue_drops"] = [q for x, q in drops if rec.t0 <= x <= (rec.done_at or rec.t0)]
        b["queue_drops"] = b["queue_drops"][-1] - b["queue_drops"][0] if b["queue_drops"] else 0
        b["mode"] = mode_at(history, t)
        out.append(b)
        cs = [c for c in b["chunks"] if c["landed_ms"] is not None]
        print(f"{b['request']}: tail {b['tail_ms'] or 0:.0f} ms; emulator queue drops during it {b['queue_drops']}; "
              f"controller {b['mode']} as its last layer was produced")
        if b.get("rx"):
            print(f"  {rx_line(b['rx'])}")
        if not cs:
            continue
        slow = max(cs, key=lambda c: c["landed_ms"])
        typical = statistics.median(c["landed_ms"] for c in cs)
        wires = [c["wire_at_cap_ms"] for c in cs if c["wire_at_cap_ms"] is not None]
        wire = f"{statistics.median(wires):.0f}" if wires else "unpaced"
        print(f"  last layer {b['layer']}: {b['layer_bytes'] / 1e6:.1f} MB in {len(cs)} chunks of "
              f"{b['chunk_size'] / 1e6:.2f} MB on {len({c['lane'] for c in cs})} lanes; taken by +"
              f"{max(c['taken_ms'] for c in cs):.1f} ms; at the receiver: median chunk +{typical:.0f} ms "
              f"(wire at the lane's cap {wire} + one way {b['one_way_ms'] or 0:.0f}), last +"
              f"{slow['landed_ms']:.0f} ms on lane {slow['lane']}: {why(slow)}")
        if b["tail_ms"] is not None and b["tail_ms"] > slow["landed_ms"] + 20:
            late = max(b["late_layers"], key=lambda x: x[1], default=None)
            print(f"  (the tail is an earlier layer's: layer {late[0] if late else '?'} was verified "
                  f"{late[1] if late else 0:.0f} ms after the last layer was produced)")
            if late:
                print(f"  {stalled(tr, rec, late[0])}")
        for c in sorted(cs, key=lambda c: -c["landed_ms"])[:3] + [c for c in cs if c["chunk"] >= b["num_chunks"]]:
            print(f"    lane {c['lane']:2} chunk {c['chunk']:3}: taken +{c['taken_ms']:5.1f}, landed "
                  f"+{c['landed_ms']:5.0f} ms; cap {c['cap_mbit']:.0f}, kernel {c['kernel_rate_mbit']:.0f} "
                  f"(min {c['min_kernel_rate_mbit']:.0f}) Mbit/s, cwnd min {c['min_cwnd']}: {why(c)}")
    if kv.get("tail_parity"):
        print(f"tail parity at the receiver: {json.dumps(kv['tail_parity'])}")
    print(f"lanes' congestion control restarted {len(tr.restarts)} times over the run (controller.lane_busy's "
          f"MIN_RTT_REFRESH, and lanes paced far under their caps)")
    # (a chunk a lane took while in loss recovery waits at the receiver behind the hole until the repair lands:
    # how often the last layer's chunks went on such lanes, and how late those landed against the others)
    taken = [c for b in out for c in b["chunks"] if c["landed_ms"] is not None]
    held = [c["landed_ms"] for c in taken if c["ca_at_take"] in ("recovery", "loss")]
    clean = [c["landed_ms"] for c in taken if c["ca_at_take"] not in ("recovery", "loss")]
    if taken:
        print(f"last-layer chunks taken by a lane in loss recovery: {len(held)} of {len(taken)}"
              + (f", landed median {statistics.median(held):.0f} ms (the others {statistics.median(clean):.0f})"
                 if held and clean else ""))
    tails = [b["tail_ms"] for b in out if b["tail_ms"] is not None]
    print(f"tails {', '.join(f'{x:.0f}' for x in tails)}; p50 {kv['exposed_tail_ms']['p50'] or 0:.0f}, "
          f"p99 {kv['exposed_tail_ms']['p99'] or 0:.0f} ms")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
