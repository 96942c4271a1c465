"""The served PrfaaS model on this machine: prefill, chunking cost, streaming overlap, decode, prefix move.

For the deployment's default model (``kvwire.prfaas.config.ModelSpec()``, one torch thread) and prompt lengths
128..4096 it prints, side by side:

* prefill in one forward, in two (split at the checkpoint, ratio to one) and in the block-aligned chunks the
  nodes use (ratio to one): the price of history-independent arithmetic (a prefill from any block-aligned
  checkpoint computes bit-identically to one from scratch, so tokens match exactly);
* the streamed prefill to a loopback kvwire receiver: forward time, exposed tail (last layer verified at the
  receiver after the forward returned), bytes;
* a prefix move of the block-aligned checkpoint (KV + linear states) over loopback kvwire: bytes and seconds;
  then prefill of the rest from it vs prefill from scratch (what a hit saves);
* greedy decode time per token from the received cache.

Run: ``python benchmarks/prfaas_node_bench.py [--lengths 128 512 2048] [--repeat 3]``.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from collections.abc import Callable
from typing import Any

import kvwire
from kvwire.prfaas.config import CacheConfig, ModelSpec
from kvwire.prfaas.runner import TransformersRunner


def best(fn: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


_ids = iter(range(1 << 62))


def prefill_from(r: TransformersRunner, rx: kvwire.Receiver, s: kvwire.Session, ids: list[int], start: Any) -> None:
    rid = f"from-ckpt-{next(_ids)}"
    inc = r.expect(rx, rid, ids, timeout=60)
    r.prefill(ids, s, rid, start=start).transfer.result(60)
    inc.handle.result(60)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[128, 512, 1024, 2048, 4096])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--decode-steps", type=int, default=32)
    ap.add_argument("--block-size", type=int, default=CacheConfig().block_size)
    args = ap.parse_args()
    r = TransformersRunner(ModelSpec(), args.block_size)
    rx = kvwire.Receiver("127.0.0.1", 0, key=b"bench", peer_timeout=10)
    s = kvwire.connect("127.0.0.1", rx.address[1], key=b"bench", lanes=2)
    n_params = sum(p.numel() for p in r.model.parameters())
    print(f"model: qwen3_next {n_params / 1e6:.1f}M params, {len(r.layout.layers)} layers "
          f"(kv layers {[i for i, k in enumerate(r.kv_layers) if k]}), block {r.block_size}, 1 torch thread")
    print(f"{'N':>5} {'1-pass s':>9} {'2-chunk':>7} {'chunked s':>9} {'ratio':>6} {'stream s':>9} {'tail ms':>8} "
          f"{'MB':>6} {'ckpt':>5} {'move ms':>8} {'move MB':>8} {'rest s':>7} {'saved':>6} {'decode ms/tok':>13}")
    rng = random.Random(0)
    seq = 0
    for n in args.lengths:
        ids = [rng.randrange(r.vocab_size) for _ in range(n)]

        head = ids[:-1]
        floor = (n - 1) // r.block_size * r.block_size
        t_one = best(lambda h=head: r.forward_tokens(h), args.repeat)
        t_two = best(lambda h=head, f=floor: r.forward_tokens(h, split_at=[f]), args.repeat)
        t_chunk = best(lambda h=head: r.forward_tokens(h, chunked=True), args.repeat)
        tails, fwd = [], []
        res = None
        inc = None
        for _ in range(args.repeat):
            seq += 1
            inc = r.expect(rx, f"s{seq}", ids, timeout=60)
            t0 = time.monotonic()
            res = r.prefill(ids, s, f"s{seq}")
            t1 = time.monotonic()
            res.transfer.result(60)
            inc.handle.result(60)
            fwd.append(t1 - t0)
            tails.append(time.monotonic() - t1)
        assert res is not None and inc is not None
        t0 = time.perf_counter()
        toks = list(r.decode(inc, args.decode_steps))
        per_tok = (time.perf_counter() - t0) / len(toks)
        ck = res.checkpoint
        move_ms = move_mb = rest = saved = float("nan")
        if ck is not None:
            seq += 1
            t0 = time.perf_counter()
            handle, moved = r.expect_checkpoint(rx, f"m{seq}", ids, ck.length, timeout=60)
            r.send_checkpoint(ck, s, f"m{seq}").result(60)
            handle.result(60)
            move_ms, move_mb = (time.perf_counter() - t0) * 1e3, ck.nbytes / 1e6

            rest = best(lambda i=ids, m=moved: prefill_from(r, rx, s, i, m), args.repeat)
            saved = 1 - rest / statistics.median(fwd)
        print(f"{n:5d} {t_one:9.3f} {t_two / t_one:7.2f} {t_chunk:9.3f} {t_chunk / t_one:6.2f} "
              f"{statistics.median(fwd):9.3f} {statistics.median(tails) * 1e3:8.2f} "
              f"{res.nbytes / 1e6:6.2f} {ck.length if ck else 0:5d} "
              f"{move_ms:8.2f} {move_mb:8.2f} {rest:7.3f} {saved:6.0%} {per_tok * 1e3:13.2f}")
    s.close()
    rx.close()


if __name__ == "__main__":
    main()
