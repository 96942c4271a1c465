"""kvwire.adapters.lifecycle: leases, group tables, Outbox -> Inbox over loopback with CPU caches."""

from __future__ import annotations

import time

import pytest

torch = pytest.importorskip("torch")

from adapters_util import diff_blocks, hybrid_layout, poll_until, request_views  # noqa: E402

from kvwire import RequestSpec, State  # noqa: E402
from kvwire.adapters.lifecycle import GroupTables, Inbox, Lease, Outbox  # noqa: E402
from kvwire.cuda import PinnedPool, Stager, Unstager, allocate_paged_cache  # noqa: E402
from kvwire.errors import LayoutError, LayoutMismatch  # noqa: E402

KEY = b"lifecycle-test"
GROUPS = [[2, 6], [0, 4], [1, 5], [3, 7]]  # vLLM-style: one attention group, three state groups


@pytest.fixture
def pair():
    layout = hybrid_layout()
    src = allocate_paged_cache(layout, 16, 16, fill="random", seed=3)
    dst = allocate_paged_cache(layout, 16, 16, fill="zeros")
    stager = Stager(src, PinnedPool(32 << 20, backend="torch"))
    unstager = Unstager(dst, PinnedPool(32 << 20, backend="torch"))
    inbox = Inbox(unstager, key=KEY, timeout=20)
    outbox = Outbox(stager, key=KEY, lanes=2)
    yield layout, src, dst, outbox, inbox
    outbox.close()
    inbox.close()
    stager.close()
    unstager.close()
    assert stager.pool.in_use_bytes == 0 and unstager.pool.in_use_bytes == 0


def _send(outbox, key, request, endpoint, tables, slots, released):
    s = outbox.begin(key, request, endpoint, tables, slots, release=released.append)
    for layer in s.layers:
        s.stage(layer)
    s.finish()
    return s


def test_lease_releases_exactly_once():
    calls = []
    lease = Lease("r", calls.append)
    assert lease.end(State.FAILED, "x") and not lease.end(State.DONE)
    assert [(e.state, e.reason) for e in calls] == [(State.FAILED, "x")]
    with pytest.raises(ValueError):
        Lease("q").end(State.ACTIVE)


def test_group_tables_translate_per_group_ids():
    g = GroupTables(hybrid_layout(), GROUPS)
    tables, slots = g.tables([[5, 6, 7], [1], [2], [3]])
    assert tables == {2: [5, 6, 7], 6: [5, 6, 7]}
    assert slots == {0: 1, 4: 1, 1: 2, 5: 2, 3: 3, 7: 3}
    with pytest.raises(LayoutMismatch):
        g.tables([[5], [1, 2], [2], [3]])  # a state group with two blocks
    with pytest.raises(LayoutError):
        GroupTables(hybrid_layout(), [[2, 6], [0, 4], [1, 5]])  # layers 3, 7 in no group


@pytest.mark.parametrize("early", [False, True], ids=["expect-first", "data-first"])
def test_loopback_bytes_equal(pair, early):
    layout, src, dst, outbox, inbox = pair
    g = GroupTables(layout, GROUPS)
    n = 70
    request = RequestSpec("kv-1", n, n - 1)  # N-1: 69 tokens, three blocks of 32
    p_tables, p_slots = g.tables([[3, 7, 9], [4], [5], [6]])
    d_tables, d_slots = g.tables([[10, 2, 12], [1], [0], [15]])
    released: list = []
    if early:
        _send(outbox, "p-1", request, inbox.address, p_tables, p_slots, released)
        deadline = time.monotonic() + 10
        while not inbox.staged and time.monotonic() < deadline:  # the transfer began: it is being staged
            time.sleep(0.005)
        assert "kv-1" in inbox.staged
    inbox.expect("d-1", request, d_tables, d_slots, release=released.append)
    if not early:
        _send(outbox, "p-1", request, inbox.address, p_tables, p_slots, released)
    ended = poll_until(outbox, inbox, count=2)
    assert sorted((e.key, e.state) for e in ended) == [("d-1", State.DONE), ("p-1", State.DONE)]
    assert sorted(e.key for e in released) == ["d-1", "p-1"]  # each lease released once
    a = request_views(src, p_tables, p_slots, n - 1)
    b = request_views(dst, d_tables, d_slots, n - 1)
    assert diff_blocks(a, b) == []
    # negative control: the comparison sees one flipped byte, and the token N-1 was not shipped
    a[2][0].view(torch.uint8).view(-1)[0] ^= 1
    assert diff_blocks(a, b) == ["layer 2 tensor 0"]
    tail = dst.storage(2, 0).paged_views()[0][d_tables[2][2], (n - 1) % 32]
    assert not tail.view(torch.uint8).any()


def test_expect_times_out_and_releases(pair):
    layout, _src, _dst, _outbox, inbox = pair
    g = GroupTables(layout, GROUPS)
    released: list = []
    t, s = g.tables([[1, 2], [3], [4], [5]])
    inbox.expect("d-2", RequestSpec("kv-2", 40, 39), t, s, release=released.append, timeout=0.3)
    ended = poll_until(inbox, count=1, timeout=10)
    assert [(e.key, e.state) for e in ended] == [("d-2", State.TIMED_OUT)]
    assert [e.key for e in released] == ["d-2"] and inbox.active == 0


def test_sender_cancel_fails_receiver_and_frees(pair):
    layout, _src, _dst, outbox, inbox = pair
    g = GroupTables(layout, GROUPS)
    released: list = []
    request = RequestSpec("kv-3", 70, 69)
    t, s = g.tables([[1, 2, 3], [4], [5], [6]])
    inbox.expect("d-3", request, t, s, release=released.append)
    sending = outbox.begin("p-3", request, inbox.address, t, s, release=released.append)
    sending.stage(sending.layers[0])  # one layer out, then the engine aborts the request
    outbox.cancel("p-3", "aborted by the engine")
    ended = poll_until(outbox, inbox, count=2, timeout=30)
    states = {e.key: e.state for e in ended}
    assert states["p-3"] is State.FAILED
    assert states["d-3"] in (State.CANCELLED, State.FAILED)
    assert sorted(e.key for e in released) == ["d-3", "p-3"]


def test_state_position_mismatch_fails_both(pair):
    layout, _src, _dst, outbox, inbox = pair
    g = GroupTables(layout, GROUPS)
    t, s = g.tables([[1, 2, 3], [4], [5], [6]])
    inbox.expect("d-4", RequestSpec("kv-4", 70, 69), t, s)  # decode resumes at N-1
    _send(outbox, "p-4", RequestSpec("kv-4", 70, 70), inbox.address, t, s, [])  # prefill shipped N
    ended = {e.key: e for e in poll_until(outbox, inbox, count=2, timeout=30)}
    assert ended["p-4"].state is State.FAILED and "StatePositionMismatch" in ended["p-4"].reason
    assert ended["d-4"].state is not State.DONE


def test_unclaimed_early_transfer_is_dropped(pair):
    layout, _src, _dst, outbox, inbox = pair
    inbox.timeout = 0.3
    g = GroupTables(layout, GROUPS)
    t, s = g.tables([[1, 2, 3], [4], [5], [6]])
    _send(outbox, "p-5", RequestSpec("kv-5", 70, 69), inbox.address, t, s, [])
    deadline = time.monotonic() + 20
    ended: list = []
    while not ended and time.monotonic() < deadline:
        ended = outbox.poll()
        inbox.poll()
        time.sleep(0.01)
    assert ended and ended[0].state in (State.DONE, State.CANCELLED)
    while inbox.unstager.pool.in_use_bytes and time.monotonic() < deadline:
        inbox.poll()
        time.sleep(0.01)
    assert inbox.unstager.pool.in_use_bytes == 0 and not inbox.staged


def test_unreachable_endpoint_fails_lease(pair):
    layout, _src, _dst, outbox, _inbox = pair
    g = GroupTables(layout, GROUPS)
    t, s = g.tables([[1, 2, 3], [4], [5], [6]])
    released: list = []
    sending = outbox.begin("p-6", RequestSpec("kv-6", 70, 69), ("127.0.0.1", 1), t, s, release=released.append)
    sending.stage(0)
    sending.finish()
    assert [(e.key, e.state) for e in outbox.poll()] == [("p-6", State.FAILED)]
    assert len(released) == 1 and "refused" in released[0].reason.lower()


def test_inference_mode_engine_tensors(pair):
    """vLLM allocates its cache and calls the connector under ``torch.inference_mode``; the unstager's thread,
    outside it, still writes into that cache."""
    layout, src, _dst, outbox, _inbox = pair
    with torch.inference_mode():
        dst = allocate_paged_cache(layout, 16, 16, fill="zeros")
    unstager = Unstager(dst, PinnedPool(32 << 20, backend="torch"))
    inbox = Inbox(unstager, key=KEY, timeout=20)
    try:
        g = GroupTables(layout, GROUPS)
        t, s = g.tables([[1, 2, 3], [4], [5], [6]])
        request = RequestSpec("kv-7", 70, 69)
        with torch.inference_mode():
            inbox.expect("d-7", request, t, s)
        _send(outbox, "p-7", request, inbox.address, t, s, [])
        ended = {e.key: e for e in poll_until(outbox, inbox, count=2)}
        assert ended["d-7"].state is State.DONE, ended["d-7"].reason
        assert diff_blocks(request_views(src, t, s, 69), request_views(dst, t, s, 69)) == []
    finally:
        inbox.close()
        unstager.close()


def test_close_lets_sends_in_flight_finish(pair):
    """vLLM's ``LLM.generate`` returns once prefill's one token is out; shutdown must not cut the transfer."""
    layout, _src, _dst, outbox, inbox = pair
    g = GroupTables(layout, GROUPS)
    t, s = g.tables([[1, 2, 3], [4], [5], [6]])
    request = RequestSpec("kv-8", 70, 69)
    inbox.expect("d-8", request, t, s)
    _send(outbox, "p-8", request, inbox.address, t, s, [])
    ended = outbox.close(grace=10)
    assert [(e.key, e.state) for e in ended] == [("p-8", State.DONE)]
    assert [(e.key, e.state) for e in poll_until(inbox)] == [("d-8", State.DONE)]


def test_cancel_while_the_transfer_begins_waits_for_its_handle(pair):
    """The engine cancels (and polls) between the receiver taking the job's buffers and handing over the
    transfer's handle: the lease must not end, nor the buffers go back to the pool, while lanes may write."""
    layout, _src, dst, outbox, _inbox = pair
    in_window: list = []

    class EngineInTheWindow(Inbox):
        def _arrived(self, h):
            self.cancel("kv-9", "aborted by the engine")
            in_window.extend(self.poll())  # the engine thread, running meanwhile
            in_window.append(self.unstager.pool.in_use_bytes)
            super()._arrived(h)

    unstager = Unstager(dst, PinnedPool(32 << 20, backend="torch"))
    inbox = EngineInTheWindow(unstager, key=KEY, timeout=20)
    try:
        g = GroupTables(layout, GROUPS)
        t, s = g.tables([[1, 2, 3], [4], [5], [6]])
        request = RequestSpec("kv-9", 70, 69)
        inbox.expect("d-9", request, t, s)
        _send(outbox, "p-9", request, inbox.address, t, s, [])
        ended = {e.key: e.state for e in poll_until(outbox, inbox, count=2)}
        assert len(in_window) == 1 and in_window[0] > 0  # nothing ended; the buffer still held
        # the engine's cancel reaches the transfer once its handle is handed over; a small transfer may have
        # completed on the wire by then (callbacks run off the protocol threads), and a finished transfer is
        # not un-done: the sender then saw DONE. Either way the engine is told CANCELLED and nothing leaks.
        assert ended["d-9"] is State.CANCELLED and ended["p-9"] in (State.CANCELLED, State.DONE)
        assert unstager.pool.in_use_bytes == 0
    finally:
        inbox.close()
        unstager.close()


def test_duplicate_send_fails_its_own_lease(pair):
    layout, _src, _dst, outbox, inbox = pair
    g = GroupTables(layout, GROUPS)
    t, s = g.tables([[1, 2, 3], [4], [5], [6]])
    released: list = []
    inbox.expect("d-10", RequestSpec("kv-10", 70, 69), t, s)
    first = outbox.begin("p-10", RequestSpec("kv-10", 70, 69), inbox.address, t, s, release=released.append)
    outbox.begin("p-10", RequestSpec("kv-10", 70, 69), inbox.address, t, s, release=released.append)
    for layer in first.layers:
        first.stage(layer)
    first.finish()
    poll_until(outbox, inbox, count=3)
    assert sorted((e.key, e.state.value) for e in released) == [("p-10", "done"), ("p-10", "failed")]


def test_an_engines_tail_parity_setting_is_checked_where_it_is_configured(monkeypatch: pytest.MonkeyPatch) -> None:
    """vLLM's ``tail_parity`` extra config and SGLang's ``KVWIRE_TAIL_PARITY`` go through one check: unset or
    ``auto`` (``connect``'s default), or an int in 0..8 (strings from the environment too), and zfec installed
    unless 0: ``codec.parity.setting``'s, which ``connect`` applies too."""
    from kvwire.adapters import lifecycle
    from kvwire.codec import parity
    from kvwire.errors import LayoutError

    assert lifecycle.tail_parity_setting("0", "X") == 0 and lifecycle.tail_parity_setting(0, "X") == 0
    # unset or "auto": kvwire.connect's own default (parity on a long path when zfec is installed)
    assert lifecycle.tail_parity_setting(None, "X") is None and lifecycle.tail_parity_setting(" Auto", "X") is None
    if parity.available():
        assert lifecycle.tail_parity_setting("3", "X") == 3 and lifecycle.tail_parity_setting(8, "X") == 8
    for bad in (-1, 9, "x", "", True, "2.5", 2.9, 2.0):
        with pytest.raises(LayoutError, match="KVWIRE_TAIL_PARITY"):
            lifecycle.tail_parity_setting(bad, "KVWIRE_TAIL_PARITY")
    monkeypatch.setattr(parity, "available", lambda: False)
    assert lifecycle.tail_parity_setting(0, "X") == 0
    with pytest.raises(LayoutError, match="zfec"):
        lifecycle.tail_parity_setting(2, "X")


def test_a_cancel_with_a_reason_that_is_not_a_str_changes_nothing(pair):
    """``Inbox.cancel``/``Outbox.cancel`` check ``reason`` first. Before, each recorded it (the Inbox's verdict
    CANCELLED, the Outbox's error) and then raised TypeError from the transport: the request was half
    cancelled, its lease ending with an int for a reason."""
    layout, _src, _dst, outbox, inbox = pair
    g = GroupTables(layout, GROUPS)
    released: list = []
    request = RequestSpec("kv-r", 70, 69)
    t, s = g.tables([[1, 2, 3], [4], [5], [6]])
    r = inbox.expect("d-r", request, t, s, release=released.append)
    sending = outbox.begin("p-r", request, inbox.address, t, s, release=released.append)
    for bad in (5, None, b"bytes"):
        with pytest.raises(TypeError, match="reason must be a str"):
            inbox.cancel("kv-r", bad)
        with pytest.raises(TypeError, match="reason must be a str"):
            outbox.cancel("p-r", bad)
    assert r.verdict is None and not sending.error
    # negative control: nothing was cancelled, the transfer goes through
    for layer in sending.layers:
        sending.stage(layer)
    sending.finish()
    ended = poll_until(outbox, inbox, count=2, timeout=30)
    assert {e.key: e.state for e in ended} == {"p-r": State.DONE, "d-r": State.DONE}
    assert sorted(e.key for e in released) == ["d-r", "p-r"]
