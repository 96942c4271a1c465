"""Side by side on an emulated cross-datacenter link: iperf3 -P1, iperf3 -P4 and kvwire transfers.

    sudo python benchmarks/wan_bench.py                  # 400 Mbit/s, 20 ms RTT, 0.1% loss, CUBIC
    sudo python benchmarks/wan_bench.py --rate 400mbit --rtt 20ms --loss 0.1% --seconds 8 --lanes 1,4,8
    sudo python benchmarks/wan_bench.py --must-show      # the long-fat-pipe issue's rows (wan_issue.py)
    sudo python benchmarks/wan_bench.py --must-show --gso  # the same, the emulator fed GSO super-packets
                                                           # (loss still per wire packet): on a 2-core host
                                                           # the per-packet emulator falls behind at 2 Gbit/s

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
import threading
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

import kvwire
from kvwire.codec.layout import CacheSpec, LayerSpec, ModelLayout, TensorSpec
from kvwire.congestion.control import LinkControl
from kvwire.congestion.controller import ControllerConfig
from kvwire.congestion.estimator import LinkState
from kvwire.congestion.group import LaneGroup
from kvwire.congestion.monitor import LinkMonitor
from kvwire.probe import probe
from kvwire.sockopts import set_congestion
from kvwire.testing import cemu
from kvwire.testing.recording import record, recorded
from kvwire.testing.wan import WanLink, parse_loss, parse_ms, parse_rate_mbit

TOKEN_BYTES = 8 * 2 * 8 * 128 * 2  # raw layout below: 8 layers x (K, V) x 8 heads x 128 x bf16


def raw_layout() -> ModelLayout:
    def kv(name: str) -> TensorSpec:
        return TensorSpec(name, (8, 128), "bfloat16", "NHD", "token")

    return ModelLayout("wan-bench-raw", tuple(LayerSpec(i, (CacheSpec("gqa", (kv("k"), kv("v"))),))
                                              for i in range(8)))


# ---------------------------------------------------------------- receiver (server namespace)
def run_receiver(bind: str, pool_mb: int = 1024) -> int:
    """Accept transfers forever into one reused buffer per size; print the port, then one line per transfer.

    Buffers come from a pool of ``pool_mb`` MiB whose pages are touched before the port is printed, as
    an engine's KV pool is allocated once at start: a fresh buffer's first-touch page faults (zeroing
    845 MB of huge pages inside the lanes' recv calls) took about a quarter of this 2-core machine's CPU
    during the fat row and slowed the link emulator and both ends with it. Sizes beyond the pool get
    fresh (untouched) buffers; ``pool_mb=0`` gives every size a fresh one."""
    pool = np.ones(pool_mb << 20, np.uint8)  # ones: every page written (zeros could map untouched pages)
    buffers: dict[int, np.ndarray] = {}
    used = 0

    def allocate(m: Any) -> np.ndarray:
        nonlocal used
        n = m.total_bytes
        if n not in buffers:
            if used + n <= len(pool):
                buffers[n], used = pool[used:used + n], used + n
            else:
                buffers[n] = np.zeros(n, np.uint8)
        return buffers[n]

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
    # against the path's base RTT: iperf3's own min_rtt is a min of already-smoothed (inflated) srtt
    ratios = [s["sender"]["mean_rtt"] / (link.rtt_ms * 1e3) for s in end["streams"] if s["sender"].get("mean_rtt")]
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


# ---------------------------------------------------------------- the issue's four scenarios
PAYLOAD_FRACTION = 1448 / 1500  # TCP payload per IP byte (MSS 1448 with timestamps, MTU 1500)


class Payload:
    """One request's segments of a preset layout, as host buffers (allocated once, reused)."""

    def __init__(self, preset: str, tokens: int) -> None:
        self.layout = kvwire.load_layout(preset)
        self.preset, self.tokens = preset, tokens
        segs = kvwire.plan_segments(self.layout, kvwire.RequestSpec("size", tokens, tokens))
        self.buffers = [np.full(sg.nbytes, i % 251, np.uint8) for i, sg in enumerate(segs)]
        self.nbytes = sum(sg.nbytes for sg in segs)

    def send(self, session: kvwire.Session, rid: str) -> Any:
        out = session.send(self.layout, kvwire.RequestSpec(rid, self.tokens, self.tokens), timeout=300)
        out.write_all(self.buffers)
        return out.finish()


def kv_transfer(link: WanLink, port: int, payload: Payload, cfg: ControllerConfig, rid: str,
                during: Any = None) -> dict[str, Any]:
    """One transfer over a fresh session under ``LinkControl``; ``during(t0, ctl)`` runs on a thread
    meanwhile (rate changes, a competing flow)."""
    with link.inside("client"):
        session = kvwire.connect(link.server_addr, port, lanes=cfg.initial_lanes, max_lanes=cfg.max_lanes)
    side: threading.Thread | None = None
    try:
        with link.inside("client"):  # its monitor thread opens new lanes: it must start in the namespace
            ctl = LinkControl(session, cfg)
        record(ctl)
        t0 = time.monotonic()
        if during is not None:
            side = threading.Thread(target=during, args=(t0, ctl), daemon=True)
            side.start()
        payload.send(session, rid).result(timeout=300)
        elapsed = time.monotonic() - t0
        ctl.close()
    finally:
        session.close()
    if side is not None:
        side.join(60)
    return {"elapsed": elapsed, "mbit": payload.nbytes * 8 / elapsed / 1e6, "t0": t0,
            "states": list(recorded(ctl)), "history": ctl.history}


def _trace(a: Any, name: str, kv: dict[str, Any]) -> None:
    """--trace: the controller's decisions and a LinkState every ~0.5 s, on stderr."""
    if not a.trace:
        return
    t0 = kv["t0"]
    for t, d in kv["history"]:
        print(f"[{name}] {max(0.0, t - t0):6.2f}s {d.mode.value:8} lanes {d.lanes} pace/lane "
              f"{_mb(d.pacing_rate)} Mbit/s {d.congestion}: {d.reason}", file=sys.stderr)
    last = -1.0
    for s in kv["states"]:
        if s.timestamp - last >= 0.5:
            last = s.timestamp
            print(f"[{name}] {s.timestamp - t0:6.2f}s goodput {_mb(s.goodput)} btl {_mb(s.btl_bw)} cap "
                  f"{_mb(s.capacity)} q {s.queueing_ratio or 0:.2f} loss {s.loss_rate:.4f} busy {s.busy:.2f} "
                  f"competing {_mb(s.competing_bw)} lanes {len(s.lanes)}", file=sys.stderr)


def _q_median(states: list[LinkState], t_from: float = 0.0, t_to: float = 1e18) -> float | None:
    qs = [s.queueing_ratio for s in states if s.busy > 0.5 and s.queueing_ratio and t_from <= s.timestamp <= t_to]
    return statistics.median(qs) if qs else None


def _mb(x: float | None) -> str:
    return "-" if x is None else f"{x * 8 / 1e6:.0f}"


def scenario_a(a: Any, rx_cmd: list[str], payload: Payload) -> list[tuple[str, str, str, bool | None]]:
    rows = []
    with WanLink(rtt_ms=a.rtt, loss=0.001, rate_mbit=a.rate, seed=1, realtime=a.realtime) as link:
        one = run_iperf3(link, 1, a.seconds, "cubic")
        port, rx = _receiver(link, rx_cmd)
        kv = kv_transfer(link, port, payload, ControllerConfig(), "a")
        kvc = kv_transfer(link, port, payload, ControllerConfig(congestion="cubic", max_lanes=32), "a-cubic")
        rx.terminate()
    _trace(a, "a", kv)
    _trace(a, "a-cubic", kvc)
    modes = sorted({d.mode.value for _, d in kv["history"]})
    share = one["goodput_mbit"] / a.rate
    rows.append(("(a) iperf3 -P1 cubic", f"{one['goodput_mbit']:.1f} Mbit/s = {share:.0%} of link", "< 50%",
                 share < 0.5))
    rows.append((f"(a) kvwire {payload.nbytes / 1e6:.0f} MB",
                 f"{kv['mbit']:.1f} Mbit/s = {kv['mbit'] / a.rate:.1%} of link in {kv['elapsed']:.1f} s "
                 f"(bbr, modes {','.join(modes)})", ">= 90%", kv["mbit"] >= 0.9 * a.rate))
    lanes = max(d.lanes for _, d in kvc["history"])
    rows.append(("(a) kvwire, CUBIC lanes", f"{kvc['mbit']:.1f} Mbit/s = {kvc['mbit'] / a.rate:.1%} of link in "
                 f"{kvc['elapsed']:.1f} s (up to {lanes} lanes: capacity / Mathis rate at the measured loss)",
                 "none: shown beside the BBR lanes kvwire picks", None))
    return rows


def scenario_b(a: Any, rx_cmd: list[str], payload: Payload, queue: int) -> list[tuple[str, str, str, bool | None]]:
    with WanLink(rtt_ms=a.rtt, loss=0.0, rate_mbit=a.rate, queue_bytes=queue, seed=2, realtime=a.realtime) as link:
        four = run_iperf3(link, 4, a.seconds, "cubic")
        port, rx = _receiver(link, rx_cmd)
        kv = kv_transfer(link, port, payload, ControllerConfig(), "b")
        rx.terminate()
    _trace(a, "b", kv)
    q_all = _q_median(kv["states"])
    q_cruise = _q_median(kv["states"], kv["t0"] + 2.0)
    return [("(b) iperf3 -P4 cubic",
             f"{four['goodput_mbit']:.1f} Mbit/s, RTT x{four['q'] or 0:.2f} (mean srtt/base RTT)",
             "RTT >= 2x", (four["q"] or 0) >= 2.0),
            ("(b) kvwire util", f"{kv['mbit']:.1f} Mbit/s = {kv['mbit'] / a.rate:.1%} of link in {kv['elapsed']:.1f} s",
             ">= 90%", kv["mbit"] >= 0.9 * a.rate),
            ("(b) kvwire srtt/min", f"median {q_all or 0:.2f} whole transfer, {q_cruise or 0:.2f} after 2 s",
             "<= 1.3", q_all is not None and q_all <= 1.3)]


def scenario_c(a: Any, rx_cmd: list[str], payload: Payload, queue: int) -> list[tuple[str, str, str, bool | None]]:
    halve_at, hold = 4.0, 3.0
    marks: dict[str, float] = {}
    with WanLink(rtt_ms=a.rtt, loss=0.0, rate_mbit=a.rate, queue_bytes=queue, seed=3, realtime=a.realtime) as link:
        port, rx = _receiver(link, rx_cmd)

        def halve(t0: float, ctl: LinkControl) -> None:
            time.sleep(max(0.0, t0 + halve_at - time.monotonic()))
            link.set_rate(a.rate / 2)
            marks["halved"] = time.monotonic()
            time.sleep(hold)
            link.set_rate(a.rate)
            marks["restored"] = time.monotonic()

        kv = kv_transfer(link, port, payload, ControllerConfig(), "c", during=halve)
        rx.terminate()
    _trace(a, "c", kv)
    th, tr = marks["halved"], marks.get("restored", 1e18)
    full = a.rate * 1e6 / 8 * PAYLOAD_FRACTION
    new = full / 2
    before = [s.capacity for s in kv["states"] if th - 1.0 <= s.timestamp <= th and s.capacity]
    cap_before = statistics.median(before) if before else None
    right_before = cap_before is not None and 0.85 * full <= cap_before <= 1.15 * full
    after = [s for s in kv["states"] if th < s.timestamp <= tr]
    t_cap = next((s.timestamp - th for s in after if s.capacity and 0.85 * new <= s.capacity <= 1.15 * new), None)
    back = [s for s in kv["states"] if s.timestamp > tr]
    t_back = next((s.timestamp - tr for s in back if s.capacity and s.capacity >= 0.85 * full), None)
    over = [s.timestamp for s in after if (s.queueing_ratio or 0) > 1.3]
    t_q = (max(over) - th) if over else 0.0
    peak = max((s.queueing_ratio or 0 for s in after), default=0.0)
    last = after[-1] if after else None
    return [("(c) capacity after halving",
             f"{_mb(cap_before)} -> {_mb(last.capacity if last else None)} Mbit/s in "
             f"{'-' if t_cap is None else f'{t_cap:.2f}'} s (payload rate {full * 8e-6:.0f} -> {new * 8e-6:.0f}; "
             f"back up {'-' if t_back is None else f'{t_back:.1f}'} s after the rate returned)", "<= 1 s",
             right_before and t_cap is not None and t_cap <= 1.0),
            ("(c) queue back under 1.3", f"{t_q:.2f} s after halving (peak ratio {peak:.2f})", "<= 2 s", t_q <= 2.0)]


def scenario_d(a: Any, rx_cmd: list[str], payload: Payload, queue: int) -> list[tuple[str, str, str, bool | None]]:
    start_at, secs = 2.5, max(6.0, a.seconds)
    out: dict[str, Any] = {}
    with WanLink(rtt_ms=a.rtt, loss=0.0, rate_mbit=a.rate, queue_bytes=queue, seed=4, realtime=a.realtime) as link:
        port, rx = _receiver(link, rx_cmd)
        srv = link.popen_in("server", ["iperf3", "-s", "-1", "-B", link.server_addr],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

        def compete(t0: float, ctl: LinkControl) -> None:
            time.sleep(max(0.0, t0 + start_at - time.monotonic()))
            out["start"] = time.monotonic()
            r = link.run_in("client", ["iperf3", "-c", link.server_addr, "-t", str(secs), "-J", "-C", "cubic"],
                            timeout=secs + 30)
            out["end"] = time.monotonic()
            out["doc"] = json.loads(r.stdout or "{}")

        kv = kv_transfer(link, port, payload, ControllerConfig(polite=True), "d", during=compete)
        srv.wait(10)
        rx.terminate()
    _trace(a, "d", kv)
    doc = out.get("doc", {})
    iperf = doc.get("end", {}).get("sum_received", {}).get("bits_per_second", 0) / 1e6
    lo, hi = out.get("start", 0) + 2.0, out.get("end", 0)  # past iperf's slow start, while both run
    both = [s for s in kv["states"] if lo <= s.timestamp <= hi and s.busy > 0.5]
    mine = statistics.median(s.goodput for s in both) * 8 / 1e6 if both else 0.0
    fair = (mine + iperf) / 2 if iperf else 0.0
    cap = statistics.median(s.capacity or 0 for s in both) if both else None
    usable = statistics.median(s.usable_bw or 0 for s in both) if both else None
    comp = statistics.median(s.competing_bw or 0 for s in both) if both else None
    alone = [s for s in kv["states"] if s.timestamp < out.get("start", 0) and s.usable_bw]
    return [("(d) polite share", f"kvwire {mine:.0f} vs iperf3 {iperf:.0f} Mbit/s: {mine / fair if fair else 0:.0%} "
             f"of fair share (whole kvwire transfer {kv['mbit']:.0f})", "100% +-20%",
             bool(fair) and abs(mine / fair - 1) <= 0.2),
            ("(d) LinkState while shared", f"capacity {_mb(cap)}, competing {_mb(comp)}, usable {_mb(usable)} Mbit/s "
             f"(alone: usable {_mb(alone[-1].usable_bw if alone else None)})", "usable < capacity",
             usable is not None and cap is not None and usable < 0.8 * cap)]


def scenario_s(a: Any, rx_cmd: list[str], payload: Payload, queue: int) -> list[tuple[str, str, str, bool | None]]:
    """Two kvwire senders (two sessions, each under its own ``LinkControl``, as two prefill nodes would
    be) share the lossless link; the second starts ``later`` s after the first. Judged while both run,
    from each one's LinkState goodput: the sum against the link, the split (Jain's index), the queue."""
    later = 3.0
    res: dict[str, dict[str, Any]] = {}
    with WanLink(rtt_ms=a.rtt, loss=0.0, rate_mbit=a.rate, queue_bytes=queue, seed=7, realtime=a.realtime) as link:
        port, rx = _receiver(link, rx_cmd)

        def one(name: str, delay: float) -> None:
            time.sleep(delay)
            res[name] = kv_transfer(link, port, payload, ControllerConfig(), f"s-{name}")

        threads = [threading.Thread(target=one, args=(n, d)) for n, d in (("A", 0.0), ("B", later))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        rx.terminate()
    if set(res) != {"A", "B"}:
        return [("(s) two kvwire senders", "a transfer failed", "both complete", False)]
    for n, kv in res.items():
        _trace(a, f"s-{n}", kv)
    lo = max(kv["t0"] for kv in res.values()) + 2.0  # past B's probe
    hi = min(kv["t0"] + kv["elapsed"] for kv in res.values())
    rates, qs = [], []
    for kv in res.values():
        both = [s for s in kv["states"] if lo <= s.timestamp <= hi and s.busy > 0.5]
        rates.append(statistics.median(s.goodput for s in both) * 8 / 1e6 if both else 0.0)
        qs += [s.queueing_ratio for s in both if s.queueing_ratio]
    return _sharing_rows(a, "s", "two kvwire senders", rates, qs, hi - lo)


def scenario_g(a: Any, rx_cmd: list[str], payload: Payload, queue: int) -> list[tuple[str, str, str, bool | None]]:
    """(s) again with both sessions in one ``LaneGroup`` under one ``LinkControl`` (as a PrfaaS server
    drives its decode peers): each session's rate from its own bytes sent, sampled every 0.1 s."""
    later, cfg = 3.0, ControllerConfig()
    ends: dict[int, tuple[float, float]] = {}
    samples: list[tuple[float, int, int]] = []
    with WanLink(rtt_ms=a.rtt, loss=0.0, rate_mbit=a.rate, queue_bytes=queue, seed=7, realtime=a.realtime) as link:
        port, rx = _receiver(link, rx_cmd)
        with link.inside("client"):
            sessions = [kvwire.connect(link.server_addr, port, lanes=cfg.initial_lanes, max_lanes=cfg.max_lanes)
                        for _ in range(2)]
            ctl = LinkControl(LaneGroup(sessions), cfg)
        record(ctl)
        stop = threading.Event()

        def sample() -> None:
            while not stop.wait(0.1):
                a_, b_ = (s.stats()["bytes_sent"] for s in sessions)
                samples.append((time.monotonic(), a_, b_))

        def one(i: int, delay: float) -> None:
            time.sleep(delay)
            t = time.monotonic()
            payload.send(sessions[i], f"g-{i}").result(timeout=300)
            ends[i] = (t, time.monotonic())

        threads = [threading.Thread(target=f, args=args) for f, args in
                   ((sample, ()), (one, (0, 0.0)), (one, (1, later)))]
        try:
            for t in threads:
                t.start()
            for t in threads[1:]:
                t.join()
        finally:
            stop.set()
            threads[0].join()
            ctl.close()
            for s in sessions:
                s.close()
            rx.terminate()
    if set(ends) != {0, 1}:
        return [("(g) one LinkControl, two sessions", "a transfer failed", "both complete", False)]
    _trace(a, "g", {"states": recorded(ctl), "history": ctl.history, "t0": ends[0][0]})
    lo, hi = ends[1][0] + 2.0, min(e for _, e in ends.values())
    window = [x for x in samples if lo <= x[0] <= hi]
    span = window[-1][0] - window[0][0] if len(window) > 1 else 0.0
    rates = [(window[-1][i] - window[0][i]) * 8 / span / 1e6 if span else 0.0 for i in (1, 2)]
    qs = [s.queueing_ratio for s in recorded(ctl) if lo <= s.timestamp <= hi and s.busy > 0.5 and s.queueing_ratio]
    return _sharing_rows(a, "g", "one LinkControl, two sessions", rates, qs, span)


def _sharing_rows(a: Any, tag: str, what: str, rates: list[float], qs: list[float],
                  span: float) -> list[tuple[str, str, str, bool | None]]:
    total = sum(rates)
    jain = total ** 2 / (len(rates) * sum(r * r for r in rates)) if total else 0.0
    q = statistics.median(qs) if qs else None
    return [(f"({tag}) {what}", f"A {rates[0]:.0f} + B {rates[1]:.0f} = {total:.0f} Mbit/s = "
             f"{total / a.rate:.0%} of link over {max(0.0, span):.1f} s together", ">= 90%", total >= 0.9 * a.rate),
            (f"({tag}) their split", f"Jain's index {jain:.2f} (1: equal)", ">= 0.9", jain >= 0.9),
            (f"({tag}) queue while shared", f"median srtt/min {q or 0:.2f}", "<= 1.3", q is not None and q <= 1.3)]


def scenario_p(a: Any, rx_cmd: list[str], queue: int) -> list[tuple[str, str, str, bool | None]]:
    """``kvwire.probe`` before any traffic, on the lossless link of (b)-(d) and the lossy one of (a)."""
    rows = []
    full = a.rate * 1e6 / 8 * PAYLOAD_FRACTION
    for name, loss, q, seed in (("no loss", 0.0, queue, 5), ("0.1% loss", 0.001, None, 6)):
        with WanLink(rtt_ms=a.rtt, loss=loss, rate_mbit=a.rate, queue_bytes=q, seed=seed,
                     realtime=a.realtime) as link:
            port, rx = _receiver(link, rx_cmd)
            with link.inside("client"):
                session = kvwire.connect(link.server_addr, port, lanes=4)
            try:
                r = probe(session, seconds=1.0)
            finally:
                session.close()
            rx.terminate()
        ok_cap = 0.9 * full <= r.capacity <= 1.1 * full
        # TCP's RTT samples are microsecond stamps: a few us under the configured delay is still it
        ok_rtt = r.min_rtt is not None and a.rtt / 1e3 - 0.0001 <= r.min_rtt <= a.rtt / 1e3 + 0.001
        rows.append((f"(p) probe, {name}",
                     f"capacity {r.capacity * 8e-6:.0f} Mbit/s = {r.capacity / full:.0%} of the payload rate "
                     f"({'saturated' if r.saturated else 'lower bound'}), min RTT "
                     f"{(r.min_rtt or 0) * 1e3:.3f} ms, peak ratio {r.max_queueing_ratio or 0:.2f}, "
                     f"{r.bytes_sent / 1e6:.0f} MB in {r.seconds:.2f} s", "cap +-10%, RTT -0.1/+1 ms",
                     ok_cap and ok_rtt and r.saturated))
    return rows


def _receiver(link: WanLink, cmd: list[str]) -> tuple[int, subprocess.Popen[str]]:
    rx = link.popen_in("server", [*cmd, "--bind", link.server_addr], stdout=subprocess.PIPE, text=True)
    assert rx.stdout is not None
    return int(json.loads(rx.stdout.readline())["port"]), rx


def run_scenarios(a: Any) -> int:
    payload = Payload(a.preset, a.tokens)
    bdp = int(a.rate * 1e6 / 8 * a.rtt / 1e3)
    queue = a.queue or 3 * bdp
    rx_cmd = [sys.executable, __file__, "--receiver"]
    wanted = set(a.scenarios)
    rows: list[tuple[str, str, str, bool | None]] = []
    if "a" in wanted:
        rows += scenario_a(a, rx_cmd, payload)
    if "b" in wanted:
        rows += scenario_b(a, rx_cmd, payload, queue)
    if "c" in wanted:
        rows += scenario_c(a, rx_cmd, Payload(a.preset, max(1024, a.tokens // 2)), queue)
    if "d" in wanted:
        rows += scenario_d(a, rx_cmd, payload, queue)
    if "s" in wanted:
        rows += scenario_s(a, rx_cmd, payload, queue)
    if "g" in wanted:
        rows += scenario_g(a, rx_cmd, payload, queue)
    if "p" in wanted:
        rows += scenario_p(a, rx_cmd, queue)
    print(f"link: {a.rate:g} Mbit/s, RTT {a.rtt:g} ms; (a) 0.1% loss, 1-BDP queue; (b)-(d), (s), (g) no loss, "
          f"{queue} B queue ({queue / bdp:.1f} BDP); payload {a.preset} {a.tokens} tokens = "
          f"{payload.nbytes / 1e6:.1f} MB ((c): half); iperf3 rows {a.seconds:g} s, CUBIC; "
          f"{cemu.emulator_command(None)[1]} emulator")
    w = max(len(r[0]) for r in rows)
    for name, value, target, ok in rows:
        print(f"{name:<{w}}  {'INFO' if ok is None else 'PASS' if ok else 'MISS'}  {value}   [target {target}]")
    return 0 if all(r[3] is not False for r in rows) else 1


# ---------------------------------------------------------------- driver
def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--receiver", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--bind", default="0.0.0.0", help=argparse.SUPPRESS)
    ap.add_argument("--rx-pool-mb", default=1024, type=int,
                    help="the receiver's buffers come from a pool this large, touched at start like an engine's KV "
                         "pool (0: a fresh buffer per transfer size, paying its page faults during the transfer)")
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
    ap.add_argument("--scenarios", default="",
                    help="the issue's scenarios instead, e.g. abcdsgp (s: two kvwire senders, g: the same two "
                         "sessions under one LinkControl, p: probe)")
    ap.add_argument("--preset", default="qwen3-next-80b-a3b")
    ap.add_argument("--tokens", default=32768, type=int)
    ap.add_argument("--trace", action="store_true", help="scenarios: decisions and LinkStates on stderr")
    ap.add_argument("--must-show", action="store_true",
                    help="the long-fat-pipe issue's rows instead (benchmarks/wan_issue.py): --rows, --scale")
    ap.add_argument("--rows", default="fat,burst,burst0,stream,stream0,lossy,fair,collapse,collapse10,loopback")
    ap.add_argument("--scale", default=1.0, type=float, help="--must-show: multiply every link rate")
    ap.add_argument("--warm", default="auto", choices=("auto", "on", "off"),
                    help="--must-show lossy row: connect(warm=...) forced on or off (auto: connect()'s default); "
                         "stream row: kvwire-bench --warm unless off (connect() warms on its 80 ms path)")
    ap.add_argument("--requests", default=6, type=int, help="--must-show burst and stream rows: 8k-token requests")
    ap.add_argument("--loopback-reps", default=15, type=int)
    ap.add_argument("--gso", action="store_true",
                    help="--must-show: the emulator takes GSO super-packets whole (a small fraction of its CPU at "
                         "2 Gbit/s on this host); the queue then acts on up to 64 KiB at once, and random loss drops "
                         "a super-packet with the chance that any of its MTU-sized wire packets would be lost")
    a = ap.parse_args(argv)
    if a.receiver:
        return run_receiver(a.bind, a.rx_pool_mb)
    if a.must_show:
        import wan_issue  # beside this file

        return wan_issue.run(a, __file__)
    if a.scenarios:
        return run_scenarios(a)
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
            f"{a.cc}, {a.seconds:g} s per row, {link.backend} emulator")
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
