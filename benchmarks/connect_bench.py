"""Session set-up time on an emulated long link, in round trips: lanes dialled one after another vs at once.

    sudo python benchmarks/connect_bench.py                    # 20 ms RTT, lanes 1,4,16,32, 3 runs each
    sudo python benchmarks/connect_bench.py --rtt 50ms --lanes 8,64

Owns: the measurement — a ``Receiver`` in the server namespace of one ``WanLink``, ``kvwire.connect``
(without a controller: the lanes asked for) from the client namespace with
``kvwire.tcp._txconnection.DIAL_CONCURRENCY`` set to 1 (one lane after another, as kvwire did before) and
to its default, alternating, plus ``Session.set_active_lanes`` growing a session from 4 lanes; then the
default session (its controller on, ``warm=False``), which on a long path opens every lane its controller
may use in its first dial round, beside what that took before: 4 lanes at connect, then the controller's
start count, then the rest (one dial round each). Prints median wall time and that time in RTTs. Must not
know: transfer internals.

A lane costs a TCP connect plus two authenticated messages (the receiver's challenge, the proof, its
answer: TLS adds its handshake); the control connection three round trips before any lane can start. So N
lanes one after another take about 3 + 3N RTT; dialled at once, about 6 RTT whatever N.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Sequence

import kvwire
import kvwire.tcp._txconnection as sender
from kvwire.testing.wan import WanLink, parse_ms


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rtt", default="20ms", type=parse_ms)
    ap.add_argument("--rate", default=400.0, type=float, help="Mbit/s")
    ap.add_argument("--lanes", default="1,4,16,32")
    ap.add_argument("--runs", default=3, type=int)
    a = ap.parse_args(argv)
    counts = [int(x) for x in a.lanes.split(",")]
    default = sender.DIAL_CONCURRENCY
    modes = {"one after another": 1, f"at once (<= {default})": default}
    with WanLink(rtt_ms=a.rtt, rate_mbit=a.rate) as link:
        with link.inside("server"):
            rx = kvwire.Receiver(link.server_addr, 0, key="bench", max_lanes=max(counts) + 4)
        port = rx.address[1]
        rows: list[tuple[str, str, float]] = []
        try:
            with link.inside("client"):
                def session(n: int) -> kvwire.Session:
                    return kvwire.connect(link.server_addr, port, key="bench", lanes=n, max_lanes=max(counts),
                                          link_control=False)

                for n in counts:
                    times: dict[str, list[float]] = {m: [] for m in modes}
                    for _ in range(a.runs):
                        for m, conc in modes.items():  # alternate, so drift hits both alike
                            sender.DIAL_CONCURRENCY = conc
                            t0 = time.perf_counter()
                            one = session(n)
                            times[m].append(time.perf_counter() - t0)
                            one.close()
                    what = f"connect, {n} lane{'s' if n > 1 else ''}"
                    rows += [(what, m, statistics.median(v)) for m, v in times.items()]
                grow = max(counts)
                times = {m: [] for m in modes}
                for _ in range(a.runs):
                    for m, conc in modes.items():
                        sender.DIAL_CONCURRENCY = conc
                        with session(4) as s4:
                            t0 = time.perf_counter()
                            s4.set_active_lanes(grow)
                            times[m].append(time.perf_counter() - t0)
                            assert s4.active_lanes == grow
                rows += [(f"set_active_lanes 4 -> {grow}", m, statistics.median(v)) for m, v in times.items()]
                times = {"rounds of before": [], "one round (default)": []}
                for _ in range(a.runs):
                    t0 = time.perf_counter()
                    wide = kvwire.connect(link.server_addr, port, key="bench", warm=False)
                    times["one round (default)"].append(time.perf_counter() - t0)
                    start, opened = wide.active_lanes, len(wide.lane_info())
                    wide.close()
                    t0 = time.perf_counter()
                    with kvwire.connect(link.server_addr, port, key="bench", warm=False, link_control=False) as old:
                        old.set_active_lanes(start)  # what the controller's start asked for, then the warm-up
                        old.set_active_lanes(opened)
                        times["rounds of before"].append(time.perf_counter() - t0)
                rows += [(f"controlled session: {opened} lanes ({start} active)", m, statistics.median(v))
                         for m, v in times.items()]
        finally:
            sender.DIAL_CONCURRENCY = default
            rx.close()
    rtt = a.rtt / 1e3
    print(f"link: RTT {a.rtt:g} ms, {a.rate:g} Mbit/s; PSK auth; "
          f"median of {a.runs} runs, alternating")
    w = max(len(r[0]) for r in rows)
    for i in range(0, len(rows), 2):
        (what, m1, t1), (_, m2, t2) = rows[i], rows[i + 1]
        print(f"{what:<{w}}  {m1}: {t1 * 1e3:7.1f} ms = {t1 / rtt:5.1f} RTT   {m2}: {t2 * 1e3:7.1f} ms = "
              f"{t2 / rtt:5.1f} RTT   ({t1 / t2:.1f}x)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
