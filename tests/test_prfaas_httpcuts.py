"""What the PrfaaS HTTP servers cut, seen by an operator: ``prfaas_http_cuts_total{server, reason}`` at each
server's ``GET /metrics`` and one rate-limited warning (``httpgate.Cuts``). Real uvicorn, real sockets.

Before: the gate counted head deadlines and evictions in ``gate.expired`` / ``gate.evicted`` only, nothing was
exported or logged, write stalls and 408s were not counted at all, and uvicorn wrote one warning line per request
refused over ``limit_concurrency`` (an attacker wrote the log)."""

from __future__ import annotations

import logging
import re
import socket
import time
from pathlib import Path
from typing import Any

import pytest
from helpers import closed_by_peer, node_like_app, read_response, serving

pytest.importorskip("uvicorn")
pytest.importorskip("starlette")

from kvwire.metrics import CONTENT_TYPE, Metrics  # noqa: E402
from kvwire.prfaas import httpgate, node  # noqa: E402
from kvwire.prfaas.controlauth import AUTH, ControlAuth, sign  # noqa: E402

KEY = b"httpcuts-tests"


def _connect(port: int, source: str = "127.0.0.1") -> socket.socket:
    c = socket.socket()
    c.bind((source, 0))
    c.settimeout(5)
    c.connect(("127.0.0.1", port))
    return c


def _signed(method: str, path: str, length: int = 0) -> bytes:
    """A signed head for a body of ``length`` bytes (all zero bytes: never sent here, or sent whole)."""
    return (f"{method} {path} HTTP/1.1\r\nHost: node\r\nContent-Length: {length}\r\n"
            f"{AUTH}: {sign(KEY, method, path, bytes(length))}\r\n\r\n").encode()


def _cuts(port: int, server: str) -> dict[str, int]:
    """``prfaas_http_cuts_total`` of ``server`` by reason, read from ``GET /metrics`` (unsigned)."""
    with _connect(port) as c:
        c.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        status, body = read_response(c)
    assert status == 200, body[:200]
    text = body.decode()
    assert "# TYPE prfaas_http_cuts_total counter" in text
    return _parse(text, server)


def _parse(text: str, server: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for line in text.splitlines():
        m = re.fullmatch(rf'prfaas_http_cuts_total\{{server="{server}",reason="(\w+)"\}} (\S+)', line)
        if m:
            out[m[1]] = int(float(m[2]))
    return out


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def _stand_in(metrics: Metrics) -> Any:
    """Behind ``ControlAuth`` as the node's routes are: ``/metrics`` open (``metrics``), ``/big`` 8 MiB."""
    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["path"] != "/metrics":
            await node_like_app(scope, receive, send)
            return
        body = metrics.render().encode()
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", CONTENT_TYPE.encode()),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})
    return ControlAuth(app, KEY)


def test_every_cut_of_the_node_server_is_a_counter_at_metrics_and_the_warning_is_rate_limited(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The node's control server (``node.control_server``, ``limit_concurrency`` 4 here): an idle connection
    (head deadline), 33 idle ones from one source (one evicted), 2 signed POSTs whose bodies never come (two
    408s) holding with the idle one every slot, so a signed GET is refused (over limit), and a client reading none
    of an 8 MiB answer (write stall, 1 s here): each is counted under its reason. The warning: one line at the
    first cut, then at most one every ``LOG_SECONDS`` (3 s here) summing the rest; uvicorn's own line per refused
    request is gone."""
    monkeypatch.setattr(node, "LIMIT_CONCURRENCY", 4)
    monkeypatch.setattr(httpgate, "WRITE_STALL_SECONDS", 1.0)
    monkeypatch.setattr(httpgate, "LOG_SECONDS", 3.0)
    ours, uvicorns = _Lines(), _Lines()
    logging.getLogger("kvwire.prfaas.httpgate").addHandler(ours)
    logging.getLogger("uvicorn.error").addHandler(uvicorns)
    metrics = Metrics()
    server = node.control_server(_stand_in(metrics), "127.0.0.1", 0, metrics=metrics)
    try:
        with serving(server) as port:
            t0 = time.monotonic()
            idle = _connect(port)
            held = []
            for _ in range(2):  # uvicorn serves a request while fewer than the limit are open, its own counted
                held.append(_connect(port))
                held[-1].sendall(_signed("POST", "/expect", 100))  # its 100 bytes never come: 408 at 5 s
                time.sleep(0.2)
            with _connect(port) as c:  # 4 connections open: the limit
                c.sendall(_signed("GET", "/checkpoints"))
                assert read_response(c)[0] == 503
            flood = [_connect(port, "127.0.0.2") for _ in range(33)]  # 32 from one source at most: one evicted
            time.sleep(0.3)
            assert closed_by_peer(flood[0]) and not any(closed_by_peer(c) for c in flood[1:])
            for c in flood:
                c.close()
            for c in held:
                assert read_response(c, 10)[0] == 408
                c.close()
            while not closed_by_peer(idle) and time.monotonic() - t0 < 10:
                time.sleep(0.1)
            idle.close()
            stalled = socket.socket()
            stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            stalled.connect(("127.0.0.1", port))
            stalled.sendall(_signed("GET", "/big"))
            while time.monotonic() - t0 < 20:  # reading nothing: a byte of a next head, refused once aborted
                time.sleep(0.2)
                try:
                    stalled.send(b"G")
                except OSError:
                    break
            stalled.close()
            cuts = _cuts(port, "node")
            time.sleep(httpgate.LOG_SECONDS + 0.5)  # the last summary's turn
            took = time.monotonic() - t0
    finally:
        logging.getLogger("kvwire.prfaas.httpgate").removeHandler(ours)
        logging.getLogger("uvicorn.error").removeHandler(uvicorns)
    print(f"\ncuts at /metrics: {cuts}\nwarnings in {took:.1f} s:\n  " + "\n  ".join(ours.lines))
    assert cuts == {"head_deadline": 1, "evicted": 1, "write_stall": 1, "over_limit": 1, "body_deadline": 2,
                    "source_limit": 0}
    assert not any("concurrency" in line for line in uvicorns.lines), uvicorns.lines
    assert 2 <= len(ours.lines) <= 1 + took / httpgate.LOG_SECONDS, ours.lines
    summed = sum(int(m) for line in ours.lines for m in re.findall(r"cut (\d+) connection", line))
    assert summed == sum(cuts.values()) and all(line.startswith("node HTTP server cut") for line in ours.lines)


def test_the_front_door_exports_its_cuts_with_its_telemetry(monkeypatch: pytest.MonkeyPatch) -> None:
    """The front door (``frontdoor.http_server``, as ``main`` serves it; no lifespan): an idle connection and
    a public body that never comes are a ``head_deadline`` and a ``body_deadline`` cut of server ``frontdoor``
    at ``GET /metrics``, next to the telemetry families; no node's samples there."""
    pytest.importorskip("prometheus_client")
    from kvwire.prfaas import config as deploy_config
    from kvwire.prfaas import frontdoor

    monkeypatch.setenv("KVWIRE_KEY", KEY.decode())
    door = frontdoor.FrontDoor(deploy_config.load(Path(frontdoor.__file__).with_name("deploy-default.toml")))
    with serving(frontdoor.http_server(door, lifespan="off")) as port:
        before = _cuts(port, "frontdoor")
        idle = _connect(port)
        body = _connect(port)
        body.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: door\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 50\r\n\r\n")
        assert read_response(body, 10)[0] == 408
        t0 = time.monotonic()
        while not closed_by_peer(idle) and time.monotonic() - t0 < 5:
            time.sleep(0.1)
        idle.close()
        body.close()
        with _connect(port) as c:
            c.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            text = read_response(c)[1].decode()
    after = _parse(text, "frontdoor")
    assert before == dict.fromkeys(httpgate.REASONS, 0)
    assert after == {**before, "head_deadline": 1, "body_deadline": 1}, after
    assert "prfaas_requests_total" in text or "# TYPE prfaas_threshold_tokens gauge" in text
    assert 'server="node"' not in text


def test_a_quiet_server_exports_zeros_and_writes_no_warning() -> None:
    """The negative control: requests answered, kept alive and closed by the client cut nothing."""
    ours = _Lines()
    logging.getLogger("kvwire.prfaas.httpgate").addHandler(ours)
    metrics = Metrics()
    try:
        with serving(node.control_server(_stand_in(metrics), "127.0.0.1", 0, metrics=metrics)) as port:
            with _connect(port) as c:
                for _ in range(3):
                    c.sendall(_signed("GET", "/checkpoints"))
                    assert read_response(c)[0] == 200
            time.sleep(0.3)
            cuts = _cuts(port, "node")
    finally:
        logging.getLogger("kvwire.prfaas.httpgate").removeHandler(ours)
    assert cuts == dict.fromkeys(httpgate.REASONS, 0) and ours.lines == []


def test_a_flood_of_cuts_writes_one_line() -> None:
    """232 idle connections from one source (32 wait at most): 200 evictions, counted at ``/metrics``, one
    warning line (``LOG_SECONDS`` is 60: the next would sum whatever comes in the next minute)."""
    ours = _Lines()
    logging.getLogger("kvwire.prfaas.httpgate").addHandler(ours)
    metrics = Metrics()
    try:
        with serving(node.control_server(_stand_in(metrics), "127.0.0.1", 0, metrics=metrics)) as port:
            flood = [_connect(port, "127.0.0.2") for _ in range(232)]
            time.sleep(1.0)
            cuts = _cuts(port, "node")
            for c in flood:
                c.close()
    finally:
        logging.getLogger("kvwire.prfaas.httpgate").removeHandler(ours)
    assert cuts["evicted"] == 200 and len(ours.lines) == 1, (cuts, ours.lines)
