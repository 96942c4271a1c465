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
    control: once the held ones are gone (408, closed), ``GET /v1/models`` is a 200."""
    door = _door(monkeypatch, limit_concurrency=8)
    with serving(frontdoor.http_server(door, lifespan="off")) as port:
        conns: list[socket.socket] = []
        for _ in range(40):
            c = socket.create_connection(("127.0.0.1", port), timeout=5)
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


def test_a_bad_bound_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    for bad in (0, -1, True, 2.5):
        with pytest.raises(deploy_config.ConfigError, match="limit_concurrency"):
            settings.FrontSettings.from_table({"limit_concurrency": bad})
