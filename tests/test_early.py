"""Chunks before ACCEPT (``kvwire.codec.early``): the receiver advertises an early window in its WELCOME and a
sender puts up to that much of a transfer on the lanes before the ACCEPT comes back.

The engines alone (the sender hands out early chunks up to the window and no further, none to a receiver that
advertised none, a REJECT ends a transfer with early chunks once; the receiver charges, admits, drains and
refuses early chunks by the window), then real loopback sessions: a transfer whose allocator sleeps 300 ms
completes byte-exact with chunks sent during the sleep (negative control: ``early_bytes=0`` sends none before
ACCEPT), a refusing receiver ends such a transfer REJECTED and the session serves the next, and a peer sending
past the window fails only its own session with ``EarlyWindowExceeded``.
"""

from __future__ import annotations

import socket
import time
from typing import Any

import numpy as np
import pytest
from helpers import next_control, payload, raw_sender, wait_until

from kvwire import Receiver, State, connect, plan_segments
from kvwire.codec import early
from kvwire.codec import frames as F
from kvwire.codec.early import EarlyLedger, EarlyWindow
from kvwire.codec.frames import MIN_CHUNK
from kvwire.codec.manifest import build_manifest
from kvwire.codec.rules import NACK_LOST, SENDER_TRANSFER, Offer
from kvwire.codec.rxengine import Admit, AwaitOffer, ReceiverEngine, RxTransfer, Send
from kvwire.codec.transfer import SenderTransfer
from kvwire.codec.txengine import ChunksQueued, Ended, SenderEngine
from kvwire.errors import EarlyWindowExceeded, KvwireError, ProtocolError, TransferFailed
from kvwire.testing.fixtures import default_request, load_fixture

LAYOUT = load_fixture("tiny-llama")  # 2 MiB a request: 32 chunks of 64 KiB
CHUNK = MIN_CHUNK
WINDOW = EarlyWindow(per_transfer=3 * CHUNK, per_session=4 * CHUNK, transfers=2)


def _manifest(tid: int):  # type: ignore[no-untyped-def]
    return build_manifest(tid, LAYOUT, default_request(f"r{tid}"), CHUNK)


# ---------------------------------------------------------------- the advertisement


def test_window_is_advertised_and_read_back_and_absent_means_none() -> None:
    w = EarlyWindow.for_receiver(64 << 20)
    assert w is not None and early.parse({"max_chunk": 1, **w.advertise()}) == w
    assert EarlyWindow.for_receiver(0) is None
    assert early.parse({"max_chunk": 1 << 24, "max_probe_bytes": 1}) is None  # an older receiver: no window
    assert early.parse({**w.advertise(), "early_bytes": "64"}) is None  # malformed: not risked
    with pytest.raises(ValueError):
        EarlyWindow.for_receiver(-1)
    with pytest.raises(ValueError):
        Receiver(early_bytes=-1)


def test_rules_table_lets_only_a_lost_nack_precede_the_answer() -> None:
    offered = SENDER_TRANSFER[Offer.OFFERED]
    assert offered[NACK_LOST] is Offer.OFFERED and offered[F.ACCEPT] is Offer.ACCEPTED
    assert offered[F.ACK] is Offer.ACCEPTED and offered[F.REJECT] is None


# ---------------------------------------------------------------- the sender's engine


def _sender(window: EarlyWindow | None) -> SenderEngine:
    e = SenderEngine(peer_timeout=10.0, heartbeat=1.0)
    e.opened(0.0, window)
    return e


def _offer(e: SenderEngine, tid: int) -> SenderTransfer:
    m = _manifest(tid)
    sm = SenderTransfer(m, m.plan())
    assert e.start(sm, None).kind == F.BEGIN
    for layer in range(LAYOUT.num_layers):
        e.layer_ready(tid, layer)
    return sm


def _picks(e: SenderEngine, lane: int = 0) -> list[tuple[int, int]]:
    out = []
    while (p := e.pick(lane)) is not None:
        out.append(p)
    return out


def test_sender_hands_out_early_chunks_up_to_the_window_and_no_further() -> None:
    e = _sender(WINDOW)
    sm = _offer(e, 1)
    lengths = sm.plan.lengths  # 60 or 64 KiB each
    assert [c for _, c in _picks(e)] == [0, 1, 2]  # the window per transfer holds 3 of them, not 4
    assert e.early_held() == sum(lengths[:3]) <= WINDOW.per_transfer < sum(lengths[:4])
    assert e.receive(F.ACCEPT, {"tid": 1}, 0.1) == (ChunksQueued(),)
    assert e.early_held() == 0
    assert len(_picks(e)) == sm.plan.num_chunks - 3  # the rest flows once accepted


def test_sender_without_an_advertised_window_waits_for_accept() -> None:
    e = _sender(None)
    _offer(e, 1)
    assert e.pick(0) is None and e.early_window is None
    e.receive(F.ACCEPT, {"tid": 1}, 0.1)
    assert e.pick(0) == (1, 0)


def test_sender_bounds_the_session_and_the_transfers_with_early_chunks() -> None:
    e = _sender(WINDOW)
    for tid in (1, 2, 3):
        _offer(e, tid)
    got = _picks(e)
    held = e.early_held()
    assert WINDOW.per_session - CHUNK < held <= WINDOW.per_session  # the session's window, nearly all of it
    assert {tid for tid, _ in got} == {1, 2}  # over at most 2 transfers
    e.receive(F.REJECT, {"tid": 1, "reason": "no"}, 0.1)  # answered: its charge goes, transfer 3 may start
    assert {tid for tid, _ in _picks(e)} == {2, 3} and e.early_held() <= WINDOW.per_session


def test_reject_after_early_chunks_ends_the_transfer_once() -> None:
    e = _sender(WINDOW)
    _offer(e, 1)
    _picks(e)
    assert e.lane_busy(0)
    out = e.receive(F.REJECT, {"tid": 1, "reason": "no room"}, 0.1)
    ended = [a for a in out if isinstance(a, Ended)]
    assert ended == [Ended(1, State.FAILED, "receiver rejected the transfer: no room")]
    assert not e.lane_busy(0) and not e.busy and e.early_held() == 0
    assert e.receive(F.REJECT, {"tid": 1, "reason": "again"}, 0.2) == ()  # nothing more, ever
    assert e.receive(F.NACK, {"tid": 1, "c": [0], "lost": True}, 0.3) == ()
    assert e.counts()["transfers_failed"] == 1


def test_lost_nack_before_accept_resends_without_releasing_the_charge() -> None:
    e = _sender(WINDOW)
    _offer(e, 1)
    _picks(e)
    e.receive(F.NACK, {"tid": 1, "c": [0], "lost": True}, 0.1)
    assert e.early_held() > WINDOW.per_transfer - CHUNK and e.pick(0) is None  # spent: the re-send waits
    e.receive(F.ACCEPT, {"tid": 1}, 0.2)
    assert e.pick(0) == (1, 0)  # re-sent first, once accepted


def test_an_ack_overtaking_the_accept_counts_as_accepted() -> None:
    e = _sender(WINDOW)
    _offer(e, 1)
    _picks(e)
    e.receive(F.ACK, {"tid": 1, "c": [0]}, 0.1)
    assert e.early_held() == 0 and e.pick(0) == (1, 3)
    assert e.receive(F.ACCEPT, {"tid": 1}, 0.2) == (ChunksQueued(),)  # the late ACCEPT is harmless


def test_a_transfer_ended_here_keeps_its_charge_until_the_receiver_answers() -> None:
    """The receiver still counts it until it sends its answer: releasing at the cancel could overrun it."""
    e = _sender(WINDOW)
    _offer(e, 1)
    _picks(e)
    held = e.early_held()
    e.cancel(1, "user")
    assert e.early_held() == held > 0
    e.receive(F.ACCEPT, {"tid": 1}, 0.1)
    assert e.early_held() == 0


# ---------------------------------------------------------------- the receiver's engine


def _receiver(window: EarlyWindow | None) -> ReceiverEngine:
    return ReceiverEngine(F.DEFAULT_LIMITS, max_transfers=8, max_probe_bytes=0, transfer_timeout=30.0,
                          peer_timeout=10.0, heartbeat=1.0, now=0.0, early=window)


def _header(tid: int, chunk: int) -> F.Header:
    p = _manifest(tid).plan()
    return F.Header(F.KIND_DATA, 1, tid, chunk, p.layers[chunk], p.offsets[chunk], p.lengths[chunk], 1000 + chunk)


def test_receiver_without_a_window_refuses_a_chunk_before_its_transfer() -> None:
    with pytest.raises(ProtocolError, match="unknown transfer"):
        _receiver(None).chunk_admit(0, _header(1, 0))


def test_receiver_holds_an_early_chunk_until_the_transfer_is_placed_then_reads_it() -> None:
    e = _receiver(WINDOW)
    h = _header(1, 0)
    assert e.chunk_admit(0, h) == AwaitOffer(1) and e.awaiting(1)
    (admit,) = e.receive(F.BEGIN, _manifest(1).to_wire(with_layout=True), 0.1)
    assert type(admit) is Admit
    assert e.activate(admit.manifest, 0.2) == [Send(F.ACCEPT, {"tid": 1})]
    assert not e.awaiting(1) and e.early.total == 0
    t = e.chunk_admit(0, h, waited=True)
    assert isinstance(t, RxTransfer)
    assert e.chunk_done(t, 0, h, 1000, 0.3).reply == Send(F.ACK, {"tid": 1, "c": [0]})
    assert e.counts()["early_bytes"] == h.length


def test_receiver_drains_early_chunks_of_a_refused_transfer_silently() -> None:
    e = _receiver(WINDOW)
    assert e.chunk_admit(0, _header(1, 0)) == AwaitOffer(1)
    e.refuse(1, "no destination", 0.1)
    assert not e.awaiting(1)
    assert e.chunk_admit(0, _header(1, 0), waited=True) is None
    assert e.chunk_drained(_header(1, 0), 0.2) is None  # the REJECT told the sender
    assert e.chunk_admit(1, _header(1, 1)) is None and e.early.total == 0  # later ones: drained, not charged


def test_receiver_asks_again_for_an_early_chunk_still_unanswered_after_the_wait() -> None:
    e = _receiver(WINDOW)
    assert e.chunk_admit(0, _header(1, 0)) == AwaitOffer(1)
    assert e.chunk_admit(0, _header(1, 0), waited=True) is None
    assert e.chunk_drained(_header(1, 0), 1.0) == Send(F.NACK, {"tid": 1, "c": [0], "lost": True})
    assert e.early.total == _header(1, 0).length  # still charged: the sender counts it until the answer too
    assert e.counts()["early_chunks_dropped"] == 1


@pytest.mark.parametrize("tids", [(1, 1, 1, 1), (1, 2, 2, 2, 1), (1, 2, 3)])
def test_receiver_fails_a_sender_past_the_window(tids: tuple[int, ...]) -> None:
    """4 chunks of one transfer (window 3), 5 over two (session 4), a third transfer (at most 2)."""
    e = _receiver(WINDOW)
    chunks = {tid: 0 for tid in tids}
    for tid in tids[:-1]:
        assert e.chunk_admit(0, _header(tid, chunks[tid])) == AwaitOffer(tid)
        chunks[tid] += 1
    with pytest.raises(EarlyWindowExceeded, match="early chunks exceed"):
        e.chunk_admit(0, _header(tids[-1], chunks[tids[-1]]))


def test_ledger_room_is_the_tighter_of_transfer_and_session() -> None:
    led = EarlyLedger(WINDOW)
    led.charge(1, 2 * CHUNK)
    assert led.room(1) == CHUNK and led.room(2) == 2 * CHUNK
    led.charge(2, 2 * CHUNK)
    assert led.room(1) == 0 and led.room(3) == 0
    led.release(1)
    assert led.room(3) == 2 * CHUNK and led.total == 2 * CHUNK


# ---------------------------------------------------------------- real sessions on loopback


def _dest() -> np.ndarray:
    return np.zeros(sum(s.nbytes for s in plan_segments(LAYOUT, default_request("x"))), np.uint8)


@pytest.mark.parametrize("early_bytes", [64 << 20, 256 << 10, 0])
def test_slow_allocator_overlaps_early_chunks_and_completes_byte_exact(early_bytes: int, no_leaks: None) -> None:
    """The allocator sleeps 300 ms: with a window, chunks are on the wire meanwhile (at most the window);
    with ``early_bytes=0`` (the negative control) none leaves before the ACCEPT."""
    seen: dict[str, Any] = {}

    def slow_alloc(m: Any) -> np.ndarray:
        time.sleep(0.3)
        seen["sent_before_accept"] = seen["session"].stats()["bytes_sent"]
        return np.zeros(m.total_bytes, np.uint8)

    req = default_request("slow")
    src = payload(LAYOUT, req)
    with Receiver(key="k", allocator=slow_alloc, early_bytes=early_bytes) as rx, \
            connect(*rx.address, key="k", lanes=2, chunk_size=CHUNK) as s:
        seen["session"] = s
        h = s.send(LAYOUT, req)
        h.write_all(src)
        h.finish().result(10)
        h_rx = rx.next_transfer(timeout=10)
        h_rx.result(10)
        assert np.concatenate([a.ravel() for a in src]).tobytes() == h_rx.dest.tobytes()
        stats = rx.stats()
    sent = seen["sent_before_accept"]
    print(f"\nearly_bytes={early_bytes}: {sent} bytes sent before the ACCEPT, {stats.get('early_bytes', 0)} "
          "arrived early")
    if early_bytes == 0:
        assert sent == 0 and stats.get("early_bytes", 0) == 0
    else:
        assert 0 < sent <= min(early_bytes, src_bytes(src)) and stats["early_bytes"] > 0
    assert stats["transfers_done"] == 1


def src_bytes(src: list[np.ndarray]) -> int:
    return sum(a.nbytes for a in src)


def test_refused_transfer_with_early_chunks_ends_rejected_and_the_session_serves_on(no_leaks: None) -> None:
    def refusing(m: Any) -> np.ndarray:
        time.sleep(0.2)  # chunks arrive meanwhile
        raise MemoryError("no room for it")

    req = default_request("refused")
    src = payload(LAYOUT, req)
    with Receiver(key="k", allocator=refusing) as rx, \
            connect(*rx.address, key="k", lanes=2, chunk_size=CHUNK) as s:
        h = s.send(LAYOUT, req)
        h.write_all(src)
        with pytest.raises(TransferFailed, match="rejected.*no room"):
            h.finish().result(10)
        assert h.state is State.FAILED
        assert rx.stats()["early_bytes"] > 0
        nxt = default_request("next")
        dst = _dest()
        h_rx = rx.expect(nxt.request_id, dst, layout=LAYOUT)
        src2 = payload(LAYOUT, nxt, seed=1)
        h2 = s.send(LAYOUT, nxt)
        h2.write_all(src2)
        h2.finish().result(10)
        h_rx.result(10)
        assert np.concatenate([a.ravel() for a in src2]).tobytes() == dst.tobytes()
        assert s.stats()["transfers_failed"] == 1 and s.stats()["transfers_done"] == 1


def test_peer_sending_past_the_window_fails_its_session_only(uncaught: list, no_leaks: None) -> None:  # type: ignore[type-arg]
    """An authenticated peer puts 128 KiB of a transfer it never offered on a lane; the window is 64 KiB."""
    from kvwire.tcp import Channel
    from kvwire.tcp._auth import client_lane  # noqa: PLC2701 - a raw lane, as an attacker opens one

    with Receiver(key="k", early_bytes=CHUNK) as rx:
        raw, ctrl, keys, limits = raw_sender(rx.address, b"k")
        assert early.parse(limits) == EarlyWindow(CHUNK, 2 * CHUNK, early.EARLY_TRANSFERS)
        lane = Channel(socket.create_connection(rx.address), F.DEFAULT_LIMITS)
        with raw, lane.sock:
            client_lane(lane, b"k", keys, 0)
            body = bytes(2 * CHUNK)
            lane.send_parts([F.pack_data_header(5, 0, 0, 0, len(body), None), body])
            kind, reply = next_control(ctrl)
            assert kind == F.ERROR and "early chunks exceed" in reply["reason"], reply
            assert wait_until(lambda: rx.sessions == 0, 2)
            assert rx.stats()["bytes_received"] == 0
        # the receiver serves the next sender as before
        req = default_request("after")
        dst = _dest()
        h_rx = rx.expect(req.request_id, dst, layout=LAYOUT)
        with connect(*rx.address, key="k", lanes=2, chunk_size=CHUNK) as s:
            h = s.send(LAYOUT, req)
            h.write_all(payload(LAYOUT, req))
            h.finish().result(10)
        h_rx.result(10)
    assert uncaught == []


def test_typed_error_is_a_protocol_error() -> None:
    assert issubclass(EarlyWindowExceeded, ProtocolError) and issubclass(EarlyWindowExceeded, KvwireError)
