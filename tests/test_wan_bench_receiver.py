"""benchmarks/wan_bench.py's receiver: its buffers come from a pool touched at start (``--rx-pool-mb``).

A fresh buffer's pages are faulted in (and zeroed) by the lanes' recv calls during the transfer: on the
2-core WAN benchmark that took about a quarter of the machine's CPU in the fat row and slowed the link
emulator and both ends with it. Checked here by the receiver's resident memory over one loopback
transfer: with the pool it stays put, with fresh buffers (``--rx-pool-mb 0``, the negative control) it
grows by the transfer's size.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

import kvwire

ROOT = Path(__file__).resolve().parent.parent
PRESET = "qwen3-next-80b-a3b"
TOKENS = 1024  # about 27 MB


def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def _rss_growth_over_one_transfer(pool_mb: int) -> tuple[int, int]:
    """(bytes the receiver's RSS grew by over one transfer, the transfer's bytes)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    rx = subprocess.Popen([sys.executable, str(ROOT / "benchmarks" / "wan_bench.py"), "--receiver", "--bind",
                           "127.0.0.1", "--rx-pool-mb", str(pool_mb)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert rx.stdout is not None
        port = int(json.loads(rx.stdout.readline())["port"])
        layout = kvwire.load_layout(PRESET)
        spec = kvwire.RequestSpec("r", TOKENS, TOKENS)
        segs = kvwire.plan_segments(layout, spec)
        buffers = [np.full(sg.nbytes, i % 251 + 1, np.uint8) for i, sg in enumerate(segs)]
        nbytes = sum(sg.nbytes for sg in segs)
        before = _rss(rx.pid)
        with kvwire.connect("127.0.0.1", port, link_control=False) as s:
            out = s.send(layout, spec, timeout=60)
            out.write_all(buffers)
            out.finish().result(60)
            assert json.loads(rx.stdout.readline()) == {"done": "r"}
        return _rss(rx.pid) - before, nbytes
    finally:
        rx.terminate()
        rx.wait(10)


def test_pooled_receiver_buffers_are_resident_before_the_transfer() -> None:
    grown, nbytes = _rss_growth_over_one_transfer(64)
    assert nbytes > 16 << 20
    assert grown < nbytes // 4, f"RSS grew {grown} B over a {nbytes} B transfer into the pool"


def test_fresh_receiver_buffers_fault_in_during_the_transfer() -> None:  # the negative control
    grown, nbytes = _rss_growth_over_one_transfer(0)
    assert grown > nbytes * 3 // 4, f"RSS grew only {grown} B over a {nbytes} B transfer into a fresh buffer"
