"""Opt-in automatic reconnect: a session opened with ``reconnect=True`` outlives its receiver. The
receiver process is killed mid-transfer and a new receiver is started on the same port: the transfer in
flight fails once (exactly one terminal state, on both the handle and its future), the session dials
the receiver again by itself, and later transfers go through."""

from __future__ import annotations

import os
import signal
import threading
import time

import numpy as np
import pytest
from helpers import payload, peer, wait_until

from kvwire import KvwireError, Receiver, RequestSpec, State, TransferFailed, connect, plan_segments
from kvwire.testing.fixtures import load_fixture


def _round_trip(s: object, rx: Receiver, rid: str) -> None:
    layout = load_fixture("tiny-qwen3-next")
    req = RequestSpec(rid, 600, 600)
    src = payload(layout, req, seed=len(rid))
    dst = np.zeros(sum(x.nbytes for x in plan_segments(layout, req)), np.uint8)
    h_rx = rx.expect(rid, dst, layout=layout)
    h = s.send(layout, req, timeout=30)  # type: ignore[attr-defined]
    h.write_all(src)
    h.finish().result(20)
    h_rx.result(10)
    assert dst.tobytes() == b"".join(a.tobytes() for a in src)


def test_session_reconnects_to_a_restarted_receiver(no_leaks: None) -> None:
    proc = peer("receiver")
    rx: Receiver | None = None
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline())
        with connect("127.0.0.1", port, lanes=3, chunk_size=64 * 1024, peer_timeout=1.5, heartbeat=0.2,
                     connect_timeout=2, reconnect=True) as s:
            layout = load_fixture("tiny-qwen3-next")
            req = RequestSpec("in-flight", 3000, 3000)
            src = payload(layout, req, seed=1)
            h = s.send(layout, req, timeout=60)
            outcomes: list[object] = []
            h.add_done_callback(outcomes.append)
            h.write_layer(0, [a for a, x in zip(src, plan_segments(layout, req)) if x.layer == 0])
            assert wait_until(lambda: h.bytes_sent > 0, 10)
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            t0 = time.monotonic()
            with pytest.raises(TransferFailed):
                h.result(10)
            failed_after = time.monotonic() - t0
            assert h.state is State.FAILED and not s.closed and not s.healthy
            # while the receiver is away, send() waits connect_timeout for it, then says why
            with pytest.raises(KvwireError, match="reconnecting"):
                s.send(layout, RequestSpec("too-early", 600, 600))
            rx = Receiver("127.0.0.1", port)  # the receiver comes back on the same port
            t1 = time.monotonic()
            assert wait_until(lambda: s.healthy, 15), s.failure
            back_after = time.monotonic() - t1
            assert s.alive_lanes == 3 and s.stats()["session_reconnects"] == 1
            for i in range(3):
                _round_trip(s, rx, f"after-{i}")
            assert wait_until(lambda: len(outcomes) == 1, 5) and len(outcomes) == 1  # one terminal state
            assert h.state is State.FAILED
            print(f"in-flight transfer failed {failed_after:.2f}s after the kill; session back "
                  f"{back_after:.2f}s after the receiver restarted")
    finally:
        proc.kill()
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
        if rx is not None:
            rx.close()


def test_without_reconnect_the_session_stays_closed(no_leaks: None) -> None:
    with Receiver() as rx:
        s = connect(*rx.address, lanes=2, peer_timeout=1.5, heartbeat=0.2)
        try:
            _round_trip(s, rx, "before")
            for sess in rx.live_sessions():
                rx.close_session(sess, "dropped by the test")
            assert wait_until(lambda: s.closed, 5) and s.failure
            with pytest.raises(KvwireError, match="session closed"):
                s.send(load_fixture("tiny-qwen3-next"), RequestSpec("after", 600, 600))
        finally:
            s.close()


def test_close_while_reconnecting_stops_at_once(no_leaks: None) -> None:
    rx = Receiver()
    s = connect(*rx.address, lanes=2, peer_timeout=1.5, heartbeat=0.2, connect_timeout=1, reconnect=True)
    rx.close()  # and it never comes back
    assert wait_until(lambda: not s.healthy, 5)
    t0 = time.monotonic()
    closer = threading.Thread(target=s.close)
    closer.start()
    closer.join(10)
    assert not closer.is_alive() and time.monotonic() - t0 < 5 and s.closed
