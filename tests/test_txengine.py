"""The sending end's protocol engine alone, without sockets, threads or clocks.

Every row of the sender's rules table on an open connection (each legal message handled, every other
kind in every state a ``ProtocolError``), deadlines, heartbeats and silence from a given ``now``, acks,
re-sends, counters, lanes dying, reconnects; and a property test over random orders of legal and
illegal messages and events: only typed errors, exactly one ``Ended`` per transfer, nothing after ``Fail``.
"""

from __future__ import annotations

import random
from collections import Counter
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvwire.codec import frames as F
from kvwire.codec.frames import MIN_CHUNK
from kvwire.codec.layout import CacheSpec, LayerSpec, ModelLayout, RequestSpec, TensorSpec
from kvwire.codec.manifest import build_manifest
from kvwire.codec.rules import SENDER_RECEIVES, Conn
from kvwire.codec.transfer import SenderTransfer, State, transfer_digest
from kvwire.codec.txengine import (
    COUNT_KEYS,
    ChunksQueued,
    Ended,
    Fail,
    LayersAcked,
    Send,
    SenderEngine,
)
from kvwire.errors import KvwireError, ProtocolError


def _layout() -> ModelLayout:
    gqa = CacheSpec("gqa", (TensorSpec("k", (2, 64), "bfloat16", "NHD", "token"),
                            TensorSpec("v", (2, 64), "bfloat16", "NHD", "token")))
    return ModelLayout("tx", tuple(LayerSpec(i, (gqa,) if i != 1 else ()) for i in range(3)))  # layer 1: no bytes


LAYOUT = _layout()
T0 = 1000.0


def _sm(tid: int, tokens: int = 600, hashed: bool = True, sink: bool = False, retries: int = 2) -> SenderTransfer:
    m = build_manifest(tid, LAYOUT, RequestSpec(f"r{tid}", tokens, tokens - 1), MIN_CHUNK, hashed, sink)
    return SenderTransfer(m, m.plan(), retries)


def _engine(reconnect: bool = False) -> SenderEngine:
    e = SenderEngine(peer_timeout=10.0, heartbeat=1.0, reconnect=reconnect)
    assert e.opened(T0) == 1
    return e


def _running(e: SenderEngine, tid: int = 7, **kw: Any) -> SenderTransfer:
    """A transfer begun, accepted and with every layer written."""
    sm = _sm(tid, **kw)
    begin = e.start(sm, None)
    assert begin.kind == F.BEGIN and begin.body is not None and begin.body["tid"] == tid
    assert e.receive(F.ACCEPT, {"tid": tid}, T0) == (ChunksQueued(),)
    for layer in range(LAYOUT.num_layers):
        assert e.layer_ready(tid, layer)
    return sm


def _drain(e: SenderEngine, lane: int = 0) -> list[tuple[int, int]]:
    out = []
    while (p := e.pick(lane)) is not None:
        e.sent(p[0], p[1], 1000 + p[1])
        out.append(p)
    return out


def _ended(actions: Any) -> list[Ended]:
    return [a for a in actions if isinstance(a, Ended)]


# ---------------------------------------------------------------- the rules table, row by row

OPEN_KINDS = sorted(SENDER_RECEIVES[Conn.OPEN])
ILLEGAL_WHEN_OPEN = sorted(F.CONTROL_KINDS - set(OPEN_KINDS))


def test_the_table_names_what_an_open_sender_handles() -> None:
    assert set(OPEN_KINDS) == {F.ACCEPT, F.REJECT, F.ACK, F.NACK, F.COMPLETE, F.CANCEL, F.ERROR, F.HEARTBEAT, F.BYE}
    assert ILLEGAL_WHEN_OPEN  # hello, challenge, auth, welcome, lane, begin, done


@pytest.mark.parametrize("kind", ILLEGAL_WHEN_OPEN)
def test_every_other_kind_on_an_open_connection_is_a_protocol_error(kind: str) -> None:
    e = _engine()
    _running(e)
    with pytest.raises(ProtocolError, match=f"unexpected {kind!r}.*'open'"):
        e.receive(kind, {"tid": 7}, T0)


@pytest.mark.parametrize("kind", sorted(F.CONTROL_KINDS))
@pytest.mark.parametrize("how", ["never opened", "failed", "closed", "bye", "down"])
def test_nothing_is_legal_once_the_connection_is_closed(kind: str, how: str) -> None:
    e = SenderEngine(peer_timeout=10.0, heartbeat=1.0, reconnect=how == "down")
    if how != "never opened":
        e.opened(T0)
        _running(e)
    if how in ("failed", "down"):
        e.fail("test")
    elif how == "closed":
        e.close()
    elif how == "bye":
        e.receive(F.BYE, {}, T0)
    with pytest.raises(ProtocolError, match="'closed'"):
        e.receive(kind, {"tid": 7}, T0)
    assert e.tick(T0 + 100) == []  # no heartbeat, no silence verdict, no deadline on a dead connection


def test_accept_lets_the_lanes_pick_round_robin_over_transfers() -> None:
    e = _engine()
    a, b = _sm(1), _sm(2)
    e.start(a, None)
    e.start(b, None)
    for tid in (1, 2):
        for layer in range(3):
            e.layer_ready(tid, layer)
    assert e.pick(0) is None  # written but not accepted
    assert e.receive(F.ACCEPT, {"tid": 2}, T0) == (ChunksQueued(),)
    assert [e.pick(0)[0] for _ in range(2)] == [2, 2]  # type: ignore[index]
    e.receive(F.ACCEPT, {"tid": 1}, T0)
    picks = [e.pick(1) for _ in range(4)]
    assert {p[0] for p in picks if p} == {1, 2}  # interleaved
    assert e.lane_busy(0) and e.lane_busy(1) and not e.lane_busy(2)


def test_acks_report_layers_once_and_the_last_one_sends_done_with_the_digest() -> None:
    e = _engine()
    sm = _running(e)
    sent = _drain(e)
    n = sm.plan.num_chunks
    assert sorted(c for _, c in sent) == list(range(n)) and n > 2
    layer0 = list(sm.plan.layer_chunks[0])
    out = e.receive(F.ACK, {"tid": 7, "c": layer0}, T0 + 1)
    assert out == [LayersAcked(7, (0,))]
    assert e.acked_at(0) == T0 + 1
    assert e.receive(F.ACK, {"tid": 7, "c": layer0}, T0 + 1) == ()  # a repeat: nothing new
    rest = [c for c in range(n) if c not in layer0]
    out = e.receive(F.ACK, {"tid": 7, "c": rest}, T0 + 2)
    digest = transfer_digest([1000 + c for c in range(n)])
    assert out == [LayersAcked(7, (2,)), Send(F.DONE, {"tid": 7, "digest": digest})]
    assert not e.lane_busy(0)
    assert e.receive(F.ACK, {"tid": 7, "c": rest}, T0 + 2) == ()  # DONE goes once
    assert _ended(e.receive(F.COMPLETE, {"tid": 7}, T0 + 3)) == [Ended(7, State.DONE, "")]
    assert e.counts()["transfers_done"] == 1 and not e.busy


def test_to_a_receiver_that_holds_an_early_done_it_goes_with_the_last_chunk_sent_once() -> None:
    """``done_early`` (the receiver's WELCOME says so): DONE goes as the last chunk first goes out, one round
    trip before its ACK would bring it, with every chunk's hash; re-sends (NACK) and the ACKs bring no second
    one. Negative control: without it, sending everything brings nothing and DONE follows the last ACK."""
    for early in (True, False):
        e = SenderEngine(peer_timeout=10.0, heartbeat=1.0)
        e.opened(T0, None, early)
        sm = _running(e)
        n = sm.plan.num_chunks
        dones = []
        for k in range(n):
            p = e.pick(k % 2)
            assert p is not None
            out = e.sent(p[0], p[1], 1000 + p[1])
            dones += [(k, a) for a in out]
        digest = transfer_digest([1000 + c for c in range(n)])
        if early:
            assert dones == [(n - 1, Send(F.DONE, {"tid": 7, "digest": digest}))]
            assert e.receive(F.NACK, {"tid": 7, "c": [1]}, T0) == (ChunksQueued(),)
            assert e.pick(0) == (7, 1) and e.sent(7, 1, 1001) == ()  # a re-send: the same bytes, no new DONE
        else:
            assert dones == []
        out = e.receive(F.ACK, {"tid": 7, "c": list(range(n))}, T0 + 1)
        assert (Send(F.DONE, {"tid": 7, "digest": digest}) in out) is not early
        assert _ended(e.receive(F.COMPLETE, {"tid": 7}, T0 + 2)) == [Ended(7, State.DONE, "")]



def test_done_waits_for_the_hash_of_a_chunk_acknowledged_before_its_lane_hashed_it() -> None:
    """A chunk the receiver rebuilt from tail parity is acknowledged without its copy: its lane may not have
    hashed it yet (it took the last data chunk, which let the parity go, and was descheduled). DONE went with
    the last ACK and a 0 for that chunk's hash: the receiver failed the transfer with "whole-transfer digest
    mismatch" (the reshard tail-parity test's flake). Now DONE goes once every chunk is acknowledged and hashed,
    with or without ``done_early``; a transfer whose hashes came first still gets it with the last ACK."""
    for early in (True, False):
        e = SenderEngine(peer_timeout=10.0, heartbeat=1.0)
        e.opened(T0, None, early)
        sm = _running(e)
        n = sm.plan.num_chunks
        picked = [e.pick(k % 2) for k in range(n)]
        assert None not in picked and e.pick(0) is None
        for p in picked[:-1]:
            assert p is not None and e.sent(p[0], p[1], 1000 + p[1]) == ()
        out = e.receive(F.ACK, {"tid": 7, "c": list(range(n))}, T0 + 1)  # the last one rebuilt, not received
        assert not any(isinstance(a, Send) and a.kind == F.DONE for a in out), out
        digest = transfer_digest([1000 + c for c in range(n)])
        assert e.sent(7, n - 1, 1000 + n - 1) == [Send(F.DONE, {"tid": 7, "digest": digest})]
        assert e.receive(F.ACK, {"tid": 7, "c": [n - 1]}, T0 + 2) == ()  # DONE goes once
        assert _ended(e.receive(F.COMPLETE, {"tid": 7}, T0 + 3)) == [Ended(7, State.DONE, "")]


def test_a_complete_that_overtakes_acks_reports_their_layers_first_and_each_once() -> None:
    """With an early DONE, the receiver's COMPLETE can reach the sender before an ACK another lane's thread
    was still writing: COMPLETE means every chunk is verified, so the layers not yet reported are, in plan
    order, before the transfer ends (``on_layer_acked`` sees every layer once); the late ACK is ignored."""
    e = SenderEngine(peer_timeout=10.0, heartbeat=1.0)
    e.opened(T0, None, True)
    sm = _running(e)
    _drain(e)
    layer0 = list(sm.plan.layer_chunks[0])
    assert e.receive(F.ACK, {"tid": 7, "c": layer0}, T0 + 1) == [LayersAcked(7, (0,))]
    out = e.receive(F.COMPLETE, {"tid": 7}, T0 + 2)
    assert out == [LayersAcked(7, (2,)), Ended(7, State.DONE, "")]
    assert e.receive(F.ACK, {"tid": 7, "c": list(sm.plan.layer_chunks[2])}, T0 + 3) == ()


def test_unhashed_transfer_sends_a_zero_digest_and_a_chunkless_one_is_done_at_finish() -> None:
    e = _engine()
    sm = _running(e, hashed=False)
    sent = _drain(e)
    out = e.receive(F.ACK, {"tid": 7, "c": [c for _, c in sent]}, T0)
    assert Send(F.DONE, {"tid": 7, "digest": 0}) in out
    assert sm.plan.num_chunks
    m = build_manifest(8, ModelLayout("mlp", (LayerSpec(0, ()),)), RequestSpec("r8", 4, 3), MIN_CHUNK)
    empty = SenderTransfer(m, m.plan())
    e.start(empty, None)
    assert empty.plan.num_chunks == 0
    assert e.finish(8) == [Send(F.DONE, {"tid": 8, "digest": empty.digest()})]
    assert e.finish(8) == ()


def test_nack_resends_first_counts_and_fails_past_max_retries() -> None:
    e = _engine()
    _running(e, retries=2)
    _drain(e)
    for attempt in (1, 2):
        assert e.receive(F.NACK, {"tid": 7, "c": [3]}, T0) == (ChunksQueued(),)
        assert e.pick(1) == (7, 3)  # the re-send goes before anything else, on any lane
        assert e.counts()["chunks_nacked"] == attempt
    out = e.receive(F.NACK, {"tid": 7, "c": [3]}, T0)
    assert out == [Send(F.CANCEL, {"tid": 7, "reason": "chunk 3 failed verification 3 times", "state": "failed"}),
                   Ended(7, State.FAILED, "chunk 3 failed verification 3 times")]
    assert e.counts()["transfers_failed"] == 1 and not e.lane_busy(0) and not e.lane_busy(1)


def test_nack_lost_resends_without_a_retry_and_held_only_frees_the_lane() -> None:
    e = _engine()
    sm = _running(e, retries=0)
    _drain(e, lane=4)
    assert e.receive(F.NACK, {"tid": 7, "c": [2], "held": True}, T0 + 5) == ()
    assert e.acked_at(4) == T0 + 5 and e.pick(0) is None  # still in flight, owned by no lane
    assert e.receive(F.NACK, {"tid": 7, "c": [2], "lost": True}, T0 + 6) == (ChunksQueued(),)
    assert sm.retries[2] == 0 and e.pick(0) == (7, 2)
    assert e.counts()["chunks_requeued"] == 1 and e.counts()["chunks_nacked"] == 0


def test_nack_lost_is_bounded_per_chunk() -> None:
    """A receiver that answers every copy of a chunk with ``lost`` (a trial's broken receiver: 56.7 GB re-sent
    of a 46 MB transfer in 15 s, for ever without a deadline) fails the transfer after MAX_LOST_RESENDS."""
    from kvwire.codec.transfer import MAX_LOST_RESENDS

    e = _engine()
    sm = _running(e, retries=0)
    _drain(e)
    for _ in range(MAX_LOST_RESENDS):
        assert e.receive(F.NACK, {"tid": 7, "c": [2], "lost": True}, T0) == (ChunksQueued(),)
        assert e.pick(0) == (7, 2)
    reason = f"the receiver asked for chunk 2 again as lost {MAX_LOST_RESENDS + 1} times"
    assert e.receive(F.NACK, {"tid": 7, "c": [2], "lost": True}, T0) == [
        Send(F.CANCEL, {"tid": 7, "reason": reason, "state": "failed"}), Ended(7, State.FAILED, reason)]
    assert sm.retries[2] == 0


@pytest.mark.parametrize(("kind", "body", "state", "reason"), [
    (F.COMPLETE, {}, State.DONE, ""),
    (F.REJECT, {"reason": "full"}, State.FAILED, "receiver rejected the transfer: full"),
    (F.ERROR, {"reason": "late", "state": "timed_out"}, State.TIMED_OUT, "receiver timed out: late"),
    (F.ERROR, {"reason": "bad"}, State.FAILED, "receiver failed the transfer: bad"),
    (F.CANCEL, {"reason": "bye"}, State.CANCELLED, "cancelled by receiver: bye"),
])
@pytest.mark.parametrize("sink", [False, True])
def test_terminal_messages_end_the_transfer_once_and_count_it(kind: str, body: dict[str, Any], state: State,
                                                              reason: str, sink: bool) -> None:
    e = SenderEngine(peer_timeout=10.0, heartbeat=1.0)
    assert e.opened(T0, done_early=True) == 1  # (DONE goes with the last chunk: COMPLETE may answer it)
    _running(e, sink=sink, hashed=not sink)
    _drain(e)
    out = e.receive(kind, {"tid": 7, **body}, T0)
    # (COMPLETE says every chunk was verified: the layers whose ACKs it overtook are reported first)
    assert out == [*([LayersAcked(7, (0, 2))] if kind == F.COMPLETE else []), Ended(7, state, reason)]
    assert not e.lane_busy(0) and e.pick(0) is None
    assert e.receive(kind, {"tid": 7, **body}, T0) == ()  # late: the transfer has ended
    c = e.counts()
    assert c[f"{'probes' if sink else 'transfers'}_{state.value}"] == 1
    assert sum(c[k] for k in COUNT_KEYS if k.startswith(("transfers_", "probes_"))) == 1


def test_a_complete_before_done_fails_the_transfer() -> None:
    """COMPLETE answers DONE: one that comes first (a trial's receiver answered BEGIN with it, and the transfer
    ended DONE with no byte sent, every layer reported acked) fails the transfer instead."""
    e = _engine()
    _running(e)
    out = e.receive(F.COMPLETE, {"tid": 7}, T0)
    reason = "the receiver sent COMPLETE before this side sent DONE"
    assert out == [Send(F.CANCEL, {"tid": 7, "reason": reason, "state": "failed"}), Ended(7, State.FAILED, reason)]


def test_a_receivers_reason_is_text_and_bounded() -> None:
    """A 1 MiB reason became a 1,048,608-character TransferFailed message; a dict was stringified into it."""
    from kvwire.codec.messages import MAX_REASON

    e = _engine()
    _running(e)
    out = e.receive(F.REJECT, {"tid": 7, "reason": "x" * (1 << 20)}, T0)
    assert len(_ended(out)[0].reason) < MAX_REASON + 64
    _running(e, tid=8)
    with pytest.raises(ProtocolError, match="reason"):
        e.receive(F.REJECT, {"tid": 8, "reason": {"a": 1}}, T0)


def test_heartbeat_is_only_a_sign_of_life() -> None:
    e = _engine()
    assert e.receive(F.HEARTBEAT, {}, T0 + 9) == ()
    assert e.tick(T0 + 18) == [Send(F.HEARTBEAT)]  # 9 s after the heartbeat: not silent yet
    assert isinstance(e.tick(T0 + 19.5)[-1], Fail)


def test_bye_and_a_session_error_fail_the_connection() -> None:
    e = _engine()
    _running(e)
    out = e.receive(F.BYE, {}, T0)
    assert out == [Ended(7, State.FAILED, "control connection: receiver closed the session"),
                   Fail("control connection: receiver closed the session", False)]
    assert e.closed and e.failure.endswith("closed the session")
    with pytest.raises(KvwireError, match="session closed"):
        e.start(_sm(8), None)
    e2 = _engine()
    assert e2.receive(F.ERROR, {"reason": "too many"}, T0) == [
        Fail("control connection: receiver error: too many", False)]
    assert e2.fail("again") == []  # once


@pytest.mark.parametrize("body", [{"tid": 7}, {"tid": 7, "c": 3}, {"tid": 7, "c": [1, "x"]},
                                  {"tid": 7, "c": [10**6]}, {"tid": 7, "c": [-1]}])
@pytest.mark.parametrize("kind", [F.ACK, F.NACK])
def test_malformed_acks_are_protocol_errors(kind: str, body: dict[str, Any]) -> None:
    e = _engine()
    _running(e)
    with pytest.raises(ProtocolError):
        e.receive(kind, body, T0)


def test_messages_for_unknown_transfers_are_ignored() -> None:
    e = _engine()
    for kind in (F.ACCEPT, F.ACK, F.NACK, F.COMPLETE, F.REJECT, F.CANCEL, F.ERROR):
        assert e.receive(kind, {"tid": 99, "c": "junk"}, T0) == ()
        assert e.receive(kind, {"tid": "x"}, T0) == ()


# ---------------------------------------------------------------- time, lanes, generations


def test_tick_heartbeats_expires_deadlines_and_notices_silence() -> None:
    e = _engine()
    e.start(_sm(1), T0 + 5)
    e.start(_sm(2), None)
    assert e.tick(T0) == [Send(F.HEARTBEAT)]
    assert e.tick(T0 + 0.5) == []
    assert e.tick(T0 + 1.0) == [Send(F.HEARTBEAT)]
    assert e.tick(T0 + 5.0) == [Send(F.HEARTBEAT)]  # at the deadline, not past it
    out = e.tick(T0 + 5.5)
    assert out == [Send(F.CANCEL, {"tid": 1, "reason": "transfer deadline passed", "state": "timed_out"}),
                   Ended(1, State.TIMED_OUT, "transfer deadline passed")]
    assert e.counts()["transfers_timed_out"] == 1
    out = e.tick(T0 + 10.5)
    assert out == [Ended(2, State.FAILED, "receiver silent for 10.5s"), Fail("receiver silent for 10.5s", False)]


def test_a_dead_lane_requeues_its_chunks_and_a_stale_generation_does_nothing() -> None:
    e = _engine(reconnect=True)
    sm = _running(e)
    on0 = _drain(e, lane=0)
    e.receive(F.ACK, {"tid": 7, "c": [on0[0][1]]}, T0)
    assert e.lane_lost(0, gen=0) == 0  # an older generation's lane
    assert e.lane_lost(0, gen=1) == len(on0) - 1
    assert not e.lane_busy(0) and e.counts()["chunks_requeued"] == len(on0) - 1
    again = _drain(e, lane=1)
    assert sorted(c for _, c in again) == sorted(c for _, c in on0[1:])
    assert sm.retries == [0] * sm.plan.num_chunks  # a lost lane is no failed verification
    e.lane_reopened()
    assert e.counts()["lane_reconnects"] == 1


def test_reconnect_keeps_the_session_and_starts_a_new_generation() -> None:
    e = _engine(reconnect=True)
    first = e.start(_sm(1), None)
    assert "layout" in first.body  # type: ignore[operator]
    assert "layout" not in e.start(_sm(2), None).body  # type: ignore[operator]
    out = e.fail("gone", gen=1)
    assert _ended(out) == [Ended(1, State.FAILED, "gone"), Ended(2, State.FAILED, "gone")]
    assert out[-1] == Fail("gone", True) and e.down and not e.closed and not e.current(1)
    with pytest.raises(KvwireError, match="reconnecting"):
        e.start(_sm(3), None)
    assert e.opened(T0 + 50) == 2 and e.current(2) and not e.current(1)
    assert e.counts()["session_reconnects"] == 1
    assert "layout" in e.start(_sm(3), None).body  # type: ignore[operator]  # a new receiver session
    assert e.fail("stale", gen=1) == []


def test_close_cancels_each_transfer_then_says_bye_unless_down() -> None:
    e = _engine()
    e.start(_sm(1), None)
    out = e.close()
    assert out == [Send(F.CANCEL, {"tid": 1, "reason": "session closed", "state": "cancelled"}),
                   Ended(1, State.CANCELLED, "session closed"), Send(F.BYE)]
    assert e.close() == [] and e.closed
    d = _engine(reconnect=True)
    d.fail("gone")
    assert d.close() == []


def test_cancel_by_the_user() -> None:
    e = _engine()
    _running(e)
    out = e.cancel(7, "no longer needed")
    assert out == [Send(F.CANCEL, {"tid": 7, "reason": "no longer needed", "state": "cancelled"}),
                   Ended(7, State.CANCELLED, "no longer needed")]
    assert e.cancel(7, "again") == [] and not e.layer_ready(7, 0)
    with pytest.raises(KvwireError, match="in use"):
        e.start(_sm(5), None)
        e.start(_sm(5), None)


def test_abort_by_the_driver_fails_the_transfer_and_frees_its_lanes() -> None:
    e = _engine()
    _running(e)
    assert e.pick(0) is not None and e.lane_busy(0)
    out = e.abort(7, "chunk stage failed on chunk 0: bug")
    assert out == [Send(F.CANCEL, {"tid": 7, "reason": "chunk stage failed on chunk 0: bug", "state": "failed"}),
                   Ended(7, State.FAILED, "chunk stage failed on chunk 0: bug")]
    assert not e.lane_busy(0) and e.counts()["transfers_failed"] == 1
    assert e.abort(7, "again") == []  # once


# ---------------------------------------------------------------- property: random orders

_OPS = {"msg": 30, "start": 4, "write": 8, "pick": 12, "tick": 4, "lane_lost": 1, "cancel": 1, "abort": 0.5,
        "fail": 0.5, "reopen": 2, "bye": 0.3, "bad": 0.5}
_KINDS = [F.ACK, F.NACK, F.ACCEPT, F.COMPLETE, F.REJECT, F.CANCEL, F.ERROR, F.HEARTBEAT]
_KIND_WEIGHTS = [10, 8, 3, 1, 0.5, 0.5, 0.5, 1]
_EXTRAS: list[dict[str, Any]] = [{}, {}, {}, {}, {"held": True}, {"lost": True}, {"state": "timed_out"}, {"reason": 5}]


def _random_step(rng: random.Random) -> tuple[Any, ...]:
    """One event, weighted so a session lives long enough to move chunks before something ends it."""
    op = rng.choices(list(_OPS), list(_OPS.values()))[0]
    if op in ("msg", "bad"):
        kind = rng.choices(_KINDS, _KIND_WEIGHTS)[0] if op == "msg" else rng.choice(sorted(F.CONTROL_KINDS))
        r = rng.random()
        chunks: Any = (None if r < 0.02 else "junk" if r < 0.04 else
                       [rng.choice([-1, 10]) if rng.random() < 0.02 else rng.randrange(10)
                        for _ in range(rng.randint(1, 3))])
        return ("msg", kind, rng.randrange(5), chunks, rng.choice(_EXTRAS))
    if op == "bye":
        return ("msg", F.BYE, 0, None, {})
    if op == "start":
        return (op, rng.randrange(4), rng.choice([None, 3.0, 30.0]))
    if op == "write":
        return (op, rng.randrange(4), rng.randrange(3))
    if op in ("pick", "lane_lost"):
        return (op, rng.randrange(3))
    if op == "tick":
        return (op, rng.uniform(0.0, 1.5))
    if op in ("cancel", "abort"):
        return (op, rng.randrange(4))
    return (op,)


@settings(max_examples=400, deadline=None)
@given(st.integers(0, 2**63), st.integers(10, 200), st.booleans())
def test_random_orders_raise_only_typed_errors_and_end_each_transfer_once(seed: int, n: int, reconnect: bool) -> None:
    rng = random.Random(seed)
    e = SenderEngine(peer_timeout=4.0, heartbeat=1.0, reconnect=reconnect)
    now = T0
    e.opened(now)
    started: set[int] = set()
    written: set[tuple[int, int]] = set()
    ended: Counter[int] = Counter()
    failed_for_good = False

    def take(actions: Any) -> None:
        nonlocal failed_for_good
        for a in actions:
            assert isinstance(a, (Send, Ended, Fail, LayersAcked, ChunksQueued))
            if isinstance(a, Ended):
                ended[a.transfer_id] += 1
                assert a.transfer_id in started and a.state.terminal
            if isinstance(a, Fail):
                assert not failed_for_good
                failed_for_good = not a.reconnect

    for _ in range(n):
        step = _random_step(rng)
        op = step[0]
        try:
            if op == "start":
                live_before = step[1] in started and not ended[step[1]]
                e.start(_sm(step[1]), None if step[2] is None else now + step[2])
                assert not live_before and not failed_for_good
                started.add(step[1])
                ended[step[1]] = 0
                written = {w for w in written if w[0] != step[1]}
            elif op == "write" and (step[1], step[2]) not in written:
                e.layer_ready(step[1], step[2])
                written.add((step[1], step[2]))
            elif op == "pick":
                p = e.pick(step[1])
                if p is not None:
                    e.sent(p[0], p[1], p[1])
            elif op == "msg":
                _, kind, tid, chunks, extra = step
                body: dict[str, Any] = {"tid": tid, **extra}
                if chunks is not None:
                    body["c"] = chunks
                if kind == F.ERROR and tid == 4:
                    body.pop("tid")  # a session-level error
                legal = not e.closed and not e.down and kind in SENDER_RECEIVES[Conn.OPEN]
                try:
                    take(e.receive(kind, body, now))
                except ProtocolError:
                    if legal and kind not in (F.ACK, F.NACK):
                        raise
                    if e.current(e.gen):
                        take(e.fail("protocol error"))  # what the driver does
                else:
                    assert legal
            elif op == "tick":
                now += step[1]
                take(e.tick(now))
            elif op == "lane_lost":
                e.lane_lost(step[1], e.gen)
            elif op == "cancel":
                take(e.cancel(step[1], "user"))
            elif op == "abort":
                take(e.abort(step[1], "chunk stage failed"))
            elif op == "fail":
                take(e.fail("connection lost", e.gen))
            elif op == "reopen" and e.down:
                e.opened(now)
        except (ProtocolError, KvwireError):
            pass
        assert all(k <= 1 for k in ended.values())
        if failed_for_good:
            with pytest.raises(ProtocolError):
                e.receive(F.HEARTBEAT, {}, now)
            with pytest.raises(KvwireError):
                e.start(_sm(99), None)
            assert e.tick(now + 100) == [] and e.pick(0) is None
    take(e.close())
    # a transfer id may be used again once its transfer ended; each use ended exactly once
    assert all(k == 1 for k in ended.values()) and not e.busy


def test_a_refused_transfer_s_layout_goes_again_with_the_next_begin() -> None:
    """A receiver keeps a bounded set of the layouts a session taught (``rxengine.LAYOUT_TENSORS_KEPT``) and may
    have forgotten the one a refused BEGIN named: the next BEGIN of that layout carries it again. Negative
    control: after an ACCEPT the layout is known, and the next BEGIN names it only."""
    e = _engine()
    first = e.start(_sm(1), None)
    assert first.body is not None and "layout" in first.body
    e.receive(F.REJECT, {"tid": 1, "reason": "no destination"}, T0)
    again = e.start(_sm(2), None)
    assert again.body is not None and "layout" in again.body
    e.receive(F.ACCEPT, {"tid": 2}, T0)
    named = e.start(_sm(3), None)
    assert named.body is not None and "layout" not in named.body and named.body["fp"] == LAYOUT.fingerprint()
