"""An emulated WAN link between two network namespaces, for tests, benchmarks and the command line.

Owns: ``WanLink`` — three namespaces (client, middle, server) joined by veth pairs, routing through the
middle, where iptables hands every forwarded packet to NFQUEUE and a separate emulator process (see
``emulator``) applies per-direction rate, drop-tail queue, loss and one-way delay — its runtime knobs
(``set_rate`` ...), running commands or the current thread inside either end, and tearing everything
down on exit, failure included. Also ``python -m kvwire.testing.wan --rtt 20ms --rate 400mbit -- CMD``.
Must not know: kvwire transfers, congestion policy, pytest.

Works on kernels without netem or fq (only veth, nf_tables/iptables NFQUEUE and nfnetlink_queue).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import select
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

from .. import termination
from . import cemu, netns
from .netns import NetnsError

CLIENT_ADDR, CLIENT_GW = "10.77.1.2", "10.77.1.1"
SERVER_ADDR, SERVER_GW = "10.77.2.2", "10.77.2.1"
QUEUE_C2S, QUEUE_S2C = 0, 1
REQUIRED_TOOLS = ("ip", "iptables")
#: the namespaces' name prefix when none is given (default "kvw"): a test run that must find its own
#: namespaces among those of runs beside it sets a unique one
PREFIX_ENV = "KVWIRE_WAN_PREFIX"


class WanError(NetnsError):
    """The emulated link could not be set up, controlled or torn down."""


def unavailable_reason() -> str | None:
    """Why ``WanLink`` cannot run here, or ``None``."""
    return netns.unavailable_reason(REQUIRED_TOOLS)


class WanLink(AbstractContextManager["WanLink"]):
    """``with WanLink(rtt_ms=20, loss=0.001, rate_mbit=400) as link:`` — client at ``link.client_addr``
    in namespace ``link.client_ns``, server at ``link.server_addr`` in ``link.server_ns``.

    The rate is counted at the IP layer, the same in both directions; ``loss`` applies to both directions;
    ``rtt_ms`` is split evenly. ``queue_bytes`` defaults to one bandwidth-delay product. ``gso``: let the emulator
    take GSO super-packets whole (far cheaper per byte; queueing then acts on up to 64 KB at once, and loss drops a
    super-packet whole with the chance that any of the ``mtu``-sized wire packets it stands for would be lost: the
    loss events per byte of the per-packet link, each taking more). Namespaces are ``<prefix><6 hex>-c|m|s``, the
    prefix ``$KVWIRE_WAN_PREFIX`` or ``kvw``. ``realtime``: run the emulator SCHED_FIFO so busy neighbours cannot
    delay releases (check ``stats()["late_releases"]``); off by default because it outranks every normal process on
    its core. ``emulator``: ``"c"`` (``wanemu.c``, compiled on first use, far cheaper per packet), ``"python"``
    (``emulator.py``, the reference) or ``"auto"`` (C when a compiler builds it); default ``$KVWIRE_WAN_EMULATOR``,
    else ``cemu.DEFAULT``. ``backend`` (and ``stats()["backend"]``) says which ran.
    """

    client_addr = CLIENT_ADDR
    server_addr = SERVER_ADDR

    def __init__(self, rtt_ms: float = 20.0, loss: float = 0.0, rate_mbit: float = 400.0,
                 queue_bytes: int | None = None, mtu: int = 1500, *, seed: int | None = None,
                 gso: bool = False, realtime: bool = False, prefix: str | None = None,
                 emulator: str | None = None) -> None:
        self.emulator = cemu.resolve(emulator)
        if rate_mbit <= 0 or rtt_ms < 0 or not 0 <= loss < 1 or not 576 <= mtu <= 65535:
            raise ValueError("need rate_mbit > 0, rtt_ms >= 0, 0 <= loss < 1, 576 <= mtu <= 65535")
        self.rtt_ms = rtt_ms
        self.loss = loss
        self.rate_mbit = rate_mbit
        self.queue_bytes = queue_bytes or max(64 << 10, int(rate_mbit * 1e6 / 8 * rtt_ms / 1e3))
        self.mtu = mtu
        self.seed = seed
        self.gso = gso
        self.realtime = realtime
        prefix = prefix if prefix is not None else os.environ.get(PREFIX_ENV, "kvw")
        if not re.fullmatch(r"[a-z0-9]{1,8}", prefix):
            raise ValueError(f"namespace prefix {prefix!r}: 1-8 characters a-z 0-9")
        token = secrets.token_hex(3)
        self.client_ns = f"{prefix}{token}-c"
        self.middle_ns = f"{prefix}{token}-m"
        self.server_ns = f"{prefix}{token}-s"
        self._created: list[str] = []
        self._procs: list[subprocess.Popen[Any]] = []
        self._emu: subprocess.Popen[bytes] | None = None
        self.backend: str | None = None  # "c" or "python" once started
        self._emu_err: Any = None
        self._ctl_lock = threading.Lock()
        self._ctl_buf = b""

    # ------------------------------------------------------------ lifecycle
    def __enter__(self) -> WanLink:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> WanLink:
        """Build the link. From the main thread this also makes SIGTERM and SIGHUP raise
        ``kvwire.termination.Terminated`` (a ``KeyboardInterrupt``) where they have no handler of their
        own, so the ``with`` block (or fixture) around the link tears it down as on Ctrl-C; Python's
        default would die with the namespaces and the emulator left behind."""
        reason = unavailable_reason()
        if reason:
            raise WanError(f"cannot emulate a WAN here: {reason}")
        termination.install()
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def _build(self) -> None:
        c, m, s = self.client_ns, self.middle_ns, self.server_ns
        for ns in (c, m, s):
            netns.create(ns)
            self._created.append(ns)
        ends = ((c, "to-client", CLIENT_ADDR, CLIENT_GW), (s, "to-server", SERVER_ADDR, SERVER_GW))
        for ns, peer, addr, gw in ends:
            netns.sh(["ip", "link", "add", "wan0", "netns", ns, "mtu", str(self.mtu), "type", "veth",
                      "peer", "name", peer, "netns", m, "mtu", str(self.mtu)])
            netns.sh(["ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", "wan0"])
            netns.sh(["ip", "-n", m, "addr", "add", f"{gw}/24", "dev", peer])
            netns.sh(["ip", "-n", ns, "link", "set", "wan0", "up"])
            netns.sh(["ip", "-n", m, "link", "set", peer, "up"])
            netns.sh(["ip", "-n", ns, "route", "add", "default", "via", gw])
        netns.write_sysctl(m, "net.ipv4.ip_forward", "1")
        self._start_emulator()
        for iface, q in (("to-client", QUEUE_C2S), ("to-server", QUEUE_S2C)):
            netns.sh(netns.exec_prefix(m) + ["iptables", "-w", "-A", "FORWARD", "-i", iface,
                                             "-j", "NFQUEUE", "--queue-num", str(q)])

    def _direction(self, queue: int) -> dict[str, Any]:
        return {"queue": queue, "rate_bps": self.rate_mbit * 1e6, "delay": self.rtt_ms / 2e3,
                "loss": self.loss, "queue_bytes": self.queue_bytes, "loss_mtu": self.mtu if self.gso else 0}

    def _start_emulator(self) -> None:
        config = {"directions": {"c2s": self._direction(QUEUE_C2S), "s2c": self._direction(QUEUE_S2C)},
                  "seed": self.seed, "gso": self.gso, "realtime": self.realtime}
        root = str(Path(__file__).resolve().parents[2])
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
        try:
            argv, self.backend = cemu.emulator_command(self.emulator)
        except cemu.EmulatorBuildError as e:
            raise WanError(str(e)) from e
        self._emu_err = tempfile.TemporaryFile()
        cmd = argv + [json.dumps(config)]
        self._emu = subprocess.Popen(
            netns.exec_prefix(self.middle_ns) + cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=self._emu_err, env=env)
        reply = self._read_reply(15.0)
        if not reply.get("ready"):
            raise WanError(f"emulator failed to start: {reply.get('error') or reply}")

    def close(self) -> None:
        """Stop every process this link started, the emulator, and delete the namespaces. Idempotent."""
        for p in self._procs:
            _stop_process(p)
        self._procs.clear()
        emu, self._emu = self._emu, None
        if emu is not None:
            try:
                if emu.poll() is None and emu.stdin is not None:
                    emu.stdin.write(b'{"op": "stop"}\n')
                    emu.stdin.flush()
            except OSError:
                pass
            _stop_process(emu, grace=2.0)
            for f in (emu.stdin, emu.stdout):
                if f is not None:
                    f.close()
        if self._emu_err is not None:
            self._emu_err.close()
            self._emu_err = None
        for ns in reversed(self._created):
            netns.delete(ns)
        self._created.clear()

    @property
    def namespaces(self) -> tuple[str, str, str]:
        return self.client_ns, self.middle_ns, self.server_ns

    @property
    def emulator_pid(self) -> int | None:
        """The emulator process (in the middle namespace), while it runs."""
        return self._emu.pid if self._emu is not None else None

    # ------------------------------------------------------------ running things inside
    def ns(self, where: str) -> str:
        """``"client"``, ``"server"`` or ``"middle"`` (or a namespace name) -> namespace name."""
        names = {"client": self.client_ns, "server": self.server_ns, "middle": self.middle_ns}
        return names.get(where, where)

    def run_in(self, where: str, cmd: Sequence[str], *, timeout: float | None = 60.0,
               check: bool = False, **kw: Any) -> subprocess.CompletedProcess[str]:
        """Run ``cmd`` to completion inside ``where``; output captured as text."""
        kw.setdefault("capture_output", True)
        r = subprocess.run(netns.exec_prefix(self.ns(where)) + list(cmd), text=True, timeout=timeout, **kw)
        if check and r.returncode != 0:
            raise WanError(f"{' '.join(cmd)} in {where} exited {r.returncode}: {r.stderr}")
        return r

    def popen_in(self, where: str, cmd: Sequence[str], **kw: Any) -> subprocess.Popen[Any]:
        """Start ``cmd`` inside ``where`` in its own process group; it is stopped by ``close()``."""
        p = subprocess.Popen(netns.exec_prefix(self.ns(where)) + list(cmd), start_new_session=True, **kw)
        self._procs.append(p)
        return p

    def inside(self, where: str) -> AbstractContextManager[None]:
        """``with link.inside("server"): sock = socket.create_server(...)`` — the calling thread (and
        threads it starts) run in that namespace until the block ends."""
        return netns.entered(self.ns(where))

    def sysctl(self, where: str, key: str, value: str | int) -> None:
        netns.write_sysctl(self.ns(where), key, str(value))

    # ------------------------------------------------------------ runtime knobs
    def set_rate(self, rate_mbit: float, direction: str = "both") -> None:
        """Change the bottleneck rate of ``"c2s"``, ``"s2c"`` or ``"both"`` directions, effective at once,
        as a router's: packets still queued for the bottleneck leave at the new rate (those already
        serialised keep their times)."""
        self._update(direction, rate_bps=rate_mbit * 1e6)
        self.rate_mbit = rate_mbit

    def set_loss(self, loss: float, direction: str = "both") -> None:
        self._update(direction, loss=loss)

    def set_rtt(self, rtt_ms: float) -> None:
        self._update("both", delay=rtt_ms / 2e3)
        self.rtt_ms = rtt_ms

    def set_queue(self, queue_bytes: int, direction: str = "both") -> None:
        self._update(direction, queue_bytes=queue_bytes)

    def stats(self) -> dict[str, Any]:
        """The emulator's counters: per direction ``c2s``/``s2c`` packets and bytes in and out,
        ``random_drops``, ``queue_drops``, ``max_backlog_bytes``, ``held``, and the kernel queue's own
        (``kernel``); ``turns``, ``late_releases``, ``late_5ms``, ``late_max_ms``; ``backend``."""
        return dict(self._control({"op": "stats"})["stats"])

    def _update(self, direction: str, **kw: float) -> None:
        self._control(dict(kw, op="update", direction=direction))

    # ------------------------------------------------------------ control channel
    def _control(self, cmd: dict[str, Any]) -> dict[str, Any]:
        with self._ctl_lock:
            emu = self._emu
            if emu is None or emu.stdin is None or emu.poll() is not None:
                raise WanError(f"emulator not running{self._emu_stderr()}")
            try:
                emu.stdin.write((json.dumps(cmd) + "\n").encode())
                emu.stdin.flush()
            except OSError as e:
                raise WanError(f"emulator control failed: {e}") from e
            reply = self._read_reply(10.0)
        if not reply.get("ok"):
            raise WanError(f"emulator refused {cmd}: {reply.get('error')}")
        return reply

    def _read_reply(self, timeout: float) -> dict[str, Any]:
        assert self._emu is not None and self._emu.stdout is not None
        fd = self._emu.stdout.fileno()
        end = time.monotonic() + timeout
        while b"\n" not in self._ctl_buf:
            left = end - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise WanError(f"emulator did not answer within {timeout}s{self._emu_stderr()}")
            chunk = os.read(fd, 65536)
            if not chunk:
                raise WanError(f"emulator exited{self._emu_stderr()}")
            self._ctl_buf += chunk
        line, self._ctl_buf = self._ctl_buf.split(b"\n", 1)
        return dict(json.loads(line))

    def _emu_stderr(self) -> str:
        f = self._emu_err
        if f is None:
            return ""
        f.seek(0)
        tail = f.read()[-2000:].decode(errors="replace").strip()
        return f": {tail}" if tail else ""


def _stop_process(p: subprocess.Popen[Any], grace: float = 1.0) -> None:
    """Terminate ``p`` (its own process group when it has one), then kill it if it lingers."""
    if p.poll() is not None:
        return
    try:
        pgid = os.getpgid(p.pid)
        own_group = pgid == p.pid
    except ProcessLookupError:
        return
    sig_target = (lambda s: os.killpg(pgid, s)) if own_group else p.send_signal
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        try:
            sig_target(sig)
        except ProcessLookupError:
            return
        try:
            p.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


# ---------------------------------------------------------------- units and command line
_SCALE = {"": 1.0, "k": 1e3, "m": 1e6, "g": 1e9}


def parse_rate_mbit(text: str) -> float:
    """``"400mbit"``, ``"1gbit"``, ``"500kbit"``, ``"400"`` (Mbit/s) -> Mbit/s."""
    m = re.fullmatch(r"\s*([\d.]+)\s*([kmg]?)(bit|bps|b)?(/s)?\s*", text.lower())
    if not m:
        raise ValueError(f"bad rate {text!r}")
    scale = _SCALE[m.group(2)] if m.group(2) else 1e6
    return float(m.group(1)) * scale / 1e6


def parse_ms(text: str) -> float:
    """``"20ms"``, ``"0.02s"``, ``"20"`` (ms) -> milliseconds."""
    m = re.fullmatch(r"\s*([\d.]+)\s*(ms|s|us)?\s*", text.lower())
    if not m:
        raise ValueError(f"bad duration {text!r}")
    return float(m.group(1)) * {"ms": 1.0, "s": 1e3, "us": 1e-3, None: 1.0}[m.group(2)]


def parse_loss(text: str) -> float:
    """``"0.1%"`` or ``"0.001"`` -> probability."""
    t = text.strip()
    return float(t[:-1]) / 100 if t.endswith("%") else float(t)


def parse_bytes(text: str) -> int:
    """``"1MB"``, ``"512KiB"``, ``"100000"`` -> bytes."""
    m = re.fullmatch(r"\s*([\d.]+)\s*([kmg]?)(i?)b?\s*", text.lower())
    if not m:
        raise ValueError(f"bad size {text!r}")
    base = 1024.0 if m.group(3) else 1000.0
    return int(float(m.group(1)) * base ** " kmg".index(m.group(2) or " "))


def _substitute(cmd: Sequence[str]) -> list[str]:
    return [a.replace("{server}", SERVER_ADDR).replace("{client}", CLIENT_ADDR) for a in cmd]


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m kvwire.testing.wan",
        description="Run CMD in the client namespace of an emulated WAN link ({server}/{client} in CMD "
                    "become the addresses; also exported as KVWIRE_WAN_SERVER/KVWIRE_WAN_CLIENT).")
    ap.add_argument("--rtt", default="20ms", type=parse_ms)
    ap.add_argument("--loss", default="0", type=parse_loss)
    ap.add_argument("--rate", default="400mbit", type=parse_rate_mbit)
    ap.add_argument("--queue", default=None, type=parse_bytes, help="drop-tail queue (default: one BDP)")
    ap.add_argument("--mtu", default=1500, type=int)
    ap.add_argument("--seed", default=None, type=int)
    ap.add_argument("--emulator", default=None, choices=cemu.BACKENDS,
                    help=f"emulator (default: ${cemu.BACKEND_ENV}, else {cemu.DEFAULT}; auto: C when it builds)")
    ap.add_argument("--server", default=None, help="shell command run in the server namespace meanwhile")
    ap.add_argument("--server-wait", default=0.5, type=float, help="seconds to let --server start")
    ap.add_argument("cmd", nargs=argparse.REMAINDER, help="-- CMD ...")
    a = ap.parse_args(argv)
    cmd = a.cmd[1:] if a.cmd[:1] == ["--"] else a.cmd
    if not cmd:
        ap.error("no command given (use: -- CMD ...)")
    env = dict(os.environ, KVWIRE_WAN_SERVER=SERVER_ADDR, KVWIRE_WAN_CLIENT=CLIENT_ADDR)
    link = WanLink(rtt_ms=a.rtt, loss=a.loss, rate_mbit=a.rate, queue_bytes=a.queue, mtu=a.mtu, seed=a.seed,
                   emulator=a.emulator)
    try:
        return _run_cli(a, cmd, env, link)
    except termination.Terminated as e:
        return e.exit_code
    except KeyboardInterrupt:
        return 130


def _run_cli(a: argparse.Namespace, cmd: list[str], env: dict[str, str], link: WanLink) -> int:
    with link:
        if a.server:
            link.popen_in("server", ["sh", "-c", _substitute([a.server])[0]], env=env)
            time.sleep(a.server_wait)
        rc = subprocess.run(netns.exec_prefix(link.client_ns) + _substitute(cmd), env=env).returncode
        print(json.dumps({"wan": {"rtt_ms": a.rtt, "loss": a.loss, "rate_mbit": a.rate,
                                  "queue_bytes": link.queue_bytes}, "stats": link.stats()}), file=sys.stderr)
    return rc


def iter_stale_namespaces(prefix: str = "kvw") -> Iterator[str]:
    """Namespaces left by a killed run with this prefix (for manual cleanup; never deleted for you)."""
    try:
        names = os.listdir(netns.NETNS_DIR)
    except OSError:
        return
    for n in names:
        if re.fullmatch(re.escape(prefix) + r"[0-9a-f]{6}-[cms]", n):
            yield n


if __name__ == "__main__":
    raise SystemExit(main())
