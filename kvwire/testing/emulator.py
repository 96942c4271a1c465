"""The WAN emulator process: NFQUEUE packets in, link model decisions, verdicts out on time.

Owns: the event loop of the middle namespace's emulator — read packet notifications, ask each
direction's ``LinkDirection`` when to release a packet (or drop it now), hold the ids in a FIFO per
direction and release every due packet with one batched verdict — plus its control channel: JSON lines
on stdin (``update``, ``stats``, ``stop``), one JSON reply per line on stdout. Runs as its own process
(``python -m kvwire.testing.emulator CONFIG_JSON``, inside the namespace) so it never shares a GIL with
the code under test. ``wanemu.c`` is the same program in C (``cemu``); this one is the reference.
Must not know: namespaces, addresses, the tests.
"""

from __future__ import annotations

import gc
import json
import os
import random
import select
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from .linkmodel import DirectionSpec, LinkDirection, requeued
from .nfqueue import NfQueueSocket, parse_packets, verdict, verdict_batch

_DRAIN_MAX = 64  # notifications read per loop turn before releasing due packets
_IDLE_WAIT = 0.5
_SLACK = 50e-6  # release packets due this soon now: fewer wake-ups, timing error far below any RTT


@dataclass
class _Direction:
    name: str
    queue: int
    link: LinkDirection
    fifo: deque[tuple[float, int]] = field(default_factory=deque)  # (release time, packet id)


def kernel_queue_stats() -> dict[int, dict[str, int]]:
    """``/proc/net/netfilter/nfnetlink_queue`` of this namespace: per queue, packets waiting, dropped
    because the kernel queue was full, and dropped because our socket could not take the notification."""
    out: dict[int, dict[str, int]] = {}
    try:
        lines = open("/proc/net/netfilter/nfnetlink_queue").read().split("\n")
    except OSError:
        return out
    for line in lines:
        f = line.split()
        if len(f) >= 8:
            out[int(f[0])] = {"waiting": int(f[2]), "queue_dropped": int(f[5]), "user_dropped": int(f[6]),
                              "id_sequence": int(f[7])}
    return out


class Emulator:
    def __init__(self, config: dict[str, Any]) -> None:
        rng = random.Random(config.get("seed"))
        self.dirs: dict[int, _Direction] = {}
        for name, d in config["directions"].items():
            spec = DirectionSpec(float(d["rate_bps"]), float(d["delay"]), float(d.get("loss", 0.0)),
                                 int(d["queue_bytes"]), int(d.get("loss_mtu", 0)))
            self.dirs[int(d["queue"])] = _Direction(name, int(d["queue"]), LinkDirection(spec, rng))
        self.nfq = NfQueueSocket()
        for q in self.dirs:
            self.nfq.bind_queue(q, copy_range=int(config.get("copy_range", 40)),
                                maxlen=int(config.get("maxlen", 1 << 16)), gso=bool(config.get("gso", False)))
        self.turns = 0
        self.late_max = 0.0  # worst lateness of a release (s): how far the emulator fell behind
        self.late_releases = 0  # releases more than 1 ms late
        self.late_5ms = 0  # ... of which more than 5 ms

    # ------------------------------------------------------------ packets
    def _drain(self, buf: bytearray, out: list[bytes]) -> None:
        for _ in range(_DRAIN_MAX):
            n = self.nfq.recv_into(buf)
            if not n:
                return
            now = time.monotonic()
            for queue, pid, length in parse_packets(buf, n):
                d = self.dirs.get(queue)
                if d is None:
                    out.append(verdict(queue, pid, True))
                    continue
                release = d.link.arrive(now, length)
                if release is None:
                    out.append(verdict(queue, pid, False))
                else:
                    d.fifo.append((release, pid))

    def _release(self, out: list[bytes]) -> None:
        now = time.monotonic() + _SLACK
        for d in self.dirs.values():
            last = -1
            fifo = d.fifo
            if fifo and now - fifo[0][0] > 1e-3 + _SLACK:
                late = now - _SLACK - fifo[0][0]
                self.late_releases += 1
                self.late_5ms += late > 5e-3
                self.late_max = max(self.late_max, late)
            while fifo and fifo[0][0] <= now:
                last = fifo.popleft()[1]
            if last >= 0:
                out.append(verdict_batch(d.queue, last))

    def _next_due(self) -> float | None:
        heads = [d.fifo[0][0] for d in self.dirs.values() if d.fifo]
        return min(heads) if heads else None

    # ------------------------------------------------------------ control
    def handle(self, cmd: dict[str, Any]) -> dict[str, Any]:
        op = cmd.get("op")
        if op == "stats":
            return {"ok": True, "stats": self.stats()}
        if op == "update":
            which = cmd.get("direction", "both")
            targets = [d for d in self.dirs.values() if which in ("both", d.name)]
            if not targets:
                return {"ok": False, "error": f"no direction {which!r}"}
            kw = {k: cmd[k] for k in ("rate_bps", "delay", "loss", "queue_bytes") if cmd.get(k) is not None}
            now = time.monotonic()
            for d in targets:
                delay = d.link.spec.delay
                scale = d.link.update(now, **kw)
                if scale != 1.0:
                    d.fifo = deque((requeued(r, now, delay, scale), pid) for r, pid in d.fifo)
            return {"ok": True}
        if op == "stop":
            return {"ok": True, "stop": True}
        return {"ok": False, "error": f"unknown op {op!r}"}

    def stats(self) -> dict[str, Any]:
        kernel = kernel_queue_stats()
        out: dict[str, Any] = {}
        for q, d in self.dirs.items():
            s: dict[str, Any] = dict(d.link.stats.to_dict(), held=len(d.fifo), kernel=kernel.get(q, {}))
            out[d.name] = s
        out["turns"] = self.turns
        out["late_max_ms"] = round(self.late_max * 1e3, 3)
        out["late_releases"] = self.late_releases
        out["late_5ms"] = self.late_5ms
        out["backend"] = "python"
        return out

    # ------------------------------------------------------------ loop
    def run(self, ctl_in: int, ctl_out: Any) -> None:
        buf = bytearray(1 << 16)
        out: list[bytes] = []
        pending = b""
        nl = self.nfq.fileno()
        while True:
            due = self._next_due()
            wait = _IDLE_WAIT if due is None else max(0.0, due - time.monotonic())
            ready, _, _ = select.select([nl, ctl_in], [], [], wait)
            self.turns += 1
            if nl in ready:
                self._drain(buf, out)
            self._release(out)
            if out:
                self.nfq.send(b"".join(out))
                out.clear()
            if ctl_in in ready:
                chunk = os.read(ctl_in, 65536)
                if not chunk:
                    return  # the parent went away
                pending += chunk
                while b"\n" in pending:
                    line, pending = pending.split(b"\n", 1)
                    try:
                        reply = self.handle(json.loads(line))
                    except (ValueError, TypeError, KeyError) as e:
                        reply = {"ok": False, "error": f"{type(e).__name__}: {e}"}
                    ctl_out.write(json.dumps(reply) + "\n")
                    ctl_out.flush()
                    if reply.get("stop"):
                        return

    def close(self) -> None:
        self.nfq.close()


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    config = json.loads(args[0])
    if config.get("realtime"):  # the emulator is the wire: do not let busy neighbours delay it
        try:
            os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(10))
        except OSError as e:
            sys.stderr.write(f"emulator: realtime priority refused ({e}); running as a normal process\n")
    try:
        emu = Emulator(config)
    except Exception as e:  # report why, then fail: the parent is waiting for the ready line
        sys.stdout.write(json.dumps({"ok": False, "error": f"{type(e).__name__}: {e}"}) + "\n")
        sys.stdout.flush()
        return 1
    try:
        sys.stdout.write(json.dumps({"ok": True, "ready": True, "pid": os.getpid()}) + "\n")
        sys.stdout.flush()
        gc.collect()
        gc.freeze()  # the loop makes no cycles: keep the collector off the packet path
        gc.disable()
        emu.run(sys.stdin.fileno(), sys.stdout)
    finally:
        emu.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
