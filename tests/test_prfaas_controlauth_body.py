"""A signed body on the PrfaaS control API (``prfaas.controlauth.ControlAuth``, the middleware every node and the
front door's admin route run under uvicorn) must arrive whole within ``signing.body_seconds``: a key holder, or
a broken peer, dribbling a body held its connection slot for as long as it liked (uvicorn has no body
timeout; ``limit_concurrency`` slots are few). Real uvicorn, real sockets."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest
from helpers import serving

uvicorn = pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from kvwire.prfaas.controlauth import AUTH, ControlAuth, sign  # noqa: E402
from kvwire.signing import BODY_TIMEOUT  # noqa: E402

KEY = b"controlauth-body-key"


async def _echo(scope, receive, send) -> None:  # type: ignore[no-untyped-def]
    """The app behind the middleware: answers the body's length."""
    body = b""
    while True:
        msg = await receive()
        body += msg.get("body", b"")
        if not msg.get("more_body", False):
            break
    out = str(len(body)).encode()
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", str(len(out)).encode())]})
    await send({"type": "http.response.body", "body": out})


@pytest.fixture
def server() -> Iterator[int]:
    with serving(uvicorn.Server(uvicorn.Config(ControlAuth(_echo, KEY), log_level="warning", lifespan="off"))) as port:
        yield port


def _dribble(port: int, body: bytes, gap: float, give_up: float) -> tuple[bytes, float, int]:
    """POST ``body`` signed, one byte every ``gap`` s (all but the last byte first when ``gap`` is 0): the
    answer's first bytes (b"" if none within ``give_up`` s), when it came, and the body bytes sent by then."""
    head = (f"POST /x HTTP/1.1\r\nhost: node\r\ncontent-length: {len(body)}\r\n"
            f"{AUTH}: {sign(KEY, 'POST', '/x', body)}\r\n\r\n").encode()
    c = socket.create_connection(("127.0.0.1", port))
    try:
        c.sendall(head)
        c.settimeout(gap or give_up)
        t0, sent = time.monotonic(), 0
        while time.monotonic() - t0 < give_up:
            if sent < len(body):
                c.sendall(body[sent:sent + 1])
                sent += 1
            try:
                data = c.recv(4096)
                return data, time.monotonic() - t0, sent
            except TimeoutError:
                continue
        return b"", time.monotonic() - t0, sent
    finally:
        c.close()


def test_a_dribbled_signed_body_is_cut_at_its_deadline_and_others_are_served(server: int) -> None:
    """200 bytes at one every 0.3 s: 408 at BODY_TIMEOUT (5 s; before: no answer after 8 s), while a signed
    request on another connection is answered at once meanwhile."""
    other: list[float] = []

    def meanwhile() -> None:
        time.sleep(1.0)
        body = b"y" * 50
        t0 = time.monotonic()
        r = httpx.post(f"http://127.0.0.1:{server}/x", content=body, headers={AUTH: sign(KEY, "POST", "/x", body)})
        assert r.status_code == 200 and r.text == "50"
        other.append(time.monotonic() - t0)

    t = threading.Thread(target=meanwhile)
    t.start()
    answer, took, sent = _dribble(server, b"x" * 200, 0.3, BODY_TIMEOUT + 3)
    t.join(10)
    print(f"\ndribbled body: {answer[:12]!r} after {took:.2f} s, {sent} of 200 bytes sent; the other request "
          f"{other[0] * 1000:.0f} ms")
    assert answer.startswith(b"HTTP/1.1 408"), answer
    assert BODY_TIMEOUT - 0.5 < took < BODY_TIMEOUT + 2.0
    assert other and other[0] < 1.0


def test_a_body_sent_in_slow_pieces_within_the_deadline_is_taken(server: int) -> None:
    """The negative control: the same 200 bytes in 8 pieces 0.4 s apart (2.8 s) reach the app."""
    body = b"z" * 200
    head = (f"POST /x HTTP/1.1\r\nhost: node\r\ncontent-length: {len(body)}\r\n"
            f"{AUTH}: {sign(KEY, 'POST', '/x', body)}\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", server)) as c:
        c.sendall(head)
        for i in range(0, 200, 25):
            time.sleep(0.4)
            c.sendall(body[i:i + 25])
        c.settimeout(5)
        answer = b""
        while not answer.endswith(b"\r\n\r\n200") and (part := c.recv(4096)):
            answer += part
    assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b"200"), answer
