"""PrfaaS at paper scale: Table 6 next to our planner and our discrete-event simulator, plus a TTFT CDF.

For the three deployments of the paper's §4 (PrfaaS-PD: 4 H200 + 8 H20 instances; homogeneous PD: 12 H20;
naive heterogeneous: all prefill on the 4 H200, all 8 H20 decode) it prints:

* the planner with the paper's averaging (Eq 3-4: T and S at the mean length) against every Table 6 row,
  with the relative difference; and with per-request averaging (E[T(L)]: what FIFO instances sustain);
* the simulator at those operating points (the real ``Router`` on a simulated clock): throughput at
  saturation (offered 1.3x the planner's Λ_max), and mean/P90 TTFT at two arrival rates (Poisson):
  0.2 req/s, where queues are near empty — the paper's TTFT figures are zero-queue prefill times (PrfaaS-PD
  and naive share P90 = 3.51 s = T_H200 at the P90 length, 62.4K) — and 1.9 req/s for all three (90 % of
  what the homogeneous baseline sustains), where queueing shows, also with bursty arrivals of that mean;
* a link-drop run: the egress falls from 100 to 4 Gbit/s for ten minutes with the router's short loop on,
  told the PrfaaS queue alone (as it was) and told both sides' waits (``router.Backlog``), side by side;
* how long the simulator takes per 10^5 requests.

Run: ``python benchmarks/prfaas_sim.py [--requests N] [--out-dir benchmarks/results]``; writes
``prfaas-sim-<date>.txt``, ``prfaas-ttft-cdf.png`` and ``prfaas-link-drop.png`` there.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import io
import math
import sys
from pathlib import Path

import numpy as np

from kvwire.prfaas import model, paper, sim
from kvwire.prfaas.router import RouterConfig

NAMES = {"prfaas-pd": "PrfaaS-PD", "homogeneous": "Homogeneous PD", "naive": "Naive heterog."}
LIGHT, LOADED = 0.2, 1.9
BURSTY = -1.9  # key of the bursty run at 1.9 req/s mean (peak ratio 4, phases of 30 s on average)


def pct(ours: float, want: float) -> str:
    return "" if want == 0 else f"{100 * (ours / want - 1):+.1f}%"


def table(out: io.StringIO, requests: int, seed: int) -> dict[str, dict[float, sim.SimResult]]:
    p = lambda *a: print(*a, file=out)  # noqa: E731
    eq = model.paper_cases("length")
    timed = model.paper_cases("time")
    cfgs = sim.paper_configs(sim.Arrivals(1.0), requests=requests, seed=seed)
    runs: dict[str, dict[float, sim.SimResult]] = {}
    sat: dict[str, sim.SimResult] = {}
    for name, cfg in cfgs.items():
        sat[name] = sim.simulate(dataclasses.replace(cfg, arrivals=sim.Arrivals(1.3 * eq[name].lam_max)))
        runs[name] = {lam: sim.simulate(dataclasses.replace(cfg, arrivals=sim.Arrivals(lam)))
                      for lam in (LIGHT, LOADED)}
        runs[name][BURSTY] = sim.simulate(dataclasses.replace(cfg, arrivals=sim.Arrivals(LOADED, "bursty")))
    base = eq["homogeneous"].lam_max

    p("== Table 6 vs our planner (paper's Eq 3-4, T(E[L])) ==")
    p(f"{'deployment':<16}{'row':<22}{'Table 6':>10}{'planner':>10}{'diff':>9}")
    for name, row, ours, want in paper.table6_rows(eq):
        diff = "" if row in ("n_p", "n_d") else pct(ours, want)
        p(f"{NAMES[name]:<16}{row:<22}{want:>10.4g}{ours:>10.4g}{diff:>9}")
    best = eq["prfaas-pd"]
    p(f"PrfaaS-PD offloaded share p = {best.split.p:.3f} (paper 0.496), mean offloaded length "
      f"{best.split.l_long / 1000:.1f}K (44K), egress at Λ_max {best.egress * 8e-9:.1f} Gbit/s (~13)")
    p("")
    p("== Throughput (req/s): Table 6, planner, simulator at saturation (offered 1.3x the planner's Λ_max) ==")
    p(f"{'deployment':<16}{'Table 6':>8}{'Eq 3-4':>8}{'E[T(L)]':>9}{'sim':>8}{'sim/E[T]':>10}{'sim/Eq':>9}"
      f"{'ratio':>7}  sim utilization at saturation")
    for name in cfgs:
        s = sat[name]
        u = " ".join(f"{k} {v:.2f}" for k, v in s.utilization.items())
        p(f"{NAMES[name]:<16}{paper.TABLE6[name]['lam_max']:>8.2f}{eq[name].lam_max:>8.3f}"
          f"{timed[name].lam_max:>9.3f}{s.throughput:>8.3f}{pct(s.throughput, timed[name].lam_max):>10}"
          f"{pct(s.throughput, eq[name].lam_max):>9}{s.throughput / sat['homogeneous'].throughput:>7.2f}  {u}")
    p(f"(ratio: sim throughput / sim homogeneous; planner Eq 3-4 ratio "
      f"{eq['prfaas-pd'].lam_max / base:.3f} and {eq['naive'].lam_max / base:.3f}, Table 6 1.54 and 1.16)")
    p("")
    p("== TTFT (s), simulator, Poisson arrivals; TTFT = arrival -> first token out of the decode node ==")
    p(f"{'deployment':<16}{'Table 6 mean/P90':>18}  {'@0.2 req/s mean/P90':>22}{'diff':>16}  "
      f"{'@1.9 req/s mean/P90':>20}  {'bursty@1.9 mean/P90':>20}  util@1.9 (prfaas/pd-p/pd-d/egress)")
    for name in cfgs:
        w = paper.TABLE6[name]
        lo, hi = runs[name][LIGHT], runs[name][LOADED]
        u = "/".join(f"{v:.2f}" for v in hi.utilization.values())
        p(f"{NAMES[name]:<16}{w['ttft_mean']:>10.2f} / {w['ttft_p90']:<5.2f}  {lo.ttft_mean:>12.2f} / "
          f"{lo.ttft_pct(90):<6.2f}{pct(lo.ttft_mean, w['ttft_mean']):>8}{pct(lo.ttft_pct(90), w['ttft_p90']):>8}  "
          f"{hi.ttft_mean:>10.2f} / {hi.ttft_pct(90):<7.2f}  {runs[name][BURSTY].ttft_mean:>10.2f} / "
          f"{runs[name][BURSTY].ttft_pct(90):<7.2f}  {u}")
    h_lo, f_lo = runs["homogeneous"][LIGHT], runs["prfaas-pd"][LIGHT]
    h_hi, f_hi = runs["homogeneous"][LOADED], runs["prfaas-pd"][LOADED]
    p(f"PrfaaS-PD vs homogeneous: mean {pct(f_lo.ttft_mean, h_lo.ttft_mean)}, P90 "
      f"{pct(f_lo.ttft_pct(90), h_lo.ttft_pct(90))} at 0.2 req/s (paper -50 %, -64 %); mean "
      f"{pct(f_hi.ttft_mean, h_hi.ttft_mean)}, P90 {pct(f_hi.ttft_pct(90), h_hi.ttft_pct(90))} at 1.9 req/s")
    p("")
    walls = [r.wall_s * 1e5 / r.requests for rs in runs.values() for r in rs.values()]
    walls += [s.wall_s * 1e5 / s.requests for s in sat.values()]
    p(f"simulator speed: {np.median(walls):.1f} s per 10^5 requests (median of {len(walls)} runs, "
      f"min {min(walls):.1f}, max {max(walls):.1f}; one CPU core, shared machine)")
    return runs


def link_drop(out: io.StringIO, seed: int) -> dict[str, sim.SimResult]:
    """The same drop twice: the short loop told the PrfaaS queue alone (as before it saw both sides), and
    told both sides' waits (``router.Backlog``), side by side."""
    p = lambda *a: print(*a, file=out)  # noqa: E731
    best = model.paper_cases()["prfaas-pd"]
    drop, back, lam, low = 600.0, 1200.0, 1.5, 4.0
    runs: dict[str, sim.SimResult] = {}
    for name, sees in (("PrfaaS side only", False), ("both waits", True)):
        cfg = sim.at_plan(model.paper_deployment(), best, sim.Arrivals(lam), requests=int(1800 * lam), seed=seed,
                          adaptive=True, router_config=RouterConfig(t_max=paper.workload().hi), sees_local=sees,
                          link_rates=((drop, low * model.GBPS), (back, 100 * model.GBPS)))
        runs[name] = sim.simulate(cfg)
    p(f"== Link drop: PrfaaS-PD at {lam} req/s, egress 100 -> {low:g} Gbit/s at {drop:.0f} s, back at {back:.0f} s ==")
    p(f"t* = {best.split.t:.0f}; router short loop with its default thresholds, t_max = 128K; the loop told "
      "the PrfaaS queue alone vs both sides' expected waits")
    cols = list(runs)
    p(f"{'':<34}" + "".join(f"{c:>34}" for c in cols))

    def row(label: str, f: object) -> None:
        p(f"{label:<34}" + "".join(f"{f(runs[c]):>34}" for c in cols))  # type: ignore[operator]

    def window(a: float, b: float) -> object:
        def cell(r: sim.SimResult) -> str:
            m = (r.arrivals >= a) & (r.arrivals < b)
            return (f"off {r.routed_prfaas[m].mean():.2f}, TTFT {np.nanmean(r.ttft_all[m]):.2f} / "
                    f"{np.nanpercentile(r.ttft_all[m], 90):.2f} s")
        return cell

    def first_up(r: sim.SimResult) -> str:
        return f"{next((at for at, t in r.thresholds if at >= drop and t > best.split.t), math.nan) - drop:.2f} s"

    def home(r: sim.SimResult) -> str:
        return f"{next((at for at, t in r.thresholds if at >= back and t == best.split.t), math.nan) - back:.1f} s"

    def t_range(r: sim.SimResult) -> str:
        d = [t for at, t in r.thresholds if drop <= at < back]
        return f"{min(d, default=math.nan):.0f}-{max(d, default=math.nan):.0f}"

    row("first rise after the drop", first_up)
    row("t changes during the drop", lambda r: str(sum(1 for at, _ in r.thresholds if drop <= at < back)))
    row("t range during the drop", t_range)
    row("back at t* after the recovery", home)
    row(f"before ( 60-{drop:.0f} s) mean/P90", window(60, drop))
    row(f"during ({drop + 30:.0f}-{back:.0f} s) mean/P90", window(drop + 30, back))
    row(f"after  ({back + 30:.0f}-end s) mean/P90", window(back + 30, math.inf))
    row("t changes in all / unfinished", lambda r: f"{len(r.thresholds) - 1} / {r.unfinished}")
    return runs


def plots(out_dir: Path, runs: dict[str, dict[float, sim.SimResult]], drops: dict[str, sim.SimResult]) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, lam in zip(axes, (LIGHT, LOADED)):
        for name, rs in runs.items():
            x = np.sort(rs[lam].ttft)
            ax.plot(x, np.arange(1, len(x) + 1) / len(x), label=f"{NAMES[name]} (sim)")
            w = paper.TABLE6[name]
            ax.plot([w["ttft_p90"]], [0.9], "x", color=ax.lines[-1].get_color())
        ax.set_xscale("log")
        ax.set_xlabel("TTFT (s)")
        ax.set_title(f"Poisson {lam} req/s")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("CDF")
    axes[0].legend(title="x = Table 6 P90 (PrfaaS-PD's = naive's)", fontsize=8)
    fig.suptitle("PrfaaS paper scale: simulated TTFT (the real router, simulated clock)")
    fig.tight_layout()
    cdf = out_dir / "prfaas-ttft-cdf.png"
    fig.savefig(cdf, dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(9, 3.5))
    for name, drop in drops.items():
        ts = drop.thresholds + [(float(drop.arrivals[-1]), drop.thresholds[-1][1])]
        ax.step([a for a, _ in ts], [t / 1000 for _, t in ts], where="post", label=f"short loop: {name}")
    ax.axvspan(600, 1200, alpha=0.15, color="red", label="egress 4 Gbit/s (100 otherwise)")
    ax.set_xlabel("simulated time (s)")
    ax.set_ylabel("threshold t (K tokens)")
    ax.legend()
    fig.tight_layout()
    lp = out_dir / "prfaas-link-drop.png"
    fig.savefig(lp, dpi=120)
    plt.close(fig)
    return [cdf, lp]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=100_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out-dir", type=Path, default=Path(__file__).parent / "results")
    a = ap.parse_args()
    out = io.StringIO()
    print(f"# benchmarks/prfaas_sim.py --requests {a.requests} --seed {a.seed}  "
          f"({datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC)", file=out)
    runs = table(out, a.requests, a.seed)
    print("", file=out)
    drop = link_drop(out, a.seed)
    a.out_dir.mkdir(parents=True, exist_ok=True)
    files = plots(a.out_dir, runs, drop)
    txt = a.out_dir / f"prfaas-sim-{datetime.date.today():%Y-%m-%d}.txt"
    print("", file=out)
    print("plots: " + ", ".join(f.name for f in files), file=out)
    txt.write_text(out.getvalue())
    sys.stdout.write(out.getvalue())
    print(f"wrote {txt}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
