"""A client that goes away in the middle of a public ``POST /v1/completions`` body. Real uvicorn, real sockets.

Before: starlette raised ``ClientDisconnect`` out of ``frontdoor.read_json`` and uvicorn logged a whole traceback
("Exception in ASGI application") for each such client: anyone, with no key, could fill the log. Now the request
ends quietly (nothing to answer: the client is gone) and the front door goes on serving."""

from __future__ import annotations

import dataclasses
import socket
import time
from pathlib import Path

import pytest
from helpers import read_response, serving

pytest.importorskip("uvicorn")
pytest.importorskip("starlette")
pytest.importorskip("prometheus_client")

from kvwire.prfaas import config as deploy_config  # noqa: E402
from kvwire.prfaas import frontdoor  # noqa: E402

HEAD = (b"POST /v1/completions HTTP/1.1\r\nHost: door\r\nContent-Type: application/json\r\n"
        b"Content-Length: 500\r\n\r\n{\"prompt\": ")  # 11 of its 500 bytes, then the client is gone


def test_a_client_gone_mid_body_leaves_no_traceback(monkeypatch: pytest.MonkeyPatch,
                                                    capfd: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("KVWIRE_KEY", "frontdoor-disconnect-tests")
    config = deploy_config.load(Path(frontdoor.__file__).with_name("deploy-default.toml"))
    door = frontdoor.FrontDoor(dataclasses.replace(config))
    with serving(frontdoor.http_server(door, lifespan="off")) as port:
        for _ in range(20):
            c = socket.create_connection(("127.0.0.1", port), timeout=5)
            c.sendall(HEAD)
            time.sleep(0.02)
            c.close()
        time.sleep(0.5)
        with socket.create_connection(("127.0.0.1", port), timeout=5) as c:  # the control: still serving
            c.sendall(b"GET /v1/models HTTP/1.1\r\nHost: door\r\n\r\n")
            status = read_response(c)[0]
    out, err = capfd.readouterr()
    tracebacks = (out + err).count("Traceback")
    print(f"\n20 clients gone mid-body: {tracebacks} tracebacks logged; then GET /v1/models: {status}")
    assert status == 200
    assert tracebacks == 0, (out + err)[-2000:]
