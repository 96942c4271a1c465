"""A node's checkpoint store: prefix checkpoints kept least-recently-used first out, bounded in bytes.

Owns: which checkpoints a node holds and the lookups the hybrid prefix rule allows:
- ``exact(prompt, length)``: a full checkpoint (KV and linear states) of exactly ``prompt[:length]``; only
  these restart a prefill (a linear state exists only where it was taken);
- ``kv_prefix(prompt, length)``: the attention KV of ``prompt[:length]`` from any entry, full or KV-only, whose
  first ``length / block_size`` block keys match (KV is reusable at block granularity), as a view of the entry.
Thread-safe. Must not know: models, transfers, HTTP.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from .prefix import block_keys
from .runner import Checkpoint

__all__ = ["CheckpointStore"]


@dataclass
class _Entry:
    checkpoint: Checkpoint
    keys: list[str]  # block keys of the checkpointed prefix, one per block


class CheckpointStore:
    def __init__(self, block_size: int, max_bytes: int) -> None:
        self.block_size, self.max_bytes = block_size, max_bytes
        self._lock = threading.Lock()
        self._entries: OrderedDict[str, _Entry] = OrderedDict()  # key -> entry, least recently used first
        self._bytes = 0
        self.evicted = 0

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    @property
    def nbytes(self) -> int:
        with self._lock:
            return self._bytes

    def put(self, checkpoint: Checkpoint, prompt: Sequence[int]) -> bool:
        """Keep ``checkpoint`` of ``prompt[:checkpoint.length]`` (a full one replaces a KV-only one of the same
        key, never the other way). False when it alone exceeds the bound. Evicts LRU entries to fit."""
        size = checkpoint.nbytes
        if size > self.max_bytes:
            return False
        keys = block_keys(prompt[:checkpoint.length], self.block_size)
        if not keys or keys[-1] != checkpoint.key:
            raise ValueError("the checkpoint's key does not match the prompt's prefix")
        with self._lock:
            old = self._entries.get(checkpoint.key)
            if old is not None:
                if old.checkpoint.has_state or not checkpoint.has_state:
                    self._entries.move_to_end(checkpoint.key)
                    return True
                self._bytes -= old.checkpoint.nbytes
                del self._entries[checkpoint.key]
            self._entries[checkpoint.key] = _Entry(checkpoint, keys)
            self._bytes += size
            while self._bytes > self.max_bytes:
                _, gone = self._entries.popitem(last=False)
                self._bytes -= gone.checkpoint.nbytes
                self.evicted += 1
        return True

    def exact(self, prompt: Sequence[int], length: int) -> Checkpoint | None:
        """The full checkpoint of exactly ``prompt[:length]``, or None."""
        if length < self.block_size or length % self.block_size or length > len(prompt):
            return None
        key = block_keys(prompt[:length], self.block_size)[-1]
        with self._lock:
            e = self._entries.get(key)
            if e is None or not e.checkpoint.has_state or e.checkpoint.length != length:
                return None
            self._entries.move_to_end(key)
            return e.checkpoint

    def kv_prefix(self, prompt: Sequence[int], length: int) -> Checkpoint | None:
        """A KV-only checkpoint of ``prompt[:length]`` cut from any held entry that covers it, or None."""
        if length < self.block_size or length % self.block_size or length > len(prompt):
            return None
        nblocks = length // self.block_size
        key = block_keys(prompt[:length], self.block_size)[-1]
        with self._lock:
            for k in reversed(self._entries):  # most recently used first
                e = self._entries[k]
                if len(e.keys) >= nblocks and e.keys[nblocks - 1] == key:
                    self._entries.move_to_end(k)
                    return e.checkpoint.kv_prefix(key, length)
        return None

    def listing(self) -> list[dict[str, object]]:
        """``[{"key", "length", "state"}]``: what the node reports for the prefix index (``state`` False: KV only)."""
        with self._lock:
            return [{"key": k, "length": e.checkpoint.length, "state": e.checkpoint.has_state}
                    for k, e in self._entries.items()]

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0

