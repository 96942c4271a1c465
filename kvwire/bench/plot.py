"""``--plot FILE.png``: the layer timeline (production vs verified at the receiver) and lane throughput.

Owns: drawing the two panels with matplotlib (imported only here, only when asked; a clear error when it is
missing). Must not know: sockets or how the numbers were measured (it reads the run document and the
lane byte series).
"""

from __future__ import annotations

from typing import Any

from .document import percentile
from .errors import UsageError


def check_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UsageError("--plot needs matplotlib: pip install 'kvwire[bench]' (or matplotlib)") from None


def _representative(timelines: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The request whose exposed tail is the median one (the first request when there are no tails)."""
    with_tail = [t for t in timelines if t["exposed_tail_ms"] is not None]
    if not with_tail:
        return timelines[0] if timelines else None
    mid = percentile([t["exposed_tail_ms"] for t in with_tail], 50)
    return min(with_tail, key=lambda t: abs(t["exposed_tail_ms"] - (mid or 0.0)))


def write_plot(path: str, doc: dict[str, Any], series: list[tuple[float, list[int]]]) -> None:
    check_matplotlib()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kv = doc["kv"]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(11, 9), gridspec_kw={"height_ratios": [3, 2]})
    rep = _representative(kv["timeline"])
    if rep is not None:
        for other in kv["timeline"]:
            if other is rep:
                continue
            pts = [(x["verified_ms"], x["layer"]) for x in other["layers"] if x["verified_ms"] is not None]
            if pts:
                ax1.scatter(*zip(*pts), s=6, color="0.8", zorder=1)
        prod = [(x["produced_ms"], x["layer"]) for x in rep["layers"] if x["produced_ms"] is not None]
        ver = [(x["verified_ms"], x["layer"]) for x in rep["layers"] if x["verified_ms"] is not None]
        for x in rep["layers"]:
            if x["produced_ms"] is not None and x["verified_ms"] is not None:
                ax1.plot([x["produced_ms"], x["verified_ms"]], [x["layer"]] * 2, color="0.6", lw=0.8,
                         zorder=2)
        if prod:
            ax1.scatter(*zip(*prod), s=22, marker="o", color="tab:blue", label="produced (write_layer)",
                        zorder=3)
        if ver:
            state_kinds = ("gdn", "kda", "mamba1", "mamba2", "lightning")
            state = {x["layer"] for x in rep["layers"] if set(x["kinds"]) & set(state_kinds)}
            attn = [(v, layer) for v, layer in ver if layer not in state]
            st = [(v, layer) for v, layer in ver if layer in state]
            if attn:
                ax1.scatter(*zip(*attn), s=34, marker="D", color="tab:orange",
                            label="verified at receiver: attention layer", zorder=4)
            if st:
                ax1.scatter(*zip(*st), s=34, marker="D", color="tab:green", edgecolor="black", lw=0.6,
                            label="verified at receiver: state layer (GDN/KDA/Mamba)", zorder=5)
        tail = rep["exposed_tail_ms"]
        mb = kv["bytes_per_request"] / 1e6
        ax1.set_title(f"{kv['model']}, {kv['tokens']} tokens, {mb:.0f} MB/request, "
                      f"{kv['lanes']} lanes, prefill {kv['prefill_ms_per_layer']:g} ms/layer - request "
                      f"{rep['request_id']}" + (f", exposed tail {tail:.1f} ms" if tail is not None else ""),
                      fontsize=10)
    ax1.set_xlabel("ms since send()")
    ax1.set_ylabel("layer")
    ax1.invert_yaxis()
    ax1.grid(True, alpha=0.3)
    ax1.legend(loc="upper right", fontsize=9, framealpha=0.9)

    if len(series) >= 2:
        lanes = max(len(b) for _, b in series)  # lanes opened during the test (--adaptive) join later
        series = [(t, list(b) + [0] * (lanes - len(b))) for t, b in series]
        starts: list[float] = []
        total: list[float] = []
        per_lane: list[list[float]] = [[] for _ in range(lanes)]
        for (t0, b0), (t1, b1) in zip(series, series[1:]):
            dt = t1 - t0
            if dt <= 1e-6:
                continue
            starts.append(t0)
            rates = [(b1[i] - b0[i]) * 8 / dt / 1e9 for i in range(lanes)]
            for i in range(lanes):
                per_lane[i].append(rates[i])
            total.append(sum(rates))
        if starts:  # step plots: each rate holds from its sample to the next one
            xs = starts + [series[-1][0]]
            for i in range(lanes):
                ax2.step(xs, per_lane[i] + per_lane[i][-1:], where="post", lw=1, label=f"lane {i}")
            ax2.step(xs, total + total[-1:], where="post", lw=2.2, color="black", label="sum")
            ax2.set_xlim(0, xs[-1])
            ax2.set_ylim(bottom=0)
    ax2.set_xlabel("s since test start")
    ax2.set_ylabel("Gbit/s (handed to TCP)")
    ax2.set_title("lane throughput", fontsize=10)
    ax2.grid(True, alpha=0.3)
    ax2.legend(loc="upper right", fontsize=8, ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
