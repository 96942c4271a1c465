"""Staging on a CUDA device (skipped without one): the same loopback round trips as test_staging, with the
side streams, events, device scratch and pinned pools of the GPU path; and every copy path (direct,
scratch, auto) as in test_staging_paths, with scrambled, consecutive and chunked block tables and layers
staged on a foreign stream."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)

from test_staging import round_trip  # noqa: E402
from test_staging_paths import TABLES, hit_request, local_round_trip  # noqa: E402

from kvwire import Receiver, RequestSpec, Session, connect  # noqa: E402
from kvwire.cuda import PinnedPool  # noqa: E402
from kvwire.testing.fixtures import FIXTURES, default_request, load_fixture  # noqa: E402

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def link() -> Iterator[tuple[Receiver, Session]]:
    with Receiver() as rx, connect(*rx.address, lanes=3, chunk_size=64 * 1024) as s:
        yield rx, s


@pytest.fixture(scope="module")
def pool() -> Iterator[PinnedPool]:
    with PinnedPool(256 << 20, backend="torch") as p:
        assert p.pinned
        yield p


@pytest.mark.parametrize("page_layout", ["block_major", "kv_major"])
@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_every_fixture_round_trips_on_the_gpu(link: tuple[Receiver, Session], pool: PinnedPool, name: str,
                                              page_layout: str) -> None:
    out = round_trip(link, pool, load_fixture(name), default_request(f"gpu-{name}-{page_layout}"),
                     page_layout=page_layout, device="cuda", seed=3)
    assert out["src"].is_cuda and out["dst"].is_cuda
    assert pool.in_use_bytes == 0


def test_unaligned_prefix_hit_and_hnd_on_the_gpu(link: tuple[Receiver, Session], pool: PinnedPool) -> None:
    for name in ("tiny-mimo-swa", "tiny-falcon-h1"):
        round_trip(link, pool, load_fixture(name), RequestSpec(f"gpu-hit-{name}", 1000, 999, {"attn": 37}),
                   kv_order="HND", device="cuda", seed=4)


@pytest.mark.parametrize("mode", ["direct", "scratch"])
@pytest.mark.parametrize("page_layout", ["block_major", "kv_major"])
@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_every_fixture_every_path_on_the_gpu(pool: PinnedPool, name: str, page_layout: str, mode: str) -> None:
    out = local_round_trip(pool, load_fixture(name), hit_request(f"gpu-{name}"), d2h=mode, h2d=mode,
                           tables="chunked", page_layout=page_layout, device="cuda", seed=5)
    assert set(out["modes"][0].values()) == {mode} and set(out["modes"][1].values()) == {mode}


@pytest.mark.parametrize("tables", TABLES)
@pytest.mark.parametrize("mode", ["direct", "scratch", "auto"])
def test_paths_tables_and_a_foreign_stream_on_the_gpu(pool: PinnedPool, mode: str, tables: str) -> None:
    other = torch.cuda.Stream()
    for name, fmt in (("tiny-qwen3-next", ("block_major", "NHD")), ("tiny-mimo-swa", ("kv_major", "HND")),
                      ("tiny-deepseek-mla", ("split", "NHD"))):
        local_round_trip(pool, load_fixture(name), hit_request(f"gpu-{name}"), d2h=mode, h2d=mode, tables=tables,
                         page_layout=fmt[0], kv_order=fmt[1], device="cuda", seed=6,
                         stream_for=lambda layer: other if layer % 3 == 1 else None)
    other.synchronize()
