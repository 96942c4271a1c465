"""A kvwire peer in its own process, so tests can kill it (SIGKILL) or freeze it (SIGSTOP).

    peer_proc.py receiver [PORT]     -> prints its port, receives anything into fresh buffers
    peer_proc.py sender PORT LAYERS  -> connects, starts a transfer of tiny-qwen3-next with only
                                        LAYERS layers written, prints 'ready', then waits
"""

from __future__ import annotations

import sys
import time

import numpy as np

from kvwire import Receiver, connect
from kvwire.codec.layout import plan_segments
from kvwire.testing.fixtures import default_request, load_fixture


def main() -> None:
    if sys.argv[1] == "receiver":
        port = int(sys.argv[2]) if len(sys.argv) > 2 else 0
        rx = Receiver("127.0.0.1", port, allocator=lambda m: np.zeros(m.total_bytes, np.uint8), peer_timeout=60)
        print(rx.address[1], flush=True)
        time.sleep(3600)
    else:
        port, layers = int(sys.argv[2]), int(sys.argv[3])
        layout = load_fixture("tiny-qwen3-next")
        req = default_request("frozen")
        s = connect("127.0.0.1", port, lanes=2, peer_timeout=60)
        h = s.send(layout, req)
        segs = plan_segments(layout, req)
        for layer in range(layers):
            h.write_layer(layer, [np.ones(x.nbytes, np.uint8) for x in segs if x.layer == layer])
        print("ready", flush=True)
        time.sleep(3600)


if __name__ == "__main__":
    main()
