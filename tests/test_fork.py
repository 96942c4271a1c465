"""A child forked from a process with a Session and a Receiver open (an engine forking its workers) holds copies
of their sockets and none of their threads. In the child every call that would write to the parent's
connections or wait on its threads is a ``KvwireError`` at once, and ``close()`` (a ``with`` block's exit)
leaves the parent's connections alone. Before, the child's ``send`` failed with a stray RuntimeError, its
``result()`` waited forever, and its ``close()`` said BYE and shut the shared sockets down: the parent's
session failed ("peer closed the connection"), every transfer on it with it. Real fork, real loopback sockets.
"""

from __future__ import annotations

import os
import signal
import time
import traceback

import numpy as np
import pytest
from helpers import payload, send_verified

from kvwire import KvwireError, Receiver, RequestSpec, connect, plan_segments
from kvwire.testing.fixtures import load_fixture

LAYOUT = load_fixture("tiny-qwen3-next")

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")


def _in_child(check: object) -> int:
    """Fork, run ``check()`` in the child (it exits 0 when check returns, 1 when it raises: the traceback on
    stderr), and return the child's exit status; a child still running after 30 s is killed (status -9)."""
    pid = os.fork()
    if pid == 0:  # the child: never back into pytest
        code = 1
        try:
            check()  # type: ignore[operator]
            code = 0
        except BaseException:  # noqa: BLE001 - reported through the exit status
            traceback.print_exc()
        finally:
            os._exit(code)
    end = time.monotonic() + 30
    while time.monotonic() < end:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.02)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    return -9


def test_a_forked_child_cannot_use_the_parents_session_or_receiver_and_its_close_leaves_them_working() -> None:
    with Receiver(key="k") as rx, connect(*rx.address, key="k", lanes=2) as session:
        req = RequestSpec("in-flight", 300, 299)
        src = payload(LAYOUT, req)
        dest = np.zeros(sum(a.nbytes for a in src), np.uint8)
        incoming = rx.expect(req.request_id, dest, layout=LAYOUT)
        out = session.send(LAYOUT, req)
        by_layer: dict[int, list[int]] = {}
        for seg in plan_segments(LAYOUT, req):
            by_layer.setdefault(seg.layer, []).append(seg.index)
        out.write_layer(0, [src[i] for i in by_layer[0]])
        live = rx.live_sessions()[0]  # (taken here: in the child its lock may be held by a parent thread for good)

        def child() -> None:
            calls = {"send": lambda: session.send(LAYOUT, RequestSpec("child", 300, 299)),
                     "write_layer": lambda: out.write_layer(1, [src[i] for i in by_layer[1]]),
                     "cancel": lambda: out.cancel("from the child"),
                     "result": lambda: out.result(),  # (would wait forever: no thread here ends it)
                     "wait_layer": lambda: incoming.wait_layer(7),
                     "incoming cancel": lambda: incoming.cancel("from the child"),
                     "expect": lambda: rx.expect("child", bytearray(64)),
                     "set_active_lanes": lambda: session.set_active_lanes(3),
                     # (accepted silently before: never called here; close_session ended the parent's session)
                     "add_done_callback": lambda: out.add_done_callback(lambda _f: None),
                     "incoming add_done_callback": lambda: incoming.add_done_callback(lambda _f: None),
                     "on_layer": lambda: incoming.on_layer(lambda _la: None),
                     "on_layer_acked": lambda: out.on_layer_acked(lambda _la: None),
                     "close_session": lambda: rx.close_session(live, "from the child")}
            for name, call in calls.items():
                with pytest.raises(KvwireError, match="forked"):
                    call()
                    raise AssertionError(f"{name} worked in the child")
            session.close()  # what a with block in the child does on its way out: nothing of the parent's
            rx.close()

        assert _in_child(child) == 0
        # the parent's session and receiver carry on: the transfer in flight completes, byte for byte
        for layer, segs in by_layer.items():
            if layer:
                out.write_layer(layer, [src[i] for i in segs])
        out.finish().result(10)
        incoming.result(10)
        assert np.array_equal(dest, np.concatenate(src))
        send_verified(rx, session, LAYOUT, RequestSpec("after", 300, 299))
        assert not session.closed, session.failure


def test_a_child_opens_its_own_session_to_the_parents_receiver() -> None:
    """The negative control: what a child should do, works (and the parent's receiver serves it)."""
    with Receiver(key="k") as rx:
        req = RequestSpec("from-child", 300, 299)
        src = payload(LAYOUT, req)
        dest = np.zeros(sum(a.nbytes for a in src), np.uint8)
        incoming = rx.expect(req.request_id, dest, layout=LAYOUT)

        def child() -> None:
            with connect(*rx.address, key="k", lanes=2) as own:
                out = own.send(LAYOUT, req)
                out.write_all(src)
                out.finish().result(10)

        assert _in_child(child) == 0
        incoming.result(10)
        assert np.array_equal(dest, np.concatenate(src))
