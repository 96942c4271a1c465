"""A BEGIN the receiver REJECTs counts in ``Receiver.stats()`` as ``refused_<why>`` and in the metrics as
``kvwire_refused_transfers_total{reason=why}``, ``why`` one of a small fixed set (``codec.rxengine.REFUSALS``),
never the free-text reason: each case over real loopback sockets (``invalid``, which a well-behaved sender never
provokes, on the session's engine). Before, only refusals of an expected request that was cancelled or timed
out here counted anywhere (``transfers_<state>``): these were in no stat."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from helpers import payload, send_verified, wait_until
from test_rxengine import begin, engine

from kvwire import Receiver, RequestSpec, Session, TransferFailed, connect
from kvwire.codec import frames as F
from kvwire.codec.manifest import Manifest
from kvwire.codec.rxengine import REFUSAL_COUNTERS, REFUSALS, Admit
from kvwire.metrics import Metrics
from kvwire.testing.fixtures import load_fixture

LAYOUT = load_fixture("tiny-qwen3-next")
REQ = RequestSpec("refused", 300, 299)
NBYTES = sum(a.nbytes for a in payload(LAYOUT, REQ))


def _raising(_m: Manifest) -> Any:
    raise MemoryError("no GPU blocks")


def _short(m: Manifest) -> Any:
    return np.zeros(m.total_bytes - 1, np.uint8)


def _send(s: Session, req: RequestSpec = REQ, **kw: Any) -> None:
    out = s.send(LAYOUT, req, **kw)
    out.write_all(payload(LAYOUT, req))
    out.finish()
    with pytest.raises(TransferFailed, match="receiver rejected the transfer"):
        out.result(10)


def _mismatched(rx: Receiver, s: Session) -> None:
    rx.expect(REQ.request_id, np.zeros(NBYTES - 1, np.uint8))  # (a byte short: no layout to check it against)
    _send(s)


def _probe(rx: Receiver, s: Session) -> None:
    out = s.send(LAYOUT, REQ, sink=True, hashing=False)
    out.write_all(payload(LAYOUT, REQ))
    out.finish()
    with pytest.raises(TransferFailed, match="accepts no probes"):
        out.result(10)


# why -> (Receiver keywords, what provokes it)
CASES: dict[str, tuple[dict[str, Any], Callable[[Receiver, Session], None]]] = {
    "no_destination": ({}, lambda rx, s: _send(s)),
    "busy": ({"max_inflight_bytes": NBYTES // 2}, lambda rx, s: _send(s)),
    "allocator": ({"allocator": _raising}, lambda rx, s: _send(s)),
    "allocator-short": ({"allocator": _short}, lambda rx, s: _send(s)),
    "mismatch": ({}, _mismatched),
    "sink": ({"max_probe_bytes": 0}, _probe),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_each_refusal_counts_once_under_its_reason(case: str, no_leaks: None) -> None:
    why = case.split("-")[0]
    kw, provoke = CASES[case]
    with Receiver(key="k", **kw) as rx, connect(*rx.address, key="k", lanes=2) as s:
        metrics = Metrics()
        metrics.watch(rx, "rx")
        n = 1 if why == "mismatch" else 2  # (an expectation is used once: it failed with its BEGIN)
        for _ in range(n):
            provoke(rx, s)
        assert wait_until(lambda: rx.stats()[f"refused_{why}"] == n), rx.stats()
        st = rx.stats()
        assert {k: st[k] for k in REFUSAL_COUNTERS if st[k]} == {f"refused_{why}": n}
        assert st["transfers_failed"] == 0 and st["transfers_cancelled"] == 0
        text = metrics.render()
        assert f'kvwire_refused_transfers_total{{listen="rx",reason="{why}"}} {n}\n' in text
        assert text.count("kvwire_refused_transfers_total{") == len(REFUSALS)  # (one sample per reason, fixed)
        assert "no GPU blocks" not in text and "receiver busy" not in text
        assert not s.closed, s.failure  # (a refusal ends the transfer, not the session)


def test_invalid_begins_count_as_invalid_on_the_sessions_engine() -> None:
    e = engine(max_transfers=4)
    assert type(begin(e, 1)[0]) is Admit
    assert begin(e, 1)[0].kind == F.REJECT  # (transfer id in use)
    assert e.receive(F.BEGIN, {"tid": 2, "request": "not a request"}, 0.0)[0].kind == F.REJECT  # (malformed)
    assert {k: v for k, v in e.counts().items() if k.startswith("refused_")} == {"refused_invalid": 2}


def test_control_a_transfer_placed_counts_no_refusal(no_leaks: None) -> None:
    with Receiver(key="k") as rx, connect(*rx.address, key="k", lanes=2) as s:
        send_verified(rx, s, LAYOUT, REQ, timeout=10)
        st = rx.stats()
        assert st["transfers_done"] == 1 and all(st[k] == 0 for k in REFUSAL_COUNTERS)
        m = Metrics()
        m.watch(rx, "rx")
        assert 'kvwire_refused_transfers_total{listen="rx",reason="busy"} 0\n' in m.render()
