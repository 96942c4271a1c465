"""The waits of the staging path (``StagedLayer.result``/``wait_sent``, ``StagingJob.wait``/``send_all``,
``UnstagingJob.wait_layer``/``wait_all``/``result``) and of the transformers adapter (``IncomingCache.wait_layer``/
``cache``) check their ``timeout`` at the call, as the transport's do (``_args.check_wait_timeout``): a
non-number is a ``TypeError`` and NaN or infinity a ``ValueError`` naming ``timeout``; <= 0 still means no wait.
Before: ``'x'`` was a float-arithmetic TypeError, ``wait_layer(1, nan)`` hung, ``result(nan)`` a TimeoutError
'after 0.0s', infinity an OverflowError from threading. On the CPU path, real pinned pools and caches."""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

torch = pytest.importorskip("torch")

from kvwire.cuda import PinnedPool, Stager, Unstager, allocate_paged_cache  # noqa: E402
from kvwire.testing.fixtures import default_request, load_fixture  # noqa: E402

LAYOUT = load_fixture("tiny-mimo-swa")
TABLES = {"attn": list(range(63)), "swa": list(range(63))}
BAD = [("x", TypeError, "timeout must be a number"), (math.nan, ValueError, "timeout must be a finite"),
       (math.inf, ValueError, "timeout must be a finite"), (True, TypeError, "timeout must be a number")]


@pytest.fixture
def jobs() -> Iterator[tuple[Any, Any]]:
    req = default_request("waits")
    src = allocate_paged_cache(LAYOUT, 70, 1, fill="random", seed=3)
    dst = allocate_paged_cache(LAYOUT, 70, 1, fill="zeros")
    with Stager(src, PinnedPool(8 << 20, backend="torch")) as stager, \
            Unstager(dst, PinnedPool(8 << 20, backend="torch")) as unstager:
        tx = stager.begin(req, TABLES, None)
        rx = unstager.prepare(req, TABLES, None)
        yield tx, rx
        rx.cancel("test over")
        tx.release()
        assert stager.pool.in_use_bytes == 0 and unstager.pool.in_use_bytes == 0


def _raises(fn: Callable[[], Any], err: type[Exception], match: str) -> None:
    """``fn()`` raises ``err`` (matching) within 10 s: run on a thread so that a wait that hangs fails the test."""
    out: list[BaseException | None] = []

    def run() -> None:
        try:
            fn()
            out.append(None)
        except BaseException as e:  # noqa: BLE001 - reported below
            out.append(e)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(10)
    assert out, "still waiting after 10 s"
    with pytest.raises(err, match=match):
        if out[0] is not None:
            raise out[0]


class _Writer:
    def __init__(self) -> None:
        self.layers: list[int] = []
        self.finished = 0

    def write_layer(self, layer: int, views: Any) -> None:
        self.layers.append(layer)

    def finish(self) -> None:
        self.finished += 1


@pytest.mark.parametrize(("bad", "err", "match"), BAD)
def test_staging_waits_refuse_a_bad_timeout(jobs: tuple[Any, Any], bad: Any, err: type[Exception],
                                            match: str) -> None:
    tx, _ = jobs
    staged = tx.stage(1)
    staged.result(10)
    _raises(lambda: staged.result(bad), err, match)
    _raises(lambda: tx.wait(bad), err, match)
    writer = _Writer()
    with pytest.raises(err, match=match):
        tx.send_all(writer, timeout=bad)
    assert writer.layers == [] and writer.finished == 0  # checked before a layer was staged or handed over
    sent = tx.stage_and_send(writer, 0)
    _raises(lambda: sent.wait_sent(bad), err, match)
    sent.wait_sent(10)  # negative control: the good path still works
    assert tx.wait(0) is None and tx.wait(-1) is None and staged.result(-1) is staged.result(0)


@pytest.mark.parametrize(("bad", "err", "match"), BAD)
def test_unstaging_waits_refuse_a_bad_timeout_and_never_hang(jobs: tuple[Any, Any], bad: Any,
                                                            err: type[Exception], match: str) -> None:
    _, rx = jobs
    for wait in (lambda: rx.wait_layer(1, bad), lambda: rx.wait_all(bad), lambda: rx.result(bad)):
        _raises(wait, err, match)
    # negative control: <= 0 is still "don't wait" (nothing arrives here)
    for t in (0, -1, 0.0):
        with pytest.raises(TimeoutError, match="not unstaged"):
            rx.wait_layer(1, t)
        with pytest.raises(TimeoutError, match="not unstaged"):
            rx.result(t)
