"""The long loop's planning inputs, measured from the running deployment instead of assumed.

Owns: ``ObservedProfile`` — every finished prefill's (computed tokens, prefill seconds, bytes shipped) and every
completion's time per output token; from them, once enough lengths are covered, the prefill-time and KV-size
curves (``PrefillProfile``/``KvSize``: medians per length bin, made non-decreasing), the decode step time
(median TPOT) and the ``model.Deployment`` the planner takes. Pure: numbers in, numbers out.
Must not know: nodes, HTTP, routing.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from . import model


@dataclass
class ObservedProfile:
    window: int = 512
    min_samples: int = 8
    bins: int = 4
    _prefill: deque[tuple[float, float, float]] = field(init=False)
    _tpot: deque[float] = field(init=False)

    def __post_init__(self) -> None:
        self._prefill = deque(maxlen=self.window)
        self._tpot = deque(maxlen=self.window)

    def record_prefill(self, tokens: int, seconds: float, nbytes: int) -> None:
        if tokens > 0 and seconds > 0 and nbytes > 0 and math.isfinite(seconds):
            self._prefill.append((float(tokens), float(seconds), float(nbytes)))

    def record_tpot(self, seconds: float) -> None:
        if seconds > 0 and math.isfinite(seconds):
            self._tpot.append(seconds)

    def typical(self) -> tuple[float, float] | None:
        """(seconds, bytes) of a typical prefill (medians of the window); ``None`` before any."""
        if not self._prefill:
            return None
        a = np.array(self._prefill)
        return float(np.median(a[:, 1])), float(np.median(a[:, 2]))

    @property
    def samples(self) -> int:
        return len(self._prefill)

    def curves(self) -> tuple[model.PrefillProfile, model.KvSize] | None:
        """Median seconds and bytes per length bin (quantile bins of the lengths seen), non-decreasing in
        length; ``None`` until ``min_samples`` prefills span at least two distinct bins."""
        if len(self._prefill) < self.min_samples or not self._tpot:
            return None
        a = np.array(self._prefill)
        edges = np.unique(np.quantile(a[:, 0], np.linspace(0, 1, self.bins + 1)))
        pts: list[tuple[float, float, float]] = []
        for lo, hi in zip(edges, edges[1:]):
            m = (a[:, 0] >= lo) & ((a[:, 0] < hi) | (hi == edges[-1]))
            if m.any():
                pts.append((float(np.median(a[m, 0])), float(np.median(a[m, 1])), float(np.median(a[m, 2]))))
        lengths = [p[0] for p in pts]
        if len(pts) < 2 or any(b <= x for x, b in zip(lengths, lengths[1:])):
            return None
        secs = np.maximum.accumulate([p[1] for p in pts])
        size = np.maximum.accumulate([p[2] for p in pts])
        return model.PrefillProfile(lengths, secs.tolist()), model.KvSize(lengths, size.tolist())

    def deployment(self, n_prfaas: int, n_pd: int, *, batch: int, l_out: float, b_out: float
                   ) -> model.Deployment | None:
        """The planner's view of this deployment (same prefill curve on both clusters: same hardware)."""
        c = self.curves()
        if c is None:
            return None
        prefill, kv = c
        decode = model.DecodeProfile(float(np.median(self._tpot)), batch, l_out)
        return model.Deployment(prefill, prefill, kv, decode, n_prfaas, n_pd, b_out)
