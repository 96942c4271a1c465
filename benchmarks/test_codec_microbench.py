"""pytest-benchmark versions of the codec micro-benchmarks, plus xxh3_64 of one 2 MiB chunk.

Collected only when ``benchmarks/`` is passed explicitly (``testpaths`` is ``tests``):
``python -m pytest benchmarks/test_codec_microbench.py``. No assertion on time: the figures are the output.
Each benchmark checks the result of the operation it times, so a broken codec cannot bench fast.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import pytest
import xxhash
from codec_bench import PLAN_MODELS, header_case, manifest_case, plan_case

if TYPE_CHECKING:
    from pytest_benchmark.fixture import BenchmarkFixture

pytest.importorskip("pytest_benchmark")


def test_manifest_encode_decode(benchmark: BenchmarkFixture) -> None:
    fn, m = manifest_case()
    got = benchmark(fn)
    assert got.total_bytes == m.total_bytes and got.layout is m.layout


@pytest.mark.parametrize("model", PLAN_MODELS)
def test_chunk_plan_128k(benchmark: BenchmarkFixture, model: str) -> None:
    fn, n = plan_case(model)
    assert benchmark(fn).num_chunks == n


def test_header_pack_unpack(benchmark: BenchmarkFixture) -> None:
    h = benchmark(header_case())
    assert h.chunk == 1234


def test_xxh3_64_of_2mib_chunk(benchmark: BenchmarkFixture) -> None:
    chunk = memoryview(bytearray(os.urandom(2 * 1024 * 1024)))
    digest = benchmark(xxhash.xxh3_64_intdigest, chunk)
    assert digest == xxhash.xxh3_64_intdigest(bytes(chunk))
    benchmark.extra_info["GB/s"] = round(len(chunk) / benchmark.stats.stats.median / 1e9, 2)
