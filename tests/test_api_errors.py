"""Bad arguments fail at the call with a typed kvwire error and lose nothing; network failures are kvwire
errors (``OSError`` too) that name host:port; the public constructors show their parameters.

Every "loses nothing" case goes on to finish the same transfer (or register the same request) correctly
after the refused call, over real loopback sockets.
"""

from __future__ import annotations

import errno
import inspect
import socket
import threading
import time
import warnings
from collections.abc import Iterator

import numpy as np
import pytest
from helpers import payload, send_verified

from kvwire import KvwireError, LayoutMismatch, Receiver, RequestSpec, Session, connect, plan_segments
from kvwire.errors import (
    ConnectError,
    ConnectTimeout,
    InsecureReceiverWarning,
    InvalidBuffer,
    KvwireWarning,
    LayoutError,
)
from kvwire.testing.fixtures import load_fixture

LAYOUT = load_fixture("tiny-qwen3-next")
REQ = RequestSpec("r-args", 300, 299)


@pytest.fixture(scope="module")
def link() -> Iterator[tuple[Receiver, Session]]:
    with Receiver(key="k") as rx, connect(*rx.address, key="k", lanes=2, chunk_size=64 * 1024) as s:
        yield rx, s


def _by_layer(request: RequestSpec) -> tuple[list[np.ndarray], dict[int, list[int]]]:
    src = payload(LAYOUT, request, seed=3)
    by_layer: dict[int, list[int]] = {}
    for seg in plan_segments(LAYOUT, request):
        by_layer.setdefault(seg.layer, []).append(seg.index)
    return src, by_layer


# ------------------------------------------------------------------ write_layer


def test_write_layer_refuses_bad_layers_and_counts_then_the_transfer_still_completes(
        link: tuple[Receiver, Session]) -> None:
    rx, session = link
    req = RequestSpec("r-write", 300, 299)
    src, by_layer = _by_layer(req)
    dest = np.empty(sum(a.nbytes for a in src), np.uint8)
    incoming = rx.expect(req.request_id, dest, layout=LAYOUT, state_position=299)
    out = session.send(LAYOUT, req)
    first = min(by_layer)
    for bad in (999, -1, LAYOUT.num_layers, True, "0", 1.0):
        with pytest.raises(LayoutMismatch, match="not a layer"):
            out.write_layer(bad, [])  # type: ignore[arg-type]
    with pytest.raises(LayoutMismatch, match="segments"):
        out.write_layer(first, [])  # the layer has segments: none given
    with pytest.raises(LayoutMismatch, match="segments"):
        out.write_layer(first, [src[i] for i in by_layer[first]] * 2)
    with pytest.raises(LayoutMismatch, match="list of buffers"):
        out.write_layer(first, src[by_layer[first][0]])  # one buffer instead of a list
    with pytest.raises(InvalidBuffer, match="contiguous"):
        out.write_layer(first, [np.repeat(src[i], 2)[::2] for i in by_layer[first]])
    for layer, idx in by_layer.items():
        out.write_layer(layer, [src[i] for i in idx])
    out.finish().result(timeout=30)
    incoming.result(timeout=30)
    assert np.array_equal(dest, np.concatenate(src))


def test_write_layer_refuses_a_buffer_of_another_dtype_with_the_right_byte_count(
        link: tuple[Receiver, Session]) -> None:
    """A float16 tensor where the layout says bfloat16 has the same byte count: it was sent and arrived as
    garbage, verified. It is refused at the call; the same bytes as uint8, or in the layout's dtype, go."""
    torch = pytest.importorskip("torch")
    rx, session = link
    req = RequestSpec("r-dtype", 300, 299)
    src, by_layer = _by_layer(req)
    dest = np.empty(sum(a.nbytes for a in src), np.uint8)
    incoming = rx.expect(req.request_id, dest, layout=LAYOUT, state_position=299)
    out = session.send(LAYOUT, req)
    segs = plan_segments(LAYOUT, req)
    dtype_of = {s.index: LAYOUT.layers[s.layer].caches[s.cache].tensors[s.tensor].dtype for s in segs}
    layer = next(L for L, idx in by_layer.items() if all(dtype_of[i] == "bfloat16" for i in idx))
    wrong = [torch.from_numpy(src[i]).view(torch.float16) for i in by_layer[layer]]  # right bytes, wrong dtype
    with pytest.raises(LayoutMismatch, match="bfloat16 by the layout; the buffer is float16"):
        out.write_layer(layer, wrong)
    with pytest.raises(LayoutMismatch, match="the buffer is float32"):
        out.write_layer(layer, [src[i].view(np.float32) for i in by_layer[layer]])
    for L, idx in by_layer.items():  # the control: the layout's dtype (torch) or raw bytes (numpy uint8)
        bufs = [torch.from_numpy(src[i]).view(torch.bfloat16) if dtype_of[i] == "bfloat16" and L == layer
                else src[i] for i in idx]
        out.write_layer(L, bufs)
    out.finish().result(timeout=30)
    incoming.result(timeout=30)
    assert np.array_equal(dest, np.concatenate(src))


# ------------------------------------------------------------------ expect


def test_expect_refuses_a_destination_that_cannot_hold_the_transfer_at_the_call(
        link: tuple[Receiver, Session]) -> None:
    rx, session = link
    req = RequestSpec("r-expect", 300, 299)
    need = sum(s.nbytes for s in plan_segments(LAYOUT, req))
    with pytest.raises(LayoutMismatch, match="10 bytes"):
        rx.expect(req.request_id, np.empty(10, np.uint8), layout=LAYOUT)
    with pytest.raises(LayoutMismatch, match=f"{need + 1} bytes"):
        rx.expect(req.request_id, np.empty(need + 1, np.uint8), layout=LAYOUT, state_position=299)
    with pytest.raises(InvalidBuffer, match="contiguous"):
        rx.expect(req.request_id, np.empty(2 * need, np.uint8)[::2], layout=LAYOUT)
    with pytest.raises(InvalidBuffer, match="contiguous"):
        rx.expect(req.request_id, np.empty(2 * need, np.uint8)[::2])  # without a layout too
    with pytest.raises(InvalidBuffer, match="read-only"):
        rx.expect(req.request_id, bytes(need), layout=LAYOUT)
    with pytest.raises(InvalidBuffer, match="not a buffer"):
        rx.expect(req.request_id, "not a buffer")
    with pytest.raises(LayoutMismatch, match="buffers"):
        rx.expect(req.request_id, [np.empty(8, np.uint8)] * 1000, layout=LAYOUT, state_position=299)
    with pytest.raises(LayoutError, match="state_position"):
        rx.expect(req.request_id, np.empty(need, np.uint8), layout=LAYOUT, state_position=-1)
    # nothing was registered by the refused calls: the request id is still free, and the transfer lands
    src, by_layer = _by_layer(req)
    dest = np.empty(need, np.uint8)
    incoming = rx.expect(req.request_id, dest, layout=LAYOUT, state_position=299)
    out = session.send(LAYOUT, req)
    for layer, idx in by_layer.items():
        out.write_layer(layer, [src[i] for i in idx])
    out.finish().result(timeout=30)
    incoming.result(timeout=30)
    assert np.array_equal(dest, np.concatenate(src))


def test_a_done_callback_that_is_not_callable_is_a_type_error_at_the_call(link: tuple[Receiver, Session]) -> None:
    """It was taken and failed on the callback pool once the transfer ended, logged, long after the call."""
    rx, session = link
    req = RequestSpec("r-done-cb", 300, 299)
    src = payload(LAYOUT, req, seed=4)
    dest = np.empty(sum(a.nbytes for a in src), np.uint8)
    incoming = rx.expect(req.request_id, dest, layout=LAYOUT)
    out = session.send(LAYOUT, req)
    for handle in (out, incoming):
        with pytest.raises(TypeError, match="callable"):
            handle.add_done_callback(5)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="callable"):
            handle.future.add_done_callback(None)  # type: ignore[arg-type]
    called = threading.Event()
    out.add_done_callback(lambda f: called.set())  # the good path: runs once the transfer is done
    out.write_all(src)
    out.finish().result(timeout=30)
    incoming.result(timeout=30)
    assert called.wait(10) and np.array_equal(dest, np.concatenate(src))


# ------------------------------------------------------------------ RequestSpec


@pytest.mark.parametrize("args", [(0, 0), ("10", 5), (10, "5"), (10.0, 5), (10, None), (True, 0), (-1, 0)],
                         ids=repr)
def test_request_spec_refuses_meaningless_or_mistyped_token_counts(args: tuple[object, object]) -> None:
    with pytest.raises(LayoutError):
        RequestSpec("r", *args)  # type: ignore[arg-type]


def test_request_spec_takes_integers_of_any_kind_as_ints() -> None:
    """Engines hold token counts in numpy or torch integers: those are integers, kept as Python ints."""
    r = RequestSpec("r", np.int64(10), np.int32(9), {"attn": np.uint16(4)})
    assert (r.num_tokens, r.state_position, r.prefix_hit["attn"]) == (10, 9, 4)
    assert all(type(v) is int for v in (r.num_tokens, r.state_position, r.prefix_hit["attn"]))
    assert r == RequestSpec("r", 10, 9, {"attn": 4})


def test_request_spec_refuses_a_mistyped_prefix_hit() -> None:
    with pytest.raises(LayoutError, match="int"):
        RequestSpec("r", 10, 9, {"attn": "3"})  # type: ignore[dict-item]
    assert RequestSpec("r", 1, 0).state_position == 0  # one token, state before it: the smallest request


def test_a_request_id_the_wire_cannot_carry_is_refused_at_the_call_and_leaves_nothing_in_flight(
        link: tuple[Receiver, Session]) -> None:
    """A lone surrogate (what ``surrogateescape`` leaves of undecodable bytes) has no UTF-8 form: the manifest
    cannot carry it. It was taken, and ``send`` then failed with a UnicodeEncodeError after the session had
    started the transfer: an unreachable transfer in flight until its 300 s timeout."""
    rx, session = link
    bad = "req-\udcff"
    with pytest.raises(LayoutError, match="UTF-8"):
        RequestSpec(bad, 300, 299)
    with pytest.raises(ValueError, match="UTF-8"):
        rx.expect(bad, bytearray(16))
    assert session.stats()["transfers_in_flight"] == 0
    good = RequestSpec("réq-✓", 300, 299)  # text beyond ASCII is fine
    src = payload(LAYOUT, good, seed=5)
    dest = np.empty(sum(a.nbytes for a in src), np.uint8)
    incoming = rx.expect(good.request_id, dest, layout=LAYOUT)
    out = session.send(LAYOUT, good)
    out.write_all(src)
    out.finish().result(timeout=30)
    incoming.result(timeout=30)
    assert np.array_equal(dest, np.concatenate(src))
    assert session.stats()["transfers_in_flight"] == 0


# ------------------------------------------------------------------ kvwire.cuda block tables


def test_unknown_block_table_groups_are_refused_by_stager_and_unstager() -> None:
    pytest.importorskip("torch")
    from kvwire.cuda import PinnedPool, Stager, Unstager, allocate_paged_cache

    cache = allocate_paged_cache(LAYOUT, 8, 2)
    blocks = list(range(-(-300 // cache.block_size)))
    with PinnedPool(16 << 20, backend="torch") as pool, Stager(cache, pool) as stager, \
            Unstager(cache, pool) as unstager:
        with pytest.raises(LayoutMismatch, match="'atn'"):
            stager.begin(REQ, {"atn": blocks}, 0)  # a typo for attn
        with pytest.raises(LayoutMismatch, match="'swa'"):
            unstager.prepare(REQ, {"attn": blocks, "swa": blocks}, 0)  # no swa layer in this model
        assert pool.in_use_bytes == 0
        with stager.begin(REQ, {"attn": blocks}, 0) as job:  # the right tables still work
            assert job.segments


# ------------------------------------------------------------------ network errors


def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = int(s.getsockname()[1])
    s.close()
    return port


def test_refused_connection_is_a_connect_error_naming_host_and_port() -> None:
    port = _closed_port()
    with pytest.raises(ConnectError, match=f"127.0.0.1:{port}") as e:
        connect("127.0.0.1", port, key="k")
    assert isinstance(e.value, OSError) and isinstance(e.value, KvwireError)
    assert e.value.errno == errno.ECONNREFUSED and (e.value.host, e.value.port) == ("127.0.0.1", port)
    assert isinstance(e.value.__cause__, ConnectionRefusedError)


def test_unresolvable_name_is_a_connect_error_naming_it() -> None:
    with pytest.raises(ConnectError, match="no-such-host.invalid:7400.*resolve"):
        connect("no-such-host.invalid", 7400)


def test_a_peer_that_never_answers_the_handshake_is_a_connect_timeout_naming_it() -> None:
    """A listener that accepts TCP but never speaks: the handshake times out after connect_timeout."""
    srv = socket.create_server(("127.0.0.1", 0))
    port = srv.getsockname()[1]
    try:
        t0 = time.monotonic()
        with pytest.raises(ConnectTimeout, match=f"127.0.0.1:{port}") as e:
            Session("127.0.0.1", port, connect_timeout=0.5)
        assert time.monotonic() - t0 < 5
        assert isinstance(e.value, TimeoutError) and isinstance(e.value, ConnectError)
    finally:
        srv.close()


# ------------------------------------------------------------------ constructors' bounds and parts

_BAD_RECEIVER = [({"max_sessions": "8"}, TypeError), ({"max_sessions": 0}, ValueError),
                 ({"max_lanes": 4.0}, TypeError), ({"max_lanes": -1}, ValueError),
                 ({"max_handshakes": 0}, ValueError), ({"max_transfers_per_session": 0}, ValueError),
                 ({"max_inflight_bytes": -1}, ValueError), ({"max_inflight_bytes": 1e9}, TypeError),
                 ({"max_probe_bytes": "1G"}, TypeError), ({"limits": "x"}, TypeError),
                 ({"chunk_stage": 5}, TypeError)]


@pytest.mark.parametrize(("kwargs", "error"), _BAD_RECEIVER, ids=lambda v: repr(v) if isinstance(v, dict) else "")
def test_a_receiver_refuses_a_bound_or_part_it_cannot_use_at_the_call(
        no_leaks: None, kwargs: dict[str, object], error: type[Exception]) -> None:
    """Each was taken before and failed later, on a thread: ``max_sessions="8"`` killed the accept thread at
    the first connection (a receiver listening and serving nobody), ``limits="x"`` every handshake,
    ``chunk_stage=5`` every transfer; 0 sessions or transfers refused everything."""
    with pytest.raises(error, match=next(iter(kwargs))):
        Receiver(**kwargs)  # type: ignore[arg-type]


def test_a_receiver_with_those_bounds_well_formed_serves_a_transfer(no_leaks: None) -> None:
    """The negative control: the same parameters, each of a type and range it takes (numpy ints are ints)."""
    from kvwire.codec.frames import Limits
    from kvwire.tcp.transport import IDENTITY
    with Receiver(key="k", max_sessions=np.int64(2), max_lanes=2, max_handshakes=4, max_transfers_per_session=8,
                  max_inflight_bytes=1 << 26, max_probe_bytes=0, limits=Limits(), chunk_stage=IDENTITY) as rx, \
            connect(*rx.address, key="k", lanes=2, limits=Limits(), chunk_stage=IDENTITY) as s:
        send_verified(rx, s, LAYOUT, RequestSpec("r-bounds", 300, 299))


@pytest.mark.parametrize(("kwargs", "error"), [({"limits": "x"}, TypeError), ({"chunk_stage": 5}, TypeError)],
                         ids=["limits", "chunk_stage"])
def test_a_session_refuses_limits_or_a_chunk_stage_it_cannot_use_before_it_connects(
        link: tuple[Receiver, Session], kwargs: dict[str, object], error: type[Exception]) -> None:
    rx, _ = link
    before = rx.stats()["sessions"]
    with pytest.raises(error, match=next(iter(kwargs))):
        connect(*rx.address, key="k", **kwargs)  # type: ignore[arg-type]
    assert rx.stats()["sessions"] == before  # nothing opened


# ------------------------------------------------------------------ signatures and documentation


def test_connect_and_session_take_the_same_explicit_keywords() -> None:
    c = inspect.signature(connect).parameters
    s = dict(inspect.signature(Session).parameters)
    assert not any(p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL) for p in c.values())
    assert [(n, p.kind, p.default) for n, p in c.items()] == [(n, p.kind, p.default) for n, p in s.items()]


@pytest.mark.parametrize("obj", [connect, Session, Receiver], ids=lambda o: o.__name__)
def test_every_parameter_is_documented(obj: object) -> None:
    doc = inspect.getdoc(obj) or ""
    params = inspect.signature(obj).parameters  # type: ignore[arg-type]
    missing = [n for n in params if f"\n    {n}: " not in doc.replace("\n        ", "\n    ")]
    assert not missing, f"{getattr(obj, '__name__', obj)} does not document {missing}"


# ------------------------------------------------------------------ the open-receiver warning


def test_a_receiver_on_all_interfaces_without_a_key_warns() -> None:
    with pytest.warns(InsecureReceiverWarning, match="0.0.0.0"):
        Receiver("0.0.0.0", 0).close()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # none of these may warn
        Receiver("0.0.0.0", 0, key="k").close()
        Receiver("127.0.0.1", 0).close()
        Receiver("localhost", 0).close()
    assert issubclass(InsecureReceiverWarning, KvwireWarning)


def test_the_warning_does_not_stop_the_receiver_from_working() -> None:
    with pytest.warns(InsecureReceiverWarning):
        rx = Receiver("0.0.0.0", 0)
    try:
        with connect("127.0.0.1", rx.address[1]) as s:
            assert s.healthy
    finally:
        rx.close()


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), "64G", None, [1], -5, True])
def test_a_malformed_max_transfer_bytes_in_the_welcome_is_no_bound(bad: object) -> None:
    """A receiver's WELCOME limits are its word, not checked by the handshake: a malformed
    ``max_transfer_bytes`` made every ``send`` raise a raw ValueError/OverflowError/TypeError. It is ignored
    (as a malformed early window is), and the sender's own bound still holds."""
    from kvwire.codec.frames import Limits

    with Receiver(key="k") as rx, connect(*rx.address, key="k", lanes=1, link_control=False,
                                          limits=Limits(max_transfer_bytes=1 << 20)) as s:
        s.server_limits["max_transfer_bytes"] = bad
        req = RequestSpec("r-mtb", 300, 299)
        h = rx.expect(req.request_id, np.empty(sum(a.nbytes for a in _by_layer(req)[0]), np.uint8),
                      layout=LAYOUT, state_position=299)
        out = s.send(LAYOUT, req)
        out.write_all(_by_layer(req)[0])
        out.finish().result(timeout=30)
        h.result(timeout=30)
        with pytest.raises(KvwireError, match="exceeds the 1048576-byte limit"):
            s.send(LAYOUT, RequestSpec("r-big", 40_000, 39_999))


def test_a_lane_handshake_that_never_ends_is_a_connect_timeout_naming_the_peer(monkeypatch: pytest.MonkeyPatch) -> None:
    """A receiver that takes the control handshake but never answers a lane's: a bare TimeoutError('timed out')
    came out of connect(); now the ConnectTimeout the control handshake gives, naming host:port and the lane."""
    import kvwire.tcp._receiver as receiver_module

    monkeypatch.setattr(receiver_module, "server_lane", lambda *a: time.sleep(3))
    with Receiver(key="k") as rx:
        t0 = time.monotonic()
        with pytest.raises(ConnectTimeout, match=rf"127\.0\.0\.1:{rx.address[1]}.*lane 0: no handshake reply"):
            connect(*rx.address, key="k", lanes=1, connect_timeout=1.0, link_control=False)
        assert time.monotonic() - t0 < 3
