"""Lanes are dialled concurrently: a proxy in front of a real receiver releases lane connections only in
whole groups, so a session that dials one lane after another stalls on it and fails; failures while
dialling leave contiguous lanes and nothing open."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import pytest
from helpers import wait_until

from kvwire import KvwireError, Receiver, connect
from kvwire.testing.fixtures import default_request, fixture_payload, load_fixture


class GroupGate:
    """TCP proxy to ``upstream``. Connections arrive in ``groups`` (sizes, in order); a group is
    forwarded only once all its connections have arrived; a connection still held after ``hold``
    seconds is closed. The ``refuse``-th connection(s) (1-based, counted over all) are closed at once."""

    def __init__(self, upstream: tuple[str, int], groups: Sequence[int], hold: float = 4.0,
                 refuse: int | set[int] | None = None) -> None:
        self.upstream, self.hold = upstream, hold
        self.refuse = {refuse} if isinstance(refuse, int) else set(refuse or ())
        self.bounds = [sum(groups[: i + 1]) for i in range(len(groups))]
        self.released = [threading.Event() for _ in groups]
        self.arrived = 0
        self.stalled = 0
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = self.listener.getsockname()
        self.socks: list[socket.socket] = []
        self.threads: list[threading.Thread] = []
        self.lock = threading.Lock()
        self.closing = False
        self._go(self._accept)

    def _go(self, fn: object, *args: object) -> None:
        t = threading.Thread(target=fn, args=args, name="gate", daemon=True)  # type: ignore[arg-type]
        self.threads.append(t)
        t.start()

    def _accept(self) -> None:
        while True:
            try:
                c, _ = self.listener.accept()
            except OSError:
                return
            with self.lock:
                self.socks.append(c)
                self.arrived += 1
                n = self.arrived
            if n in self.refuse:
                c.close()
                continue
            group = next((g for g, b in enumerate(self.bounds) if n <= b), len(self.bounds) - 1)
            if n == self.bounds[group]:
                self.released[group].set()
            self._go(self._serve, c, group)

    def _serve(self, c: socket.socket, group: int) -> None:
        if not self.released[group].wait(self.hold):
            with self.lock:
                self.stalled += 1
            c.close()
            return
        try:
            u = socket.create_connection(self.upstream)
        except OSError:
            c.close()
            return
        with self.lock:
            self.socks.append(u)
            if self.closing:
                u.close()
                c.close()
                return
        self._go(self._pump, u, c)
        self._pump(c, u)

    @staticmethod
    def _pump(a: socket.socket, b: socket.socket) -> None:
        try:
            while data := a.recv(1 << 16):
                b.sendall(data)
        except OSError:
            pass
        for s in (a, b):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self) -> None:
        try:
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept()
        except OSError:
            pass
        self.listener.close()
        with self.lock:
            self.closing = True
            for e in self.released:
                e.set()
            for s in self.socks:
                s.close()
        for t in self.threads:
            t.join(5)


@contextmanager
def gate(rx: Receiver, groups: Sequence[int], **kw: object) -> Iterator[GroupGate]:
    g = GroupGate(rx.address, groups, **kw)  # type: ignore[arg-type]
    try:
        yield g
    finally:
        g.close()


def _round_trip(s: object, rx: Receiver, rid: str) -> None:
    layout = load_fixture("tiny-qwen3-next")
    req = default_request(rid)
    src = fixture_payload(layout, req)
    dst = [np.zeros(a.nbytes, np.uint8) for a in src]
    h_rx = rx.expect(rid, dst, layout=layout, state_position=req.state_position)
    h = s.send(layout, req)  # type: ignore[attr-defined]
    h.write_all(src)
    h.finish().result(20)
    h_rx.result(20)
    assert all(a.view(np.uint8).tobytes() == b.tobytes() for a, b in zip(src, dst))


def test_a_session_dials_its_lanes_at_once(no_leaks: None) -> None:
    with Receiver(key="k") as rx, gate(rx, [1, 8]) as g:
        with connect(*g.address, key="k", lanes=8, chunk_size=64 * 1024) as s:
            assert s.alive_lanes == 8 and g.stalled == 0
            _round_trip(s, rx, "dial-8")


def test_raising_the_lane_count_dials_the_new_lanes_at_once(no_leaks: None) -> None:
    with Receiver(key="k") as rx, gate(rx, [1, 2, 6]) as g:
        with connect(*g.address, key="k", lanes=2, max_lanes=8, chunk_size=64 * 1024) as s:
            assert s.set_active_lanes(8) == 8
            assert [lane.index for lane in s.lanes] == list(range(8)) and g.stalled == 0
            assert len(s.lane_sockets()) == 8
            _round_trip(s, rx, "grow-8")


def test_a_lane_that_fails_to_open_leaves_contiguous_lanes(no_leaks: None) -> None:
    # the 6th connection (control, 2 lanes, then the 3rd of 6 new ones) is refused
    with Receiver(key="k") as rx, gate(rx, [1, 2, 5], refuse=6, hold=1.0) as g:
        with connect(*g.address, key="k", lanes=2, max_lanes=8, chunk_size=64 * 1024) as s:
            got = s.set_active_lanes(8)
            assert 2 <= got < 8 and s.active_lanes == got
            assert [lane.index for lane in s.lanes] == list(range(got))
            _round_trip(s, rx, "after-refusal")


def test_a_refused_lane_is_retried_at_once(no_leaks: None) -> None:
    # the 3rd connection (the 2nd lane) is refused: connect() dials it again and opens all 4
    with Receiver(key="k") as rx, gate(rx, [1, 4], refuse=3, hold=1.0) as g:
        with connect(*g.address, key="k", lanes=4, connect_timeout=2, chunk_size=64 * 1024) as s:
            assert s.alive_lanes == 4 and s.healthy
            _round_trip(s, rx, "retried")


def test_a_lane_refused_twice_opens_the_session_with_fewer_and_is_redialled(no_leaks: None) -> None:
    # the 2nd lane is refused, and so is its immediate retry (6th connection): the session opens with
    # 3 lanes, works at once, and its lane thread re-dials the missing one
    with Receiver(key="k") as rx, gate(rx, [1, 4], refuse={3, 6}, hold=1.0) as g:
        with connect(*g.address, key="k", lanes=4, connect_timeout=2, chunk_size=64 * 1024) as s:
            assert s.healthy and s.alive_lanes >= 3
            _round_trip(s, rx, "fewer")
            assert wait_until(lambda: s.alive_lanes == 4, 10)
            assert [lane.index for lane in s.lanes] == [0, 1, 2, 3]
            _round_trip(s, rx, "all-back")


def test_no_lane_opening_fails_the_connect_and_leaves_nothing_open(no_leaks: None) -> None:
    with Receiver(key="k", max_lanes=0) as rx:  # authenticates the session, refuses every lane
        with pytest.raises((KvwireError, OSError)):
            connect(*rx.address, key="k", lanes=4, connect_timeout=2)
        assert wait_until(lambda: rx.sessions == 0, 10)
