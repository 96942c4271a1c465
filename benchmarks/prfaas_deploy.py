"""The served PrfaaS deployment on this machine: PrfaaS-PD vs homogeneous PD vs naive heterogeneous, and (root)
the short loop across an emulated WAN whose rate drops mid-run.

Each configuration is three node processes plus the front door (``kvwire.prfaas.launcher``), driven over the
same workload through the official ``openai`` client (async, streaming): the paper's log-normal input lengths
scaled to the tiny served model (μ = 9.90 − ln 64, σ = 1.00, clipped to [32, 2048] tokens; mean ≈ 430),
Poisson arrivals, ``--out`` output tokens each.

* PrfaaS-PD: 1 PrfaaS prefill node, local 1 prefill + 1 decode, t* = 300 (the paper's 19.4K / 64);
* homogeneous PD: no PrfaaS node, local 2 prefill + 1 decode;
* naive heterogeneous: 1 PrfaaS prefill node does every prefill (t = 0), local 2 decode.

All nodes share this machine's CPUs (and there is no faster PrfaaS hardware), so the comparison shows what the
routing costs and buys here, not the paper's H200-vs-H20 gap; the simulator's paper-scale rows (same router
code, ``kvwire.prfaas.sim``) are printed next to Table 6 for that.

``--wan`` (root): PrfaaS-PD with the PrfaaS node behind ``WanLink`` (``--wan-rate`` Mbit/s, 20 ms RTT); the
rate drops to ``--wan-low`` at ``--drop-at`` s and recovers at ``--back-at`` s; prints the threshold timeline
and where long requests went before / during / after.

Run: ``python benchmarks/prfaas_deploy.py [--requests 60 --rate 2] [--wan]``; writes
``prfaas-deploy-<date>.txt`` and ``prfaas-deploy-ttft.png`` (and ``prfaas-deploy-wan.png``) to ``--out-dir``.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime
import io
import json
import math
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np

from kvwire.prfaas import config as deploy_config
from kvwire.prfaas import model, paper, sim
from kvwire.prfaas.launcher import Deployment, WanSpec
from kvwire.prfaas.workload import lognormal_lengths

DEFAULT = Path(__file__).resolve().parents[1] / "kvwire" / "prfaas" / "deploy-default.toml"
SCALE = 64
MU, SIGMA, LO, HI = paper.workload().mu - math.log(SCALE), 1.0, 32, 2048
T_STAR = 300
NAMES = {"prfaas-pd": "PrfaaS-PD", "homogeneous": "Homogeneous PD", "naive": "Naive heterog."}
WORDS = "the kv cache of hybrid models crosses datacenters when prefill is a service and links are fast".split()


def _ports(n: int) -> list[int]:
    import socket

    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    out = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return out


def make_config(kind: str, path: Path, *, use_link: bool = False, hold_s: float = 0.3) -> Path:
    base = deploy_config.load(DEFAULT)
    roles = {"prfaas-pd": [("prfaas-0", "prfaas", "prefill"), ("local-p0", "local", "prefill"),
                           ("local-d0", "local", "decode")],
             "homogeneous": [("local-p0", "local", "prefill"), ("local-p1", "local", "prefill"),
                             ("local-d0", "local", "decode")],
             "naive": [("prfaas-0", "prfaas", "prefill"), ("local-d0", "local", "decode"),
                       ("local-d1", "local", "decode")]}[kind]
    ports = _ports(2 * len(roles) + 1)
    nodes = tuple(deploy_config.NodeSpec(name, cluster, role, "127.0.0.1", ports[2 * i], ports[2 * i + 1])
                  for i, (name, cluster, role) in enumerate(roles))
    t = {"prfaas-pd": T_STAR, "homogeneous": 1e9, "naive": 0}[kind]
    loop = {"t_min": float(t), "t_max": float(t)} if kind != "prfaas-pd" else \
        {"t_min": 32.0, "t_max": 4096.0, "hold_s": hold_s}
    router = dict(base.router, port=ports[-1], t_star=float(t), use_link=use_link, loop=loop,
                  max_prompt_tokens=4096)
    path.write_text(deploy_config.to_toml(dataclasses.replace(base, nodes=nodes, router=router)))
    return path


def prompt_of(i: int, n: int, rng: np.random.Generator) -> str:
    text = f"{i:04d} " + " ".join(rng.choice(WORDS, n // 3 + 2))
    return text[:n]


@dataclasses.dataclass
class Result:
    arrival: float
    length: int
    ttft: float = math.nan
    done: float = math.nan
    tokens: int = 0
    route: str = ""
    error: str = ""


async def drive(url: str, lengths: list[int], arrivals: np.ndarray, out_tokens: int, seed: int) -> list[Result]:
    import openai

    rng = np.random.default_rng(seed)
    prompts = [prompt_of(i, n, rng) for i, n in enumerate(lengths)]
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=300)
    results = [Result(float(a), n) for a, n in zip(arrivals, lengths)]
    t0 = time.monotonic()

    async def one(i: int) -> None:
        r = results[i]
        await asyncio.sleep(max(0.0, r.arrival - (time.monotonic() - t0)))
        start = t0 + r.arrival
        try:
            stream = await client.completions.create(model="m", prompt=prompts[i], max_tokens=out_tokens,
                                                     stream=True)
            async for chunk in stream:
                ids = (chunk.choices[0].model_extra or {}).get("token_ids") or []
                if ids and math.isnan(r.ttft):
                    r.ttft = time.monotonic() - start
                r.tokens += len(ids)
                summary = (chunk.model_extra or {}).get("prfaas")
                if summary:
                    r.route = summary["route"]
            r.done = time.monotonic() - t0
        except Exception as e:
            r.error = f"{type(e).__name__}: {e}"

    await asyncio.gather(*(one(i) for i in range(len(results))))
    await client.close()
    return results


def summarize(rs: list[Result]) -> dict[str, float]:
    ok = [r for r in rs if not r.error and r.tokens]
    ttft = np.array([r.ttft for r in ok])
    span = max(r.done for r in ok) - min(r.arrival for r in rs)
    return {"requests": len(rs), "ok": len(ok), "throughput": len(ok) / span, "ttft_mean": float(ttft.mean()),
            "ttft_p90": float(np.percentile(ttft, 90)), "offloaded": float(np.mean([r.route == "prfaas" for r in ok])),
            "tokens_per_s": sum(r.tokens for r in ok) / span}


def run_config(kind: str, lengths: list[int], arrivals: np.ndarray, out_tokens: int, seed: int,
               tmp: Path) -> tuple[dict[str, float], list[Result]]:
    cfg = make_config(kind, tmp / f"{kind}.toml")
    with Deployment(cfg, log_dir=tmp / f"logs-{kind}") as d:
        asyncio.run(drive(d.frontdoor_url, lengths[:4], np.zeros(4), 2, seed + 1))  # warm-up: torch, sessions
        rs = asyncio.run(drive(d.frontdoor_url, lengths, arrivals, out_tokens, seed))
    return summarize(rs), rs


def sim_rows(out: io.StringIO, requests: int) -> None:
    p = lambda *a: print(*a, file=out)  # noqa: E731
    eq = model.paper_cases("length")
    light = sim.paper_configs(sim.Arrivals(0.2), requests=requests)
    p(f"== Simulator at paper scale (benchmarks/prfaas_sim.py has the full set; {requests} requests each) ==")
    p(f"{'deployment':<16}{'Table 6 Λ':>10}{'sim sat.':>10}{'Table 6 TTFT mean/P90':>24}{'sim @0.2 req/s':>18}")
    for name, cfg in light.items():
        sat = sim.simulate(dataclasses.replace(cfg, arrivals=sim.Arrivals(1.3 * eq[name].lam_max)))
        lo = sim.simulate(cfg)
        w = paper.TABLE6[name]
        p(f"{NAMES[name]:<16}{w['lam_max']:>10.2f}{sat.throughput:>10.3f}{w['ttft_mean']:>14.2f} / "
          f"{w['ttft_p90']:<7.2f}{lo.ttft_mean:>10.2f} / {lo.ttft_pct(90):.2f}")


def plot(out_dir: Path, runs: dict[str, list[Result]], tag: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    for name, rs in runs.items():
        ttft = np.sort([r.ttft for r in rs if not r.error and r.tokens])
        ax[0].plot(ttft, np.arange(1, len(ttft) + 1) / len(ttft), label=NAMES[name])
        pts = sorted((r.length, r.ttft) for r in rs if not r.error)
        ax[1].scatter([a for a, _ in pts], [b for _, b in pts], s=8, label=NAMES[name])
    ax[0].set(xlabel="TTFT (s)", ylabel="CDF", title="TTFT, served deployment on this machine")
    ax[1].set(xlabel="input tokens", ylabel="TTFT (s)", xscale="log", title="TTFT vs input length")
    for a in ax:
        a.legend()
        a.grid(alpha=0.3)
    path = out_dir / f"prfaas-deploy-ttft{tag}.png"
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def wan_run(out: io.StringIO, a: argparse.Namespace, tmp: Path) -> Path | None:
    from kvwire.testing import netns

    p = lambda *x: print(*x, file=out, flush=True)  # noqa: E731
    # a pressure signal must hold 1 s (not 0.3): one cache's burst at line rate queues for a few RTTs, which the
    # estimator reads as congestion; a rate drop under the offered load holds it for as long as it lasts
    cfg = make_config("prfaas-pd", tmp / "wan.toml", use_link=True, hold_s=a.wan_hold)
    n = int(a.wan_rate_rps * a.wan_seconds)
    lengths = lognormal_lengths(n, a.seed + 7, MU, SIGMA, LO, HI)
    arrivals = np.cumsum(np.random.default_rng(a.seed + 8).exponential(1 / a.wan_rate_rps, n))
    timeline: list[tuple[float, float]] = []
    rs: list[Result] = []
    with Deployment(cfg, wan=WanSpec(a.wan_rate, 20.0), log_dir=tmp / "logs-wan") as d:
        link = d.link
        stop = threading.Event()

        def poll() -> None:  # t as the front door reports it, on the clock of the load (t0 below)
            with netns.entered(link.client_ns):
                while not stop.wait(0.1):
                    try:
                        with urllib.request.urlopen(d.frontdoor_url + "/admin/timeline", timeout=2) as r:
                            state = json.loads(r.read())
                        offset.append(state["now"] - (time.monotonic() - t0))
                        timeline.append((time.monotonic() - t0, float(state["threshold"])))
                    except OSError:
                        pass

        def load() -> None:
            with netns.entered(link.client_ns):
                asyncio.run(drive(d.frontdoor_url, lengths[:3], np.zeros(3), 2, a.seed))
                started.set()
                rs.extend(asyncio.run(drive(d.frontdoor_url, lengths, arrivals, a.out, a.seed)))

        offset: list[float] = []  # front door clock - load clock
        started = threading.Event()
        loader = threading.Thread(target=load)
        loader.start()
        started.wait(120)
        t0 = time.monotonic()
        poller = threading.Thread(target=poll)
        poller.start()
        time.sleep(a.drop_at)
        link.set_rate(a.wan_low)  # the buffer keeps its depth in time (4 RTTs), as a router sized in time does
        link.set_queue(max(64 << 10, int(4 * a.wan_low * 1e6 / 8 * 0.02)))
        drop = time.monotonic() - t0
        time.sleep(max(0.0, a.back_at - (time.monotonic() - t0)))
        link.set_rate(a.wan_rate)
        link.set_queue(int(4 * a.wan_rate * 1e6 / 8 * 0.02))
        back = time.monotonic() - t0
        loader.join()
        stop.set()
        poller.join()
        with netns.entered(link.client_ns):
            with urllib.request.urlopen(d.frontdoor_url + "/admin/timeline", timeout=5) as r:
                events = json.loads(r.read())["transitions"]
    p(f"== WAN: PrfaaS node behind an emulated link, 20 ms RTT, {a.wan_rate:g} -> {a.wan_low:g} Mbit/s at "
      f"{drop:.1f} s, back at {back:.1f} s; {n} requests at {a.wan_rate_rps} req/s, {a.out} output tokens ==")
    shift = float(np.median(offset)) if offset else 0.0
    ups = [e["at"] - shift for e in events if e["who"] == "router" and "headroom" not in e["what"]]
    before_ups = [x for x in ups if x < drop]
    rises = [x for x in ups if x >= drop]
    p(f"t rises before the drop: {len(before_ups)}; first rise {rises[0] - drop:.2f} s after the drop"
      if rises else "t never rose after the drop")
    home = [(at, t) for at, t in timeline if at >= back and t <= T_STAR]
    p(f"t back at t* {home[0][0] - back:.2f} s after the recovery" if home else "t not back at t* by the end")
    for lo_s, hi_s, label in ((0, drop, "before"), (drop, back, "during"), (back, math.inf, "after")):
        sel = [r for r in rs if lo_s <= r.arrival < hi_s and not r.error]
        longs = [r for r in sel if r.length > T_STAR]
        ts = [t for at, t in timeline if lo_s <= at < hi_s]
        end = min(hi_s, timeline[-1][0] if timeline else 0)
        p(f"{label:<7} ({lo_s:5.1f}-{end:5.1f} s): t {min(ts, default=0):.0f}-"
          f"{max(ts, default=0):.0f}; requests {len(sel)}, long (> {T_STAR}) {len(longs)}, of which on PrfaaS "
          f"{sum(r.route == 'prfaas' for r in longs)}; TTFT mean "
          f"{np.nanmean([r.ttft for r in sel]) if sel else math.nan:.2f} s")
    p("router timeline (t changes, node health), seconds on the load's clock (link drop at "
      f"{drop:.1f} s, recovery at {back:.1f} s):")
    for e in events:
        if e["who"] == "router" or "healthy" in e["what"]:
            p(f"  {e['at'] - shift:7.2f} s  {e['who']:<9} {e['what']}")
    p(f"errors: {sum(bool(r.error) for r in rs)}")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(8, 3.5))
        ax.step([x for x, _ in timeline], [t for _, t in timeline], where="post", label="threshold t")
        ax.axvspan(drop, back, alpha=0.15, color="red", label=f"link {a.wan_low:g} Mbit/s")
        ax.set(xlabel="s", ylabel="t (tokens)", title="Short loop across the emulated WAN")
        ax.legend()
        path = a.out_dir / "prfaas-deploy-wan.png"
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path
    except ImportError:
        return None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=60)
    ap.add_argument("--rate", type=float, default=2.0, help="Poisson arrivals, req/s")
    ap.add_argument("--out", type=int, default=16, help="output tokens per request")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sim-requests", type=int, default=20_000)
    ap.add_argument("--only", default="prfaas-pd,homogeneous,naive")
    ap.add_argument("--repeat", type=int, default=2, help="runs of each configuration, alternating the order")
    ap.add_argument("--wan", action="store_true", help="also the WAN rate-drop run (root)")
    ap.add_argument("--wan-only", action="store_true")
    ap.add_argument("--wan-rate", type=float, default=100.0, help="Mbit/s")
    ap.add_argument("--wan-low", type=float, default=4.0, help="Mbit/s during the drop")
    ap.add_argument("--wan-rate-rps", type=float, default=2.0)
    ap.add_argument("--wan-hold", type=float, default=1.0, help="the short loop's hold_s on the WAN")
    ap.add_argument("--wan-seconds", type=float, default=45.0)
    ap.add_argument("--drop-at", type=float, default=15.0)
    ap.add_argument("--back-at", type=float, default=30.0)
    ap.add_argument("--out-dir", type=Path, default=Path(__file__).parent / "results")
    ap.add_argument("--tag", default="", help="appended to the output files' names")
    a = ap.parse_args()
    a.out_dir.mkdir(parents=True, exist_ok=True)
    out = io.StringIO()
    print(f"# {' '.join(['benchmarks/prfaas_deploy.py', *sys.argv[1:]])}  "
          f"({datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC)", file=out)
    tmp = Path(tempfile.mkdtemp(prefix="prfaas-bench-"))
    files: list[Path] = []
    if not a.wan_only:
        lengths = lognormal_lengths(a.requests, a.seed, MU, SIGMA, LO, HI)
        arrivals = np.cumsum(np.random.default_rng(a.seed + 1).exponential(1 / a.rate, a.requests))
        print(f"workload: {a.requests} requests, Poisson {a.rate} req/s, input tokens mean {np.mean(lengths):.0f} "
              f"P50 {np.median(lengths):.0f} P90 {np.percentile(lengths, 90):.0f} max {max(lengths)}, "
              f"{a.out} output tokens; t* = {T_STAR}", file=out)
        runs: dict[str, list[Result]] = {}
        stats: dict[str, list[dict[str, float]]] = {}
        kinds = a.only.split(",")
        order = [k for r in range(a.repeat) for k in (kinds if r % 2 == 0 else kinds[::-1])]  # ABC CBA ...
        for kind in order:
            st, runs[kind] = run_config(kind, lengths, arrivals, a.out, a.seed, tmp)
            stats.setdefault(kind, []).append(st)
            print(f"  {kind}: {st}", file=sys.stderr, flush=True)
        base = float(np.mean([s["throughput"] for s in stats.get("homogeneous", [])] or [math.nan]))
        print(f"runs in the order {' '.join(order)} (one deployment each); per run, then the mean", file=out)
        print(f"{'deployment':<16}{'ok':>7}{'req/s':>8}{'vs homo':>9}{'tok/s':>8}{'TTFT mean':>11}{'P90':>8}"
              f"{'offloaded':>11}", file=out)
        for kind, sts in stats.items():
            rows = [*sts, {k: float(np.mean([x[k] for x in sts])) for k in sts[0]}] if len(sts) > 1 else sts
            for i, s in enumerate(rows):
                label = NAMES[kind] if i == 0 else ("  mean" if i == len(sts) else "")
                print(f"{label:<16}{s['ok']:>3.0f}/{s['requests']:<3.0f}{s['throughput']:>6.2f}"
                      f"{s['throughput'] / base:>9.2f}{s['tokens_per_s']:>8.1f}{s['ttft_mean']:>10.2f}s"
                      f"{s['ttft_p90']:>7.2f}s{s['offloaded']:>10.0%}", file=out)
        files.append(plot(a.out_dir, runs, a.tag))
        print("", file=out)
        sim_rows(out, a.sim_requests)
    if a.wan or a.wan_only:
        print("", file=out)
        w = wan_run(out, a, tmp)
        if w:
            files.append(w)
    print("\nplots: " + ", ".join(f.name for f in files), file=out)
    txt = a.out_dir / f"prfaas-deploy-{datetime.date.today():%Y-%m-%d}{a.tag}.txt"
    txt.write_text(out.getvalue())
    sys.stdout.write(out.getvalue())
    print(f"wrote {txt}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
