"""Property-based fuzzing (hypothesis) of everything that reads a peer's messages: ``parse_manifest``, the
typed control-message readers, frame decoding, and the receiver's control dispatch over a real
authenticated session. The only exceptions allowed out of a parser are kvwire's own; the receiver
answers every message with a legal reply (or ends the session with an ERROR) and no thread dies.

Each hypothesis example draws one input from the strategies plus a seeded ``random.Random`` that
derives ``BATCH - 1`` more by mutating a valid message (hypothesis costs ~10 ms per example on a busy
2-core machine; 10^5 inputs must run in minutes). Inputs per test: ``KVWIRE_FUZZ_INPUTS`` (default
2,000, derandomized so CI is deterministic; the live receiver test takes a fifth of that, since a
message that ends the session costs a new authenticated one). The full run:
``KVWIRE_FUZZ_INPUTS=100000 pytest tests/test_fuzz_property.py -s --timeout 0`` (10^5 inputs per parser
test, 2*10^4 live; about 11 min on the shared 2-core machine), and ``KVWIRE_FUZZ_INPUTS=500000 ... -k
dispatch`` for 10^5 live messages (about 10 min). Each prints its count and time.
"""

from __future__ import annotations

import copy
import os
import random
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvwire import KvwireError, Receiver
from kvwire.codec import frames as F
from kvwire.codec import messages
from kvwire.codec.manifest import build_manifest, parse_manifest
from kvwire.tcp import Channel, client_handshake
from kvwire.testing.decoder import ControlFrame, FrameDecoder
from kvwire.testing.fixtures import FIXTURES, default_request, load_fixture

BATCH = 50
INPUTS = int(os.environ.get("KVWIRE_FUZZ_INPUTS", "2000"))
FUZZ = settings(max_examples=max(1, INPUTS // BATCH), deadline=None, derandomize=True, database=None,
                suppress_health_check=list(HealthCheck))
LIVE = settings(FUZZ, max_examples=max(1, INPUTS // BATCH // 5))

# ------------------------------------------------------------------ inputs

_SCALARS = [None, True, False, 0, 1, -1, 7, 2**31, 2**32, 2**63 - 1, 2**63, 2**64 - 1, -(2**63), 1 << 40, 0.5,
            1e300, float("nan"), float("inf"), "", "x", "timed_out", "failed", "xxh3_64", "none", b"", b"\1" * 16]
_KEYS = ["v", "tid", "fp", "req", "seg", "chunk", "hash", "layout", "sink", "c", "digest", "reason", "state",
         "layers", "tp_size", "name", "request_id", "num_tokens", "x"]
_scalars = st.one_of(st.sampled_from(_SCALARS), st.integers(-(2**63), 2**64 - 1), st.binary(max_size=20))
#: arbitrary msgpack-able values, two levels deep at most
junk = st.one_of(_scalars, st.lists(_scalars, max_size=4), st.dictionaries(st.sampled_from(_KEYS), _scalars,
                                                                           max_size=4),
                 st.lists(st.lists(_scalars, max_size=6), max_size=3))


def _rscalar(r: random.Random) -> Any:
    k = r.random()
    if k < 0.6:
        return r.choice(_SCALARS)
    if k < 0.85:
        return r.randrange(-(2**63), 2**64)
    return r.randbytes(r.randrange(20))


def _rjunk(r: random.Random) -> Any:
    """What ``junk`` draws, from a seeded Random (fast)."""
    k = r.random()
    if k < 0.5:
        return _rscalar(r)
    if k < 0.7:
        return [_rscalar(r) for _ in range(r.randrange(5))]
    if k < 0.85:
        return {r.choice(_KEYS): _rscalar(r) for _ in range(r.randrange(5))}
    return [[_rscalar(r) for _ in range(r.randrange(7))] for _ in range(r.randrange(4))]


def _valid_begin(fixture: str, tid: int, with_layout: bool) -> dict[str, Any]:
    layout = load_fixture(fixture)
    return build_manifest(tid, layout, default_request(f"r{tid}"), 1 << 20).to_wire(with_layout=with_layout)


_BASES = [_valid_begin(f, 7, w) for f in sorted(FIXTURES)[:4] for w in (False, True)]
_BODIES: dict[str, dict[str, Any]] = {
    F.DONE: {"tid": 7, "digest": 12345}, F.CANCEL: {"tid": 7, "reason": "r", "state": "timed_out"},
    F.ERROR: {"tid": 7, "reason": "r", "state": "failed"}, F.ACK: {"tid": 7, "c": [0, 1]},
    F.NACK: {"tid": 7, "c": [2]}, F.HEARTBEAT: {}, F.BYE: {},
}


def _paths(v: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    yield prefix
    if isinstance(v, dict):
        for k, x in v.items():
            yield from _paths(x, (*prefix, k))
    elif isinstance(v, list):
        for i, x in enumerate(v[:8]):
            yield from _paths(x, (*prefix, i))


def mutate(r: random.Random, base: dict[str, Any]) -> dict[str, Any]:
    """``base`` with 1-3 of its leaves or containers replaced, deleted, nudged or repeated."""
    d = copy.deepcopy(base)
    for _ in range(r.randint(1, 3)):
        paths = [p for p in _paths(d) if p]
        if not paths:
            d[r.choice(_KEYS)] = _rjunk(r)
            continue
        path = r.choice(paths)
        parent = d
        for k in path[:-1]:
            parent = parent[k]
        old = parent[path[-1]]
        how = r.choice(["junk", "delete", "nudge", "grow"])
        if how == "delete" and isinstance(parent, dict):
            del parent[path[-1]]
        elif how == "nudge" and type(old) is int:
            parent[path[-1]] = old + r.choice([-1, 1, -old - 1, 2**63, 1 << 40, 2**64])
        elif how == "grow" and isinstance(old, list):
            parent[path[-1]] = old * r.choice([2, 3, 64])
        else:
            parent[path[-1]] = _rjunk(r)
    return d


def _wire(d: Any) -> Any:
    """``d`` as a receiver would decode it (msgpack round trip), or None where no peer could send it."""
    try:
        return msgpack.unpackb(msgpack.packb(d, use_bin_type=True), raw=False, strict_map_key=False)
    except (ValueError, TypeError, OverflowError):
        return None


def _manifest_batch(r: random.Random, drawn: dict[str, Any]) -> list[Any]:
    return [_wire(drawn)] + [_wire(mutate(r, r.choice(_BASES)) if r.random() < 0.9 else
                                   {r.choice(_KEYS): _rjunk(r) for _ in range(r.randrange(8))})
                             for _ in range(BATCH - 1)]


def _message_batch(r: random.Random, drawn: tuple[str, dict[str, Any]]) -> list[tuple[str, Any]]:
    out = [drawn]
    for _ in range(BATCH - 1):
        if r.random() < 0.8:
            kind = r.choice(sorted(_BODIES))
            out.append((kind, mutate(r, _BODIES[kind])))
        else:
            out.append((r.choice(sorted(F.CONTROL_KINDS)), {r.choice(_KEYS): _rjunk(r) for _ in range(r.randrange(6))}))
    return out


drawn_manifests = st.one_of(st.sampled_from(_BASES), st.dictionaries(st.sampled_from(_KEYS), junk, max_size=8))
drawn_messages = st.tuples(st.sampled_from(sorted(F.CONTROL_KINDS)),
                           st.dictionaries(st.sampled_from(_KEYS), junk, max_size=6))
_seeds = st.integers(0, 2**32 - 1).map(random.Random)
manifest_batches = st.builds(_manifest_batch, _seeds, drawn_manifests)
message_batches = st.builds(_message_batch, _seeds, drawn_messages)


def _report(name: str, runs: int, t0: float) -> None:
    print(f"\n{name}: {runs} inputs in {time.monotonic() - t0:.1f} s")


# ------------------------------------------------------------------ pure parsers


def test_fuzz_parse_manifest() -> None:
    runs, accepted = [0], [0]

    def one(batch: list[Any]) -> None:
        for d in batch:
            runs[0] += 1
            try:
                m = parse_manifest(d, F.DEFAULT_LIMITS, {})
            except KvwireError:
                continue
            accepted[0] += 1
            assert len(m.segments) <= F.DEFAULT_LIMITS.max_segments
            assert m.total_bytes <= F.DEFAULT_LIMITS.max_transfer_bytes
            m.plan()  # whatever parses can be planned
            assert m.metadata_bytes > 0

    t0 = time.monotonic()
    given(manifest_batches)(FUZZ(one))()
    _report(f"parse_manifest ({accepted[0]} accepted)", runs[0], t0)
    assert runs[0] >= INPUTS and accepted[0] > 0


def test_fuzz_control_message_readers() -> None:
    runs = [0]

    def one(batch: list[tuple[str, Any]]) -> None:
        for _, body in batch:
            runs[0] += 1
            for read in (messages.parse_done, lambda b: messages.parse_end(b, "cancel"),
                         lambda b: messages.parse_chunks(b, "ack", 16), messages.reason):
                try:
                    read(body)
                except KvwireError:
                    pass

    t0 = time.monotonic()
    given(message_batches)(FUZZ(one))()
    _report("control message readers", runs[0], t0)
    assert runs[0] >= INPUTS


def test_fuzz_frame_decode() -> None:
    runs = [0]

    def one(batch: list[tuple[str, Any]], cuts: list[int], noise: bytes) -> None:
        stream = b"".join(_frame(k, b) for k, b in batch)
        r = random.Random(len(stream) + sum(cuts))
        for i in range(BATCH):
            runs[0] += 1
            data = bytearray(stream)
            for _ in range(i % 4):  # flip, cut, splice
                pos = r.randrange(len(data))
                data[pos] ^= 1 << r.randrange(8)
            if i % 5 == 1:
                data = data[: r.randrange(len(data))] + noise
            dec = FrameDecoder(F.preauth_limits(F.DEFAULT_LIMITS) if i % 2 else F.DEFAULT_LIMITS)
            try:
                pos = 0
                for c in [*cuts, len(data)]:
                    for f in dec.feed(bytes(data[pos:pos + c])):
                        if isinstance(f, ControlFrame):
                            assert f.kind in F.CONTROL_KINDS
                    pos += c
            except KvwireError:
                pass

    t0 = time.monotonic()
    given(message_batches, st.lists(st.integers(1, 400), max_size=4), st.binary(max_size=64))(FUZZ(one))()
    _report("frame decode", runs[0], t0)
    assert runs[0] >= INPUTS


def _frame(kind: str, body: Any) -> bytes:
    try:
        return F.encode_control(kind, body if isinstance(body, dict) and "t" not in body else {})
    except (ValueError, TypeError, OverflowError):
        return F.encode_control(F.HEARTBEAT)


# ------------------------------------------------------------------ the receiver's control dispatch

_REPLIES = {F.ACCEPT, F.REJECT, F.ERROR, F.COMPLETE, F.HEARTBEAT}
_MARK = 2**64 - 1  # a BEGIN with this tid and no manifest is always REJECTed: a reply to sync on


class _Peer:
    """An authenticated raw session to the receiver, re-opened whenever the receiver ends it."""

    def __init__(self, rx: Receiver) -> None:
        self.rx = rx
        self.ch: Channel | None = None
        self.sessions = 0

    def send(self, kind: str, body: dict[str, Any]) -> list[str]:
        if self.ch is None:
            raw = socket.create_connection(self.rx.address)
            self.ch = Channel(raw, F.DEFAULT_LIMITS)
            client_handshake(self.ch, b"k", 1)
            self.sessions += 1
        ch = self.ch
        replies: list[str] = []
        try:
            ch.send(kind, body)
            ch.send(F.BEGIN, {"tid": _MARK})
            while True:
                k, b = ch.read_control()
                if k == F.REJECT and b.get("tid") == _MARK:
                    return replies
                replies.append(k)
                if k == F.ERROR and b.get("tid") is None:  # the session ended
                    raise ConnectionError
        except (OSError, ValueError, TypeError, OverflowError):
            ch.close()
            self.ch = None
            return replies

    def close(self) -> None:
        if self.ch is not None:
            self.ch.close()


def test_fuzz_receiver_control_dispatch() -> None:
    died: list[BaseException] = []
    old = threading.excepthook
    threading.excepthook = lambda a: died.append(a.exc_value)  # type: ignore[assignment,arg-type,return-value]
    try:
        with Receiver(key="k", allocator=lambda m: bytearray(m.total_bytes), transfer_timeout=2.0,
                      peer_timeout=30.0) as rx:
            peer = _Peer(rx)
            runs = [0]

            def one(manifests: list[Any], bodies: list[tuple[str, Any]]) -> None:
                for kind, body in [(F.BEGIN, m) for m in manifests[: BATCH // 2]] + bodies[: BATCH // 2]:
                    runs[0] += 1
                    if not isinstance(body, dict) or "t" in body:
                        continue
                    try:
                        F.encode_control(kind, body)
                    except (ValueError, TypeError, OverflowError):
                        continue  # not encodable: no peer could send it
                    assert set(peer.send(kind, body)) <= _REPLIES

            t0 = time.monotonic()
            try:
                given(manifest_batches, message_batches)(LIVE(one))()
            finally:
                peer.close()
            _report(f"receiver control dispatch ({peer.sessions} sessions)", runs[0], t0)
            # still serving
            layout = load_fixture("tiny-llama")
            from helpers import payload

            from kvwire import connect
            with connect(*rx.address, key="k") as s:
                h = s.send(layout, default_request("after-fuzz"))
                h.write_all(payload(layout, default_request("after-fuzz")))
                h.finish().result(10)
    finally:
        threading.excepthook = old
    assert died == [], died[:3]


@pytest.mark.parametrize("kind", [F.DONE, F.CANCEL])
def test_control_readers_refuse_unhashable_ids(kind: str) -> None:
    read = messages.parse_done if kind == F.DONE else (lambda b: messages.parse_end(b, kind))
    for tid in ([1], {"a": 1}, 1.5, True, -1, 2**64, "7", None):
        with pytest.raises(F.ProtocolError):
            read({"tid": tid, "digest": 1, "reason": ""})
