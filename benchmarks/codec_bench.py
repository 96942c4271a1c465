"""Codec micro-benchmarks: the per-transfer and per-chunk costs of the sans-IO wire codec.

Prints, for each operation, the median time per call over many timeit-style loops next to its target:

- manifest encode+decode: ``to_wire`` -> ``msgpack.packb`` -> ``msgpack.unpackb`` -> ``parse_manifest``
  for a 60-layer Qwen3.5-397B-A17B request of 32k tokens, the receiver knowing the layout by fingerprint;
- chunk planning: ``plan_segments`` + ``plan_chunks`` for a 128k-token request (Qwen3-Next, Kimi Linear);
- header pack+unpack per chunk: ``pack_data_header`` + ``unpack_header``.

Run: ``python benchmarks/codec_bench.py [--repeat N] [--min-time S]``. The figures are for one CPU core of
whatever machine runs it; on a shared machine, rerun before believing a MISS.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import timeit
from collections.abc import Callable
from dataclasses import dataclass

import msgpack

from kvwire.codec.frames import Header, pack_data_header, unpack_header
from kvwire.codec.layout import RequestSpec, plan_segments
from kvwire.codec.manifest import Manifest, build_manifest, parse_manifest
from kvwire.codec.plan import DEFAULT_CHUNK, ChunkPlan, plan_chunks
from kvwire.codec.presets import load_preset

MANIFEST_MODEL = "qwen3.5-397b-a17b"
MANIFEST_TOKENS = 32 * 1024
PLAN_MODELS = ("qwen3-next-80b-a3b", "kimi-linear-48b-a3b")
PLAN_TOKENS = 128 * 1024


@dataclass(frozen=True)
class Case:
    name: str
    fn: Callable[[], object]
    target_us: float
    note: str = ""


def manifest_case() -> tuple[Callable[[], Manifest], Manifest]:
    layout = load_preset(MANIFEST_MODEL)
    request = RequestSpec("bench-manifest", MANIFEST_TOKENS, MANIFEST_TOKENS - 1)
    m = build_manifest(123456789, layout, request, DEFAULT_CHUNK)
    known = {layout.fingerprint(): layout}  # the receiver has seen this layout on the session

    def encode_decode() -> Manifest:
        wire = msgpack.packb(m.to_wire(), use_bin_type=True)
        return parse_manifest(msgpack.unpackb(wire, raw=False), known_layouts=known)

    got = encode_decode()
    assert got.layout is layout and len(got.segments) == len(m.segments) and got.total_bytes == m.total_bytes
    return encode_decode, m


def plan_case(model: str) -> tuple[Callable[[], ChunkPlan], int]:
    layout = load_preset(model)
    request = RequestSpec("bench-plan", PLAN_TOKENS, PLAN_TOKENS - 1)

    def plan() -> ChunkPlan:
        return plan_chunks(plan_segments(layout, request), DEFAULT_CHUNK)

    return plan, plan_chunks(plan_segments(layout, request), DEFAULT_CHUNK).num_chunks


def header_case() -> Callable[[], object]:
    def pack_unpack() -> Header:
        return unpack_header(pack_data_header(77, 1234, 17, 123 << 21, DEFAULT_CHUNK, 0x0123456789ABCDEF))

    h = pack_unpack()
    assert h.chunk == 1234 and h.length == DEFAULT_CHUNK
    return pack_unpack


def cases() -> list[Case]:
    enc, m = manifest_case()
    out = [Case("manifest encode+decode", enc, 200.0,
                f"{MANIFEST_MODEL}, {MANIFEST_TOKENS} tokens, {len(m.segments)} segments, layout by fingerprint")]
    for model in PLAN_MODELS:
        fn, n = plan_case(model)
        out.append(Case(f"chunk plan {model}", fn, 5000.0, f"{PLAN_TOKENS} tokens, {n} chunks of ~2 MiB"))
    out.append(Case("header pack+unpack", header_case(), 2.0, "pack_data_header + unpack_header"))
    return out


def median_us(fn: Callable[[], object], repeat: int, min_time: float) -> tuple[float, int]:
    """Median seconds per call over ``repeat`` loops, each loop long enough to time (timeit's autorange)."""
    timer = timeit.Timer(fn)
    number, took = timer.autorange()
    number = max(1, int(number * min_time / max(took, 1e-9)))
    runs = timer.repeat(repeat=repeat, number=number)
    return statistics.median(runs) / number * 1e6, number


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=15, help="timed loops per case (median is reported)")
    ap.add_argument("--min-time", type=float, default=0.1, help="seconds per timed loop")
    args = ap.parse_args(argv)
    print(f"kvwire codec bench: Python {platform.python_version()} on {platform.machine()}, "
          f"{os.cpu_count()} CPUs visible, load {os.getloadavg()[0]:.2f}, {args.repeat} loops per case")
    misses = 0
    for c in cases():
        us, number = median_us(c.fn, args.repeat, args.min_time)
        ok = us < c.target_us
        misses += not ok
        print(f"{c.name:<34} {us:>10.2f} us  (target < {c.target_us:g} us)  {'PASS' if ok else 'MISS'}"
              f"   [{c.note}; {number} calls/loop]")
    return 1 if misses else 0


if __name__ == "__main__":
    sys.exit(main())
