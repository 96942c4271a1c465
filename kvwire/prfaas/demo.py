"""``python -m kvwire.prfaas.demo``: router + PrfaaS prefill server + local PD stand-in + decode receiver, loopback.

Owns: wiring the parts in one process, the scaled-down §4 scenario (paper deployment and length
distribution; time × ``time_scale``, shipped tokens ÷ ``token_scale``, the real layout's state in full),
injected congestion, per-request lines and the summary. The local PD prefill is a stand-in that only
spends the H20 profile's time (intra-cluster RDMA is out of scope, as in the paper's Eq 4).
Must not know: kvwire internals (public API, ``LinkState`` and ``LinkMonitor`` only).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

import kvwire

from ..congestion.estimator import EstimatorConfig, LinkEstimator, LinkState
from . import model
from .router import PRFAAS, RouteDecision, Router, RouterConfig, RouteRequest
from .server import JobReport, PrfaasServer, SimulatedPrefill
from .workload import check_payload, lognormal_lengths, payload_bytes, synthetic_requests


@dataclass
class DemoConfig:
    requests: int = 48
    layout: str = "kimi-linear-48b-a3b"
    layers: int = 0  # keep only the first N layers (0 = all): a smaller payload for tests
    token_scale: int = 32  # shipped tokens = logical length / token_scale
    time_scale: float = 0.25  # simulated compute and arrivals run this much faster than the paper's
    load: float = 0.8  # arrival rate as a share of the planned Λ_max
    egress_mbps: float = 2000.0  # the egress budget the estimator measures utilization against
    congest: tuple[float, float] | None = (1.0, 2.0)  # seconds into the run: router sees congestion
    lanes: int = 4
    seed: int = 7
    quiet: bool = False


@dataclass
class Outcome:
    decision: RouteDecision
    report: JobReport | None = None
    verified: bool | None = None


@dataclass
class DemoResult:
    outcomes: list[Outcome]
    plan: model.Throughput
    router: Router
    wall_s: float
    bytes_moved: int = 0
    thresholds: list[tuple[float, float]] = field(default_factory=list)

    @property
    def offloaded(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.decision.target == PRFAAS]


def synthetic_link(now: float, utilization: float, congested: bool) -> LinkState:
    """A LinkState as the estimator would publish it, for injecting conditions into the router."""
    return LinkState(timestamp=now, goodput=0.0, btl_bw=0.0, capacity=None, utilization=utilization,
                     available_bw=None, min_rtt=None, srtt=None, queueing_ratio=None, loss_rate=0.05 * congested,
                     busy=1.0, rwnd_limited=0.0, sndbuf_limited=0.0, congested=congested, saturated=congested)


def _layout(cfg: DemoConfig) -> kvwire.ModelLayout:
    layout = kvwire.load_layout(cfg.layout)
    if cfg.layers:
        layout = dataclasses.replace(layout, name=f"{layout.name}-{cfg.layers}l", layers=layout.layers[:cfg.layers])
    return layout


def run(cfg: DemoConfig) -> DemoResult:
    say = (lambda *a: None) if cfg.quiet else print
    dep = model.paper_deployment()
    best = model.plan(dep, lognormal_lengths(4000, cfg.seed))
    say(f"plan (paper deployment, {dep.n_prfaas} PrfaaS + {dep.n_pd} PD instances): t*={best.split.t:.0f} "
        f"N_p={best.n_p} N_d={best.n_d} Λ_max={best.lam_max:.2f} req/s p={best.split.p:.2f} "
        f"egress={best.egress * 8e-9:.1f} Gbit/s bottleneck={best.bottleneck}")
    layout = _layout(cfg)
    router = Router(best.split.t, RouterConfig(replan_s=3.0, replan_min_samples=24, t_min=1024), deployment=dep)
    # loopback's min RTT is ~1 µs, so srtt/min_rtt is always "queueing": judge congestion by loss only here
    estimator = LinkEstimator(EstimatorConfig(capacity=cfg.egress_mbps * 1e6 / 8, congested_ratio=math.inf,
                                              saturated_ratio=math.inf))
    rx = kvwire.Receiver("127.0.0.1", 0, key=b"prfaas-demo")
    server = PrfaasServer(layout, SimulatedPrefill(layout, dep.prfaas, cfg.time_scale), instances=dep.n_prfaas,
                          lanes=cfg.lanes, key=b"prfaas-demo", estimator=estimator)
    local = ThreadPoolExecutor(max(1, best.n_p), thread_name_prefix="pd-prefill")
    rng = np.random.default_rng(cfg.seed)
    rate = cfg.load * best.lam_max / cfg.time_scale
    arrivals = np.cumsum(rng.exponential(1 / rate, cfg.requests))
    outcomes: list[Outcome] = []
    pending: list[tuple[Outcome, Future[JobReport], kvwire.IncomingTransfer | None, np.ndarray | None,
                        kvwire.RequestSpec | None]] = []
    t0 = time.monotonic()
    result = DemoResult(outcomes, best, router, 0.0, thresholds=[(0.0, router.t)])
    say(f"{cfg.requests} requests, {rate:.1f} req/s, layout {layout.name} ({layout.num_layers} layers, "
        f"state {layout.state_bytes_per_request() / 2**20:.1f} MiB), tokens shipped = length/{cfg.token_scale}")
    say(f"{'request':<10} {'route':<6} {'length':>7} {'incr':>7} {'t':>7} {'MiB':>7} "
        f"{'queue':>6} {'prefill':>7} {'tail':>6}  check")

    def tick() -> None:
        now = time.monotonic() - t0
        inject = cfg.congest is not None and cfg.congest[0] <= now < cfg.congest[1]
        link = synthetic_link(time.monotonic(), 0.97, True) if inject else server.link_state()
        before = router.t
        router.observe(time.monotonic(), link, server.waiting)
        plan = router.maybe_replan(time.monotonic())
        if plan is not None:
            say(f"  [replan {now:5.2f}s] t*={router.t_star:.0f} recommend N_p={plan.n_p} N_d={plan.n_d} "
                f"Λ_max={plan.lam_max:.2f}")
        if router.t != before:
            result.thresholds.append((now, router.t))
            say(f"  [t {now:5.2f}s] {before:.0f} -> {router.t:.0f} ({router.history[-1].why})")
        for item in [p for p in pending if p[1].done()]:
            pending.remove(item)
            finish(*item)

    def finish(o: Outcome, fut: Future[JobReport], inc: kvwire.IncomingTransfer | None,
               dest: np.ndarray | None, req: kvwire.RequestSpec | None) -> None:
        o.report = fut.result()
        if inc is not None and dest is not None and req is not None:
            try:
                inc.result(timeout=30)
                o.verified = o.report.ok and check_payload(layout, req, dest)
            except kvwire.KvwireError:
                o.verified = False
            result.bytes_moved += o.report.bytes if o.verified else 0
        r, d = o.report, o.decision
        say(f"{d.request_id:<10} {d.target:<6} {d.incremental + d.prefix:>7} {d.incremental:>7} {d.threshold:>7.0f} "
            f"{r.bytes / 2**20:>7.1f} {r.queued_s:>6.2f} {r.prefill_s:>7.2f} {r.tail_s:>6.3f}  "
            f"{'' if o.verified is None else 'verified' if o.verified else 'FAILED ' + r.reason}"
            f"{' +cache-move' if d.transfer_cache else ''}")

    def local_prefill(rid: str, length: float, submitted: float) -> JobReport:
        start = time.monotonic()
        time.sleep(dep.pd.t_prefill(length) * cfg.time_scale)
        return JobReport(rid, ("pd", 0), 0, start - submitted, time.monotonic() - start, 0.0, "done")

    try:
        for i, sr in enumerate(synthetic_requests(cfg.requests, cfg.seed)):
            while time.monotonic() - t0 < arrivals[i]:
                tick()
                time.sleep(min(0.02, max(0.0, arrivals[i] - (time.monotonic() - t0))))
            tick()
            d = router.route(RouteRequest(sr.request_id, sr.total, sr.cached_pd, sr.cached_prfaas))
            o = Outcome(d)
            outcomes.append(o)
            if d.target == PRFAAS:
                n = max(1, math.ceil(sr.total / cfg.token_scale))
                hit = min(n, sr.cached_pd // cfg.token_scale)  # what the decode node's own cluster caches
                req = kvwire.RequestSpec(sr.request_id, n, n, prefix_hit={"attn": hit})
                dest = np.empty(payload_bytes(layout, req), np.uint8)
                inc = rx.expect(sr.request_id, dest, layout=layout, state_position=n)
                pending.append((o, server.submit(req, rx.address, length=d.incremental), inc, dest, req))
            else:
                pending.append((o, local.submit(local_prefill, sr.request_id, d.incremental, time.monotonic()),
                                None, None, None))
        while pending:
            tick()
            time.sleep(0.02)
        result.wall_s = time.monotonic() - t0
    finally:
        local.shutdown(wait=True)
        server.close()
        rx.close()
    _summary(result, say)
    return result


def _summary(res: DemoResult, say: object) -> None:
    assert callable(say)
    off = res.offloaded
    ok = [o for o in off if o.verified]
    ttft = {route: [o.report.queued_s + o.report.prefill_s + o.report.tail_s for o in res.outcomes
                    if o.report and o.decision.target == route] for route in ("prfaas", "pd")}
    say(f"summary: {len(res.outcomes)} requests in {res.wall_s:.1f}s, offloaded {len(off)} "
        f"({len(off) / max(1, len(res.outcomes)):.0%}), verified {len(ok)}/{len(off)}, "
        f"moved {res.bytes_moved / 2**20:.0f} MiB = {res.bytes_moved * 8e-9 / max(res.wall_s, 1e-9):.2f} Gbit/s")
    for route, xs in ttft.items():
        if xs:
            say(f"  TTFT {route}: mean {np.mean(xs):.2f}s  p90 {np.percentile(xs, 90):.2f}s (demo seconds)")
    say("  threshold: " + " -> ".join(f"{t:.0f}@{s:.1f}s" for s, t in res.thresholds))
    if res.router.last_plan is not None:
        p = res.router.last_plan
        say(f"  long timescale: recommend N_p={p.n_p} N_d={p.n_d} at t*={p.split.t:.0f} (Λ_max {p.lam_max:.2f})")


def _congest(text: str) -> tuple[float, float] | None:
    if text == "none":
        return None
    parts = text.split(":")
    try:
        start, end = (float(x) for x in parts) if len(parts) == 2 else (math.nan, math.nan)
    except ValueError:
        start = end = math.nan
    if not 0 <= start < end < math.inf:
        raise argparse.ArgumentTypeError(f"--congest takes START:END seconds with START < END, or 'none'; got {text!r}")
    return start, end


def build_parser() -> argparse.ArgumentParser:
    d = DemoConfig()
    ap = argparse.ArgumentParser(prog="python -m kvwire.prfaas.demo", description=__doc__.splitlines()[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--requests", type=int, default=d.requests, help="requests the workload generates")
    ap.add_argument("--layout", default=d.layout, help="model: a preset name or a config.json path")
    ap.add_argument("--layers", type=int, default=d.layers,
                    help="keep only the first N layers (0: all); a smaller payload for quick runs")
    ap.add_argument("--token-scale", type=int, default=d.token_scale,
                    help="tokens shipped per request = its logical length / this (the state goes in full)")
    ap.add_argument("--time-scale", type=float, default=d.time_scale,
                    help="simulated compute and arrivals run this much faster than the paper's (0.25: 4x)")
    ap.add_argument("--load", type=float, default=d.load,
                    help="arrival rate as a share of the planned maximum throughput (Lambda_max)")
    ap.add_argument("--egress-mbps", type=float, default=d.egress_mbps,
                    help="egress budget in Mbit/s the link estimator measures utilization against")
    ap.add_argument("--congest", type=_congest, default=d.congest, metavar="START:END",
                    help="seconds into the run during which the router is shown a congested link, or 'none'")
    ap.add_argument("--seed", type=int, default=d.seed, help="workload seed (lengths, arrivals, payload bytes)")
    return ap


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    res = run(DemoConfig(a.requests, a.layout, a.layers, a.token_scale, a.time_scale, a.load, a.egress_mbps,
                         a.congest, seed=a.seed))
    return 0 if all(o.verified for o in res.offloaded) else 1


if __name__ == "__main__":
    raise SystemExit(main())
