"""Decode side: receive hybrid caches layer by layer and verify their content.

    python examples/decode_receiver.py --model qwen3-next-80b-a3b --port 7400 --key s3cret

Runs until interrupted (Ctrl-C, or --count transfers). It takes requests of any token count: each
transfer lands in a fresh buffer of its size from the allocator; per-layer arrival times are printed
as layers are verified, then the content is compared with the deterministic fill the sender used
(examples/prefill_sender.py).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

import kvwire
from kvwire.codec.compat import check_compatible
from kvwire.testing.fixtures import fixture_payload


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=7400)
    ap.add_argument("--key", default=None, help="pre-shared key (both sides)")
    ap.add_argument("--model", default="qwen3-next-80b-a3b", help="preset name or config.json path")
    ap.add_argument("--count", type=int, default=0, help="stop after this many transfers (0: forever)")
    args = ap.parse_args()
    layout = kvwire.load_layout(args.model)
    rx = kvwire.Receiver(args.host, args.port, key=args.key,
                         allocator=lambda m: np.empty(m.total_bytes, np.uint8))
    host = f"[{rx.address[0]}]" if ":" in rx.address[0] else rx.address[0]  # IPv6 bracketed
    print(f"listening on {host}:{rx.address[1]} for {layout.name}", flush=True)
    done = 0
    try:
        while not args.count or done < args.count:
            try:
                h = rx.next_transfer(timeout=1.0)
            except TimeoutError:
                continue
            t0 = h.started
            for layer in h.layers(timeout=120):
                print(f"  {h.request_id}: layer {layer:3d} verified at +{(h.layer_times[layer] - t0) * 1e3:8.1f} ms")
            h.result(timeout=120)
            dt = time.monotonic() - t0
            assert h.manifest is not None
            check_compatible(h.manifest.layout or layout, layout)
            expect = np.concatenate([a.view(np.uint8).ravel() for a in fixture_payload(layout, h.manifest.request)])
            ok = bool(np.array_equal(expect, h.dest))
            mb = h.manifest.total_bytes / 1e6
            print(f"{h.request_id}: {mb:.1f} MB in {dt * 1e3:.0f} ms ({mb / 1e3 / dt:.2f} GB/s), "
                  f"content {'verified' if ok else 'MISMATCH'}", flush=True)
            done += 1
    except KeyboardInterrupt:
        pass
    finally:
        rx.close()


if __name__ == "__main__":
    main()
