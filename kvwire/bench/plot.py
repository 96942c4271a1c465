"""``--plot FILE.png``: the layer timeline (production vs verified at the receiver) and lane throughput
(stacked per lane, with the link controller's capacity estimate and pacing, and fixed rate limits).

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


def throughput_traces(doc: dict[str, Any], series: list[tuple[float, list[int]]]) -> dict[str, Any]:
    """The lower panel's data, in Gbit/s: ``xs`` (sample edges, s), ``lanes`` (per-lane rates, one list
    per lane, a rate per span), ``sum``; ``capacity`` and ``pacing`` as ``(interval end, Gbit/s)`` points
    from the intervals' ``link`` records (``--adaptive``), with ``btl_bw`` (the estimator's bottleneck
    bandwidth: its best goodput, what it has before a capacity); ``limits``: fixed lines (the emulated link's
    rate, ``--fq-rate`` times the lanes)."""
    xs: list[float] = []
    total: list[float] = []
    lanes = max((len(b) for _, b in series), default=0)  # lanes opened during the test (--adaptive) join later
    per_lane: list[list[float]] = [[] for _ in range(lanes)]
    padded = [(t, list(b) + [0] * (lanes - len(b))) for t, b in series]
    for (t0, b0), (t1, b1) in zip(padded, padded[1:]):
        dt = t1 - t0
        if dt <= 1e-6:
            continue
        xs.append(t0)
        rates = [max(0, b1[i] - b0[i]) * 8 / dt / 1e9 for i in range(lanes)]
        for i in range(lanes):
            per_lane[i].append(rates[i])
        total.append(sum(rates))
    if xs:
        xs.append(padded[-1][0])
    capacity: list[tuple[float, float]] = []
    pacing: list[tuple[float, float]] = []
    btl_bw: list[tuple[float, float]] = []
    for rec in doc.get("intervals") or []:
        link, edge = rec.get("link"), (rec.get("sum") or {}).get("end")
        if not isinstance(link, dict) or not isinstance(edge, (int, float)):
            continue
        for key, out in (("capacity", capacity), ("pacing", pacing), ("btl_bw", btl_bw)):
            v = link.get(key)
            if isinstance(v, (int, float)) and v > 0:
                out.append((float(edge), v * 8 / 1e9))
    limits: list[tuple[float, str]] = []
    start = doc.get("start") or {}
    emulated = start.get("emulated_link")
    if isinstance(emulated, dict) and isinstance(emulated.get("rate_mbit"), (int, float)):
        limits.append((emulated["rate_mbit"] / 1e3, f"emulated link {emulated['rate_mbit']:g} Mbit/s"))
    fq = start.get("fq_rate")
    if isinstance(fq, (int, float)) and fq > 0 and lanes:
        limits.append((fq * lanes / 1e9, f"--fq-rate x {lanes} lanes"))
    return {"xs": xs, "lanes": per_lane, "sum": total, "capacity": capacity, "pacing": pacing, "btl_bw": btl_bw,
            "limits": limits}


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

    tr = throughput_traces(doc, series)
    if tr["xs"]:
        xs = tr["xs"]
        # stacked bands: each lane visible as its own band, the top edge is the sum (a line over lines hid them)
        ax2.stackplot(xs, *[r + r[-1:] for r in tr["lanes"]], step="post", alpha=0.85,
                      labels=[f"lane {i}" for i in range(len(tr["lanes"]))])
        ax2.step(xs, tr["sum"] + tr["sum"][-1:], where="post", lw=1.2, color="black", label="sum")
        for key, style, label in (("capacity", dict(color="tab:red", ls="--", lw=1.8), "capacity (estimate)"),
                                  ("btl_bw", dict(color="tab:brown", ls="--", lw=1.0), "bottleneck bw estimate"),
                                  ("pacing", dict(color="tab:purple", ls=":", lw=1.8), "pacing (all lanes)")):
            pts = tr[key]
            if pts:
                px, py = zip(*pts)
                ax2.step(px, py, where="post", label=label, **style)
        for value, label in tr["limits"]:
            ax2.axhline(value, color="tab:gray", ls="-.", lw=1.2, label=label)
        ax2.set_xlim(0, xs[-1])
        ax2.set_ylim(bottom=0)
    ax2.set_xlabel("s since test start")
    ax2.set_ylabel("Gbit/s (handed to TCP)")
    ax2.set_title("lane throughput (stacked), link capacity and pacing", fontsize=10)
    ax2.grid(True, alpha=0.3)
    ax2.legend(loc="upper right", fontsize=8, ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
