"""kvwire.adapters.transformers in one process over loopback: streaming while prefill runs, zero copies on both
sides, typed errors for bad input, and every failed or cancelled transfer reported through the adapter with its
buffers released. The two-process, bit-exact decode proof is tests/test_adapter_hf_twoproc.py."""

from __future__ import annotations

import gc
import math
import subprocess
import sys
import time
import weakref
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from helpers import wait_until  # noqa: E402
from hf_tiny import prompt, tiny_model  # noqa: E402

from kvwire.adapters import StatePolicy  # noqa: E402
from kvwire.adapters.transformers import (  # noqa: E402
    IncomingCache,
    cache_kwargs,
    expect_cache,
    hf_layout,
    send_prefill,
)
from kvwire.codec.hf import layout_from_hf_config  # noqa: E402
from kvwire.errors import (  # noqa: E402
    LayoutError,
    LayoutMismatch,
    TransferCancelled,
    TransferFailed,
    TransferTimedOut,
)


@pytest.fixture(scope="module")
def jamba() -> Any:
    torch.set_num_threads(1)
    return tiny_model("jamba")


def _addr(buf: Any) -> int:
    if isinstance(buf, memoryview):
        import numpy as np

        return int(np.frombuffer(buf, np.uint8).ctypes.data)
    return int(buf.data_ptr())


def _greedy(model: Any, cache: Any, first: Any, steps: int = 8) -> list[int]:
    tok, out = first, []
    with torch.no_grad():
        for _ in range(steps):
            tok = model(tok, use_cache=True, **cache_kwargs(model, cache)).logits[:, -1].argmax(-1, keepdim=True)
            out.append(int(tok))
    return out


def _released(refs: list[weakref.ref[Any]], within: float = 2.0) -> bool:
    """Every buffer freed, soon: done callbacks run on the receiver's callback pool, and the thread that
    resolved the handle may hold it for a moment after a waiter wakes."""
    end = time.monotonic() + within
    while True:
        gc.collect()
        if all(r() is None for r in refs):
            return True
        if time.monotonic() > end:
            return False
        time.sleep(0.01)


def test_import_is_lazy() -> None:
    code = ("import sys, kvwire, kvwire.adapters, kvwire.adapters.transformers\n"
            "bad = [m for m in ('torch', 'transformers') if m in sys.modules]\n"
            "assert not bad, bad\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_streams_while_prefill_runs_zero_copy(jamba: Any, link: Any) -> None:
    """The last decoder layer may not start before the receiver verified layer 0: only a per-layer stream
    passes. The sender's views are the cache's tensors; the decode cache's tensors are the receive buffers."""
    rx, session = link
    ids = prompt()
    incoming = expect_cache(rx, jamba, "r1", ids.shape[1])
    waited = []
    last = jamba.base_model.layers[-1]
    hook = last.register_forward_pre_hook(lambda m, a: waited.append(incoming.wait_layer(0, timeout=10)))
    try:
        pf = send_prefill(jamba, ids, session, "r1")
    finally:
        hook.remove()
    assert waited == [None] and pf.stream.layers_written == [0, 1, 2, 3] and pf.stream.copies == 0
    pf.result(10)
    cache = incoming.cache(10)
    src = [t for i in range(4) for t in _tensors(pf.cache.layers[i])]
    assert [_addr(v) for v in pf.transfer.views] == [_addr(t) for t in src]
    got = [t for i in range(4) for t in _tensors(cache.layers[i])]
    assert [_addr(t) for t in got] == [_addr(t) for t in incoming.tensors]
    assert all(torch.equal(a, b) for a, b in zip(got, src))
    assert cache.get_seq_length() == ids.shape[1]
    first = pf.logits.argmax(-1, keepdim=True)
    ref_cache = pf.cache
    assert _greedy(jamba, cache, first) == _greedy(jamba, ref_cache, first)


def _tensors(layer: Any) -> list[Any]:
    if getattr(layer, "keys", None) is not None and layer.keys.numel():
        return [layer.keys, layer.values]
    return [layer.conv_states[0], layer.recurrent_states[0]]


def test_generate_on_received_cache_n_minus_1(jamba: Any, link: Any) -> None:
    rx, session = link
    ids = prompt()
    layout = hf_layout(jamba.config, dtype=torch.float32)  # the decode side may hold only the config
    incoming = expect_cache(rx, jamba.config, "g", ids.shape[1], policy="N-1", layout=layout)
    assert incoming.feed == slice(11, 12)
    pf = send_prefill(jamba, ids, session, "g", policy=StatePolicy.N_MINUS_1)
    pf.result(10)
    out = jamba.generate(ids, max_new_tokens=6, do_sample=False, **cache_kwargs(jamba, incoming.cache(10)))
    ref = jamba.generate(ids, max_new_tokens=6, do_sample=False, **cache_kwargs(jamba, pf.cache))  # the same split
    assert out.tolist() == ref.tolist()


def test_bad_input_is_a_typed_error(jamba: Any, link: Any) -> None:
    rx, session = link
    with pytest.raises(LayoutError, match=r"\(1, N\)"):
        send_prefill(jamba, prompt().repeat(2, 1), session, "b2")
    with pytest.raises(LayoutError, match="at least 2"):
        expect_cache(rx, jamba, "short", 1, policy="N-1")
    with pytest.raises(LayoutError, match="state policy"):
        expect_cache(rx, jamba, "pol", 12, policy="N+1")
    with pytest.raises(LayoutError, match="PretrainedConfig"):
        expect_cache(rx, object(), "not-a-model", 12)
    vllm_layout = layout_from_hf_config(jamba.config, model_dtype="float32")  # SD conv, NHD K/V
    with pytest.raises(LayoutMismatch, match="conv:SD"):
        expect_cache(rx, jamba, "tags", 12, layout=vllm_layout)
    with pytest.raises(LayoutMismatch, match="decoder layers"):
        send_prefill(tiny_model("llama"), prompt(), session, "wrong-model", layout=hf_layout(jamba))
    assert wait_until(lambda: session.stats()["transfers_in_flight"] == 0)  # nothing left open


@pytest.mark.parametrize(("bad", "err"), [("x", TypeError), (math.nan, ValueError), (math.inf, ValueError)])
def test_a_bad_wait_timeout_is_refused_at_the_call_live_or_released(jamba: Any, link: Any, bad: Any,
                                                                    err: type[Exception]) -> None:
    """``IncomingCache.wait_layer``/``cache`` check ``timeout`` first: before, once the request had ended (its
    tensors released) a bad timeout was answered with the transfer's error instead."""
    rx, _ = link
    incoming = expect_cache(rx, jamba, f"tmo-{bad}", 12)
    for ended in (False, True):
        with pytest.raises(err, match="timeout must be"):
            incoming.wait_layer(0, bad)
        with pytest.raises(err, match="timeout must be"):
            incoming.cache(bad)
        if not ended:  # negative control: <= 0 is still no wait, then the request ends
            with pytest.raises(TimeoutError):
                incoming.cache(0)
            incoming.cancel()
            with pytest.raises(TransferCancelled):
                incoming.cache(1)


def test_sender_receiver_disagreement_fails_both_sides(jamba: Any, link: Any) -> None:
    """A bf16 decode model for an fp32 prefill, and N-1 against N: refused before a byte lands."""
    rx, session = link
    ids = prompt()
    bf16 = expect_cache(rx, jamba, "dt", 12, layout=hf_layout(jamba, dtype=torch.bfloat16))
    pf = send_prefill(jamba, ids, session, "dt")
    with pytest.raises(TransferFailed, match="dtype"):
        bf16.cache(10)
    with pytest.raises(TransferFailed):
        pf.result(10)
    n = expect_cache(rx, jamba, "pos", 12, policy="N")
    pf = send_prefill(jamba, ids, session, "pos", policy="N-1")
    with pytest.raises(TransferFailed, match="StatePositionMismatch"):
        n.cache(10)
    with pytest.raises(TransferFailed):
        pf.result(10)


def _watch(incoming: IncomingCache) -> list[weakref.ref[Any]]:
    return [weakref.ref(t) for t in incoming.tensors]


def test_decode_cancels_mid_stream(jamba: Any, link: Any) -> None:
    rx, session = link
    incoming = expect_cache(rx, jamba, "c1", 12)
    refs = _watch(incoming)
    hook = jamba.base_model.layers[2].register_forward_pre_hook(lambda m, a: incoming.cancel("decode gave up"))
    try:
        pf = send_prefill(jamba, prompt(), session, "c1")  # prefill itself completes
    finally:
        hook.remove()
    with pytest.raises(TransferCancelled, match="decode gave up"):
        incoming.cache(10)
    with pytest.raises(TransferCancelled):
        pf.result(10)
    assert incoming.finished and incoming.tensors == []
    with pytest.raises(TransferCancelled):
        incoming.wait_layer(3, timeout=1)
    assert _released(refs)


def test_decode_cancels_before_the_sender_starts(jamba: Any, link: Any) -> None:
    """The request is withdrawn: its buffers are released at once and a late sender is refused as cancelled
    (the receiver remembers the cancel until the expectation's deadline)."""
    rx, session = link
    incoming = expect_cache(rx, jamba, "c0", 12)
    refs = _watch(incoming)
    incoming.cancel()
    with pytest.raises(TransferCancelled):
        incoming.cache(1)
    del incoming
    assert _released(refs)
    pf = send_prefill(jamba, prompt(), session, "c0")
    with pytest.raises(TransferCancelled, match="cancelled by receiver: cancelled by the decode side"):
        pf.result(10)


def test_prefill_error_mid_forward(jamba: Any, link: Any) -> None:
    rx, session = link
    incoming = expect_cache(rx, jamba, "e1", 12)
    refs = _watch(incoming)

    def boom(m: Any, a: Any) -> None:
        raise RuntimeError("device lost")

    hook = jamba.base_model.layers[2].register_forward_pre_hook(boom)
    try:
        with pytest.raises(RuntimeError, match="device lost"):
            send_prefill(jamba, prompt(), session, "e1")
    finally:
        hook.remove()
    with pytest.raises(TransferCancelled, match="prefill failed: RuntimeError: device lost"):
        incoming.cache(10)
    assert _released(refs)


def test_prefill_peer_vanishes(jamba: Any, link: Any) -> None:
    rx, session = link
    incoming = expect_cache(rx, jamba, "v1", 12)
    refs = _watch(incoming)
    hook = jamba.base_model.layers[2].register_forward_pre_hook(lambda m, a: session.close())
    try:
        pf = send_prefill(jamba, prompt(), session, "v1")
    finally:
        hook.remove()
    start = time.monotonic()
    with pytest.raises((TransferFailed, TransferCancelled)):
        incoming.cache(15)
    assert time.monotonic() - start < 10
    with pytest.raises((TransferFailed, TransferCancelled)):
        pf.result(5)
    assert _released(refs)


def test_sender_never_comes(jamba: Any, link: Any) -> None:
    rx, _ = link
    incoming = expect_cache(rx, jamba, "t1", 12, timeout=0.3)
    refs = _watch(incoming)
    start = time.monotonic()
    with pytest.raises(TransferTimedOut):
        incoming.cache(10)
    assert time.monotonic() - start < 5
    assert _released(refs)
