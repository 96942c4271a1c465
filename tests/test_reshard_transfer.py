"""M prefill ranks -> N decode ranks over real loopback sockets (one Receiver per decode rank, one Session per
(prefill, decode) pair): bit-exact against the independent reference, wire bytes per decode rank equal to
what it needs, wait_layer per decode rank, and a failing or silent prefill rank failing the request by name."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
from helpers import wait_until
from reshard_ref import FAMILY_CONFIGS, family_layout, global_payload, shard_reference

from kvwire import Receiver, Session, TransferFailed, TransferTimedOut, connect
from kvwire.codec.layout import RequestSpec, plan_segments
from kvwire.codec.reshard import ReshardPlan, plan_reshard
from kvwire.reshard import ReshardIncoming, ReshardReceiver, ReshardSender

CHUNK = 64 * 1024


@contextlib.contextmanager
def mesh(plan: ReshardPlan, **session: Any) -> Iterator[tuple[list[Receiver], dict[int, dict[int, Session]]]]:
    """A Receiver per decode rank and, per prefill rank, a one-lane Session (``session``: more arguments) to
    each decode rank it feeds."""
    with contextlib.ExitStack() as stack:
        rxs = [stack.enter_context(Receiver(key="k")) for _ in range(plan.decode_tp)]
        sessions = {p: {d: stack.enter_context(connect(*rxs[d].address, key="k", **{"lanes": 1, **session},
                                                       chunk_size=CHUNK))
                        for d in plan.targets(p)} for p in range(plan.prefill_tp)}
        yield rxs, sessions


def transfer(family: str, variant: str, tp_p: int, tp_d: int, request: RequestSpec,
             stats: list[dict[str, int]] | None = None, rank: Callable[[int], Any] = int, **session: Any
             ) -> tuple[ReshardPlan, list[list[np.ndarray]], list[list[np.ndarray]], list[ReshardIncoming],
                        list[dict[int, int]]]:
    config = FAMILY_CONFIGS[family]
    g = family_layout(family, variant, 1)
    payload = global_payload(g, request, seed=7)
    prefill = [shard_reference(g, config, payload, request, tp_p, p) for p in range(tp_p)]
    want = [shard_reference(g, config, payload, request, tp_d, d) for d in range(tp_d)]
    plan = plan_reshard(family_layout(family, variant, tp_p), family_layout(family, variant, tp_d))
    dest = [[np.full(s.nbytes, 0xEE, np.uint8) for s in plan_segments(plan.decode, request)]
            for _ in range(tp_d)]
    with mesh(plan, **session) as (rxs, sessions):
        incoming = [ReshardReceiver(plan, rank(d), rxs[d]).expect(request, dest[d], timeout=30)
                    for d in range(tp_d)]
        outgoing = [ReshardSender(plan, rank(p), sessions[p]).send(request, timeout=30) for p in range(tp_p)]
        own = [plan_segments(family_layout(family, variant, tp_p, p), request) for p in range(tp_p)]
        for layer in range(plan.decode.num_layers):  # layer by layer, as prefill produces them
            for p, out in enumerate(outgoing):
                out.write_layer(layer, [prefill[p][s.index] for s in own[p] if s.layer == layer])
        for out in outgoing:
            out.finish()
        layers = sorted({s.layer for s in plan_segments(plan.decode, request)})
        for h in incoming:
            for layer in layers:
                h.wait_layer(layer, timeout=30)
            h.result(30)
        for out in outgoing:
            out.result(30)
        sent = [out.bytes_sent() for out in outgoing]
        if stats is not None:  # (each decode rank's receiver, before the mesh closes)
            stats.extend(rx.stats() for rx in rxs)
    return plan, dest, want, incoming, sent


CASES = [
    ("mamba2", "vllm", 1, 2),  # GQA + Mamba2, SD conv
    ("mamba2", "ds-hkv", 2, 4),  # groups padded at 4, KV heads replicated at 4
    ("gdn", "ds-hkv", 2, 1),
    ("kda", "hf", 4, 2),  # MLA replicated, KDA conv HF width, HKV state
    ("mamba2-g1", "hf", 8, 2),  # Falcon-H1: attention + Mamba2 in one layer, 1 group, HND KV
    ("swa", "vllm", 4, 2),
    ("lightning", "vllm", 2, 4),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{c[1]}-{c[2]}to{c[3]}")
def test_loopback_reshard_bit_exact_and_no_over_send(case: tuple[str, str, int, int], no_leaks: None) -> None:
    family, variant, tp_p, tp_d = case
    request = RequestSpec(f"rq-{family}-{tp_p}-{tp_d}", 48, 47, {"attn": 8})
    plan, got, want, incoming, sent = transfer(family, variant, tp_p, tp_d, request)
    whole_prefill_rank = sum(s.nbytes for s in plan_segments(plan.prefill, request))
    for d in range(tp_d):
        assert [a.tobytes() for a in got[d]] == [w.tobytes() for w in want[d]], f"decode rank {d}"
        need = plan.needed_bytes(d, request)
        received = incoming[d].bytes_received()
        assert set(received) == set(plan.sources(d))
        assert sum(received.values()) == need  # bytes on the wire = the bytes this rank holds
        assert sum(s.get(d, 0) for s in sent) == need  # ... as the senders counted them too
        # never the whole cache of each contributing rank where it holds more than this rank needs
        assert need <= whole_prefill_rank * len(plan.sources(d))
        if tp_d > tp_p or family in ("kda", "swa"):  # split state, or replicated MLA/KV sent by one rank only
            assert need < whole_prefill_rank * len(plan.sources(d))


def test_reshard_transfers_carry_tail_parity_and_arrive_exact(no_leaks: None,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Each prefill rank's slice of a re-sharded request is a transfer of its own, with its own last layer:
    with tail parity (as ``connect`` sends it by default on a long path) every (prefill, decode) pair's
    transfer takes the parity path (its receiver holds a ``TailRows`` for it; its last chunk is placed or
    rebuilt, whichever comes first) and the bytes arrive exact."""
    pytest.importorskip("zfec")
    from kvwire.tcp._tail import TailRows
    made: list[TailRows] = []
    real_init = TailRows.__init__

    def init(self: TailRows, *args: Any) -> None:
        made.append(self)
        real_init(self, *args)
    monkeypatch.setattr(TailRows, "__init__", init)
    request = RequestSpec("rq-parity", 1024, 1023, {"attn": 8})
    stats: list[dict[str, int]] = []
    plan, got, want, incoming, _ = transfer("gdn", "ds-hkv", 2, 4, request, stats, lanes=4, tail_parity=2)
    assert all([a.tobytes() for a in got[d]] == [w.tobytes() for w in want[d]] for d in range(4))
    pairs = sum(len(plan.targets(p)) for p in range(plan.prefill_tp))
    assert len(made) == pairs and all(r.groups.m == 2 for r in made)
    assert all(s["parity_rejected"] == s["rebuilds_failed"] == 0 for s in stats)


def test_every_required_pair_over_sockets(no_leaks: None) -> None:
    """TP 1->2, 2->1, 2->4, 4->2, 8->2 through real transfers (GQA with kv_heads < TP, padded groups)."""
    for tp_p, tp_d in [(1, 2), (2, 1), (2, 4), (4, 2), (8, 2)]:
        request = RequestSpec(f"pair-{tp_p}-{tp_d}", 24, 24)
        plan, got, want, _, _ = transfer("mamba2", "vllm", tp_p, tp_d, request)
        assert all([a.tobytes() for a in got[d]] == [w.tobytes() for w in want[d]] for d in range(tp_d))


def test_ranks_plan_and_sessions_are_checked_at_the_call(no_leaks: None) -> None:
    """A float or bool rank is a ``TypeError`` at the call: rank 0.0 used to be taken, named its transfers
    'r@0.0>0' while the receivers expected 'r@0>0', and every decode rank waited out its timeout. A session
    that is not a ``Session`` used to fail only at ``send`` (AttributeError), a receiver that is not a
    ``Receiver`` only at ``expect``. Ranges keep their message."""
    plan = plan_reshard(family_layout("mamba2", "vllm", 1), family_layout("mamba2", "vllm", 2))
    with mesh(plan) as (rxs, sessions):
        for rank in (0.0, True, "0", None):
            with pytest.raises(TypeError, match="rank must be an int"):
                ReshardSender(plan, rank, sessions[0])
            with pytest.raises(TypeError, match="rank must be an int"):
                ReshardReceiver(plan, rank, rxs[0])
        with pytest.raises(ValueError, match="prefill rank 1 outside tp 1"):
            ReshardSender(plan, 1, sessions[0])
        with pytest.raises(ValueError, match="decode rank -1 outside tp 2"):
            ReshardReceiver(plan, -1, rxs[0])
        with pytest.raises(TypeError, match="plan must be a ReshardPlan"):
            ReshardSender(plan.decode, 0, sessions[0])  # type: ignore[arg-type]
        with pytest.raises(TypeError, match=r"sessions must map decode ranks to kvwire Sessions.*1: 'str'"):
            ReshardSender(plan, 0, {0: sessions[0][0], 1: "127.0.0.1:9"})
        with pytest.raises(TypeError, match="sessions must be a mapping"):
            ReshardSender(plan, 0, [sessions[0][0], sessions[0][1]])  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="plan must be a ReshardPlan"):
            ReshardReceiver(plan.decode, 0, rxs[0])  # type: ignore[arg-type]
        for receiver in (sessions[0][0], rxs[0].address, None):  # (before: taken, AttributeError at expect)
            with pytest.raises(TypeError, match=f"receiver must be a kvwire Receiver, not {type(receiver).__name__}"):
                ReshardReceiver(plan, 0, receiver)  # type: ignore[arg-type]


def test_numpy_integer_ranks_move_the_same_bytes(no_leaks: None) -> None:
    """Negative control of the rank checks: ranks an engine holds as numpy integers still work."""
    request = RequestSpec("np-ranks", 24, 23)
    _plan, got, want, incoming, _ = transfer("mamba2", "vllm", 2, 4, request, rank=np.int64)
    assert all([a.tobytes() for a in got[d]] == [w.tobytes() for w in want[d]] for d in range(4))
    assert all(type(h.rank) is int for h in incoming)


def test_a_failing_prefill_rank_fails_the_decode_request_by_name(no_leaks: None) -> None:
    family, variant = "gdn", "vllm"
    plan = plan_reshard(family_layout(family, variant, 2), family_layout(family, variant, 1))
    request = RequestSpec("fails", 16, 15)
    dest = [np.zeros(s.nbytes, np.uint8) for s in plan_segments(plan.decode, request)]
    own = plan_segments(family_layout(family, variant, 2), request)
    with mesh(plan) as (rxs, sessions):
        h = ReshardReceiver(plan, 0, rxs[0]).expect(request, dest, timeout=30)
        good = ReshardSender(plan, 0, sessions[0]).send(request, timeout=30)
        bad = ReshardSender(plan, 1, sessions[1]).send(request, timeout=30)
        first = own[0].layer
        good.write_layer(first, [np.zeros(s.nbytes, np.uint8) for s in own if s.layer == first])
        bad.cancel("prefill worker crashed")
        with pytest.raises(TransferFailed, match=r"prefill rank 1 .*prefill worker crashed"):
            h.result(10)
        assert h.state.value == "failed"
        # the healthy source's transfer was cancelled by the decode side: it ends too, naming the decode rank
        with pytest.raises(TransferFailed, match="decode rank 0"):
            good.result(10)
        with pytest.raises(TransferFailed):
            h.wait_layer(first, timeout=1)


def test_a_silent_prefill_rank_times_the_request_out(no_leaks: None) -> None:
    """MLA 2 -> 1: the latent replicas take turns by layer, so both prefill ranks feed decode rank 0; rank 0
    sends everything it owes, rank 1 never starts: the request times out naming rank 1."""
    plan = plan_reshard(family_layout("mla", "vllm", 2), family_layout("mla", "vllm", 1))
    assert plan.sources(0) == [0, 1]
    request = RequestSpec("silent", 8, 8)
    dest = [np.zeros(s.nbytes, np.uint8) for s in plan_segments(plan.decode, request)]
    own = plan_segments(plan.prefill, request)
    with mesh(plan) as (rxs, sessions):
        h = ReshardReceiver(plan, 0, rxs[0]).expect(request, dest, timeout=1.0)
        out = ReshardSender(plan, 0, sessions[0]).send(request)
        out.write_all([np.zeros(s.nbytes, np.uint8) for s in own])
        out.finish()
        out.result(10)  # rank 0's part arrived and verified
        with pytest.raises(TransferTimedOut, match=r"prefill rank 1 \(silent@1>0\).*never started"):
            h.result(10)


def test_on_layer_reports_each_layer_once_after_all_sources(no_leaks: None) -> None:
    request = RequestSpec("layers", 16, 16)
    seen: list[int] = []
    family, variant = "kda", "vllm"
    config = FAMILY_CONFIGS[family]
    g = family_layout(family, variant, 1)
    payload = global_payload(g, request)
    prefill = [shard_reference(g, config, payload, request, 2, p) for p in range(2)]
    plan = plan_reshard(family_layout(family, variant, 2), family_layout(family, variant, 1))
    dest = [np.zeros(s.nbytes, np.uint8) for s in plan_segments(plan.decode, request)]
    own = plan_segments(family_layout(family, variant, 2), request)
    with mesh(plan) as (rxs, sessions):
        h = ReshardReceiver(plan, 0, rxs[0]).expect(request, dest, timeout=30)
        h.on_layer(seen.append)
        outs = [ReshardSender(plan, p, sessions[p]).send(request) for p in range(2)]
        outs[0].write_layer(0, [prefill[0][s.index] for s in own if s.layer == 0])
        with pytest.raises(TimeoutError):
            h.wait_layer(0, timeout=0.3)  # rank 1's half of layer 0 is still missing
        outs[1].write_layer(0, [prefill[1][s.index] for s in own if s.layer == 0])
        h.wait_layer(0, timeout=10)
        for layer in range(1, plan.decode.num_layers):
            for p in range(2):
                outs[p].write_layer(layer, [prefill[p][s.index] for s in own if s.layer == layer])
        for o in outs:
            o.finish()
        h.result(10)
    assert sorted(seen) == sorted(set(seen)) == sorted({s.layer for s in plan_segments(plan.decode, request)})


@pytest.mark.skipif(os.environ.get("KVWIRE_BIG_RESHARD") != "1",
                    reason="set KVWIRE_BIG_RESHARD=1: moves 4.3 GiB over loopback (measured: 9.1 GB peak RSS, 30 s)")
def test_a_segment_past_4_gib_over_sockets(no_leaks: None) -> None:
    """Mamba1 state of 4.3 GiB at TP1 (d_inner 2**20 x d_state 1100 fp32), sent by two TP2 prefill ranks: rank
    1's half lands at 2.15 GiB and runs past 4 GiB. Sources are zeros with one marked byte per MiB; every chunk
    is xxh3-verified and the marks are checked at their 64-bit offsets. (It found that a slice layout stated a
    2.15 GiB piece as one dim, past the 2**31 a layout dim may claim on the wire.)"""
    config = {"model_type": "jamba", "num_hidden_layers": 1, "hidden_size": 1 << 19, "num_attention_heads": 8,
              "num_key_value_heads": 8, "attn_layer_period": 2, "attn_layer_offset": 1, "mamba_d_state": 1100,
              "mamba_d_conv": 4, "mamba_expand": 2}
    from kvwire.codec.hf import layout_from_hf_config

    layouts = [layout_from_hf_config(config, tp_size=2, tp_rank=p, ssm_dtype="float32") for p in range(2)]
    decode = layout_from_hf_config(config, ssm_dtype="float32")
    plan = plan_reshard(layouts[0], decode)
    request = RequestSpec("big", 4, 4)
    segs = plan_segments(decode, request)
    assert segs[1].nbytes > 1 << 32
    step = 1 << 20
    src = []
    for p in range(2):
        bufs = [np.zeros(s.nbytes, np.uint8) for s in plan_segments(layouts[p], request)]
        bufs[1][::step] = p + 1  # one byte per MiB
        src.append(bufs)
    dest = [np.zeros(s.nbytes, np.uint8) for s in segs]
    half = src[0][1].nbytes
    with mesh(plan) as (rxs, sessions):
        h = ReshardReceiver(plan, 0, rxs[0]).expect(request, dest, timeout=600)
        for p in range(2):
            out = ReshardSender(plan, p, sessions[p]).send(request, timeout=600)
            out.write_all(src[p])
            out.finish()
        h.result(600)
        assert sum(h.bytes_received().values()) == plan.needed_bytes(0, request)
    big = dest[1]
    assert (big[:half:step] == 1).all() and (big[half::step] == 2).all()
    assert np.count_nonzero(big) == len(range(0, half, step)) * 2


def test_a_sender_with_another_plan_is_refused_before_a_byte_lands(no_leaks: None) -> None:
    """Decode expects slices of a TP4 -> TP1 plan; a TP2 prefill rank 0 sends its own (2 -> 1) slices under the
    same transfer id: the receiver's layout check refuses them and the request fails naming prefill rank 0."""
    family, variant = "gdn", "vllm"
    decode = family_layout(family, variant, 1)
    expected_plan = plan_reshard(family_layout(family, variant, 4), decode)
    other_plan = plan_reshard(family_layout(family, variant, 2), decode)
    request = RequestSpec("mixed", 16, 16)
    dest = [np.full(s.nbytes, 0xEE, np.uint8) for s in plan_segments(decode, request)]
    with Receiver(key="k") as rx, connect(*rx.address, key="k", lanes=1) as session:
        h = ReshardReceiver(expected_plan, 0, rx).expect(request, dest, timeout=30)
        out = ReshardSender(other_plan, 0, {0: session}).send(request)
        with pytest.raises(TransferFailed, match=r"prefill rank 0 .*LayoutMismatch"):
            h.result(10)
        with pytest.raises(TransferFailed):
            out.result(10)
    assert all((a == 0xEE).all() for a in dest)


def test_gathered_copies_are_dropped_as_layers_are_acknowledged(no_leaks: None) -> None:
    """TP1 -> 2 of NHD heads and SD conv: the sender gathers strided pieces; once a decode rank acknowledges a
    layer, nothing of it is re-sent and its gathered copies are released before the transfer ends."""
    request = RequestSpec("acked", 32, 32)
    plan, got, want, _, _ = transfer("mamba2", "vllm", 1, 2, request)  # a full run: everything verified
    assert all([a.tobytes() for a in got[d]] == [w.tobytes() for w in want[d]] for d in range(2))
    g = family_layout("mamba2", "vllm", 1)
    own = plan_segments(g, request)
    with mesh(plan) as (rxs, sessions):
        dest = [[np.zeros(s.nbytes, np.uint8) for s in plan_segments(plan.decode, request)] for _ in range(2)]
        incoming = [ReshardReceiver(plan, d, rxs[d]).expect(request, dest[d], timeout=30) for d in range(2)]
        out = ReshardSender(plan, 0, sessions[0]).send(request)
        first = own[0].layer
        layer_of = {s.index: s.layer for s in own}
        strided = [c for d in range(2) for c in plan.copies(0, d, request)
                   if not c.src_contiguous and layer_of[c.src_segment] == first]
        assert strided  # this layer's SD conv pieces are gathered
        out.write_layer(first, [np.ones(s.nbytes, np.uint8) for s in own if s.layer == first])
        for h in incoming:
            h.wait_layer(first, timeout=10)
        assert wait_until(lambda: out.gathered_bytes() == 0, 10)  # acked: released, the transfer still open
        assert not out.finished
        out.cancel("test over")
        for h in incoming:
            with pytest.raises(TransferFailed):
                h.result(10)
