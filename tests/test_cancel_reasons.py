"""Reasons a user hands in (a ``cancel`` reason, an allocator's exception) travel to the peer without ending the
session they share with other transfers: a non-str reason is a ``TypeError`` at the call that cancels nothing,
and a text the wire cannot carry whole (past the peer's control frame bound, a lone surrogate) is cut and
escaped (``messages.wire_reason``). Before, each of these failed the whole session, every transfer on it with
it (a surrogate by killing the receiver's writer thread: the sender waited out its ``peer_timeout``), and a
surrogate in a sender's reason left its handle active for good. Over real loopback sockets.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
from helpers import payload, send_verified, wait_until

from kvwire import Receiver, RequestSpec, Session, TransferCancelled, TransferFailed, connect, plan_segments
from kvwire.codec.manifest import Manifest
from kvwire.codec.messages import MAX_REASON, wire_reason
from kvwire.codec.transfer import State
from kvwire.testing.fixtures import load_fixture

LAYOUT = load_fixture("tiny-qwen3-next")
HUGE = "x" * (5 << 20)  # past the 4 MiB control frame a peer accepts
SURROGATE = "no such file: /data/\udcff.bin"  # what surrogateescape leaves of an undecodable file name


def _allocator(m: Manifest) -> np.ndarray:
    raise RuntimeError(HUGE if m.request.request_id.startswith("huge") else SURROGATE)


@pytest.fixture
def link() -> Iterator[tuple[Receiver, Session]]:
    with Receiver(key="k", allocator=_allocator) as rx, connect(*rx.address, key="k", lanes=2) as s:
        yield rx, s


def _started(rx: Receiver, s: Session, rid: str) -> tuple:
    """A transfer with its first layer written, admitted into the buffer expected on ``rx``: both handles."""
    req = RequestSpec(rid, 300, 299)
    src = payload(LAYOUT, req)
    incoming = rx.expect(rid, np.zeros(sum(a.nbytes for a in src), np.uint8), layout=LAYOUT)
    out = s.send(LAYOUT, req)
    first = [i for i, seg in enumerate(plan_segments(LAYOUT, req)) if seg.layer == 0]
    out.write_layer(0, [src[i] for i in first])
    assert wait_until(lambda: incoming.manifest is not None)  # (cancelled before, the expect is only withdrawn)
    return out, incoming


def _session_carries_on(rx: Receiver, s: Session) -> None:
    send_verified(rx, s, LAYOUT, RequestSpec("bystander", 300, 299), timeout=10)
    assert not s.closed, s.failure


@pytest.mark.parametrize("side", ["sender", "receiver"])
@pytest.mark.parametrize("reason", [123, None, b"bytes"])
def test_a_cancel_reason_that_is_not_a_str_is_a_type_error_that_cancels_nothing(
        link: tuple[Receiver, Session], side: str, reason: object) -> None:
    rx, s = link
    out, incoming = _started(rx, s, "typed")
    handle = out if side == "sender" else incoming
    with pytest.raises(TypeError, match="reason must be a str"):
        handle.cancel(reason)  # type: ignore[arg-type]
    assert out.state is State.ACTIVE and incoming.state is State.ACTIVE  # nothing cancelled, nothing sent
    _session_carries_on(rx, s)
    handle.cancel("now for real")  # the good path: both ends cancelled, once
    for h in (out, incoming):
        with pytest.raises(TransferCancelled):
            h.result(10)
    assert not s.closed, s.failure


@pytest.mark.parametrize("side", ["sender", "receiver"])
@pytest.mark.parametrize("reason", [HUGE, SURROGATE], ids=["huge", "surrogate"])
def test_a_cancel_reason_the_wire_cannot_carry_whole_reaches_the_peer_cut_and_escaped(
        link: tuple[Receiver, Session], side: str, reason: str) -> None:
    rx, s = link
    out, incoming = _started(rx, s, "cut")
    (out if side == "sender" else incoming).cancel(reason)
    for h in (out, incoming):
        with pytest.raises(TransferCancelled):
            h.result(10)
    peer = incoming if side == "sender" else out
    assert wire_reason(reason)[:40] in peer.reason and len(peer.reason) <= MAX_REASON + 64
    _session_carries_on(rx, s)


@pytest.mark.parametrize("rid", ["huge-alloc", "surrogate-alloc"])
def test_an_allocator_error_the_wire_cannot_carry_whole_is_a_reject_and_the_session_carries_on(
        link: tuple[Receiver, Session], rid: str) -> None:
    rx, s = link
    req = RequestSpec(rid, 300, 299)
    out = s.send(LAYOUT, req)
    out.write_all(payload(LAYOUT, req))
    out.finish()
    with pytest.raises(TransferFailed, match="receiver rejected the transfer: RuntimeError"):
        out.result(10)
    _session_carries_on(rx, s)


def test_wire_reason_keeps_a_short_text_and_cuts_and_escapes_the_rest() -> None:
    assert wire_reason("cancelled by engine") == "cancelled by engine"
    assert wire_reason(HUGE) == "x" * MAX_REASON
    assert wire_reason(SURROGATE) == "no such file: /data/\\udcff.bin"
    assert wire_reason(SURROGATE).encode("utf-8")  # (the original cannot be encoded at all)
