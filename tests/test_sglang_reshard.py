"""SGLang backend with prefill and decode at different attention TP: contract tests against SGLang's real
classes (``KVArgs``, ``KVPoll``, the base classes the backend subclasses), over real loopback sessions and a
real bootstrap mailbox, every rank of both sides a manager of its own in this process.

The model is a tiny hybrid, built whole (TP=1) with random bytes, then sharded for each rank by the simple
reference below (independent of ``kvwire.codec.reshard``): KV and SWA heads split per rank (or one head
replicated when there are fewer heads than ranks), the GDN conv state's ``[q|k|v]`` channels split per part,
the recurrent state's heads split, the aux rows on every rank. Each rank's ``KVArgs`` carries the slicing
metadata SGLang's pools report (``state_dim_per_tensor``, ``state_slice_outer_counts``,
``state_conv_shard_groups``). Every decode rank's buffers are compared byte for byte with the reference
shard of the whole cache. They skip where SGLang is not importable (``scripts/test-sglang`` runs them).
"""

from __future__ import annotations

import os
import time
import types
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from test_adapters_sglang import PAGE, _import_sglang, poll_until  # noqa: E402

SGL = _import_sglang()
pytestmark = pytest.mark.skipif(SGL is None, reason="SGLang is not importable here (scripts/test-sglang runs these)")

PARTS = (8, 8, 16)  # the GDN conv state's global [q | k | v] channels
SSM_HEADS = 4


class Whole:
    """The TP=1 cache: 2 attention layers (K, V), 2 GDN layers (conv, recurrent), 1 SWA layer, aux rows."""

    def __init__(self, kv_heads: int, seed: int = 7, pages: int = 16, slots: int = 4, swa_pages: int = 8,
                 rows: int = 6, mla: bool = False) -> None:
        g = torch.Generator().manual_seed(seed)

        def t(shape: tuple[int, ...], dtype: Any) -> Any:
            if dtype == torch.int32:
                return torch.randint(0, 1 << 20, shape, generator=g, dtype=dtype)
            return torch.randn(shape, generator=g).to(dtype)

        self.kv_heads, self.mla = kv_heads, mla
        if mla:  # one latent buffer per layer (MLATokenToKVPool), the same on every rank
            self.k, self.v = [t((pages * PAGE, 1, 24), torch.bfloat16) for _ in range(2)], []
        else:
            self.k = [t((pages * PAGE, kv_heads, 8), torch.bfloat16) for _ in range(2)]
            self.v = [t((pages * PAGE, kv_heads, 8), torch.bfloat16) for _ in range(2)]
        self.conv = [t((slots, sum(PARTS), 3), torch.bfloat16) for _ in range(2)]
        self.ssm = [t((slots, SSM_HEADS, 4, 8), torch.float32) for _ in range(2)]
        self.swa_k = [t((swa_pages * PAGE, kv_heads, 8), torch.bfloat16)]
        self.swa_v = [t((swa_pages * PAGE, kv_heads, 8), torch.bfloat16)]
        self.out_ids = t((rows, 16), torch.int32)
        self.logprobs = t((rows, 16), torch.float32)


def heads_of(total: int, tp: int, rank: int) -> slice:
    """The reference split of ``total`` heads: an even split, or one head replicated over ``tp // total``."""
    if total >= tp:
        n = total // tp
        return slice(rank * n, (rank + 1) * n)
    h = rank // (tp // total)
    return slice(h, h + 1)


def conv_of(x: Any, tp: int, rank: int) -> Any:
    """Each conv sub-projection split on its own, the rank's parts concatenated (channel axis 1)."""
    out, start = [], 0
    for p in PARTS:
        n = p // tp
        out.append(x[:, start + rank * n: start + (rank + 1) * n])
        start += p
    return torch.cat(out, dim=1).contiguous()


def naive_conv(tp_p: int) -> Any:
    """The classic mistake, as the negative control's conv shard: treat the prefill ranks' conv states as one
    contiguous axis (concatenated in rank order) and cut decode rank ``rank``'s block out of it."""
    def of(x: Any, tp: int, rank: int) -> Any:
        joined = torch.cat([conv_of(x, tp_p, p) for p in range(tp_p)], dim=1)
        n = sum(PARTS) // tp
        return joined[:, rank * n: (rank + 1) * n].contiguous()

    return of


class Rank:
    """One rank's pools: the reference shard of ``whole`` (or zeros of the same shapes)."""

    def __init__(self, whole: Whole, tp: int, rank: int, zero: bool, conv: Any = conv_of) -> None:
        hs = heads_of(whole.kv_heads, tp, rank)

        def cut(x: Any) -> Any:
            return torch.zeros_like(x) if zero else x.clone()

        self.tp, self.rank, self.heads = tp, rank, hs.stop - hs.start
        kv_cut = slice(None) if whole.mla else hs
        self.k = [cut(x[:, kv_cut].contiguous()) for x in whole.k]
        self.v = [cut(x[:, kv_cut].contiguous()) for x in whole.v]
        self.conv = [cut(conv(x, tp, rank)) for x in whole.conv]
        s = heads_of(SSM_HEADS, tp, rank)
        self.ssm = [cut(x[:, s].contiguous()) for x in whole.ssm]
        self.swa_k = [cut(x[:, hs].contiguous()) for x in whole.swa_k]
        self.swa_v = [cut(x[:, hs].contiguous()) for x in whole.swa_v]
        self.out_ids, self.logprobs = cut(whole.out_ids), cut(whole.logprobs)

    def kv_args(self, total_heads: int, metadata: bool = True) -> Any:
        from sglang.srt.disaggregation.base.conn import KVArgs

        a = KVArgs()
        kv = self.k + self.v
        a.engine_rank, a.system_dp_rank, a.gpu_id, a.page_size = self.rank, 0, 0, PAGE
        a.kv_data_ptrs = [x.data_ptr() for x in kv]
        a.kv_data_lens = [x.nbytes for x in kv]
        a.kv_item_lens = [x[0].nbytes * PAGE for x in kv]
        a.kv_layer_ids = [0, 2, 0, 2][: len(kv)]
        a.kv_head_num, a.total_kv_head_num = self.heads, total_heads
        a.kv_cache_dtype_str = "bfloat16"
        mamba, swa = self.conv + self.ssm, self.swa_k + self.swa_v
        a.state_types = ["mamba", "swa"]
        a.state_data_ptrs = [[x.data_ptr() for x in mamba], [x.data_ptr() for x in swa]]
        a.state_data_lens = [[x.nbytes for x in mamba], [x.nbytes for x in swa]]
        a.state_item_lens = [[x[0].nbytes for x in mamba], [x[0].nbytes * PAGE for x in swa]]
        a.state_layer_ids = [[1, 3, 1, 3], [4, 4]]
        if metadata:  # what SGLang's MambaPool reports (get_state_dim_per_tensor and friends)
            a.state_dim_per_tensor = [[x.shape[1] for x in mamba], []]
            a.state_slice_outer_counts = [[1] * len(mamba), []]
            a.state_conv_shard_groups = [[list(PARTS)] * len(self.conv) + [None] * len(self.ssm), []]
        a.swa_kv_cache_layout = "nhd"
        aux = [self.out_ids, self.logprobs]
        a.aux_data_ptrs = [x.data_ptr() for x in aux]
        a.aux_data_lens = [x.nbytes for x in aux]
        a.aux_item_lens = [x[0].nbytes for x in aux]
        return a


def same(got: Rank, want: Rank, pages: tuple[list[int], list[int]], swa: tuple[list[int], list[int]],
         slot: tuple[int, int], row: tuple[int, int]) -> bool:
    """``got``'s destination pages/slot/row hold ``want``'s source ones, every byte."""
    def rows(x: Any, idx: list[int]) -> Any:
        return torch.cat([x[i * PAGE:(i + 1) * PAGE] for i in idx])

    ok = all(torch.equal(rows(g, pages[1]), rows(w, pages[0])) for g, w in zip(got.k + got.v, want.k + want.v))
    ok &= all(torch.equal(rows(g, swa[1]), rows(w, swa[0]))
              for g, w in zip(got.swa_k + got.swa_v, want.swa_k + want.swa_v))
    ok &= all(torch.equal(g[slot[1]], w[slot[0]]) for g, w in zip(got.conv + got.ssm, want.conv + want.ssm))
    ok &= torch.equal(got.out_ids[row[1]], want.out_ids[row[0]])
    return bool(ok and torch.equal(got.logprobs[row[1]], want.logprobs[row[0]]))


class Cluster:
    """A bootstrap server, ``tp_p`` prefill managers and ``tp_d`` decode managers (one per rank)."""

    def __init__(self, backend: Any, whole: Whole, tp_p: int, tp_d: int, metadata: bool = True) -> None:
        self.backend = backend
        self.boot = backend.KvwireKVBootstrapServer("127.0.0.1", 0)
        port = self.boot.address[1]
        self.addr = f"127.0.0.1:{port}"

        def sa(tp: int) -> Any:
            return types.SimpleNamespace(host="127.0.0.1", disaggregation_bootstrap_port=port, dist_init_addr=None,
                                         tp_size=tp, dp_size=1, enable_dp_attention=False)

        self.src = [Rank(whole, tp_p, p, zero=False) for p in range(tp_p)]
        self.dst = [Rank(whole, tp_d, d, zero=True) for d in range(tp_d)]
        self.prefill = [backend.KvwireKVManager(r.kv_args(whole.kv_heads), SGL.DisaggregationMode.PREFILL, sa(tp_p),
                                                is_mla_backend=whole.mla) for r in self.src]
        self.decode = [backend.KvwireKVManager(r.kv_args(whole.kv_heads, metadata), SGL.DisaggregationMode.DECODE,
                                               sa(tp_d), is_mla_backend=whole.mla) for r in self.dst]
        deadline = time.monotonic() + 10
        while not all(m.try_ensure_parallel_info(self.addr) for m in self.decode) and time.monotonic() < deadline:
            time.sleep(0.02)

    def close(self) -> None:
        for m in self.prefill + self.decode:
            m.close()
        self.boot.close()


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> Any:
    from kvwire.adapters import sglang as backend

    monkeypatch.setenv("KVWIRE_KEY", "test-key")
    monkeypatch.setenv("KVWIRE_TIMEOUT", os.environ.get("KVWIRE_TEST_TIMEOUT", "4"))
    monkeypatch.setenv("KVWIRE_POOL_BYTES", str(8 << 20))
    monkeypatch.setenv("KVWIRE_DEVICE", "cpu")
    return backend


SRC_PAGES, DST_PAGES = [5, 11, 2, 9], [0, 3, 14, 7]
SRC_SWA, DST_SWA = [4, 6], [1, 5]
SRC_SLOT, DST_SLOT, SRC_ROW, DST_ROW = 2, 3, 1, 4


def run_request(c: Cluster, room: int, abort_prefill: int | None = None) -> tuple[list[Any], list[Any]]:
    """SGLang's call order on every rank of both sides; returns (senders, receivers) once all ended."""
    from sglang.srt.disaggregation.base.conn import KVPoll

    b = c.backend
    rxs = [b.KvwireKVReceiver(m, c.addr, room) for m in c.decode]
    for rx in rxs:
        rx.init(0)
        rx.send_metadata(np.array(DST_PAGES, np.int32), DST_ROW,
                         [np.array([DST_SLOT], np.int32), np.array(DST_SWA, np.int32)])
        assert rx.poll() == KVPoll.Transferring, rx.error
    txs = [b.KvwireKVSender(m, c.addr, room) for m in c.prefill]
    for p, tx in enumerate(txs):
        assert poll_until(tx, {KVPoll.WaitingForInput, KVPoll.Failed}) == KVPoll.WaitingForInput, tx.error
        if p == abort_prefill:
            tx.abort()
            continue
        tx.init(len(SRC_PAGES), SRC_ROW)
        tx.send(np.array(SRC_PAGES[:2], np.int32))  # chunked prefill: the state comes with the last chunk
        tx.send(np.array(SRC_PAGES[2:], np.int32), [np.array([SRC_SLOT], np.int32), np.array(SRC_SWA, np.int32)])
    for x in txs + rxs:
        poll_until(x, {KVPoll.Success, KVPoll.Failed})
    return txs, rxs


@pytest.mark.parametrize("tp_p,tp_d,kv_heads,mla", [(2, 1, 4, False), (1, 2, 4, False), (4, 2, 4, False),
                                                    (2, 4, 4, False), (4, 2, 2, False), (1, 4, 2, False),
                                                    (2, 4, 1, False), (2, 1, 4, True), (2, 4, 4, True)])
def test_resharded_request_bit_exact(env: Any, tp_p: int, tp_d: int, kv_heads: int, mla: bool) -> None:
    """Prefill TP != decode TP: every decode rank ends Success holding exactly the reference shard of the
    whole cache, received only from the prefill ranks SGLang pairs it with, and no more bytes than it needs.
    (2, 4, 1): one KV head replicated on both sides; ``mla``: the latent (replicated) instead of K/V."""
    from sglang.srt.disaggregation.base.conn import KVPoll

    whole = Whole(kv_heads, mla=mla)
    c = Cluster(env, whole, tp_p, tp_d)
    try:
        txs, rxs = run_request(c, 1000 + tp_p * 10 + tp_d)
        assert [tx.poll() for tx in txs] == [KVPoll.Success] * tp_p, [tx.error for tx in txs]
        assert [rx.poll() for rx in rxs] == [KVPoll.Success] * tp_d, [rx.error for rx in rxs]
        idx = ((SRC_PAGES, DST_PAGES), (SRC_SWA, DST_SWA), (SRC_SLOT, DST_SLOT), (SRC_ROW, DST_ROW))
        for d, rx in enumerate(rxs):
            want = Rank(whole, tp_d, d, zero=False)  # the reference shard, at the source's indices
            assert same(c.dst[d], want, *idx), f"decode rank {d} differs from the reference shard"
            # negative controls: another rank's shard, or the conv sliced as one contiguous block, differ
            if tp_d > 1:
                assert not same(c.dst[d], Rank(whole, tp_d, (d + 1) % tp_d, zero=False), *idx)
            if max(tp_p, tp_d) > 1:
                assert not same(c.dst[d], Rank(whole, tp_d, d, zero=False, conv=naive_conv(tp_p)), *idx)
            assert not c.dst[d].k[0][PAGE:2 * PAGE].any()  # a page nobody named stays untouched
            # SGLang's pairing, and only the slices this rank needs on its wire
            plan = rx.plan
            assert plan is not None and (plan.prefill_tp, plan.decode_tp) == (tp_p, tp_d)
            want_paired = (list(range(d * tp_p // tp_d, (d + 1) * tp_p // tp_d)) if tp_p >= tp_d
                           else [d // (tp_d // tp_p)])
            assert rx.prefill_ranks == want_paired and set(plan.sources(d)) <= set(want_paired)
            got = rx.receiving.handle.bytes_received()
            assert set(got) == set(plan.sources(d))
            assert sum(got.values()) == plan.needed_bytes(d, rx.receiving.request)
        sent = sum(tx.get_transfer_metric().transfer_total_bytes or 0 for tx in txs)
        assert sent == sum(plan.needed_bytes(d, rx.receiving.request) for d, rx in enumerate(rxs))
        for x in txs + rxs:
            x.clear()
        assert all(m.inbox.active == 0 and m.inbox.unstager.pool.in_use_bytes == 0 for m in c.decode)
        assert all(m.outbox.active == 0 and m.outbox.stager.pool.in_use_bytes == 0 for m in c.prefill)
    finally:
        c.close()


def test_one_prefill_rank_failing_fails_decode_naming_it(env: Any) -> None:
    """4 -> 2: prefill rank 3 aborts before sending; decode rank 1 (fed by ranks 2 and 3) fails at once with a
    reason naming prefill rank 3 (its other source, if still sending, is cancelled); decode rank 0 (fed by
    ranks 0, 1) succeeds."""
    from sglang.srt.disaggregation.base.conn import KVPoll

    whole = Whole(4)
    c = Cluster(env, whole, 4, 2)
    try:
        t0 = time.monotonic()
        txs, rxs = run_request(c, 55, abort_prefill=3)
        assert time.monotonic() - t0 < 3.5  # told, not timed out (KVWIRE_TIMEOUT is 4 s)
        assert rxs[1].poll() == KVPoll.Failed
        with pytest.raises(env.KvwireTransferError, match=r"prefill rank 3 .*aborted by prefill"):
            rxs[1].failure_exception()
        states = [tx.poll() for tx in txs]
        assert states[:2] == [KVPoll.Success] * 2 and states[3] == KVPoll.Failed
        assert states[2] in (KVPoll.Success, KVPoll.Failed)  # its slices may have been verified before
        assert rxs[0].poll() == KVPoll.Success
        assert same(c.dst[0], Rank(whole, 2, 0, zero=False), (SRC_PAGES, DST_PAGES), (SRC_SWA, DST_SWA),
                    (SRC_SLOT, DST_SLOT), (SRC_ROW, DST_ROW))
        for x in txs + rxs:
            x.clear()
        assert all(m.inbox.active == 0 and m.inbox.unstager.pool.in_use_bytes == 0 for m in c.decode)
    finally:
        c.close()


def test_no_slicing_metadata_refused_at_tp_mismatch(env: Any) -> None:
    """A decode rank whose KVArgs lack SGLang's state slicing metadata cannot be re-sharded into: a typed
    failure naming the buffers, and both prefill ranks it is paired with are told (they fail at once, not at
    their timeout). At equal TP such buffers travel whole."""
    from sglang.srt.disaggregation.base.conn import KVPoll

    c = Cluster(env, Whole(4), 2, 1, metadata=False)
    try:
        txs = [env.KvwireKVSender(m, c.addr, 9) for m in c.prefill]
        rx = env.KvwireKVReceiver(c.decode[0], c.addr, 9)
        rx.init(0)
        t0 = time.monotonic()
        rx.send_metadata(np.array(DST_PAGES, np.int32), DST_ROW,
                         [np.array([DST_SLOT], np.int32), np.array(DST_SWA, np.int32)])
        assert rx.poll() == KVPoll.Failed
        with pytest.raises(env.KvwireTransferError, match=r"mamba2\.mamba0.*no TP slicing metadata"):
            rx.failure_exception()
        for tx in txs:
            assert poll_until(tx, {KVPoll.Success, KVPoll.Failed}) == KVPoll.Failed
            with pytest.raises(env.KvwireTransferError, match="decode aborted: decode rank 0 failed"):
                tx.failure_exception()
        assert time.monotonic() - t0 < 3  # KVWIRE_TIMEOUT is 4 s
    finally:
        c.close()
