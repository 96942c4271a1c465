"""A node's checkpoint store (kvwire/prfaas/store.py): LRU bounded in bytes, the hybrid lookups."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from kvwire.prfaas.prefix import block_keys  # noqa: E402
from kvwire.prfaas.runner import Checkpoint  # noqa: E402
from kvwire.prfaas.store import CheckpointStore  # noqa: E402

B = 4


def ckpt(prompt: list[int], length: int, state: bool = True) -> Checkpoint:
    """Layer 0 linear ([conv, state], 64 B each), layer 1 attention ([K, V], 16 B per token each)."""
    kv = [torch.arange(4 * length, dtype=torch.float32).reshape(1, 1, length, 4) for _ in range(2)]
    states = [torch.zeros(1, 4, 4), torch.zeros(1, 4, 4)] if state else []
    return Checkpoint(block_keys(prompt[:length], B)[-1], length, [states, kv], [False, True], has_state=state)


def test_exact_full_checkpoints_and_block_granular_kv() -> None:
    store = CheckpointStore(B, 1 << 20)
    p = list(range(20))
    assert store.put(ckpt(p, 12), p)
    assert store.exact(p + [99], 12) is not None
    assert store.exact(p, 8) is None  # no state at 8: only the exact length restarts a prefill
    kv = store.kv_prefix(p + [1], 8)  # attention KV is reusable at any matching block boundary
    assert kv is not None and kv.length == 8 and not kv.has_state and kv.layers[0] == []
    assert torch.equal(kv.layers[1][0], ckpt(p, 12).layers[1][0][:, :, :8])
    assert store.kv_prefix([0, 1, 2, 3, 9, 9, 9, 9, 9], 8) is None  # second block differs
    assert store.listing() == [{"key": block_keys(p[:12], B)[-1], "length": 12, "state": True}]


def test_lru_byte_bound_and_kv_only_never_replaces_full() -> None:
    size = ckpt(list(range(8)), 8).nbytes  # 128 B states + 2 * 8 * 16 B KV = 384 B
    store = CheckpointStore(B, 2 * size)
    a, b, c = ([i + k * 100 for i in range(8)] for k in range(3))
    store.put(ckpt(a, 8), a)
    store.put(ckpt(b, 8), b)
    assert store.exact(a, 8) is not None  # a is now the most recently used
    store.put(ckpt(c, 8), c)  # evicts b, the least recently used
    assert store.exact(b, 8) is None and store.exact(a, 8) is not None and store.exact(c, 8) is not None
    assert store.nbytes <= 2 * size and store.evicted == 1
    store.put(ckpt(a, 8, state=False), a)  # a KV-only entry does not replace the full one
    assert store.exact(a, 8) is not None
    assert not store.put(ckpt(list(range(40)), 40), list(range(40)))  # alone over the bound: refused
    with pytest.raises(ValueError):
        store.put(ckpt(a, 8), b)  # key does not match the prompt
