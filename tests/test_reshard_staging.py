"""Re-sharding through the staging path (CPU fallback of kvwire.cuda) and the adapter-independent lifecycle:
prefill ranks' paged caches -> Stager -> ReshardOutgoing (gather) -> sockets -> ReshardIncoming (scatter) ->
Unstager -> decode ranks' paged caches, via Outbox.begin_resharded / Inbox.expect_resharded. The caches are
loaded from the independent reference's shards and read back out, so the check is end to end."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from adapters_util import poll_until  # noqa: E402
from reshard_ref import FAMILY_CONFIGS, family_layout, global_payload, shard_reference  # noqa: E402

from kvwire import RequestSpec, State  # noqa: E402
from kvwire.adapters.lifecycle import Inbox, Outbox  # noqa: E402
from kvwire.codec.layout import ModelLayout  # noqa: E402
from kvwire.codec.reshard import plan_reshard  # noqa: E402
from kvwire.cuda import PagedCache, PinnedPool, Stager, Unstager, allocate_paged_cache  # noqa: E402

KEY = b"reshard-staging"
MiB = 1 << 20


def tables_for(cache: PagedCache, request: RequestSpec, offset: int) -> dict[str, list[int]]:
    need = -(-request.num_tokens // cache.block_size)
    return {g: [(offset + i * 3) % cache.num_blocks(g) for i in range(need)] for g in cache.groups}


def cache_with(layout: ModelLayout, request: RequestSpec, segments: list[np.ndarray] | None, offset: int
               ) -> tuple[PagedCache, dict[str, list[int]]]:
    """A CPU paged cache (random bytes), holding ``segments`` (wire form) at its tables and slot 1 if given."""
    cache = allocate_paged_cache(layout, 24, 3, fill="random", seed=offset)
    tables = tables_for(cache, request, offset)
    if segments is not None:
        with PinnedPool(16 * MiB, backend="torch") as pool, Unstager(cache, pool) as un:
            job = un.prepare(request, tables, 1)
            for buf, seg in zip(job.buffers, segments):
                buf.copy_(torch.from_numpy(seg))
            for layer in job.layers:
                job.layer_arrived(layer)
            job.wait_all(timeout=10)
            job.release()
    return cache, tables


def read_back(cache: PagedCache, request: RequestSpec, tables: dict[str, list[int]]) -> list[bytes]:
    """The request's wire-form segments as they now sit in ``cache`` (staged out again)."""
    with PinnedPool(16 * MiB, backend="torch") as pool, Stager(cache, pool) as st:
        job = st.begin(request, tables, 1)
        out: dict[int, bytes] = {}
        for layer in job.layers:
            views = job.stage(layer).result(10)
            for i, v in zip(job.placement.by_layer[layer], views):
                out[i] = v.numpy().tobytes()
        job.release()
    return [out[i] for i in sorted(out)]


@pytest.mark.parametrize("family,tp_p,tp_d,send_first", [("mamba2", 1, 2, False), ("kda", 2, 1, False),
                                                         ("gdn", 2, 4, False), ("gdn", 2, 4, True),
                                                         ("kda", 2, 1, True)])
def test_staged_reshard_through_outbox_and_inbox(family: str, tp_p: int, tp_d: int, send_first: bool,
                                                 no_leaks: None) -> None:
    """``send_first``: every prefill rank sends before any decode rank expects: the slices are received into
    staging buffers and scattered into place from there at ``expect_resharded``."""
    request = RequestSpec(f"st-{family}", 40, 39)
    config = FAMILY_CONFIGS[family]
    g = family_layout(family, "vllm", 1)
    payload = global_payload(g, request, seed=5)
    plan = plan_reshard(family_layout(family, "vllm", tp_p), family_layout(family, "vllm", tp_d))
    src = [cache_with(family_layout(family, "vllm", tp_p, p), request,
                      shard_reference(g, config, payload, request, tp_p, p), 7 * p + 1) for p in range(tp_p)]
    dst = [cache_with(family_layout(family, "vllm", tp_d, d), request, None, 5 * d + 2) for d in range(tp_d)]
    pools = [PinnedPool(16 * MiB, backend="torch") for _ in range(tp_p + tp_d)]
    stagers = [Stager(c, pools[p]) for p, (c, _) in enumerate(src)]
    unstagers = [Unstager(c, pools[tp_p + d]) for d, (c, _) in enumerate(dst)]
    inboxes = [Inbox(u, key=KEY, timeout=20) for u in unstagers]
    outboxes = [Outbox(s, key=KEY, lanes=1) for s in stagers]
    released: list[Any] = []
    try:
        for d, inbox in enumerate(inboxes if not send_first else []):
            inbox.expect_resharded(f"d{d}", request, plan, d, dst[d][1], 1, release=released.append)
        endpoints = {d: inbox.address for d, inbox in enumerate(inboxes)}
        for p, outbox in enumerate(outboxes):
            sending = outbox.begin_resharded(f"p{p}", request, plan, p, endpoints, src[p][1], 1,
                                             release=released.append)
            assert not sending.error, sending.error
            for layer in sending.layers:
                sending.stage(layer)
            sending.finish()
        ended = []
        if send_first:  # the prefill ranks' transfers end (verified into staging) with nobody expecting yet
            ended = poll_until(*outboxes, count=tp_p)
            assert all(inbox.staged == {f"{request.request_id}@{p}>{d}" for p in plan.sources(d)}
                       for d, inbox in enumerate(inboxes))
            for d, inbox in enumerate(inboxes):
                inbox.expect_resharded(f"d{d}", request, plan, d, dst[d][1], 1, release=released.append)
                assert not inbox.staged
        ended += poll_until(*outboxes, *inboxes, count=tp_p + tp_d - len(ended))
        assert sorted((e.key, e.state) for e in ended) == sorted(
            [(f"p{p}", State.DONE) for p in range(tp_p)] + [(f"d{d}", State.DONE) for d in range(tp_d)])
    finally:
        for box in (*outboxes, *inboxes):
            box.close()
        for s in (*stagers, *unstagers):
            s.close()
    assert sorted(e.key for e in released) == sorted([f"p{p}" for p in range(tp_p)] + [f"d{d}" for d in range(tp_d)])
    assert all(p.in_use_bytes == 0 for p in pools)
    for d, (cache, tables) in enumerate(dst):
        want = [w.tobytes() for w in shard_reference(g, config, payload, request, tp_d, d)]
        assert read_back(cache, request, tables) == want, f"decode rank {d}"
    for p in pools:
        p.close()


def test_inbox_reshard_refusal_is_reported_by_lease(no_leaks: None) -> None:
    """A request id expected twice fails the second lease; a plan whose rank is out of range fails the first."""
    request = RequestSpec("st-bad", 16, 16)
    plan = plan_reshard(family_layout("gdn", "vllm", 2), family_layout("gdn", "vllm", 1))
    cache, tables = cache_with(family_layout("gdn", "vllm", 1), request, None, 3)
    with PinnedPool(16 * MiB, backend="torch") as pool:
        un = Unstager(cache, pool)
        inbox = Inbox(un, key=KEY, timeout=5)
        try:
            inbox.expect_resharded("bad-rank", request, plan, 3, tables, 1)
            ended = poll_until(inbox, count=1, timeout=10)
            assert [(e.key, e.state) for e in ended] == [("bad-rank", State.FAILED)]
            assert "decode rank 3 outside tp 1" in ended[0].reason
        finally:
            inbox.close()
            un.close()
        assert pool.in_use_bytes == 0


def test_early_slice_of_another_plan_refused_at_expect(no_leaks: None) -> None:
    """A slice that arrived before ``expect_resharded`` and carries another plan's layout fails the request
    (it was staged, not trusted) and its staging buffer goes back to the pool."""
    request = RequestSpec("st-other", 16, 16)
    theirs = plan_reshard(family_layout("gdn", "vllm", 2), family_layout("gdn", "vllm", 1))
    mine = plan_reshard(family_layout("kda", "vllm", 2), family_layout("kda", "vllm", 1))
    g = family_layout("gdn", "vllm", 1)
    payload = global_payload(g, request, seed=3)
    src = cache_with(family_layout("gdn", "vllm", 2, 0), request,
                     shard_reference(g, FAMILY_CONFIGS["gdn"], payload, request, 2, 0), 1)
    dst = cache_with(family_layout("kda", "vllm", 1), request, None, 2)
    pools = [PinnedPool(16 * MiB, backend="torch") for _ in range(2)]
    stager, unstager = Stager(src[0], pools[0]), Unstager(dst[0], pools[1])
    outbox, inbox = Outbox(stager, key=KEY, lanes=1), Inbox(unstager, key=KEY, timeout=20)
    try:
        sending = outbox.begin_resharded("p0", request, theirs, 0, {0: inbox.address}, src[1], 1)
        sending.finish()
        poll_until(outbox, count=1)
        assert inbox.staged == {"st-other@0>0"}
        inbox.expect_resharded("d0", request, mine, 0, dst[1], 1)
        ended = poll_until(inbox, count=1, timeout=10)
        assert [e.state for e in ended] == [State.FAILED] and "another plan" in ended[0].reason
    finally:
        outbox.close()
        inbox.close()
        stager.close()
        unstager.close()
    assert all(p.in_use_bytes == 0 for p in pools)
    for p in pools:
        p.close()
