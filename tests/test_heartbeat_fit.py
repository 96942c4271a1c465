"""Each end says its ``peer_timeout`` in the handshake and the other end heartbeats often enough for it, so two
ends configured apart never fail a healthy idle session as silent. Before, a receiver heartbeating every 5 s
(or a sender doing so) killed every idle session of a peer waiting 1 s."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator

import pytest
from helpers import send_verified

from kvwire import Receiver, RequestSpec, connect
from kvwire.codec import frames as F
from kvwire.codec.handshake import MIN_HEARTBEAT, PEER_TIMEOUT_KEY, ClientHandshake, heartbeat_for
from kvwire.tcp._auth import client_handshake
from kvwire.tcp._wire import Channel
from kvwire.testing.fixtures import load_fixture

LAYOUT = load_fixture("tiny-qwen3-next")


@pytest.mark.parametrize("own, peer_timeout, fitted", [
    (1.0, None, 1.0), (1.0, 10.0, 1.0), (1.0, 2.0, 0.5), (5.0, 1.0, 0.25), (1.0, 1e-9, MIN_HEARTBEAT),
    (1.0, float("nan"), 1.0), (1.0, float("inf"), 1.0), (1.0, -1.0, 1.0), (1.0, 0, 1.0), (1.0, True, 1.0),
    (1.0, "0.1", 1.0), (1.0, [0.1], 1.0)])
def test_heartbeat_fits_the_peers_timeout_and_ignores_what_is_not_one(own: float, peer_timeout: object,
                                                                         fitted: float) -> None:
    assert math.isclose(heartbeat_for(own, peer_timeout), fitted)


def test_a_sender_says_its_timeout_in_the_hello_and_an_older_one_says_nothing() -> None:
    assert ClientHandshake(b"k", 2, peer_timeout=3.0).hello()[1][PEER_TIMEOUT_KEY] == 3.0
    assert PEER_TIMEOUT_KEY not in ClientHandshake(b"k", 2).hello()[1]


@pytest.fixture
def slow_receiver(no_leaks: None) -> Iterator[Receiver]:
    with Receiver(key="k", heartbeat=5.0, peer_timeout=30.0) as rx:
        yield rx


def test_a_receiver_with_a_long_heartbeat_keeps_an_impatient_senders_idle_session(slow_receiver: Receiver) -> None:
    """The receiver heartbeats every 5 s, the sender fails a receiver silent for 1 s: idle for 3 s, the
    session used to fail ("receiver silent for 1.0s"); now the receiver heartbeats every 0.25 s toward it."""
    with connect(*slow_receiver.address, key="k", lanes=1, peer_timeout=1.0) as session:
        time.sleep(3.0)  # idle
        send_verified(slow_receiver, session, LAYOUT, RequestSpec("idle-rx", 300, 299), seed=5, timeout=20)
        assert not session.closed, session.failure
        assert session.stats()["session_reconnects"] == 0


def test_a_sender_with_a_long_heartbeat_is_not_dropped_by_an_impatient_receiver(no_leaks: None) -> None:
    """The other way round: the sender heartbeats every 5 s, the receiver drops a sender silent for 1 s."""
    with Receiver(key="k", peer_timeout=1.0) as rx, \
            connect(*rx.address, key="k", lanes=1, heartbeat=5.0, peer_timeout=30.0) as session:
        time.sleep(3.0)  # idle
        send_verified(rx, session, LAYOUT, RequestSpec("idle-tx", 300, 299), seed=5, timeout=20)
        assert not session.closed, session.failure
        assert session.stats()["session_reconnects"] == 0
        assert rx.stats()["sessions"] == 1


def _heartbeat_gaps(rx: Receiver, peer_timeout: float | None, watch: float) -> list[float]:
    """A hand-made sender that says ``peer_timeout`` (None: says nothing, as an older sender): the gaps
    between the receiver's heartbeats over ``watch`` s."""
    import socket

    raw = socket.create_connection(rx.address)
    try:
        ch = Channel(raw, F.DEFAULT_LIMITS)
        _, limits = client_handshake(ch, b"k", 1, peer_timeout)
        assert limits[PEER_TIMEOUT_KEY] == rx.peer_timeout  # the receiver says its own
        raw.settimeout(watch)
        seen, end = [], time.monotonic() + watch
        while time.monotonic() < end:
            try:
                kind, _ = ch.read_control()
            except TimeoutError:
                break
            if kind == F.HEARTBEAT:
                seen.append(time.monotonic())
        return [b - a for a, b in zip(seen, seen[1:])]
    finally:
        raw.close()


def test_the_receiver_heartbeats_at_its_own_interval_unless_the_sender_asks_for_more(slow_receiver: Receiver) -> None:
    """The negative control: a sender that says nothing gets the configured 5 s (no heartbeat in 3 s after the
    first); one that says 0.8 s gets one every 0.2 s."""
    older = _heartbeat_gaps(slow_receiver, None, 3.0)
    assert older == [], older
    fitted = _heartbeat_gaps(slow_receiver, 0.8, 2.0)
    assert len(fitted) >= 5 and max(fitted) < 0.45, fitted
