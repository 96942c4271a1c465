"""Faults on real sockets and real processes: dead lanes, corrupt chunks, killed and frozen peers,
garbage, oversized claims, wrong keys, TLS. Run 20 times with KVWIRE_FAULT_REPEAT=20."""

from __future__ import annotations

import os
import signal
import socket
import ssl
import struct
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import payload, peer, wait_until

from kvwire import KvwireError, Receiver, RequestSpec, State, TransferFailed, connect, plan_segments
from kvwire.codec import frames as F
from kvwire.errors import AuthenticationError, ProtocolError
from kvwire.testing.faults import ChunkHook
from kvwire.testing.fixtures import default_request, fixture_payload, load_fixture

REPEAT = range(int(os.environ.get("KVWIRE_FAULT_REPEAT", "1")))
CHUNK = 64 * 1024


def _big_request(rid: str) -> tuple:  # type: ignore[type-arg]
    layout = load_fixture("tiny-qwen3-next")
    req = RequestSpec(rid, 6000, 6000)  # ~6 MiB: about a hundred 64 KiB chunks
    return layout, req, payload(layout, req, seed=len(rid))


def _total(layout, req) -> int:  # type: ignore[no-untyped-def]
    return sum(s.nbytes for s in plan_segments(layout, req))


@pytest.mark.parametrize("rep", REPEAT)
@pytest.mark.parametrize("side", ["sender", "receiver"])
def test_lane_killed_mid_transfer_is_survived(side: str, rep: int, no_leaks: None) -> None:
    layout, req, src = _big_request(f"lane-{side}")
    dst = np.zeros(_total(layout, req), np.uint8)
    with Receiver() as rx, connect(*rx.address, lanes=3, chunk_size=CHUNK) as s:
        h_rx = rx.expect(req.request_id, dst, layout=layout)
        killed = threading.Event()

        def hook(lane: int, tid: int, chunk: int, pieces: list) -> None:  # type: ignore[type-arg]
            if chunk == 20 and not killed.is_set():
                killed.set()
                if side == "sender":
                    s.lanes[lane].ch.sock.shutdown(socket.SHUT_RDWR)
                else:
                    sess = rx.live_sessions()[0]
                    for ch in list(sess.lanes.values()):
                        ch.close()  # the receiver drops every lane at once
            return None

        s.chunk_stage = ChunkHook(hook)
        h = s.send(layout, req)
        h.write_all(src)
        h.finish().result(30)
        h_rx.result(30)
        assert killed.is_set()
        assert wait_until(lambda: s.alive_lanes == 3, 10)
    assert dst.tobytes() == b"".join(a.tobytes() for a in src)


def test_lanes_cut_as_soon_as_they_open_back_off_then_are_given_up(no_leaks: None) -> None:
    """Every lane dies at its first chunk (a receiver that drops each new lane, as a trial's did): each re-dial
    waits longer (0.05 s doubling to 1 s) and a lane cut MAX_QUICK_DEATHS times in a row is given up, so the
    session fails "every lane is down" and the transfer (no deadline) ends. Before: 7,323 re-dials in 5 s and
    a transfer with timeout=None that never ended."""
    from kvwire.tcp._lanes import MAX_QUICK_DEATHS

    layout, req, src = _big_request("cut-at-once")
    with Receiver() as rx, connect(*rx.address, lanes=2, chunk_size=CHUNK, link_control=False) as s:
        rx.expect(req.request_id, np.zeros(_total(layout, req), np.uint8), layout=layout)

        def hook(lane: int, tid: int, chunk: int, pieces: list) -> None:  # type: ignore[type-arg]
            raise ConnectionResetError("cut by the test")

        s.chunk_stage = ChunkHook(hook)
        t0 = time.monotonic()
        h = s.send(layout, req, timeout=None)
        h.write_all(src)
        h.finish()
        with pytest.raises(TransferFailed, match="every lane is down"):
            h.result(60)
        took, redials = time.monotonic() - t0, s.stats()["lane_reconnects"]
    print(f"\nlanes cut at once: the transfer failed after {took:.1f} s and {redials} re-dials")
    assert redials <= 2 * (MAX_QUICK_DEATHS + 1) and took < 30


def test_lanes_cut_a_few_times_at_first_recover_and_the_transfer_completes(no_leaks: None) -> None:
    """The control: each lane dies at its first 3 chunks, then carries: the backoff delays it, the transfer
    completes verified."""
    layout, req, src = _big_request("cut-thrice")
    dst = np.zeros(_total(layout, req), np.uint8)
    cuts: dict[int, int] = {}
    with Receiver() as rx, connect(*rx.address, lanes=2, chunk_size=CHUNK, link_control=False) as s:
        h_rx = rx.expect(req.request_id, dst, layout=layout)

        def hook(lane: int, tid: int, chunk: int, pieces: list) -> None:  # type: ignore[type-arg]
            if cuts.get(lane, 0) < 3:
                cuts[lane] = cuts.get(lane, 0) + 1
                raise ConnectionResetError("cut by the test")

        s.chunk_stage = ChunkHook(hook)
        h = s.send(layout, req, timeout=None)
        h.write_all(src)
        h.finish().result(60)
        h_rx.result(30)
    assert dst.tobytes() == b"".join(a.tobytes() for a in src) and cuts == {0: 3, 1: 3}


@pytest.mark.parametrize("rep", REPEAT)
def test_corrupt_chunk_is_nacked_and_resent(rep: int, no_leaks: None) -> None:
    layout, req, src = _big_request("corrupt")
    dst = np.zeros(_total(layout, req), np.uint8)
    corrupted: list[int] = []
    with Receiver() as rx, connect(*rx.address, lanes=2, chunk_size=CHUNK) as s:
        h_rx = rx.expect(req.request_id, dst)

        def hook(lane: int, tid: int, chunk: int, pieces: list) -> list | None:  # type: ignore[type-arg]
            if chunk in (5, 17) and chunk not in corrupted:
                corrupted.append(chunk)
                bad = bytearray(pieces[0])
                bad[len(bad) // 2] ^= 0x40  # one bit flipped in flight
                return [memoryview(bad), *pieces[1:]]
            return None

        s.chunk_stage = ChunkHook(hook)
        h = s.send(layout, req)
        h.write_all(src)
        h.finish().result(30)
        h_rx.result(30)
        assert h.retries(5) == 1 and h.retries(17) == 1
        assert h_rx.machine is not None and h_rx.machine.bad_chunks == 2
    assert dst.tobytes() == b"".join(a.tobytes() for a in src)


def test_a_last_chunk_corrupt_after_the_early_done_is_resent_and_the_transfer_completes(no_leaks: None) -> None:
    """The receiver holds an early DONE (its WELCOME says so): the DONE goes out with the last chunk's
    first copy, which arrives corrupt; the receiver NACKs it, still holding the DONE, and completes on the
    re-sent copy (a DONE it did not hold would fail the transfer with a chunk unverified)."""
    layout, req, src = _big_request("late-bad")
    dst = np.zeros(_total(layout, req), np.uint8)
    corrupted: list[int] = []
    with Receiver() as rx, connect(*rx.address, lanes=2, chunk_size=CHUNK) as s:
        assert s.server_limits["done_early"] is True
        h_rx = rx.expect(req.request_id, dst)
        h = s.send(layout, req)
        last = h.plan.num_chunks - 1

        def hook(lane: int, tid: int, chunk: int, pieces: list) -> list | None:  # type: ignore[type-arg]
            if chunk == last and not corrupted:
                corrupted.append(chunk)
                bad = bytearray(pieces[0])
                bad[0] ^= 0x01
                return [memoryview(bad), *pieces[1:]]
            return None

        s.chunk_stage = ChunkHook(hook)
        h.write_all(src)
        h.finish().result(30)
        h_rx.result(30)
        assert corrupted == [last] and h.retries(last) == 1
        assert h_rx.machine is not None and h_rx.machine.bad_chunks == 1
    assert dst.tobytes() == b"".join(a.tobytes() for a in src)


def test_persistently_corrupt_chunk_fails_the_transfer(no_leaks: None) -> None:
    layout, req, src = _big_request("always-bad")
    with Receiver() as rx, connect(*rx.address, lanes=2, chunk_size=CHUNK, max_retries=2) as s:
        h_rx = rx.expect(req.request_id, np.zeros(_total(layout, req), np.uint8))

        def hook(lane: int, tid: int, chunk: int, pieces: list) -> list | None:  # type: ignore[type-arg]
            if chunk == 3:
                return [memoryview(bytes(len(pieces[0]))), *pieces[1:]]
            return None

        s.chunk_stage = ChunkHook(hook)
        h = s.send(layout, req)
        h.write_all(src)
        with pytest.raises(TransferFailed, match="failed verification"):
            h.result(30)
        with pytest.raises(TransferFailed, match="sender failed the transfer: chunk 3 failed verification"):
            h_rx.result(10)  # the sender's failure and its reason, not "cancelled"
        assert 3 not in h_rx.layers_ready or h_rx.plan is None or h_rx.plan.layers[3] not in h_rx.layers_ready


@pytest.mark.parametrize("rep", REPEAT)
@pytest.mark.parametrize("how", ["killed", "frozen"])
def test_dead_or_silent_receiver_fails_sender_within_timeout(how: str, rep: int, no_leaks: None) -> None:
    proc = peer("receiver")
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline())
        layout, req, src = _big_request(f"peer-{how}")
        with connect("127.0.0.1", port, lanes=2, chunk_size=CHUNK, peer_timeout=1.5, heartbeat=0.2) as s:
            assert s.healthy
            h = s.send(layout, req)
            h.write_layer(0, [a for a, x in zip(src, plan_segments(layout, req)) if x.layer == 0])
            wait_until(lambda: h.bytes_sent > 0, 5)
            os.kill(proc.pid, signal.SIGKILL if how == "killed" else signal.SIGSTOP)
            t0 = time.monotonic()
            with pytest.raises(TransferFailed) as e:
                h.result(10)
            assert time.monotonic() - t0 < 4.0
            assert e.value.reason
            assert s.failure and not s.healthy
    finally:
        proc.kill()
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


@pytest.mark.parametrize("rep", REPEAT)
@pytest.mark.parametrize("how", ["killed", "frozen"])
def test_dead_or_silent_sender_fails_receiver_within_timeout(how: str, rep: int, no_leaks: None) -> None:
    with Receiver(peer_timeout=1.5, heartbeat=0.2) as rx:
        layout = load_fixture("tiny-qwen3-next")
        h_rx = rx.expect("frozen", np.zeros(_total(layout, default_request("frozen")), np.uint8))
        proc = peer("sender", str(rx.address[1]), "2")
        try:
            assert proc.stdout is not None
            assert proc.stdout.readline().strip() == "ready"
            h_rx.wait_layer(1, 10)
            os.kill(proc.pid, signal.SIGKILL if how == "killed" else signal.SIGSTOP)
            t0 = time.monotonic()
            with pytest.raises(TransferFailed) as e:
                h_rx.result(10)
            assert time.monotonic() - t0 < 4.0
            assert ("silent" if how == "frozen" else "lost") in e.value.reason
        finally:
            proc.kill()
            proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()
        assert wait_until(lambda: rx.sessions == 0, 5)


def _receiver_still_serves(rx: Receiver) -> None:
    layout = load_fixture("tiny-llama")
    req = default_request(f"ok-{time.monotonic_ns()}")
    src = fixture_payload(layout, req)
    dst = np.zeros(_total(layout, req), np.uint8)
    h_rx = rx.expect(req.request_id, dst)
    with connect(*rx.address, lanes=2, key=rx.key) as s:
        h = s.send(layout, req)
        h.write_all(src)
        h.finish().result(10)
        h_rx.result(10)
    assert dst.tobytes() == b"".join(a.view(np.uint8).tobytes() for a in src)


def _closed_by_peer(sock: socket.socket, within: float) -> bool:
    sock.settimeout(within)
    try:
        while sock.recv(65536):
            pass
        return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False


@pytest.mark.parametrize("rep", REPEAT)
def test_garbage_on_the_port_is_dropped_and_service_continues(rep: int, no_leaks: None) -> None:
    rng = np.random.default_rng(rep)
    with Receiver(handshake_timeout=1.0) as rx:
        for n in (1, 47, 48, 49, 4096, 1 << 20):
            with socket.create_connection(rx.address) as c:
                try:
                    c.sendall(rng.integers(0, 256, n, dtype=np.uint8).tobytes())
                except OSError:
                    pass
                assert _closed_by_peer(c, 3.0)
        _receiver_still_serves(rx)


def test_oversized_claims_are_refused_without_allocating(no_leaks: None) -> None:
    with Receiver(handshake_timeout=1.0) as rx:
        for kind, length in ((F.KIND_CONTROL, 0xFFFFFFFF), (F.KIND_CONTROL, F.DEFAULT_LIMITS.max_control + 1),
                             (F.KIND_DATA, 0xFFFFFFFF)):
            with socket.create_connection(rx.address) as c:
                c.sendall(F.pack_header(kind, 1, 0, 0, 0, length, 0))
                assert _closed_by_peer(c, 3.0)
        # a manifest claiming a huge transfer on an authenticated session is rejected, not allocated
        layout = load_fixture("tiny-llama")
        allocated: list[int] = []
        rx.allocator = lambda m: allocated.append(m.total_bytes) or bytearray(m.total_bytes)  # type: ignore
        from kvwire.codec.manifest import build_manifest
        from kvwire.tcp import Channel, client_handshake

        with socket.create_connection(rx.address) as raw:
            ch = Channel(raw, F.DEFAULT_LIMITS)
            client_handshake(ch, b"", 1)
            small = build_manifest(7, layout, RequestSpec("huge", 10, 10), 1 << 20).to_wire(with_layout=True)
            small["seg"][0][3] = 1 << 50  # claims a petabyte
            ch.send(F.BEGIN, small)
            kind, body = ch.read_control()
            while kind == F.HEARTBEAT:
                kind, body = ch.read_control()
            assert kind == F.REJECT and "limit" in body["reason"]
        assert allocated == []
        # and the sender refuses to plan such a transfer at all
        with connect(*rx.address) as s:
            with pytest.raises(KvwireError, match="limit"):
                s.send(layout, RequestSpec("huge", 1 << 40, 1 << 40))
        _receiver_still_serves(rx)


def test_client_that_never_speaks_is_dropped(no_leaks: None) -> None:
    with Receiver(handshake_timeout=0.5) as rx:
        with socket.create_connection(rx.address) as c:
            t0 = time.monotonic()
            assert _closed_by_peer(c, 3.0)
            assert time.monotonic() - t0 < 2.0


def test_wrong_key_is_rejected_before_any_transfer(no_leaks: None) -> None:
    calls: list[int] = []
    with Receiver(key="right", allocator=lambda m: calls.append(1) or bytearray(m.total_bytes)) as rx:
        for bad in ("wrong", None):
            with pytest.raises(AuthenticationError):
                connect(*rx.address, key=bad)
        assert rx.sessions == 0
        # a client that trusts a server with another key refuses it too (mutual)
        with pytest.raises((AuthenticationError, ConnectionError)):
            connect(*rx.address, key="right-but-not-this")
        assert calls == []
        _receiver_still_serves(rx)


def test_forged_lane_is_rejected_and_session_unharmed(no_leaks: None) -> None:
    with Receiver(key="k") as rx, connect(*rx.address, key="k", lanes=1) as s:
        from kvwire.tcp import Channel

        with socket.create_connection(rx.address) as raw:
            ch = Channel(raw, F.DEFAULT_LIMITS)
            ch.send(F.LANE, {"session": s.keys.session_id, "lane": 0})
            assert ch.read_control()[0] == F.CHALLENGE
            ch.send(F.AUTH, {"proof": b"\0" * 32})
            assert ch.read_control()[0] == F.ERROR
            assert _closed_by_peer(raw, 3.0)
        assert s.alive_lanes == 1
        layout = load_fixture("tiny-llama")
        req = default_request("after-forgery")
        rx.allocator = lambda m: bytearray(m.total_bytes)
        h = s.send(layout, req)
        h.write_all(payload(layout, req))
        h.finish().result(10)


def test_other_protocol_version_is_refused_with_a_clear_error(no_leaks: None) -> None:
    # a server that answers with a frame of another wire version
    srv = socket.create_server(("127.0.0.1", 0))
    port = srv.getsockname()[1]

    def serve() -> None:
        c, _ = srv.accept()
        with c:
            c.recv(4096)
            head = struct.pack("<4sBBHQIIQIQ", F.MAGIC, F.VERSION + 1, F.KIND_CONTROL, 0, 0, 0, 0, 0, 4, 0)
            c.sendall(head + b"\0\0\0\0" + b"abcd")
            time.sleep(0.5)

    t = threading.Thread(target=serve)
    t.start()
    try:
        with pytest.raises(ProtocolError, match=f"version {F.VERSION + 1}"):
            connect("127.0.0.1", port, connect_timeout=2)
    finally:
        t.join()
        srv.close()
    # and a server facing a client of another version drops it
    with Receiver(handshake_timeout=1.0) as rx:
        with socket.create_connection(rx.address) as c:
            head = struct.pack("<4sBBHQIIQIQ", F.MAGIC, F.VERSION + 1, F.KIND_CONTROL, 0, 0, 0, 0, 0, 4, 0)
            c.sendall(head + b"\0\0\0\0abcd")
            assert _closed_by_peer(c, 3.0)


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if subprocess.run(["which", "openssl"], capture_output=True).returncode:
        pytest.skip("openssl CLI not installed")
    d = tmp_path_factory.mktemp("pki")
    # extensions as Python >= 3.13 wants them (ssl's default context verifies with VERIFY_X509_STRICT)
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem",
             "-days", "1", "-subj", "/CN=kvwire-test-ca", "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign", "-addext", "subjectKeyIdentifier=hash", cwd=d)
    ext = d / "ext.cnf"
    ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n"
                   "keyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth,clientAuth\n"
                   "subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n")
    for who in ("server", "client"):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{who}.key", "-out", f"{who}.csr",
                 "-subj", f"/CN=kvwire-{who}", cwd=d)
        _openssl("x509", "-req", "-in", f"{who}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                 "-out", f"{who}.pem", "-days", "1", "-extfile", "ext.cnf", cwd=d)
    return d


def test_mutual_tls_round_trip_and_client_without_cert_is_refused(pki: Path, no_leaks: None) -> None:
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(pki / "ca.pem"))
    server_ctx.load_cert_chain(pki / "server.pem", pki / "server.key")
    server_ctx.verify_mode = ssl.CERT_REQUIRED
    client_ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki / "ca.pem"))
    client_ctx.load_cert_chain(pki / "client.pem", pki / "client.key")
    layout = load_fixture("tiny-qwen3-next")
    req = default_request("tls")
    src = fixture_payload(layout, req)
    dst = np.zeros(_total(layout, req), np.uint8)
    with Receiver(ssl_context=server_ctx, key="k") as rx:
        h_rx = rx.expect("tls", dst, layout=layout)
        with connect(*rx.address, ssl_context=client_ctx, key="k", lanes=2, chunk_size=CHUNK) as s:
            assert all(isinstance(x, ssl.SSLSocket) for x in s.lane_sockets())
            h = s.send(layout, req)
            h.write_all(src)
            h.finish().result(20)
            h_rx.result(20)
        assert dst.tobytes() == b"".join(a.view(np.uint8).tobytes() for a in src)
        anonymous = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki / "ca.pem"))
        with pytest.raises((ssl.SSLError, ConnectionError, KvwireError)):
            connect(*rx.address, ssl_context=anonymous, key="k", connect_timeout=3)
        assert h_rx.state is State.DONE
        assert wait_until(lambda: not rx.open_connections(), 5)  # TLS-wrapped connections are accounted for too


def test_receiver_limits_sessions_and_bytes_in_flight(no_leaks: None) -> None:
    layout = load_fixture("tiny-qwen3-next")
    req = default_request("big-1")
    size = _total(layout, req)
    with Receiver(max_sessions=1, max_inflight_bytes=size + size // 2,
                  allocator=lambda m: np.zeros(m.total_bytes, np.uint8)) as rx:
        with connect(*rx.address, lanes=1) as s:
            with pytest.raises((AuthenticationError, ConnectionError, KvwireError), match="too many sessions"):
                connect(*rx.address, lanes=1)
            first = s.send(layout, req)  # accepted, never written: holds its bytes in flight
            rx.next_transfer(5)
            second = s.send(layout, default_request("big-2"))
            with pytest.raises(TransferFailed, match="busy"):
                second.result(10)
            first.cancel()
            third = s.send(layout, default_request("big-3"))
            third.write_all(payload(layout, default_request("big-3")))
            third.finish().result(10)


def test_unauthenticated_connections_are_bounded(no_leaks: None) -> None:
    with Receiver(max_handshakes=4, handshake_timeout=1.0) as rx:
        idle = [socket.create_connection(rx.address) for _ in range(2)]
        try:
            assert wait_until(lambda: rx.stats()["handshakes"] == 2, 5)
            # per source at most max_handshakes // 2: a third cuts the oldest, the table stays at 2
            idle.append(socket.create_connection(rx.address))
            assert _closed_by_peer(idle[0], 2.0)
            assert wait_until(lambda: rx.stats()["handshakes"] == 2, 5)
            for c in idle[1:]:  # the silent ones are dropped after the handshake timeout
                assert _closed_by_peer(c, 3.0)
        finally:
            for c in idle:
                c.close()
        assert wait_until(lambda: rx.stats()["handshakes"] == 0, 5)
        assert rx.stats()["handshakes_cut"] >= 1  # the evicted one; the rest by the deadline or recv timeout
        _receiver_still_serves(rx)
        assert wait_until(lambda: not rx.open_connections(), 5)


def test_evicted_tls_handshake_is_cut_at_once(pki: Path, no_leaks: None) -> None:
    """A TLS handshake in progress that must make room for a newer connection is cut then, not at its
    deadline (the gate must reach the socket TLS wrapped)."""
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(pki / "ca.pem"))
    server_ctx.load_cert_chain(pki / "server.pem", pki / "server.key")
    with Receiver(ssl_context=server_ctx, max_handshakes=2, handshake_timeout=8.0) as rx:
        with socket.create_connection(rx.address) as old:
            old.sendall(b"\x16\x03\x01\x02\x00")  # a handshake record of 512 bytes follows... never
            assert wait_until(lambda: rx.stats()["handshakes"] == 1, 5)
            time.sleep(0.2)  # its thread is inside the TLS handshake
            with socket.create_connection(rx.address):  # per source at most 1: the old one must go
                t0 = time.monotonic()
                assert _closed_by_peer(old, 3.0)
                assert time.monotonic() - t0 < 3.0
