"""LinkMonitor on real loopback sockets: sampling, publishing, subscribers, clean shutdown."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from kvwire.congestion.estimator import LinkState
from kvwire.congestion.monitor import LinkMonitor


def _stream(cli: socket.socket, acc: socket.socket, seconds: float) -> None:
    """Push bytes from cli to acc for ``seconds`` (acc drained by a helper thread)."""
    stop = threading.Event()

    def drain() -> None:
        buf = bytearray(1 << 20)
        acc.settimeout(0.2)
        while not stop.is_set():
            try:
                acc.recv_into(buf)
            except TimeoutError:
                pass

    t = threading.Thread(target=drain)
    t.start()
    chunk = b"z" * (256 << 10)
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        cli.sendall(chunk)
    stop.set()
    t.join()


def _monitor_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "kvwire-linkmon"]


def test_monitor_measures_goodput_and_publishes(no_leaks: None, pair: tuple[socket.socket, socket.socket]) -> None:
    cli, acc = pair
    seen: list[LinkState] = []
    with LinkMonitor(lambda: [cli], interval=0.05) as mon:
        unsubscribe = mon.subscribe(seen.append)
        assert mon.wait_next(2.0) is not None
        _stream(cli, acc, 0.6)
        state = mon.wait_next(2.0)
        assert state is not None and mon.latest() is not None
        unsubscribe()
        n = len(seen)
        assert mon.wait_next(2.0) is not None
        assert len(seen) == n  # no calls after unsubscribing
    assert n >= 5
    assert max(s.btl_bw for s in seen) > 10e6  # loopback moves far more than 10 MB/s
    assert any(s.goodput > 0 for s in seen)
    assert all(len(s.lanes) == 1 and s.lanes[0].lane == cli.fileno() for s in seen)
    assert seen[-1].min_rtt is not None and seen[-1].min_rtt < 0.01
    assert [s.timestamp for s in seen] == sorted(s.timestamp for s in seen)


def test_no_thread_left_after_stop(no_leaks: None, pair: tuple[socket.socket, socket.socket]) -> None:
    cli, _ = pair
    before = len(_monitor_threads())
    mon = LinkMonitor(lambda: [cli], interval=0.02).start()
    assert mon.running and len(_monitor_threads()) == before + 1
    assert mon.wait_next(2.0) is not None
    mon.stop()
    assert not mon.running and len(_monitor_threads()) == before
    mon.stop()  # idempotent
    with pytest.raises(RuntimeError):
        mon.start()


def test_closed_sockets_and_failing_parts_do_not_stop_sampling(
        no_leaks: None, pair: tuple[socket.socket, socket.socket]) -> None:
    cli, _ = pair
    dead = socket.socket()
    dead.close()
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    calls = {"n": 0}

    def provider() -> list[socket.socket]:
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("provider hiccup")
        return [cli, dead, udp]

    def bad_subscriber(_: LinkState) -> None:
        raise RuntimeError("subscriber bug")

    try:
        with LinkMonitor(provider, interval=0.02) as mon:
            mon.subscribe(bad_subscriber)
            states = [mon.wait_next(2.0) for _ in range(4)]
        assert all(s is not None for s in states)
        assert calls["n"] >= 4
        last = states[-1]
        assert last is not None and [ln.lane for ln in last.lanes] == [cli.fileno()]
    finally:
        udp.close()


def test_poll_without_thread(no_leaks: None, pair: tuple[socket.socket, socket.socket]) -> None:
    cli, _ = pair
    mon = LinkMonitor(lambda: [cli])
    a = mon.poll()
    b = mon.poll()
    assert b.timestamp > a.timestamp and mon.latest() is b
    assert not mon.running
