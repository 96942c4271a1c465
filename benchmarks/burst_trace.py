"""Where a burst request's time goes: per-lane timelines of the must-show burst row's requests.

    sudo python benchmarks/burst_trace.py [--requests 6] [--scale 1.0] [--sample-ms 5]

Owns: one run of the burst row's setup (``wan_issue.row_burst``: 2 Gbit/s, 80 ms, 0.01 % loss, 20 ms
queue, one 8k-token Qwen3-Next request a second over one default session), with, per request: when
``send()`` was called, when each lane picked each chunk (a ``ChunkStage`` that only records), every
lane's ``TCP_INFO`` each ``--sample-ms`` (bytes acked, pacing rate, unsent bytes), when the receiver
reported the transfer done (its ``done`` line, timestamped as it arrives here: one clock, one machine)
and when ``result()`` returned at the sender; then the time budget against the ideal (bytes / link
payload rate). Must not know: kvwire internals beyond the public API, ``Session.lane_sockets()`` and
``Session.chunk_stage``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from wan_bench import PAYLOAD_FRACTION, Payload  # beside this file

import kvwire
from kvwire.congestion.tcpinfo import TcpInfoUnavailable, read_tcp_info
from kvwire.tcp.transport import ChunkRef
from kvwire.testing.wan import WanLink


class Recorder:
    """A chunk stage that records (monotonic time, lane, transfer id, chunk, length) and passes chunks on."""

    def __init__(self) -> None:
        self.picks: list[tuple[float, int, int, int, int]] = []
        self._lock = threading.Lock()

    def outgoing(self, ref: ChunkRef, pieces: list[memoryview]) -> list[memoryview]:
        with self._lock:
            self.picks.append((time.monotonic(), ref.lane, ref.transfer_id, ref.chunk, ref.length))
        return pieces

    def incoming(self, ref: ChunkRef, views: list[memoryview]) -> None:
        return None


def sample_lanes(session: kvwire.Session, stop: threading.Event, every: float,
                 out: list[tuple[float, list[tuple[int, int, int, int]]]]) -> None:
    """Every ``every`` s: per lane socket (bytes_acked, pacing_rate, notsent_bytes, bytes_sent)."""
    while not stop.is_set():
        t = time.monotonic()
        row = []
        for s in session.lane_sockets():
            try:
                i = read_tcp_info(s)
                row.append((i.bytes_acked or 0, i.pacing_rate or 0, i.notsent_bytes or 0, i.bytes_sent or 0))
            except TcpInfoUnavailable:
                row.append((0, 0, 0, 0))
        out.append((t, row))
        stop.wait(max(0.0, every - (time.monotonic() - t)))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", default=6, type=int)
    ap.add_argument("--scale", default=1.0, type=float)
    ap.add_argument("--sample-ms", default=5.0, type=float)
    ap.add_argument("--rx-pool-mb", default=1024, type=int)
    ap.add_argument("--detail", default=2, type=int, help="the request whose lane timeline is printed in full")
    ap.add_argument("--loss", default=0.0001, type=float,
                    help="the link's random loss, a fraction (the row's 0.0001; 0: what loss costs a request)")
    ap.add_argument("--dump", default="", help="write the raw timelines (JSON) here")
    a = ap.parse_args()
    bench = str(Path(__file__).with_name("wan_bench.py"))
    rate = 2000 * a.scale
    full = rate * PAYLOAD_FRACTION * 1e6 / 8
    payload = Payload("qwen3-next-80b-a3b", 8192)
    ideal = payload.nbytes / full
    with WanLink(rtt_ms=80, loss=a.loss, rate_mbit=rate, queue_bytes=int(rate * 1e6 / 8 * 0.020), seed=12) as link:
        rx = link.popen_in("server", [sys.executable, bench, "--receiver", "--bind", link.server_addr,
                                      "--rx-pool-mb", str(a.rx_pool_mb)], stdout=subprocess.PIPE, text=True)
        assert rx.stdout is not None
        port = int(json.loads(rx.stdout.readline())["port"])
        done_at: dict[str, float] = {}

        def read_rx() -> None:
            assert rx.stdout is not None
            for line in rx.stdout:
                t = time.monotonic()
                doc = json.loads(line)
                if "done" in doc:
                    done_at[doc["done"]] = t

        threading.Thread(target=read_rx, daemon=True).start()
        with link.inside("client"):
            s = kvwire.connect(link.server_addr, port)
        rec = Recorder()
        s.chunk_stage = rec
        samples: list[tuple[float, list[tuple[int, int, int, int]]]] = []
        stop = threading.Event()
        sampler = threading.Thread(target=sample_lanes, args=(s, stop, a.sample_ms / 1e3, samples), daemon=True)
        sampler.start()
        reqs: list[dict[str, Any]] = []
        try:
            for i in range(a.requests):
                start = time.monotonic()
                with link.inside("client"):
                    out = s.send(payload.layout, kvwire.RequestSpec(f"b{i}", payload.tokens, payload.tokens),
                                 timeout=300)
                    tid = out.transfer_id
                    t_sent = time.monotonic()
                    out.write_all(payload.buffers)
                    t_written = time.monotonic()
                    out.finish().result(600)
                end = time.monotonic()
                reqs.append({"rid": f"b{i}", "tid": tid, "start": start, "send_ret": t_sent,
                             "written": t_written, "end": end})
                time.sleep(max(0.0, start + max(1.0, ideal) - time.monotonic()))
            time.sleep(0.3)
        finally:
            stop.set()
            sampler.join()
            ctl = s.link_control
            hist = ctl.history if ctl is not None else []
            s.close()
        stats = link.stats()
        rx.terminate()
    if a.dump:
        with open(a.dump, "w") as f:
            json.dump({"reqs": reqs, "picks": rec.picks, "samples": samples, "done_at": done_at,
                       "nbytes": payload.nbytes, "ideal": ideal}, f)
    report(a, reqs, rec.picks, samples, done_at, payload.nbytes, ideal, full, hist, stats)
    return 0


def report(a: Any, reqs: list[dict[str, Any]], picks: list[tuple[float, int, int, int, int]],
           samples: list[tuple[float, list[tuple[int, int, int, int]]]], done_at: dict[str, float],
           nbytes: int, ideal: float, full: float, hist: list[Any], stats: dict[str, Any]) -> None:
    print(f"ideal {ideal * 1e3:.0f} ms ({nbytes / 1e6:.1f} MB at {full * 8e-6:.0f} Mbit/s payload); "
          f"emulator c2s {stats.get('c2s')}")
    print("req  total  rx-done  first-pick  last-pick  acked-all  rx-done->end  (ms after send(); ratios to ideal)")
    budgets = []
    for k, r in enumerate(reqs):
        mine = [p for p in picks if p[2] == r["tid"]]
        t0 = r["start"]
        first = min(p[0] for p in mine) - t0
        last = max(p[0] for p in mine) - t0
        rxd = done_at.get(r["rid"], float("nan")) - t0
        # acked: sum over lanes of bytes_acked since the sample just before start
        base = _at(samples, t0)
        acked_all = float("nan")
        curve = []
        for t, row in samples:
            if t < t0:
                continue
            acked = sum(x[0] for x in row) - sum(x[0] for x in base[:len(row)])
            curve.append((t - t0, acked, row))
            if acked >= nbytes and acked_all != acked_all:
                acked_all = t - t0
        total = r["end"] - t0
        print(f"{k:3d} {total * 1e3:6.0f} {rxd * 1e3:8.0f} {first * 1e3:11.1f} {last * 1e3:10.0f} "
              f"{acked_all * 1e3:10.0f} {(total - rxd) * 1e3:12.0f}   total {total / ideal:.3f}x rx {rxd / ideal:.3f}x")
        budgets.append((total, rxd, first, last, acked_all))
        if k == a.detail or (a.detail < 0):
            print(f"  request {k}: acked bytes (MB) and aggregate rate (Mbit/s) per 50 ms; pacing per lane (Mbit/s)")
            prev_t, prev_b = 0.0, 0
            for t, acked, row in curve:
                if t - prev_t >= 0.05 or acked >= nbytes:
                    rate = (acked - prev_b) * 8e-6 / max(1e-9, t - prev_t)
                    pac = " ".join(f"{x[1] * 8e-6:4.0f}" for x in row)
                    uns = sum(x[2] for x in row)
                    print(f"  {t * 1e3:6.0f} ms acked {acked / 1e6:6.1f} rate {rate:5.0f} notsent {uns / 1e6:5.1f} MB "
                          f"pacing sum {sum(x[1] for x in row) * 8e-6:5.0f} | {pac}")
                    prev_t, prev_b = t, acked
                    if acked >= nbytes:
                        break
            lanes = sorted({p[1] for p in mine})
            print("  per lane: chunks, first pick, last pick (ms)")
            for ln in lanes:
                lp = [p for p in mine if p[1] == ln]
                first_ms, last_ms = (lp[0][0] - t0) * 1e3, (lp[-1][0] - t0) * 1e3
                print(f"   lane {ln:2d}: {len(lp):3d} chunks, {first_ms:6.1f} .. {last_ms:6.0f}"
                      f" sizes {sorted({p[4] for p in lp})}")
    rest = budgets[1:] or budgets
    tot, rxd = statistics.median(b[0] for b in rest), statistics.median(b[1] for b in rest)
    acked, last = statistics.median(b[4] for b in rest), statistics.median(b[3] for b in rest)
    print(f"median of the rest: total {tot * 1e3:.0f} ms ({tot / ideal:.3f}x), rx-done {rxd * 1e3:.0f} ms "
          f"({rxd / ideal:.3f}x), acked-all {acked * 1e3:.0f} ms, last pick {last * 1e3:.0f} ms")
    for t, d in hist:
        print(f"  decision {t:.2f} {d.mode.value} lanes {d.lanes} pacing {(d.total_pacing or 0) * 8e-6:.0f}: "
              f"{d.reason}")


def _at(samples: list[tuple[float, list[tuple[int, int, int, int]]]], t: float) -> list[tuple[int, int, int, int]]:
    best = samples[0][1]
    for ts, row in samples:
        if ts > t:
            break
        best = row
    return best


if __name__ == "__main__":
    raise SystemExit(main())
