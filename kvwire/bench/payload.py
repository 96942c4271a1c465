"""Benchmark payloads: the layout a run sends and the deterministic bytes it fills them with.

Owns: building the layout (a preset or ``config.json`` through ``kvwire.codec.presets``, or the synthetic
``raw`` layout iperf-style runs use), the byte pattern of a request's flat payload and checking a
received buffer against it. Must not know: sockets, sessions, clocks or the bench's control channel.

The pattern is a pure function of ``(seed, request_id, offset)``: a 4 MiB tile of PCG64 words drawn from
``seed``, XORed per 4 MiB block with a 64-bit key from ``xxh3_64(request_id, seed) ^ block * golden``. A
chunk written at the wrong offset, bytes left over from an earlier request in a reused buffer, or a
block never written all fail the check; filling and checking cost one memory pass (about 0.1 s/GB), so
the receiver verifies every byte independently of the transport's own hashing.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import xxhash

from ..codec.layout import CacheSpec, LayerSpec, ModelLayout, RequestSpec, Segment, TensorSpec, plan_segments

BLOCK_BYTES = 4 * 1024 * 1024
_WORDS = BLOCK_BYTES // 8
_GOLDEN = 0x9E3779B97F4A7C15
_MASK = (1 << 64) - 1

#: the synthetic layout of raw mode: 8 layers of GQA K/V, (8 heads x 128) bfloat16 each, 32 KiB per token
RAW_LAYERS = 8
RAW_BYTES_PER_TOKEN = RAW_LAYERS * 2 * 8 * 128 * 2


def raw_layout() -> ModelLayout:
    """Eight attention layers; a raw transfer of B bytes is ``B / RAW_BYTES_PER_TOKEN`` tokens of it."""
    def kv(name: str) -> TensorSpec:
        return TensorSpec(name, (8, 128), "bfloat16", "NHD", "token")

    layers = tuple(LayerSpec(i, (CacheSpec("gqa", (kv("k"), kv("v"))),)) for i in range(RAW_LAYERS))
    return ModelLayout("raw", layers)


def raw_tokens(length: int) -> int:
    """Tokens of the raw layout that carry at least ``length`` bytes (at least one)."""
    return max(1, -(-length // RAW_BYTES_PER_TOKEN))


def load_model(name_or_path: str, tp_size: int = 1) -> ModelLayout:
    """A preset name or a ``config.json`` path; ``raw`` is the synthetic layout."""
    if name_or_path == "raw":
        return raw_layout()
    from ..codec.presets import load_layout

    return load_layout(name_or_path, tp_size=tp_size)


@dataclass(frozen=True)
class PayloadPlan:
    """One request's payload: its segments back to back in a flat buffer, grouped by layer."""

    layout: ModelLayout
    request: RequestSpec
    segments: tuple[Segment, ...]

    @classmethod
    def build(cls, layout: ModelLayout, request: RequestSpec) -> PayloadPlan:
        return cls(layout, request, tuple(plan_segments(layout, request)))

    @property
    def total_bytes(self) -> int:
        return sum(s.nbytes for s in self.segments)

    def layer_bytes(self) -> dict[int, int]:
        out: dict[int, int] = {}
        for s in self.segments:
            out[s.layer] = out.get(s.layer, 0) + s.nbytes
        return out

    def layer_views(self, flat: np.ndarray) -> dict[int, list[np.ndarray]]:
        """Per layer, the views of ``flat`` holding its segments, in manifest order (no copies)."""
        out: dict[int, list[np.ndarray]] = {}
        pos = 0
        for s in self.segments:
            out.setdefault(s.layer, []).append(flat[pos : pos + s.nbytes])
            pos += s.nbytes
        return out


def alloc_flat(nbytes: int, touch: bool = True) -> np.ndarray:
    """A uint8 buffer of ``nbytes`` (capacity rounded up to 8), its pages faulted in when ``touch``."""
    buf = np.empty(-(-nbytes // 8) * 8, np.uint8)
    if touch:
        buf[::4096] = 0
    return buf


@dataclass(frozen=True)
class VerifyResult:
    ok: bool
    bytes_checked: int
    bad_blocks: int
    first_bad_offset: int  # -1 when none


class Pattern:
    """The deterministic content of every request of a run with this ``seed``."""

    def __init__(self, seed: int) -> None:
        self.seed = seed & _MASK
        gen = np.random.Generator(np.random.PCG64(self.seed))
        self._tile = gen.integers(0, np.iinfo(np.uint64).max, _WORDS, dtype=np.uint64, endpoint=True)
        self._scratch = np.empty(_WORDS, np.uint64)

    def _key(self, request_id: str, block: int) -> np.uint64:
        base = xxhash.xxh3_64_intdigest(request_id.encode(), seed=self.seed)
        return np.uint64(base ^ ((block * _GOLDEN) & _MASK))

    def _tail_bytes(self, request_id: str, block: int, words: int, nbytes: int) -> np.ndarray:
        """The first ``nbytes`` bytes of block ``block`` beyond its ``words`` whole words."""
        word = self._tile[words : words + 1] ^ self._key(request_id, block)
        return word.view(np.uint8)[:nbytes]

    def fill(self, flat: np.ndarray, request_id: str) -> None:
        """Write the request's bytes into ``flat`` (a C-contiguous uint8 array, 8-byte aligned)."""
        n = len(flat)
        for block, start in enumerate(range(0, n, BLOCK_BYTES)):
            stop = min(n, start + BLOCK_BYTES)
            words = (stop - start) // 8
            if words:
                out = flat[start : start + words * 8].view(np.uint64)
                np.bitwise_xor(self._tile[:words], self._key(request_id, block), out=out)
            rest = stop - start - words * 8
            if rest:
                flat[start + words * 8 : stop] = self._tail_bytes(request_id, block, words, rest)

    def verify(self, flat: np.ndarray, request_id: str, start: int = 0, stop: int | None = None
               ) -> VerifyResult:
        """Compare bytes ``[start, stop)`` of ``flat`` with the request's pattern, 4 MiB at a time with a
        bounded scratch buffer. ``bad_blocks`` counts the 4 MiB pattern blocks with a wrong byte."""
        stop = len(flat) if stop is None else stop
        bad, first = 0, -1
        pos = start
        while pos < stop:
            block = pos // BLOCK_BYTES
            hi = min(stop, (block + 1) * BLOCK_BYTES)
            off = self._check(flat, request_id, block, pos, hi)
            if off >= 0:
                bad += 1
                if first < 0:
                    first = off
            pos = hi
        return VerifyResult(bad == 0, stop - start, bad, first)

    def _check(self, flat: np.ndarray, request_id: str, block: int, lo: int, hi: int) -> int:
        """First wrong byte offset in ``[lo, hi)`` (inside one block), or -1."""
        base = block * BLOCK_BYTES
        key = self._key(request_id, block)
        w0, w1 = (lo - base) // 8, -(-(hi - base) // 8)
        if lo % 8 == 0 and hi % 8 == 0:  # the common case: compare whole words in place
            tmp = self._scratch[: w1 - w0]
            np.bitwise_xor(flat[lo:hi].view(np.uint64), self._tile[w0:w1], out=tmp)
            np.bitwise_xor(tmp, key, out=tmp)
            if not tmp.any():
                return -1
            w = int(np.flatnonzero(tmp)[0])
            return lo + 8 * w + int(np.flatnonzero(tmp[w : w + 1].view(np.uint8))[0])
        want = (self._tile[w0:w1] ^ key).view(np.uint8)[lo - base - 8 * w0 : hi - base - 8 * w0]
        diff = np.flatnonzero(flat[lo:hi] != want)
        return lo + int(diff[0]) if len(diff) else -1
