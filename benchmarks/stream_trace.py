"""Where a layer-streaming request's exposed tail goes: the ``stream`` must-show row, traced chunk by chunk.

    flock /tmp/kvwire-wan.lock python benchmarks/stream_trace.py [--requests 6] [--warm] [--json out.json]

Owns: running the stream row's set-up (2 Gbit/s, 80 ms, 0.01 % loss, 20 ms drop-tail queue, 8k-token
Qwen3-Next produced at half the link's payload rate, kvwire-bench's sending side with its link controller)
with a pass-through ``ChunkStage`` on the sending session that records each chunk as a lane takes it (the
lane's pacing cap, the kernel's pacing rate and the bytes still unsent on it then), a thread reading every
lane's ``TCP_INFO`` each 10 ms (retransmits, congestion window, pacing rate, unsent and unacknowledged
bytes) and the emulator's drop counters each 50 ms; then, for each request's last layer, the budget of its
exposed tail: per chunk when a lane took it, when that lane's socket had everything acknowledged (minus
half the min RTT: when the receiver had it), and what slowed the slowest (bytes queued ahead of it on the
lane, a pacing rate under the cap, retransmits, a collapsed window). Must not know: kvwire internals beyond
the public API (``Session.chunk_stage``, ``lane_info``, ``OutgoingTransfer.plan``) and the bench's document.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from wan_bench import PAYLOAD_FRACTION, Payload  # beside this file

import kvwire.bench.sending as sending
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


CA_STATES = {0: "open", 1: "disorder", 2: "cwr", 3: "recovery", 4: "loss"}


class Tracer:
    """The pass-through ``ChunkStage`` (``outgoing`` records, ``incoming`` is never called on a sender) and
    the lane poller."""

    def __init__(self) -> None:
        self.session: Any = None
        self.taken: list[Taken] = []
        self.seen: list[Seen] = []
        self.handles: dict[str, Any] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def attach(self, session: Any) -> None:
        self.session = session
        session.chunk_stage = self
        self._thread.start()

    def _sockets(self) -> dict[int, socket.socket]:
        return {info.index: info.sock for info in self.session.lane_info() if info.alive}

    def outgoing(self, ref: ChunkRef, pieces: Sequence[Any]) -> Sequence[Any]:
        t = time.monotonic()
        sock = self._sockets().get(ref.lane)
        cap = rate = notsent = 0
        if sock is not None:
            try:
                cap = sock.getsockopt(socket.SOL_SOCKET, SO_MAX_PACING_RATE)
            except OSError:
                pass
            if cap < 0 or cap >= UNPACED:
                cap = 0  # unpaced
            ti = try_read(sock)
            if ti is not None:
                rate, notsent = ti.pacing_rate or 0, ti.notsent_bytes or 0
        self.taken.append(Taken(t, ref.lane, ref.transfer_id, ref.chunk, ref.length, cap, rate, notsent))
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
                                          ti.total_rto or 0))

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
            "chunks_on_lane": per_lane[c.lane]})
    late = [(x["layer"], x["verified_ms"] - last["produced_ms"]) for x in timeline["layers"]
            if x["verified_ms"] is not None and last["produced_ms"] is not None]
    return {"request": rec.request_id, "tail_ms": timeline["exposed_tail_ms"], "layer": li, "late_layers": late,
            "layer_bytes": last["bytes"], "chunk_size": h.manifest.chunk_size, "chunks": chunks,
            "num_chunks": h.plan.num_chunks,
            "one_way_ms": statistics.median(s.min_rtt for s in tr.seen) / 2 * 1e3 if tr.seen else None}


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
    a = ap.parse_args()
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
    out = []
    for rec, t in zip(res.requests, kv["timeline"]):
        b = budget(tr, rec, t)
        b["queue_drops"] = [q for x, q in drops if rec.t0 <= x <= (rec.done_at or rec.t0)]
        b["queue_drops"] = b["queue_drops"][-1] - b["queue_drops"][0] if b["queue_drops"] else 0
        out.append(b)
        cs = [c for c in b["chunks"] if c["landed_ms"] is not None]
        print(f"{b['request']}: tail {b['tail_ms'] or 0:.0f} ms; emulator queue drops during it {b['queue_drops']}")
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
    tails = [b["tail_ms"] for b in out if b["tail_ms"] is not None]
    print(f"tails {', '.join(f'{x:.0f}' for x in tails)}; p50 {kv['exposed_tail_ms']['p50'] or 0:.0f}, "
          f"p99 {kv['exposed_tail_ms']['p99'] or 0:.0f} ms")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
