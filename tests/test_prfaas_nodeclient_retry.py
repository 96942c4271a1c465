"""The router's node client (``nodeclient.NodeClient``, httpx) when a node cuts a pooled keep-alive connection
just as a request goes out on it: what ``httpgate`` does under a flood (a waiting connection evicted for a newer
one, or past its head deadline) to a connection whose request it has not parsed yet.

A stand-in node on real sockets answers each connection's first request and, per ``cut``, resets a connection
(SO_LINGER 0, nothing answered) when a request arrives on it. Before: the router's next call on its pooled
connection failed (``NodeError: ReadError``) though the node was up and took none of it. Now it is sent once
more, the same signed bytes, on a fresh connection; a failure on a fresh connection, or once the answer began,
is still a ``NodeError`` and is not resent."""

from __future__ import annotations

import asyncio
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest

httpx = pytest.importorskip("httpx")

from kvwire.prfaas.controlauth import AUTH  # noqa: E402
from kvwire.prfaas.nodeclient import NodeClient, NodeError  # noqa: E402

KEY = b"nodeclient-retry-tests"


@dataclass
class _Seen:
    conn: int  # the connection's number, from 0
    nth: int  # the request's number on its connection, from 0
    path: str
    auth: str
    answered: bool


@dataclass
class _Node:
    """``cut(conn, nth)``: 'reset' (cut before answering), 'mid' (the head and part of the body, then cut) or
    None (answer)."""

    cut: Callable[[int, int], str | None]
    seen: list[_Seen] = field(default_factory=list)
    port: int = 0

    def serve(self, listener: socket.socket) -> None:
        n = 0
        while True:
            try:
                c, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=self._conn, args=(c, n), daemon=True).start()
            n += 1

    def _conn(self, c: socket.socket, conn: int) -> None:
        data, nth = b"", 0
        with c:
            c.settimeout(10)
            while True:
                while b"\r\n\r\n" not in data:
                    try:
                        part = c.recv(65536)
                    except OSError:
                        return
                    if not part:
                        return
                    data += part
                head, _, data = data.partition(b"\r\n\r\n")
                lines = head.decode().split("\r\n")
                hdrs = {k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:])}
                while len(data) < int(hdrs.get("content-length", 0)):
                    data += c.recv(65536)
                data = data[int(hdrs.get("content-length", 0)):]
                path = lines[0].split(" ")[1]
                how = self.cut(conn, nth)
                self.seen.append(_Seen(conn, nth, path, hdrs.get(AUTH.lower(), ""), how is None))
                body = b'{"token": 7}\n' if path == "/generate" else b'{"ok": true}'
                answer = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
                          + str(len(body)).encode() + b"\r\n\r\n" + body)
                if how == "mid":  # the head and half the body, taken by the client before the reset
                    c.sendall(answer[:-5])
                    time.sleep(0.3)
                if how is not None:
                    c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # RST
                    return
                c.sendall(answer)
                nth += 1


@pytest.fixture
def node() -> Iterator[Callable[[Callable[[int, int], str | None]], _Node]]:
    listeners: list[socket.socket] = []

    def start(cut: Callable[[int, int], str | None]) -> _Node:
        n = _Node(cut)
        ls = socket.create_server(("127.0.0.1", 0))
        listeners.append(ls)
        n.port = ls.getsockname()[1]
        threading.Thread(target=n.serve, args=(ls,), daemon=True).start()
        return n

    yield start
    for ls in listeners:
        ls.close()


def _second_request_cut(conn: int, nth: int) -> str | None:
    """The first connection's second request is cut before it is read: the race with the gate."""
    return "reset" if (conn, nth) == (0, 1) else None


def test_a_request_on_a_pooled_connection_cut_before_it_was_read_is_sent_again(node) -> None:  # type: ignore[no-untyped-def]
    """A signed ``GET /health``, then a signed ``POST /expect`` on the pooled connection, which the node
    resets: the POST is sent again, same signature, on a fresh connection, and succeeds."""
    n = node(_second_request_cut)

    async def go() -> None:
        async with NodeClient("127.0.0.1", n.port, timeout=5, key=KEY) as client:
            assert (await client.health()) == {"ok": True}
            await client.expect("r1", [1, 2, 3])
    asyncio.run(go())
    assert [(s.conn, s.nth, s.path, s.answered) for s in n.seen] == [
        (0, 0, "/health", True), (0, 1, "/expect", False), (1, 0, "/expect", True)]
    assert n.seen[1].auth == n.seen[2].auth != ""  # the same signed request: the node takes its nonce once


def test_the_generate_stream_is_sent_again_too(node) -> None:  # type: ignore[no-untyped-def]
    n = node(_second_request_cut)

    async def go() -> list[int]:
        async with NodeClient("127.0.0.1", n.port, timeout=5, key=KEY) as client:
            await client.health()
            return [t async for t in client.generate("r1", max_tokens=1)]
    assert asyncio.run(go()) == [7]
    assert [(s.conn, s.path, s.answered) for s in n.seen][1:] == [(0, "/generate", False), (1, "/generate", True)]


def test_negative_control_plain_httpx_on_that_pool_fails_with_a_reset(node) -> None:  # type: ignore[no-untyped-def]
    """The failure the retry answers: httpx's pool hands out the connection the node is about to cut (its
    idle check cannot see a cut that has not happened yet) and the request fails; httpx does not resend it."""
    n = node(_second_request_cut)

    async def go() -> BaseException | None:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{n.port}", timeout=5) as plain:
            assert (await plain.get("/health")).status_code == 200
            try:
                await plain.get("/health")
            except httpx.TransportError as e:
                return e
        return None
    err = asyncio.run(go())
    assert isinstance(err, (httpx.ReadError, httpx.RemoteProtocolError)), err
    assert len(n.seen) == 2


def test_a_fresh_connection_cut_is_not_sent_again(node) -> None:  # type: ignore[no-untyped-def]
    """Cut on a connection opened for it: the node may have taken it; one attempt, a clear ``NodeError``."""
    n = node(lambda conn, nth: "reset")

    async def go() -> None:
        async with NodeClient("127.0.0.1", n.port, timeout=5, key=KEY) as client:
            await client.expect("r1", [1, 2, 3])
    with pytest.raises(NodeError, match="/expect") as e:
        asyncio.run(go())
    assert e.value.status is None
    assert len(n.seen) == 1


def test_a_pooled_connection_cut_once_the_answer_began_is_not_sent_again(node) -> None:  # type: ignore[no-untyped-def]
    """The answer's head and part of its body, then the reset, on a reused connection: the node took the
    request; a ``NodeError``, one attempt."""
    n = node(lambda conn, nth: "mid" if (conn, nth) == (0, 1) else None)

    async def go() -> None:
        async with NodeClient("127.0.0.1", n.port, timeout=5, key=KEY) as client:
            await client.health()
            await client.expect("r1", [1, 2, 3])
    with pytest.raises(NodeError, match="/expect"):
        asyncio.run(go())
    assert [(s.conn, s.nth) for s in n.seen] == [(0, 0), (0, 1)]
