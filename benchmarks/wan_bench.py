"""Side by side on an emulated cross-datacenter link: iperf3 -P1, iperf3 -P4 and kvwire transfers.

    sudo python benchmarks/wan_bench.py                  # 400 Mbit/s, 20 ms RTT, 0.1% loss, CUBIC
    sudo python benchmarks/wan_bench.py --rate 400mbit --rtt 20ms --loss 0.1% --seconds 8 --lanes 1,4,8

Owns: the benchmark run — one ``WanLink``, iperf3 pairs in its namespaces, a kvwire receiver subprocess
in the server namespace (``--receiver`` mode of this file), a kvwire ``Session`` in the client namespace
with its lanes switched to the chosen algorithm and a ``LinkMonitor`` on them — and the table.
Must not know: kvwire internals beyond the public session/receiver API and ``Session.lane_sockets()``.

Goodput is payload bytes confirmed by the receiver per second of the run (iperf3: its receiver's
bits/s); "LinkState" is the median goodput the estimator saw while the lanes were busy. "Q" is the
queueing ratio srtt/min_rtt: the median of the LinkState samples for kvwire; for iperf3 its
mean_rtt/min_rtt, a lower bound (its min is taken over sampled, already smoothed srtt). Emulator
drops are counted on the data direction; "late" is how many of the emulator's releases ran more
than 1 ms late (CPU starvation; the emulator runs SCHED_FIFO unless --no-realtime).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

import kvwire
from kvwire.codec.layout import CacheSpec, LayerSpec, ModelLayout, TensorSpec
from kvwire.congestion.estimator import LinkState
from kvwire.congestion.monitor import LinkMonitor
from kvwire.congestion.tcpinfo import set_congestion
from kvwire.testing.wan import WanLink, parse_loss, parse_ms, parse_rate_mbit

TOKEN_BYTES = 8 * 2 * 8 * 128 * 2  # raw layout below: 8 layers x (K, V) x 8 heads x 128 x bf16


def raw_layout() -> ModelLayout:
    def kv(name: str) -> TensorSpec:
        return TensorSpec(name, (8, 128), "bfloat16", "NHD", "token")

    return ModelLayout("wan-bench-raw", tuple(LayerSpec(i, (CacheSpec("gqa", (kv("k"), kv("v"))),))
                                              for i in range(8)))


# ---------------------------------------------------------------- receiver (server namespace)
def run_receiver(bind: str) -> int:
    """Accept transfers forever into one reused buffer per size; print the port, then one line per transfer."""
    buffers: dict[int, np.ndarray] = {}

    def allocate(m: Any) -> np.ndarray:
        if m.total_bytes not in buffers:
            buffers[m.total_bytes] = np.zeros(m.total_bytes, np.uint8)
        return buffers[m.total_bytes]

    with kvwire.Receiver(bind, 0, allocator=allocate, transfer_timeout=120) as rx:
        print(json.dumps({"port": rx.address[1]}), flush=True)
        while True:
            try:
                h = rx.next_transfer(timeout=1.0)
            except TimeoutError:
                continue
            try:
                h.result(timeout=120)
                print(json.dumps({"done": h.request_id}), flush=True)
            except kvwire.KvwireError as e:
                print(json.dumps({"failed": h.request_id, "reason": str(e)}), flush=True)


# ---------------------------------------------------------------- iperf3
def run_iperf3(link: WanLink, streams: int, seconds: float, cc: str) -> dict[str, Any]:
    before = link.stats()
    server = link.popen_in("server", ["iperf3", "-s", "-1", "-B", link.server_addr],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.4)
    r = link.run_in("client", ["iperf3", "-c", link.server_addr, "-t", str(seconds), "-O", "1", "-J",
                               "-C", cc, "-P", str(streams)], timeout=seconds + 30)
    server.wait(10)  # a one-off server: gone before the next row starts its own
    doc = json.loads(r.stdout or "{}")
    if r.returncode != 0 or "error" in doc:
        raise RuntimeError(f"iperf3 -P{streams} failed: {doc.get('error') or r.stderr[-500:]}")
    end = doc["end"]
    ratios = [s["sender"]["mean_rtt"] / s["sender"]["min_rtt"] for s in end["streams"]
              if s["sender"].get("min_rtt")]
    return {"name": f"iperf3 -P{streams}", "goodput_mbit": end["sum_received"]["bits_per_second"] / 1e6,
            "q": statistics.median(ratios) if ratios else None,
            "retrans": end["sum_sent"].get("retransmits"), **_emu_delta(before, link.stats())}


def _emu_delta(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    b, a = before["c2s"], after["c2s"]
    return {"queue_drops": a["queue_drops"] - b["queue_drops"], "random_drops": a["random_drops"] - b["random_drops"],
            "late": after["late_releases"] - before["late_releases"],
            "late_5ms": after["late_5ms"] - before["late_5ms"],
            "user_dropped": a["kernel"].get("user_dropped", 0) - b["kernel"].get("user_dropped", 0)}


# ---------------------------------------------------------------- kvwire
def run_kvwire(link: WanLink, port: int, lanes: int, seconds: float, cc: str, transfer_mb: int) -> dict[str, Any]:
    layout = raw_layout()
    tokens = max(1, transfer_mb * 2**20 // TOKEN_BYTES)
    segs = kvwire.plan_segments(layout, kvwire.RequestSpec("probe", tokens, tokens))
    src = [np.full(s.nbytes, i % 251, np.uint8) for i, s in enumerate(segs)]
    total = sum(s.nbytes for s in segs)
    before = link.stats()
    with link.inside("client"):
        session = kvwire.connect(link.server_addr, port, lanes=lanes)
    states: list[LinkState] = []
    try:
        for s in session.lane_sockets():
            set_congestion(s, cc)
        with LinkMonitor(session.lane_sockets, interval=0.1) as mon:
            mon.subscribe(states.append)
            t0 = time.monotonic()
            inflight: list[Any] = []
            done = k = 0
            while time.monotonic() - t0 < seconds or inflight:
                while len(inflight) < 2 and time.monotonic() - t0 < seconds:  # keep the lanes fed
                    out = session.send(layout, kvwire.RequestSpec(f"t{lanes}-{k}", tokens, tokens))
                    out.write_all(src)
                    inflight.append(out.finish())
                    k += 1
                inflight.pop(0).result(timeout=120)
                done += 1
            elapsed = time.monotonic() - t0
    finally:
        session.close()
    busy = [s for s in states if s.busy > 0.5 and s.queueing_ratio is not None]
    return {"name": f"kvwire {lanes} lane{'s' if lanes > 1 else ''}", "goodput_mbit": done * total * 8 / elapsed / 1e6,
            "q": statistics.median(s.queueing_ratio for s in busy if s.queueing_ratio) if busy else None,
            "retrans": None, "btl_bw_mbit": max((s.btl_bw for s in states), default=0) * 8 / 1e6,
            "est_mbit": statistics.median(s.goodput for s in busy) * 8 / 1e6 if busy else None,
            "loss_rate": statistics.median(s.loss_rate for s in busy) if busy else None,
            "transfers": done, **_emu_delta(before, link.stats())}


# ---------------------------------------------------------------- driver
def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--receiver", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--bind", default="0.0.0.0", help=argparse.SUPPRESS)
    ap.add_argument("--rate", default="400mbit", type=parse_rate_mbit)
    ap.add_argument("--rtt", default="20ms", type=parse_ms)
    ap.add_argument("--loss", default="0.1%", type=parse_loss)
    ap.add_argument("--queue", default=None, type=int, help="bytes (default: one BDP)")
    ap.add_argument("--cc", default="cubic")
    ap.add_argument("--seconds", default=8.0, type=float)
    ap.add_argument("--lanes", default="4", help="comma-separated kvwire lane counts")
    ap.add_argument("--transfer-mb", default=32, type=int)
    ap.add_argument("--skip-iperf", action="store_true")
    ap.add_argument("--no-realtime", dest="realtime", action="store_false",
                    help="run the emulator as a normal process (default: SCHED_FIFO, see WanLink)")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    if a.receiver:
        return run_receiver(a.bind)
    rows: list[dict[str, Any]] = []
    with WanLink(rtt_ms=a.rtt, loss=a.loss, rate_mbit=a.rate, queue_bytes=a.queue, seed=1,
                 realtime=a.realtime) as link:
        if not a.skip_iperf:
            if shutil.which("iperf3") is None:
                print("iperf3 not installed: skipping its rows", file=sys.stderr)
            else:
                rows += [run_iperf3(link, p, a.seconds, a.cc) for p in (1, 4)]
        rx = link.popen_in("server", [sys.executable, __file__, "--receiver", "--bind", link.server_addr],
                           stdout=subprocess.PIPE, text=True)
        assert rx.stdout is not None
        port = int(json.loads(rx.stdout.readline())["port"])
        for lanes in (int(x) for x in a.lanes.split(",")):
            rows.append(run_kvwire(link, port, lanes, a.seconds, a.cc, a.transfer_mb))
    head = (f"link: {a.rate:g} Mbit/s, RTT {a.rtt:g} ms, loss {a.loss:.3%}, queue {link.queue_bytes} B, "
            f"{a.cc}, {a.seconds:g} s per row")
    if a.json:
        print(json.dumps({"link": head, "rows": rows}, indent=1))
        return 0
    print(head)
    print(f"{'':18}{'goodput Mbit/s':>15}{'LinkState':>10}{'Q srtt/min':>12}{'retr':>7}{'q-drops':>9}"
          f"{'rnd-drops':>10}{'late>1ms':>9}{'>5ms':>6}")
    for r in rows:
        q = f"{r['q']:.2f}" if r["q"] else "-"
        est = f"{r['est_mbit']:.1f}" if r.get("est_mbit") else "-"
        retr = str(r["retrans"]) if r["retrans"] is not None else "-"
        print(f"{r['name']:18}{r['goodput_mbit']:15.1f}{est:>10}{q:>12}{retr:>7}{r['queue_drops']:9d}"
              f"{r['random_drops']:10d}{r['late']:9d}{r['late_5ms']:6d}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
