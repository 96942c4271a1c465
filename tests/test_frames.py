"""The 48-byte header, control messages and FrameDecoder: round trips, every validation path, any slicing.

Headers used to probe validation are built here from the documented layout (struct + xxh32), not with
``pack_header``, so the tests also pin the wire format itself.
"""

from __future__ import annotations

import struct
import tracemalloc
from typing import Any

import msgpack
import pytest
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st

from kvwire.codec import frames as F
from kvwire.codec.frames import (
    CONTROL_KINDS,
    DEFAULT_LIMITS,
    FLAG_HASHED,
    HEADER_SIZE,
    KIND_CONTROL,
    KIND_DATA,
    MIN_CHUNK,
    Limits,
)
from kvwire.errors import ProtocolError
from kvwire.testing.decoder import ControlFrame, DataFrame, Frame, FrameDecoder

U32 = (1 << 32) - 1
U64 = (1 << 64) - 1
SPEC = struct.Struct("<4sBBHQIIQIQ")  # the 44 checked bytes, as the module docstring lays them out


def raw_header(*, magic: bytes = b"KVWR", version: int = F.VERSION, kind: int = KIND_DATA, flags: int = 0,
               tid: int = 7, chunk: int = 3, layer: int = 2, offset: int = 4096, length: int = 100,
               digest: int = 0, check: int | None = None) -> bytes:
    head = SPEC.pack(magic, version, kind, flags, tid, chunk, layer, offset, length, digest)
    return head + struct.pack("<I", xxhash.xxh32_intdigest(head) if check is None else check)


def control_frame(kind: str, body: dict[str, Any]) -> bytes:
    payload = msgpack.packb({"t": kind, **body}, use_bin_type=True)
    return raw_header(kind=KIND_CONTROL, tid=0, chunk=0, layer=0, offset=0, length=len(payload),
                      digest=xxhash.xxh3_64_intdigest(payload)) + payload


def raw_control(payload: bytes) -> bytes:
    """A control frame around arbitrary body bytes, with a correct header and checksum."""
    digest = xxhash.xxh3_64_intdigest(payload)
    return raw_header(kind=KIND_CONTROL, length=len(payload), digest=digest) + payload


def data_frame(payload: bytes, *, chunk: int = 0, tid: int = 1) -> bytes:
    return F.pack_data_header(tid, chunk, chunk % 5, chunk * 65536, len(payload),
                              xxhash.xxh3_64_intdigest(payload)) + payload


# ---------------------------------------------------------------- header


def test_header_is_48_bytes_in_the_documented_layout() -> None:
    h = F.pack_header(KIND_DATA, 0x0102030405060708, 9, 10, 1 << 40, 4096, 0xAABBCCDDEEFF0011, FLAG_HASHED)
    assert len(h) == HEADER_SIZE == 48
    assert h == raw_header(kind=KIND_DATA, flags=FLAG_HASHED, tid=0x0102030405060708, chunk=9, layer=10,
                           offset=1 << 40, length=4096, digest=0xAABBCCDDEEFF0011)


@given(
    kind=st.sampled_from([KIND_DATA, KIND_CONTROL]),
    flags=st.sampled_from([0, FLAG_HASHED]),
    tid=st.integers(0, U64),
    chunk=st.integers(0, U32),
    layer=st.integers(0, U32),
    offset=st.integers(0, U64),
    length_frac=st.floats(0, 1),
    digest=st.integers(0, U64),
)
def test_header_round_trip(kind: int, flags: int, tid: int, chunk: int, layer: int, offset: int,
                           length_frac: float, digest: int) -> None:
    cap = DEFAULT_LIMITS.max_chunk if kind == KIND_DATA else DEFAULT_LIMITS.max_control
    length = max(1, round(length_frac * cap))
    packed = F.pack_header(kind, tid, chunk, layer, offset, length, digest, flags)
    for buf in (packed, bytearray(packed), memoryview(packed)):
        h = F.unpack_header(buf)
        assert (h.kind, h.flags, h.transfer_id, h.chunk, h.layer, h.offset, h.length, h.digest) == (
            kind, flags, tid, chunk, layer, offset, length, digest)


@given(tid=st.integers(0, U64), chunk=st.integers(0, U32), digest=st.one_of(st.none(), st.integers(0, U64)))
def test_data_header_flags_follow_hashing(tid: int, chunk: int, digest: int | None) -> None:
    h = F.unpack_header(F.pack_data_header(tid, chunk, 1, 0, MIN_CHUNK, digest))
    assert h.kind == KIND_DATA and h.transfer_id == tid and h.chunk == chunk
    if digest is None:
        assert (h.flags, h.digest) == (0, 0)
    else:
        assert (h.flags, h.digest) == (FLAG_HASHED, digest)


@pytest.mark.parametrize("size", [0, 1, HEADER_SIZE - 1, HEADER_SIZE + 1, 2 * HEADER_SIZE])
def test_header_of_wrong_size(size: int) -> None:
    with pytest.raises(ProtocolError, match="48 bytes"):
        F.unpack_header(bytes(size))


@pytest.mark.parametrize("magic", [b"KVWS", b"\0\0\0\0", b"HTTP", b"kvwr"])
def test_bad_magic(magic: bytes) -> None:
    with pytest.raises(ProtocolError, match="magic"):
        F.unpack_header(raw_header(magic=magic))


@pytest.mark.parametrize("version", [0, F.VERSION - 1, F.VERSION + 1, 255])
def test_other_version(version: int) -> None:
    with pytest.raises(ProtocolError, match="version"):
        F.unpack_header(raw_header(version=version))


@given(bit=st.integers(6 * 8, HEADER_SIZE * 8 - 1))
def test_any_flipped_bit_after_version_fails_the_header_check(bit: int) -> None:
    buf = bytearray(raw_header())
    buf[bit // 8] ^= 1 << (bit % 8)
    with pytest.raises(ProtocolError, match="header check"):
        F.unpack_header(buf)


def test_flipped_bit_in_magic_or_version_is_still_rejected() -> None:
    for bit in range(5 * 8):
        buf = bytearray(raw_header())
        buf[bit // 8] ^= 1 << (bit % 8)
        with pytest.raises(ProtocolError, match="magic|version"):
            F.unpack_header(buf)


@pytest.mark.parametrize("limits", [DEFAULT_LIMITS, Limits(max_chunk=MIN_CHUNK, max_control=1024)])
def test_lengths_checked_against_limits(limits: Limits) -> None:
    cases = ((KIND_DATA, limits.max_chunk, "chunk"), (KIND_CONTROL, limits.max_control, "control"))
    for kind, cap, word in cases:
        assert F.unpack_header(raw_header(kind=kind, length=cap), limits).length == cap
        assert F.unpack_header(raw_header(kind=kind, length=1), limits).length == 1
        for bad in (0, cap + 1, U32):
            with pytest.raises(ProtocolError, match=f"{word} length"):
                F.unpack_header(raw_header(kind=kind, length=bad), limits)


def test_smaller_limits_reject_what_defaults_accept() -> None:
    h = raw_header(kind=KIND_DATA, length=MIN_CHUNK + 1)
    F.unpack_header(h)
    with pytest.raises(ProtocolError):
        F.unpack_header(h, Limits(max_chunk=MIN_CHUNK))


@pytest.mark.parametrize("kind", [0, 3, 4, 127, 255])
def test_unknown_kind(kind: int) -> None:
    with pytest.raises(ProtocolError, match="kind"):
        F.unpack_header(raw_header(kind=kind))


@pytest.mark.parametrize("flags", [2, 3, 0x100, 0x8000, 0xFFFF])
@pytest.mark.parametrize("kind", [KIND_DATA, KIND_CONTROL])
def test_unknown_flags(flags: int, kind: int) -> None:
    with pytest.raises(ProtocolError, match="flags"):
        F.unpack_header(raw_header(kind=kind, flags=flags))


def test_limits_refuse_to_be_too_small() -> None:
    with pytest.raises(ValueError):
        Limits(max_chunk=MIN_CHUNK - 1)
    with pytest.raises(ValueError):
        Limits(max_control=1023)


# ---------------------------------------------------------------- control messages

_scalar = st.one_of(
    st.none(), st.booleans(), st.integers(-(1 << 63), U64), st.floats(allow_nan=False),
    st.text(max_size=20), st.binary(max_size=20),
)
_value = st.recursive(
    _scalar,
    lambda inner: st.one_of(st.lists(inner, max_size=5),
                            st.dictionaries(st.text(max_size=8), inner, max_size=5)),
    max_leaves=20,
)
_body = st.dictionaries(st.text(max_size=12).filter(lambda k: k != "t"), _value, max_size=8)


@given(kind=st.sampled_from(sorted(CONTROL_KINDS)), body=_body)
def test_control_round_trip(kind: str, body: dict[str, Any]) -> None:
    frame = F.encode_control(kind, body)
    h = F.unpack_header(frame[:HEADER_SIZE])
    assert h.kind == KIND_CONTROL and h.length == len(frame) - HEADER_SIZE
    assert F.decode_control(h, frame[HEADER_SIZE:]) == (kind, body)
    assert FrameDecoder().feed(frame) == [ControlFrame(kind, body)]


def test_control_without_body() -> None:
    assert FrameDecoder().feed(F.encode_control(F.HEARTBEAT)) == [ControlFrame(F.HEARTBEAT, {})]


def test_encode_control_refuses_unknown_kind_and_kind_override() -> None:
    with pytest.raises(ValueError):
        F.encode_control("no-such-kind")
    with pytest.raises(ValueError):
        F.encode_control(F.ACK, {"t": F.BYE})


def _decode_raw(payload: bytes) -> tuple[str, dict[str, Any]]:
    frame = raw_control(payload)
    return F.decode_control(F.unpack_header(frame[:HEADER_SIZE]), frame[HEADER_SIZE:])


@pytest.mark.parametrize(
    "payload",
    [
        b"\xc1",  # reserved msgpack byte
        b"\x92\x01",  # truncated array
        msgpack.packb([1, 2, 3]),  # not a map
        msgpack.packb("hello"),
        msgpack.packb({"x": 1}),  # no "t"
        msgpack.packb({"t": "no-such-kind"}),
        msgpack.packb({"t": 5}),
        msgpack.packb({"t": [1]}),  # unhashable kind
        msgpack.packb({"t": {"a": 1}}),
        msgpack.packb({"t": b"ack"}, use_bin_type=True),  # bytes, not a string
        msgpack.packb({1: 2, "t": "ack"}),  # non-string key
        msgpack.packb({"t": "ack"}) + b"\x00",  # trailing bytes
        msgpack.packb({"t": "ack", "x": msgpack.ExtType(5, b"abc")}),  # ext types are refused
        msgpack.packb({"t": "ack", "c": [None] * ((1 << 16) * 8 + 1)}),  # array too long
        msgpack.packb({"t": "ack", **{f"k{i}": i for i in range(4096)}}),  # map too long
    ],
)
def test_bad_control_bodies(payload: bytes) -> None:
    with pytest.raises(ProtocolError):
        _decode_raw(payload)


def test_control_checksum_mismatch() -> None:
    frame = bytearray(F.encode_control(F.ACK, {"tid": 1, "c": [1, 2, 3]}))
    frame[-1] ^= 0x01
    h = F.unpack_header(bytes(frame[:HEADER_SIZE]))
    with pytest.raises(ProtocolError, match="checksum"):
        F.decode_control(h, frame[HEADER_SIZE:])
    with pytest.raises(ProtocolError, match="checksum"):
        FrameDecoder().feed(frame)


def test_deep_nesting_is_a_protocol_error() -> None:
    with pytest.raises(ProtocolError):
        _decode_raw(b"\x82\xa1t\xa3ack\xa1x" + b"\x91" * 100_000 + b"\xc0")


def _filled(item: bytes, cap: int = DEFAULT_LIMITS.max_control) -> bytes:
    """``{"t": "ack", "k0": [item, ...], ...}`` as long as ``cap`` allows, each array at the array limit."""
    parts, left = [msgpack.packb("t") + msgpack.packb("ack")], cap - 64
    while left > 64:
        n = min(1 << 19, (left - 16) // len(item))
        parts.append(msgpack.packb(f"k{len(parts)}") + b"\xdd" + n.to_bytes(4, "big") + item * n)
        left -= len(parts[-1])
    return b"\xde" + len(parts).to_bytes(2, "big") + b"".join(parts)


@pytest.mark.parametrize("item", [b"\x80", b"\x90", b"\x91\x90", b"\x81\xa1k\x90"],
                         ids=["empty maps", "empty lists", "[[]]", "{k: []}"])
def test_a_frame_of_tiny_containers_is_refused_before_it_expands(item: bytes) -> None:
    """A 4 MiB frame of empty maps decoded into 290 MiB (tracemalloc peak; 281 MiB RSS), ~70x its size: every
    container had its own bound, their number none. It is refused now past Limits.max_control_containers,
    having decoded no more than that many (peak 8 MiB, 2x the frame)."""
    frame = raw_control(_filled(item))
    assert len(frame) > DEFAULT_LIMITS.max_control - 100
    tracemalloc.start()
    try:
        with pytest.raises(ProtocolError, match="more than 35840 maps and arrays"):
            F.decode_control(F.unpack_header(frame[:HEADER_SIZE]), frame[HEADER_SIZE:])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 * len(frame), f"refusing it took {peak / 2**20:.1f} MiB"
    with pytest.raises(ProtocolError, match="maps and arrays"):  # and the same through the stream decoder
        FrameDecoder().feed(frame)


def test_the_container_bound_is_exact_and_honest_large_frames_decode() -> None:
    """Negative controls: a BEGIN with the layout of a 1024-layer model (96 kB, ~11,300 maps and arrays; it
    decodes to 15x its size) and a 1 MiB blob full of container-like bytes (the fast upper bound passes it to
    the exact count) decode unchanged; with small limits exactly max_control_containers decode, one more not."""
    from kvwire.codec.hf import layout_from_hf_config
    from kvwire.codec.layout import RequestSpec
    from kvwire.codec.manifest import build_manifest, parse_manifest
    from kvwire.codec.presets import preset_config

    big = layout_from_hf_config(dict(preset_config("llama-3-70b"), num_hidden_layers=1024), name="llama-1024")
    m = build_manifest(1, big, RequestSpec("r", 8192, 8192), 1 << 22)
    frame = F.encode_control(F.BEGIN, m.to_wire(with_layout=True))
    kind, body = F.decode_control(F.unpack_header(frame[:HEADER_SIZE]), frame[HEADER_SIZE:])
    assert kind == F.BEGIN and parse_manifest(body).layout == big and len(frame) > 90_000
    blob = {"blob": b"\x90\xdc" * (1 << 19)}
    frame = F.encode_control(F.APP, blob)
    assert F.decode_control(F.unpack_header(frame[:HEADER_SIZE]), frame[HEADER_SIZE:]) == (F.APP, blob)
    small = Limits(max_segments=16, max_layers=8)
    n = small.max_control_containers  # the top map and "x" are two of them
    for count, ok in ((n - 2, True), (n - 1, False)):
        frame = F.encode_control(F.APP, {"x": [[] for _ in range(count)]})
        if ok:
            assert F.decode_control(F.unpack_header(frame[:HEADER_SIZE]), frame[HEADER_SIZE:], small)[0] == F.APP
        else:
            with pytest.raises(ProtocolError, match=f"more than {n} maps and arrays"):
                F.decode_control(F.unpack_header(frame[:HEADER_SIZE]), frame[HEADER_SIZE:], small)


# ---------------------------------------------------------------- FrameDecoder


def _stream() -> tuple[bytes, list[Frame]]:
    parts: list[tuple[bytes, Frame]] = []
    for i, (kind, body) in enumerate([(F.HELLO, {"version": 1, "nonce": b"\x01" * 16}),
                                      (F.ACK, {"tid": 9, "c": list(range(40))}),
                                      (F.HEARTBEAT, {}), (F.DONE, {"tid": 9, "digest": U64})]):
        parts.append((F.encode_control(kind, body), ControlFrame(kind, body)))
        payload = bytes((i * 37 + j) % 251 for j in range(1 + 997 * i))
        raw = data_frame(payload, chunk=i)
        parts.append((raw, DataFrame(F.unpack_header(raw[:HEADER_SIZE]), payload)))
    return b"".join(p for p, _ in parts), [f for _, f in parts]


STREAM, FRAMES = _stream()


def _feed_in_pieces(stream: bytes, cuts: list[int], limits: Limits = DEFAULT_LIMITS) -> list[Frame]:
    dec = FrameDecoder(limits)
    out: list[Frame] = []
    bound = HEADER_SIZE + max(limits.max_chunk, limits.max_control)
    prev = 0
    for cut in sorted(set(cuts)) + [len(stream)]:
        out += dec.feed(stream[prev:cut])
        prev = cut
        assert dec.buffered < bound
    assert dec.buffered == 0
    return out


def test_whole_stream_at_once() -> None:
    assert FrameDecoder().feed(STREAM) == FRAMES


def test_many_frames_in_one_feed_plus_a_partial_one() -> None:
    """Tens of thousands of small frames in one feed (the buffer is cut once, not per frame), and the
    trailing partial frame is kept for the next feed."""
    n = 30_000
    acks = [F.encode_control(F.ACK, {"tid": i, "c": [i]}) for i in range(n)]
    dec = FrameDecoder()
    out = dec.feed(b"".join(acks) + acks[0][:10])
    assert [f.body["tid"] for f in out if isinstance(f, ControlFrame)] == list(range(n)) and dec.buffered == 10
    rest = dec.feed(acks[0][10:])
    assert [f.body["tid"] for f in rest if isinstance(f, ControlFrame)] == [0] and dec.buffered == 0


@settings(max_examples=200)
@given(cuts=st.lists(st.integers(0, len(STREAM)), max_size=40))
def test_any_slicing_yields_the_same_frames(cuts: list[int]) -> None:
    assert _feed_in_pieces(STREAM, cuts) == FRAMES


def test_one_byte_at_a_time() -> None:
    assert _feed_in_pieces(STREAM, list(range(len(STREAM)))) == FRAMES


def test_memoryview_and_bytearray_input() -> None:
    dec = FrameDecoder()
    half = len(STREAM) // 2
    assert dec.feed(memoryview(STREAM)[:half]) + dec.feed(bytearray(STREAM[half:])) == FRAMES


@given(n=st.integers(0, len(STREAM) - 1))
def test_truncated_input_waits_for_more(n: int) -> None:
    dec = FrameDecoder()
    got = dec.feed(STREAM[:n])
    assert got == FRAMES[: len(got)] and len(got) < len(FRAMES)
    assert got + dec.feed(STREAM[n:]) == FRAMES


def test_empty_feed() -> None:
    dec = FrameDecoder()
    assert dec.feed(b"") == [] and dec.buffered == 0


@pytest.mark.parametrize("kind", [KIND_CONTROL, KIND_DATA])
def test_a_claimed_max_length_is_not_allocated_up_front(kind: int) -> None:
    limits = Limits()
    cap = limits.max_control if kind == KIND_CONTROL else limits.max_chunk
    dec = FrameDecoder(limits)
    tracemalloc.start()
    try:
        assert dec.feed(raw_header(kind=kind, length=cap) + b"\x81\xa1t") == []
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert dec.buffered == 3  # the header is consumed; only the body bytes seen so far are held
    assert peak < cap // 8, f"feeding 51 bytes peaked at {peak} bytes"
    for _ in range(100):
        assert dec.feed(b"\x00" * 7) == []
    assert dec.buffered == 703


def test_error_is_sticky() -> None:
    bad = FrameDecoder()
    with pytest.raises(ProtocolError, match="magic"):
        bad.feed(raw_header(magic=b"XXXX"))
    assert bad.buffered == 0
    for more in (STREAM, b"", F.encode_control(F.BYE)):
        with pytest.raises(ProtocolError, match="magic"):
            bad.feed(more)


def test_error_after_good_frames_in_one_feed_is_sticky() -> None:
    dec = FrameDecoder()
    with pytest.raises(ProtocolError, match="checksum"):
        dec.feed(STREAM + raw_control(b"\x80")[:-1] + b"\x81")
    with pytest.raises(ProtocolError):
        dec.feed(STREAM)


def test_decoder_honours_its_limits() -> None:
    small = Limits(max_chunk=MIN_CHUNK, max_control=1024)
    dec = FrameDecoder(small)
    assert len(dec.feed(data_frame(b"x" * MIN_CHUNK))) == 1
    with pytest.raises(ProtocolError, match="chunk length"):
        dec.feed(data_frame(b"x" * (MIN_CHUNK + 1)))
    with pytest.raises(ProtocolError, match="control length"):
        FrameDecoder(small).feed(F.encode_control(F.ERROR, {"reason": "x" * 2000}))
