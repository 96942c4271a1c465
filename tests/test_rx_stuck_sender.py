"""A key holder's session that stops reading its control connection must stall no one else. Every frame the
receiver sends (heartbeats from its one monitor thread, REJECTs from admission threads, ACKs from lanes) was
written with a blocking send: a trial's attacker (small receive buffer, 20,000 BEGINs for an unknown request,
each answered by a ~380 B REJECT, then reading 32 KB/s so TCP_USER_TIMEOUT never fired) blocked the shared
monitor for its whole 40 s run. An ``expect(timeout=2)`` was still active at 40 s, a healthy session failed as
"receiver silent", and 9,772 admission threads piled up. Frames now go through each session's own outbox."""

from __future__ import annotations

import socket
import threading
import time

import numpy as np
from helpers import payload, send_verified

from kvwire import Receiver, RequestSpec, connect
from kvwire.codec import frames as F
from kvwire.codec.handshake import ClientHandshake
from kvwire.codec.manifest import build_manifest
from kvwire.codec.transfer import State
from kvwire.tcp._outbox import MAX_QUEUED
from kvwire.tcp._wire import Channel
from kvwire.testing.fixtures import load_fixture

TINY = load_fixture("tiny-llama")
LAYOUT = load_fixture("tiny-qwen3-next")


def _session(address: tuple[str, int], rcvbuf: int | None) -> Channel:
    """A key holder's control connection, opened by hand (``rcvbuf``: its receive buffer)."""
    s = socket.socket()
    if rcvbuf:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    s.connect(address)
    s.settimeout(10)
    ch = Channel(s, F.DEFAULT_LIMITS)
    hs = ClientHandshake(b"k", 1)
    ch.send(*hs.hello())
    for _ in range(2):
        for kind, body in hs.receive(*ch.read_control()):
            ch.send(kind, body)
    return ch


def _flood(ch: Channel, n: int) -> None:
    """``n`` BEGINs for a request nobody expects (each gets a REJECT echoing its 256-character id)."""
    req = RequestSpec("x" * 256, num_tokens=16, state_position=15)
    body = build_manifest(1, TINY, req, 4 << 20, True, False).to_wire(with_layout=True)
    try:
        for tid in range(1, n + 1):
            ch.send(F.BEGIN, dict(body, tid=tid))
    except OSError:  # the receiver cut the session before the flood ended
        pass


def _ends(h: object, within: float) -> bool:
    end = time.monotonic() + within
    while not h.finished and time.monotonic() < end:  # type: ignore[attr-defined]
        time.sleep(0.02)
    return bool(h.finished)  # type: ignore[attr-defined]


def test_a_sender_that_reads_a_trickle_is_cut_and_stalls_no_other_session(no_leaks: None) -> None:
    with Receiver(key="k", peer_timeout=3.0) as rx, \
            connect(*rx.address, key="k", lanes=1, peer_timeout=3.0) as victim:
        attacker = _session(rx.address, 65536)
        stop = threading.Event()

        def trickle() -> None:  # 32 KB a second: a window now and then, so TCP_USER_TIMEOUT never fires
            while not stop.wait(1.0):
                try:
                    attacker.sock.recv(32768)
                except OSError:
                    return

        reader = threading.Thread(target=trickle)
        reader.start()
        try:
            t0 = time.monotonic()
            _flood(attacker, 20_000)
            late = rx.expect("never-sent", bytearray(16), timeout=1.0)
            t1 = time.monotonic()
            assert _ends(late, 5.0), "expect(timeout=1) still active 5 s on: the monitor is stalled"
            timed_out_after = time.monotonic() - t1
            assert late.state is State.TIMED_OUT
            while rx.sessions > 1 and time.monotonic() - t0 < 15:
                time.sleep(0.1)
            cut_after = time.monotonic() - t0
            threads = threading.active_count()
            send_verified(rx, victim, LAYOUT, RequestSpec("victim", 40, 39), seed=4, timeout=20)
            assert not victim.closed, victim.failure
        finally:
            stop.set()
            reader.join(5)
            attacker.sock.close()
    print(f"\nexpect(timeout=1) timed out after {timed_out_after:.2f} s; the flooding session cut {cut_after:.1f} s "
          f"after its first BEGIN; {threads} threads in the process")
    assert timed_out_after < 2.5
    assert cut_after < 15, "the session that reads nothing was never cut"
    assert threads < 60


def test_a_sender_that_reads_nothing_at_all_is_cut_within_its_peer_timeout(no_leaks: None) -> None:
    """No byte read: the receiver's writes stop moving, and the session fails within ``peer_timeout``
    (``SO_SNDTIMEO`` on the writer) while another session's expect still times out on time."""
    with Receiver(key="k", peer_timeout=2.0) as rx:
        attacker = _session(rx.address, 4096)
        try:
            t0 = time.monotonic()
            _flood(attacker, 12_000)
            late = rx.expect("never-sent", bytearray(16), timeout=1.0)
            assert _ends(late, 4.0) and late.state is State.TIMED_OUT
            while rx.sessions > 0 and time.monotonic() - t0 < 20:
                time.sleep(0.1)
            cut_after = time.monotonic() - t0
        finally:
            attacker.sock.close()
    print(f"\nthe session that reads nothing was cut {cut_after:.1f} s after its first BEGIN")
    assert rx.sessions == 0 and cut_after < 20


def test_a_sender_that_reads_its_rejects_keeps_its_session(no_leaks: None) -> None:
    """The control: the same flood from a sender that reads every answer; more than MAX_QUEUED frames pass
    and its session lives on."""
    n = MAX_QUEUED + 1000
    with Receiver(key="k", peer_timeout=3.0) as rx:
        ch = _session(rx.address, None)
        try:
            got: list[str] = []

            def read() -> None:
                while len(got) < n:
                    kind, _ = ch.read_control()
                    if kind != F.HEARTBEAT:
                        got.append(kind)

            reader = threading.Thread(target=read)
            reader.start()
            _flood(ch, n)
            reader.join(60)
            assert got == [F.REJECT] * n
            assert rx.sessions == 1
        finally:
            ch.sock.close()


def test_a_session_places_at_most_max_admitting_transfers_at_once(no_leaks: None) -> None:
    """40 transfers begun together against an allocator that waits: 16 wait in it at once (one thread each),
    the rest in line; once it answers, all 40 complete verified. Before, each BEGIN got a thread of its own."""
    from kvwire.tcp._rxsession import MAX_ADMITTING

    gate = threading.Event()
    inside, most = [0], [0]
    lock = threading.Lock()

    def allocator(m: object) -> np.ndarray:
        with lock:
            inside[0] += 1
            most[0] = max(most[0], inside[0])
        gate.wait(20)
        with lock:
            inside[0] -= 1
        return np.empty(m.total_bytes, np.uint8)  # type: ignore[attr-defined]

    with Receiver(key="k", allocator=allocator) as rx, connect(*rx.address, key="k", lanes=2) as session:
        reqs = [RequestSpec(f"a{i}", 16, 15) for i in range(40)]
        outs = []
        for req in reqs:
            out = session.send(TINY, req)
            srcs = payload(TINY, req, seed=1)
            out.write_all(srcs)
            outs.append(out.finish())
        time.sleep(1.0)
        threads = threading.active_count()
        with lock:
            waiting = inside[0]
        gate.set()
        for out in outs:
            out.result(timeout=30)
    print(f"\n40 transfers against a waiting allocator: {waiting} inside it at once, {threads} threads")
    assert waiting == most[0] == MAX_ADMITTING
    assert threads < 40
