"""The sans-IO transfer state machines, driven against each other without sockets.

A small simulator plays the I/O layer: lanes carry real packed headers and payload bytes, the receiver
writes them into destination buffers by the plan's pieces and hashes what arrived, and ACK/NACKs go
back in random order. Chunks are corrupted in transit and lanes die with chunks in flight.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import msgpack
import pytest
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st

from kvwire.codec.frames import FLAG_HASHED, MIN_CHUNK, Header, pack_data_header, unpack_header
from kvwire.codec.layout import CacheSpec, LayerSpec, ModelLayout, RequestSpec, TensorSpec
from kvwire.codec.manifest import Manifest, build_manifest, parse_manifest
from kvwire.codec.transfer import ReceiverTransfer, SenderTransfer, State, transfer_digest
from kvwire.errors import ProtocolError


def _t(name: str, shape: tuple[int, ...], layout: str, indexing: str, dtype: str = "bfloat16") -> TensorSpec:
    return TensorSpec(name, shape, dtype, layout, indexing)


def _layout() -> ModelLayout:
    gdn = CacheSpec("gdn", (_t("conv", (3, 256), "conv:SD", "request"),
                            _t("ssm", (4, 32, 32), "ssm:HVK", "request", "float32")))
    gqa = CacheSpec("gqa", (_t("k", (2, 64), "NHD", "token"), _t("v", (2, 64), "NHD", "token")))
    swa = CacheSpec("swa", (_t("k", (1, 64), "NHD", "token"), _t("v", (1, 64), "NHD", "token")), window=512)
    caches = [(gdn,), (gqa,), (), (gdn,), (swa,), (gqa,)]  # layer 2 is MLP-only: no bytes, no chunks
    return ModelLayout("sm", tuple(LayerSpec(i, c) for i, c in enumerate(caches)))


LAYOUT = _layout()
REQUEST = RequestSpec("req-sm", 1200, 1199)


def _manifests(hashed: bool = True) -> tuple[Manifest, Manifest]:
    """The sender's manifest and the one the receiver parsed from the wire."""
    m = build_manifest(42, LAYOUT, REQUEST, MIN_CHUNK, hashed=hashed)
    wire = msgpack.unpackb(msgpack.packb(m.to_wire(with_layout=True), use_bin_type=True), raw=False)
    return m, parse_manifest(wire)


@dataclass
class Sim:
    """Both ends plus the network between them."""

    rng: random.Random
    lanes: int = 2
    p_corrupt: float = 0.0
    p_loss: float = 0.0
    hashed: bool = True
    max_retries: int = 30
    accept_after: int = 0
    corrupt_chunks: frozenset[int] = frozenset()  # always corrupted in transit
    tx: SenderTransfer = field(init=False)
    rx: ReceiverTransfer = field(init=False)

    def __post_init__(self) -> None:
        m_tx, m_rx = _manifests(self.hashed)
        self.tx = SenderTransfer(m_tx, m_tx.plan(), max_retries=self.max_retries)
        self.rx = ReceiverTransfer(m_rx, m_rx.plan())
        self.plan = m_rx.plan()
        self.src = [self.rng.randbytes(s.nbytes) for s in m_tx.segments]
        self.flat = b"".join(self.src)
        self.dst = [bytearray(s.nbytes) for s in m_rx.segments]
        self.pending_layers = list(range(LAYOUT.num_layers))
        self.wire: list[list[tuple[bytes, bytes]]] = [[] for _ in range(self.lanes)]
        self.lane_inflight: list[set[int]] = [set() for _ in range(self.lanes)]
        self.control: list[tuple[bool, int]] = []
        self.layers_ready: list[int] = []
        self.corrupted_admitted = 0
        self.steps = 0
        self.done_digests: list[int] = []

    # -- sender side
    def send_one(self, lane: int) -> bool:
        c = self.tx.next_chunk()
        if c is None:
            return False
        off, ln = self.plan.offsets[c], self.plan.lengths[c]
        payload = self.flat[off:off + ln]
        digest = xxhash.xxh3_64_intdigest(payload) if self.hashed else None
        self.tx.sent(c, digest or 0)
        header = pack_data_header(42, c, self.plan.layers[c], off, ln, digest)
        if c in self.corrupt_chunks or self.rng.random() < self.p_corrupt:
            bad = bytearray(payload)
            bad[self.rng.randrange(ln)] ^= 1 << self.rng.randrange(8)
            payload = bytes(bad)
        self.wire[lane].append((header, payload))
        self.lane_inflight[lane].add(c)
        return True

    def lose_lane(self, lane: int) -> None:
        self.wire[lane] = [msg for msg in self.wire[lane] if self.rng.random() < 0.5]  # some got through
        self.tx.requeue(sorted(self.lane_inflight[lane]))
        self.lane_inflight[lane].clear()

    def deliver_control(self) -> None:
        ok, c = self.control.pop(self.rng.randrange(len(self.control)))
        for s in self.lane_inflight:
            s.discard(c)
        if ok:
            if self.tx.on_ack([c]):
                self.done_digests.append(self.tx.digest())
        else:
            self.tx.on_nack([c])

    # -- receiver side
    def deliver_chunk(self, lane: int) -> None:
        header, payload = self.wire[lane].pop(0)
        h = unpack_header(header)
        if not self.rx.admit(h):
            if self.rx.verified[h.chunk]:
                self.control.append((True, h.chunk))
            return
        pos = 0
        for seg, a, b in self.plan.pieces(h.chunk):
            self.dst[seg][a:b] = payload[pos:pos + b - a]
            pos += b - a
        computed = xxhash.xxh3_64_intdigest(payload) if self.hashed else None
        if payload != self.flat[h.offset:h.offset + h.length]:
            self.corrupted_admitted += 1
        verdict = self.rx.received(h, computed)
        self.control.append((verdict.ack, h.chunk))
        for layer in verdict.layers_ready:
            self.layers_ready.append(layer)
            for seg in {p[0] for c in self.plan.layer_chunks[layer] for p in self.plan.pieces(c)}:
                assert bytes(self.dst[seg]) == self.src[seg], f"layer {layer} reported ready with wrong bytes"
        assert verdict.all_verified == (self.rx.remaining == 0)

    def step(self) -> None:
        self.steps += 1
        if self.steps == self.accept_after:
            assert self.tx.next_chunk() is None  # nothing leaves before ACCEPT
            self.tx.accepted = True
        actions = []
        if self.pending_layers:
            actions.append("layer")
        if self.tx.has_ready():
            actions += ["send"] * 3
        if any(self.wire):
            actions += ["chunk"] * 3
        if self.control:
            actions += ["control"] * 2
        if self.p_loss and self.rng.random() < self.p_loss:
            actions.append("loss")
        if self.done_digests:
            actions.append("done")
        if not actions:
            return
        a = self.rng.choice(actions)
        if a == "layer":
            self.tx.layer_ready(self.pending_layers.pop(0))
        elif a == "send":
            self.send_one(self.rng.randrange(self.lanes))
        elif a == "chunk":
            self.deliver_chunk(self.rng.choice([i for i, w in enumerate(self.wire) if w]))
        elif a == "control":
            self.deliver_control()
        elif a == "loss":
            self.lose_lane(self.rng.randrange(self.lanes))
        else:
            (digest,) = self.done_digests
            self.done_digests.clear()
            if self.rx.on_done(digest):
                assert self.tx.status.end(State.DONE)
            else:
                self.tx.status.end(State.FAILED, self.rx.status.reason)

    def run(self, max_steps: int = 100_000) -> None:
        self.tx.accepted = self.accept_after <= 0
        while not self.tx.state.terminal:
            assert self.steps < max_steps, "the exchange did not converge"
            self.step()


def _ready_layers() -> list[int]:
    plan = _manifests()[0].plan()
    return sorted(plan.layer_chunks)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), lanes=st.integers(1, 4), p_corrupt=st.sampled_from([0.0, 0.05, 0.3]),
       p_loss=st.sampled_from([0.0, 0.1, 0.4]), hashed=st.booleans(), accept_after=st.integers(0, 20))
def test_random_exchange_reaches_done(seed: int, lanes: int, p_corrupt: float, p_loss: float, hashed: bool,
                                      accept_after: int) -> None:
    sim = Sim(random.Random(seed), lanes=lanes, p_corrupt=p_corrupt if hashed else 0.0, p_loss=p_loss,
              hashed=hashed, accept_after=accept_after)
    sim.run()
    assert sim.tx.state is State.DONE and sim.rx.state is State.DONE
    assert [bytes(d) for d in sim.dst] == sim.src
    assert sorted(sim.layers_ready) == _ready_layers()  # exactly once per layer with chunks
    assert 2 not in sim.layers_ready  # the MLP-only layer has nothing to report
    assert sorted(sim.tx.acked_layers) == _ready_layers()  # the sender learns each of them once too
    assert sim.rx.remaining == 0 and all(sim.rx.verified)
    if hashed:
        assert sim.tx.digest() == transfer_digest(sim.rx.hashes) != 0
        assert sim.rx.bad_chunks == sim.corrupted_admitted
        assert sum(sim.tx.retries) <= sim.rx.bad_chunks
    else:
        assert sim.tx.digest() == 0


def test_many_chunks_and_layers() -> None:
    sim = Sim(random.Random(1))
    assert sim.plan.num_chunks >= 20 and len(sim.plan.layer_chunks) == 5
    assert any(len(r) > 1 for r in sim.plan.layer_chunks.values())
    assert any(len(sim.plan.pieces(c)) > 1 for c in range(sim.plan.num_chunks))  # chunks spanning segments


def test_corrupted_chunk_is_nacked_then_resent() -> None:
    sim = Sim(random.Random(2), lanes=1, max_retries=3)
    sim.tx.accepted = True
    sim.tx.layer_ready(0)
    (c,) = sim.plan.layer_chunks[0]
    sim.corrupt_chunks = frozenset({c})
    assert sim.send_one(0) and sim.tx.next_chunk() is None
    sim.deliver_chunk(0)
    assert sim.control == [(False, c)] and sim.rx.bad_chunks == 1 and not sim.rx.verified[c]
    assert sim.layers_ready == []
    sim.deliver_control()
    assert sim.tx.retries[c] == 1 and sim.tx.has_ready() and sim.tx.acked_layers == []  # NACK: not yet
    sim.corrupt_chunks = frozenset()
    assert sim.send_one(0)  # the same chunk again
    assert sim.wire[0][0][0] == pack_data_header(42, c, 0, 0, sim.plan.lengths[c],
                                                 xxhash.xxh3_64_intdigest(sim.flat[:sim.plan.lengths[c]]))
    sim.deliver_chunk(0)
    assert sim.control == [(True, c)] and sim.rx.verified[c] and sim.layers_ready == [0]
    assert bytes(sim.dst[0]) == sim.src[0] and bytes(sim.dst[1]) == sim.src[1]
    sim.deliver_control()
    assert sim.tx.acked_layers == [0]


def test_nacked_chunk_goes_before_queued_ones() -> None:
    sim = Sim(random.Random(3), lanes=1)
    sim.tx.accepted = True
    sim.tx.layer_ready(1)
    first, second, *_ = sim.plan.layer_chunks[1]
    assert sim.tx.next_chunk() == first
    sim.tx.on_nack([first])
    assert sim.tx.next_chunk() == first and sim.tx.next_chunk() == second


def test_retries_exhausted_fails() -> None:
    sim = Sim(random.Random(4), lanes=2, max_retries=3)
    bad = sim.plan.layer_chunks[1][1]
    sim.corrupt_chunks = frozenset({bad})
    sim.run()
    assert sim.tx.state is State.FAILED and f"chunk {bad}" in sim.tx.status.reason
    assert sim.tx.retries[bad] == 4 and sim.rx.bad_chunks >= 4
    assert sim.tx.next_chunk() is None and not sim.tx.has_ready()
    assert not sim.tx.status.end(State.DONE) and sim.tx.state is State.FAILED
    assert not sim.rx.verified[bad] and sim.rx.state is State.ACTIVE
    assert not sim.rx.on_done(sim.tx.digest())  # the receiver never completes with a hole
    assert sim.rx.state is State.FAILED


def test_terminal_state_is_reached_once() -> None:
    sim = Sim(random.Random(5))
    sim.run()
    for sm in (sim.tx, sim.rx):
        assert sm.state is State.DONE
        for other in (State.FAILED, State.TIMED_OUT, State.CANCELLED, State.DONE):
            assert sm.status.end(other, "late") is False
        assert sm.state is State.DONE and sm.status.reason == ""
    assert sim.rx.on_done(sim.tx.digest()) and sim.rx.on_done(0)  # already done: stays done


@pytest.mark.parametrize("state", [State.FAILED, State.TIMED_OUT, State.CANCELLED])
def test_first_terminal_state_wins(state: State) -> None:
    sim = Sim(random.Random(6))
    assert sim.rx.status.end(state, "first") is True
    assert sim.rx.status.end(State.DONE) is False and sim.rx.on_done(0) is False
    assert sim.rx.state is state and sim.rx.status.reason == "first"
    sim.tx.accepted = True
    for layer in range(LAYOUT.num_layers):
        sim.tx.layer_ready(layer)
    inflight = [sim.tx.next_chunk() for _ in range(sim.plan.num_chunks - 1)]
    assert sim.tx.status.end(state, "first") and not sim.tx.status.end(State.FAILED, "second")
    assert sim.tx.next_chunk() is None and not sim.tx.has_ready()
    assert sim.tx.on_ack(inflight) is False and sim.tx.unacked == 1  # no DONE after an end


def test_layers_ready_once_despite_duplicates() -> None:
    sim = Sim(random.Random(7), lanes=1)
    sim.tx.accepted = True
    for layer in range(LAYOUT.num_layers):
        sim.tx.layer_ready(layer)
    headers = []
    while sim.send_one(0):
        headers.append(sim.wire[0][-1])
    sim.wire[0] += headers  # every chunk arrives twice
    while sim.wire[0]:
        sim.deliver_chunk(0)
    assert sorted(sim.layers_ready) == _ready_layers()
    assert all(ok for ok, _ in sim.control) and len(sim.control) == 2 * sim.plan.num_chunks
    h = unpack_header(headers[0][0])
    again = sim.rx.received(h, xxhash.xxh3_64_intdigest(headers[0][1]))
    assert again.ack and again.layers_ready == ()
    assert sim.rx.admit(h) is False  # verified: drain and drop


def test_done_with_unverified_chunks_fails() -> None:
    sim = Sim(random.Random(8), lanes=1)
    sim.tx.accepted = True
    sim.tx.layer_ready(0)
    sim.send_one(0)
    sim.deliver_chunk(0)
    assert not sim.rx.on_done(sim.tx.digest())
    assert sim.rx.state is State.FAILED and "unverified" in sim.rx.status.reason


def test_done_with_wrong_digest_fails() -> None:
    sim = Sim(random.Random(9), lanes=1)
    sim.tx.accepted = True
    for layer in range(LAYOUT.num_layers):
        sim.tx.layer_ready(layer)
    while sim.send_one(0):
        sim.deliver_chunk(0)
    assert sim.rx.remaining == 0
    assert not sim.rx.on_done(sim.tx.digest() ^ 1)
    assert sim.rx.state is State.FAILED and "digest" in sim.rx.status.reason


def test_unhashed_transfer() -> None:
    sim = Sim(random.Random(10), lanes=1, hashed=False)
    sim.tx.accepted = True
    for layer in range(LAYOUT.num_layers):
        sim.tx.layer_ready(layer)
    while sim.send_one(0):
        sim.deliver_chunk(0)
    assert sim.rx.hashes == [0] * sim.plan.num_chunks and sim.tx.digest() == 0
    assert sim.rx.on_done(12345)  # the digest means nothing without hashing
    assert sim.rx.state is State.DONE and [bytes(d) for d in sim.dst] == sim.src


def _header(sim: Sim, c: int, **over: int) -> Header:
    f = dict(chunk=c, offset=sim.plan.offsets[c], length=sim.plan.lengths[c], layer=sim.plan.layers[c])
    f.update(over)
    packed = pack_data_header(42, f["chunk"], f["layer"], f["offset"], f["length"], f.get("digest", 1))
    return unpack_header(packed)


def test_admit_rejects_headers_outside_the_plan() -> None:
    sim = Sim(random.Random(11))
    c = sim.plan.layer_chunks[1][1]
    assert sim.rx.admit(_header(sim, c))
    for over in ({"chunk": sim.plan.num_chunks}, {"offset": sim.plan.offsets[c] + 1},
                 {"length": sim.plan.lengths[c] - 1}, {"layer": 0}, {"chunk": c + 1}):
        with pytest.raises(ProtocolError):
            sim.rx.admit(_header(sim, c, **over))
    unhashed = unpack_header(pack_data_header(42, c, sim.plan.layers[c], sim.plan.offsets[c],
                                              sim.plan.lengths[c], None))
    assert not unhashed.flags & FLAG_HASHED
    with pytest.raises(ProtocolError, match="no hash"):
        sim.rx.admit(unhashed)
    assert Sim(random.Random(11), hashed=False).rx.admit(unhashed)


def test_acks_outside_the_plan() -> None:
    sim = Sim(random.Random(12))
    for bad in (-1, sim.plan.num_chunks, 2**40):
        with pytest.raises(ProtocolError):
            sim.tx.on_ack([bad])
        with pytest.raises(ProtocolError):
            sim.tx.on_nack([bad])


def test_acks_for_chunks_not_in_flight_are_ignored() -> None:
    sim = Sim(random.Random(13))
    sim.tx.accepted = True
    assert sim.tx.on_ack([0]) is False and sim.tx.unacked == sim.plan.num_chunks  # never sent
    sim.tx.layer_ready(0)
    (c,) = sim.plan.layer_chunks[0]
    assert sim.tx.next_chunk() == c
    sim.tx.on_ack([c])
    sim.tx.on_ack([c])
    sim.tx.on_nack([c])  # late NACK of an acknowledged chunk: no re-send, no retry counted
    assert sim.tx.unacked == sim.plan.num_chunks - 1 and sim.tx.retries[c] == 0 and not sim.tx.has_ready()


def test_layer_written_twice() -> None:
    sim = Sim(random.Random(14))
    sim.tx.layer_ready(3)
    with pytest.raises(ValueError):
        sim.tx.layer_ready(3)


def test_requeue_after_lane_loss_resends() -> None:
    sim = Sim(random.Random(15), lanes=2)
    sim.tx.accepted = True
    sim.tx.layer_ready(1)
    chunks = list(sim.plan.layer_chunks[1])
    sim.send_one(0)
    sim.send_one(0)
    sim.wire[0].clear()  # the lane died before anything arrived
    sim.tx.requeue(sorted(sim.lane_inflight[0]))
    sim.tx.requeue(sorted(sim.lane_inflight[0]))  # twice: still one copy each
    again = [sim.tx.next_chunk() for _ in range(len(chunks))]
    assert sorted(again[:2]) == chunks[:2] and again[2:] == chunks[2:] and sim.tx.next_chunk() is None


def test_one_writer_per_chunk_so_a_verified_byte_is_never_overwritten() -> None:
    sim = Sim(random.Random(13))
    c = sim.plan.layer_chunks[1][0]
    h = _header(sim, c)  # digest 1
    assert sim.rx.admit(h)
    assert not sim.rx.admit(h)  # a re-sent copy arrives while the first is read: drained, never written
    assert sim.rx.received(h, 1).ack and sim.rx.verified[c]
    assert not sim.rx.admit(h)  # and once verified, no copy is written again
    assert c not in sim.rx.writing and c not in sim.rx.dropped
    # the copy being read fails its hash: a NACK answers both, and the next copy may be written
    c2 = sim.plan.layer_chunks[1][1]
    h2 = _header(sim, c2)
    assert sim.rx.admit(h2) and not sim.rx.admit(h2)
    assert not sim.rx.received(h2, 2).ack
    assert sim.rx.admit(h2)
    # the copy being read breaks off (its lane died): the dropped copy must be asked for again
    assert sim.rx.abandon(c2) is False  # no other copy was seen meanwhile: nothing to ask
    assert sim.rx.admit(h2) and not sim.rx.admit(h2)
    assert sim.rx.abandon(c2) is True
    assert sim.rx.admit(h2)


def test_a_lost_copy_is_resent_without_counting_a_retry() -> None:
    sim = Sim(random.Random(14), max_retries=1)
    sim.tx.accepted = True
    sim.tx.layer_ready(0)
    c = sim.tx.next_chunk()
    assert c is not None
    for _ in range(5):
        sim.tx.on_nack([c], lost=True)
        assert sim.tx.state is State.ACTIVE and sim.tx.next_chunk() == c
    assert sim.tx.retries[c] == 0
