"""Prefill side: stream a hybrid cache to a decode receiver layer by layer, as prefill produces it.

    python examples/prefill_sender.py --host 127.0.0.1 --port 7400 --model qwen3-next-80b-a3b \
        --tokens 8192 --prefill-ms-per-layer 5 --lanes 4 --key s3cret
    python examples/prefill_sender.py --host 127.0.0.1 --port 7400 --key s3cret --tokens 8192 --wan  # far host

``--wan``: measure the link first (``kvwire.probe``: one second of discarded traffic), then let
``LinkControl`` pace the lanes just under that capacity from the first byte, and print the
``LinkState`` a scheduler would read after each request. Layers the receiver has verified are
reported as their acknowledgements arrive (the point where an engine can free that layer's staging).

The cache content is a deterministic fill (kvwire.testing.fixtures.fixture_payload) so the receiver can
check every byte independently of the transport's own hashing.
"""

from __future__ import annotations

import argparse
import time

import kvwire
from kvwire.congestion.control import LinkControl
from kvwire.probe import probe
from kvwire.testing.fixtures import fixture_payload


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=7400)
    ap.add_argument("--key", default=None)
    ap.add_argument("--model", default="qwen3-next-80b-a3b")
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--requests", type=int, default=1)
    ap.add_argument("--lanes", type=int, default=4)
    ap.add_argument("--prefill-ms-per-layer", type=float, default=0.0)
    ap.add_argument("--wan", action="store_true", help="probe the link, then pace under it (LinkControl)")
    args = ap.parse_args()
    layout = kvwire.load_layout(args.model)
    with kvwire.connect(args.host, args.port, lanes=args.lanes, key=args.key) as session:
        control = None
        if args.wan:
            p = probe(session, seconds=1.0)
            print(f"probe: capacity {p.capacity * 8e-9:.2f} Gbit/s ({'saturated' if p.saturated else 'lower bound'}), "
                  f"min RTT {(p.min_rtt or 0) * 1e3:.2f} ms, loss {p.loss_rate:.3%}", flush=True)
            control = LinkControl(session, capacity=p.capacity if p.saturated else None)
        for r in range(args.requests):
            req = kvwire.RequestSpec(f"req-{r}", args.tokens, args.tokens - 1)
            src = fixture_payload(layout, req)
            by_layer: dict[int, list[int]] = {}
            for s in kvwire.plan_segments(layout, req):
                by_layer.setdefault(s.layer, []).append(s.index)
            t0 = time.monotonic()
            out = session.send(layout, req)
            acked: list[float] = []

            def note(_layer: int, acked: list[float] = acked, t0: float = t0) -> None:
                acked.append(time.monotonic() - t0)  # here an engine would free the layer's staging

            out.on_layer_acked(note)
            for layer in range(layout.num_layers):
                if args.prefill_ms_per_layer:  # stand-in for the engine computing layer i
                    time.sleep(max(0.0, t0 + (layer + 1) * args.prefill_ms_per_layer / 1e3 - time.monotonic()))
                if layer in by_layer:
                    out.write_layer(layer, [src[i] for i in by_layer[layer]])
                    print(f"  layer {layer:3d} produced at +{(time.monotonic() - t0) * 1e3:8.1f} ms")
            out.finish().result(timeout=300)
            # layers_acked is complete once the transfer is; the note() callbacks run on the session's
            # callback pool and may still be queued when result() returns (the first one ran long ago)
            dt = time.monotonic() - t0
            mb = out.manifest.total_bytes / 1e6
            print(f"{req.request_id}: {mb:.1f} MB confirmed by the receiver in {dt * 1e3:.0f} ms "
                  f"({mb / 1e3 / dt:.2f} GB/s); {len(out.layers_acked)} layers acknowledged one by one, the first at "
                  f"+{(acked[0] if acked else 0) * 1e3:.1f} ms", flush=True)
            state = control.latest() if control is not None else None
            if control is not None and state is not None:
                print(f"  link: {control.decision.mode.value}, {control.decision.lanes} lanes, "
                      f"utilization {state.utilization or 0:.0%}, queueing x{state.queueing_ratio or 0:.2f}, "
                      f"available {(state.available_bw or 0) * 8e-9:.2f} Gbit/s, "
                      f"{'congested' if state.congested else 'clear'}", flush=True)
        if control is not None:
            control.close()


if __name__ == "__main__":
    main()
