"""Connections waiting for a request head on the PrfaaS uvicorn servers (``prfaas.httpgate``): the node's
control API (``node.control_server``, configured as the node runs it: ``limit_concurrency`` 256) and the front
door (``frontdoor.http_server``). Real uvicorn, real sockets on 127.0.0.1.

Before: uvicorn gives a fresh connection no deadline for its head, and its keep-alive timer is reset by any
byte, so 300 keyless sockets (idle, half a head, or a finished ``GET /health`` then a dribbled second head)
held every slot and each signed request got uvicorn's 503 for as long as they stayed. Now each head has
``HEAD_SECONDS`` and at most ``MAX_WAITING`` connections wait at once (a new one always gets in)."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from helpers import closed_by_peer as _closed
from helpers import node_like_app, serving
from helpers import read_response as _read_response

uvicorn = pytest.importorskip("uvicorn")
pytest.importorskip("starlette")

from kvwire.prfaas import frontdoor, httpgate, node  # noqa: E402
from kvwire.prfaas.controlauth import AUTH, ControlAuth, sign  # noqa: E402

KEY = b"httpgate-tests"
HEAD = httpgate.HEAD_SECONDS
HALF_HEAD = b"GET /health HTTP/1.1\r\nHost: node\r\n"  # no blank line: the head never ends


def _protocols() -> list[Any]:
    out: list[Any] = ["h11"]
    try:
        import httptools  # noqa: F401
    except ImportError:
        out.append(pytest.param("httptools", marks=pytest.mark.skip(reason="httptools is not installed")))
    else:
        out.append("httptools")
    return out


@pytest.fixture(params=_protocols())
def node_port(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[int]:
    """A node's control server (``node.control_server``, as ``node.main`` builds it) over a stand-in app."""
    if request.param == "httptools":
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

        monkeypatch.setattr(httpgate, "HTTP_PROTOCOL", HttpToolsProtocol)
    server = node.control_server(ControlAuth(node_like_app, KEY), "127.0.0.1", 0)
    assert server.config.limit_concurrency == 256
    with serving(server) as port:
        yield port


def _connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=5)


def _signed_head(path: str = "/checkpoints") -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: node\r\n{AUTH}: {sign(KEY, 'GET', path, b'')}\r\n\r\n".encode()


def _signed_get(port: int) -> tuple[int | str, float]:
    """A signed ``GET /checkpoints`` on a fresh connection: its status (or the error) and how long it took."""
    t0 = time.monotonic()
    try:
        with _connect(port) as c:
            c.sendall(_signed_head())
            status, _ = _read_response(c)
            return status, time.monotonic() - t0
    except OSError as e:
        return f"{type(e).__name__}: {e}", time.monotonic() - t0


def _health_then(port: int) -> socket.socket:
    """A connection that completed a keyless ``GET /health`` (answered 200), left open for the next head."""
    c = _connect(port)
    c.sendall(b"GET /health HTTP/1.1\r\nHost: node\r\n\r\n")
    assert _read_response(c)[0] == 200
    return c


def _dribble(c: socket.socket, i: int) -> None:
    """The ``i``-th byte of an endless next head (``GET /health`` then headers, one byte a call)."""
    head = HALF_HEAD + b"x-pad: " + b"a" * 10_000
    with contextlib.suppress(OSError):
        c.send(head[i % len(head):i % len(head) + 1])


# ------------------------------------------------------------ the deadline
def test_waiting_connections_are_closed_at_the_head_deadline(node_port: int) -> None:
    """Idle, half-sent and dribbling-after-/health connections (fewer than any bound: only the deadline can
    close them) are each closed ``HEAD_SECONDS`` after their wait began: the accept, or the end of the /health
    response; a dribbler's bytes (one every 0.2 s) do not restart it. Before: all open at 2x the deadline."""
    kinds: dict[str, list[tuple[socket.socket, float]]] = {"idle": [], "half head": [], "/health, then dribbling": []}
    for _ in range(8):
        c = _connect(node_port)
        kinds["idle"].append((c, time.monotonic()))
        c = _connect(node_port)
        c.sendall(HALF_HEAD)
        kinds["half head"].append((c, time.monotonic()))
    for _ in range(6):
        c = _health_then(node_port)
        kinds["/health, then dribbling"].append((c, time.monotonic()))
    closed_after: dict[str, list[float]] = {k: [] for k in kinds}
    open_: dict[socket.socket, tuple[str, float]] = {c: (k, t) for k, v in kinds.items() for c, t in v}
    i, end = 0, time.monotonic() + 2 * HEAD
    while open_ and time.monotonic() < end:
        for c, _ in kinds["/health, then dribbling"]:
            if c in open_:
                _dribble(c, i)
        i += 1
        time.sleep(0.2)
        for c in [c for c in open_ if _closed(c)]:
            k, t = open_.pop(c)
            closed_after[k].append(time.monotonic() - t)
    for v in kinds.values():
        for c, _ in v:
            c.close()
    print("\nclosed after (s): " + "; ".join(f"{k}: {sorted(round(x, 1) for x in v)}"
                                              for k, v in closed_after.items()))
    assert not open_, f"{len(open_)} connections still open {2 * HEAD:.0f} s on: " \
                      f"{sorted({k for k, _ in open_.values()})}"
    for k, after in closed_after.items():
        assert all(HEAD - 0.3 < x < HEAD + 1.5 for x in after), (k, after)


# ------------------------------------------------------------ the slots
def test_a_keyless_flood_leaves_signed_requests_answered(node_port: int) -> None:
    """300 keyless connections kept open (a third idle, a third half a head, a third a finished /health then a
    dribbled head; each one cut is opened again within 0.5 s), 2.2x the deadline long: a signed request on a fresh
    connection every 0.25 s gets 200 within 1 s throughout. Before: 503 each time, the flood never cut."""
    stop = threading.Event()
    stats = {"opened": 0, "cut": 0}
    kinds = ("idle", "half head", "/health, then dribbling")

    def open_one(kind: str) -> socket.socket | None:
        try:
            if kind == "/health, then dribbling":
                return _health_then(node_port)
            c = _connect(node_port)
            if kind == "half head":
                c.sendall(HALF_HEAD)
            return c
        except (OSError, AssertionError):
            return None
        finally:
            stats["opened"] += 1

    def flood() -> None:
        conns: list[tuple[str, socket.socket | None]] = [(kinds[n % 3], None) for n in range(300)]
        i = 0
        while not stop.is_set():  # a pass every 0.5 s: the cut ones reopened, the dribblers a byte each
            for n, (kind, c) in enumerate(conns):
                if stop.is_set():
                    break
                if c is None or _closed(c):
                    if c is not None:
                        c.close()
                        stats["cut"] += 1
                    conns[n] = (kind, open_one(kind))
                elif kind == "/health, then dribbling":
                    _dribble(c, i)
            i += 1
            stop.wait(0.5)
        for _, c in conns:
            if c is not None:
                c.close()

    attacker = threading.Thread(target=flood, daemon=True)
    attacker.start()
    try:
        while stats["opened"] < 300:  # the flood in place first
            time.sleep(0.05)
        results: list[tuple[float, int | str, float]] = []
        t0 = time.monotonic()
        while time.monotonic() - t0 < 2.2 * HEAD:
            status, took = _signed_get(node_port)
            results.append((time.monotonic() - t0, status, took))
            time.sleep(0.25)
    finally:
        stop.set()
        attacker.join(30)
    bad = [r for r in results if r[1] != 200 or r[2] >= 1.0]
    print(f"\n{len(results)} signed requests during the flood: {len(results) - len(bad)} answered 200 within 1 s, "
          f"slowest {max(r[2] for r in results) * 1000:.0f} ms; flood connections opened {stats['opened']}, "
          f"cut by the server {stats['cut']}")
    assert not bad, bad[:5]
    assert stats["cut"] > 0  # the flood's connections were cut, not merely outnumbered


# ------------------------------------------------------------ negative controls
def test_a_slow_client_within_the_deadline_is_served_and_its_connection_kept(node_port: int) -> None:
    """A signed head sent in 6 pieces 0.5 s apart (2.5 s), then, after 1.5 s idle on the same connection, a
    second one in 4 pieces 0.5 s apart (whole 3 s after the first response, under the 5 s): both answered."""
    with _connect(node_port) as c:
        for n in range(2):
            head = _signed_head()
            step = -(-len(head) // (6 if n == 0 else 4))
            if n == 1:
                time.sleep(1.5)
            for k in range(0, len(head), step):
                c.sendall(head[k:k + step])
                time.sleep(0.5)
            assert _read_response(c)[0] == 200


def test_keep_alive_reuse_and_pipelining_still_work(node_port: int) -> None:
    """One connection: four signed requests 1 s apart, then two pipelined in one write; all answered on it."""
    with _connect(node_port) as c:
        for _ in range(4):
            c.sendall(_signed_head())
            assert _read_response(c)[0] == 200
            time.sleep(1.0)
        c.sendall(_signed_head() + _signed_head("/health"))
        c.settimeout(5)
        data = b""
        while data.count(b"HTTP/1.1 200") < 2:
            part = c.recv(4096)
            assert part, data
            data += part


def test_a_new_connection_evicts_the_oldest_waiting_one() -> None:
    """With the table full (``MAX_WAITING`` idle, from two sources), one more connection is admitted and the
    oldest waiting connection of the busiest source is the one closed."""
    server = node.control_server(ControlAuth(node_like_app, KEY), "127.0.0.1", 0)
    with serving(server) as port:
        def from_(addr: str) -> socket.socket:
            c = socket.socket()
            c.bind((addr, 0))
            c.connect(("127.0.0.1", port))
            return c

        half = httpgate.MAX_WAITING // 2
        a = [from_("127.0.0.2") for _ in range(half)]
        b = [from_("127.0.0.3") for _ in range(half)]
        time.sleep(0.3)
        assert len(server.gate) == httpgate.MAX_WAITING
        extra = from_("127.0.0.3")  # b's source then holds the most: b[0] (its oldest) goes
        time.sleep(0.3)
        assert _closed(b[0]) and not any(_closed(c) for c in a + b[1:])
        assert server.gate.evicted == 1 and len(server.gate) == httpgate.MAX_WAITING
        extra.sendall(_signed_head())
        assert _read_response(extra)[0] == 200
        for c in a + b + [extra]:
            c.close()


# ------------------------------------------------------------ the front door, and every server
def test_the_front_door_closes_idle_connections_at_the_deadline(monkeypatch: pytest.MonkeyPatch) -> None:
    """The front door (``frontdoor.http_server``, as ``main`` serves it; no lifespan: no nodes polled): 20 idle
    keyless connections are closed at ``HEAD_SECONDS``, and ``GET /v1/models`` is answered meanwhile. Before:
    each held an fd for as long as the client liked (the front door sets no ``limit_concurrency``)."""
    pytest.importorskip("prometheus_client")
    from pathlib import Path

    from kvwire.prfaas import config as deploy_config

    monkeypatch.setenv("KVWIRE_KEY", KEY.decode())
    door = frontdoor.FrontDoor(deploy_config.load(Path(frontdoor.__file__).with_name("deploy-default.toml")))
    with serving(frontdoor.http_server(door, lifespan="off")) as port:
        idle = [_connect(port) for _ in range(20)]
        t0 = time.monotonic()
        with _connect(port) as c:
            c.sendall(b"GET /v1/models HTTP/1.1\r\nHost: door\r\n\r\n")
            assert _read_response(c)[0] == 200
        while not all(_closed(c) for c in idle) and time.monotonic() - t0 < 2 * HEAD:
            time.sleep(0.1)
        took = time.monotonic() - t0
        for c in idle:
            c.close()
    assert took < HEAD + 1.5, f"idle connections still open after {took:.1f} s"


def test_every_uvicorn_server_in_prfaas_goes_through_httpgate() -> None:
    """No module of ``kvwire.prfaas`` but ``httpgate`` builds a uvicorn server or config itself."""
    from pathlib import Path

    pkg = Path(httpgate.__file__).parent
    offenders = [p.name for p in pkg.glob("*.py") if p.name != "httpgate.py"
                 and any(s in p.read_text() for s in ("uvicorn.run(", "uvicorn.Server(", "uvicorn.Config("))]
    assert offenders == []


def test_the_front_door_cuts_a_dribbled_public_body_at_its_deadline(monkeypatch: pytest.MonkeyPatch) -> None:
    """``POST /v1/completions`` needs no key: a body dribbled a byte every 0.3 s held its connection for as long
    as the client liked (the gate lets go of a connection once its head is in). Now a 408 at
    ``signing.body_seconds`` (5 s for a small body); a body sent in pieces within it is read (400 here: the
    stand-in body is not a prompt, which is past the read)."""
    from pathlib import Path

    from kvwire.prfaas import config as deploy_config
    from kvwire.signing import BODY_TIMEOUT

    monkeypatch.setenv("KVWIRE_KEY", KEY.decode())
    door = frontdoor.FrontDoor(deploy_config.load(Path(frontdoor.__file__).with_name("deploy-default.toml")))
    body = b'{"prompt": "' + b"a" * 100 + b'", "max_tokens": 0}'
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: door\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    with serving(frontdoor.http_server(door, lifespan="off")) as port:
        with _connect(port) as c:
            c.sendall(head)
            t0, sent, status = time.monotonic(), 0, None
            c.settimeout(0.3)
            while time.monotonic() - t0 < BODY_TIMEOUT + 3 and status is None:
                if sent < len(body) - 1:
                    c.sendall(body[sent:sent + 1])
                    sent += 1
                try:
                    data = c.recv(4096)
                except TimeoutError:
                    continue
                status = int(data.split(b" ", 2)[1]) if data else -1
            took = time.monotonic() - t0
        with _connect(port) as c:  # the control: the whole body in 4 pieces 0.5 s apart
            c.sendall(head)
            for i in range(0, len(body), 32):
                time.sleep(0.5)
                c.sendall(body[i:i + 32])
            control = _read_response(c, 10.0)[0]
    print(f"\ndribbled public body: {status} after {took:.2f} s ({sent} bytes); in pieces: {control}")
    assert status == 408 and BODY_TIMEOUT - 0.5 < took < BODY_TIMEOUT + 2
    assert control in (200, 400, 503) and control != 408


def test_a_slow_reader_gets_a_large_answer_whole(node_port: int) -> None:
    """8 MiB streamed to a client reading ~1.2 MiB/s (7 s, past HEAD_SECONDS): the whole answer arrives (the
    write-stall bound does not cut a client that reads, however slowly)."""
    c = socket.socket()
    c.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
    c.connect(("127.0.0.1", node_port))
    with c:
        c.sendall(_signed_head("/big"))
        c.settimeout(10)
        got, t0 = 0, time.monotonic()
        while got < (8 << 20) + 60:
            part = c.recv(65536)
            if not part:
                break
            got += len(part)
            time.sleep(len(part) / (1.2 * (1 << 20)))
        took = time.monotonic() - t0
    print(f"\na slow reader: {got} bytes in {took:.1f} s")
    assert took > HEAD and got >= 8 << 20


def test_a_client_that_reads_none_of_its_response_is_cut(node_port: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """A signed ``GET /big`` (8 MiB streamed) whose client reads none of it: the app waits on the client, the
    connection counts as served (the head gate lets go of it) and held a ``limit_concurrency`` slot for good.
    Now it is aborted ``WRITE_STALL_SECONDS`` after writing paused (1 s here). The control: a client reading
    the same response gets all 8 MiB."""
    monkeypatch.setattr(httpgate, "WRITE_STALL_SECONDS", 1.0)
    c = socket.socket()
    c.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    c.connect(("127.0.0.1", node_port))
    with c:
        c.sendall(_signed_head("/big"))
        t0, cut = time.monotonic(), None
        c.settimeout(0.5)
        while cut is None and time.monotonic() - t0 < 15:
            time.sleep(0.5)
            try:
                c.send(b"G")  # a byte of a next head: refused once the server aborted
            except (ConnectionResetError, BrokenPipeError):
                cut = time.monotonic() - t0
            except TimeoutError:
                pass
    print(f"\na client reading none of its response: cut {cut} s after its request")
    assert cut is not None and cut < 6, "a client reading nothing still held its connection after 15 s"
    with _connect(node_port) as r:  # the control
        r.sendall(_signed_head("/big"))
        status, body = _read_response(r, 10.0)
    assert status == 200 and len(body) == 8 << 20
