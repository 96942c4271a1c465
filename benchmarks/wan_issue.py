"""The long-fat-pipe issue's "Must show" rows, side by side in one run (``wan_bench.py --must-show``).

    sudo python benchmarks/wan_bench.py --must-show                    # every row, full scale
    sudo python benchmarks/wan_bench.py --must-show --rows fat,burst --scale 0.5

Owns: the rows — on an emulated link (``kvwire.testing.WanLink``), kvwire with *default settings* (a plain
``kvwire.connect``: its own congestion control, no flags) beside iperf3 -P1/-P8 with BBR and CUBIC; the
sender processes of the fairness row (``--sender`` mode of this file); the table. Must not know: kvwire
internals beyond the public API, ``Session.link_control`` and ``Session.lane_sockets()``; the ``stream``
row runs ``kvwire-bench``'s own sending side and document (``kvwire.bench``: its per-layer timeline and
exposed-tail figures) against a one-off bench server in the link's server namespace.

Rows (``--rows``): ``fat`` 2 Gbit/s, 80 ms, 0.01 % loss, 20 ms drop-tail queue: a 32k-token Qwen3-Next cache and
iperf3; ``burst`` the same link, one 8k-token request a second over one session; ``lossy`` 400 Mbit/s, 20 ms,
0.1 % loss: kvwire default and with CUBIC forced, retransmits beside one iperf3 BBR stream; ``stream`` the same
link as ``fat``, 8k-token requests produced layer by layer at half the link's payload rate (``kvwire-bench
--prefill-ms-per-layer``) over a session warmed as ``kvwire.connect()`` warms one on this path (``kvwire-bench
--warm``; ``--warm off``: cold), the exposed tail (last layer verified at the receiver minus last layer
produced) against the last layer's wire time + 1 RTT + 10 ms; ``burst0``/``stream0`` those two on the same link
without its random loss, as INFO beside them (what the loss costs their tails); ``streamnp`` the stream row
without the tail parity ``kvwire.connect()`` sends by default on this path, as INFO beside it (what the parity
buys); ``fair`` 4 kvwire sender processes on 1 Gbit/s, 40 ms; ``collapse`` the link starved to 2 % for 3 s under
a running transfer, then restored; ``loopback`` control on vs off on 127.0.0.1. ``--scale`` multiplies every
rate (the RTTs and queues in time stay): what this machine's emulator cannot carry is scaled down and the header
says so. The payload rate of a link is its IP rate x 1448/1500.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from wan_bench import PAYLOAD_FRACTION, Payload  # beside this file (wan_bench imports this module only inside main)

import kvwire
from kvwire.congestion.controller import ControllerConfig
from kvwire.congestion.tcpinfo import TcpInfoUnavailable, read_tcp_info
from kvwire.testing import cemu
from kvwire.testing.recording import record, recorded
from kvwire.testing.wan import WanError, WanLink

Row = tuple[str, str, str, "bool | None"]
QWEN = "qwen3-next-80b-a3b"


def _receiver(link: WanLink, bench: str, pool_mb: int) -> tuple[int, subprocess.Popen[str]]:
    rx = link.popen_in("server", [sys.executable, bench, "--receiver", "--bind", link.server_addr,
                                  "--rx-pool-mb", str(pool_mb)],
                       stdout=subprocess.PIPE, text=True)
    assert rx.stdout is not None
    return int(json.loads(rx.stdout.readline())["port"]), rx


def _iperf(link: WanLink, streams: int, cc: str, seconds: float, omit: float = 2.0) -> dict[str, Any]:
    """iperf3 for ``seconds`` (after ``omit`` s left out of its totals); ``retrans_after``: retransmits of the
    intervals from 2 s on (with ``omit`` 0: the like of a count that leaves the start out)."""
    srv = link.popen_in("server", ["iperf3", "-s", "-1", "-B", link.server_addr],
                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.4)
    r = link.run_in("client", ["iperf3", "-c", link.server_addr, "-t", str(seconds), "-O", f"{omit:g}", "-J",
                               "-C", cc, "-P", str(streams)], timeout=seconds + omit + 40)
    srv.wait(10)
    doc = json.loads(r.stdout or "{}")
    end = doc.get("end", {})
    after = [iv.get("sum", {}) for iv in doc.get("intervals", [])]
    after = [x for x in after if not x.get("omitted") and x.get("start", 0) >= 2.0 - 1e-6]
    return {"mbit": end.get("sum_received", {}).get("bits_per_second", 0) / 1e6,
            "retrans": end.get("sum_sent", {}).get("retransmits", 0), "seconds": seconds,
            "retrans_after": sum(x.get("retransmits", 0) for x in after),
            "seconds_after": sum(x.get("seconds", 0.0) for x in after)}


def _retrans(session: kvwire.Session) -> int:
    """Segments retransmitted on every lane the session opened (``Session.stats()["retransmits"]``): parked
    ones too (the warm-up at connect runs on every lane the controller may use, and the controller then
    parks most of them), and lanes closed or re-dialled since, whose sockets took their counts with them."""
    return session.stats()["retransmits"]


def _connect(link: WanLink, port: int, warm: str = "auto", **kw: Any) -> kvwire.Session:
    """``warm``: ``auto`` is ``connect()``'s default; ``on``/``off`` force one arm (``--warm``)."""
    if warm != "auto":
        kw.setdefault("warm", warm == "on")
    with link.inside("client"):
        s = kvwire.connect(link.server_addr, port, **kw)
    if s.link_control is not None:
        record(s.link_control)
    return s


def _send_inside(link: WanLink, payload: Payload, session: kvwire.Session, rid: str) -> Any:
    with link.inside("client"):  # the controller's thread starts here: lanes it adds live in the namespace
        return payload.send(session, rid)


def _steady_q(session: kvwire.Session, t_from: float) -> float | None:
    ctl = session.link_control
    qs = [s.queueing_ratio for s in (recorded(ctl) if ctl else []) if s.timestamp >= t_from and s.busy > 0.5
          and s.queueing_ratio]
    return statistics.median(qs) if qs else None


def _trace(a: Any, name: str, session: kvwire.Session, t0: float) -> None:
    """--trace: the session's controller decisions and a LinkState every 0.5 s (every one in the first 2 s
    and near a decision), on stderr."""
    ctl = session.link_control
    if not a.trace or ctl is None:
        return
    for t, d in ctl.history:
        print(f"[{name}] {max(0.0, t - t0):6.2f}s {d.mode.value:8} lanes {d.lanes} pacing "
              f"{(d.total_pacing or 0) * 8e-6:.0f} Mbit/s: {d.reason}", file=sys.stderr)
    last = -1.0
    changes = [t for t, _ in ctl.history]
    # (every sample of the first 2 s: the start, and within 0.6 s of a decision; otherwise one every 0.5 s)
    for st in recorded(ctl):
        near = any(abs(st.timestamp - t) <= 0.6 for t in changes)
        if st.timestamp - last >= 0.5 or st.timestamp - t0 < 2.0 or near:
            last = st.timestamp
            print(f"[{name}] {st.timestamp - t0:6.2f}s {_state_line(st.to_dict())} "
                  f"dlv {sum(ln.delivery_rate or 0 for ln in st.lanes) * 8e-6:.0f} lanes {len(st.lanes)}",
                  file=sys.stderr)


def _state_line(s: dict[str, Any]) -> str:
    """One LinkState (``LinkState.to_dict()``, or a bench interval's ``link``, which lacks the lanes) for --trace."""
    return (f"goodput {s['goodput'] * 8e-6:.0f} cap {(s['capacity'] or 0) * 8e-6:.0f} btl {s['btl_bw'] * 8e-6:.0f} "
            f"q {s['queueing_ratio'] or 0:.2f} srtt {(s['srtt'] or 0) * 1e3:.0f} sndbuf {s['sndbuf_limited']:.2f} "
            f"rwnd {s['rwnd_limited']:.2f} loss {s['loss_rate']:.4f} busy {s['busy']:.2f} "
            f"limited {int(s['app_limited'])}{int(s['pacing_limited'])} unq {s['unqueued']:.2f} "
            f"sat {int(s['saturated'])}{' overflowing' if s['overflowing'] else ''}"
            f"{' stalled' if s['stalled'] else ''} maxq {(s['max_queue'] or 0) * 1e3:.0f}")


def _data_drops(link: WanLink) -> dict[str, int]:
    """The emulator's drop counters on the data direction (client to server); {} where it has none."""
    try:
        c2s = link.stats().get("c2s", {})
    except (WanError, KeyError):
        return {}
    return {k: int(c2s.get(k, 0)) for k in ("random_drops", "queue_drops")}


def _pct(x: float) -> str:
    return f"{x:.0%}"


def _warmup_row(row: str, session: kvwire.Session, connect_s: float) -> Row:
    """What warming the session at connect cost (``Session.warmup``; ``connect(warm=...)``, ``$KVWIRE_WARM``)."""
    w = session.warmup
    if w is None:
        return (f"{row} connect (not warmed)", f"{connect_s:.2f} s", "INFO", None)
    return (f"{row} connect + warm-up", f"{connect_s:.2f} s: burst {w.seconds:.2f} s + drain {w.drain_seconds:.2f} s, "
            f"{w.bytes_sent / 1e6:.0f} MB, capacity {w.capacity * 8e-6:.0f} Mbit/s"
            f"{'' if w.measured else ' (pipe not seen full)'}", "INFO", None)


# ---------------------------------------------------------------- rows
def row_fat(a: Any, bench: str) -> list[Row]:
    rate = 2000 * a.scale
    full = rate * PAYLOAD_FRACTION
    rows: list[Row] = []
    with WanLink(rtt_ms=80, loss=0.0001, rate_mbit=rate, queue_bytes=int(rate * 1e6 / 8 * 0.020), seed=11,
                 realtime=a.realtime, gso=getattr(a, "gso", False)) as link:
        for streams, cc in () if a.skip_iperf else ((1, "bbr"), (8, "bbr"), (1, "cubic"), (8, "cubic")):
            r = _iperf(link, streams, cc, a.seconds)
            rows.append((f"fat  iperf3 -P{streams} {cc}", f"{r['mbit']:.0f} Mbit/s = {_pct(r['mbit'] / full)} of "
                         f"payload rate, {r['retrans']} retrans", "beside", None))
        port, rx = _receiver(link, bench, a.rx_pool_mb)
        payload = Payload(QWEN, 32768)
        tc = time.monotonic()
        s = _connect(link, port)
        rows.append(_warmup_row("fat ", s, time.monotonic() - tc))
        try:
            t0 = time.monotonic()
            _send_inside(link, payload, s, "fat").result(600)
            el = time.monotonic() - t0
            q = _steady_q(s, t0 + 3.0)
            _trace(a, "fat", s, t0)
            ctl = s.link_control
            lanes, mode = (ctl.decision.lanes, ctl.decision.mode.value) if ctl else (0, "-")
        finally:
            s.close()
        mbit = payload.nbytes * 8 / el / 1e6
        stats = link.stats()
        rx.terminate()
    rows.append(("fat  kvwire default, 32k Qwen3-Next", f"{mbit:.0f} Mbit/s = {_pct(mbit / full)} in {el:.1f} s "
                 f"({payload.nbytes / 1e6:.0f} MB; ended {mode}, {lanes} lanes; emulator late>5ms "
                 f"{stats['late_5ms']})", ">= 90%", mbit >= 0.9 * full))
    rows.append(("fat  kvwire srtt/min RTT after 3 s", f"{q or 0:.2f}", "<= 1.3", q is not None and q <= 1.3))
    return rows


def _done_times(rx: subprocess.Popen[str]) -> dict[str, float]:
    """When the receiver reported each transfer done (its ``done`` lines, timestamped as they arrive here:
    one machine, one monotonic clock), filled by a reader thread."""
    seen: dict[str, float] = {}

    def read() -> None:
        assert rx.stdout is not None
        for line in rx.stdout:
            t = time.monotonic()
            try:
                doc = json.loads(line)
            except ValueError:
                continue
            if "done" in doc:
                seen[str(doc["done"])] = t

    threading.Thread(target=read, daemon=True).start()
    return seen


def row_burst(a: Any, bench: str, loss: float = 0.0001) -> list[Row]:
    """Per-request time is the sender's: ``send()`` to ``result()`` (what the prefill side sees), one
    request after the other, the next at the latest one second after the last one started. Beside it, as
    INFO, the time until the receiver had the request verified (what the decode side waits for)."""
    rate = 2000 * a.scale
    full = rate * PAYLOAD_FRACTION * 1e6 / 8
    payload = Payload(QWEN, 8192)
    ideal = payload.nbytes / full
    times: list[float] = []
    at_rx: list[float] = []
    with WanLink(rtt_ms=80, loss=loss, rate_mbit=rate, queue_bytes=int(rate * 1e6 / 8 * 0.020), seed=12,
                 realtime=a.realtime, gso=getattr(a, "gso", False)) as link:
        port, rx = _receiver(link, bench, a.rx_pool_mb)
        done = _done_times(rx)
        tc = time.monotonic()
        s = _connect(link, port)
        warm = _warmup_row("burst", s, time.monotonic() - tc)
        t0 = time.monotonic()
        try:
            for i in range(a.requests):
                start = time.monotonic()
                _send_inside(link, payload, s, f"b{i}").result(600)
                times.append(time.monotonic() - start)
                deadline = time.monotonic() + 1.0
                while f"b{i}" not in done and time.monotonic() < deadline:
                    time.sleep(0.001)
                at_rx.append(done.get(f"b{i}", float("nan")) - start)
                time.sleep(max(0.0, start + max(1.0, ideal) - time.monotonic()))  # one a second
            _trace(a, "burst", s, t0)
        finally:
            s.close()
        drops = _data_drops(link)
        rx.terminate()
    med = statistics.median(times[1:]) if len(times) > 1 else times[0]
    rx_med = statistics.median(at_rx[1:]) if len(at_rx) > 1 else at_rx[0]
    return [warm, ("burst first 8k request", f"{times[0]:.2f} s = {times[0] / ideal:.2f}x ideal {ideal:.2f} s",
             "<= 1.5x", times[0] <= 1.5 * ideal),
            ("burst median of the rest", f"{med:.2f} s = {med / ideal:.2f}x ideal (all: "
             f"{', '.join(f'{t:.2f}' for t in times)})", "<= 1.15x", med <= 1.15 * ideal),
            ("burst at the receiver (send() to verified there)", f"median of the rest {rx_med:.2f} s = "
             f"{rx_med / ideal:.2f}x ideal (all: {', '.join(f'{t:.2f}' for t in at_rx)}); emulator drops "
             f"{drops or '-'}", "INFO", None)]


def row_lossy(a: Any, bench: str) -> list[Row]:
    rate = 400 * a.scale
    full = rate * PAYLOAD_FRACTION
    rows: list[Row] = []
    with WanLink(rtt_ms=20, loss=0.001, rate_mbit=rate, seed=13, realtime=a.realtime,
                 gso=getattr(a, "gso", False)) as link:
        # (whole runs, starts included, like kvwire's: no -O; its intervals give the count from 2 s on)
        emu0 = _data_drops(link)
        one = _iperf(link, 1, "bbr", a.seconds, omit=0.0)
        emu1 = _data_drops(link)  # (iperf3's own drops on the link, like for like with kvwire's below)
        one_drops = sum(emu1.get(k, 0) - emu0.get(k, 0) for k in ("random_drops", "queue_drops"))
        port, rx = _receiver(link, bench, a.rx_pool_mb)
        payload = Payload(QWEN, 16384)
        for name, kw in (("default", {}), ("-C cubic", {"link_control": ControllerConfig(
                congestion="cubic", max_lanes=32)})):
            tc, emu0 = time.monotonic(), _data_drops(link)
            s = _connect(link, port, getattr(a, "warm", "auto"), **kw)
            connect_s = time.monotonic() - tc
            try:
                before, t0 = _retrans(s), time.monotonic()
                # a warm-up at connect is this run's start: its retransmits (the lanes count from their
                # opening) and its time belong to the whole run, as iperf3's start belongs to its own
                warmed = s.warmup is not None
                if warmed:
                    before = 0
                # (kvwire's count from 2 s on, the like of iperf3's intervals from 2 s on)
                at2: list[int] = []
                mark = threading.Timer(2.0, lambda out=at2, sess=s: out.append(_retrans(sess)))
                mark.start()
                n = 0
                while time.monotonic() - t0 < a.seconds:
                    _send_inside(link, payload, s, f"l{name}{n}").result(600)
                    n += 1
                el = time.monotonic() - t0
                mark.cancel()
                retr = _retrans(s) - before  # (lanes the controller added count from their opening)
                steady = (_retrans(s) - at2[0]) / (el - 2.0) if at2 and el > 3.0 else None
                emu1 = _data_drops(link)
                lanes = s.active_lanes
                _trace(a, f"lossy {name}", s, t0)
            finally:
                s.close()
            # where they came from: the emulator's drops on the data direction (random loss vs its queue)
            drops = {k: emu1.get(k, 0) - emu0.get(k, 0) for k in ("random_drops", "queue_drops")}
            mbit = n * payload.nbytes * 8 / el / 1e6
            whole = el + (t0 - tc if warmed else 0.0)
            per_s, iperf_per_s = retr / whole, one["retrans"] / one["seconds"]
            rows.append(_warmup_row(f"lossy {name}", s, connect_s))
            rows.append((f"lossy kvwire {name}", f"{mbit:.0f} Mbit/s = {_pct(mbit / full)} over {el:.1f} s, {lanes} "
                         f"lanes; {retr} retransmits ({drops['queue_drops']} queue drops, {drops['random_drops']} "
                         f"random)", ">= 90%", mbit >= 0.9 * full))
            if name == "default":
                # over the same time: whole runs (each with its own start) and both from 2 s on (steady state)
                rows.append(("lossy retransmits vs iperf3 -P1 bbr, whole runs", f"{per_s:.0f}/s vs {iperf_per_s:.0f}/s "
                             f"({one['mbit']:.0f} Mbit/s) = {per_s / max(iperf_per_s, 1e-9):.1f}x"
                             f"{' (with the warm-up at connect)' if warmed else ''}", "<= 3x",
                             per_s <= 3 * iperf_per_s))
                kv_drops, one_per_s = (drops["queue_drops"] + drops["random_drops"]) / whole, one_drops / one["seconds"]
                rows.append(("lossy emulator drops of data packets, whole runs", f"kvwire {kv_drops:.0f}/s "
                             f"({drops['queue_drops']} queue) vs iperf3 -P1 bbr {one_per_s:.0f}/s = "
                             f"{kv_drops / max(one_per_s, 1e-9):.1f}x", "<= 3x", kv_drops <= 3 * one_per_s))
                after_s = one["retrans_after"] / one["seconds_after"] if one["seconds_after"] else None
                if steady is not None and after_s is not None:
                    rows.append(("lossy retransmits vs iperf3, both from 2 s on", f"{steady:.0f}/s vs {after_s:.0f}/s "
                                 f"= {steady / max(after_s, 1e-9):.1f}x", "<= 3x", steady <= 3 * after_s))
        rx.terminate()
    return rows


def run_sender(host: str, port: int, start: float, until: float) -> int:
    """--sender: a default session that connects at ``start`` and moves 8k-token caches back to back until
    ``until`` (both ``time.time()``); prints ``[t, acked bytes]`` every 0.25 s (TCP_INFO of its lanes). Its
    payload is built before ``start``: built after three senders were running, it took 6 s on this 2-core
    host, and the last sender joined the row's window 15 s in, not 6. All the row's senders end together:
    a request still in flight then is cancelled (a request takes ~8 s at a quarter of 1 Gbit/s; senders
    that ended at a request's boundary left the row's common window anywhere from 1 to 9 s long)."""
    payload = Payload(QWEN, 8192)
    time.sleep(max(0.0, start - time.time()))
    s = kvwire.connect(host, port)
    acked: dict[int, int] = {}
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.25):
            for sock in s.lane_sockets():
                try:
                    acked[sock.fileno()] = read_tcp_info(sock).bytes_acked or 0
                except TcpInfoUnavailable:
                    pass
            print(json.dumps([time.time(), sum(acked.values())]), flush=True)
            ctl = s.link_control
            st = ctl.latest() if ctl is not None else None
            if ctl is not None and st is not None and os.environ.get("KVWIRE_BENCH_TRACE"):
                d = ctl.decision
                print(f"[{os.getpid()}] {d.mode.value} pace {(d.total_pacing or 0) * 8e-6:.0f} shared cap "
                      f"{(ctl.shared_cap or 0) * 8e-6:.0f} cap {(st.capacity or 0) * 8e-6:.0f} best "
                      f"{(ctl.controller.state.best or 0) * 8e-6:.0f} good {st.goodput * 8e-6:.0f} q "
                      f"{st.queueing_ratio or 0:.2f} peers {len(ctl.share.others()) if ctl.share else '-'}",
                      file=sys.stderr, flush=True)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    n = 0
    try:
        while (left := until - time.time()) > 0:
            h = payload.send(s, f"f{n}")
            n += 1
            try:
                h.result(left)
            except TimeoutError:  # the run is over
                h.cancel("the run is over")
    finally:
        stop.set()
        t.join()
        s.close()
    return 0


def row_fair(a: Any, bench: str) -> list[Row]:
    rate = 1000 * a.scale
    full = rate * PAYLOAD_FRACTION
    secs, stagger = max(20.0, a.seconds * 2), 2.0
    with WanLink(rtt_ms=40, rate_mbit=rate, seed=14, realtime=a.realtime, gso=getattr(a, "gso", False)) as link:
        ref = _iperf(link, 4, "bbr", a.seconds)  # what the emulator carries now, beside
        port, rx = _receiver(link, bench, a.rx_pool_mb)
        first = time.time() + 5.0  # (each process imports and builds its payload meanwhile)
        until = first + secs
        procs = [link.popen_in("client", [sys.executable, __file__, "--sender", link.server_addr, str(port),
                                          repr(first + i * stagger), repr(until)], stdout=subprocess.PIPE, text=True)
                 for i in range(4)]
        lines = [p.communicate(timeout=secs + 120)[0].splitlines() for p in procs]
        rx.terminate()
    series = [[json.loads(x) for x in ls if x.startswith("[")] for ls in lines]
    lo = max(ss[0][0] for ss in series) + 3.0  # all four running, the last past its probe
    hi = min(ss[-1][0] for ss in series)
    rates = []
    for ss in series:
        win = [x for x in ss if lo <= x[0] <= hi]
        rates.append((win[-1][1] - win[0][1]) * 8 / (win[-1][0] - win[0][0]) / 1e6 if len(win) > 1 else 0.0)
    total = sum(rates)
    jain = total**2 / (len(rates) * sum(r * r for r in rates)) if total else 0.0
    split = " + ".join(f"{r:.0f}" for r in rates)
    return [("fair iperf3 -P4 bbr, same link", f"{ref['mbit']:.0f} Mbit/s = {_pct(ref['mbit'] / full)}", "beside",
             None),
            ("fair 4 sender processes, together", f"{split} = {total:.0f} Mbit/s = {_pct(total / full)} over "
             f"{hi - lo:.1f} s ({os.environ.get('KVWIRE_LINK_SHARE') or 'LinkShare on'})", ">= 90%",
             total >= 0.9 * full),
            ("fair Jain's index", f"{jain:.3f}", ">= 0.95", jain >= 0.95)]


def row_collapse(a: Any, bench: str, fault_s: float = 3.0) -> list[Row]:
    """The link's rate falls to 2 % for ``fault_s`` after 5 s, then comes back; requests back to back
    throughout and 8 s after. ``collapse10`` is the same with a 10 s fault: long enough that re-probes
    during it back off (their hold grows), which the issue's 3 s fault never shows."""
    rate = 400 * a.scale
    label = "collapse" if fault_s == 3.0 else f"collapse ({fault_s:g} s fault)"
    full = rate * PAYLOAD_FRACTION * 1e6 / 8
    marks: dict[str, float] = {}
    with WanLink(rtt_ms=20, rate_mbit=rate, seed=15, realtime=a.realtime, gso=getattr(a, "gso", False)) as link:
        port, rx = _receiver(link, bench, a.rx_pool_mb)
        s = _connect(link, port)
        payload = Payload(QWEN, 8192)

        def fault() -> None:
            time.sleep(5.0)
            link.set_rate(rate * 0.02)
            marks["fault"] = time.monotonic()
            time.sleep(fault_s)
            link.set_rate(rate)
            marks["end"] = time.monotonic()

        th = threading.Thread(target=fault, daemon=True)
        try:
            t0 = time.monotonic()
            th.start()
            n = 0
            while time.monotonic() - t0 < 5.0 + fault_s + 8.0:
                _send_inside(link, payload, s, f"c{n}").result(600)
                n += 1
            th.join()
            ctl = s.link_control
            states = list(recorded(ctl)) if ctl else []
            if a.trace:
                print(f"[collapse] fault {marks['fault'] - t0:.2f}s .. {marks['end'] - t0:.2f}s", file=sys.stderr)
            _trace(a, "collapse", s, t0)
        finally:
            s.close()
        rx.terminate()
    end = marks["end"]
    low = min((x.capacity for x in states if marks["fault"] < x.timestamp <= end and x.capacity), default=None)
    back = next((x.timestamp - end for x in states if x.timestamp > end + 0.5 and x.goodput >= 0.8 * full), None)
    return [(f"{label} estimate during the fault", f"{(low or 0) * 8e-6:.1f} Mbit/s (link {rate * 0.02:.0f})",
             "beside", None),
            (f"{label} recovery to 80 % after it",
             "never" if back is None else f"{back:.1f} s (1 s goodput average)", "<= 5 s",
             back is not None and back <= 5.0)]


def row_loopback(a: Any, bench: str) -> list[Row]:
    payload = Payload(QWEN, 32768)
    rx = subprocess.Popen([sys.executable, bench, "--receiver", "--bind", "127.0.0.1",
                           "--rx-pool-mb", str(a.rx_pool_mb)], stdout=subprocess.PIPE,
                          text=True)
    assert rx.stdout is not None
    port = int(json.loads(rx.stdout.readline())["port"])
    on, off = kvwire.connect("127.0.0.1", port), kvwire.connect("127.0.0.1", port, link_control=False)
    res: dict[str, list[float]] = {"on": [], "off": []}
    try:
        for i in range(a.loopback_reps):
            for name, s in (("on", on), ("off", off))[:: 1 if i % 2 else -1]:
                t0 = time.monotonic()
                payload.send(s, f"lo{name}{i}").result(120)
                res[name].append(payload.nbytes * 8 / (time.monotonic() - t0) / 1e9)
    finally:
        on.close()
        off.close()
        rx.terminate()
    m_on, m_off = statistics.median(res["on"]), statistics.median(res["off"])
    return [("loopback control on vs off", f"{m_on:.2f} vs {m_off:.2f} Gbit/s = {m_on / m_off:.3f} (median of "
             f"{a.loopback_reps}, alternating, {payload.nbytes / 1e6:.0f} MB)", "on >= 95 % of off",
             m_on / m_off >= 0.95)]


def row_stream(a: Any, bench: str, loss: float = 0.0001, tail_parity: int | None = None) -> list[Row]:
    from kvwire.bench.document import build_document
    from kvwire.bench.loopback import LoopbackServer
    from kvwire.bench.options import Options
    from kvwire.bench.sending import run_sender
    from kvwire.testing.netns import exec_prefix

    rate = 2000 * a.scale
    full = rate * PAYLOAD_FRACTION * 1e6 / 8  # payload bytes/s
    payload = Payload(QWEN, 8192)
    layers = payload.layout.num_layers
    prefill_ms = payload.nbytes / (full / 2) / layers * 1e3  # production at half the link's payload rate
    # the session is warmed as kvwire.connect() warms one by default on this 80 ms path (--warm off: cold)
    warm = getattr(a, "warm", "auto") != "off"
    with WanLink(rtt_ms=80, loss=loss, rate_mbit=rate, queue_bytes=int(rate * 1e6 / 8 * 0.020), seed=16,
                 realtime=a.realtime, gso=getattr(a, "gso", False)) as link:
        o = Options(mode="client", host=link.server_addr, model=QWEN, tokens=8192, requests=a.requests,
                    prefill_ms=prefill_ms, adaptive=True, interval=0.1 if a.trace else 0.0, warm=warm,
                    tail_parity=tail_parity)  # kvwire-bench's defaults otherwise (None: connect()'s own parity)
        with LoopbackServer(o, bind=link.server_addr, prefix=exec_prefix(link.server_ns)) as server:
            o.port = server.port
            with link.inside("client"):
                res = run_sender(o)
        stats = link.stats()
    doc = build_document(res)
    kv = doc["kv"]
    timeline = kv["timeline"]
    last = timeline[0]["layers"][-1]  # the layer produced last: its bytes set the floor of the tail
    target = last["bytes"] / full * 1e3 + 80 + 10
    tail = kv["exposed_tail_ms"]
    tails = [t["exposed_tail_ms"] for t in timeline if t["exposed_tail_ms"] is not None]
    if a.trace:
        _trace_stream(timeline, res.clock_uncertainty, kv.get("link_control") or {}, doc)
    ok = kv["verification"]["verified"] and tail["p99"] is not None
    p50, p99 = tail["p50"] or 0.0, tail["p99"] or 0.0
    lc = kv.get("link_control") or {}
    paced = f"paced at {lc['pacing'] * 8e-6:.0f} Mbit/s" if lc.get("pacing") else "unpaced"
    pr = res.probe
    seen_full = pr is not None and (pr.get("saturated") or pr.get("full_pipe"))
    warmed = (f"warmed {pr['seconds']:.2f} s, {pr['bytes_sent'] / 1e6:.0f} MB, "
              f"{pr['capacity'] * 8e-6:.0f} Mbit/s{'' if seen_full else ' (not seen full)'}" if pr else "cold session")
    rest = sorted(tails[1:])
    return [("stream exposed tail p50", f"{p50:.0f} ms ({len(tails)} requests of {payload.nbytes / 1e6:.0f} MB, "
             f"prefill {prefill_ms:.1f} ms/layer; all: {', '.join(f'{x:.0f}' for x in tails)}; after the first: "
             f"p50 {statistics.median(rest) if rest else 0:.0f}, max {max(rest, default=0):.0f}; clocks "
             f"+-{res.clock_uncertainty * 1e3:.0f} ms; {warmed}; controller ended {lc.get('mode', '-')}, {paced}, "
             f"{lc.get('lanes', '-')} lanes)", "beside", None),
            ("stream exposed tail p99", f"{p99:.0f} ms (last layer {last['layer']} {'/'.join(last['kinds'])} "
             f"{last['bytes'] / 1e6:.1f} MB: {last['bytes'] / full * 1e3:.0f} ms on the wire; {_parity(kv)}; "
             f"emulator queue drops {stats['c2s']['queue_drops']}, random {stats['c2s']['random_drops']}, "
             f"late>5ms {stats['late_5ms']})", f"<= {target:.0f} ms", ok and p99 <= target)]


def _parity(kv: dict[str, Any]) -> str:
    """The tail parity the session sent (``connect()``'s default on this path, or ``--tail-parity``) and what
    the receiver did with it."""
    par = kv.get("tail_parity") or {}
    if not par.get("per_group"):
        return "no tail parity"
    return (f"tail parity {par['per_group']} a group: {par.get('parity_chunks')} verified, "
            f"{par.get('chunks_rebuilt')} chunks rebuilt")


def _trace_stream(timeline: list[dict[str, Any]], uncertainty: float, control: dict[str, Any],
                  doc: dict[str, Any]) -> None:
    """--trace: the warm-up's loss, the controller's decisions (s after the test's start), the link state of
    every 0.1 s interval (--trace samples them; the row's figures are taken without), then each request's
    layers, produced and verified (ms after its send), on stderr."""
    pr = doc["start"].get("probe") or {}
    if pr:
        print(f"[stream] warm-up {pr['seconds']:.2f} s, {pr['bytes_sent'] / 1e6:.0f} MB, read "
              f"{pr['capacity'] * 8e-6:.0f} Mbit/s, lost {pr['loss_rate']:.1%} of its bytes", file=sys.stderr)
    for d in control.get("history", []):
        print(f"[stream] {d['t'] or 0:6.2f}s {d['mode']:8} lanes {d['lanes']} pacing "
              f"{(d['pacing'] or 0) * 8e-6:.0f} Mbit/s: {d['reason']}", file=sys.stderr)
    for iv in doc["intervals"]:
        ln, tot = iv.get("link") or {}, iv["sum"]
        if not ln:
            continue
        print(f"[stream] {tot['end']:6.2f}s {ln['mode']:8} paced {(ln['pacing'] or 0) * 8e-6:.0f} "
              f"{_state_line(ln)} retransmits {tot['retransmits']}", file=sys.stderr)
    for t in timeline:
        print(f"[stream] {t['request_id']} tail {t['exposed_tail_ms'] or 0:.0f} ms, transfer "
              f"{t['transfer_ms'] or 0:.0f} ms (clocks +-{uncertainty * 1e3:.0f} ms)", file=sys.stderr)
        for x in t["layers"]:
            print(f"[stream]   layer {x['layer']:2} {'/'.join(x['kinds']):4} {x['bytes'] / 1e6:5.1f} MB produced "
                  f"{x['produced_ms'] or 0:7.1f} verified {x['verified_ms'] or 0:7.1f} ms", file=sys.stderr)


def lossless(row: Callable[..., list[Row]]) -> Callable[[Any, str], list[Row]]:
    """``row`` on the same link without its random loss, as INFO beside it: what the link's 0.01 % loss
    costs. A request's last round trip of bytes meets a random drop more often than not (a 241 MB request
    is ~166k packets: ~17 drops at 0.01 %), and TCP recovers a drop in a round trip at the earliest, so the
    tail rows' floors with loss are the link's, not the sender's."""
    def run(a: Any, bench: str) -> list[Row]:
        return [(f"{name.split(' ', 1)[0]} without random loss: {name.split(' ', 1)[1]}", value, "beside", None)
                for name, value, _target, _ok in row(a, bench, loss=0.0)]
    return run


def without_parity(row: Callable[..., list[Row]]) -> Callable[[Any, str], list[Row]]:
    """``row`` without the tail parity ``kvwire.connect()`` sends by default on this path
    (``kvwire-bench --tail-parity 0``), as INFO beside it: what the parity buys (the receiver rebuilds the last
    layer without the lanes a random drop held for a round trip)."""
    def run(a: Any, bench: str) -> list[Row]:
        return [(f"{name.split(' ', 1)[0]} with --tail-parity 0: {name.split(' ', 1)[1]}", value, "beside", None)
                for name, value, _target, _ok in row(a, bench, tail_parity=0)]
    return run


ROWS = {"fat": row_fat, "burst": row_burst, "stream": row_stream, "lossy": row_lossy, "fair": row_fair,
        "burst0": lossless(row_burst), "stream0": lossless(row_stream), "streamnp": without_parity(row_stream),
        "collapse": row_collapse, "collapse10": lambda a, bench: row_collapse(a, bench, 10.0),
        "loopback": row_loopback}


def _cpu_times() -> tuple[int, int] | None:
    """The host's (busy, total) CPU time in ticks since boot, from /proc/stat (None where there is none)."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    total = sum(fields[:8])  # (guest time is counted in user already)
    return total - idle, total


def _busy(before: tuple[int, int] | None, after: tuple[int, int] | None) -> float | None:
    if before is None or after is None or after[1] <= before[1]:
        return None
    return (after[0] - before[0]) / (after[1] - before[1])


def run(a: Any, bench: str) -> int:
    rows: list[Row] = []
    busy: list[str] = []
    for name in a.rows.split(","):
        t, cpu = time.monotonic(), _cpu_times()
        try:
            rows += ROWS[name](a, bench)
        except Exception as e:  # noqa: BLE001 - one row failing must not lose the others' figures
            rows.append((name, f"failed: {type(e).__name__}: {e}", "runs", False))
        share = _busy(cpu, _cpu_times())
        busy.append(f"{name} {share:.0%}" if share is not None else f"{name} -")
        print(f"  {name}: {time.monotonic() - t:.0f} s", file=sys.stderr, flush=True)
    # (the emulator, both namespaces' TCP and both ends of kvwire share this host: where it is nearly all busy,
    # a row measures the host as much as the link; the emulator's late releases in the rows say the same)
    rows.append(("host CPU busy while each row ran (all cores)", ", ".join(busy), "INFO", None))
    print(f"must-show rows; rates x{a.scale:g} of the issue's (2 Gbit/s -> {2000 * a.scale:g}, 400 -> "
          f"{400 * a.scale:g}, 1 Gbit/s -> {1000 * a.scale:g}); RTTs, loss and queue times as in the issue; "
          f"kvwire rows use kvwire.connect() defaults; iperf3 rows {a.seconds:g} s (-O 2; the lossy row's "
          f"whole, no -O); emulator "
          f"{cemu.emulator_command(None)[1]}{', SCHED_FIFO' if a.realtime else ''}"
          f"{', GSO super-packets whole, loss per wire packet (--gso)' if getattr(a, 'gso', False) else ''}"
          f"; receiver buffers "
          f"{f'from a {a.rx_pool_mb} MiB pool touched at start' if a.rx_pool_mb else 'fresh per size'}")
    w = max(len(r[0]) for r in rows)
    for name, value, target, ok in rows:
        print(f"{name:<{w}}  {'INFO' if ok is None else 'PASS' if ok else 'MISS'}  {value}   [target {target}]")
    return 0 if all(r[3] is not False for r in rows) else 1


if __name__ == "__main__":
    if sys.argv[1:2] == ["--sender"]:
        raise SystemExit(run_sender(sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), float(sys.argv[5])))
    raise SystemExit("run through wan_bench.py --must-show")
