"""Fuzzing the two parsers that read untrusted bytes: FrameDecoder and parse_manifest.

Over 100,000 seeded inputs (random bytes, bit flips, truncations, splices of valid frames, headers with
valid checks but random lengths/kinds/flags, control bodies of msgpack junk, manifests with wrong types,
huge counts, negative and out-of-range ints, nested junk). The only exceptions allowed out are the typed
ones; anything accepted must satisfy the limits it was parsed under.
"""

from __future__ import annotations

import random
import struct
from collections.abc import Callable
from typing import Any

import msgpack
import xxhash

from kvwire.codec import frames as F
from kvwire.codec.frames import (
    HEADER_SIZE,
    KIND_CONTROL,
    KIND_DATA,
    MIN_CHUNK,
    Limits,
)
from kvwire.codec.layout import CacheSpec, LayerSpec, ModelLayout, RequestSpec, TensorSpec, plan_segments
from kvwire.codec.manifest import build_manifest, check_manifest_against, max_chunk_size, parse_manifest
from kvwire.errors import LayoutMismatch, ProtocolError
from kvwire.testing.decoder import ControlFrame, DataFrame, FrameDecoder

SEED = 0x6B767769
N_DECODER = 100_000
N_MANIFEST = 30_000
_CHECKED = struct.Struct("<4sBBHQIIQIQ")
SMALL = Limits(max_chunk=2 * MIN_CHUNK, max_control=4096, max_segments=64, max_chunks=512,
               max_transfer_bytes=1 << 26, max_layers=16)
LIMITS = (F.DEFAULT_LIMITS, SMALL)


def _header(rng: random.Random, *, kind: int, length: int, digest: int = 0, flags: int = 0,
            version: int = F.VERSION, magic: bytes = b"KVWR") -> bytes:
    head = _CHECKED.pack(magic, version, kind, flags, rng.getrandbits(64), rng.getrandbits(32),
                         rng.getrandbits(32), rng.getrandbits(64), length, digest)
    return head + struct.pack("<I", xxhash.xxh32_intdigest(head))


def _control_raw(rng: random.Random, payload: bytes) -> bytes:
    digest = xxhash.xxh3_64_intdigest(payload)
    return _header(rng, kind=KIND_CONTROL, length=len(payload), digest=digest) + payload


def _junk(rng: random.Random, depth: int = 0) -> Any:
    r = rng.randrange(14 if depth < 3 else 11)
    if r == 0:
        return None
    if r == 1:
        return rng.random() < 0.5
    if r == 2:
        return rng.choice([0, 1, -1, 2**31, -(2**63), 2**63 - 1, 2**63, 2**64 - 1, rng.getrandbits(64)])
    if r == 3:
        return rng.choice([0.0, -1.5, 1e300, float("inf"), float("-inf"), float("nan"), 3.0])
    if r == 4:
        return rng.choice(["", "t", "ack", "begin", "x" * rng.randrange(300), "\u2603"])
    if r == 5:
        return rng.randbytes(rng.choice([0, 1, 15, 16, 17, 64]))
    if r in (6, 7, 8):
        return rng.randrange(-(2**63), 2**64)
    if r in (9, 10):
        return rng.choice(sorted(F.CONTROL_KINDS))
    if r in (11, 12):
        return [_junk(rng, depth + 1) for _ in range(rng.randrange(6))]
    keys = ["t", "v", "c", "tid", "x", "seg", "req"]
    return {rng.choice(keys): _junk(rng, depth + 1) for _ in range(rng.randrange(5))}


# ---------------------------------------------------------------- FrameDecoder


def _corpus(rng: random.Random) -> list[bytes]:
    out = [F.encode_control(k, {"tid": rng.getrandbits(64), "c": list(range(rng.randrange(20)))})
           for k in sorted(F.CONTROL_KINDS)]
    for i in range(10):
        payload = rng.randbytes(rng.randrange(1, 3000))
        digest = xxhash.xxh3_64_intdigest(payload)
        out.append(F.pack_data_header(i, i, i, i * 4096, len(payload), digest) + payload)
    return out


def _decoder_inputs(rng: random.Random, corpus: list[bytes]) -> Callable[[], tuple[str, bytes]]:
    def frames(k: int) -> bytes:
        return b"".join(rng.choice(corpus) for _ in range(k))

    def bitflip() -> bytes:
        buf = bytearray(frames(rng.randint(1, 3)))
        for _ in range(rng.randint(1, 4)):
            buf[rng.randrange(len(buf))] ^= 1 << rng.randrange(8)
        return bytes(buf)

    def truncate() -> bytes:
        s = frames(rng.randint(1, 3))
        return s[: rng.randrange(len(s))]

    def splice() -> bytes:
        a, b = rng.choice(corpus), rng.choice(corpus)
        return frames(rng.randrange(2)) + a[: rng.randrange(len(a) + 1)] + b[rng.randrange(len(b)):]

    def random_bytes() -> bytes:
        return rng.randbytes(rng.choice([1, 8, 47, 48, 49, 100, 500]))

    def random_header() -> bytes:
        length = rng.choice([0, 1, 2, 100, 1024, 4096, 4097, MIN_CHUNK, MIN_CHUNK + 1, 4 << 20, (4 << 20) + 1,
                             16 << 20, (16 << 20) + 1, 2**32 - 1, rng.getrandbits(32)])
        kind = rng.choice([KIND_DATA, KIND_CONTROL, KIND_DATA, KIND_CONTROL, 0, 3, rng.getrandbits(8)])
        flags = rng.choice([0, 0, 1, 2, rng.getrandbits(16)])
        version = rng.choice([F.VERSION] * 3 + [0, F.VERSION + 1, rng.getrandbits(8)])
        magic = rng.choice([b"KVWR"] * 5 + [b"KVWX", rng.randbytes(4)])
        body = rng.randbytes(min(length, rng.choice([0, 10, 200, 3000])))
        return _header(rng, kind=kind, length=length, flags=flags, version=version, magic=magic) + body

    def control_junk() -> bytes:
        r = rng.randrange(4)
        if r == 0:
            payload = msgpack.packb(_junk(rng), use_bin_type=True)
        elif r == 1:
            body = {"t": rng.choice(sorted(F.CONTROL_KINDS) + ["nope", ""])}
            body.update({str(i): _junk(rng) for i in range(rng.randrange(4))})
            payload = msgpack.packb(body, use_bin_type=True)
        elif r == 2:  # a valid body with flipped bits, under a recomputed checksum
            buf = bytearray(msgpack.packb({"t": "ack", "tid": 5, "c": [1, 2, 3], "x": {"y": [b"z"]}}))
            for _ in range(rng.randint(1, 3)):
                buf[rng.randrange(len(buf))] ^= 1 << rng.randrange(8)
            payload = bytes(buf)
        else:
            payload = rng.randbytes(rng.randint(1, 64))
        return _control_raw(rng, payload)

    gens = [bitflip, truncate, splice, random_bytes, random_header, control_junk]

    def next_input() -> tuple[str, bytes]:
        g = rng.choice(gens)
        return g.__name__, g()

    return next_input


def test_fuzz_frame_decoder() -> None:
    rng = random.Random(SEED)
    next_input = _decoder_inputs(rng, _corpus(rng))
    errors = frames_out = 0
    for i in range(N_DECODER):
        name, data = next_input()
        limits = rng.choice(LIMITS)
        dec = FrameDecoder(limits)
        cuts = sorted(rng.randrange(len(data) + 1) for _ in range(rng.randrange(4)))
        pieces = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)])]
        try:
            for p in pieces:
                for fr in dec.feed(p):
                    frames_out += 1
                    if isinstance(fr, ControlFrame):
                        assert fr.kind in F.CONTROL_KINDS and isinstance(fr.body, dict) and "t" not in fr.body
                    else:
                        assert isinstance(fr, DataFrame)
                        assert len(fr.payload) == fr.header.length <= limits.max_chunk
                assert dec.buffered < HEADER_SIZE + max(limits.max_chunk, limits.max_control)
        except ProtocolError as e:
            if name == "truncate":
                raise AssertionError(f"input {i}: a prefix of valid frames was refused: {e}") from e
            errors += 1
            try:
                dec.feed(b"")
            except ProtocolError:
                pass
            else:
                raise AssertionError(f"input {i} ({name}): decoder accepted bytes after an error") from None
        except Exception as e:
            raise AssertionError(f"input {i} ({name}, {data[:96]!r}...): {type(e).__name__}: {e}") from e
    # the mix must exercise both outcomes, or the fuzzer is not reaching the parser
    print(f"decoder: {errors} errors, {frames_out} frames")
    assert errors > N_DECODER // 10 and frames_out > N_DECODER // 10, (errors, frames_out)


# ---------------------------------------------------------------- parse_manifest


def _layout() -> ModelLayout:
    def t(name: str, shape: tuple[int, ...], layout: str, indexing: str) -> TensorSpec:
        return TensorSpec(name, shape, "bfloat16", layout, indexing)

    gdn = CacheSpec("gdn", (t("conv", (3, 64), "conv:SD", "request"),
                            t("ssm", (2, 16, 16), "ssm:HVK", "request")))
    gqa = CacheSpec("gqa", (t("k", (2, 16), "NHD", "token"), t("v", (2, 16), "NHD", "token")))
    swa = CacheSpec("swa", (t("k", (1, 16), "NHD", "token"), t("v", (1, 16), "NHD", "token")), window=64)
    mla = CacheSpec("mla", (t("latent", (40,), "latent", "token"),))
    caches = [(gdn,), (gqa,), (), (swa,), (mla,), (gdn,)]
    return ModelLayout("fuzz", tuple(LayerSpec(i, c) for i, c in enumerate(caches)))


def _paths(obj: Any, out: list[tuple[Any, Any]]) -> list[tuple[Any, Any]]:
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
    for k, v in items:
        out.append((obj, k))
        _paths(v, out)
    return out


def _mutate(rng: random.Random, wire: dict[str, Any]) -> dict[str, Any]:
    d = msgpack.unpackb(msgpack.packb(wire, use_bin_type=True), raw=False)  # a deep copy
    for _ in range(rng.choice([1, 1, 1, 2, 3])):
        paths = _paths(d, [])
        if not paths:
            break
        parent, key = rng.choice(paths)
        op = rng.randrange(7)
        if op <= 2:
            parent[key] = _junk(rng)
        elif op == 3:
            del parent[key]
        elif op == 4:
            v = parent[key]
            edge = rng.choice([-1, -(2**63), 2**63, 2**64 - 1, 0])
            parent[key] = edge if isinstance(v, int) else _junk(rng)
        elif op == 5:
            v = parent[key]
            if isinstance(v, int) and not isinstance(v, bool):
                parent[key] = v + rng.choice([-1, 1, 4096, -4096, 1 << 32])
            else:
                parent[key] = _junk(rng)
        elif op == 6 and isinstance(parent, list) and len(parent) > 1:
            j = rng.randrange(len(parent))
            parent[key], parent[j] = parent[j], parent[key]
        else:
            parent[key] = _junk(rng)
    if rng.random() < 0.1:  # counts over the SMALL limits
        lists = [(p, k) for p, k in _paths(d, []) if isinstance(p[k], list) and p[k]]
        if lists:
            parent, key = rng.choice(lists)
            parent[key] = parent[key] * rng.choice([2, 3, 70])
    if rng.random() < 0.005:  # counts over the default limits
        d["seg"] = [[0, 0, 0, 1, 0, 0]] * rng.choice([65537, 100_000])
    return d


def _through_the_wire(body: dict[str, Any], limits: Limits) -> dict[str, Any] | None:
    """The BEGIN body as the receiver sees it (None when the frame layer already refuses it)."""
    try:
        frame = F.encode_control(F.BEGIN, body)
    except ValueError:
        return None
    try:
        (fr,) = FrameDecoder(limits).feed(frame)
    except ProtocolError:
        return None
    assert isinstance(fr, ControlFrame) and fr.kind == F.BEGIN
    return fr.body


def _rows(segments: Any) -> list[tuple[int, ...]]:
    return [(s.layer, s.cache, s.tensor, s.nbytes, s.token_start, s.token_count) for s in segments]


def _check_accepted(m: Any, limits: Limits, layout: ModelLayout) -> None:
    assert len(m.segments) <= limits.max_segments
    assert 0 <= m.total_bytes <= limits.max_transfer_bytes
    assert MIN_CHUNK <= m.chunk_size <= max_chunk_size(limits)
    assert len(m.fingerprint) == 16
    if m.layout is not None:
        assert _rows(m.segments) == _rows(plan_segments(m.layout, m.request))
    if m.total_bytes // m.chunk_size < 5000:
        plan = m.plan()
        assert plan.num_chunks <= limits.max_chunks and plan.total == m.total_bytes
        assert all(0 < n <= limits.max_chunk for n in plan.lengths)
    try:
        check_manifest_against(m, layout)
    except LayoutMismatch:
        pass


def test_fuzz_parse_manifest() -> None:
    rng = random.Random(SEED + 1)
    layout = _layout()
    known = {layout.fingerprint(): layout}
    bases = []
    requests = (RequestSpec("r1", 1000, 999),
                RequestSpec("r2", 300, 300, {"attn": 128, "swa": 16}, {"attn": (1, 2)}))
    for req in requests:
        m = build_manifest(rng.getrandbits(64), layout, req, MIN_CHUNK)
        bases += [m.to_wire(with_layout=True), m.to_wire()]
    accepted = rejected = 0
    for i in range(N_MANIFEST):
        limits = rng.choice(LIMITS)
        d = _mutate(rng, rng.choice(bases)) if rng.random() < 0.97 else _junk(rng)
        if isinstance(d, dict):
            body = _through_the_wire(d, limits)
            if body is None:
                continue
        else:
            body = d  # not a map: parse_manifest must still refuse it with a typed error
        try:
            m = parse_manifest(body, limits, rng.choice([None, known]))
        except (ProtocolError, LayoutMismatch):
            rejected += 1
            continue
        except Exception as e:
            raise AssertionError(f"input {i}: {type(e).__name__}: {e}\n{body!r:.2000}") from e
        accepted += 1
        _check_accepted(m, limits, layout)
    print(f"manifests: {accepted} accepted, {rejected} rejected")
    assert accepted > N_MANIFEST // 50 and rejected > N_MANIFEST // 2, (accepted, rejected)


def test_manifest_fuzz_bases_are_accepted() -> None:
    """The unmutated inputs parse: rejections above come from the mutations, not from a broken base."""
    layout = _layout()
    m = build_manifest(3, layout, RequestSpec("r1", 1000, 999), MIN_CHUNK)
    for wire, known in ((m.to_wire(with_layout=True), None), (m.to_wire(), {layout.fingerprint(): layout})):
        for limits in LIMITS:
            body = _through_the_wire(wire, limits)
            assert body is not None
            got = parse_manifest(body, limits, known)
            assert got.layout == layout and got.total_bytes == m.total_bytes
