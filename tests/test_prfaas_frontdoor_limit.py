"""The front door's bound on connections served at once (``[router] limit_concurrency``, default
``settings.LIMIT_CONCURRENCY`` = 256, uvicorn's ``limit_concurrency``). Real uvicorn, real sockets.

Before: no bound; every public ``POST /v1/completions`` whose body was slow to come (or every completion in
flight) held its connection, task and buffers, however many came. Now past the bound each request is a 503 at
once and its connection closed."""

from __future__ import annotations

import dataclasses
import socket
import time
from pathlib import Path

import pytest
from helpers import closed_by_peer, read_response, serving

pytest.importorskip("uvicorn")
pytest.importorskip("starlette")
pytest.importorskip("prometheus_client")

from kvwire.prfaas import config as deploy_config  # noqa: E402
from kvwire.prfaas import frontdoor, settings  # noqa: E402

HEAD = (b"POST /v1/completions HTTP/1.1\r\nHost: door\r\nContent-Type: application/json\r\n"
        b"Content-Length: 50\r\n\r\n")  # its body never comes: held until its 408 (5 s)


def _door(monkeypatch: pytest.MonkeyPatch, **router: object) -> frontdoor.FrontDoor:
    monkeypatch.setenv("KVWIRE_KEY", "frontdoor-limit-tests")
    config = deploy_config.load(Path(frontdoor.__file__).with_name("deploy-default.toml"))
    return frontdoor.FrontDoor(dataclasses.replace(config, router={**config.router, **router}))


def test_the_default_bound_is_the_servers(monkeypatch: pytest.MonkeyPatch) -> None:
    door = _door(monkeypatch)
    assert door.settings.limit_concurrency == settings.LIMIT_CONCURRENCY == 256
    assert frontdoor.http_server(door).config.limit_concurrency == 256


def test_requests_past_the_bound_get_a_fast_503_and_their_connections_closed(monkeypatch: pytest.MonkeyPatch
                                                                            ) -> None:
    """``limit_concurrency = 8``: 40 public POSTs whose bodies never come, one connection each: 7 are held
    (uvicorn counts the new connection itself), the other 33 get a 503 within 1 s and are closed. The negative
    control: once the held ones are gone (408, closed), ``GET /v1/models`` is a 200. (From 10 source addresses, so
    that the bound met is the server's, not one address's: ``test_one_address_holds_half_the_slots_at_most``.)"""
    door = _door(monkeypatch, limit_concurrency=8)
    with serving(frontdoor.http_server(door, lifespan="off")) as port:
        conns: list[socket.socket] = []
        for i in range(40):
            c = socket.create_connection(("127.0.0.1", port), timeout=5, source_address=(f"127.0.0.{1 + i % 10}", 0))
            c.sendall(HEAD)
            conns.append(c)
            time.sleep(0.01)
        t0 = time.monotonic()
        refused = []
        for c in conns:
            try:
                refused.append(read_response(c, max(0.05, 1.0 - (time.monotonic() - t0)))[0])
            except TimeoutError:
                pass
        took = time.monotonic() - t0
        time.sleep(0.2)
        held = [c for c in conns if not closed_by_peer(c)]
        for c in conns:
            c.close()
        t1, status = time.monotonic(), 0
        while status != 200 and time.monotonic() - t1 < 5:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as c:
                c.sendall(b"GET /v1/models HTTP/1.1\r\nHost: door\r\n\r\n")
                status = read_response(c)[0]
            time.sleep(0.1)
    print(f"\n40 held POSTs at limit_concurrency 8: {len(refused)} answered 503 within {took:.2f} s, "
          f"{len(held)} held; then GET /v1/models: {status}")
    assert refused == [503] * 33 and len(held) == 7
    assert status == 200


def test_one_address_holds_half_the_slots_at_most(monkeypatch: pytest.MonkeyPatch) -> None:
    """``limit_concurrency = 8``: one address's 20 public POSTs whose bodies never come hold 4 slots (half), the
    other 16 get a 503 naming the bound at once and are closed, and a client at another address is served (200)
    while those 4 are held. Before: the one address held 7 (every slot uvicorn leaves) and the other client got
    uvicorn's 503 until their 408 (and again as soon as the address sent 7 more: the public door shut by one
    client with a handful of sockets)."""
    door = _door(monkeypatch, limit_concurrency=8)
    with serving(frontdoor.http_server(door, lifespan="off")) as port:
        conns: list[socket.socket] = []
        for _ in range(20):
            c = socket.create_connection(("127.0.0.1", port), timeout=5)
            c.sendall(HEAD)
            conns.append(c)
            time.sleep(0.01)
        answers = []
        for c in conns:
            try:
                answers.append(read_response(c, 0.3))
            except TimeoutError:
                pass
        held = [c for c in conns if not closed_by_peer(c)]
        with socket.create_connection(("127.0.0.1", port), timeout=5, source_address=("127.0.0.2", 0)) as c:
            c.sendall(b"GET /v1/models HTTP/1.1\r\nHost: door\r\n\r\n")
            other = read_response(c)[0]
        still = sum(not closed_by_peer(c) for c in held)
        for c in conns:
            c.close()
    print(f"\n20 held POSTs from one address at limit_concurrency 8: {len(answers)} answered "
          f"{sorted({a[0] for a in answers})}, {len(held)} held; another address's GET /v1/models: {other}")
    assert len(held) == still == 4
    assert [a[0] for a in answers] == [503] * 16 and all(b"more than 4 requests" in a[1] for a in answers)
    assert other == 200
    assert 'prfaas_http_cuts_total{server="frontdoor",reason="source_limit"} 16' in door.http_metrics.render()


def test_a_bad_bound_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    for bad in (0, -1, True, 2.5):
        with pytest.raises(deploy_config.ConfigError, match="limit_concurrency"):
            settings.FrontSettings.from_table({"limit_concurrency": bad})
