"""How well a session's warm-up reads the link: many fresh ``kvwire.connect()`` warm-ups on one emulated link.

    sudo flock /tmp/kvwire-wan.lock python benchmarks/warmup_spread.py [--runs 12] [--scale 1.0] [--json out.json]

Owns: opening ``--runs`` default sessions one after the other on the must-show rows' long fat link (2 Gbit/s x
``--scale``, 80 ms, 0.01 % loss, 20 ms drop-tail queue) and, per warm-up, what it read (``ProbeResult.capacity``)
against the link's payload rate; how the burst ended (the queue overflowed, or the full-pipe rule); the most its
samples' queueing ratio read against the most the link's queue can hold (``1 + queue / RTT``: anything above it is
delay the link model never had, the emulator or a host falling behind); the emulator's late releases over the
warm-up; and beside the reading, one alternative computed from the same samples (``best span``: the fastest
0.2 s mean of the per-interval goodput, burst and drain, without the bound of the lanes' delivery-rate samples
that ``kvwire.probe.burst_capacity`` applies). Then each reading's error distribution. Every controller that
starts from a warm-up paces at its reading until the link corrects it, so this spread is what the burst and
stream rows' first seconds inherit. Must not know: kvwire internals beyond ``Session.warmup`` and ``LinkState``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

from wan_bench import PAYLOAD_FRACTION  # beside this file
from wan_issue import _receiver  # beside this file: the must-show rows' receiver process

import kvwire
from kvwire.errors import InsecureReceiverWarning
from kvwire.testing.wan import WanLink

RTT_MS, QUEUE_MS = 80, 20
SPAN = 0.2  # seconds: the alternative reading's span (the probe's bw_sample)


def best_span(states: list[dict[str, Any]]) -> float:
    """The fastest ``SPAN`` mean of per-interval goodput (bytes/s) over the samples."""
    ivs = [(b["t"] - a["t"], b["goodput"]) for a, b in zip(states, states[1:], strict=False) if b["t"] > a["t"]]
    best = 0.0
    for i in range(len(ivs)):
        span = acked = 0.0
        for dt, rate in ivs[i:]:
            span += dt
            acked += rate * dt
            if span >= SPAN - 1e-3:
                best = max(best, acked / span)
                break
    return best


def one(link: WanLink, port: int) -> dict[str, Any]:
    before = link.stats()
    with link.inside("client"):
        s = kvwire.connect(link.server_addr, port)
    try:
        w = s.warmup
        if w is None:
            raise SystemExit("the session was not warmed (is the path's RTT under kvwire.probe.WARM_MIN_RTT?)")
        states = [{"t": st.timestamp, "goodput": sum(ln.goodput for ln in st.lanes), "q": st.queueing_ratio or 1.0,
                   "overflowing": st.overflowing, "btl_bw": st.btl_bw, "capacity": st.capacity,
                   "saturated": st.saturated, "delivery": sum(ln.delivery_rate or 0 for ln in st.lanes),
                   "loss": st.loss_rate, "busy": st.busy} for st in w.states]
        after = link.stats()
        return {"capacity": w.capacity, "best_span": best_span(states), "seconds": w.seconds,
                "ended": "overflow" if any(x["overflowing"] for x in states) else
                         ("full pipe" if w.full_pipe else ("queue" if w.saturated else "time")),
                "max_q": max(x["q"] for x in states), "loss": w.loss_rate,
                "late_5ms": after.get("late_5ms", 0) - before.get("late_5ms", 0), "states": states}
    finally:
        s.close()


def errors(xs: list[float]) -> str:
    errs = sorted(abs(x - 1) for x in xs)
    return (f"median |error| {statistics.median(errs):.1%}, worst {errs[-1]:.1%}; range {min(xs):.2f}-{max(xs):.2f}x; "
            f"within 5 %: {sum(e <= 0.05 for e in errs)}/{len(errs)}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=12)
    ap.add_argument("--scale", type=float, default=1.0, help="the link's rate x this (2 Gbit/s at 1)")
    ap.add_argument("--rx-pool-mb", type=int, default=1024)
    ap.add_argument("--json", default="", help="write every warm-up's samples here")
    a = ap.parse_args()
    warnings.filterwarnings("ignore", category=InsecureReceiverWarning)
    rate = 2000 * a.scale
    payload_rate = rate * 1e6 / 8 * PAYLOAD_FRACTION  # bytes/s
    q_top = 1 + QUEUE_MS / RTT_MS
    bench = str(Path(__file__).with_name("wan_bench.py"))
    runs = []
    with WanLink(rtt_ms=RTT_MS, loss=0.0001, rate_mbit=rate, queue_bytes=int(rate * 1e6 / 8 * QUEUE_MS / 1e3),
                 seed=12, realtime=True) as link:
        port, rx = _receiver(link, bench, a.rx_pool_mb)
        try:
            print(f"link {rate:.0f} Mbit/s ({payload_rate * 8e-6:.0f} payload), {RTT_MS} ms, {QUEUE_MS} ms queue "
                  f"(queueing ratio tops out at {q_top:.2f}); {a.runs} warm-ups, each on a fresh kvwire.connect()")
            print(" run  reading  ratio  best span  ratio  burst s  ended      max q  loss    emulator late>5ms")
            for i in range(a.runs):
                r = one(link, port)
                runs.append(r)
                behind = " (above the top)" if r["max_q"] > q_top + 0.05 else ""
                cap, span = r["capacity"], r["best_span"]
                print(f"{i:4}  {cap * 8e-6:7.0f}  {cap / payload_rate:5.2f}  {span * 8e-6:9.0f}  "
                      f"{span / payload_rate:5.2f}  {r['seconds']:7.2f}  {r['ended']:9}  {r['max_q']:5.2f}  "
                      f"{r['loss']:.3f}  {r['late_5ms']}{behind}", flush=True)
                time.sleep(1.0)
        finally:
            rx.terminate()
            rx.wait(10)
    print(f"reading (kvwire):  {errors([r['capacity'] / payload_rate for r in runs])}")
    print(f"best span:         {errors([r['best_span'] / payload_rate for r in runs])}")
    clean = [r for r in runs if r["max_q"] <= q_top + 0.05]
    if clean and len(clean) < len(runs):
        print(f"reading, only warm-ups whose queue never read above its top ({len(clean)}): "
              f"{errors([r['capacity'] / payload_rate for r in clean])}")
    if a.json:
        Path(a.json).write_text(json.dumps(runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
