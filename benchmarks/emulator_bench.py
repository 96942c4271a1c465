"""The WAN emulator's own cost, both backends side by side: iperf3 through the same ``WanLink`` carried by
the C emulator (``wanemu.c``) and by the Python reference (``emulator.py``).

Per backend: iperf3 goodput and retransmits, the senders' mean srtt (against the link's RTT: anything above
it that the drop-tail queue cannot explain is the emulator's own delay), the emulator's CPU (its
``/proc/<pid>/stat`` utime+stime over the run, % of one core), its late releases (> 1 ms, > 5 ms, worst)
and the most packets the kernel NFQUEUE held that the emulator had not read yet (``waiting`` - ``held``,
sampled every 0.25 s): time a packet spends there is delay the link model never sees.

    sudo flock /tmp/kvwire-wan.lock python benchmarks/emulator_bench.py            # 2 Gbit/s, 80 ms, -P8 BBR

Needs root, iproute2, iptables, iperf3 and (for the C row) a C compiler.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kvwire.testing.wan import WanLink, parse_ms, parse_rate_mbit, unavailable_reason  # noqa: E402


def cpu_seconds(pid: int) -> tuple[float, float]:
    """(utime, stime) of ``pid`` in seconds (fields 14 and 15 of /proc/<pid>/stat). The system time
    includes the forwarding that each verdict runs in the emulator's context (reinjected packets cross
    the veth into the receiver's stack), which no emulator can avoid."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def run_backend(backend: str, a: argparse.Namespace) -> dict[str, Any]:
    with WanLink(rtt_ms=a.rtt, loss=a.loss, rate_mbit=a.rate, queue_bytes=a.queue, seed=1, emulator=backend,
                 realtime=a.realtime) as link:
        pid = link.emulator_pid
        assert pid is not None
        link.popen_in("server", ["iperf3", "-s", "-1", "-B", link.server_addr],
                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.4)
        before, cpu0, t0 = link.stats(), cpu_seconds(pid), time.monotonic()
        unread_max = 0
        done = threading.Event()

        def sample() -> None:  # the kernel queue holds what the emulator holds plus what it has not read yet
            nonlocal unread_max
            while not done.wait(0.25):
                st = link.stats()
                unread_max = max([unread_max] + [st[d]["kernel"].get("waiting", 0) - st[d]["held"]
                                                 for d in ("c2s", "s2c")])

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            r = link.run_in("client", ["iperf3", "-c", link.server_addr, "-t", str(a.seconds), "-O", "2", "-J",
                                       "-C", a.cc, "-P", str(a.parallel)], timeout=a.seconds + 60)
        finally:
            done.set()
            sampler.join(5)
        cpu1, wall = cpu_seconds(pid), time.monotonic() - t0
        user, system = ((b - a) / wall * 100 for a, b in zip(cpu0, cpu1))
        after = link.stats()
    if r.returncode != 0:
        raise SystemExit(f"iperf3 failed on the {backend} emulator: {r.stderr or r.stdout[-500:]}")
    end = json.loads(r.stdout)["end"]
    rtts = [s["sender"]["mean_rtt"] / 1e3 for s in end.get("streams", []) if "mean_rtt" in s.get("sender", {})]
    return {"backend": after["backend"], "mbit": end["sum_received"]["bits_per_second"] / 1e6,
            "retrans": end["sum_sent"].get("retransmits", 0), "srtt_ms": sum(rtts) / len(rtts) if rtts else 0.0,
            "cpu": user + system, "user": user, "sys": system, "late": after["late_releases"] - before["late_releases"],
            "late_5ms": after["late_5ms"] - before["late_5ms"], "late_max_ms": after["late_max_ms"],
            "unread_max": unread_max, "queue_drops": after["c2s"]["queue_drops"] - before["c2s"]["queue_drops"],
            "user_dropped": after["c2s"]["kernel"].get("user_dropped", 0)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rate", default="2000mbit", type=parse_rate_mbit)
    ap.add_argument("--rtt", default="80ms", type=parse_ms)
    ap.add_argument("--loss", default=0.0001, type=float)
    ap.add_argument("--queue", default=5_000_000, type=int, help="drop-tail queue in bytes")
    ap.add_argument("--seconds", default=8, type=int, help="iperf3 -t (after 2 s omitted)")
    ap.add_argument("-P", "--parallel", default=8, type=int)
    ap.add_argument("-C", "--cc", default="bbr")
    ap.add_argument("--backends", default="c,python", help="comma-separated, run in this order")
    ap.add_argument("--realtime", action="store_true", help="run the emulator SCHED_FIFO")
    a = ap.parse_args(argv)
    reason = unavailable_reason() or (None if shutil.which("iperf3") else "iperf3 not installed")
    if reason:
        print(f"cannot run: {reason}", file=sys.stderr)
        return 2
    rows = [run_backend(b, a) for b in a.backends.split(",")]
    print(f"link: {a.rate:g} Mbit/s, RTT {a.rtt:g} ms, loss {a.loss:.4%}, queue {a.queue} B; iperf3 -P{a.parallel} "
          f"-C {a.cc}, {a.seconds} s; emulator {'SCHED_FIFO' if a.realtime else 'normal priority'}")
    print(f"{'emulator':10}{'Mbit/s':>9}{'retr':>7}{'srtt ms':>9}{'CPU %':>7}{'user':>6}{'sys':>6}{'late>1ms':>9}"
          f"{'>5ms':>6}{'worst ms':>9}{'unread max':>11}{'q-drops':>8}{'kq drops':>9}")
    for r in rows:
        print(f"{r['backend']:10}{r['mbit']:9.0f}{r['retrans']:7d}{r['srtt_ms']:9.1f}{r['cpu']:7.1f}{r['user']:6.1f}"
              f"{r['sys']:6.1f}{r['late']:9d}{r['late_5ms']:6d}{r['late_max_ms']:9.1f}{r['unread_max']:11d}"
              f"{r['queue_drops']:8d}{r['user_dropped']:9d}")
    if len(rows) == 2 and rows[1]["cpu"] > 0 and rows[0]["mbit"] > 0:
        per_mbit = [r["cpu"] / r["mbit"] for r in rows]
        print(f"CPU per Mbit/s carried: {rows[0]['backend']} {per_mbit[0]:.4f} %, {rows[1]['backend']} "
              f"{per_mbit[1]:.4f} % ({per_mbit[1] / per_mbit[0]:.1f}x)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
