"""Loopback transport: bit-exact round trips, layer semantics, concurrency, cancel, mismatches, leaks."""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import numpy as np
import pytest
from helpers import payload, wait_until

from kvwire import (
    LayoutMismatch,
    Receiver,
    RequestSpec,
    State,
    TransferCancelled,
    TransferFailed,
    connect,
    plan_segments,
)
from kvwire.errors import StatePositionMismatch
from kvwire.sockopts import KEEPALIVE_IDLE
from kvwire.testing.faults import ChunkHook
from kvwire.testing.fixtures import FIXTURES, default_request, fixture_payload, load_fixture

CHUNK = 64 * 1024


@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_every_fixture_round_trips_bit_exact(name: str, no_leaks: None) -> None:
    layout = load_fixture(name)
    req = default_request(f"rt-{name}")
    src = fixture_payload(layout, req)
    dst = [np.zeros(a.nbytes, np.uint8) for a in src]
    with Receiver(key="k") as rx, connect(*rx.address, key="k", lanes=3, chunk_size=CHUNK) as s:
        h_rx = rx.expect(req.request_id, dst, layout=layout, state_position=req.state_position)
        h = s.send(layout, req)
        h.write_all(src)
        h.finish().result(20)
        assert h_rx.result(20) is h_rx
        assert h.state is State.DONE and h_rx.state is State.DONE
    for a, b in zip(src, dst):
        assert a.view(np.uint8).tobytes() == b.tobytes()


def test_layers_become_ready_as_written_and_wait_layer_blocks(no_leaks: None) -> None:
    layout = load_fixture("tiny-qwen3-next")
    req = default_request("layers")
    src = fixture_payload(layout, req)
    segs = plan_segments(layout, req)
    dst = np.zeros(sum(s.nbytes for s in segs), np.uint8)
    with Receiver() as rx, connect(*rx.address, lanes=2, chunk_size=CHUNK) as s:
        h_rx = rx.expect("layers", dst)
        h = s.send(layout, req)
        seen: list[int] = []
        h_rx.on_layer(seen.append)
        for layer in range(layout.num_layers):
            with pytest.raises(TimeoutError):
                h_rx.wait_layer(layer, timeout=0.1)
            h.write_layer(layer, [src[x.index] for x in segs if x.layer == layer])
            h_rx.wait_layer(layer, timeout=10)
            # the layer's bytes are in place when wait_layer returns
            for x in segs:
                if x.layer == layer:
                    lo = sum(y.nbytes for y in segs[: x.index])
                    assert dst[lo : lo + x.nbytes].tobytes() == src[x.index].tobytes()
        h.finish().result(10)
        h_rx.result(10)
        assert sum(h_rx.lane_bytes().values()) == h.manifest.total_bytes  # no chunk was re-sent here
        assert set(h_rx.lane_bytes()) <= set(h_rx.lane_sockets()) and len(h_rx.lane_sockets()) == 2
        # (on_layer callbacks run on the receiver's callback pool: result() can return before the last one)
        wait_until(lambda: len(seen) >= layout.num_layers, 5)
        assert seen == list(range(layout.num_layers))
        assert list(h_rx.layers(timeout=1)) == list(range(layout.num_layers))


def test_layer_without_bytes_is_ready_at_once_and_state_only_model(no_leaks: None) -> None:
    layout = load_fixture("tiny-nemotron-h")  # '-' layers carry no cache
    empty = [layer.index for layer in layout.layers if not layer.caches]
    assert empty
    req = default_request("nem")
    src = fixture_payload(layout, req)
    with Receiver(allocator=lambda m: np.zeros(m.total_bytes, np.uint8)) as rx, \
            connect(*rx.address, lanes=2, chunk_size=CHUNK) as s:
        h = s.send(layout, req)
        h_rx = rx.next_transfer(timeout=10)
        h.write_all(src)
        h.finish().result(10)
        h_rx.result(10)
        assert set(h_rx.layers_ready) == {i for i in range(layout.num_layers) if i not in empty}
        assert np.concatenate([a.view(np.uint8).ravel() for a in src]).tobytes() == h_rx.dest.tobytes()


def test_32_transfers_over_4_sessions_interleave(no_leaks: None) -> None:
    layout = load_fixture("tiny-kimi-linear")
    results: dict[str, np.ndarray] = {}
    expected: dict[str, bytes] = {}
    errors: list[BaseException] = []
    with Receiver(key=b"secret") as rx:
        sessions = [connect(*rx.address, key=b"secret", lanes=2, chunk_size=CHUNK) for _ in range(4)]
        try:
            handles = []
            for i in range(32):
                req = RequestSpec(f"c{i}", 700 + i, 700 + i)
                src = payload(layout, req, seed=i)
                expected[req.request_id] = b"".join(a.tobytes() for a in src)
                results[req.request_id] = np.zeros(len(expected[req.request_id]), np.uint8)
                handles.append((rx.expect(req.request_id, results[req.request_id], layout=layout),
                                sessions[i % 4].send(layout, req), src))

            def feed(k: int) -> None:
                try:
                    for _, h, src in handles[k::4]:
                        h.write_all(src)
                        h.finish()
                except BaseException as e:  # noqa: BLE001
                    errors.append(e)

            feeders = [threading.Thread(target=feed, args=(k,)) for k in range(4)]
            for t in feeders:
                t.start()
            for t in feeders:
                t.join()
            for h_rx, h, _ in handles:
                h.result(30)
                h_rx.result(30)
        finally:
            for s in sessions:
                s.close()
    assert not errors
    for rid, data in expected.items():
        assert results[rid].tobytes() == data


def test_sender_cancel_reaches_receiver(no_leaks: None) -> None:
    layout = load_fixture("tiny-qwen3-next")
    req = default_request("cancel-s")
    dst = np.zeros(sum(s.nbytes for s in plan_segments(layout, req)), np.uint8)
    with Receiver() as rx, connect(*rx.address, lanes=2) as s:
        h_rx = rx.expect("cancel-s", dst)
        h = s.send(layout, req)
        h.write_layer(0, [a for a, x in zip(payload(layout, req), plan_segments(layout, req)) if x.layer == 0])
        h_rx.wait_layer(0, 10)
        h.cancel("engine aborted the request")
        with pytest.raises(TransferCancelled):
            h.result(5)
        with pytest.raises(TransferCancelled, match="engine aborted"):
            h_rx.result(5)
        assert h_rx.state is State.CANCELLED
        # the session stays usable
        req2 = default_request("after")
        h_rx2 = rx.expect("after", np.zeros_like(dst))
        h2 = s.send(layout, req2)
        h2.write_all(payload(layout, req2))
        h2.finish().result(10)
        h_rx2.result(10)


def test_receiver_cancel_reaches_sender(no_leaks: None) -> None:
    layout = load_fixture("tiny-qwen3-next")
    req = default_request("cancel-r")
    dst = np.zeros(sum(s.nbytes for s in plan_segments(layout, req)), np.uint8)
    with Receiver() as rx, connect(*rx.address, lanes=2) as s:
        h_rx = rx.expect("cancel-r", dst)
        h = s.send(layout, req)
        h.write_layer(0, [a for a, x in zip(payload(layout, req), plan_segments(layout, req)) if x.layer == 0])
        h_rx.wait_layer(0, 10)
        h_rx.cancel("decode instance evicted it")
        with pytest.raises(TransferCancelled, match="evicted"):
            h.result(5)
        assert h_rx.state is State.CANCELLED


def test_a_receiver_cancel_as_the_transfer_is_admitted_reaches_the_sender(
        no_leaks: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """The decode side cancels an expected request just as its BEGIN is being admitted (after the receiver
    took the expectation, before the transfer is bound to it: here, inside the layout check in between).
    Both ends must end cancelled: the sender is told (ACCEPT, then CANCEL) and no byte goes into the
    buffers the decode side was told are free. It used to end done at the sender while the receiver's
    handle said cancelled (``test_adapter_hf::test_decode_cancels_mid_stream`` caught it once under CI load)."""
    import kvwire.tcp._receiver as receiver_module
    layout = load_fixture("tiny-qwen3-next")
    req = default_request("cancel-admit")
    dst = np.zeros(sum(x.nbytes for x in plan_segments(layout, req)), np.uint8)
    check = receiver_module.check_manifest_against
    with Receiver() as rx, connect(*rx.address, lanes=2) as s:
        h_rx = rx.expect("cancel-admit", dst, layout=layout)

        def cancel_then_check(m: object, lay: object) -> None:
            h_rx.cancel("decode gave up as it arrived")
            check(m, lay)
        monkeypatch.setattr(receiver_module, "check_manifest_against", cancel_then_check)
        h = s.send(layout, req)
        h.write_all(payload(layout, req))
        with pytest.raises(TransferCancelled, match="decode gave up"):
            h.finish().result(10)
        assert h_rx.state is State.CANCELLED
        assert not dst.any(), "a cancelled request's buffers were written"


@pytest.mark.parametrize("change", ["dtype", "layout_tag", "state_position"])
def test_mismatch_is_rejected_before_any_byte_is_written(change: str, no_leaks: None) -> None:
    sender_layout = load_fixture("tiny-qwen3-next")
    if change == "dtype":
        receiver_layout = load_fixture("tiny-qwen3-next", ssm_dtype="bfloat16")
    elif change == "layout_tag":
        receiver_layout = load_fixture("tiny-qwen3-next", conv_layout="conv:SD")
    else:
        receiver_layout = sender_layout
    req = default_request("mm")
    size = sum(s.nbytes for s in plan_segments(sender_layout, req))
    dst = np.full(size, 7, np.uint8)
    with Receiver() as rx, connect(*rx.address, lanes=2) as s:
        expected_pos = req.state_position + 1 if change == "state_position" else None
        h_rx = rx.expect("mm", dst, layout=receiver_layout, state_position=expected_pos)
        h = s.send(sender_layout, req)
        h.write_all(payload(sender_layout, req))
        h.finish()
        err = StatePositionMismatch if change == "state_position" else LayoutMismatch
        with pytest.raises(TransferFailed, match=err.__name__):
            h.result(10)
        with pytest.raises(TransferFailed, match=err.__name__):
            h_rx.result(10)
    assert (dst == 7).all()


def test_wrong_buffer_size_is_rejected(no_leaks: None) -> None:
    layout = load_fixture("tiny-llama")
    req = default_request("small")
    with Receiver() as rx, connect(*rx.address, lanes=1) as s:
        h_rx = rx.expect("small", np.zeros(10, np.uint8))
        h = s.send(layout, req)
        with pytest.raises(TransferFailed, match="needs"):
            h.result(10)
        assert h_rx.state is State.FAILED


def test_unregistered_request_without_allocator_is_rejected(no_leaks: None) -> None:
    layout = load_fixture("tiny-llama")
    with Receiver() as rx, connect(*rx.address, lanes=1) as s:
        h = s.send(layout, default_request("nobody"))
        with pytest.raises(TransferFailed, match="no destination"):
            h.result(10)


def test_torch_tensors_in_and_out(no_leaks: None) -> None:
    torch = pytest.importorskip("torch")
    layout = load_fixture("tiny-kimi-linear")
    req = default_request("torch")
    segs = plan_segments(layout, req)
    src = [torch.randint(0, 255, (s.nbytes,), dtype=torch.uint8) for s in segs]
    dst = [torch.zeros(s.nbytes // 2, dtype=torch.bfloat16) for s in segs]
    with Receiver() as rx, connect(*rx.address, lanes=2, chunk_size=CHUNK) as s:
        h_rx = rx.expect("torch", dst)
        h = s.send(layout, req)
        h.write_all(src)
        h.finish().result(10)
        h_rx.result(10)
    for a, b in zip(src, dst):
        assert torch.equal(a, b.view(torch.uint8))


def test_asyncio_await(no_leaks: None) -> None:
    layout = load_fixture("tiny-llama")
    req = default_request("aio")

    async def main() -> bytes:
        with Receiver(allocator=lambda m: bytearray(m.total_bytes)) as rx, connect(*rx.address) as s:
            h = s.send(layout, req)
            h.write_all(payload(layout, req))
            await h.finish()
            h_rx = await asyncio.get_running_loop().run_in_executor(None, rx.next_transfer, 5.0)
            await h_rx
            return bytes(h_rx.dest)

    got = asyncio.run(main())
    assert got == b"".join(a.tobytes() for a in payload(layout, req))


def test_transfer_deadline_times_out_both_sides(no_leaks: None) -> None:
    from kvwire import TransferTimedOut

    layout = load_fixture("tiny-qwen3-next")
    req = default_request("slow")
    dst = np.zeros(sum(s.nbytes for s in plan_segments(layout, req)), np.uint8)
    with Receiver() as rx, connect(*rx.address, lanes=1) as s:
        h_rx = rx.expect("slow", dst)
        h = s.send(layout, req, timeout=0.5)  # the engine never writes a layer
        t0 = time.monotonic()
        with pytest.raises(TransferTimedOut):
            h.result(5)
        assert time.monotonic() - t0 < 2
        with pytest.raises(TransferTimedOut):
            h_rx.result(5)


def test_expected_request_that_never_comes_times_out(no_leaks: None) -> None:
    from kvwire import TransferTimedOut

    with Receiver() as rx:
        h = rx.expect("ghost", bytearray(10), timeout=0.3)
        with pytest.raises(TransferTimedOut):
            h.result(5)


def test_hashing_off_round_trip(no_leaks: None) -> None:
    layout = load_fixture("tiny-falcon-h1")
    req = default_request("nohash")
    src = fixture_payload(layout, req)
    dst = [np.zeros(a.nbytes, np.uint8) for a in src]
    with Receiver() as rx, connect(*rx.address, lanes=2, hashing=False, chunk_size=CHUNK) as s:
        h_rx = rx.expect("nohash", dst)
        h = s.send(layout, req)
        assert not h.manifest.hashed
        h.write_all(src)
        h.finish().result(10)
        h_rx.result(10)
    assert all(a.view(np.uint8).tobytes() == b.tobytes() for a, b in zip(src, dst))


def test_two_transfers_on_one_session_share_the_lanes(no_leaks: None) -> None:
    """Round-robin between transfers: when the first finishes, the second has moved a fair part too."""
    layout = load_fixture("tiny-qwen3-next")
    reqs = [RequestSpec(f"fair-{i}", 20000, 20000) for i in range(2)]
    srcs = [payload(layout, r, seed=i) for i, r in enumerate(reqs)]
    with Receiver(allocator=lambda m: np.zeros(m.total_bytes, np.uint8)) as rx, \
            connect(*rx.address, lanes=2, chunk_size=CHUNK) as s:
        outs = [s.send(layout, r) for r in reqs]
        progress_of_second: list[float] = []
        second = outs[1]
        outs[0].add_done_callback(lambda _f: progress_of_second.append(second.bytes_sent / second.manifest.total_bytes))
        for h, src in zip(outs, srcs):  # both fully written before either is accepted and sent
            h.write_all(src)
        for h in outs:
            h.finish().result(30)
        for _ in reqs:
            rx.next_transfer(5).result(10)
    assert progress_of_second and progress_of_second[0] > 0.6, progress_of_second


def test_sender_learns_each_layer_verified_before_the_transfer_ends(no_leaks: None) -> None:
    """``on_layer_acked``: every layer with bytes reported exactly once, only after the receiver had it
    verified in place, a corrupted chunk's layer only after its re-send, late subscribers get the earlier
    layers, and a failing callback breaks nothing."""
    layout = load_fixture("tiny-qwen3-next")
    req = default_request("acked")
    src = fixture_payload(layout, req)
    segs = plan_segments(layout, req)
    dst = np.zeros(sum(s.nbytes for s in segs), np.uint8)
    acked: list[tuple[int, float]] = []
    late: list[int] = []
    corrupted: list[int] = []
    with Receiver() as rx, connect(*rx.address, lanes=2, chunk_size=CHUNK) as s:
        h_rx = rx.expect("acked", dst)
        h = s.send(layout, req)

        def hook(lane: int, tid: int, chunk: int, pieces: list) -> list | None:  # type: ignore[type-arg]
            if chunk == 0 and not corrupted:
                corrupted.append(chunk)
                bad = bytearray(pieces[0])
                bad[0] ^= 1
                return [memoryview(bad), *pieces[1:]]
            return None

        s.chunk_stage = ChunkHook(hook)
        h.on_layer_acked(lambda layer: acked.append((layer, time.monotonic())))
        h.on_layer_acked(lambda layer: 1 / 0)  # user error: logged, the transfer goes on
        first = layout.num_layers // 2
        for layer in range(first):
            h.write_layer(layer, [src[x.index] for x in segs if x.layer == layer])
        assert wait_until(lambda: len(acked) == len({x.layer for x in segs if x.layer < first}))
        assert h.state is State.ACTIVE  # half the layers acked, the transfer still running
        for layer in range(first, layout.num_layers):
            h.write_layer(layer, [src[x.index] for x in segs if x.layer == layer])
        h.finish().result(20)
        h_rx.result(20)
        h.on_layer_acked(late.append)
    with_bytes = {x.layer for x in segs if x.nbytes}
    layers = [layer for layer, _ in acked]
    assert sorted(layers) == sorted(with_bytes) and len(layers) == len(set(layers))
    assert late == layers == h.layers_acked
    for layer, t in acked:
        assert h_rx.layer_times[layer] <= t  # the receiver had it verified in place first
    assert corrupted and h.retries(0) == 1 and h.plan.layers[0] in layers
    assert dst.tobytes() == b"".join(a.tobytes() for a in src)


def test_every_connection_keeps_idle_paths_alive_and_bounds_unacked_data(no_leaks: None) -> None:
    """Parked lanes sit idle for minutes between datacenters: keepalives must start well inside a NAT's
    idle timeout, and the user timeout is the peer timeout, on both ends of every connection."""
    with Receiver(peer_timeout=7.0) as rx, connect(*rx.address, lanes=3, max_lanes=4, peer_timeout=6.0) as s:
        s.set_active_lanes(4)
        ours = [s.ctrl.sock, *s.lane_sockets()]
        assert wait_until(lambda: len(rx.live_sessions()) == 1 and len(rx.live_sessions()[0].lanes) == 4, 5)
        sess = rx.live_sessions()[0]
        theirs = [sess.ctrl.sock, *(ch.sock for ch in sess.lanes.values())]
        for sock, timeout in [(x, 6.0) for x in ours] + [(x, 7.0) for x in theirs]:
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == KEEPALIVE_IDLE <= 60
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL) <= KEEPALIVE_IDLE
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == int(timeout * 1000)
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
