"""A bounded pool of destination buffers for the bench server.

Owns: handing out flat uint8 numpy buffers of a requested size without ever holding more than
``cap_bytes``, reusing freed buffers (their pages stay faulted in) and pre-faulting them before a test.
Must not know: sockets, manifests or the transport; the server calls ``take`` from its allocator.
"""

from __future__ import annotations

import threading

import numpy as np

from ..errors import PoolExhausted
from .payload import alloc_flat


class Lease:
    """One buffer in use: ``view`` is exactly the requested size."""

    def __init__(self, buf: np.ndarray, size: int) -> None:
        self.buf = buf
        self.view = buf[:size]


class BufferPool:
    def __init__(self, cap_bytes: int) -> None:
        if cap_bytes <= 0:
            raise ValueError("pool capacity must be positive")
        self.cap_bytes = cap_bytes
        self._lock = threading.Lock()
        self._free: list[np.ndarray] = []
        self._held = 0  # bytes of every buffer the pool owns, free or leased
        self.peak_bytes = 0

    @property
    def held_bytes(self) -> int:
        with self._lock:
            return self._held

    def _alloc_locked(self, size: int, touch: bool) -> np.ndarray:
        need = -(-size // 8) * 8
        while self._held + need > self.cap_bytes and self._free:
            self._held -= self._free.pop(0).nbytes  # drop the oldest free buffer
        if self._held + need > self.cap_bytes:
            raise PoolExhausted(f"buffer pool full: {self._held} of {self.cap_bytes} bytes leased, "
                                f"{need} more requested (raise --pool-bytes)")
        buf = alloc_flat(size, touch)
        self._held += buf.nbytes
        self.peak_bytes = max(self.peak_bytes, self._held)
        return buf

    def take(self, size: int) -> Lease:
        """A buffer of at least ``size`` bytes (the smallest free one that fits, else a new one)."""
        with self._lock:
            fits = [b for b in self._free if b.nbytes >= size]
            if fits:
                buf = min(fits, key=lambda b: b.nbytes)
                self._free.remove(buf)
            else:
                buf = self._alloc_locked(size, touch=False)
        return Lease(buf, size)

    def give(self, lease: Lease) -> None:
        with self._lock:
            self._free.append(lease.buf)

    def prefault(self, size: int, count: int) -> int:
        """Make ``count`` free buffers of at least ``size`` bytes ready, pages faulted in. Returns how many
        were newly allocated. Raises PoolExhausted when they do not fit under the cap."""
        if size * count > self.cap_bytes:
            raise PoolExhausted(f"{count} buffers of {size} bytes exceed the pool's {self.cap_bytes} bytes "
                                "(raise --pool-bytes on the server)")
        with self._lock:
            ready = [b for b in self._free if b.nbytes >= size]
            fresh = 0
            # free buffers that do not fit are dropped first, so the new ones fit under the cap
            self._held -= sum(b.nbytes for b in self._free if b.nbytes < size)
            self._free = ready
            while len(self._free) < count:
                self._free.append(self._alloc_locked(size, touch=True))
                fresh += 1
        return fresh
