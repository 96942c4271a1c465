"""The collapse regression on an emulated link: a default session (its own LinkControl) moving caches back to
back while the link is starved to 2 % for 3 s (what a CPU-starved emulator did in the issue), then restored.
Goodput must be back to >= 80 % of the link within 5 s of the fault ending.

Needs root, iproute2 and iptables (skips with the reason otherwise). 100 Mbit/s, 20 ms: light enough for the
emulator on a loaded 2-core machine (``realtime``).
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

import kvwire
from kvwire.testing.recording import record
from kvwire.testing.wan import WanLink, unavailable_reason

_REASON = unavailable_reason()
pytestmark = [pytest.mark.netns, pytest.mark.skipif(_REASON is not None, reason=_REASON or "")]

RATE_MBIT, RTT_MS = 100.0, 20.0
PAYLOAD_RATE = RATE_MBIT * 1e6 / 8 * 1448 / 1500


def test_a_starved_link_then_restored_is_used_again_within_5_s() -> None:
    layout = kvwire.load_layout("qwen3-next-80b-a3b")
    req = kvwire.RequestSpec("size", 1024, 1024)
    bufs = [np.full(s.nbytes, 3, np.uint8) for s in kvwire.plan_segments(layout, req)]
    marks: dict[str, float] = {}
    with WanLink(rtt_ms=RTT_MS, rate_mbit=RATE_MBIT, realtime=True, seed=21) as link:
        with link.inside("server"):
            rx = kvwire.Receiver(link.server_addr, 0, allocator=lambda m: np.zeros(m.total_bytes, np.uint8))
        try:
            with link.inside("client"):
                s = kvwire.connect(link.server_addr, rx.address[1], lanes=4)
            ctl = s.link_control
            assert ctl is not None
            recording = record(ctl)

            def fault() -> None:
                time.sleep(4.0)
                link.set_rate(RATE_MBIT * 0.02)
                marks["fault"] = time.monotonic()
                time.sleep(3.0)
                link.set_rate(RATE_MBIT)
                marks["end"] = time.monotonic()

            th = threading.Thread(target=fault)
            try:
                with link.inside("client"):  # the controller's thread (it may open lanes) starts in there
                    t0 = time.monotonic()
                    th.start()
                    n = 0
                    while time.monotonic() - t0 < 14.0:
                        h = s.send(layout, kvwire.RequestSpec(f"r{n}", 1024, 1024), timeout=60)
                        h.write_all(bufs)
                        h.finish().result(60)
                        n += 1
            finally:
                th.join()
                s.close()
        finally:
            rx.close()
    states = recording
    during = [x.capacity for x in states if marks["fault"] + 1.0 < x.timestamp <= marks["end"] and x.capacity]
    assert during and min(during) < 0.5 * PAYLOAD_RATE, "the fault was seen (the estimate followed it down)"
    back = next((x.timestamp - marks["end"] for x in states
                 if x.timestamp > marks["end"] + 0.5 and x.goodput >= 0.8 * PAYLOAD_RATE), None)
    trace = [(round(t - marks["end"], 2), d.mode.value, round((d.total_pacing or 0) * 8e-6, 1), d.reason[:50])
             for t, d in ctl.history if t > marks["fault"]]
    goodput = [(round(x.timestamp - marks["end"], 1), round(x.goodput * 8e-6)) for x in states
               if x.timestamp > marks["end"]][::5]
    assert back is not None and back <= 5.0, "\n".join(map(str, [back, *trace, goodput]))
