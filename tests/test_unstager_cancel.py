"""UnstagingJob.cancel on the CPU path with real loopback sessions: the pinned buffers back in the pool at
once, the sender told, a copy in progress finished whole and the queued ones never run, one terminal state;
and the adapters' decode-side abort (``Inbox.cancel``, vLLM's) frees the buffers without waiting for a poll."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

torch = pytest.importorskip("torch")

from adapters_util import hybrid_layout  # noqa: E402

from kvwire import Receiver, RequestSpec, Session, State, TransferCancelled, connect  # noqa: E402
from kvwire.adapters.lifecycle import GroupTables, Inbox, Outbox  # noqa: E402
from kvwire.cuda import PagedCache, PinnedPool, Stager, Unstager, UnstagingJob, allocate_paged_cache  # noqa: E402
from kvwire.testing.fixtures import default_request, load_fixture  # noqa: E402

MiB = 1 << 20
SRC_TABLES = {"attn": list(range(19, 3, -1))}
DST_TABLES = {"attn": list(range(16))}


@pytest.fixture(scope="module")
def link() -> Iterator[tuple[Receiver, Session]]:
    with Receiver(key="k") as rx, connect(*rx.address, key="k", lanes=2, chunk_size=64 * 1024) as s:
        yield rx, s


@pytest.fixture
def caches() -> Iterator[tuple[Any, PagedCache, PagedCache, Stager, Unstager]]:
    layout = load_fixture("tiny-qwen3-next")
    src = allocate_paged_cache(layout, 20, 2, fill="random", seed=5)
    dst = allocate_paged_cache(layout, 20, 2, fill="zeros")
    stager = Stager(src, PinnedPool(16 * MiB, backend="torch"))
    unstager = Unstager(dst, PinnedPool(16 * MiB, backend="torch"))
    yield layout, src, dst, stager, unstager
    stager.close()
    unstager.close()
    assert stager.pool.in_use_bytes == 0 and unstager.pool.in_use_bytes == 0


def until(pred: Any, timeout: float = 10.0) -> bool:
    end = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > end:
            return False
        time.sleep(0.005)
    return True


def layer_tensors(cache: PagedCache, layer: int) -> list[torch.Tensor]:
    n = len(cache.layout.layers[layer].caches)
    return [t.view(torch.uint8) for c in range(n) for t in cache.storage(layer, c).tensors]


class HeldCopies:
    """Stands in for the unstager device's lock (taken around each layer's copies): the first layer that
    starts copying waits inside it until ``go`` is set, so that copy is in progress for as long as a test
    wants."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.go = threading.Event()

    def __enter__(self) -> None:
        self.entered.set()
        assert self.go.wait(30)

    def __exit__(self, *exc: object) -> None:
        return None


def test_cancel_mid_transfer_frees_at_once_and_tells_the_sender(link, caches) -> None:
    rx, session = link
    layout, _src, _dst, stager, unstager = caches
    req = default_request("cancel-mid")
    job = unstager.prepare(req, DST_TABLES, 0)
    h_rx = job.expect_on(rx)
    sjob = stager.begin(req, SRC_TABLES, 1)
    h_tx = session.send(layout, req)
    sjob.stage_and_send(h_tx, 0).wait_sent(10)
    job.wait_layer(0, timeout=10)  # one layer is in the cache, the rest never left
    assert unstager.pool.in_use_bytes > 0 and job.state is State.ACTIVE

    with pytest.raises(TypeError):
        job.cancel(7)  # type: ignore[arg-type]  # a bad reason: nothing cancelled
    assert job.state is State.ACTIVE and not h_rx.finished and unstager.pool.in_use_bytes > 0

    assert job.cancel("request aborted") is True
    assert unstager.pool.in_use_bytes == 0  # right after the call, not at some later poll
    assert job.state is State.CANCELLED and h_rx.state is State.CANCELLED
    with pytest.raises(TransferCancelled, match="request aborted"):
        h_tx.result(10)  # the sender was told, with the reason
    for layer in (0, 5):  # even the layer that made it: the job is over
        with pytest.raises(TransferCancelled):
            job.wait_layer(layer, timeout=10)
    t0 = time.monotonic()
    with pytest.raises(TransferCancelled):
        job.result()  # no timeout: it must not wait for layers that will never come
    assert time.monotonic() - t0 < 5
    assert job.cancel("again") is False and job.state is State.CANCELLED  # idempotent, one terminal state
    assert job.layers_done == {0}
    job.release()  # the owner's release after it is a no-op
    sjob.release()
    assert stager.pool.in_use_bytes == 0


def test_cancel_after_done_keeps_done(link, caches) -> None:
    """Negative control: a job whose every layer is in the cache stays DONE; cancel only frees its buffers."""
    rx, session = link
    layout, _src, _dst, stager, unstager = caches
    req = default_request("cancel-done")
    job = unstager.prepare(req, DST_TABLES, 0)
    h_rx = job.expect_on(rx)
    sjob = stager.begin(req, SRC_TABLES, 1)
    h_tx = session.send(layout, req)
    for layer in sjob.layers:
        sjob.stage_and_send(h_tx, layer)
    h_tx.finish().result(10)
    h_rx.result(10)
    assert job.result(10) is job and job.state is State.DONE
    assert job.cancel("too late") is False
    assert job.state is State.DONE and unstager.pool.in_use_bytes == 0
    job.wait_layer(3, timeout=0)  # still answers: its layers are in the cache
    sjob.release()


@pytest.mark.parametrize("wait", [30.0, 0.0], ids=["waits-for-the-copy", "frees-when-it-ends"])
def test_a_copy_in_progress_finishes_whole_and_queued_ones_never_run(link, caches, wait: float) -> None:
    rx, session = link
    layout, src, dst, stager, unstager = caches
    held = HeldCopies()
    unstager.device.lock = held  # type: ignore[assignment]
    req = default_request(f"cancel-copy-{wait}")
    job = unstager.prepare(req, DST_TABLES, 0)
    h_rx = job.expect_on(rx)
    sjob = stager.begin(req, SRC_TABLES, 1)
    h_tx = session.send(layout, req)
    for layer in sjob.layers:
        sjob.stage_and_send(h_tx, layer)
    h_tx.finish().result(10)
    h_rx.result(10)  # every layer verified in the buffers; the first one's copy is held
    assert held.entered.wait(10) and until(lambda: len(job.arrived_at) == len(job.layers))
    first = min(job.arrived_at, key=job.arrived_at.__getitem__)
    # what the whole copy of every layer gives, from the same received bytes, on a second cache
    ref = allocate_paged_cache(layout, 20, 2, fill="zeros")
    with Unstager(ref, PinnedPool(16 * MiB, backend="torch")) as ref_unstager:
        with ref_unstager.prepare(req, DST_TABLES, 0) as ref_job:
            for mine, theirs in zip(ref_job.buffers, job.buffers):
                mine.copy_(theirs)
            for layer in ref_job.layers:
                ref_job.layer_arrived(layer)
            ref_job.wait_all(30)

    returned = threading.Event()
    threading.Thread(target=lambda: (job.cancel("client gone", timeout=wait), returned.set()), daemon=True).start()
    if wait:
        assert not returned.wait(0.3)  # it waits for the copy that reads the buffers
        assert unstager.pool.in_use_bytes > 0
        held.go.set()
        assert returned.wait(10)
        assert unstager.pool.in_use_bytes == 0  # back when cancel returned
    else:
        assert returned.wait(10)  # it does not wait
        assert unstager.pool.in_use_bytes > 0  # the copy still reads them: not back yet
        held.go.set()
        assert until(lambda: unstager.pool.in_use_bytes == 0)  # back as the copy ends, nobody polling
    assert job.state is State.CANCELLED
    assert job.layers_done == {first}  # the copy in progress was reported; the queued ones never ran
    for layer in layout.layers:
        got, whole = layer_tensors(dst, layer.index), layer_tensors(ref, layer.index)
        if layer.index == first:
            assert all(torch.equal(a, b) for a, b in zip(got, whole)), "the layer in progress was torn"
        else:
            assert not any(t.any() for t in got), f"layer {layer.index} was written after cancel"
    # negative control: the reference did write every layer, so the untouched ones above mean something
    assert all(any(t.any() for t in layer_tensors(ref, la.index)) for la in layout.layers)
    sjob.release()


def test_cancel_from_a_layer_callback(link, caches) -> None:
    rx, session = link
    layout, _src, _dst, stager, unstager = caches
    req = default_request("cancel-cb")
    job = unstager.prepare(req, DST_TABLES, 0)
    h_rx = job.expect_on(rx)
    called: list[bool] = []
    h_rx.on_layer(lambda _layer: called.append(job.cancel("seen enough")))  # the receiver's callback thread
    sjob = stager.begin(req, SRC_TABLES, 1)
    h_tx = session.send(layout, req)
    sjob.stage_and_send(h_tx, 0)
    assert until(lambda: bool(called))  # it returned: no deadlock with the transport or the copies
    assert called[0] is True and job.state is State.CANCELLED
    assert until(lambda: unstager.pool.in_use_bytes == 0)
    with pytest.raises(TransferCancelled, match="seen enough"):
        h_tx.result(10)
    with pytest.raises(TransferCancelled):
        job.wait_layer(1, timeout=10)
    sjob.release()


def test_cancel_before_the_transfer_arrives(link, caches) -> None:
    rx, _session = link
    _layout, _src, _dst, _stager, unstager = caches
    job = unstager.prepare(default_request("cancel-early"), DST_TABLES, 0)
    assert job.cancel("not needed") is True and unstager.pool.in_use_bytes == 0  # never lent: back at once
    job2 = unstager.prepare(default_request("cancel-expected"), DST_TABLES, 0)
    h = job2.expect_on(rx)
    assert job2.cancel("not needed") is True and h.state is State.CANCELLED and unstager.pool.in_use_bytes == 0
    assert isinstance(job2, UnstagingJob)


def test_a_lent_job_keeps_its_buffers_until_its_transfer_is_attached_and_ends(caches) -> None:
    """A receiver was handed the buffers (``lend``) but its handle is not attached yet: they are the
    transport's until it is, and the cancelled job then cancels it and frees them once it ended."""
    _layout, _src, _dst, _stager, unstager = caches
    job = unstager.prepare(default_request("cancel-lent"), DST_TABLES, 0)
    job.lend()
    assert job.cancel("gone", timeout=0) is True
    assert unstager.pool.in_use_bytes > 0 and job.state is State.CANCELLED

    class Source:
        finished = False
        reason = ""

        def on_layer(self, fn: Any) -> None: ...
        def cancel(self, reason: str) -> None:
            self.reason = reason

    src = Source()
    job.attach(src)
    assert src.reason == "gone" and unstager.pool.in_use_bytes > 0  # cancelled, still writing
    src.finished = True
    job.release()  # the owner's word that nothing writes them any more
    assert unstager.pool.in_use_bytes == 0


# ------------------------------------------------------------------ the adapters' decode-side abort

GROUPS = [[2, 6], [0, 4], [1, 5], [3, 7]]


def test_inbox_cancel_mid_transfer_frees_without_a_poll() -> None:
    layout = hybrid_layout()
    src = allocate_paged_cache(layout, 16, 16, fill="random", seed=3)
    dst = allocate_paged_cache(layout, 16, 16, fill="zeros")
    stager = Stager(src, PinnedPool(32 * MiB, backend="torch"))
    unstager = Unstager(dst, PinnedPool(32 * MiB, backend="torch"))
    inbox = Inbox(unstager, key=b"cancel", timeout=20)
    outbox = Outbox(stager, key=b"cancel", lanes=2)
    try:
        g = GroupTables(layout, GROUPS)
        t, s = g.tables([[1, 2, 3], [4], [5], [6]])
        request = RequestSpec("kv-abort", 70, 69)
        released: list[Any] = []
        r = inbox.expect("d-abort", request, t, s, release=released.append)
        sending = outbox.begin("p-abort", request, inbox.address, t, s)
        sending.stage(sending.layers[0])  # one layer out; the rest never comes
        assert r.job is not None and until(lambda: bool(r.job.layers_done))
        assert unstager.pool.in_use_bytes > 0
        inbox.cancel("kv-abort", "request aborted")  # (by kvwire request id, as the adapters call it)
        assert until(lambda: unstager.pool.in_use_bytes == 0)  # nobody polls: before, only a poll freed them
        assert released == []  # the lease (the engine's blocks) still ends at the engine's poll
        assert r.job.state is State.CANCELLED
        assert until(lambda: sending.out is not None and sending.out.state is State.CANCELLED)  # sender told
        ended = []
        assert until(lambda: bool(ended.extend(inbox.poll()) or ended))
        assert [(e.key, e.state) for e in ended] == [("d-abort", State.CANCELLED)] and len(released) == 1
    finally:
        outbox.close()
        inbox.close()
        stager.close()
        unstager.close()
    assert unstager.pool.in_use_bytes == 0 and stager.pool.in_use_bytes == 0
