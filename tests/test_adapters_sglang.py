"""SGLang backend: contract tests against SGLang's real base classes, and its SGLang-free parts.

The SGLang tests drive ``KvwireKVSender``/``KvwireKVReceiver`` through SGLang 0.5.23's call order (decode
``init`` -> ``send_metadata``; prefill ``poll`` until ``WaitingForInput`` -> ``init`` -> ``send`` per chunk,
state indices with the last) with CPU torch tensors shaped like SGLang's pools (one K and one V buffer per
attention layer, Mamba conv and temporal state per layer, an SWA pool, the metadata/aux rows), over real
loopback kvwire sessions and a real bootstrap mailbox. They skip where SGLang is not importable: run them
with ``scripts/test-sglang`` (a venv with SGLang added without its dependency tree).

What cannot run here: SGLang serving itself (it needs a GPU); so the scheduler loop that calls these classes
is reproduced by the tests, not run.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import types
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from kvwire.adapters.sglang_bootstrap import MAX_BODY, Mailbox, MailboxClient, MailboxServer  # noqa: E402
from kvwire.adapters.sglang_pools import SglangPools  # noqa: E402
from kvwire.errors import LayoutError, LayoutMismatch  # noqa: E402

PAGE = 4
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _import_sglang() -> Any:
    """SGLang's disaggregation modules, or None. SGLang imports torchvision; the only torchvision on the
    package index is a CUDA build, whose C++ ops do not load against a CPU torch, and its import then fails
    registering a fake kernel for an op that library would have defined. Defining those two op schemas (no
    kernels) lets its Python part import; nothing here calls them."""
    import importlib.util

    if importlib.util.find_spec("sglang") is None:
        return None
    try:
        import torchvision  # noqa: F401
    except RuntimeError as e:
        if "torchvision::nms" not in str(e):
            return None
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
        lib = torch.library.Library("torchvision", "DEF")
        lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        _import_sglang.lib = lib  # type: ignore[attr-defined]  # kept alive
    except ImportError:
        pass
    try:
        from sglang.srt.disaggregation import utils
    except Exception:  # noqa: BLE001
        return None
    return utils


# ------------------------------------------------------------------ SGLang-shaped pools (CPU)


class Pools:
    """What an SGLang rank allocates: per attention layer a K and a V buffer ``(tokens, heads, dim)``
    (MHATokenToKVPool), per Mamba layer a conv ``(slots, conv_dim, K-1)`` and a temporal ``(slots, H, P, N)``
    state (MambaPool), an SWA pool's K/V, and the metadata buffers (one row per request)."""

    def __init__(self, seed: int | None, pages: int = 24, slots: int = 6, swa_pages: int = 12, rows: int = 8):
        g = torch.Generator().manual_seed(seed or 0)

        def t(shape: tuple[int, ...], dtype: Any) -> Any:
            if seed is None:
                return torch.zeros(shape, dtype=dtype)
            if dtype == torch.int32:
                return torch.randint(0, 1 << 20, shape, generator=g, dtype=dtype)
            return torch.randn(shape, generator=g).to(dtype)

        self.k = [t((pages * PAGE, 2, 8), torch.bfloat16) for _ in range(2)]
        self.v = [t((pages * PAGE, 2, 8), torch.bfloat16) for _ in range(2)]
        self.conv = [t((slots, 24, 3), torch.bfloat16) for _ in range(2)]
        self.ssm = [t((slots, 2, 4, 8), torch.float32) for _ in range(2)]
        self.swa_k = [t((swa_pages * PAGE, 2, 8), torch.bfloat16)]
        self.swa_v = [t((swa_pages * PAGE, 2, 8), torch.bfloat16)]
        self.out_ids = t((rows, 16), torch.int32)
        self.logprobs = t((rows, 16), torch.float32)

    def kv_args(self, cls: Any = types.SimpleNamespace, state_types: Any = ("mamba", "swa")) -> Any:
        a = cls()
        kv = self.k + self.v
        a.engine_rank, a.system_dp_rank, a.gpu_id, a.page_size = 0, 0, 0, PAGE
        a.kv_data_ptrs = [x.data_ptr() for x in kv]
        a.kv_data_lens = [x.nbytes for x in kv]
        a.kv_item_lens = [x[0].nbytes * PAGE for x in kv]
        a.kv_layer_ids = [0, 2, 0, 2]
        a.kv_head_num = a.total_kv_head_num = 2
        a.kv_cache_dtype_str = "bfloat16"
        mamba = self.conv + self.ssm
        swa = self.swa_k + self.swa_v
        a.state_types = list(state_types)
        a.state_data_ptrs = [[x.data_ptr() for x in mamba], [x.data_ptr() for x in swa]][: len(state_types)]
        a.state_data_lens = [[x.nbytes for x in mamba], [x.nbytes for x in swa]][: len(state_types)]
        a.state_item_lens = [[x[0].nbytes for x in mamba], [x[0].nbytes * PAGE for x in swa]][: len(state_types)]
        aux = [self.out_ids, self.logprobs]
        a.aux_data_ptrs = [x.data_ptr() for x in aux]
        a.aux_data_lens = [x.nbytes for x in aux]
        a.aux_item_lens = [x[0].nbytes for x in aux]
        return a


def pages_equal(src: Pools, dst: Pools, src_pages: list[int], dst_pages: list[int]) -> bool:
    for s, d in zip(src.k + src.v, dst.k + dst.v):
        for a, b in zip(src_pages, dst_pages):
            if not torch.equal(s[a * PAGE:(a + 1) * PAGE], d[b * PAGE:(b + 1) * PAGE]):
                return False
    return True


def swa_equal(src: Pools, dst: Pools, src_pages: list[int], dst_pages: list[int]) -> bool:
    return all(torch.equal(s[a * PAGE:(a + 1) * PAGE], d[b * PAGE:(b + 1) * PAGE])
               for s, d in zip(src.swa_k + src.swa_v, dst.swa_k + dst.swa_v) for a, b in zip(src_pages, dst_pages))


def slots_equal(src: Pools, dst: Pools, a: int, b: int) -> bool:
    return all(torch.equal(s[a], d[b]) for s, d in zip(src.conv + src.ssm, dst.conv + dst.ssm))


# ------------------------------------------------------------------ no SGLang needed


def test_pools_layout_and_tables() -> None:
    src = Pools(1)
    p = SglangPools(src.kv_args())
    fams = p.families
    assert fams["kv"].layers == (0, 1, 2, 3) and fams["mamba"].layers == (4, 5, 6, 7)
    assert fams["swa"].layers == (8, 9) and fams["aux"].layers == (10, 11)
    assert p.layout.layers[0].caches[0].tensors[0].nbytes == src.k[0][0].nbytes  # per token
    assert p.layout.layers[0].caches[0].tensors[0].shape == (2, 16)  # heads x bytes per head
    req = p.request("r", 5, p.state_counts([[3], [7, 8]]))
    assert (req.num_tokens, req.state_position, dict(req.prefix_hit)) == (5 * PAGE, 5 * PAGE, {"swa": 3 * PAGE})
    tables, slots = p.tables([9, 1, 4, 2, 0], [[3], [7, 8]], 6)
    assert tables[0] == [9, 1, 4, 2, 0] and tables[8][-2:] == [7, 8] and len(tables[8]) == 5
    assert slots[4] == 3 and slots[11] == 6
    # the aux rows (8) and the Mamba slots (6) are pools of their own sizes: row 7 fits the aux pool only
    from kvwire.cuda import Unstager
    un = Unstager(p.cache)
    un.prepare(req, tables, {**slots, **{la: 7 for la in fams["aux"].layers}}).release()
    with pytest.raises(LayoutMismatch, match="state slot 7"):
        un.prepare(req, tables, {**slots, **{la: 7 for la in fams["mamba"].layers}})
    un.close()
    with pytest.raises(LayoutMismatch, match="2 slots"):
        p.tables([1], [[3, 4], [1]], 0)
    with pytest.raises(LayoutError, match="dsa"):
        SglangPools(src.kv_args(state_types=("mamba", "dsa")))


def test_mailbox_bounds_and_expiry() -> None:
    box = Mailbox(ttl=0.05, max_queued=2)
    assert box.post(0, 0, {"a": 1}) and box.post(0, 1, {"b": 1}) and not box.post(0, 0, {"c": 1})
    assert box.take(0, 0) == [{"a": 1}] and box.take(0, 0) == []
    time.sleep(0.1)
    assert box.post(0, 0, {"d": 1}) and box.take(0, 1) == []  # the old one expired
    srv = MailboxServer("127.0.0.1", 0, b"k")
    try:
        c = MailboxClient(*srv.address, b"k", timeout=5)
        c.post(0, 3, {"room": 1})
        assert c.take(0, 3) == [{"room": 1}] and c.take(0, 3) == []
        import threading
        threading.Timer(0.2, c.post, (0, 3, {"room": 2})).start()
        t0 = time.monotonic()
        assert c.take(0, 3, wait=2) == [{"room": 2}]  # a long poll answers when the mail comes
        assert 0.1 < time.monotonic() - t0 < 1.9
        t0 = time.monotonic()
        assert c.take(0, 3, wait=0.3) == [] and time.monotonic() - t0 >= 0.25
        with pytest.raises(OSError):
            c.info()  # not registered yet: 404
        c.put_info({"dp_size": 1})
        assert c.info() == {"dp_size": 1}
        with pytest.raises(OSError, match="exceeds"):
            c.post(0, 0, {"x": "y" * MAX_BODY})
        import http.client
        conn = http.client.HTTPConnection(*srv.address, timeout=5)  # a claimed size, unauthenticated: refused
        conn.putrequest("PUT", "/kvwire/v1/post?dp=0&rank=0")
        conn.putheader("Content-Length", str(MAX_BODY + 1))
        conn.endheaders()
        assert conn.getresponse().status == 401
        conn.close()
    finally:
        srv.close()


# ------------------------------------------------------------------ against SGLang's real classes

SGL = _import_sglang()
needs_sglang = pytest.mark.skipif(SGL is None, reason="SGLang is not importable here (scripts/test-sglang runs these)")


@pytest.fixture
def pd(monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> Any:
    """A bootstrap server, a prefill and a decode manager over SGLang-shaped pools, in one process, on
    ``127.0.0.1`` (or the host given as the fixture's parameter)."""
    from sglang.srt.disaggregation.base.conn import KVArgs

    from kvwire.adapters import sglang as backend

    monkeypatch.setenv("KVWIRE_KEY", "test-key")
    monkeypatch.setenv("KVWIRE_TIMEOUT", os.environ.get("KVWIRE_TEST_TIMEOUT", "3"))
    monkeypatch.setenv("KVWIRE_POOL_BYTES", str(64 << 20))
    monkeypatch.setenv("KVWIRE_DEVICE", "cpu")
    host = getattr(request, "param", "127.0.0.1")
    boot = backend.KvwireKVBootstrapServer(host, 0)
    port = boot.address[1]
    sa = types.SimpleNamespace(host=host, disaggregation_bootstrap_port=port, dist_init_addr=None,
                               tp_size=1, dp_size=1, enable_dp_attention=False)
    src, dst = Pools(1), Pools(None)
    prefill = backend.KvwireKVManager(src.kv_args(KVArgs), SGL.DisaggregationMode.PREFILL, sa)
    decode = backend.KvwireKVManager(dst.kv_args(KVArgs), SGL.DisaggregationMode.DECODE, sa)
    addr = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    ns = types.SimpleNamespace(backend=backend, boot=boot, addr=addr, src=src, dst=dst,
                               prefill=prefill, decode=decode)
    yield ns
    prefill.close()
    decode.close()
    boot.close()


def poll_until(obj: Any, want: set[int], timeout: float = 20.0) -> int:
    deadline = time.monotonic() + timeout
    while True:
        s = obj.poll()
        if s in want or time.monotonic() > deadline:
            return s
        time.sleep(0.002)


@needs_sglang
def test_real_base_classes() -> None:
    from sglang.srt.disaggregation.base import conn

    from kvwire.adapters import sglang as backend

    for mine, base in [(backend.KvwireKVManager, conn.BaseKVManager), (backend.KvwireKVSender, conn.BaseKVSender),
                       (backend.KvwireKVReceiver, conn.BaseKVReceiver),
                       (backend.KvwireKVBootstrapServer, conn.BaseKVBootstrapServer)]:
        assert issubclass(mine, base) and not mine.__abstractmethods__


@needs_sglang
def test_bootstrap_addr_parsed_as_the_vllm_endpoint_is() -> None:
    """The shared parser (``adapters.endpoints``): SGLang joins a bare IPv6 host with its port, so the last
    colon splits there; brackets come off; a bad port is a ``ValueError`` (what the callers catch)."""
    from kvwire.adapters.sglang_manager import _split_addr

    assert _split_addr("10.0.0.7:8998") == ("10.0.0.7", 8998)
    assert _split_addr("prefill-host:8998") == ("prefill-host", 8998)
    assert _split_addr("[::1]:8998") == ("::1", 8998)
    assert _split_addr("::1:8998") == ("::1", 8998)
    assert _split_addr(":8998") == ("127.0.0.1", 8998)
    for bad in ("prefill-host", "prefill-host:0", "prefill-host:x", "[::1]8998", "[prefill-host]:8998"):
        with pytest.raises(ValueError, match="bootstrap_addr"):
            _split_addr(bad)


@needs_sglang
@pytest.mark.parametrize("pd", ["127.0.0.1", "::1"], indirect=True)
def test_prefill_to_decode_pages_state_swa_aux(pd: Any) -> None:
    """The whole request, over IPv4 and over IPv6 (mailbox, advertised endpoint and kvwire session)."""
    from sglang.srt.disaggregation.base.conn import KVPoll

    b, room = pd.backend, 4242
    assert pd.decode.endpoint[0] == pd.boot.address[0]  # decode advertises where it listens
    src_pages, dst_pages = [5, 17, 2, 9, 11], [0, 3, 20, 7, 1]
    src_swa, dst_swa = [4, 10], [1, 6]
    src_slot, dst_slot, src_row, dst_row = 2, 5, 3, 6

    rx = b.KvwireKVReceiver(pd.decode, pd.addr, room)
    assert rx.poll() == KVPoll.Bootstrapping
    assert pd.decode.try_ensure_parallel_info(pd.addr)  # the prefill rank registered its parallel info
    assert pd.decode.prefill_info_table[pd.addr].dp_size == 1
    rx.init(0)
    assert rx.poll() == KVPoll.WaitingForInput
    tx = b.KvwireKVSender(pd.prefill, pd.addr, room)
    assert tx.poll() == KVPoll.Bootstrapping  # decode has not allocated yet
    rx.send_metadata(np.array(dst_pages, np.int32), dst_row,
                     [np.array([dst_slot], np.int32), np.array(dst_swa, np.int32)])
    assert rx.poll() == KVPoll.Transferring
    assert poll_until(tx, {KVPoll.WaitingForInput, KVPoll.Failed}) == KVPoll.WaitingForInput
    tx.init(len(src_pages), src_row)
    assert tx.should_send_kv_chunk(0, True) and not tx.should_send_kv_chunk(0, False)
    tx.send(np.array(src_pages[:3], np.int32))  # a chunk of chunked prefill
    assert tx.poll() == KVPoll.WaitingForInput
    tx.send(np.array(src_pages[3:], np.int32), [np.array([src_slot], np.int32), np.array(src_swa, np.int32)])
    assert poll_until(tx, {KVPoll.Success, KVPoll.Failed}) == KVPoll.Success
    assert poll_until(rx, {KVPoll.Success, KVPoll.Failed}) == KVPoll.Success

    src, dst = pd.src, pd.dst
    assert pages_equal(src, dst, src_pages, dst_pages)
    assert swa_equal(src, dst, src_swa, dst_swa)
    assert slots_equal(src, dst, src_slot, dst_slot)
    assert torch.equal(dst.out_ids[dst_row], src.out_ids[src_row])
    assert torch.equal(dst.logprobs[dst_row], src.logprobs[src_row])
    # negative controls: the comparison fails for any other mapping, and pages nobody named stay zero
    assert not pages_equal(src, dst, src_pages, dst_pages[1:] + dst_pages[:1])
    assert not slots_equal(src, dst, src_slot, 0)
    untouched = [p for p in range(24) if p not in dst_pages]
    assert all(not dst.k[0][p * PAGE:(p + 1) * PAGE].any() for p in untouched)
    assert not dst.out_ids[0].any()
    m = tx.get_transfer_metric()
    assert m.transfer_total_bytes and m.transfer_total_bytes > 0 and m.transfer_latency_s is not None
    tx.clear()
    rx.clear()
    assert pd.prefill.outbox.active == 0 and pd.decode.inbox.active == 0
    assert pd.decode.inbox.unstager.pool.in_use_bytes == 0 and pd.prefill.outbox.stager.pool.in_use_bytes == 0


@needs_sglang
def test_decode_abort_fails_both_and_frees(pd: Any) -> None:
    from sglang.srt.disaggregation.base.conn import KVPoll

    b, room = pd.backend, 77
    rx = b.KvwireKVReceiver(pd.decode, pd.addr, room)
    rx.init(0)
    tx = b.KvwireKVSender(pd.prefill, pd.addr, room)
    rx.send_metadata(np.array([1, 2], np.int32), 0, [np.array([1], np.int32), np.array([3], np.int32)])
    assert poll_until(tx, {KVPoll.WaitingForInput}) == KVPoll.WaitingForInput
    rx.abort()  # the user went away before prefill ran
    t0 = time.monotonic()
    assert poll_until(rx, {KVPoll.Success, KVPoll.Failed}) == KVPoll.Failed
    assert poll_until(tx, {KVPoll.Success, KVPoll.Failed}) == KVPoll.Failed
    assert time.monotonic() - t0 < 10
    with pytest.raises(b.KvwireTransferError, match="aborted by decode") as e:
        tx.failure_exception()
    assert e.value.failure_reason.startswith("decode aborted")
    with pytest.raises(b.KvwireTransferError, match="aborted by decode"):
        rx.failure_exception()
    assert rx.is_abort_release_safe()
    assert pd.decode.inbox.active == 0 and pd.decode.inbox.unstager.pool.in_use_bytes == 0
    assert not pd.dst.k[0][PAGE:3 * PAGE].any()  # nothing was written into the pages it had named


@needs_sglang
def test_nothing_hangs_without_a_peer(pd: Any) -> None:
    """No decode for a prefill request, no prefill transfer for a decode request: both fail at the timeout
    (3 s here), with the reason, and the decode's lease ends."""
    from sglang.srt.disaggregation.base.conn import KVPoll

    b = pd.backend
    tx = b.KvwireKVSender(pd.prefill, pd.addr, 1)
    rx = b.KvwireKVReceiver(pd.decode, pd.addr, 2)
    rx.init(0)
    rx.send_metadata(np.array([4], np.int32), 1, [np.array([0], np.int32), np.array([2], np.int32)])
    t0 = time.monotonic()
    assert poll_until(tx, {KVPoll.Success, KVPoll.Failed}, timeout=30) == KVPoll.Failed
    assert poll_until(rx, {KVPoll.Success, KVPoll.Failed}, timeout=30) == KVPoll.Failed
    assert time.monotonic() - t0 < 25
    with pytest.raises(b.KvwireTransferError, match="no destination"):
        tx.failure_exception()
    with pytest.raises(b.KvwireTransferError, match="never started"):
        rx.failure_exception()
    assert pd.decode.inbox.active == 0 and pd.decode.inbox.unstager.pool.in_use_bytes == 0


@needs_sglang
def test_mismatched_page_count_fails_before_any_byte(pd: Any) -> None:
    from sglang.srt.disaggregation.base.conn import KVPoll

    b, room = pd.backend, 9
    rx = b.KvwireKVReceiver(pd.decode, pd.addr, room)
    rx.init(0)
    tx = b.KvwireKVSender(pd.prefill, pd.addr, room)
    rx.send_metadata(np.array([1, 2, 3], np.int32), 0, [np.array([1], np.int32), np.array([3], np.int32)])
    assert poll_until(tx, {KVPoll.WaitingForInput}) == KVPoll.WaitingForInput
    tx.init(2, 0)
    tx.send(np.array([5, 6], np.int32), [np.array([0], np.int32), np.array([1], np.int32)])
    assert tx.poll() == KVPoll.Failed
    with pytest.raises(b.KvwireTransferError, match="decode allocated 3"):
        tx.failure_exception()
    assert poll_until(rx, {KVPoll.Success, KVPoll.Failed}) == KVPoll.Failed  # told at once, not at its timeout
    with pytest.raises(b.KvwireTransferError, match="decode allocated 3"):
        rx.failure_exception()
    assert not pd.dst.k[0][PAGE:4 * PAGE].any()
    assert pd.decode.inbox.active == 0 and pd.decode.inbox.unstager.pool.in_use_bytes == 0


@needs_sglang
def test_prefill_abort_before_transfer_tells_decode(pd: Any) -> None:
    """Prefill gives up (its request was aborted) after decode posted: decode fails with prefill's reason,
    not later at its own timeout."""
    from sglang.srt.disaggregation.base.conn import KVPoll

    b, room = pd.backend, 31
    rx = b.KvwireKVReceiver(pd.decode, pd.addr, room)
    rx.init(0)
    rx.send_metadata(np.array([2], np.int32), 1, [np.array([2], np.int32), np.array([5], np.int32)])
    tx = b.KvwireKVSender(pd.prefill, pd.addr, room)  # decode's mail arrived first: it waits for the sender
    assert poll_until(tx, {KVPoll.WaitingForInput}) == KVPoll.WaitingForInput
    tx.abort()
    assert tx.poll() == KVPoll.Failed
    assert poll_until(rx, {KVPoll.Success, KVPoll.Failed}) == KVPoll.Failed
    with pytest.raises(b.KvwireTransferError, match="aborted by prefill"):
        rx.failure_exception()
    assert pd.decode.inbox.active == 0 and pd.decode.inbox.unstager.pool.in_use_bytes == 0


@needs_sglang
def test_pipeline_parallel_refused(pd: Any) -> None:
    sa = types.SimpleNamespace(host="127.0.0.1", disaggregation_bootstrap_port=1, pp_size=2)
    with pytest.raises(LayoutError, match="pipeline-parallel"):
        pd.backend.KvwireKVManager(Pools(None).kv_args(), "decode", sa)


@needs_sglang
def test_key_required(pd: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The bootstrap port is on the network: without ``KVWIRE_KEY`` nothing starts (it signs the mailbox)."""
    monkeypatch.delenv("KVWIRE_KEY")
    with pytest.raises(LayoutError, match="KVWIRE_KEY"):
        pd.backend.KvwireKVBootstrapServer("127.0.0.1", 0)
    sa = types.SimpleNamespace(host="127.0.0.1", disaggregation_bootstrap_port=1)
    for mode in ("prefill", "decode"):
        with pytest.raises(LayoutError, match="KVWIRE_KEY"):
            pd.backend.KvwireKVManager(Pools(None).kv_args(), mode, sa)


@needs_sglang
def test_plugin_selects_kvwire_through_sglang_hooks() -> None:
    """``register`` through SGLang's own hook registry (in a fresh process: hooks patch modules for good):
    the backend choice exists, ``TransferBackend("kvwire")`` parses, ``get_kv_class`` returns our classes and
    still SGLang's for the others. Through the installed entry point when this tree is installed."""
    code = f"""
import sys, importlib.metadata as md
sys.path.insert(0, {ROOT!r})
sys.path.insert(0, {os.path.join(ROOT, "tests")!r})
from test_adapters_sglang import _import_sglang
assert _import_sglang() is not None
from sglang.srt.plugins.hook_registry import HookRegistry
eps = [e for e in md.entry_points(group="sglang.srt.plugins") if e.name == "kvwire"]
if eps:
    import os; os.environ["SGLANG_PLUGINS"] = "kvwire"
    from sglang.srt.plugins import load_plugins
    load_plugins()
else:
    from kvwire.adapters.sglang import register
    register(); HookRegistry.apply_hooks()
from sglang.srt.disaggregation import utils
from sglang.srt.arg_groups.choices import DISAGG_TRANSFER_BACKEND_CHOICES
from kvwire.adapters import sglang as b
assert "kvwire" in DISAGG_TRANSFER_BACKEND_CHOICES
tb = utils.TransferBackend("kvwire")
assert utils.get_kv_class(tb, utils.KVClassType.SENDER) is b.KvwireKVSender
assert utils.get_kv_class(tb, utils.KVClassType.RECEIVER) is b.KvwireKVReceiver
assert utils.get_kv_class(tb, utils.KVClassType.MANAGER) is b.KvwireKVManager
assert utils.get_kv_class(tb, utils.KVClassType.BOOTSTRAP_SERVER) is b.KvwireKVBootstrapServer
assert utils.get_kv_class(tb, utils.KVClassType.KVARGS).__name__ == "KVArgs"
assert utils.get_kv_class(utils.TransferBackend("fake"), utils.KVClassType.MANAGER).__name__ == "FakeKVManager"
from sglang.srt.managers import disagg_service
assert not disagg_service.rust_server_serves_kv_bootstrap("kvwire")  # our own bootstrap server starts
print("entry point" if eps else "register()")
"""
    r = subprocess.run([sys.executable, "-W", "ignore", "-c", code], capture_output=True, text=True, timeout=240,
                       cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    print(r.stdout.strip())


@needs_sglang
def test_bootstrap_after_managers_and_chunks_before_init(monkeypatch: pytest.MonkeyPatch) -> None:
    """SGLang may start the bootstrap server after the schedulers built their managers: decode's parallel-info
    query fails until then and succeeds after. Optimistic prefill may send before ``init``."""
    import socket

    from sglang.srt.disaggregation.base.conn import KVArgs, KVPoll

    from kvwire.adapters import sglang as b

    monkeypatch.setenv("KVWIRE_KEY", "k")
    monkeypatch.setenv("KVWIRE_TIMEOUT", "10")
    monkeypatch.setenv("KVWIRE_POOL_BYTES", str(64 << 20))
    monkeypatch.setenv("KVWIRE_DEVICE", "cpu")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    sa = types.SimpleNamespace(host="127.0.0.1", disaggregation_bootstrap_port=port)
    src, dst = Pools(3), Pools(None)
    prefill = b.KvwireKVManager(src.kv_args(KVArgs), "prefill", sa)
    decode = b.KvwireKVManager(dst.kv_args(KVArgs), "decode", sa)
    addr, boot = f"127.0.0.1:{port}", None
    try:
        assert not decode.try_ensure_parallel_info(addr)
        boot = b.KvwireKVBootstrapServer("127.0.0.1", port)
        deadline = time.monotonic() + 10
        while not decode.try_ensure_parallel_info(addr) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert addr in decode.prefill_info_table
        tx = b.KvwireKVSender(prefill, addr, 5)
        tx.send(np.array([8, 9], np.int32), [np.array([4], np.int32), np.array([3], np.int32)])  # before init
        rx = b.KvwireKVReceiver(decode, addr, 5)
        rx.init(0)
        rx.send_metadata(np.array([1, 0], np.int32), 7, [np.array([3], np.int32), np.array([11], np.int32)])
        assert poll_until(tx, {KVPoll.WaitingForInput, KVPoll.Failed}) == KVPoll.WaitingForInput
        tx.init(2, 2)
        assert poll_until(tx, {KVPoll.Success, KVPoll.Failed}) == KVPoll.Success
        assert poll_until(rx, {KVPoll.Success, KVPoll.Failed}) == KVPoll.Success
        assert pages_equal(src, dst, [8, 9], [1, 0]) and slots_equal(src, dst, 4, 3)
        assert swa_equal(src, dst, [3], [11]) and torch.equal(dst.out_ids[7], src.out_ids[2])
    finally:
        prefill.close()
        decode.close()
        if boot is not None:
            boot.close()
