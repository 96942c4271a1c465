"""Side-by-side loopback benchmark of the transport: a plain socket, iperf3 and kvwire moving the same bytes.

    python benchmarks/transport_bench.py                 # 5 alternating repetitions + the 4 GB memory run
    python benchmarks/transport_bench.py --reps 3 --lanes 4 --skip-4g
    python benchmarks/transport_bench.py --against ce5f34d --reps 5   # this tree's kvwire beside another commit's

``--against REV`` (before/after a change to the transport): kvwire's cases run twice per repetition, once
with this tree's package and once with REV's (checked out with ``git worktree add --detach`` into a temporary
directory and removed afterwards); each version's sender and receiver run in processes of their own
(``PYTHONPATH`` picks the version), alternating, and the table puts the two side by side with their ratio.

Owns: the run and its table. Every receiver is a separate process (``--role`` modes of this file), with
its destination buffers allocated and page-faulted before anything is timed; the senders run here. Each
repetition runs every case once (the order rotates per repetition), so slow phases of a shared machine
hit all cases alike. Must not know: kvwire internals beyond the public ``connect``/``Receiver`` API.

Cases (all on 127.0.0.1):
  plain      one socket, ``sendall`` of the whole buffer / ``recv_into`` straight into the destination
  iperf3     ``iperf3 -c 127.0.0.1 -P 1`` and ``-P 4 -n BYTES`` (skipped with a note when not installed);
             note iperf3's receiver reads into one 128 KB buffer that stays in cache, a plain/kvwire
             receiver writes every byte to its destination
  kvwire     Qwen3-Next-80B-A3B at 32k tokens (hashing on and off) and Kimi-Linear-48B-A3B at 128k
             tokens, whole payload written at once, timed from ``send`` to the receiver's confirmation;
             every session has its congestion control on (the default), and one more, with it off
             (``link_control=False``), moves the Qwen3-Next payload beside it: the default must cost
             nothing on loopback (within 5 %)

Throughput is payload bytes / seconds (Gbit/s = 1e9 bit/s); CPU-s/GB adds sender and receiver
``getrusage`` (user + system) over the timed window, per 1e9 payload bytes. The 4 GB run reports the
kvwire receiver's peak RSS (VmHWM) beyond its destination buffer: how far it grew during the transfer,
and peak minus destination (that one includes the interpreter and libraries).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import IO, Any

import numpy as np

import kvwire
from kvwire.codec.layout import ModelLayout, RequestSpec, plan_segments
from kvwire.codec.presets import load_preset

GB = 1e9
TARGETS = {"hash": 0.85, "nohash": 0.95, "cpu": 1.0, "mem_mib": 64, "control": 0.05}
_SIZE = struct.Struct("<Q")
_RUSAGE = struct.Struct("<dd")


def cpu_now() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def status_bytes(name: str) -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(name + ":"):
                return int(line.split()[1]) * 1024
    return 0


def faulted(nbytes: int) -> np.ndarray:
    buf = np.empty(nbytes, np.uint8)
    buf[::4096] = 1
    return buf


def recv_exact(sock: socket.socket, view: memoryview) -> None:
    got = 0
    while got < len(view):
        n = sock.recv_into(view[got:])
        if n == 0:
            raise ConnectionError("peer closed")
        got += n


# ---------------------------------------------------------------- receiver processes
def role_plain_rx(sizes: list[int]) -> int:
    """Serve connections: 8-byte size, then that many bytes into a pre-faulted buffer; reply with CPU used."""
    buffers = {n: faulted(n) for n in sizes}
    lst = socket.create_server(("127.0.0.1", 0))
    print(lst.getsockname()[1], flush=True)
    while True:
        conn, _ = lst.accept()
        with conn:
            head = bytearray(_SIZE.size)
            try:
                recv_exact(conn, memoryview(head))
            except ConnectionError:
                return 0  # the parent closed without a size: done
            (n,) = _SIZE.unpack(head)
            cpu = cpu_now()
            recv_exact(conn, buffers[n].data)
            conn.sendall(_RUSAGE.pack(cpu_now() - cpu, 0.0))


def role_kv_rx(sizes: list[int]) -> int:
    """A kvwire Receiver writing into pre-faulted buffers (one per size); 'stats' on stdin prints usage."""
    buffers = {n: faulted(n) for n in sizes}
    rx = kvwire.Receiver("127.0.0.1", 0, allocator=lambda m: buffers[m.total_bytes], peer_timeout=60.0)
    print(json.dumps({"port": rx.address[1], "rss": status_bytes("VmRSS"), "dest": sum(sizes)}), flush=True)
    for line in sys.stdin:
        if line.strip() == "stats":
            print(json.dumps({"cpu": cpu_now(), "hwm": status_bytes("VmHWM"), "rss": status_bytes("VmRSS")}),
                  flush=True)
        elif line.strip() == "quit":
            break
    rx.close()
    return 0


def role_kv_tx(port: int, lanes: int) -> int:
    """A kvwire sender process (``--against``): one session; each stdin line ``{"preset", "tokens", "hash"}``
    moves that payload once and prints its seconds, bytes and this process's CPU over the transfer."""
    session = kvwire.connect("127.0.0.1", port, lanes=lanes)
    print(json.dumps({"kvwire": os.path.dirname(kvwire.__file__)}), flush=True)
    payloads: dict[tuple[str, int], list[np.ndarray]] = {}
    n = 0
    for line in sys.stdin:
        if line.strip() == "quit":
            break
        cmd = json.loads(line)
        layout = load_preset(cmd["preset"])
        key = (cmd["preset"], cmd["tokens"])
        if key not in payloads:
            payloads[key] = payload(layout, cmd["tokens"])[1]
        n += 1
        cpu, t0 = cpu_now(), time.perf_counter()
        h = session.send(layout, RequestSpec(f"tx-{n}", cmd["tokens"], cmd["tokens"]), hashing=cmd["hash"])
        h.write_all(payloads[key])
        h.finish().result(600)
        print(json.dumps({"seconds": time.perf_counter() - t0, "cpu": cpu_now() - cpu,
                          "bytes": sum(b.nbytes for b in payloads[key])}), flush=True)
    session.close()
    return 0


class Child:
    """A process of this file in role ``role``; ``first`` is its first stdout line. ``tree``: run it with
    that checkout's kvwire package (``PYTHONPATH``) instead of this one's."""

    def __init__(self, role: str, sizes: list[int], tree: str | None = None, extra: Sequence[str] = ()) -> None:
        env = dict(os.environ)
        if tree is not None:
            env["PYTHONPATH"] = tree + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        self.proc = subprocess.Popen([sys.executable, __file__, "--role", role, "--sizes", ",".join(map(str, sizes)),
                                      *extra], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        self.first = self._line()

    def _line(self) -> str:
        out: IO[str] | None = self.proc.stdout
        assert out is not None
        line = out.readline()
        if not line:
            raise RuntimeError(f"receiver process exited with {self.proc.wait()}")
        return line

    def ask(self, command: str) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        reply: dict[str, Any] = json.loads(self._line())
        return reply

    def stop(self) -> None:
        if self.proc.stdin is not None:
            try:
                self.proc.stdin.write("quit\n")
                self.proc.stdin.close()
            except OSError:
                pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


# ---------------------------------------------------------------- cases
def run_plain(port: int, buf: np.ndarray) -> dict[str, float]:
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.sendall(_SIZE.pack(len(buf)))
        cpu, t0 = cpu_now(), time.perf_counter()
        s.sendall(buf.data)
        reply = bytearray(_RUSAGE.size)
        recv_exact(s, memoryview(reply))
        seconds, tx_cpu = time.perf_counter() - t0, cpu_now() - cpu
    rx_cpu, _ = _RUSAGE.unpack(reply)
    return {"seconds": seconds, "bytes": len(buf), "cpu": tx_cpu + rx_cpu}


def run_iperf3(port: int, streams: int, nbytes: int) -> dict[str, float]:
    out = subprocess.run(["iperf3", "-c", "127.0.0.1", "-p", str(port), "-P", str(streams), "-n", str(nbytes),
                          "-J"], capture_output=True, text=True, timeout=120)
    doc = json.loads(out.stdout)
    if "error" in doc:
        raise RuntimeError(f"iperf3: {doc['error']}")
    end = doc["end"]
    seconds = end["sum_received"]["seconds"]
    util = end["cpu_utilization_percent"]
    cpu = (util["host_total"] + util["remote_total"]) / 100 * seconds
    return {"seconds": seconds, "bytes": end["sum_received"]["bytes"], "cpu": cpu}


class KvSender:
    """One session to the kvwire receiver process, reused across repetitions (as an engine would)."""

    def __init__(self, port: int, lanes: int, rx: Child, link_control: bool = True) -> None:
        self.session = kvwire.connect("127.0.0.1", port, lanes=lanes, link_control=link_control)
        self.rx = rx
        self.n = 0

    def run(self, layout: ModelLayout, tokens: int, bufs: list[np.ndarray], hashing: bool) -> dict[str, float]:
        self.n += 1
        req = RequestSpec(f"bench-{self.n}", tokens, tokens)
        before = self.rx.ask("stats")["cpu"]
        cpu, t0 = cpu_now(), time.perf_counter()
        h = self.session.send(layout, req, hashing=hashing)
        h.write_all(bufs)
        h.finish().result(600)
        seconds, tx_cpu = time.perf_counter() - t0, cpu_now() - cpu
        rx_cpu = self.rx.ask("stats")["cpu"] - before
        return {"seconds": seconds, "bytes": sum(b.nbytes for b in bufs), "cpu": tx_cpu + rx_cpu}

    def close(self) -> None:
        self.session.close()


def alternate(cases: dict[str, Any], reps: int) -> dict[str, list[dict[str, float]]]:
    """Run every case once per repetition, the order rotating per repetition (so slow phases of a shared
    machine hit all cases alike); each case's results in run order."""
    results: dict[str, list[dict[str, float]]] = {k: [] for k in cases}
    order = list(cases)
    for rep in range(reps):
        shift = rep % len(order)
        for name in order[shift:] + order[:shift]:
            results[name].append(cases[name]())
        print(f"  repetition {rep + 1}/{reps} done", flush=True)
    return results


def median_gbps(runs: list[dict[str, float]]) -> float:
    return statistics.median(r["bytes"] * 8 / r["seconds"] / GB for r in runs)


def median_cpu_per_gb(runs: list[dict[str, float]]) -> float:
    return statistics.median(r["cpu"] / (r["bytes"] / GB) for r in runs)


class VersionPair:
    """``--against``: a sender and a receiver process per kvwire version; ``run`` moves one payload with one."""

    def __init__(self, trees: dict[str, str], sizes: list[int], lanes: int) -> None:
        self.rx: dict[str, Child] = {}
        self.tx: dict[str, Child] = {}
        for name, tree in trees.items():
            self.rx[name] = rx = Child("kv-rx", sizes, tree)
            port = json.loads(rx.first)["port"]
            self.tx[name] = tx = Child("kv-tx", sizes, tree, ["--port", str(port), "--lanes", str(lanes)])
            where = json.loads(tx.first)["kvwire"]
            if not where.startswith(os.path.realpath(tree)):
                raise RuntimeError(f"the {name} sender imported kvwire from {where}, not {tree}")

    def run(self, name: str, preset: str, tokens: int, hashing: bool) -> dict[str, float]:
        before = self.rx[name].ask("stats")["cpu"]
        r = self.tx[name].ask(json.dumps({"preset": preset, "tokens": tokens, "hash": hashing}))
        r["cpu"] += self.rx[name].ask("stats")["cpu"] - before
        return r

    def stop(self) -> None:
        for child in [*self.tx.values(), *self.rx.values()]:
            child.stop()


def checkout(rev: str) -> str:
    """A detached worktree of ``rev`` in a temporary directory (remove with ``drop_checkout``)."""
    import tempfile

    root = subprocess.run(["git", "rev-parse", "--show-toplevel"], capture_output=True, text=True,
                          cwd=os.path.dirname(os.path.abspath(__file__)), check=True).stdout.strip()
    path = os.path.join(tempfile.mkdtemp(prefix="kvwire-against-"), "tree")
    subprocess.run(["git", "-C", root, "worktree", "add", "--detach", "-q", path, rev], check=True)
    return path


def drop_checkout(path: str) -> None:
    subprocess.run(["git", "-C", path, "worktree", "remove", "--force", path], check=False)
    shutil.rmtree(os.path.dirname(path), ignore_errors=True)


def against(rev: str, reps: int, lanes: int, qwen_tokens: int, kimi_tokens: int) -> int:
    """The before/after table: this tree's kvwire beside ``rev``'s, alternating, plain socket for scale."""
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    other = checkout(rev)
    qwen, kimi = load_preset("qwen3-next-80b-a3b"), load_preset("kimi-linear-48b-a3b")
    q_flat, _ = payload(qwen, qwen_tokens)
    k_flat, _ = payload(kimi, kimi_tokens)
    sizes = [q_flat.nbytes, k_flat.nbytes]
    rev_name = subprocess.run(["git", "-C", other, "log", "-1", "--format=%h"], capture_output=True,
                              text=True).stdout.strip()
    print(f"kvwire before/after on 127.0.0.1: this tree ({here}) vs {rev} ({rev_name}); {os.cpu_count()} CPUs, "
          f"{reps} alternating repetitions, {lanes} lanes, congestion control at its default (on)", flush=True)
    plain_rx = Child("plain-rx", sizes)
    pair = VersionPair({"after": here, "before": other}, sizes, lanes)
    plain_port = int(plain_rx.first)
    cases: dict[str, Any] = {
        "plain-q": lambda: run_plain(plain_port, q_flat),
        "plain-k": lambda: run_plain(plain_port, k_flat),
    }
    for version in ("before", "after"):
        cases[f"{version}-q-hash"] = lambda v=version: pair.run(v, "qwen3-next-80b-a3b", qwen_tokens, True)
        cases[f"{version}-q-nohash"] = lambda v=version: pair.run(v, "qwen3-next-80b-a3b", qwen_tokens, False)
        cases[f"{version}-k-hash"] = lambda v=version: pair.run(v, "kimi-linear-48b-a3b", kimi_tokens, True)
    try:
        results = alternate(cases, reps)
    finally:
        pair.stop()
        plain_rx.stop()
        drop_checkout(other)

    def med(name: str) -> float:
        return median_gbps(results[name])

    def cpu(name: str) -> float:
        return median_cpu_per_gb(results[name])

    print()
    print(f"{'case':<34} {'payload':>11}  {'Gbit/s':>6}  {'min':>6}  {'max':>6}  {'vs plain':>6}  "
          f"{'CPU-s/GB':>8}  after/before")
    print(summarize("plain socket (Qwen3-Next size)", results["plain-q"], None, ""))
    print(summarize("plain socket (Kimi Linear size)", results["plain-k"], None, ""))
    qk, kk = f"{qwen_tokens / 1024:g}k", f"{kimi_tokens / 1024:g}k"
    for key, label, plain in (("q-hash", f"Qwen3-Next {qk}, hash on", "plain-q"),
                              ("q-nohash", f"Qwen3-Next {qk}, hash off", "plain-q"),
                              ("k-hash", f"Kimi Linear {kk}, hash on", "plain-k")):
        for version in ("before", "after"):
            note = ""
            if version == "after":
                note = (f"throughput {med(f'after-{key}') / med(f'before-{key}'):.3f}x, "
                        f"CPU-s/GB {cpu(f'after-{key}') / cpu(f'before-{key}'):.3f}x")
            print(summarize(f"{version:<6} {label}", results[f"{version}-{key}"], med(plain), note))
    print("(Gbit/s: median, min, max over the repetitions; CPU-s/GB: sender + receiver process, median; "
          f"before = {rev} ({rev_name}), after = this tree)")
    return 0


def random_bytes(nbytes: int) -> np.ndarray:
    """Incompressible-looking bytes, cheaply: a 4 MiB random tile repeated (hashing cost does not depend
    on content; generating GBs of random numbers would dominate the run)."""
    tile = np.random.default_rng(0).integers(0, 256, 4 << 20, dtype=np.uint8)
    out = np.empty(nbytes, np.uint8)
    for pos in range(0, nbytes, len(tile)):
        n = min(len(tile), nbytes - pos)
        out[pos : pos + n] = tile[:n]
    return out


def payload(layout: ModelLayout, tokens: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """One flat random buffer and its per-segment views (the plain socket sends the flat buffer)."""
    segs = plan_segments(layout, RequestSpec("p", tokens, tokens))
    flat = random_bytes(sum(s.nbytes for s in segs))
    views, pos = [], 0
    for s in segs:
        views.append(flat[pos : pos + s.nbytes])
        pos += s.nbytes
    return flat, views


def memory_run(lanes: int, tokens: int) -> dict[str, float]:
    """A ~4 GB Qwen3-Next transfer into a fresh receiver process; its VmHWM before and after."""
    layout = load_preset("qwen3-next-80b-a3b")
    segs = plan_segments(layout, RequestSpec("m", tokens, tokens))
    total = sum(s.nbytes for s in segs)
    source = random_bytes(max(s.nbytes for s in segs))
    rx = Child("kv-rx", [total])
    try:
        start = json.loads(rx.first)
        with kvwire.connect("127.0.0.1", start["port"], lanes=lanes) as session:
            base = rx.ask("stats")
            t0 = time.perf_counter()
            h = session.send(layout, RequestSpec("m", tokens, tokens))
            h.write_all([source[: s.nbytes] for s in segs])  # one source buffer: the sender stays small
            h.finish().result(600)
            seconds = time.perf_counter() - t0
            after = rx.ask("stats")
    finally:
        rx.stop()
    return {"bytes": total, "seconds": seconds, "rss_before": base["rss"], "hwm": after["hwm"],
            "growth": after["hwm"] - base["rss"], "beyond_dest": after["hwm"] - total}


# ---------------------------------------------------------------- table
def summarize(name: str, runs: list[dict[str, float]], plain: float | None, target: str) -> str:
    gbps = [r["bytes"] * 8 / r["seconds"] / GB for r in runs]
    cpu_gb = median_cpu_per_gb(runs)
    med = statistics.median(gbps)
    ratio = f"{med / plain:5.2f}x" if plain else "    - "
    return (f"{name:<34} {runs[0]['bytes'] / 1e6:8.1f} MB  {med:6.2f}  {min(gbps):6.2f}  {max(gbps):6.2f}  "
            f"{ratio}  {cpu_gb:6.2f}   {target}")


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--role", choices=["plain-rx", "kv-rx", "kv-tx"], help=argparse.SUPPRESS)
    ap.add_argument("--sizes", help=argparse.SUPPRESS)
    ap.add_argument("--reps", type=int, default=5, help="alternating repetitions (default 5)")
    ap.add_argument("--lanes", type=int, default=4, help="kvwire lanes (default 4)")
    ap.add_argument("--qwen-tokens", type=int, default=32768)
    ap.add_argument("--kimi-tokens", type=int, default=131072)
    ap.add_argument("--mem-tokens", type=int, default=163840, help="Qwen3-Next tokens of the ~4 GB memory run")
    ap.add_argument("--skip-4g", action="store_true", help="skip the 4 GB receiver-memory run")
    ap.add_argument("--against", metavar="REV", help="before/after: this tree's kvwire beside git revision REV's")
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.role:
        sizes = [int(x) for x in a.sizes.split(",")]
        if a.role == "kv-tx":
            return role_kv_tx(a.port, a.lanes)
        return role_plain_rx(sizes) if a.role == "plain-rx" else role_kv_rx(sizes)
    if a.against:
        return against(a.against, a.reps, a.lanes, a.qwen_tokens, a.kimi_tokens)

    qwen, kimi = load_preset("qwen3-next-80b-a3b"), load_preset("kimi-linear-48b-a3b")
    q_flat, q_views = payload(qwen, a.qwen_tokens)
    k_flat, k_views = payload(kimi, a.kimi_tokens)
    sizes = [q_flat.nbytes, k_flat.nbytes]
    print(f"kvwire {kvwire.__version__} transport bench on 127.0.0.1: {os.cpu_count()} CPUs, {a.reps} repetitions, "
          f"kvwire {a.lanes} lanes, chunk 2 MiB; payloads: Qwen3-Next {a.qwen_tokens} tokens = "
          f"{q_flat.nbytes / 1e6:.1f} MB, Kimi Linear {a.kimi_tokens} tokens = {k_flat.nbytes / 1e6:.1f} MB",
          flush=True)
    plain_rx, kv_rx = Child("plain-rx", sizes), Child("kv-rx", sizes)
    iperf = shutil.which("iperf3")
    iperf_srv = None
    iperf_port = 0
    if iperf:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            iperf_port = s.getsockname()[1]
        iperf_srv = subprocess.Popen([iperf, "-s", "-B", "127.0.0.1", "-p", str(iperf_port)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.5)
    kv = KvSender(json.loads(kv_rx.first)["port"], a.lanes, kv_rx)  # congestion control on: the default
    kv_off = KvSender(json.loads(kv_rx.first)["port"], a.lanes, kv_rx, link_control=False)
    plain_port = int(plain_rx.first)
    cases: dict[str, Any] = {
        "plain-q": lambda: run_plain(plain_port, q_flat),
        "plain-k": lambda: run_plain(plain_port, k_flat),
        "kv-q-hash": lambda: kv.run(qwen, a.qwen_tokens, q_views, True),
        "kv-q-nohash": lambda: kv.run(qwen, a.qwen_tokens, q_views, False),
        "kv-q-hash-off": lambda: kv_off.run(qwen, a.qwen_tokens, q_views, True),
        "kv-k-hash": lambda: kv.run(kimi, a.kimi_tokens, k_views, True),
    }
    if iperf:
        cases["iperf-1"] = lambda: run_iperf3(iperf_port, 1, q_flat.nbytes)
        cases["iperf-4"] = lambda: run_iperf3(iperf_port, 4, q_flat.nbytes)
    try:
        results = alternate(cases, a.reps)
    finally:
        kv.close()
        kv_off.close()
        kv_rx.stop()
        plain_rx.stop()
        if iperf_srv is not None:
            iperf_srv.terminate()
            iperf_srv.wait()

    def med(name: str) -> float:
        return median_gbps(results[name])

    def cpu(name: str) -> float:
        return median_cpu_per_gb(results[name])

    pq, pk = med("plain-q"), med("plain-k")
    print()
    print(f"{'case':<34} {'payload':>11}  {'Gbit/s':>6}  {'min':>6}  {'max':>6}  {'vs plain':>6}  "
          f"{'CPU-s/GB':>8}  target")
    print(summarize("plain socket (Qwen3-Next size)", results["plain-q"], None, ""))
    print(summarize("plain socket (Kimi Linear size)", results["plain-k"], None, ""))
    if iperf:
        print(summarize("iperf3 -P 1", results["iperf-1"], pq, ""))
        print(summarize("iperf3 -P 4", results["iperf-4"], pq, ""))
    else:
        print("iperf3: not installed, skipped (apt-get install -y iperf3)")
    r_qh, r_qn, r_kh = med("kv-q-hash") / pq, med("kv-q-nohash") / pq, med("kv-k-hash") / pk
    print(summarize("kvwire Qwen3-Next 32k, hash on", results["kv-q-hash"], pq,
                    f">= {TARGETS['hash']}x, <= {TARGETS['cpu']} CPU-s/GB: "
                    f"{verdict(r_qh >= TARGETS['hash'])}/{verdict(cpu('kv-q-hash') <= TARGETS['cpu'])}"))
    print(summarize("kvwire Qwen3-Next 32k, hash off", results["kv-q-nohash"], pq,
                    f">= {TARGETS['nohash']}x: {verdict(r_qn >= TARGETS['nohash'])}"))
    print(summarize("kvwire Kimi Linear 128k, hash on", results["kv-k-hash"], pk,
                    f">= {TARGETS['hash']}x, <= {TARGETS['cpu']} CPU-s/GB: "
                    f"{verdict(r_kh >= TARGETS['hash'])}/{verdict(cpu('kv-k-hash') <= TARGETS['cpu'])}"))
    r_off = med("kv-q-hash") / med("kv-q-hash-off")
    print(summarize("kvwire Qwen3-Next 32k, control off", results["kv-q-hash-off"], pq,
                    f"control on / off {r_off:.3f}, within 5 %: {verdict(abs(r_off - 1) <= TARGETS['control'])}"))
    print("(Gbit/s: median, min, max over the repetitions; 'vs plain': median over the plain socket's median "
          "for the same bytes; CPU-s/GB: sender + receiver, median)")
    if not a.skip_4g:
        print(flush=True)
        m = memory_run(a.lanes, a.mem_tokens)
        mib = 1024 * 1024
        print(f"kvwire receiver memory, {m['bytes'] / 1e9:.2f} GB Qwen3-Next transfer ({a.mem_tokens} tokens) in "
              f"{m['seconds']:.2f} s: peak RSS {m['hwm'] / mib:.0f} MiB; grew {m['growth'] / mib:.1f} MiB during the "
              f"transfer (target <= {TARGETS['mem_mib']} MiB: {verdict(m['growth'] <= TARGETS['mem_mib'] * mib)}); "
              f"peak minus destination {m['beyond_dest'] / mib:.1f} MiB (includes interpreter and libraries)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
