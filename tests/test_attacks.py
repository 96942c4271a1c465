"""Attacks on real loopback sockets: slow-loris and oversized-claim floods before authentication, replayed
lane handshakes, and an authenticated peer sending malformed control messages.

Each prints the number it measures (RSS growth, connect time) so ``pytest -s`` shows it."""

from __future__ import annotations

import gc
import socket
import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest
import xxhash
from helpers import next_control, payload, raw_sender, wait_until

from kvwire import Receiver, State, connect, plan_segments
from kvwire.codec import frames as F
from kvwire.errors import KvwireError
from kvwire.testing.decoder import ControlFrame, FrameDecoder
from kvwire.testing.fixtures import default_request, load_fixture


def rss() -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


class Loris:
    """``n`` connections that each send ``first`` and then one more byte every ``period`` s."""

    def __init__(self, address: tuple[str, int], n: int, first: bytes, period: float) -> None:
        self.socks: list[socket.socket] = []
        self._stop = threading.Event()
        for _ in range(n):
            c = socket.create_connection(address)
            try:
                c.sendall(first)
            except OSError:
                pass
            self.socks.append(c)
        self._t = threading.Thread(target=self._drip, args=(period,), daemon=True)
        self._t.start()

    def _drip(self, period: float) -> None:
        while not self._stop.wait(period):
            for c in self.socks:
                try:
                    c.send(b"\0")
                except OSError:
                    pass

    def close(self) -> None:
        self._stop.set()
        self._t.join()
        for c in self.socks:
            c.close()


@pytest.fixture
def small() -> Iterator[tuple]:  # type: ignore[type-arg]
    layout = load_fixture("tiny-llama")
    req = default_request("legit")
    yield layout, req, payload(layout, req)


def _send_one(address: tuple[str, int], rx: Receiver, small: tuple, key: str = "k") -> None:  # type: ignore[type-arg]
    layout, req, src = small
    dst = np.zeros(sum(s.nbytes for s in plan_segments(layout, req)), np.uint8)
    h_rx = rx.expect(req.request_id, dst, layout=layout)
    with connect(*address, key=key, lanes=4, connect_timeout=5) as s:
        h = s.send(layout, req)
        h.write_all(src)
        h.finish().result(10)
    h_rx.result(10)
    assert dst.tobytes() == b"".join(a.tobytes() for a in src)


def test_slow_loris_handshakes_do_not_keep_a_client_out(small: tuple, no_leaks: None) -> None:  # type: ignore[type-arg]
    """128 connections trickling a header one byte every 3 s (default max_handshakes=128): a
    legitimate client on the same source address still connects and transfers within 2 s."""
    with Receiver(key="k") as rx:
        loris = Loris(rx.address, 128, F.MAGIC[:1], period=3.0)
        try:
            t0 = time.monotonic()
            _send_one(rx.address, rx, small)
            took = time.monotonic() - t0
            print(f"\nlegit connect+transfer under 128 slow handshakes: {took:.3f} s; "
                  f"handshakes cut: {rx.stats()['handshakes_cut']}")
            assert took < 2.0
        finally:
            loris.close()


def test_handshake_deadline_is_total_not_per_read(no_leaks: None) -> None:
    """A peer that sends a byte every 0.3 s never trips a 1 s per-read timeout; the total deadline cuts it."""
    with Receiver(key="k", handshake_timeout=1.0) as rx:
        loris = Loris(rx.address, 1, F.MAGIC[:1], period=0.3)
        try:
            c = loris.socks[0]
            c.settimeout(6.0)
            t0 = time.monotonic()
            try:
                while c.recv(4096):
                    pass
            except (ConnectionResetError, TimeoutError):
                pass
            took = time.monotonic() - t0
            assert took < 3.0, f"slow handshake lived {took:.1f} s"
        finally:
            loris.close()


def test_oversized_claims_before_auth_allocate_nothing(no_leaks: None) -> None:
    """128 connections each send a valid control header claiming a 4 MiB body, then 64 KiB of it:
    nothing is allocated for them (the limit before authentication is a few KiB)."""
    head = F.pack_header(F.KIND_CONTROL, 0, 0, 0, 0, 4 * 1024 * 1024, 0)
    with Receiver(key="k") as rx:
        grown = _rss_growth_under_claims(rx.address, head)
        print(f"\nRSS growth after 128 x 4 MiB pre-auth claims: {grown / 2**20:.1f} MiB")
        assert grown < 32 * 2**20


def _rss_growth_under_claims(address: tuple[str, int], head: bytes) -> int:
    """RSS growth while 128 connections each send ``head`` (claiming a 4 MiB body) and 64 KiB of it."""
    gc.collect()
    before = rss()
    socks = []
    try:
        for _ in range(128):
            c = socket.create_connection(address)
            socks.append(c)
            try:
                c.sendall(head + b"\xa5" * 65536)
            except OSError:
                pass
        time.sleep(0.5)
        return rss() - before
    finally:
        for c in socks:
            c.close()


class RecordingProxy:
    """A TCP proxy that records every byte each client connection sent, in connection order."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = self.listener.getsockname()[:2]
        self.sent: list[bytearray] = []
        self._socks: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._spawn(self._accept)

    def _spawn(self, fn, *args) -> None:  # type: ignore[no-untyped-def]
        t = threading.Thread(target=fn, args=args, daemon=True)
        self._threads.append(t)
        t.start()

    def _accept(self) -> None:
        while True:
            try:
                c, _ = self.listener.accept()
            except OSError:
                return
            u = socket.create_connection(self.target)
            rec = bytearray()
            self.sent.append(rec)
            self._socks += [c, u]
            self._spawn(self._pump, c, u, rec)
            self._spawn(self._pump, u, c, None)

    @staticmethod
    def _pump(a: socket.socket, b: socket.socket, rec: bytearray | None) -> None:
        try:
            while data := a.recv(65536):
                if rec is not None:
                    rec += data
                b.sendall(data)
        except OSError:
            pass
        for s in (a, b):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self) -> None:
        self.listener.close()
        for s in self._socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for t in self._threads:
            t.join(5)
        for s in self._socks:
            s.close()


def _frames(raw: socket.socket, timeout: float) -> list[str]:
    """Control message kinds the peer sends until it closes (or ``timeout``)."""
    dec = FrameDecoder()
    kinds: list[str] = []
    raw.settimeout(timeout)
    try:
        while data := raw.recv(65536):
            kinds += [f.kind for f in dec.feed(data) if isinstance(f, ControlFrame)]
    except (OSError, F.ProtocolError):
        pass
    return kinds


def test_replayed_lane_handshake_is_refused(no_leaks: None) -> None:
    """Someone who saw a lane's handshake replays it and then writes a forged chunk: refused, the live lane
    is untouched, and every layer reported ready holds the sender's bytes."""
    layout = load_fixture("tiny-llama")
    req = default_request("victim")
    src = payload(layout, req)
    flat = b"".join(a.tobytes() for a in src)
    dst = np.zeros(len(flat), np.uint8)
    with Receiver(key="k") as rx:
        proxy = RecordingProxy(rx.address)
        try:
            with connect(*proxy.address, key="k", lanes=1) as s:
                assert wait_until(lambda: len(proxy.sent) == 2 and len(proxy.sent[1]) > 0, 5)
                time.sleep(0.2)  # the whole lane handshake has gone through
                captured = bytes(proxy.sent[1])
                h_rx = rx.expect(req.request_id, dst, layout=layout)
                seen: dict[int, bytes] = {}
                segs = plan_segments(layout, req)
                offs = np.cumsum([0] + [x.nbytes for x in segs])

                def on_layer(layer: int) -> None:
                    idx = [i for i, x in enumerate(segs) if x.layer == layer]
                    seen[layer] = dst[offs[idx[0]]:offs[idx[-1] + 1]].tobytes()

                h_rx.on_layer(on_layer)
                out = s.send(layout, req)
                assert wait_until(lambda: h_rx.manifest is not None, 5)
                assert h_rx.plan is not None and h_rx.manifest is not None
                tid = h_rx.manifest.transfer_id
                # the replay, straight to the receiver, then a forged chunk 0 with its own valid hash
                with socket.create_connection(rx.address) as evil:
                    evil.sendall(captured)
                    n = h_rx.plan.lengths[0]
                    forged = b"\x66" * n
                    try:
                        evil.sendall(F.pack_data_header(tid, 0, h_rx.plan.layers[0], h_rx.plan.offsets[0], n,
                                                        xxhash.xxh3_64_intdigest(forged)) + forged)
                    except OSError:
                        pass
                    kinds = _frames(evil, 3.0)
                assert F.WELCOME not in kinds, f"replayed lane handshake accepted: {kinds}"
                assert s.alive_lanes == 1 and s.stats()["lane_reconnects"] == 0
                assert rx.stats()["lanes"] == 1
                out.write_all(src)
                out.finish().result(10)
                h_rx.result(10)
                assert dst.tobytes() == flat
                # on_layer callbacks run on the receiver's callback pool: queued before the outcome, but result()
                # may return before the pool has run them (seen once under load); every layer must be reported
                assert wait_until(lambda: len(seen) == layout.num_layers, 10), sorted(seen)
                for layer, got in seen.items():
                    idx = [i for i, x in enumerate(segs) if x.layer == layer]
                    assert got == flat[offs[idx[0]]:offs[idx[-1] + 1]], f"layer {layer} ready with foreign bytes"
                assert h_rx.state is State.DONE
        finally:
            proxy.close()


# ---------------------------------------------------------------- the bench's control port


def test_bench_control_port_allocates_nothing_for_unauthenticated_claims(bench_server: tuple[str, int]) -> None:
    grown = _rss_growth_under_claims(bench_server, F.pack_header(F.KIND_CONTROL, 0, 0, 0, 0, 4 * 1024 * 1024, 0))
    print(f"\nbench control port: RSS growth after 128 x 4 MiB pre-auth claims: {grown / 2**20:.1f} MiB")
    assert grown < 32 * 2**20


def test_bench_control_port_serves_a_client_under_slow_handshakes(bench_server: tuple[str, int]) -> None:
    from kvwire.bench.control import MAGIC, client_connect

    loris = Loris(bench_server, 128, MAGIC[:1], period=3.0)
    try:
        t0 = time.monotonic()
        ch, welcome = client_connect(*bench_server, b"k", timeout=2.0)
        took = time.monotonic() - t0
        ch.close()
        print(f"\nbench control handshake under 128 slow handshakes: {took:.3f} s")
        assert welcome["op"] == "welcome" and took < 2.0
    finally:
        loris.close()


def test_bench_control_port_bounds_connections(bench_server: tuple[str, int]) -> None:
    """200 idle connections: at most MAX_CONTROL_CONNECTIONS handler threads, and a client still gets in."""
    from kvwire.bench.control import client_connect
    from kvwire.bench.server import MAX_CONTROL_CONNECTIONS

    socks = [socket.create_connection(bench_server) for _ in range(200)]
    try:
        time.sleep(0.5)
        handlers = sum(1 for t in threading.enumerate() if t.name == "kvwire-bench-ctl")
        print(f"\nbench control handler threads for 200 idle connections: {handlers}")
        assert handlers <= MAX_CONTROL_CONNECTIONS
        ch, _ = client_connect(*bench_server, b"k", timeout=2.0)
        ch.close()
    finally:
        for c in socks:
            c.close()


def test_bench_control_port_refuses_a_kvwire_session_with_the_same_key(bench_server: tuple[str, int]) -> None:
    """The bench's control channel speaks kvwire's framing and handshake, so a kvwire session holding the same
    key gets through the handshake; it must still fail at once (its lanes are refused, the bench's messages
    are not its protocol), and the bench server go on serving bench clients."""
    from kvwire.bench.control import client_connect

    t0 = time.monotonic()
    with pytest.raises((KvwireError, OSError)):  # its lane is cut: the peer closed the connection
        s = connect(*bench_server, key="k", lanes=1, connect_timeout=2.0, link_control=False)
        s.close()
    assert time.monotonic() - t0 < 5.0
    # the session's control connection held the server's one test slot until the server read its close;
    # a bench client arriving at once waits for that (server.SLOT_WAIT) and gets in
    ch, welcome = client_connect(*bench_server, b"k", timeout=5.0)
    ch.close()
    assert welcome["service"] == "kvwire-bench"


# ---------------------------------------------------------------- an authenticated peer sends malformed messages


@pytest.mark.parametrize("kind,body", [
    (F.CANCEL, {"tid": [1], "reason": "x"}),
    (F.CANCEL, {"tid": {"a": 1}, "reason": "x"}),
    (F.CANCEL, {"tid": 5, "reason": ["x"]}),
    (F.CANCEL, {"tid": 5, "state": 3}),
    (F.DONE, {"tid": [1], "digest": 1}),
    (F.DONE, {"tid": 1, "digest": "d"}),
    (F.DONE, {"tid": {"x": [1]}, "digest": 1}),
])
def test_malformed_control_message_ends_the_session_cleanly(kind: str, body: dict, uncaught: list,  # type: ignore[type-arg]
                                                            no_leaks: None) -> None:
    with Receiver(key="k") as rx:
        raw, ch, _, _ = raw_sender(rx.address, b"k")
        with raw:
            assert wait_until(lambda: rx.sessions == 1, 2)
            ch.send(kind, body)
            got, reply = next_control(ch)
            assert got == F.ERROR and ("must be" in reply["reason"] or "unknown state" in reply["reason"]), reply
            assert wait_until(lambda: rx.sessions == 0, 2), "session left to the peer-silence monitor"
        assert uncaught == []


def test_a_control_frame_of_tiny_containers_ends_the_session_and_the_receiver_serves_on(
        small: tuple, uncaught: list, no_leaks: None) -> None:  # type: ignore[type-arg]
    """An authenticated peer's 3.7 MiB BEGIN of 3.7 million empty lists made the receiver's control thread
    build ~260 MiB of them before the manifest was even looked at. It is the usual ProtocolError now: the
    receiver answers ERROR, closes that session (not left to the silence monitor) and serves the next."""
    with Receiver(key="k") as rx:
        raw, ch, _, _ = raw_sender(rx.address, b"k")
        with raw:
            assert wait_until(lambda: rx.sessions == 1, 2)
            ch.send(F.BEGIN, {f"k{i}": [[]] * (1 << 19) for i in range(7)})
            kind, body = next_control(ch)
            assert kind == F.ERROR and "more than 35840 maps and arrays" in body["reason"], body
            assert wait_until(lambda: rx.sessions == 0, 2), "session left to the peer-silence monitor"
            raw.settimeout(5)  # the connection is closed after the ERROR (a timeout here: it was not)
            while raw.recv(1 << 16):
                pass
        _send_one(rx.address, rx, small)  # negative control: the receiver serves an honest sender on
        assert uncaught == []


def test_a_receivers_control_frame_of_tiny_containers_fails_the_senders_session(
        small: tuple, uncaught: list, no_leaks: None) -> None:  # type: ignore[type-arg]
    """The other way: a receiver's HEARTBEAT of 3.7 million empty lists. The sender's control loop refuses it
    (the codec's ProtocolError), its session fails naming it, and the transfer in flight ends failed, once."""
    layout, req, _ = small
    with Receiver(key="k") as rx, connect(*rx.address, key="k", lanes=1, link_control=False) as s:
        h_rx = rx.expect(req.request_id, np.zeros(sum(x.nbytes for x in plan_segments(layout, req)), np.uint8),
                         layout=layout)
        out = s.send(layout, req)  # its bytes are never written: it is in flight when the frame comes
        (session,) = rx._sessions.values()
        session.send(F.HEARTBEAT, {f"k{i}": [[]] * (1 << 19) for i in range(7)})
        assert wait_until(lambda: s.closed, 5), "the sender's session outlived the frame"
        assert "more than 35840 maps and arrays" in s.failure, s.failure
        with pytest.raises(KvwireError, match="maps and arrays"):
            out.result(5)
        assert out.state is State.FAILED and not out.resolve(State.DONE)
        with pytest.raises(KvwireError):  # the receiver's side of it ends too: the sender closed the connection
            h_rx.result(10)
    assert uncaught == []


@pytest.mark.parametrize("field,value", [("tp_size", 1e300), ("tp_size", 2**63), ("block_size", 1e300),
                                         ("name", [1]), ("tp_rank", True), ("page_layout", {})])
def test_malformed_layout_in_begin_is_rejected_and_the_session_serves_on(field: str, value: object,
                                                                         uncaught: list,  # type: ignore[type-arg]
                                                                         no_leaks: None) -> None:
    from kvwire.codec.manifest import build_manifest

    layout = load_fixture("tiny-llama")
    with Receiver(key="k", allocator=lambda m: bytearray(m.total_bytes)) as rx:
        raw, ch, _, _ = raw_sender(rx.address, b"k")
        with raw:
            wire = build_manifest(7, layout, default_request("bad"), 1 << 20).to_wire(with_layout=True)
            wire["layout"][field] = value
            ch.send(F.BEGIN, wire)
            kind, body = next_control(ch)
            assert kind == F.REJECT and body["tid"] == 7, body
            assert field in body["reason"] or "strings" in body["reason"], body
            for tid in ([7], {"a": 1}):  # a malformed id is refused the same way
                ch.send(F.BEGIN, {**wire, "tid": tid})
                kind, body = next_control(ch)
                assert kind == F.REJECT and body["tid"] is None
            good = build_manifest(8, layout, default_request("good"), 1 << 20).to_wire(with_layout=True)
            ch.send(F.BEGIN, good)
            assert next_control(ch) == (F.ACCEPT, {"tid": 8})
        assert uncaught == []


# ---------------------------------------------------------------- metadata counts


def _zero_begin(tid: int, rid: str, nseg: int) -> dict:  # type: ignore[type-arg]
    """A manifest with no layout and ``nseg`` empty segments spread over 1024 layers."""
    req = default_request(rid).to_dict()
    per = max(1, nseg // 1024)
    return {"v": 1, "tid": tid, "fp": b"\1" * 16, "req": req, "chunk": 1 << 20, "hash": "xxh3_64",
            "seg": [[i // per, 0, 0, 0, 0, 0] for i in range(nseg)]}


def test_zero_payload_transfers_of_many_segments_hold_no_memory(uncaught: list, no_leaks: None) -> None:  # type: ignore[type-arg]
    """40 BEGINs of 32,768 empty segments each (main before the bound: 65,536, accepted, +975 MiB RSS, seconds
    of CPU each) are rejected; one of 65,536 decodes into more maps and arrays than any legal message and
    ends the session (Limits.max_control_containers)."""
    with Receiver(key="k", allocator=lambda m: bytearray(m.total_bytes)) as rx:
        raw, ch, _, _ = raw_sender(rx.address, b"k")
        with raw:
            gc.collect()
            before, t0 = rss(), time.monotonic()
            replies = []
            begin = _zero_begin(0, "z", 32768)
            for n in range(40):
                ch.send(F.BEGIN, {**begin, "tid": n, "req": {**begin["req"], "request_id": f"z{n}"}})
                replies.append(next_control(ch)[0])
                ch.send(F.HEARTBEAT)
            took = time.monotonic() - t0
            gc.collect()
            grown = rss() - before
            print(f"\n40 x 32,768-segment BEGINs: {took:.2f} s, RSS +{grown / 2**20:.1f} MiB, replies {set(replies)}")
            assert replies == [F.REJECT] * 40
            assert grown < 64 * 2**20
            ch.send(F.BEGIN, _zero_begin(40, "z40", 65536))
            kind, body = next_control(ch)
            assert kind == F.ERROR and "maps and arrays" in body["reason"], body
            assert wait_until(lambda: rx.sessions == 0, 2)
    assert uncaught == []


def test_metadata_is_charged_against_inflight_bytes(no_leaks: None) -> None:
    """Registered zero-payload transfers of 4,096 segments: their metadata fills max_inflight_bytes."""
    from kvwire.codec.manifest import parse_manifest

    cost = parse_manifest(_zero_begin(0, "x", 4096)).metadata_bytes
    with Receiver(key="k", max_inflight_bytes=4 * cost + 1) as rx:
        handles = [rx.expect(f"z{n}", bytearray(0)) for n in range(6)]
        raw, ch, _, _ = raw_sender(rx.address, b"k")
        with raw:
            replies = []
            for n in range(6):
                ch.send(F.BEGIN, _zero_begin(n, f"z{n}", 4096))
                replies.append(next_control(ch))
            # while the session lives: closing it ends the accepted transfers
            assert [h.state for h in handles[:4]] == [State.ACTIVE] * 4
        assert [k for k, _ in replies] == [F.ACCEPT] * 4 + [F.REJECT] * 2
        assert "busy" in replies[4][1]["reason"]


def test_allocator_is_never_asked_for_a_layoutless_manifest(no_leaks: None) -> None:
    asked: list[int] = []
    with Receiver(key="k", allocator=lambda m: asked.append(m.total_bytes) or bytearray(0)) as rx:
        raw, ch, _, _ = raw_sender(rx.address, b"k")
        with raw:
            begin = _zero_begin(1, "big", 2)
            begin["seg"][0][3] = 1 << 30  # 1 GiB that no layout justifies
            ch.send(F.BEGIN, begin)
            kind, body = next_control(ch)
        assert kind == F.REJECT and "layout" in body["reason"]
    assert asked == []


def test_chunk_plan_of_many_segments_is_linear() -> None:
    from kvwire.codec.manifest import parse_manifest
    from kvwire.codec.plan import plan_chunks

    m = parse_manifest(_zero_begin(0, "x", 65536), F.Limits(max_segments=65536))
    t0 = time.process_time()
    plan_chunks(m.segments, m.chunk_size)
    took = time.process_time() - t0
    print(f"\nplan of 65,536 segments over 1,024 layers: {took * 1000:.0f} ms CPU")
    assert took < 1.0  # main: quadratic, several seconds


def test_idle_connections_to_the_metrics_port_hold_nothing(no_leaks: None) -> None:
    """100 idle connections to the metrics port: at most MAX_SCRAPES handler threads, and a scrape still
    gets its answer."""
    import urllib.request

    from kvwire.metrics import MAX_SCRAPES, Metrics

    server = Metrics().serve("127.0.0.1", 0)
    socks = []
    try:
        socks = [socket.create_connection(server.address) for _ in range(100)]
        time.sleep(0.5)
        handlers = sum(1 for t in threading.enumerate() if t.name == "kvwire-scrape" or "process_request" in t.name)
        print(f"\nmetrics handler threads for 100 idle connections: {handlers}")
        assert handlers <= MAX_SCRAPES
        t0 = time.monotonic()
        with urllib.request.urlopen(f"http://127.0.0.1:{server.address[1]}/metrics", timeout=5) as r:
            assert r.status == 200
        assert time.monotonic() - t0 < 2.0
    finally:
        for c in socks:
            c.close()
        server.close()


def test_a_server_that_dribbles_its_handshake_fails_connect_in_time(no_leaks: None) -> None:
    """A 'receiver' that answers HELLO with a valid CHALLENGE one byte every 0.2 s: connect(connect_timeout=1)
    fails within a few seconds, not after every byte has trickled in."""
    from kvwire import connect as kv_connect

    srv = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve() -> None:
        c, _ = srv.accept()
        with c:
            frame = F.encode_control(F.CHALLENGE, {"session": b"s" * 16, "nonce": b"n" * 16})
            for i in range(len(frame)):
                if stop.wait(0.2):
                    return
                try:
                    c.send(frame[i:i + 1])
                except OSError:
                    return

    t = threading.Thread(target=serve)
    t.start()
    t0 = time.monotonic()
    try:
        with pytest.raises((OSError, F.ProtocolError)):
            kv_connect("127.0.0.1", srv.getsockname()[1], connect_timeout=1.0)
        took = time.monotonic() - t0
        assert took < 3.0, f"connect waited {took:.1f} s for a dribbling server"
    finally:
        stop.set()
        t.join()
        srv.close()


# ---------------------------------------------------------------- session-wide bounds under concurrency


def test_handshakes_that_began_together_do_not_pass_max_sessions(no_leaks: None) -> None:
    """HELLO on six connections first, then each handshake finished: every one had read the table below
    ``max_sessions`` (main: 3 sessions with ``max_sessions=1``). The bound is checked again as a session
    registers; the ones past it get ERROR after authenticating. Negative control: a bound of 6 takes all."""
    from kvwire.codec.handshake import ClientHandshake
    from kvwire.tcp._wire import Channel

    def open_six(bound: int) -> tuple[int, int, list[str]]:
        with Receiver(key="k", max_sessions=bound) as rx:
            chans = []
            try:
                for _ in range(6):
                    ch = Channel(socket.create_connection(rx.address), F.DEFAULT_LIMITS)
                    chans.append(ch)
                    hs = ClientHandshake(b"k", 1)
                    ch.send(*hs.hello())
                    chans[-1].hs = hs  # type: ignore[attr-defined]
                opened, errors = 0, []
                for ch in chans:
                    for _ in range(2):  # CHALLENGE, then WELCOME (or ERROR)
                        kind, body = ch.read_control()
                        if kind == F.ERROR:
                            errors.append(str(body.get("reason")))
                            break
                        for k, b in ch.hs.receive(kind, body):  # type: ignore[attr-defined]
                            ch.send(k, b)
                    else:
                        opened += 1
                wait_until(lambda: rx.sessions == opened, 5)
                return opened, rx.sessions, errors
            finally:
                for ch in chans:
                    ch.close()

    opened, live, errors = open_six(1)
    assert (opened, live) == (1, 1) and len(errors) == 5 and all("too many sessions" in e for e in errors), errors
    assert open_six(6)[:2] == (6, 6)  # negative control


def test_transfers_admitted_together_do_not_pass_max_inflight_bytes(no_leaks: None) -> None:
    """Four sessions' BEGINs at once, a slow allocator (0.5 s, as GPU memory can be), room for one transfer
    and a half: each had read the bound free while the others' allocators ran (main: all four accepted, 2.7x
    the bound allocated). What a transfer holds is reserved as it is checked. Negative control: room for
    all four accepts all four."""
    from kvwire.codec.manifest import build_manifest

    layout = load_fixture("tiny-llama")
    size = build_manifest(1, layout, default_request("r"), 1 << 20).total_bytes

    def four(room: float) -> tuple[list[str], int]:
        allocated: list[int] = []
        lock = threading.Lock()

        def alloc(m: object) -> bytearray:
            time.sleep(0.5)
            with lock:
                allocated.append(m.total_bytes)  # type: ignore[attr-defined]
            return bytearray(m.total_bytes)  # type: ignore[attr-defined]

        with Receiver(key="k", allocator=alloc, max_inflight_bytes=int(size * room)) as rx:
            peers = [raw_sender(rx.address, b"k") for _ in range(4)]
            try:
                for i, (_, ch, _, _) in enumerate(peers):
                    ch.send(F.BEGIN, build_manifest(1, layout, default_request(f"r{i}"), 1 << 20)
                            .to_wire(with_layout=True))
                replies = [next_control(ch) for _, ch, _, _ in peers]
            finally:
                for raw, *_ in peers:
                    raw.close()
        assert all(k == F.ACCEPT or "busy" in b["reason"] for k, b in replies), replies
        return [k for k, _ in replies], sum(allocated)

    kinds, allocated = four(1.5)
    assert kinds.count(F.ACCEPT) == 1 and allocated <= 1.5 * size, (kinds, allocated)
    assert four(4.5)[0] == [F.ACCEPT] * 4  # negative control


def _big_layout(rank: int, tensors: int) -> dict:  # type: ignore[type-arg]
    """A layout of ``tensors`` one-byte tensors (16 a cache, 4 caches a layer), one per ``rank``."""
    t = ["", [1], "uint8", "raw", "token", False, []]
    layers, left = [], tensors
    while left:
        caches = []
        while left and len(caches) < 4:
            n = min(16, left)
            caches.append(["gqa", 0, [t] * n])
            left -= n
        layers.append(caches)
    return {"name": "", "tp_size": 1 << 16, "tp_rank": rank, "block_size": 16, "page_layout": "block_major",
            "layers": layers}


def _teaching_begin(tid: int, layout: dict) -> dict:  # type: ignore[type-arg]
    """A BEGIN with no segments that carries (teaches) ``layout``."""
    from kvwire.codec.layout import ModelLayout

    fp = ModelLayout.from_dict(layout).fingerprint()
    return {"v": 1, "tid": tid, "fp": fp, "req": {"request_id": f"t{tid}", "num_tokens": 1, "state_position": 0},
            "seg": [], "chunk": 1 << 20, "hash": "xxh3_64", "layout": layout}


def test_a_layout_may_describe_no_more_tensors_than_a_manifest_carries_segments(uncaught: list,  # type: ignore[type-arg]
                                                                                 no_leaks: None) -> None:
    """A layout of 65,536 tensors fit one 1.5 MB BEGIN, took a second of the control thread to parse and held
    30 MiB once parsed (a session kept 256 of them: ``test_rxengine``'s layout tests bound what it keeps).
    One of twice the bound is refused before a tensor is built; the session serves on. Negative control: a
    layout at the bound is parsed (and refused only for want of a destination). The 65,536-tensor one decodes
    into more maps and arrays than any legal message (Limits.max_control_containers): it ends the session."""
    cap = F.DEFAULT_LIMITS.max_segments
    with Receiver(key="k") as rx:
        raw, ch, _, _ = raw_sender(rx.address, b"k")
        with raw:
            t0 = time.process_time()
            ch.send(F.BEGIN, _teaching_begin(1, _big_layout(0, 2 * cap)))
            kind, body = next_control(ch)
            assert kind == F.REJECT and f"more than {cap} tensors" in body["reason"], body
            ch.send(F.BEGIN, _teaching_begin(2, _big_layout(0, cap)))
            kind, body = next_control(ch)
            took = time.process_time() - t0
            print(f"\nrefused a {2 * cap}-tensor layout, parsed a {cap}-tensor one: {took:.2f} s CPU")
            assert kind == F.REJECT and "no destination" in body["reason"], body
            ch.send(F.BEGIN, _teaching_begin(3, _big_layout(0, 16 * cap)))
            kind, body = next_control(ch)
            assert kind == F.ERROR and "maps and arrays" in body["reason"], body
            assert wait_until(lambda: rx.sessions == 0, 2)
    assert uncaught == []
