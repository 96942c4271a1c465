"""``--decode-tp``: heterogeneous TP on loopback, in this process: ``--tp`` prefill ranks send one request to
``--decode-tp`` decode ranks through ``kvwire.reshard``, and then the same request between ranks of equal TP
(``--decode-tp`` on both sides), so each decode rank's bytes on the wire are printed beside the same-TP case.

Owns: the two runs (one ``Receiver`` per decode rank, one ``Session`` per prefill/decode pair, ``--lanes``
lanes each), their payloads (seeded random bytes per prefill rank), checking every decode rank's bytes
against the plan applied locally, and the table / JSON document. Must not know: the wire or the plan's
arithmetic (``codec.reshard`` owns it).
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from ..buffers import byte_view
from ..codec.layout import RequestSpec, plan_segments
from ..codec.reshard import ReshardPlan, plan_reshard
from ..errors import KvwireError
from ..reshard import ReshardReceiver, ReshardSender, gather, scatter
from ..tcp import Receiver, connect
from .errors import EXIT_FAILED, EXIT_OK, BenchError
from .options import Options
from .payload import load_model


def _run(plan: ReshardPlan, request: RequestSpec, o: Options) -> dict[str, Any]:
    rng = np.random.default_rng(o.seed)
    prefill = [[rng.integers(0, 256, s.nbytes, dtype=np.uint8) for s in plan_segments(plan.prefill, request)]
               for _ in range(plan.prefill_tp)]
    dest = [[np.zeros(s.nbytes, np.uint8) for s in plan_segments(plan.decode, request)]
            for _ in range(plan.decode_tp)]
    own = plan_segments(plan.prefill, request)
    with contextlib.ExitStack() as stack:
        rxs = [stack.enter_context(Receiver(key=o.key or None)) for _ in range(plan.decode_tp)]
        sessions = {p: {d: stack.enter_context(connect(*rxs[d].address, key=o.key or None, lanes=o.lanes,
                                                       chunk_size=o.chunk_size, hashing=o.hashing))
                        for d in plan.targets(p)} for p in range(plan.prefill_tp)}
        t0 = time.perf_counter()
        incoming = [ReshardReceiver(plan, d, rxs[d]).expect(request, dest[d], timeout=o.timeout)
                    for d in range(plan.decode_tp)]
        outgoing = [ReshardSender(plan, p, sessions[p]).send(request, timeout=o.timeout)
                    for p in range(plan.prefill_tp)]
        for layer in range(plan.decode.num_layers):
            for p, out in enumerate(outgoing):
                out.write_layer(layer, [prefill[p][s.index] for s in own if s.layer == layer])
        for out in outgoing:
            out.finish()
        done = []
        for h in incoming:
            h.result(o.timeout)
            done.append(time.perf_counter() - t0)
        for out in outgoing:
            out.result(o.timeout)
        received = [h.bytes_received() for h in incoming]
    ranks = []
    for d in range(plan.decode_tp):
        expected = [np.zeros(s.nbytes, np.uint8) for s in plan_segments(plan.decode, request)]
        for p in plan.sources(d):
            for c in plan.copies(p, d, request):
                scatter(byte_view(expected[c.dst_segment], writable=True), c,
                        gather(byte_view(prefill[p][c.src_segment]), c))
        ok = all(a.tobytes() == b.tobytes() for a, b in zip(dest[d], expected))
        ranks.append({"rank": d, "needed_bytes": plan.needed_bytes(d, request),
                      "wire_bytes": sum(received[d].values()), "from": {str(p): n for p, n in received[d].items()},
                      "whole_cache_bytes": sum(s.nbytes for s in own) * len(plan.sources(d)),
                      "seconds": round(done[d], 4), "verified": ok})
    return {"prefill_tp": plan.prefill_tp, "decode_tp": plan.decode_tp, "ranks": ranks}


def run_reshard_bench(o: Options, log: Callable[[str], None] = print) -> int:
    """Both runs, one table (or ``-J``: one JSON document). Exit 0 only if every decode rank verified."""
    if o.model is None or o.decode_tp is None:
        raise BenchError("--decode-tp needs --model")
    try:
        pre, dec = load_model(o.model, tp_size=o.tp), load_model(o.model, tp_size=o.decode_tp)
        plan = plan_reshard(pre, dec)
        same = plan_reshard(dec, dec)
    except KvwireError as e:
        raise BenchError(f"cannot reshard {o.model} from tp {o.tp} to tp {o.decode_tp}: {e}") from None
    request = RequestSpec("bench-reshard", o.tokens, o.tokens)
    if not o.json:
        log(plan.summary(request))
    runs = {"reshard": _run(plan, request, o), "same_tp": _run(same, request, o)}
    ok = all(r["verified"] for run in runs.values() for r in run["ranks"])
    doc = {"model": o.model, "tokens": o.tokens, "lanes": o.lanes, **runs, "verified": ok}
    if o.json:
        log(json.dumps(doc, indent=2))
        return EXIT_OK if ok else EXIT_FAILED
    a, b = o.tp, o.decode_tp
    log(f"{'decode rank':>11} {'needed B':>14} {f'wire B tp{a}->{b}':>16} {f'wire B tp{b}->{b}':>16} "
        f"{'ratio':>6} {'whole-cache B':>15} {'sources':>10} {'s':>7}  ok")
    for r, s in zip(runs["reshard"]["ranks"], runs["same_tp"]["ranks"]):
        log(f"{r['rank']:>11} {r['needed_bytes']:>14,} {r['wire_bytes']:>16,} {s['wire_bytes']:>16,} "
            f"{r['wire_bytes'] / max(1, s['wire_bytes']):>6.3f} {r['whole_cache_bytes']:>15,} "
            f"{','.join(r['from']):>10} {r['seconds']:>7.3f}  {'yes' if r['verified'] and s['verified'] else 'NO'}")
    log("wire B: payload bytes received (kvwire per-lane counters); whole-cache B: what sending each source "
        "rank's whole cache and slicing at the decode side would move")
    return EXIT_OK if ok else EXIT_FAILED
