"""The global prefix index of a PrfaaS deployment: which node of which cluster holds a reusable prefix checkpoint.

Owns: block keys (a chained xxh3-128 hash per full block of token ids, so a key names the whole prefix up to its
block) and the per-cluster index the router looks prompts up in. The hybrid-model rule (paper §3.4): attention
KV is reusable at block granularity, but a linear layer's recurrent/conv state exists only at the exact length
a node checkpointed it, so a hit is always a checkpoint length (a multiple of ``block_size``) whose block keys
match the prompt, never a longer run of matching blocks with no state behind it. A hit also leaves at least
one prompt token to compute (prefill computes ``N - 1`` tokens, decode feeds the last one): its length is at
most ``len(prompt) - 1``.
Pure: no I/O, no clock, no threads. Must not know: nodes' addresses, transfers, or routing policy.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import xxhash

__all__ = ["Hit", "PrefixIndex", "block_keys"]


def block_keys(prompt: Sequence[int], block_size: int) -> list[str]:
    """One key per full block of ``prompt``: key ``k`` hashes block ``k``'s token ids chained onto key ``k-1``."""
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be an int >= 1, got {block_size!r}")
    tokens = np.asarray(prompt, dtype=np.int64)
    if tokens.ndim != 1:
        raise ValueError("prompt must be a flat sequence of token ids")
    keys: list[str] = []
    prev = b""
    for start in range(0, len(tokens) - block_size + 1, block_size):
        h = xxhash.xxh3_128(prev)
        h.update(tokens[start:start + block_size].astype("<i8").tobytes())
        prev = h.digest()
        keys.append(h.hexdigest())
    return keys


@dataclass(frozen=True)
class Hit:
    """A reusable checkpoint: ``node`` (in ``cluster``) holds the state after the prompt's first ``length`` tokens."""

    node: str
    cluster: str
    length: int


class PrefixIndex:
    """``add`` checkpoints as nodes report them, ``lookup(prompt)`` → the longest reusable hit per cluster.

    Ties (the same length on several nodes of a cluster) go to the node added first, so a lookup does not
    depend on set ordering.
    """

    def __init__(self, block_size: int) -> None:
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"block_size must be an int >= 1, got {block_size!r}")
        self.block_size = block_size
        # key -> {(node, cluster, length): insertion order}
        self._by_key: dict[str, dict[tuple[str, str, int], int]] = {}
        self._order = 0

    def __len__(self) -> int:
        return sum(len(v) for v in self._by_key.values())

    def add(self, node: str, cluster: str, key: str, length: int) -> None:
        """Record that ``node`` holds a checkpoint of ``length`` tokens whose last block key is ``key``."""
        if isinstance(length, bool) or not isinstance(length, int) or length < self.block_size \
                or length % self.block_size:
            raise ValueError(f"checkpoint length {length!r} is not a positive multiple of {self.block_size}")
        entries = self._by_key.setdefault(key, {})
        if (node, cluster, length) not in entries:
            self._order += 1
            entries[(node, cluster, length)] = self._order

    def remove(self, node: str, key: str) -> None:
        """Forget ``node``'s checkpoint under ``key`` (it evicted it)."""
        entries = self._by_key.get(key, {})
        for e in [e for e in entries if e[0] == node]:
            del entries[e]
        if not entries:
            self._by_key.pop(key, None)

    def remove_node(self, node: str) -> None:
        """Forget every checkpoint of ``node`` (it died, restarted or changed role)."""
        for key in list(self._by_key):
            self.remove(node, key)

    def lookup(self, prompt: Sequence[int]) -> dict[str, Hit]:
        """The longest reusable hit per cluster (clusters with none are absent)."""
        keys = block_keys(prompt, self.block_size)
        best: dict[str, tuple[int, int, str]] = {}  # cluster -> (length, -order, node)
        for k, key in enumerate(keys, start=1):
            length = k * self.block_size
            if length > len(prompt) - 1:
                break
            for (node, cluster, held), order in self._by_key.get(key, {}).items():
                if held != length:
                    continue  # the same key at another length cannot happen for real block keys; ignore it
                cand = (length, -order, node)
                if cluster not in best or cand > best[cluster]:
                    best[cluster] = cand
        return {c: Hit(node=n, cluster=c, length=length) for c, (length, _, n) in best.items()}
