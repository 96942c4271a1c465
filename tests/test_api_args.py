"""Arguments of the public calls are checked at the call: a bad one is a ``TypeError``/``ValueError`` (or the
``KvwireError`` the call already used for that kind of problem) that names it, raised before a socket or a
thread opens, and nothing is lost: each check has a negative control where the valid value goes on to work
(a transfer completes, over real loopback sockets).
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers import payload, send_verified, wait_until

from kvwire import KvwireError, Receiver, RequestSpec, Session, connect, load_layout, plan_segments
from kvwire.codec.frames import DEFAULT_LIMITS, MIN_CHUNK
from kvwire.codec.manifest import max_chunk_size
from kvwire.codec.presets import PRESETS
from kvwire.codec.transfer import State
from kvwire.errors import LayoutError, LayoutMismatch
from kvwire.reshard import ReshardIncoming
from kvwire.tcp import IncomingTransfer
from kvwire.testing.fixtures import load_fixture

LAYOUT = load_fixture("tiny-qwen3-next")

_ids = iter(range(1 << 30))


def _req() -> RequestSpec:
    return RequestSpec(f"r-args-{next(_ids)}", 300, 299)


@pytest.fixture(scope="module")
def rx() -> Iterator[Receiver]:
    with Receiver(key="k") as r:
        yield r


# ------------------------------------------------------------------ connect / Session

BAD_CONNECT: list[tuple[dict[str, Any], type[Exception], str]] = [
    ({"heartbeat": 0}, ValueError, "heartbeat"),
    ({"heartbeat": -1}, ValueError, "heartbeat"),
    ({"heartbeat": math.nan}, ValueError, "heartbeat"),
    ({"heartbeat": math.inf}, ValueError, "heartbeat"),
    ({"heartbeat": "1"}, TypeError, "heartbeat"),
    ({"peer_timeout": 0}, ValueError, "peer_timeout"),
    ({"peer_timeout": -1}, ValueError, "peer_timeout"),
    ({"connect_timeout": -1}, ValueError, "connect_timeout"),
    ({"connect_timeout": None}, TypeError, "connect_timeout"),
    ({"key": 123}, TypeError, "key"),
    ({"hashing": "yes"}, TypeError, "hashing"),
    ({"hashing": 0}, TypeError, "hashing"),
    ({"hashing": None}, TypeError, "hashing"),
    ({"reconnect": "no"}, TypeError, "reconnect"),
    ({"reconnect": 1}, TypeError, "reconnect"),
    ({"key": ["k"]}, TypeError, "key"),
    ({"port": 70000}, ValueError, "port"),
    ({"port": -1}, ValueError, "port"),
    ({"port": 0}, ValueError, "port"),
    ({"port": True}, TypeError, "port"),
    ({"port": "7000"}, TypeError, "port"),
    ({"host": None}, TypeError, "host"),
    ({"host": ""}, ValueError, "host"),
    ({"chunk_size": 0}, ValueError, "chunk_size"),
    ({"chunk_size": -1}, ValueError, "chunk_size"),
    ({"chunk_size": 1}, ValueError, "chunk_size"),
    ({"chunk_size": MIN_CHUNK - 1}, ValueError, "chunk_size"),
    ({"chunk_size": max_chunk_size(DEFAULT_LIMITS) + 1}, ValueError, "chunk_size"),
    ({"chunk_size": 65536.0}, TypeError, "chunk_size"),
    ({"lanes": "4"}, TypeError, "lanes"),
    ({"lanes": 2.5}, TypeError, "lanes"),
    ({"lanes": 0}, ValueError, "lanes"),
    ({"lanes": 257}, ValueError, "lanes"),
    ({"lanes": 4, "max_lanes": 2}, ValueError, "max_lanes"),
    ({"max_lanes": "16"}, TypeError, "max_lanes"),
    ({"max_retries": -1}, ValueError, "max_retries"),
    ({"max_retries": 1.5}, TypeError, "max_retries"),
    ({"on_lane_open": 5}, TypeError, "on_lane_open"),
]


@pytest.mark.parametrize(("kw", "exc", "name"), BAD_CONNECT, ids=lambda v: repr(v) if isinstance(v, dict) else "")
@pytest.mark.usefixtures("no_leaks")
@pytest.mark.filterwarnings("error::ResourceWarning")
def test_connect_refuses_a_bad_argument_at_the_call(rx: Receiver, kw: dict[str, Any], exc: type[Exception],
                                                    name: str) -> None:
    args: dict[str, Any] = {"host": rx.address[0], "port": rx.address[1], "key": "k", **kw}
    host, port = args.pop("host"), args.pop("port")
    before = rx.stats()["auth_failures"], rx.sessions
    t0 = time.monotonic()
    with pytest.raises(exc, match=name):
        connect(host, port, **args)
    with pytest.raises(exc, match=name):
        Session(host, port, **args)
    assert time.monotonic() - t0 < 1  # at the call: nothing dialled, nothing waited for
    assert (rx.stats()["auth_failures"], rx.sessions) == before  # and nothing reached the receiver


@pytest.mark.usefixtures("no_leaks")
def test_connect_takes_the_valid_values_and_they_work(rx: Receiver) -> None:
    """The negative control of the checks above: the edges of each range, and the other accepted types."""
    host, port = rx.address
    with connect(host, np.int64(port), key=bytearray(b"k"), lanes=np.int32(1), max_lanes=256,  # type: ignore[arg-type]
                 chunk_size=MIN_CHUNK, heartbeat=0.2, peer_timeout=np.float64(5), connect_timeout=2,
                 max_retries=0, on_lane_open=lambda i, s: None) as s:
        send_verified(rx, s, LAYOUT, _req())
    with connect(host, port, key=b"k", lanes=2, chunk_size=max_chunk_size(DEFAULT_LIMITS), hashing=False,
                 reconnect=False) as s:
        send_verified(rx, s, LAYOUT, _req())


@pytest.mark.usefixtures("no_leaks")
def test_a_key_as_str_bytes_or_bytearray_is_the_same_key(rx: Receiver) -> None:
    with connect(*rx.address, key=b"k") as a, connect(*rx.address, key="k") as b, \
            connect(*rx.address, key=bytearray(b"k")) as c:  # type: ignore[arg-type]
        assert a.key == b.key == c.key == b"k"


@pytest.mark.usefixtures("no_leaks")
def test_send_refuses_a_bad_layout_request_or_timeout_then_the_same_session_still_sends(rx: Receiver) -> None:
    req = _req()
    with connect(*rx.address, key="k", lanes=2) as s:
        with pytest.raises(TypeError, match=r"ModelLayout.*load_layout"):
            s.send("qwen3-next-80b-a3b", req)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="RequestSpec"):
            s.send(LAYOUT, "req")  # type: ignore[arg-type]
        for bad, exc in ((-1, ValueError), (0, ValueError), (math.nan, ValueError), (math.inf, ValueError),
                         ("5", TypeError)):
            with pytest.raises(exc, match="timeout"):
                s.send(LAYOUT, req, timeout=bad)  # type: ignore[arg-type]
        for kw in ({"hashing": "yes"}, {"hashing": "false"}, {"hashing": 1}, {"sink": "no"}, {"sink": None}):
            with pytest.raises(TypeError, match=f"{next(iter(kw))} must be True or False"):
                s.send(LAYOUT, req, **kw)  # type: ignore[arg-type]
        assert s.stats()["transfers_in_flight"] == 0  # nothing was started by the refused calls
        send_verified(rx, s, LAYOUT, req)  # the same request id, on the same session


# ------------------------------------------------------------------ Receiver

BAD_RECEIVER: list[tuple[dict[str, Any], type[Exception], str]] = [
    ({"heartbeat": 0}, ValueError, "heartbeat"),
    ({"heartbeat": -0.5}, ValueError, "heartbeat"),
    ({"heartbeat": math.nan}, ValueError, "heartbeat"),
    ({"heartbeat": None}, TypeError, "heartbeat"),
    ({"peer_timeout": 0}, ValueError, "peer_timeout"),
    ({"transfer_timeout": -1}, ValueError, "transfer_timeout"),
    ({"transfer_timeout": math.inf}, ValueError, "transfer_timeout"),
    ({"handshake_timeout": 0}, ValueError, "handshake_timeout"),
    ({"key": 123}, TypeError, "key"),
    ({"port": 70000}, ValueError, "port"),
    ({"port": 65536}, ValueError, "port"),
    ({"port": -1}, ValueError, "port"),
    ({"port": True}, TypeError, "port"),
    ({"port": 1.0}, TypeError, "port"),
    ({"host": None}, TypeError, "host"),
    ({"host": ""}, ValueError, "host"),
    ({"allocator": "alloc"}, TypeError, "allocator"),
    ({"on_transfer": 1}, TypeError, "on_transfer"),
]


@pytest.mark.parametrize(("kw", "exc", "name"), BAD_RECEIVER, ids=lambda v: repr(v) if isinstance(v, dict) else "")
@pytest.mark.usefixtures("no_leaks")
@pytest.mark.filterwarnings("error::ResourceWarning")
def test_receiver_refuses_a_bad_argument_at_construction(kw: dict[str, Any], exc: type[Exception], name: str) -> None:
    args: dict[str, Any] = {"host": "127.0.0.1", "port": 0, **kw}
    with pytest.raises(exc, match=name):
        Receiver(args.pop("host"), args.pop("port"), **args)


@pytest.mark.usefixtures("no_leaks")
def test_receiver_takes_the_valid_values_and_they_work() -> None:
    """The negative control: a bytearray key, a short heartbeat, a numpy port (0: any free one)."""
    with Receiver("127.0.0.1", np.int64(0), key=bytearray(b"k2"), heartbeat=0.2, peer_timeout=5,  # type: ignore[arg-type]
                  transfer_timeout=30, handshake_timeout=2, allocator=None, on_transfer=None) as r:
        assert 0 < r.address[1] <= 65535 and r.key == b"k2"
        with connect(*r.address, key="k2", lanes=2) as s:
            send_verified(r, s, LAYOUT, _req())


@pytest.mark.usefixtures("no_leaks")
def test_an_idle_receiver_with_a_short_heartbeat_does_not_spin() -> None:
    """heartbeat=0 spun the monitor (2.2 CPU-s per 2 s idle); a short valid one costs next to nothing."""
    with Receiver(heartbeat=0.05) as r, connect(*r.address, lanes=1, heartbeat=0.05):
        t0 = time.process_time()
        time.sleep(1.0)
        assert time.process_time() - t0 < 0.5


# ------------------------------------------------------------------ Receiver.expect


@pytest.mark.usefixtures("no_leaks")
def test_expect_refuses_a_bad_request_id_layout_or_timeout_then_the_same_request_lands(rx: Receiver) -> None:
    req = _req()
    need = sum(a.nbytes for a in payload(LAYOUT, req))
    dest = np.empty(need, np.uint8)
    with pytest.raises(TypeError, match="request_id"):
        rx.expect(123, dest)  # type: ignore[arg-type]  # a sender's id is a str: this could never match
    with pytest.raises(TypeError, match="request_id"):
        rx.expect(b"r", dest)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="request_id"):
        rx.expect("", dest)
    with pytest.raises(ValueError, match="request_id"):
        rx.expect("x" * 257, dest)
    with pytest.raises(TypeError, match=r"ModelLayout.*load_layout"):
        rx.expect(req.request_id, dest, layout="qwen3-next-80b-a3b")  # type: ignore[arg-type]
    for bad, exc in ((-1, ValueError), (0, ValueError), (math.nan, ValueError), (math.inf, ValueError),
                     ("2", TypeError)):
        with pytest.raises(exc, match="timeout"):
            rx.expect(req.request_id, dest, timeout=bad)  # type: ignore[arg-type]
    # nothing was registered: the same id is free, and with valid arguments the transfer lands
    with connect(*rx.address, key="k", lanes=2) as s:
        src = payload(LAYOUT, req)
        incoming = rx.expect(req.request_id, dest, layout=LAYOUT, timeout=30)
        out = s.send(LAYOUT, req)
        out.write_all(src)
        out.finish().result(timeout=30)
        incoming.result(timeout=30)
    assert np.array_equal(dest, np.concatenate(src))


@pytest.mark.usefixtures("no_leaks")
def test_expect_on_a_closed_receiver_raises_at_the_call() -> None:
    r = Receiver()
    h = r.expect("before", np.empty(10, np.uint8), timeout=30)  # the control: open, it registers
    assert not h.finished
    r.close()
    assert h.finished and h.state.value == "cancelled"  # ended by close, not left waiting
    with pytest.raises(KvwireError, match="receiver closed"):
        r.expect("x", np.empty(10, np.uint8), timeout=2)
    with pytest.raises(KvwireError, match="receiver closed"):
        r.next_transfer(timeout=1)  # (as before: the same error)


@pytest.mark.usefixtures("no_leaks")
def test_expect_racing_close_either_raises_or_gets_a_handle_that_close_ends() -> None:
    """Every handle ``expect`` returned, however close it ran to ``close()``, is in a terminal state once
    ``close()`` returns; every later call raises."""
    for _ in range(5):
        r = Receiver()
        handles: list[Any] = []
        refused = [0]
        go = threading.Event()

        def register(t: int, r: Receiver = r, handles: list[Any] = handles, refused: list[int] = refused,
                     go: threading.Event = go) -> None:
            go.wait()
            for i in range(100000):
                try:
                    handles.append(r.expect(f"t{t}-{i}", np.empty(8, np.uint8), timeout=60))
                except KvwireError:
                    refused[0] += 1
                    return

        threads = [threading.Thread(target=register, args=(t,)) for t in range(3)]
        for t in threads:
            t.start()
        go.set()
        time.sleep(0.02)
        r.close()
        for t in threads:
            t.join(10)
        assert refused[0] == 3 and handles
        assert all(h.finished for h in handles), [h.request_id for h in handles if not h.finished]


# ------------------------------------------------------------------ plan_segments, load_layout


def test_plan_segments_refuses_what_is_not_a_layout_or_a_request() -> None:
    req = _req()
    with pytest.raises(TypeError, match="RequestSpec"):
        plan_segments(LAYOUT, "req")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"ModelLayout.*load_layout"):
        plan_segments("qwen3-next-80b-a3b", req)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="ModelLayout"):
        plan_segments(None, req)  # type: ignore[arg-type]
    assert sum(s.nbytes for s in plan_segments(LAYOUT, req)) == sum(a.nbytes for a in payload(LAYOUT, req))


@pytest.mark.parametrize("bad", [None, 123, b"qwen3-next-80b-a3b", ["qwen3-next-80b-a3b"]], ids=repr)
def test_load_layout_refuses_what_is_neither_a_name_nor_a_path(bad: object) -> None:
    with pytest.raises(TypeError, match="preset name or a path"):
        load_layout(bad)  # type: ignore[arg-type]


def test_load_layout_still_takes_a_preset_name_and_a_path(tmp_path: Path) -> None:
    assert load_layout(PRESETS[0]).num_layers > 0
    with pytest.raises(LayoutError, match="neither a preset"):
        load_layout(tmp_path / "missing.json")  # a path: the usual LayoutError, not a TypeError


# ------------------------------------------------------------------ handles


@pytest.mark.usefixtures("no_leaks")
def test_handles_refuse_non_callables_and_layers_out_of_range_at_the_call(rx: Receiver) -> None:
    req = _req()
    src = payload(LAYOUT, req)
    dest = np.empty(sum(a.nbytes for a in src), np.uint8)
    with connect(*rx.address, key="k", lanes=2) as s:
        incoming = rx.expect(req.request_id, dest, layout=LAYOUT, timeout=30)
        out = s.send(LAYOUT, req)
        with pytest.raises(TypeError, match="on_layer"):
            incoming.on_layer(5)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="on_layer_acked"):
            out.on_layer_acked("x")  # type: ignore[arg-type]
        t0 = time.monotonic()
        for bad in (999, LAYOUT.num_layers, -1, True, "0", 1.0):
            with pytest.raises(LayoutMismatch, match="not a layer"):
                incoming.wait_layer(bad, timeout=10)  # type: ignore[arg-type]
        assert time.monotonic() - t0 < 1  # at once, not after the timeout
        # the controls: callables are taken, and a layer in range is waited for
        seen: list[int] = []
        acked: list[int] = []
        incoming.on_layer(seen.append)
        out.on_layer_acked(acked.append)
        out.write_all(src)
        last = max(seg.layer for seg in plan_segments(LAYOUT, req))
        incoming.wait_layer(np.int64(last), timeout=30)  # type: ignore[arg-type]
        out.finish().result(timeout=30)
        incoming.result(timeout=30)
    assert np.array_equal(dest, np.concatenate(src))
    layers = sorted({seg.layer for seg in plan_segments(LAYOUT, req)})
    assert wait_until(lambda: sorted(seen) == layers and sorted(acked) == layers, 10), (seen, acked)


def test_a_handle_whose_layout_is_unknown_still_refuses_a_negative_layer_at_once() -> None:
    h = IncomingTransfer("r")  # (no layout: an allocator-placed handle before its manifest)
    with pytest.raises(LayoutMismatch, match="not a layer"):
        h.wait_layer(-1, timeout=10)
    with pytest.raises(TimeoutError):
        h.wait_layer(5, timeout=0.05)  # in range as far as it knows: waited for as before


def test_a_reshard_handle_refuses_a_non_callable_on_layer() -> None:
    h = ReshardIncoming(None, 0, _req())  # type: ignore[arg-type]  # (the plan is not read by on_layer)
    with pytest.raises(TypeError, match="on_layer"):
        h.on_layer(5)  # type: ignore[arg-type]
    h.on_layer(lambda layer: None)


# ------------------------------------------------------------------ the timeouts of the waits

BAD_WAITS: list[tuple[object, type[Exception]]] = [
    ("x", TypeError), (b"1", TypeError), (True, TypeError), ([1], TypeError),
    (math.nan, ValueError), (math.inf, ValueError)]


def _waits(rx: Receiver, incoming: IncomingTransfer, out: Any) -> dict[str, Any]:
    return {"incoming.result": incoming.result, "out.result": out.result,
            "incoming.wait_layer": lambda timeout: incoming.wait_layer(0, timeout=timeout),
            "incoming.layers": incoming.layers, "next_transfer": rx.next_transfer}


@pytest.mark.parametrize(("bad", "exc"), BAD_WAITS, ids=repr)
def test_every_wait_refuses_a_timeout_that_is_not_a_number_at_the_call(
        rx: Receiver, bad: object, exc: type[Exception]) -> None:
    """A str was a TypeError of float arithmetic deep in the wait (``layers``: only at its first ``next``), NaN
    and infinity a lock's ValueError/OverflowError that named nothing; now each names ``timeout``, at once."""
    req = _req()
    src = payload(LAYOUT, req)
    dest = np.empty(sum(a.nbytes for a in src), np.uint8)
    with connect(*rx.address, key="k", lanes=2) as s:
        incoming = rx.expect(req.request_id, dest, layout=LAYOUT, timeout=30)
        out = s.send(LAYOUT, req)
        t0 = time.monotonic()
        for name, wait in _waits(rx, incoming, out).items():
            with pytest.raises(exc, match="timeout") as e:
                wait(bad)
            assert "timeout" in str(e.value), name
        assert time.monotonic() - t0 < 1  # at the call: nothing waited
        assert incoming.state is out.state is State.ACTIVE  # and nothing lost: the transfer goes through
        out.write_all(src)
        out.finish().result(timeout=30)
        incoming.result(timeout=30)
    assert np.array_equal(dest, np.concatenate(src))


def test_a_negative_or_zero_timeout_does_not_wait_and_a_number_or_none_waits() -> None:
    """The contract callers rely on (they pass ``deadline - now``): <= 0 checks once, as before."""
    with Receiver(key="k", allocator=lambda m: np.zeros(m.total_bytes, np.uint8)) as rx, \
            connect(*rx.address, key="k", lanes=2) as s:
        t0 = time.monotonic()
        for t in (-5, -math.inf, 0, np.float64(-0.1), 0.05):
            with pytest.raises(TimeoutError):
                rx.next_transfer(t)  # type: ignore[arg-type]
        assert time.monotonic() - t0 < 2
        req = _req()
        src = payload(LAYOUT, req)
        out = s.send(LAYOUT, req)
        incoming = rx.next_transfer(np.int64(10))  # type: ignore[arg-type]
        for wait in (incoming.result, lambda timeout: incoming.wait_layer(0, timeout=timeout)):
            with pytest.raises(TimeoutError):
                wait(-1)
        out.write_all(src)
        assert sorted(incoming.layers(None)) == sorted({seg.layer for seg in plan_segments(LAYOUT, req)})
        out.finish().result(None)
        assert incoming.result(-1) is incoming  # ended: a wait that does not wait still returns it


# ------------------------------------------------------------------ set_active_lanes

@pytest.mark.usefixtures("no_leaks")
def test_set_active_lanes_refuses_what_is_not_a_lane_count_then_still_sets_one(rx: Receiver) -> None:
    with connect(*rx.address, key="k", lanes=2, max_lanes=3, link_control=False) as s:
        for bad, exc in (("x", TypeError), ("2", TypeError), (2.7, TypeError), (None, TypeError), (True, TypeError),
                         (0, ValueError), (-3, ValueError)):
            with pytest.raises(exc, match="n must be"):
                s.set_active_lanes(bad)  # type: ignore[arg-type]
            assert s.active_lanes == 2  # nothing changed
        assert s.set_active_lanes(np.int64(1)) == 1  # type: ignore[arg-type]
        assert s.set_active_lanes(10**6) == 3  # past max_lanes: clamped, as documented
        send_verified(rx, s, LAYOUT, _req())
