"""The receiver's protocol engine alone (``kvwire.codec.rxengine``), no sockets: the rules table row by row,
admission, chunk verdicts, the pending bookkeeping, deadlines, heartbeats, peer silence, counters, and a
property test over random orders of legal and illegal messages, chunks and ticks."""

from __future__ import annotations

import functools
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvwire.codec import frames as F
from kvwire.codec.manifest import Manifest, build_manifest
from kvwire.codec.plan import ChunkPlan
from kvwire.codec.rules import RECEIVER_RECEIVES, Conn
from kvwire.codec.rxengine import (
    UNSTICK_AFTER,
    Admit,
    CutLanes,
    Ended,
    Fail,
    ReceiverEngine,
    RxTransfer,
    Send,
    check_lane_control,
    held_bytes,
)
from kvwire.codec.transfer import State, transfer_digest
from kvwire.errors import KvwireError, ProtocolError
from kvwire.testing.fixtures import default_request, load_fixture

LAYOUT = load_fixture("tiny-qwen3-next")
CHUNK = 1 << 16


def engine(**kw: Any) -> ReceiverEngine:
    args: dict[str, Any] = dict(max_transfers=4, max_probe_bytes=1 << 30, transfer_timeout=30.0, peer_timeout=10.0,
                                heartbeat=1.0, now=0.0)
    args.update(kw)
    return ReceiverEngine(F.DEFAULT_LIMITS, **args)


@functools.lru_cache(maxsize=64)
def _manifest(tid: int, hashed: bool, sink: bool) -> Manifest:
    return build_manifest(tid, LAYOUT, default_request(f"r{tid}"), CHUNK, hashed=hashed, sink=sink)


def manifest(tid: int, hashed: bool = True, sink: bool = False) -> Manifest:
    return _manifest(tid, hashed, sink)


def begin(e: ReceiverEngine, tid: int, now: float = 0.0, **kw: Any) -> list[Any]:
    return e.receive(F.BEGIN, manifest(tid, **kw).to_wire(with_layout=True), now)


def start(e: ReceiverEngine, tid: int, now: float = 0.0, **kw: Any) -> Manifest:
    """BEGIN and activate ``tid``; returns the manifest the engine parsed."""
    (a,) = begin(e, tid, now, **kw)
    assert type(a) is Admit and a.manifest.transfer_id == tid
    assert e.activate(a.manifest, now) == [Send(F.ACCEPT, {"tid": tid})]
    return a.manifest


_PLANS: dict[int, ChunkPlan] = {}


def _plan(m: Manifest) -> ChunkPlan:
    """The plan of ``m`` (every manifest of these tests with one transfer id has the same segments)."""
    if m.transfer_id not in _PLANS:
        _PLANS[m.transfer_id] = m.plan()
    return _PLANS[m.transfer_id]


def header(m: Manifest, chunk: int, digest: int | None = None) -> F.Header:
    p = _plan(m)
    d = 1000 + chunk if digest is None else digest
    return F.Header(F.KIND_DATA, 1 if m.hashed else 0, m.transfer_id, chunk, p.layers[chunk], p.offsets[chunk],
                    p.lengths[chunk], d if m.hashed else 0)


def deliver(e: ReceiverEngine, m: Manifest, chunk: int, lane: int = 0, now: float = 1.0, good: bool = True) -> Any:
    h = header(m, chunk)
    t = e.chunk_admit(lane, h)
    assert isinstance(t, RxTransfer)
    return e.chunk_done(t, lane, h, h.digest if good else h.digest ^ 1, now)


def digest(m: Manifest) -> int:
    return transfer_digest([1000 + c for c in range(m.plan().num_chunks)])


BODIES: dict[str, dict[str, Any]] = {
    F.DONE: {"tid": 99, "digest": 1}, F.CANCEL: {"tid": 99, "reason": "r"}, F.HEARTBEAT: {}, F.BYE: {},
    F.BEGIN: manifest(99).to_wire(with_layout=True),
}


# ------------------------------------------------------------------ the rules table


@pytest.mark.parametrize("kind", sorted(F.CONTROL_KINDS))
def test_every_kind_in_the_open_state_is_handled_or_a_protocol_error(kind: str) -> None:
    e = engine()
    legal = RECEIVER_RECEIVES[Conn.OPEN]
    if kind not in legal:
        with pytest.raises(ProtocolError, match=f"unexpected '{kind}'.*'open'"):
            e.receive(kind, BODIES.get(kind, {}), 1.0)
        return
    out = e.receive(kind, BODIES[kind], 1.0)
    assert e.state is legal[kind] and e.last_seen == 1.0
    if kind == F.BEGIN:
        (a,) = out
        assert type(a) is Admit and a.manifest.to_wire(with_layout=True) == BODIES[F.BEGIN]
        return
    assert out == {F.DONE: [], F.CANCEL: [], F.HEARTBEAT: [], F.BYE: [Fail("sender closed the session")]}[kind]


@pytest.mark.parametrize("kind", sorted(F.CONTROL_KINDS))
def test_nothing_is_legal_once_the_session_is_closed(kind: str) -> None:
    for end in ("bye", "close", "silence"):
        e = engine()
        if end == "bye":
            e.receive(F.BYE, {}, 1.0)
        elif end == "close":
            assert e.close("gone") == [Fail("gone")]
        else:
            assert e.tick(11.0) == [Fail("peer silent for 11.0s")]
        assert e.closed and e.state is Conn.CLOSED
        with pytest.raises(ProtocolError, match="'closed'"):
            e.receive(kind, BODIES.get(kind, {}), 2.0)
        assert e.tick(100.0) == [] and e.close("again") == []


@pytest.mark.parametrize("kind", sorted(F.CONTROL_KINDS))
def test_a_data_lane_takes_only_bye(kind: str) -> None:
    if kind == F.BYE:
        check_lane_control(kind)
    else:
        with pytest.raises(ProtocolError, match="lane_open"):
            check_lane_control(kind)


def test_malformed_bodies_of_legal_kinds_are_typed_errors() -> None:
    e = engine()
    with pytest.raises(ProtocolError, match="tid"):
        e.receive(F.DONE, {"tid": [1], "digest": 0}, 1.0)
    with pytest.raises(ProtocolError, match="state"):
        e.receive(F.CANCEL, {"tid": 1, "state": "nonsense"}, 1.0)
    # a malformed manifest is refused (REJECT), not fatal: the tid when it is one, else None
    assert e.receive(F.BEGIN, {"tid": 5, "v": 99}, 1.0)[0].body["tid"] == 5
    out = e.receive(F.BEGIN, {"tid": "x"}, 1.0)
    assert out[0].kind == F.REJECT and out[0].body["tid"] is None


# ------------------------------------------------------------------ admission


def test_admission_refuses_ids_in_flight_or_ended_and_past_the_session_bound() -> None:
    e = engine(max_transfers=2)
    m1 = start(e, 1)
    assert e.held == held_bytes(m1)
    (r,) = begin(e, 1)
    assert r == Send(F.REJECT, {"tid": 1, "reason": "transfer id 1 already used on this session"})
    start(e, 2)
    (r,) = begin(e, 3)
    assert r.body["reason"] == "too many transfers in flight on this session"
    e.receive(F.CANCEL, {"tid": 1, "reason": "x"}, 1.0)
    (r,) = begin(e, 1)  # ended: its id stays used
    assert "already used" in r.body["reason"]
    assert type(begin(e, 3)[0]) is Admit and e.held == held_bytes(m1)
    assert e.refuse(3, "no destination", 1.0) == [Send(F.REJECT, {"tid": 3, "reason": "no destination"})]


def test_a_refusal_for_a_request_ended_here_carries_its_state_and_counts_it() -> None:
    """An expected request cancelled or timed out before its BEGIN: CANCEL or ERROR with its state (the sender's
    handle ends in it), counted like any transfer that ends here; a plain REJECT counts as refused (its why)."""
    e = engine()
    for tid in (1, 2, 3):
        assert type(begin(e, tid)[0]) is Admit
    assert e.refuse(1, "no destination", 1.0, why="no_destination") == [
        Send(F.REJECT, {"tid": 1, "reason": "no destination"})]
    assert e.refuse(2, "freed", 1.0, State.CANCELLED) == [
        Send(F.CANCEL, {"tid": 2, "reason": "freed", "state": "cancelled"})]
    assert e.refuse(3, "never started", 1.0, State.TIMED_OUT) == [
        Send(F.ERROR, {"tid": 3, "reason": "never started", "state": "timed_out"})]
    c = e.counts()
    assert (c.get("transfers_failed", 0), c["transfers_cancelled"], c["transfers_timed_out"]) == (0, 1, 1)
    assert c["refused_no_destination"] == 1 and "refused_invalid" not in c
    assert not e.admitting


def test_sinks_are_refused_when_hashed_over_the_probe_bound_or_disabled() -> None:
    assert "unhashed" in begin(engine(), 1, sink=True)[0].body["reason"]
    assert type(begin(engine(), 1, sink=True, hashed=False)[0]) is Admit
    assert begin(engine(max_probe_bytes=1000), 1, sink=True, hashed=False)[0].kind == F.REJECT
    assert begin(engine(max_probe_bytes=0), 1, sink=True, hashed=False)[0].kind == F.REJECT


def test_a_layout_taught_once_serves_later_manifests_without_one() -> None:
    e = engine()
    (a,) = e.receive(F.BEGIN, manifest(1).to_wire(with_layout=False), 0.0)
    assert type(a) is Admit and a.manifest.layout is None  # unknown here: checked against nothing (the driver's call)
    start(e, 2)
    (a,) = e.receive(F.BEGIN, manifest(3).to_wire(with_layout=False), 0.0)
    assert type(a) is Admit and a.manifest.layout is not None


# ------------------------------------------------------------------ chunks and the end of a transfer


def test_good_chunks_are_acked_bad_ones_nacked_and_done_completes() -> None:
    e = engine()
    m = start(e, 1)
    n = m.plan().num_chunks
    bad = deliver(e, m, 0, good=False)
    assert bad.reply == Send(F.NACK, {"tid": 1, "c": [0]}) and bad.ended is None
    ready: list[int] = []
    for c in range(n):
        r = deliver(e, m, c, lane=c % 3)
        assert r.reply == Send(F.ACK, {"tid": 1, "c": [c]})
        ready += r.layers
    assert sorted(ready) == sorted(m.plan().layer_chunks)
    assert e.receive(F.DONE, {"tid": 1, "digest": digest(m)}, 2.0) == [
        Ended(1, State.DONE, ""), Send(F.COMPLETE, {"tid": 1, "reason": "", "state": "done"})]
    assert e.counts() == {"chunks_rejected": 1, "bytes_received": m.total_bytes, "transfers_done": 1}
    assert e.held == 0 and e.transfer(1) is None
    assert e.chunk_admit(0, header(m, 0)) is None  # a late copy of an ended transfer is drained
    assert e.receive(F.DONE, {"tid": 1, "digest": 0}, 2.0) == []  # a second DONE: told already


@pytest.mark.parametrize("missing", [True, False])
def test_done_with_chunks_missing_or_a_wrong_digest_fails_the_transfer(missing: bool) -> None:
    e = engine()
    m = start(e, 1)
    for c in range(m.plan().num_chunks - missing):
        deliver(e, m, c)
    out = e.receive(F.DONE, {"tid": 1, "digest": digest(m) ^ (0 if missing else 1)}, 2.0)
    why = "sender finished with 1 chunks unverified" if missing else "whole-transfer digest mismatch"
    assert out == [Ended(1, State.FAILED, why), Send(F.ERROR, {"tid": 1, "reason": why, "state": "failed"})]
    assert e.counts()["transfers_failed"] == 1


@pytest.mark.parametrize("good", [True, False])
def test_an_early_done_is_held_until_the_last_chunk_is_verified(good: bool) -> None:
    """With ``done_early`` (advertised in the WELCOME), a DONE that arrives before every chunk is verified
    is held: nothing ends; the last chunk's verdict then answers it (after that chunk's ACK): COMPLETE, or
    ERROR for a digest that does not match. A late DONE after the end is ignored. Negative control: the
    engine without it fails the same DONE at once (``test_done_with_chunks_missing...``)."""
    e = engine(done_early=True)
    m = start(e, 1)
    n = m.plan().num_chunks
    for c in range(n - 1):
        deliver(e, m, c)
    assert e.receive(F.DONE, {"tid": 1, "digest": digest(m) ^ (0 if good else 1)}, 1.5) == []
    assert e.transfer(1) is not None and e.counts().get("transfers_done") is None
    bad = deliver(e, m, n - 1, good=False)  # the last chunk fails its check: still held, NACKed
    assert bad.reply == Send(F.NACK, {"tid": 1, "c": [n - 1]}) and bad.finished == ()
    r = deliver(e, m, n - 1, now=2.0)
    assert r.reply == Send(F.ACK, {"tid": 1, "c": [n - 1]}) and r.ended is None
    why = "" if good else "whole-transfer digest mismatch"
    state, notify = (State.DONE, F.COMPLETE) if good else (State.FAILED, F.ERROR)
    assert r.finished == (Ended(1, state, why), Send(notify, {"tid": 1, "reason": why, "state": state.value}))
    assert e.transfer(1) is None and e.held == 0
    assert e.counts()["transfers_done" if good else "transfers_failed"] == 1
    assert e.receive(F.DONE, {"tid": 1, "digest": 0}, 2.0) == []


def test_with_every_chunk_verified_an_early_done_is_answered_at_once() -> None:
    e = engine(done_early=True)
    m = start(e, 1)
    for c in range(m.plan().num_chunks):
        assert deliver(e, m, c).finished == ()
    assert e.receive(F.DONE, {"tid": 1, "digest": digest(m)}, 2.0) == [
        Ended(1, State.DONE, ""), Send(F.COMPLETE, {"tid": 1, "reason": "", "state": "done"})]


@pytest.mark.parametrize("state,expect", [("timed_out", (State.TIMED_OUT, "sender timed out: r")),
                                          ("failed", (State.FAILED, "sender failed the transfer: r")),
                                          (None, (State.CANCELLED, "cancelled by sender: r"))])
def test_the_senders_cancel_ends_the_transfer_in_the_state_it_names(state: str | None, expect: Any) -> None:
    e = engine()
    start(e, 1)
    body = {"tid": 1, "reason": "r"} | ({"state": state} if state else {})
    assert e.receive(F.CANCEL, body, 1.0) == [Ended(1, *expect)]
    assert e.receive(F.CANCEL, body, 1.0) == []


def test_copies_of_one_chunk_one_writer_held_and_lost_verdicts() -> None:
    e = engine()
    m = start(e, 1)
    h = header(m, 3)
    t = e.chunk_admit(0, h)
    assert t is not None and e.chunk_admit(1, h) is None  # a second copy while the first is read: drained
    assert e.chunk_drained(h, 1.0) == Send(F.NACK, {"tid": 1, "c": [3], "held": True})
    r = e.chunk_abandoned(t, 0, h, 1.0)  # the read copy broke off: the dropped one is asked for again
    assert r.lost == Send(F.NACK, {"tid": 1, "c": [3], "lost": True}) and r.reply is None
    assert e.chunk_drained(h, 1.0) is None  # neither verified nor being read
    deliver(e, m, 3)
    assert e.chunk_admit(2, h) is None and e.chunk_drained(h, 1.0) == Send(F.ACK, {"tid": 1, "c": [3]})
    t = e.chunk_admit(0, header(m, 4))
    assert t is not None and e.chunk_abandoned(t, 0, header(m, 4), 1.0).lost is None  # nothing dropped


def test_chunks_of_unknown_transfers_or_outside_the_plan_are_protocol_errors() -> None:
    e = engine()
    m = start(e, 1)
    with pytest.raises(ProtocolError, match="unknown transfer 2"):
        e.chunk_admit(0, header(manifest(2), 0))
    with pytest.raises(ProtocolError):
        e.chunk_admit(0, header(m, 0)._replace(length=header(m, 0).length + 1))
    with pytest.raises(ProtocolError, match="no hash"):
        e.chunk_admit(0, header(m, 0)._replace(flags=0))


def test_a_transfer_ended_while_a_lane_writes_resolves_when_it_stops_and_a_stuck_lane_is_cut() -> None:
    e = engine(heartbeat=3.5, peer_timeout=100.0)
    m = start(e, 1)
    h = header(m, 0)
    t = e.chunk_admit(7, h)
    assert t is not None
    assert e.cancel(1, "user", 5.0) == [Send(F.CANCEL, {"tid": 1, "reason": "user", "state": "cancelled"})]
    assert e.counts()["transfers_cancelled"] == 1 and e.transfer(1) is None and 1 in e.pending
    assert e.tick(5.0 + UNSTICK_AFTER) == []
    assert e.tick(5.1 + UNSTICK_AFTER) == [CutLanes((7,))]
    r = e.chunk_done(t, 7, h, h.digest, 8.0)
    assert r.ended == Ended(1, State.CANCELLED, "user") and not e.pending
    assert e.tick(11.0) == []  # heartbeat not due: the ACK was sent at 8.0
    assert e.tick(11.5) == [Send(F.HEARTBEAT, {})]
    assert e.cancel(1, "again", 9.0) == [Send(F.CANCEL, {"tid": 1, "reason": "again", "state": "cancelled"})]


def test_a_pending_transfer_resolves_when_its_read_breaks_off_too() -> None:
    e = engine()
    m = start(e, 1)
    t = e.chunk_admit(0, header(m, 0))
    assert t is not None
    out = e.close("control connection lost")
    assert out == [Fail("control connection lost")]
    r = e.chunk_abandoned(t, 0, header(m, 0), 1.0)
    assert r.ended == Ended(1, State.FAILED, "control connection lost")


# ------------------------------------------------------------------ time


def test_heartbeats_peer_silence_and_deadlines_follow_the_given_clock() -> None:
    e = engine(heartbeat=1.0, peer_timeout=10.0, transfer_timeout=5.0)
    assert e.tick(0.5) == []
    assert e.tick(1.0) == [Send(F.HEARTBEAT, {})]
    assert e.tick(1.5) == []
    m = start(e, 1, now=1.5)  # the ACCEPT counts as sent: no heartbeat until 2.5
    (a,) = begin(e, 2, now=1.5)
    e.activate(a.manifest, 1.5, deadline=3.0)  # the caller's deadline, earlier than the receiver's
    assert e.tick(2.4) == []
    assert e.tick(3.1) == [Send(F.HEARTBEAT, {}),
                           Ended(2, State.TIMED_OUT, "transfer deadline passed"),
                           Send(F.ERROR, {"tid": 2, "reason": "transfer deadline passed", "state": "timed_out"})]
    out = e.tick(6.6)
    assert Ended(m.transfer_id, State.TIMED_OUT, "transfer deadline passed") in out
    assert e.counts() == {"transfers_timed_out": 2}
    e = engine(heartbeat=100.0, peer_timeout=10.0)
    start(e, 3, now=7.0)
    assert e.tick(17.0) == []  # silent for exactly peer_timeout: not yet
    assert e.tick(17.01) == [Ended(3, State.FAILED, "peer silent for 10.0s"), Fail("peer silent for 10.0s")]
    assert e.counts() == {"transfers_failed": 1}


def test_sinks_count_as_probes() -> None:
    e = engine()
    m = start(e, 1, sink=True, hashed=False)
    assert e.held == held_bytes(m) == m.metadata_bytes
    for c in range(m.plan().num_chunks):
        deliver(e, m, c)
    e.receive(F.DONE, {"tid": 1, "digest": 0}, 1.0)
    assert e.counts() == {"probe_bytes_received": m.total_bytes, "probes_done": 1}


# ------------------------------------------------------------------ property: any order


#: op names weighted by repetition: mostly the traffic of a working session, with the rarer endings
#: (cancels, deadlines, silence, illegal messages, the driver's close) among it
_NAMES = (["begin"] * 6 + ["activate"] * 6 + ["chunk"] * 12 + ["finish"] * 10 + ["fill"] * 3 + ["done"] * 5
          + ["cancel", "user_cancel", "kind", "tick", "tick", "close"])
_KINDS = sorted(F.CONTROL_KINDS | {"junk"}) + [F.HEARTBEAT] * 18


def _ops(raw: bytes) -> list[tuple[str, int, float]]:
    """Each 4 bytes of ``raw``: an op's name, a number its arguments are read from, and (for a tick) the
    seconds it advances the clock. One draw per example: hypothesis' own cost stays small."""
    out = []
    for i in range(0, len(raw) - 3, 4):
        n = int.from_bytes(raw[i + 1: i + 4], "little")
        out.append((_NAMES[raw[i] % len(_NAMES)], n, (n % 41) / 10))
    return out


@settings(max_examples=300, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))
@given(st.binary(min_size=4 * 40, max_size=4 * 200))
def test_any_order_of_messages_chunks_and_ticks(raw: bytes) -> None:
    """Only typed errors; every activated transfer gets exactly one ``Ended`` (once its writers stop);
    after ``Fail`` nothing is accepted."""
    e = engine(max_transfers=3, transfer_timeout=20.0, peer_timeout=8.0)
    now = 0.0
    admitted: list[Manifest] = []
    activated: set[int] = set()
    ended: dict[int, int] = {}
    writing: list[tuple[RxTransfer, int, F.Header]] = []
    failed = False

    def take(actions: list[Any]) -> None:
        nonlocal failed
        for a in actions:
            assert not failed or type(a) is Ended, f"{a} after Fail"
            if type(a) is Ended:
                ended[a.transfer_id] = ended.get(a.transfer_id, 0) + 1
                assert a.transfer_id in activated and a.state.terminal
            elif type(a) is Fail:
                failed = True
            elif type(a) is Admit:
                admitted.append(a.manifest)

    for op, n, dt in _ops(raw):
        tid = 1 + n % 12
        try:
            if op == "begin":
                body = manifest(tid).to_wire(with_layout=True)
                take(e.receive(F.BEGIN, body if n % 5 else {**body, "seg": "junk"}, now))
            elif op == "activate" and admitted:
                m = admitted.pop(n % len(admitted))
                out = e.activate(m, now) if n % 4 else e.refuse(m.transfer_id, "no", now)
                assert out or failed  # once failed, nothing is activated, nor refused aloud
                if out and out[0].kind == F.ACCEPT:
                    assert not failed and m.transfer_id not in activated
                    activated.add(m.transfer_id)
                take(out)
            elif op == "done":
                take(e.receive(F.DONE, {"tid": tid, "digest": digest(manifest(tid)) if n % 3 else 1}, now))
            elif op == "cancel":
                state = [None, "failed", "timed_out", "bogus"][n % 4]
                take(e.receive(F.CANCEL, {"tid": tid, "reason": "r"} | ({"state": state} if state else {}), now))
            elif op == "user_cancel":
                take(e.cancel(tid, "user", now))
            elif op == "kind":
                kind = _KINDS[n % len(_KINDS)]
                take(e.receive(kind, BODIES.get(kind, {}), now))
            elif op == "chunk" and (activated or n % 16 == 0):  # rarely one of a transfer never begun (fatal)
                known = sorted(activated)
                m = manifest(known[n % len(known)] if known and n % 16 else tid)
                h = header(m, (n >> 2) % _plan(m).num_chunks)
                t = e.chunk_admit(n % 3, h)
                if t is None:
                    e.chunk_drained(h, now)
                else:
                    assert not failed, "a chunk admitted after Fail"
                    writing.append((t, n % 3, h))
            elif op == "fill" and e.transfer(tid) is not None:  # every chunk not yet verified arrives intact
                t = e.transfer(tid)
                assert t is not None
                m = manifest(tid)
                for c in range(_plan(m).num_chunks):
                    h = header(m, c)
                    if not t.machine.verified[c] and e.chunk_admit(9, h) is t:
                        take([r.ended] if (r := e.chunk_done(t, 9, h, h.digest, now)).ended else [])
            elif op == "finish" and writing:
                t, lane, h = writing.pop(n % len(writing))
                r = (e.chunk_abandoned(t, lane, h, now) if n % 5 == 0
                     else e.chunk_done(t, lane, h, h.digest ^ (n % 7 == 0), now))
                take([r.ended] if r.ended else [])
            elif op == "tick":
                now += dt
                take(e.tick(now))
            elif op == "close":
                take(e.close("driver closed"))
        except KvwireError as err:  # ProtocolError included; anything else fails the test
            if failed:
                assert isinstance(err, ProtocolError)
            take(e.close(f"protocol error: {err}"))  # what the driver does
    take(e.close("end of test"))
    while writing:
        t, lane, h = writing.pop()
        r = e.chunk_abandoned(t, lane, h, now)
        take([r.ended] if r.ended else [])
    assert failed and e.closed and not e.pending and not e.transfers and e.held == 0
    assert ended == {tid: 1 for tid in activated}
    assert sum(n for k, n in e.counts().items() if k.startswith(("transfers_", "probes_"))) == len(activated)



def test_a_chunk_read_after_the_session_failed_is_answered_by_nobody_and_not_counted() -> None:
    """Once the session failed its transfers are over: a chunk a lane finishes reading then is not checked
    against its hash (any copy of an ended transfer is taken as is), so it is neither ``bytes_received``
    (verified bytes) nor ``chunks_rejected``."""
    e = engine()
    m = start(e, 1)
    good, bad = header(m, 0), header(m, 1)
    t_good, t_bad = e.chunk_admit(0, good), e.chunk_admit(1, bad)
    assert t_good is not None and t_bad is not None
    assert e.close("control connection lost") == [Fail("control connection lost")]
    r = e.chunk_done(t_good, 0, good, good.digest, 2.0)
    assert r.reply is None and r.layers == () and r.ended is None  # the other lane still writes
    r = e.chunk_done(t_bad, 1, bad, bad.digest ^ 1, 2.0)
    assert r.reply is None and r.ended == Ended(1, State.FAILED, "control connection lost")
    assert e.counts() == {"transfers_failed": 1}


# ---------------------------------------------------------------- layouts a session teaches


def _layout_of(tensors: int, rank: int) -> dict[str, Any]:
    """A layout (wire form) of ``tensors`` one-byte tensors, 16 a cache and 4 caches a layer; ``rank`` makes
    its fingerprint its own."""
    t = ["", [1], "uint8", "raw", "token", False, []]
    layers: list[Any] = []
    left = tensors
    while left:
        caches = []
        while left and len(caches) < 4:
            caches.append(["gqa", 0, [t] * min(16, left)])
            left -= min(16, left)
        layers.append(caches)
    return {"name": "", "tp_size": 1 << 16, "tp_rank": rank, "block_size": 16, "page_layout": "block_major",
            "layers": layers}


def _teach(e: ReceiverEngine, tid: int, layout: dict[str, Any] | None, fp: bytes) -> None:
    """A BEGIN without segments that carries ``layout`` (or only names ``fp``), refused for want of a
    destination, as a receiver with nowhere to put it does."""
    body = {"v": 1, "tid": tid, "fp": fp, "req": {"request_id": f"t{tid}", "num_tokens": 1, "state_position": 0},
            "seg": [], "chunk": CHUNK, "hash": "xxh3_64", **({"layout": layout} if layout is not None else {})}
    (a,) = e.receive(F.BEGIN, body, 0.0)
    assert type(a) is Admit
    e.refuse(tid, "no destination", 0.0)


def test_a_session_keeps_the_layouts_it_teaches_within_a_tensor_budget_least_recently_used_first() -> None:
    """A session kept every layout it taught, refused or not, up to 256 of them; at 4,096 tensors (~2 MiB
    parsed) each that is 0.5 GiB a session. It keeps ``LAYOUT_TENSORS_KEPT`` tensors' worth; the least
    recently taught or named goes first. Negative control: small layouts are all kept."""
    from kvwire.codec.layout import ModelLayout
    from kvwire.codec.rxengine import LAYOUT_TENSORS_KEPT, MAX_LAYOUTS

    per = F.DEFAULT_LIMITS.max_segments
    fits = LAYOUT_TENSORS_KEPT // per
    assert fits >= 2
    e = engine()
    wire = [_layout_of(per, rank) for rank in range(fits + 3)]
    fps = [ModelLayout.from_dict(w).fingerprint() for w in wire]
    for i in range(fits):
        _teach(e, i, wire[i], fps[i])
    assert list(e.layouts) == fps[:fits]
    _teach(e, 100, None, fps[0])  # named again: now the most recently used
    _teach(e, 101, wire[fits], fps[fits])  # over the budget: the least recently used (1) goes
    assert list(e.layouts) == [*fps[2:fits], fps[0], fps[fits]]
    for i in range(fits + 1, fits + 3):
        _teach(e, 200 + i, wire[i], fps[i])
    assert sum(x.num_tensors() for x in e.layouts.values()) <= LAYOUT_TENSORS_KEPT
    assert len(e.layouts) == fits and fps[fits + 2] in e.layouts
    small = engine()  # negative control: far under the budget, every layout stays
    for rank in range(40):
        w = _layout_of(4, rank)
        _teach(small, rank, w, ModelLayout.from_dict(w).fingerprint())
    assert len(small.layouts) == 40 <= MAX_LAYOUTS


# ---------------------------------------------------------------- a DONE or CANCEL while the destination is found


def test_a_done_that_comes_while_the_transfer_is_admitted_is_applied_as_it_is_activated() -> None:
    """The driver finds a destination off the control reader's thread (the allocator is user code), so a small
    transfer sent whole in the early window can bring its DONE first. It is held and taken as the transfer is
    activated: COMPLETE once every chunk is verified. Negative control: the same DONE for a transfer that ended
    is dropped (nothing completes)."""
    e = engine(done_early=True)
    (a,) = begin(e, 1)
    assert type(a) is Admit and 1 in e.admitting
    m = a.manifest
    assert e.receive(F.DONE, {"tid": 1, "digest": digest(m)}, 0.5) == []  # held, not dropped
    assert e.activate(m, 1.0) == [Send(F.ACCEPT, {"tid": 1})] and 1 not in e.admitting
    assert e.apply_held(1, 1.0) == []  # early: chunks still missing, answered as the last is verified
    finished: tuple[Any, ...] = ()
    for c in range(m.plan().num_chunks):
        finished += deliver(e, m, c).finished
    assert finished == (Ended(1, State.DONE, ""), Send(F.COMPLETE, {"tid": 1, "reason": "", "state": "done"}))
    assert e.apply_held(1, 2.0) == []  # applied once
    e2 = engine(done_early=True)  # negative control: refused while admitted, the held DONE goes with it
    (a2,) = begin(e2, 1)
    e2.receive(F.DONE, {"tid": 1, "digest": digest(a2.manifest)}, 0.5)
    e2.refuse(1, "no destination", 1.0, why="no_destination")
    assert 1 not in e2.admitting and e2.transfer(1) is None and e2.counts() == {"refused_no_destination": 1}


def test_a_cancel_that_comes_while_the_transfer_is_admitted_ends_it_as_it_is_activated() -> None:
    e = engine()
    (a,) = begin(e, 1)
    assert e.receive(F.CANCEL, {"tid": 1, "reason": "user gave up", "state": "cancelled"}, 0.5) == []
    assert e.activate(a.manifest, 1.0) == [Send(F.ACCEPT, {"tid": 1})]
    assert e.apply_held(1, 1.0) == [Ended(1, State.CANCELLED, "cancelled by sender: user gave up")]
    assert e.transfer(1) is None and e.held == 0
    (b,) = begin(e, 2)  # negative control: nothing said meanwhile, it stays in flight
    e.activate(b.manifest, 1.0)
    assert e.apply_held(2, 1.0) == [] and e.transfer(2) is not None


def test_transfers_being_admitted_count_as_in_flight_and_hold_their_ids() -> None:
    e = engine(max_transfers=2)
    (a,) = begin(e, 1)
    (b,) = begin(e, 2)
    assert type(a) is Admit and type(b) is Admit
    (r,) = begin(e, 3)  # two being admitted: the session's bound
    assert type(r) is Send and r.kind == F.REJECT and "too many" in r.body["reason"]
    (r,) = begin(e, 1)  # and an id being admitted is in use
    assert type(r) is Send and r.kind == F.REJECT and "already used" in r.body["reason"]
    e.refuse(2, "no destination", 0.0)  # negative control: once answered, room again
    (c,) = begin(e, 4)
    assert type(c) is Admit
