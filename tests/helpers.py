"""Shared test helpers: resource counting, payloads, and peer processes for kill/silence tests."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable

import numpy as np

from kvwire.codec.layout import ModelLayout, RequestSpec, plan_segments


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def kvwire_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("kvwire")]


def wait_until(cond: Callable[[], bool], timeout: float = 10.0, step: float = 0.02) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(step)
    return cond()


def payload(layout: ModelLayout, request: RequestSpec, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, s.nbytes, dtype=np.uint8) for s in plan_segments(layout, request)]


def peer(*args: str) -> subprocess.Popen[str]:
    """Start tests/peer_proc.py; its first stdout line is the port (receiver) or 'ready' (sender)."""
    here = os.path.dirname(__file__)
    return subprocess.Popen([sys.executable, os.path.join(here, "peer_proc.py"), *args],
                            stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
