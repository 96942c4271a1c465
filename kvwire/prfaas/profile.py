"""Measured curves the PrfaaS planner works from: prefill time T_prefill(l) and KV size S_kv(l).

Owns: ``Curve`` (measured points, linear interpolation between them, linear extrapolation past the
ends — never a constant scaling of another curve), the two curves as ``PrefillProfile`` and ``KvSize``,
``ServedProfile`` (both curves of one served model on one machine, as the profiler writes them) and its
JSON form, and the paper's Table 5 (the internal 1T model on 8×H200).
Must not know: the throughput equations, routing, length distributions, torch (``profiler`` measures).

JSON form of a ``ServedProfile`` (what ``kvwire.prfaas.profiler`` writes and ``ServedProfile.load`` reads)::

    {"format": "kvwire.prfaas.profile/1", "model": "...", "hardware": "...",
     "prefill": {"lengths": [...], "seconds": [...]}, "kv": {"lengths": [...], "bytes": [...]},
     "notes": {...}}
"""

from __future__ import annotations

import bisect
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..codec.layout import ModelLayout
from .lengths import Piece

MIB = 1 << 20
GBPS = 1e9 / 8  # bytes/s in one Gbit/s
FORMAT = "kvwire.prfaas.profile/1"

#: Table 5 of the paper: the internal 1T Kimi-Linear-architecture model, 8×H200, in-house vLLM.
TABLE5_LENGTHS = (1024, 8192, 32768, 131072)
TABLE5_KV_MIB = (190.8, 308.9, 701.3, 2316.3)
TABLE5_SECONDS = (0.44, 0.72, 1.84, 7.40)
TABLE5_GBPS = (3.61, 3.59, 3.19, 2.62)


@dataclass(frozen=True)
class Curve:
    """y(l) through measured points: linear between them, linear extrapolation past the ends."""

    lengths: tuple[float, ...]
    values: tuple[float, ...]

    def __post_init__(self) -> None:
        if len(self.lengths) < 2 or len(self.lengths) != len(self.values):
            raise ValueError("need at least two (length, value) points of equal count")
        if not all(math.isfinite(v) for v in (*self.lengths, *self.values)):
            raise ValueError("points must be finite")
        if any(b <= a for a, b in zip(self.lengths, self.lengths[1:])) or min(self.values) <= 0:
            raise ValueError("lengths must increase and values be positive")

    def _slope(self, i: int) -> float:
        xs, ys = self.lengths, self.values
        return (ys[i + 1] - ys[i]) / (xs[i + 1] - xs[i])

    def __call__(self, length: float) -> float:
        xs, ys = self.lengths, self.values
        i = min(max(bisect.bisect_right(xs, length) - 1, 0), len(xs) - 2)
        return max(ys[0] * 1e-3, ys[i] + self._slope(i) * (length - xs[i]))

    def many(self, lengths: np.ndarray) -> np.ndarray:
        """``self(l)`` for every element (vectorized; the same numbers)."""
        xs, ys = np.asarray(self.lengths), np.asarray(self.values)
        i = np.clip(np.searchsorted(xs, lengths, side="right") - 1, 0, len(xs) - 2)
        slope = (ys[i + 1] - ys[i]) / (xs[i + 1] - xs[i])
        return np.maximum(ys[0] * 1e-3, ys[i] + slope * (lengths - xs[i]))

    def pieces(self) -> list[Piece]:
        """(x0, x1, intercept, slope) per linear piece, covering (-inf, inf), for exact expectations.

        The floor at ys[0]/1000 that ``__call__`` applies far below the first point is not represented;
        callers only integrate over positive lengths, where no measured curve reaches it.
        """
        xs, n = self.lengths, len(self.lengths)
        out: list[Piece] = []
        for i in range(n - 1):
            m = self._slope(i)
            x0 = -math.inf if i == 0 else xs[i]
            x1 = math.inf if i == n - 2 else xs[i + 1]
            out.append((x0, x1, self.values[i] - m * xs[i], m))
        return out

    def to_dict(self, value_key: str) -> dict[str, list[float]]:
        return {"lengths": list(self.lengths), value_key: list(self.values)}


class PrefillProfile(Curve):
    """T_prefill(l) in seconds for one instance."""

    def __init__(self, lengths: Sequence[float], seconds: Sequence[float]) -> None:
        super().__init__(tuple(float(x) for x in lengths), tuple(float(y) for y in seconds))

    @property
    def seconds(self) -> tuple[float, ...]:
        return self.values

    def t_prefill(self, length: float) -> float:
        return self(length)


class KvSize(Curve):
    """S_kv(l) in bytes: what one request of l tokens ships (request-level state plus token-level KV)."""

    def __init__(self, lengths: Sequence[float], sizes: Sequence[float]) -> None:
        super().__init__(tuple(float(x) for x in lengths), tuple(float(y) for y in sizes))

    def s_kv(self, length: float) -> float:
        return self(length)

    @staticmethod
    def from_layout(layout: ModelLayout, max_length: int = 1 << 20) -> KvSize:
        """Exact for a kvwire layout: its bytes are affine in the token count (state + per-token KV)."""
        state, per_token = float(layout.state_bytes_per_request()), float(layout.kv_bytes_per_token())
        if state + per_token <= 0:
            raise ValueError(f"layout {layout.name} ships no bytes")
        return KvSize((1.0, float(max_length)), (state + per_token, state + per_token * max_length))


def table5_profile() -> PrefillProfile:
    return PrefillProfile(TABLE5_LENGTHS, TABLE5_SECONDS)


def table5_kv() -> KvSize:
    return KvSize(TABLE5_LENGTHS, [m * MIB for m in TABLE5_KV_MIB])


@dataclass(frozen=True)
class ServedProfile:
    """Both curves of one served model on one machine, with what was measured and how."""

    model: str
    hardware: str
    prefill: PrefillProfile
    kv: KvSize
    notes: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps({"format": FORMAT, "model": self.model, "hardware": self.hardware,
                           "prefill": self.prefill.to_dict("seconds"), "kv": self.kv.to_dict("bytes"),
                           "notes": self.notes}, indent=1)

    @staticmethod
    def from_json(text: str) -> ServedProfile:
        d = json.loads(text)
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise ValueError(f"not a {FORMAT} document")
        try:
            pre, kv = d["prefill"], d["kv"]
            return ServedProfile(str(d["model"]), str(d["hardware"]), PrefillProfile(pre["lengths"], pre["seconds"]),
                                 KvSize(kv["lengths"], kv["bytes"]), dict(d.get("notes") or {}))
        except (KeyError, TypeError) as e:
            raise ValueError(f"malformed profile: {e!r}") from e

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json())

    @staticmethod
    def load(path: str | Path) -> ServedProfile:
        return ServedProfile.from_json(Path(path).read_text())
