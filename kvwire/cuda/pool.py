"""A bounded pool of reusable host buffers, pinned when a GPU is there to pin them for.

Owns: size classes, free lists, the byte bound (buffers in use plus buffers cached never exceed
``capacity``), eviction of cached buffers to make room, ``PoolExhausted`` (at once, or after a bounded
blocking wait), and the backends that allocate: ``torch`` (``pin_memory=True`` when CUDA is available),
``cupy`` (``cupyx.empty_pinned``) and ``numpy`` (plain, unpinned). Must not know: sockets, layouts,
streams. torch, cupy and numpy are imported only by the backend that uses them.

Allocating pinned memory is slow (it maps and locks pages) and limited, which is why buffers are kept
and reused rather than freed: ``release()`` returns a buffer to its class's free list.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from .._args import check_int, check_wait
from ..errors import PoolExhausted

BACKENDS = ("auto", "torch", "cupy", "numpy")

#: size classes per power of two (8: a buffer wastes at most 12.5 % of its bytes)
STEPS_PER_OCTAVE = 8


def size_class(nbytes: int, min_class: int = 4096) -> int:
    """The bytes a request for ``nbytes`` occupies: ``min_class``, or the next of 8 steps per octave."""
    if nbytes < 0:
        raise ValueError("nbytes must be >= 0")
    if nbytes <= min_class:
        return min_class
    octave = 1 << ((nbytes - 1).bit_length() - 1)  # largest power of two below nbytes
    step = max(octave // STEPS_PER_OCTAVE, 1)
    return -(-nbytes // step) * step


def _torch_cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def _resolve_backend(backend: str, pin: bool | None) -> tuple[str, bool]:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        try:
            import torch  # noqa: F401

            backend = "torch"
        except ImportError:
            try:
                import cupyx  # noqa: F401

                backend = "cupy"
            except ImportError:
                backend = "numpy"
    if backend == "torch":
        try:
            import torch  # noqa: F401
        except ImportError:
            raise ImportError("PinnedPool(backend='torch') needs torch") from None
        cuda = _torch_cuda()
        if pin and not cuda:
            raise ValueError("pin=True needs CUDA (torch.cuda.is_available() is False)")
        return backend, cuda if pin is None else pin
    if backend == "cupy":
        try:
            import cupyx  # noqa: F401
        except ImportError:
            raise ImportError("PinnedPool(backend='cupy') needs cupy") from None
        if pin is False:
            raise ValueError("the cupy backend always pins")
        return backend, True
    if pin:
        raise ValueError("the numpy backend cannot pin; use backend='torch' or 'cupy'")
    return backend, False


def _allocator(backend: str, pin: bool) -> Callable[[int], Any]:
    if backend == "torch":
        import torch

        return lambda n: torch.empty(n, dtype=torch.uint8, pin_memory=pin)
    if backend == "cupy":
        import cupyx
        import numpy

        return lambda n: cupyx.empty_pinned((n,), dtype=numpy.uint8)
    import numpy

    return lambda n: numpy.empty(n, dtype=numpy.uint8)


class PooledBuffer:
    """``nbytes`` bytes of a pooled allocation. ``release()`` (or leaving a ``with``) gives it back.

    ``raw`` is the backend object of the whole size class (a torch uint8 tensor or a numpy array);
    ``tensor()``, ``array()`` and ``memoryview()`` are zero-copy views of the first ``nbytes``.
    """

    __slots__ = ("pool", "raw", "nbytes", "capacity", "_released")

    def __init__(self, pool: PinnedPool, raw: Any, nbytes: int, capacity: int) -> None:
        self.pool = pool
        self.raw = raw
        self.nbytes = nbytes
        self.capacity = capacity
        self._released = False

    @property
    def released(self) -> bool:
        return self._released

    @property
    def pinned(self) -> bool:
        return self.pool.pinned

    def _check(self) -> None:
        if self._released:
            raise ValueError("buffer was released to its pool")

    def tensor(self) -> Any:
        """A torch uint8 tensor over the buffer (shares memory; needs torch)."""
        self._check()
        import torch

        raw = self.raw if isinstance(self.raw, torch.Tensor) else torch.from_numpy(self.raw)
        return raw[: self.nbytes]

    def array(self) -> Any:
        """A numpy uint8 array over the buffer (shares memory)."""
        self._check()
        raw = self.raw
        if type(raw).__module__.startswith("torch"):
            raw = raw.numpy()
        return raw[: self.nbytes]

    def memoryview(self) -> memoryview:
        return memoryview(self.array()).cast("B")

    def data_ptr(self) -> int:
        self._check()
        if type(self.raw).__module__.startswith("torch"):
            return int(self.raw.data_ptr())
        return int(self.raw.ctypes.data)

    def release(self) -> None:
        """Give the buffer back (idempotent). Views taken from it must no longer be used."""
        if not self._released:
            self._released = True
            self.pool.give_back(self)

    def __enter__(self) -> PooledBuffer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __repr__(self) -> str:
        state = "released" if self._released else "held"
        return f"PooledBuffer({self.nbytes} of {self.capacity} bytes, {state})"


class PinnedPool:
    """Reusable host buffers bounded by ``capacity`` bytes (in use plus cached).

    ``backend``: ``auto`` (torch if importable, else cupy, else numpy), ``torch``, ``cupy`` or ``numpy``.
    ``pin``: ``None`` pins whenever the backend can (torch with CUDA, cupy); ``False`` never pins
    (CPU-only runs, tests). ``acquire`` raises ``PoolExhausted`` when the bytes in use leave no room,
    at once or, with ``block=True``, after waiting up to ``timeout`` seconds for releases.
    """

    def __init__(self, capacity: int, *, backend: str = "auto", pin: bool | None = None,
                 min_class: int = 4096) -> None:
        self.capacity = check_int("capacity", capacity, 1)  # (a NaN bound would refuse every buffer)
        self.min_class = check_int("min_class", min_class, 1)
        self.backend, self.pinned = _resolve_backend(backend, pin)
        self._alloc = _allocator(self.backend, self.pinned)
        self._cond = threading.Condition()
        self._free: dict[int, list[Any]] = {}
        self._in_use = 0  # bytes (class sizes) held by callers
        self._cached = 0  # bytes (class sizes) on free lists
        self._reserved = 0  # bytes being allocated right now (outside the lock)
        self._held = 0  # buffers held by callers
        self._closed = False
        self.hits = 0
        self.allocations = 0
        self.evictions = 0

    # ------------------------------------------------------------ stats
    @property
    def in_use_bytes(self) -> int:
        return self._in_use

    @property
    def cached_bytes(self) -> int:
        return self._cached

    @property
    def allocated_bytes(self) -> int:
        """Bytes the pool holds from the allocator (in use + cached + being allocated)."""
        return self._in_use + self._cached + self._reserved

    @property
    def buffers_in_use(self) -> int:
        return self._held

    def stats(self) -> dict[str, Any]:
        with self._cond:
            return {"backend": self.backend, "pinned": self.pinned, "capacity": self.capacity,
                    "in_use_bytes": self._in_use, "cached_bytes": self._cached, "buffers_in_use": self._held,
                    "hits": self.hits, "allocations": self.allocations, "evictions": self.evictions}

    # ------------------------------------------------------------ acquire / release
    def acquire(self, nbytes: int, *, block: bool = False, timeout: float | None = None) -> PooledBuffer:
        """A buffer of at least ``nbytes`` (views cover exactly ``nbytes``).

        Raises ``PoolExhausted`` if ``nbytes`` can never fit, or if no room frees up (at once when
        ``block`` is False, else within ``timeout`` seconds; ``timeout=None`` waits indefinitely).
        ``nbytes`` is an int >= 0 and ``timeout`` a finite number of seconds >= 0 or ``None``, else
        ``TypeError``/``ValueError`` (infinity too: ``None`` is the wait without a deadline).
        """
        nbytes = check_int("nbytes", nbytes, 0)
        timeout = None if timeout is None else check_wait("timeout", timeout, none_ok=True)
        size = size_class(nbytes, self.min_class)
        if size > self.capacity:
            raise PoolExhausted(f"a {nbytes}-byte buffer (size class {size}) exceeds the pool's capacity "
                                f"of {self.capacity} bytes")
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while True:
                if self._closed:
                    raise PoolExhausted("pool is closed")
                cls = self._cached_class(size)
                if cls:
                    raw = self._free[cls].pop()
                    self._cached -= cls
                    self._in_use += cls
                    self._held += 1
                    self.hits += 1
                    return PooledBuffer(self, raw, nbytes, cls)
                if self._in_use + self._reserved + size <= self.capacity:
                    self._evict_for(size)
                    self._reserved += size
                    break
                if not block:
                    raise PoolExhausted(self._exhausted_msg(nbytes, size))
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise PoolExhausted(self._exhausted_msg(nbytes, size) + f" after waiting {timeout}s")
                self._cond.wait(left)
        try:
            raw = self._alloc(size)  # slow for pinned memory: outside the lock
        except Exception as e:  # noqa: BLE001 - the allocator's own out-of-memory error, typed here
            with self._cond:
                self._reserved -= size
                self._cond.notify_all()
            kind = "pinned " if self.pinned else ""
            raise PoolExhausted(f"allocating {size} {kind}bytes failed: {e}") from e
        with self._cond:
            self._reserved -= size
            self._in_use += size
            self._held += 1
            self.allocations += 1
        return PooledBuffer(self, raw, nbytes, size)

    def _exhausted_msg(self, nbytes: int, size: int) -> str:
        return (f"pinned pool exhausted: a {nbytes}-byte buffer (size class {size}) does not fit; "
                f"{self._in_use} of {self.capacity} bytes are in use by {self._held} buffers")

    def _cached_class(self, size: int) -> int:
        """A cached class to reuse: ``size`` itself, else the smallest cached one up to twice as large
        (requests vary in length; reusing pinned memory beats allocating more). 0: none. Lock held."""
        if self._free.get(size):
            return size
        fits = [c for c, lst in self._free.items() if lst and size < c <= 2 * size]
        return min(fits) if fits else 0

    def _evict_for(self, size: int) -> None:
        """Drop cached buffers (largest classes first) until ``size`` more bytes fit. Lock held."""
        while self._in_use + self._cached + self._reserved + size > self.capacity and self._cached:
            cls = max(c for c, lst in self._free.items() if lst)
            self._free[cls].pop()
            self._cached -= cls
            self.evictions += 1

    def give_back(self, buf: PooledBuffer) -> None:
        """``buf``'s size class back on the free list (``PooledBuffer.release`` calls this, once)."""
        with self._cond:
            self._in_use -= buf.capacity
            self._held -= 1
            if not self._closed:
                self._free.setdefault(buf.capacity, []).append(buf.raw)
                self._cached += buf.capacity
            self._cond.notify_all()
        buf.raw = None

    def trim(self) -> int:
        """Free every cached buffer; returns the bytes freed."""
        with self._cond:
            freed = self._cached
            self._free.clear()
            self._cached = 0
            return freed

    def close(self) -> None:
        """Free cached buffers and refuse new acquires; held buffers are freed as they are released."""
        with self._cond:
            self._closed = True
            self._free.clear()
            self._cached = 0
            self._cond.notify_all()

    def __enter__(self) -> PinnedPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"PinnedPool({self.backend}, pinned={self.pinned}, {self._in_use}/{self.capacity} bytes "
                f"in use, {self._cached} cached)")
