"""The PrfaaS prefix index (kvwire/prfaas/prefix.py): chained block keys and the hybrid prefix rule."""

from __future__ import annotations

import random

import pytest

from kvwire.prfaas.prefix import Hit, PrefixIndex, block_keys

B = 4


def toks(n: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(1000) for _ in range(n)]


def test_block_keys_are_chained_and_per_full_block() -> None:
    p = toks(11)
    keys = block_keys(p, B)
    assert len(keys) == 2 and len(set(keys)) == 2 and keys == block_keys(p + [7], B)[:2]
    q = list(p)
    q[0] += 1  # an early change moves every later key (a key names the whole prefix)
    assert all(a != b for a, b in zip(keys, block_keys(q, B)))
    r = list(p)
    r[5] += 1
    assert block_keys(r, B)[0] == keys[0] and block_keys(r, B)[1] != keys[1]
    assert block_keys(p[:4] + p[4:8], B) == keys and block_keys([], B) == []
    with pytest.raises(ValueError):
        block_keys(p, 0)


def test_hit_only_at_an_exact_checkpoint_length() -> None:
    idx = PrefixIndex(B)
    p = toks(13)
    idx.add("a", "local", block_keys(p, B)[1], 8)  # node a checkpointed p[:8]
    assert idx.lookup(p + [1, 2]) == {"local": Hit("a", "local", 8)}
    # the first block matches but no linear state exists at 4 tokens: no hit (attention-only rule would say 4)
    assert idx.lookup(p[:4] + toks(9, seed=5)) == {}
    # a hit must leave a token to compute: the 8-token prompt itself cannot use its 8-token checkpoint
    assert idx.lookup(p[:8]) == {} and idx.lookup(p[:9]) == {"local": Hit("a", "local", 8)}
    with pytest.raises(ValueError):
        idx.add("a", "local", "k", 6)  # not a block multiple


def test_longest_per_cluster_deterministic_ties_and_removal() -> None:
    idx = PrefixIndex(B)
    p = toks(30)
    keys = block_keys(p, B)
    idx.add("a", "local", keys[0], 4)
    idx.add("b", "local", keys[2], 12)
    idx.add("c", "local", keys[2], 12)  # same length: the first added wins
    idx.add("x", "prfaas", keys[1], 8)
    assert idx.lookup(p) == {"local": Hit("b", "local", 12), "prfaas": Hit("x", "prfaas", 8)}
    idx.remove_node("b")
    assert idx.lookup(p)["local"] == Hit("c", "local", 12)
    idx.remove("c", keys[2])
    assert idx.lookup(p)["local"] == Hit("a", "local", 4) and len(idx) == 2
    idx.remove_node("x")
    assert "prfaas" not in idx.lookup(p)
