"""Command-line options of ``kvwire-bench``: iperf3's names where they mean the same, checked once.

Owns: the argparse parser, size/rate parsing (``256M``, ``10G``: binary for sizes, decimal for rates,
as iperf3), the ``Options`` record every other bench module reads, its consistency checks and the TLS
contexts. Must not know: sockets, sessions, reports.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import ssl
from dataclasses import dataclass

from ..codec.frames import DEFAULT_LIMITS, MIN_CHUNK
from ..codec.manifest import max_chunk_size
from ..codec.parity import setting as parity_setting
from ..codec.plan import DEFAULT_CHUNK
from ..errors import KvwireError
from .errors import UsageError

DEFAULT_PORT = 5211
MAX_PROBE_SECONDS = 60.0
#: the shortest -i (0 turns interval reports off): the sending side's sampler reads the lanes every 20 ms, and
#: an interval shorter than that made its thread spin (-i 1e-9: a -t 2 loopback run took 17 s at 0.08 Gbit/s).
#: iperf3 takes 0.1 s at least; sub-second loopback runs here report at 0.05 s, so the floor is the sampler's
MIN_INTERVAL = 0.02
KEY_ENV = "KVWIRE_BENCH_KEY"

_SUFFIX = re.compile(r"^\s*(\d+(?:\.\d*)?)\s*([kKmMgGtT]?)\s*$")


def parse_size(text: str, base: int = 1024) -> int:
    """``"256M"`` -> 268435456 (``base`` 1024, like iperf3's -n/-l); rates use base 1000."""
    m = _SUFFIX.match(text)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (use e.g. 4096, 64K, 256M, 2G)")
    power = " KMGT".index(m.group(2).upper() or " ")
    return int(float(m.group(1)) * base**power)


def parse_rate(text: str) -> int:
    return parse_size(text, 1000)


_DURATION = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*(ms|s)?\s*$")
#: bare --connect-timeout values below this are refused: they are seconds, as earlier builds took them
MIN_BARE_MS = 10


def parse_connect_timeout(text: str) -> float:
    """``--connect-timeout``: milliseconds as in iperf3 (``1500``), or with a unit (``1500ms``, ``1.5s``).
    Returns seconds. A bare number under ``MIN_BARE_MS`` is refused: it is almost surely seconds, which
    earlier builds took."""
    m = _DURATION.match(text)
    if not m:
        raise argparse.ArgumentTypeError(f"not a timeout: {text!r} (milliseconds as in iperf3, e.g. 1500, "
                                         "or with a unit: 1500ms, 1.5s)")
    value, unit = float(m.group(1)), m.group(2)
    if unit is None and value < MIN_BARE_MS:
        raise argparse.ArgumentTypeError(
            f"--connect-timeout takes milliseconds, as in iperf3 (earlier kvwire-bench builds took seconds): "
            f"{value:g} ms is too short; write {value * 1000:g} or {value:g}s for {value:g} seconds")
    seconds = value if unit == "s" else value / 1000
    if seconds <= 0:
        raise argparse.ArgumentTypeError("--connect-timeout must be positive")
    return seconds


EMULATE_KEYS = ("rtt", "loss", "rate", "queue", "mtu")


def parse_emulate(text: str) -> dict[str, float]:
    """``"rtt=20ms,loss=0.1%,rate=400mbit[,queue=1MB][,mtu=1500]"`` -> WanLink keyword arguments
    (``rtt_ms``, ``loss``, ``rate_mbit``, ``queue_bytes``, ``mtu``); rtt and rate are required."""
    from ..testing.wan import parse_bytes, parse_loss, parse_ms, parse_rate_mbit

    out: dict[str, float] = {}
    for item in filter(None, (x.strip() for x in text.split(","))):
        key, sep, value = item.partition("=")
        key = key.strip().lower()
        if not sep or key not in EMULATE_KEYS:
            raise argparse.ArgumentTypeError(
                f"bad --emulate item {item!r}: use {'=..,'.join(EMULATE_KEYS)}=.. (e.g. rtt=20ms,rate=400mbit)")
        try:
            if key == "rtt":
                out["rtt_ms"] = parse_ms(value)
            elif key == "loss":
                out["loss"] = parse_loss(value)
            elif key == "rate":
                out["rate_mbit"] = parse_rate_mbit(value)
            elif key == "queue":
                out["queue_bytes"] = parse_bytes(value)
            else:
                out["mtu"] = int(value)
        except ValueError as e:
            raise argparse.ArgumentTypeError(f"bad --emulate {key}: {e}") from None
    missing = [k for k, name in (("rtt", "rtt_ms"), ("rate", "rate_mbit")) if name not in out]
    if missing:
        raise argparse.ArgumentTypeError(f"--emulate needs {' and '.join(missing)} (e.g. rtt=20ms,rate=400mbit)")
    if out["rate_mbit"] <= 0 or out["rtt_ms"] < 0 or not 0 <= out.get("loss", 0.0) < 1 \
            or not 576 <= out.get("mtu", 1500) <= 65535:
        raise argparse.ArgumentTypeError("--emulate needs rate > 0, rtt >= 0, 0 <= loss < 100%, 576 <= mtu <= 65535")
    return out


@dataclass
class Options:
    mode: str  # "server", "client", "loopback" or "emulate"
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    bind: str = "0.0.0.0"
    data_port: int | None = None
    lanes: int = 4
    duration: float | None = None
    nbytes: int | None = None
    length: int = 256 * 1024 * 1024
    interval: float = 1.0
    json: bool = False
    json_stream: bool = False
    reverse: bool = False
    congestion: str | None = None
    fq_rate: int | None = None
    key: bytes = b""
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_ca: str | None = None
    tls_name: str | None = None
    hashing: bool = True
    chunk_size: int = DEFAULT_CHUNK
    model: str | None = None
    tokens: int = 32768
    tp: int = 1
    decode_tp: int | None = None  # --decode-tp: heterogeneous TP on loopback (kvwire.reshard), in this process
    requests: int | None = None
    concurrency: int = 1
    prefill_ms: float = 0.0
    seed: int = 0
    verify_seed: int | None = None
    pool_bytes: int = 16 * 1024**3
    one_off: bool = False
    metrics_port: int | None = None
    plot: str | None = None
    timeout: float = 300.0
    connect_timeout: float = 1.5
    announce: bool = False
    verbose: bool = False
    emulate: dict[str, float] | None = None  # --emulate: rtt_ms, loss, rate_mbit[, queue_bytes, mtu]
    # kvwire.congestion's LinkControl drives the lanes (--polite implies it); on the command line the
    # default unless --no-adaptive or --fq-rate, as for kvwire.connect
    adaptive: bool = False
    polite: bool = False
    probe_seconds: float | None = None  # --probe: a kvwire.probe burst of this long before the test
    # --warm (True) / --no-warm (False): warm the test's session as kvwire.connect() does (kvwire.probe's
    # burst until the pipe reads full, on every lane the controller may use); --adaptive then starts paced.
    # None (neither): as kvwire.connect(): where the path is long and the receiver takes probes, with the link
    # controller on and no --probe (``sending.resolve_warm``)
    warm: bool | None = None
    # --tail-parity: parity chunks over each transfer's last layer (kvwire.codec.parity); None: connect()'s default
    tail_parity: int | None = None

    @property
    def tls(self) -> bool:
        return bool(self.tls_cert or self.tls_key or self.tls_ca)

    @property
    def kv_mode(self) -> bool:
        return self.model is not None

    def effective_data_port(self) -> int:
        if self.data_port is not None:
            return self.data_port
        return 0 if self.port == 0 else self.port + 1


#: what ``-v`` given with a test prints on stderr: it still means --verbose, unlike iperf3's -v
SHORT_V_DEPRECATED = ("kvwire-bench: -v means --verbose here, but iperf3's -v prints the version; it will do so "
                      "in a later release: write --verbose (or --version)")


def version_text() -> str:
    from .. import __version__

    return f"kvwire-bench {__version__} (kvwire {__version__})"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="kvwire-bench",
        description="iperf-style benchmark of kvwire: KV-cache-shaped transfers over multi-lane TCP, "
                    "every byte verified at the receiver.",
        epilog="examples:\n"
               "  kvwire-bench --loopback --model qwen3-next-80b-a3b --tokens 32768\n"
               "  kvwire-bench -s                     # on the decode host\n"
               "  kvwire-bench -c HOST -P 8 -t 10     # raw mode, on the prefill host\n"
               "  kvwire-bench -c HOST --model kimi-linear-48b-a3b --tokens 131072 --requests 20 "
               "--prefill-ms-per-layer 4",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    role = p.add_mutually_exclusive_group(required=True)
    role.add_argument("-s", "--server", action="store_true", help="run as server (the receiving end)")
    role.add_argument("-c", "--client", metavar="HOST", help="run as client (the sending end) against HOST")
    role.add_argument("--loopback", action="store_true",
                      help="server (a subprocess, for honest CPU accounting) and client on 127.0.0.1")
    role.add_argument("--emulate", metavar="SPEC", type=parse_emulate,
                      help="like --loopback, over an emulated WAN link between two network namespaces "
                           "(root): rtt=20ms,loss=0.1%%,rate=400mbit[,queue=1MB][,mtu=1500]")
    g = p.add_argument_group("common")
    g.add_argument("-p", "--port", type=int, default=DEFAULT_PORT,
                   help=f"control port (default {DEFAULT_PORT})")
    g.add_argument("--data-port", type=int, help="server: kvwire data port (default PORT+1; 0 = any)")
    g.add_argument("-B", "--bind", default="0.0.0.0", help="server: address to listen on")
    g.add_argument("-i", "--interval", type=float, default=1.0,
                   help=f"seconds between interval reports (at least {MIN_INTERVAL:g}; 0: none)")
    g.add_argument("-J", "--json", action="store_true", help="print one JSON document at the end")
    g.add_argument("--json-stream", action="store_true",
                   help="print line-delimited JSON events as they happen")
    g.add_argument("--key", help=f"pre-shared key (default: ${KEY_ENV})")
    g.add_argument("--tls-cert", help="certificate (server identity; client certificate on a client)")
    g.add_argument("--tls-key", help="private key of --tls-cert")
    g.add_argument("--tls-ca",
                   help="CA file: client verifies the server with it; server requires client certs")
    g.add_argument("--tls-name", help="client: server name to verify (default: the host)")
    g.add_argument("--verbose", action="store_true", help="more detail (loopback: server output too)")
    g.add_argument("-v", dest="short_v", action="store_true",
                   help="alone: print the version (as iperf3 -v); with a test: --verbose, for now (deprecated)")
    g.add_argument("--version", action="version", version=version_text())
    c = p.add_argument_group("client")
    c.add_argument("-P", "--parallel", type=int, default=4, metavar="N",
                   help="lanes (TCP connections), default 4")
    amount = c.add_mutually_exclusive_group()
    amount.add_argument("-t", "--time", type=float, metavar="SECONDS", help="send for this long")
    amount.add_argument("-n", "--bytes", type=parse_size, metavar="BYTES",
                        help="send this many bytes (whole transfers)")
    amount.add_argument("--requests", type=int, metavar="K", help="send K requests (KV mode default: 1)")
    c.add_argument("-l", "--length", type=parse_size, default=256 * 1024 * 1024, metavar="BYTES",
                   help="raw mode: bytes per transfer (default 256M)")
    c.add_argument("-R", "--reverse", action="store_true",
                   help="reverse: the server sends, the client receives and verifies (within the server's bounds: "
                        "its --pool-bytes, a preset or the config.json sent from here, -C of the kernel's allowed "
                        "list, -t up to 3600 s)")
    c.add_argument("-C", "--congestion", metavar="ALGO",
                   help="TCP congestion algorithm of the lanes (bbr, cubic)")
    c.add_argument("--fq-rate", type=parse_rate, metavar="BITS/S",
                   help="per-lane pacing cap (SO_MAX_PACING_RATE)")
    c.add_argument("--adaptive", action="store_true",
                   help="run kvwire's link controller on the lanes for the whole test (lane count, pacing, "
                        "algorithm: -P is its starting lane count, -C its algorithm; no --fq-rate); intervals "
                        "show its view of the link. The default, as for every kvwire session, unless "
                        "--no-adaptive or --fq-rate")
    c.add_argument("--no-adaptive", action="store_true",
                   help="no link controller: -P lanes, unpaced (or --fq-rate), the kernel's congestion control "
                        "alone (kvwire.connect(link_control=False))")
    c.add_argument("--polite", action="store_true",
                   help="--adaptive in polite mode: CUBIC, and half the capacity while other flows compete")
    c.add_argument("--probe", type=float, metavar="SECONDS", dest="probe_seconds",
                   help="measure the link with SECONDS of sink transfers on the test's lanes before the test "
                        "(kvwire.probe; the receiver discards them; not counted in the test)")
    c.add_argument("--warm", action="store_const", const=True, default=None,
                   help="warm the test's session before the test as kvwire.connect() does: up to 1 s (or 16 "
                        "round trips) of sink transfers on every lane the link controller may use, ended once "
                        "the pipe reads full; the controller then starts paced at what it measured (not counted "
                        "in the test; not with --probe). The default, as for kvwire.connect(), on a path of "
                        "15 ms or more to a receiver that takes probes, with the link controller on and no "
                        "--probe; --warm forces it on any path")
    c.add_argument("--no-warm", action="store_const", const=False, dest="warm",
                   help="no warm-up: the test's first transfer starts on cold lanes (kvwire.connect(warm=False))")
    c.add_argument("--tail-parity", type=int, default=None, metavar="M",
                   help="send M Reed-Solomon parity chunks (0..8) per group of each transfer's last layer (groups "
                        "of as many chunks as lanes), so that the receiver rebuilds a group without its M slowest "
                        "lanes (a lost packet costs a lane a round trip): connect(tail_parity=M); needs zfec "
                        "(kvwire[fec]). Default: as kvwire.connect(), 2 on a path of 15 ms or more when zfec is "
                        "installed, else 0")
    c.add_argument("--no-hash", action="store_true", help="turn the transport's per-chunk xxh3 off")
    c.add_argument("--chunk-size", type=parse_size, default=DEFAULT_CHUNK, metavar="BYTES",
                   help=f"transport chunk size (default {DEFAULT_CHUNK // 1024 // 1024}M)")
    c.add_argument("--model", metavar="PRESET|CONFIG", help="KV mode: a preset name or a config.json path")
    c.add_argument("--tokens", type=int, default=32768, help="KV mode: tokens per request (default 32768)")
    c.add_argument("--tp", type=int, default=1,
                   help="KV mode: tensor-parallel size of the sending (prefill) side (rank 0 is sent, or every "
                        "rank with --decode-tp)")
    c.add_argument("--decode-tp", type=int, metavar="N",
                   help="KV mode with --loopback: decode-side TP; --tp prefill ranks send one request to N decode "
                        "ranks, each receiving only its slices (kvwire.reshard), in this process; prints each "
                        "decode rank's bytes beside the same-TP (N->N) case")
    c.add_argument("--concurrency", type=int, default=None,
                   help="requests in flight (default: 1 with --model, 2 in raw mode)")
    c.add_argument("--prefill-ms-per-layer", type=float, default=0.0, metavar="MS",
                   help="pace production: layer i is written at t0 + (i+1)*MS")
    c.add_argument("--seed", type=int, default=0, help="payload pattern seed")
    c.add_argument("--timeout", type=float, default=300.0, help="per-transfer deadline in seconds")
    c.add_argument("--connect-timeout", type=parse_connect_timeout, default=1.5, metavar="MS",
                   help="time to reach a kvwire-bench server and finish its handshake: milliseconds as in "
                        "iperf3 (default 1500), or with a unit (1500ms, 1.5s)")
    c.add_argument("--plot", metavar="FILE.png", help="write a timeline/throughput plot (needs matplotlib)")
    s = p.add_argument_group("server")
    s.add_argument("-1", "--one-off", action="store_true", help="serve one test, then exit")
    s.add_argument("--pool-bytes", type=parse_size, default=16 * 1024**3,
                   help="bound on buffer memory: the destination buffers, and with -R the payloads this end sends "
                        "(a reverse test that needs more is refused; default 16G)")
    s.add_argument("--metrics-port", type=int, metavar="PORT",
                   help="serve Prometheus metrics (kvwire.metrics.Metrics) at http://BIND:PORT/metrics (0: any port)")
    s.add_argument("--verify-seed", type=int, help="check against this seed instead of the client's (tests)")
    s.add_argument("--announce", action="store_true", help=argparse.SUPPRESS)
    return p


def options_from_args(a: argparse.Namespace) -> Options:
    if a.no_adaptive and (a.adaptive or a.polite):
        raise UsageError("--no-adaptive turns the link controller off: drop --adaptive/--polite")
    mode = "server" if a.server else "loopback" if a.loopback else "emulate" if a.emulate else "client"
    key = a.key if a.key is not None else os.environ.get(KEY_ENV, "")
    o = Options(
        mode=mode, host="127.0.0.1" if mode != "client" else a.client, port=a.port, bind=a.bind,
        data_port=a.data_port, lanes=a.parallel, duration=a.time, nbytes=a.bytes, length=a.length,
        interval=a.interval, json=a.json, json_stream=a.json_stream, reverse=a.reverse,
        congestion=a.congestion, fq_rate=a.fq_rate, key=key.encode(), tls_cert=a.tls_cert,
        tls_key=a.tls_key, tls_ca=a.tls_ca, tls_name=a.tls_name, hashing=not a.no_hash,
        chunk_size=a.chunk_size, model=a.model, tokens=a.tokens, tp=a.tp, decode_tp=a.decode_tp,
        requests=a.requests,
        concurrency=a.concurrency or 1, prefill_ms=a.prefill_ms_per_layer, seed=a.seed,
        verify_seed=a.verify_seed, pool_bytes=a.pool_bytes, one_off=a.one_off, plot=a.plot,
        timeout=a.timeout, connect_timeout=a.connect_timeout, announce=a.announce,
        verbose=a.verbose or a.short_v,
        emulate=a.emulate, polite=a.polite, probe_seconds=a.probe_seconds, warm=a.warm,
        tail_parity=a.tail_parity,
        adaptive=a.adaptive or a.polite or (not a.no_adaptive and a.fq_rate is None and not a.server),
        metrics_port=a.metrics_port)
    if o.nbytes is not None and o.model is None:
        o.length = min(o.length, o.nbytes)  # -n 1M sends 1M, not one default-sized transfer
    if o.model is None and o.duration is None and o.nbytes is None and o.requests is None:
        o.duration = 10.0  # iperf3's default
    if a.concurrency is None and o.model is None:
        o.concurrency = 2  # raw mode, whatever set its amount: keeps lanes busy across per-transfer round trips
    if o.model is not None and o.duration is None and o.nbytes is None and o.requests is None:
        o.requests = 1
    check(o)
    return o


def check(o: Options) -> None:
    if o.reverse and o.mode == "server":
        raise UsageError("-R is a client option (the server follows the client's choice)")
    if o.reverse and o.tls:
        raise UsageError("-R with TLS is not supported yet (the server would have to verify a certificate "
                         "of the client's receiver): run without --tls-* or swap the hosts' roles")
    if o.json and o.json_stream:
        raise UsageError("-J and --json-stream are exclusive")
    if not 1 <= o.lanes <= 64:
        raise UsageError("-P must be in 1..64")
    if not 1 <= o.concurrency <= 64:
        raise UsageError("--concurrency must be in 1..64")
    limit = max_chunk_size(DEFAULT_LIMITS)
    if not MIN_CHUNK <= o.chunk_size <= limit:
        raise UsageError(f"--chunk-size must be in [{MIN_CHUNK}, {limit}]")
    for flag, port in (("-p", o.port), ("--data-port", o.data_port), ("--metrics-port", o.metrics_port)):
        if port is not None and not 0 <= port <= 65535:  # (the socket layer wraps 70000 to 4464)
            raise UsageError(f"{flag} must be in 0..65535, got {port}")
    if o.data_port is None and o.port and o.port + 1 > 65535:
        raise UsageError(f"-p {o.port} leaves no data port above it (-p + 1): pass --data-port")
    if o.duration is not None and not 0 < o.duration < math.inf:  # (NaN fails both: it ran forever)
        raise UsageError("-t must be a positive, finite number of seconds")
    if not 0 < o.timeout < math.inf:
        raise UsageError("--timeout must be a positive, finite number of seconds")
    if o.pool_bytes <= 0:
        raise UsageError("--pool-bytes must be positive")
    if o.nbytes is not None and o.nbytes <= 0:
        raise UsageError("-n must be positive")
    if o.requests is not None and o.requests <= 0:
        raise UsageError("--requests must be positive")
    if o.tokens <= 0 or o.tp <= 0 or o.length <= 0:
        raise UsageError("--tokens, --tp and -l must be positive")
    if o.decode_tp is not None and (o.decode_tp <= 0 or o.model is None or o.mode != "loopback" or o.reverse):
        raise UsageError("--decode-tp needs --model and --loopback (it runs every rank in this process), a "
                         "positive size, and no -R")
    if isinstance(o.interval, bool) or not isinstance(o.interval, (int, float)) or (
            o.interval != 0 and not MIN_INTERVAL <= o.interval < math.inf):  # (NaN fails the range)
        raise UsageError(f"-i must be 0 (no interval reports) or a finite number of seconds >= {MIN_INTERVAL:g}, "
                         f"got {o.interval!r}")
    if o.prefill_ms < 0:
        raise UsageError("--prefill-ms-per-layer must not be negative")
    if o.mode == "server" and (o.tls_cert is None) != (o.tls_key is None):
        raise UsageError("a TLS server needs both --tls-cert and --tls-key")
    if o.mode in ("loopback", "emulate") and o.tls and not (o.tls_cert and o.tls_key and o.tls_ca):
        raise UsageError("TLS on --loopback/--emulate needs --tls-cert/--tls-key (server) and --tls-ca (client)")
    if o.fq_rate is not None and o.fq_rate <= 0:
        raise UsageError("--fq-rate must be positive")
    if o.mode == "server" and (o.adaptive or o.probe_seconds is not None or o.warm is not None):
        raise UsageError("--adaptive, --polite, --probe and --warm are client options (the sending side runs them)")
    if o.warm is True and o.probe_seconds is not None:
        raise UsageError("--warm is a probe of its own: drop --probe (or --warm)")
    if o.polite and not o.adaptive:
        raise UsageError("--polite is a mode of --adaptive")
    if o.adaptive and o.fq_rate is not None:
        raise UsageError("--adaptive paces the lanes itself: drop --fq-rate (or --adaptive/--polite)")
    try:
        parity_setting(o.tail_parity)
    except (ValueError, KvwireError) as e:
        raise UsageError(f"--tail-parity: {e}") from None
    if o.tail_parity and o.mode == "server":
        raise UsageError("--tail-parity is a client option (the sending side adds the parity)")
    if o.probe_seconds is not None and not 0 < o.probe_seconds <= MAX_PROBE_SECONDS:
        raise UsageError(f"--probe takes seconds in (0, {MAX_PROBE_SECONDS:g}]")


def server_ssl_context(o: Options) -> ssl.SSLContext | None:
    if not (o.tls_cert and o.tls_key):
        return None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        ctx.load_cert_chain(o.tls_cert, o.tls_key)
        if o.tls_ca and o.mode == "server":
            ctx.load_verify_locations(o.tls_ca)
            ctx.verify_mode = ssl.CERT_REQUIRED
    except (OSError, ssl.SSLError) as e:  # (a usage error, not a traceback: a path or a file that is not PEM)
        raise UsageError(f"--tls-cert/--tls-key/--tls-ca: {e}") from None
    return ctx


def client_ssl_context(o: Options) -> ssl.SSLContext | None:
    if not o.tls:
        return None
    try:
        ctx = ssl.create_default_context(cafile=o.tls_ca)
        if o.mode == "client" and o.tls_cert and o.tls_key:
            ctx.load_cert_chain(o.tls_cert, o.tls_key)
    except (OSError, ssl.SSLError) as e:
        raise UsageError(f"--tls-ca/--tls-cert/--tls-key: {e}") from None
    return ctx
