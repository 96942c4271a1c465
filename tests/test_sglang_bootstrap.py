"""The SGLang backend's bootstrap mailbox as an attacker sees it: real sockets, no SGLang, no torch.

An unauthenticated body is refused before a byte of it is read (the server process's peak RSS does not grow),
slow unauthenticated connections hold a bounded number of threads and keep no signed post out, a signed body
that dribbles in is cut at its deadline, a forged,
tampered, stale or replayed request changes nothing, and the mailbox serves IPv6 and dual-stack.
"""

from __future__ import annotations

import http.client
import os
import socket
import subprocess
import sys
import threading
import time

import pytest
from helpers import has_ipv6_loopback

from kvwire.adapters.sglang_bootstrap import (
    AUTH,
    MAX_BODY,
    PATH,
    WINDOW,
    MailboxClient,
    MailboxServer,
    Nonces,
    head_mac,
    sign,
)

KEY = b"mailbox-test-key"
BODY_TIMEOUT = 5.0  # kvwire.signing.BODY_TIMEOUT, as documented (a 200-byte body adds 0.2 ms at BODY_RATE)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _put(addr: tuple[str, int], target: str, body: bytes, auth: str | None) -> int:
    conn = http.client.HTTPConnection(*addr, timeout=10)
    try:
        headers = {"Content-Type": "application/json"} | ({AUTH: auth} if auth is not None else {})
        conn.request("PUT", target, body=body, headers=headers)
        return conn.getresponse().status
    finally:
        conn.close()


def _hwm_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads the server's peak RSS from /proc")
def test_unauthenticated_body_is_refused_unread() -> None:
    """Four clients each claim and stream a MAX_BODY (16 MiB) body without a valid signature: each is answered
    401 after its head, and the server process's peak RSS grows by less than 4 MiB (reading the bodies would
    add 16 MiB at least). A signed post still goes through."""
    code = ("import sys; from kvwire.adapters.sglang_bootstrap import MailboxServer; "
            f"s = MailboxServer('127.0.0.1', 0, {KEY!r}); print(s.address[1], flush=True); sys.stdin.read()")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
    try:
        assert proc.stdout is not None
        addr = ("127.0.0.1", int(proc.stdout.readline()))
        c = MailboxClient(*addr, KEY, timeout=10)
        c.post(0, 0, {"warm": 1})  # the server's own first-request allocations, before the baseline
        assert c.take(0, 0) == [{"warm": 1}]
        before = _hwm_kib(proc.pid)
        chunk = b"1," * (1 << 19)  # 1 MiB

        def attack(auth: str | None) -> None:
            with socket.create_connection(addr, timeout=10) as s:
                head = f"PUT {PATH}post?dp=0&rank=0 HTTP/1.1\r\nHost: x\r\nContent-Length: {MAX_BODY}\r\n"
                head += "" if auth is None else f"{AUTH}: {auth}\r\n"
                s.sendall(head.encode() + b"\r\n")
                try:
                    for _ in range(MAX_BODY // len(chunk)):
                        s.sendall(chunk)
                except OSError:
                    pass  # the server answered and closed: what we want
                try:
                    answer = s.recv(64)
                except OSError:
                    answer = b""
                assert answer == b"" or answer.startswith(b"HTTP/1.0 401"), answer

        forged = sign(b"not-the-key", "PUT", f"{PATH}post?dp=0&rank=0", b"1," * (MAX_BODY // 2))
        threads = [threading.Thread(target=attack, args=(a,)) for a in (None, forged, "garbage", forged)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        grew = _hwm_kib(proc.pid) - before
        assert grew < 4096, f"server peak RSS grew {grew} KiB"
        c.post(0, 0, {"room": 1})
        assert c.take(0, 0) == [{"room": 1}]
    finally:
        proc.kill()
        proc.wait(10)


def test_slow_connections_hold_bounded_threads_and_keep_no_post_out() -> None:
    """100 connections that send half a request line and stall: the server holds at most its gate's 8
    unauthenticated connections (threads), cuts the rest, and a signed post and take go through at once."""
    base = threading.active_count()
    srv = MailboxServer("127.0.0.1", 0, KEY, max_unauthenticated=8)
    slow: list[socket.socket] = []
    try:
        for _ in range(100):
            s = socket.create_connection(srv.address, timeout=10)
            s.sendall(f"PUT {PATH}post?dp=0&ra".encode())
            slow.append(s)
        deadline = time.monotonic() + 10
        while threading.active_count() - base > 1 + 8 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert threading.active_count() - base <= 1 + 8, threading.active_count() - base  # serve_forever + 8
        c = MailboxClient(*srv.address, KEY, timeout=10)
        t0 = time.monotonic()
        c.post(0, 2, {"room": 7})
        assert c.take(0, 2) == [{"room": 7}]
        assert time.monotonic() - t0 < 4.0  # not after the stalled heads' deadline (5 s)
        cut = 0
        for s in slow:  # the evicted ones were closed by the server
            s.settimeout(0.01)
            try:
                cut += s.recv(1) == b""
            except (TimeoutError, OSError):
                pass
        assert cut >= 100 - 8
    finally:
        for s in slow:
            s.close()
        srv.close()


def test_dribbled_signed_body_is_cut_at_its_deadline() -> None:
    """A key holder (or a broken peer) signs a 200-byte post and sends its body one byte per 0.5 s: every read
    returns well within the per-read IO_TIMEOUT (10 s), so only a deadline on the whole body ends it. The
    server answers 408 and closes within BODY_TIMEOUT (5 s) + 200 / BODY_RATE, the message is not posted, and
    a signed post on another connection meanwhile is served at once. Before the deadline, the connection was
    still held after 45 s of one byte per 9 s. Negative controls: a body that comes in three pieces 0.4 s apart,
    and a 4 MiB one at loopback speed, are posted."""
    srv = MailboxServer("127.0.0.1", 0, KEY)
    try:
        c = MailboxClient(*srv.address, KEY, timeout=10)
        target = f"{PATH}post?dp=0&rank=3"
        body = b'{"room":9,"pad":"' + b"x" * 180 + b'"}'

        def head(b: bytes) -> bytes:
            return (f"PUT {target} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(b)}\r\n"
                    f"{AUTH}: {sign(KEY, 'PUT', target, b)}\r\n\r\n").encode()

        with socket.create_connection(srv.address, timeout=10) as s:
            s.sendall(head(body))
            t0, sent, answer = time.monotonic(), 0, b""
            s.settimeout(0.5)
            while time.monotonic() - t0 < BODY_TIMEOUT + 3 and sent < len(body) - 1:
                try:
                    s.sendall(body[sent:sent + 1])
                    sent += 1
                except OSError:  # reset after the answer: cut
                    break
                if sent == 2:  # the mailbox still serves other connections meanwhile
                    t1 = time.monotonic()
                    c.post(0, 4, {"room": 10})
                    assert time.monotonic() - t1 < 1.0
                try:
                    answer = s.recv(64)
                    break
                except TimeoutError:
                    pass
            took = time.monotonic() - t0
        assert answer.startswith(b"HTTP/1.0 408"), (answer, sent, took)
        assert BODY_TIMEOUT - 0.5 < took < BODY_TIMEOUT + 1.5, took
        assert sent < len(body) - 1
        assert c.take(0, 3) == [] and c.take(0, 4) == [{"room": 10}]  # nothing of the cut body was posted

        slow = b'{"room":11}'
        with socket.create_connection(srv.address, timeout=10) as s:  # slow, but within the deadline
            s.sendall(head(slow))
            for i in range(0, len(slow), 4):
                time.sleep(0.4)
                s.sendall(slow[i:i + 4])
            assert s.recv(64).startswith(b"HTTP/1.0 204")
        big = {"room": 12, "pages": list(range(500_000))}  # 4.3 MB of JSON, deadline 9 s
        c.post(0, 3, big)
        assert c.take(0, 3) == [{"room": 11}, big]
    finally:
        srv.close()


def test_forged_tampered_stale_and_replayed_requests_change_nothing() -> None:
    srv = MailboxServer("127.0.0.1", 0, KEY)
    try:
        c = MailboxClient(*srv.address, KEY, timeout=5)
        target, body = f"{PATH}post?dp=0&rank=1", b'{"room":5,"type":"abort"}'
        auth = sign(KEY, "PUT", target, body)
        assert _put(srv.address, target, body, auth) == 204
        assert _put(srv.address, target, body, auth) == 401  # the same request again: replayed
        assert _put(srv.address, target, body, None) == 401
        assert _put(srv.address, target, body, sign(b"wrong", "PUT", target, body)) == 401
        auth2 = sign(KEY, "PUT", target, body)
        assert _put(srv.address, target, b'{"room":6,"type":"abort"}', auth2) == 401  # body swapped
        assert _put(srv.address, f"{PATH}post?dp=0&rank=2", body, sign(KEY, "PUT", target, body)) == 401
        stale = sign(KEY, "PUT", target, body, now=time.time() - 2 * WINDOW)
        assert _put(srv.address, target, body, stale) == 401
        assert _put(srv.address, f"{PATH}info", b'{"dp_size":9}', sign(b"wrong", "PUT", f"{PATH}info",
                                                                        b'{"dp_size":9}')) == 401
        with pytest.raises(OSError, match="404"):
            c.info()  # the forged info changed nothing
        assert c.take(0, 1) == [{"room": 5, "type": "abort"}] and c.take(0, 2) == []
        with pytest.raises(OSError, match="401"):
            MailboxClient(*srv.address, b"wrong", timeout=5).take(0, 1)  # taking is signed too
        with pytest.raises(ValueError, match="KVWIRE_KEY"):
            MailboxServer("127.0.0.1", 0, b"")
        ts, nonce = f"{time.time():.3f}", "ab" * 16  # a key holder's claim over the bound: refused, not read
        head = head_mac(KEY, "PUT", target, ts, nonce, MAX_BODY + 1).hex()
        with socket.create_connection(srv.address, timeout=10) as s:
            s.sendall(f"PUT {target} HTTP/1.1\r\nContent-Length: {MAX_BODY + 1}\r\n"
                      f"{AUTH}: {ts} {nonce} {head} {'00' * 32}\r\n\r\n".encode())
            assert s.recv(64).startswith(b"HTTP/1.0 413")
    finally:
        srv.close()


@pytest.mark.skipif(not has_ipv6_loopback(), reason="no IPv6 loopback here")
def test_mailbox_over_ipv6_and_dual_stack() -> None:
    srv = MailboxServer("::1", 0, KEY)
    try:
        assert srv.address[0] == "::1"
        c = MailboxClient("::1", srv.address[1], KEY, timeout=5)
        assert c.base.startswith("http://[::1]:")
        c.post(1, 0, {"room": 3, "endpoint": ["::1", 4242]})
        assert c.take(1, 0) == [{"room": 3, "endpoint": ["::1", 4242]}]
    finally:
        srv.close()
    if not socket.has_dualstack_ipv6():
        return
    srv = MailboxServer("::", 0, KEY)
    try:
        for host in ("::1", "[::1]", "127.0.0.1"):
            c = MailboxClient(host, srv.address[1], KEY, timeout=5)
            c.put_info({"dp_size": 2, "via": host})
            assert c.info() == {"dp_size": 2, "via": host}
    finally:
        srv.close()


def test_nonces_spent_once_within_the_window_and_bounded() -> None:
    n = Nonces(window=10, max_nonces=2)
    assert n.check("100", "a", now=100) is None
    assert n.check("100", "a", now=105) == "replayed nonce"
    assert n.check("100", "b", now=100) is None and n.check("100", "c", now=100) == "busy"
    assert n.check("100", "c", now=111) == "time 100 is more than 10 s off"
    assert n.check("nan", "d", now=100) is not None and n.check("x", "d", now=100) == "malformed time"
    assert n.check("121", "a", now=121) is None  # the old ones are forgotten once their time is out
