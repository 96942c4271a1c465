"""The kvwire SGLang backend's control plane: a mailbox on the prefill instance's bootstrap port.

Owns: ``Mailbox`` (bounded, expiring per-(DP rank, TP rank) message queues), ``MailboxServer`` (HTTP/JSON over
it, started where SGLang starts its bootstrap server) and ``MailboxClient``. Decode ranks post their
request's destination (kvwire endpoint, page and slot indices, aux row: the N convention, decode allocates
first) or an abort; each prefill rank takes its own messages. Must not know: SGLang's classes, kvwire's
transport, what a message means (``sglang`` validates every field it reads).

Bounds (the port is reachable from the network, and nothing here is authenticated: the kvwire transfer it
leads to is): a body over ``MAX_BODY`` bytes is refused before it is read, at most ``MAX_QUEUED`` messages
wait in all, a message nobody takes within ``ttl`` seconds is dropped. JSON only, never pickle.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.request
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse

MAX_BODY = 16 << 20  # a 1M-token prompt's page list at page size 1, with room
MAX_QUEUED = 100_000
PATH = "/kvwire/v1/"


class Mailbox:
    """Per ``(dp, rank)`` FIFO of JSON messages; thread-safe and bounded."""

    def __init__(self, *, ttl: float = 600.0, max_queued: int = MAX_QUEUED) -> None:
        self.ttl = ttl
        self.max_queued = max_queued
        self._q: dict[tuple[int, int], deque[tuple[float, Any]]] = {}
        self._n = 0
        self._lock = threading.Lock()
        self._mail = threading.Condition(self._lock)
        self.info: dict[str, Any] = {}  # the prefill instance's parallel info (register_to_bootstrap)

    def _expire(self, now: float) -> None:
        for key in list(self._q):
            q = self._q[key]
            while q and now - q[0][0] > self.ttl:
                q.popleft()
                self._n -= 1
            if not q:
                del self._q[key]

    def post(self, dp: int, rank: int, msg: Any) -> bool:
        now = time.monotonic()
        with self._lock:
            self._expire(now)
            if self._n >= self.max_queued:
                return False
            self._q.setdefault((dp, rank), deque()).append((now, msg))
            self._n += 1
            self._mail.notify_all()
            return True

    def take(self, dp: int, rank: int, wait: float = 0.0) -> list[Any]:
        """Every message for ``(dp, rank)``; waits up to ``wait`` seconds (at most 2) for the first one."""
        with self._lock:
            if wait > 0:
                self._mail.wait_for(lambda: (dp, rank) in self._q, timeout=min(float(wait), 2.0))
            q = self._q.pop((dp, rank), None)
            if not q:
                return []
            self._n -= len(q)
            return [m for _t, m in q]


def _int(v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise ValueError("not an int")
    return v


class _Handler(BaseHTTPRequestHandler):
    server: MailboxServer

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet
        pass

    def _reply(self, code: int, body: Any = None) -> None:
        data = b"" if body is None else json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _where(self) -> tuple[int, int] | None:
        q = parse_qs(urlparse(self.path).query)
        try:
            return int(q["dp"][0]), int(q["rank"][0])
        except (KeyError, ValueError, IndexError):
            return None

    def _wait(self) -> float:
        try:
            return max(0.0, float(parse_qs(urlparse(self.path).query).get("wait", ["0"])[0]))
        except ValueError:
            return 0.0

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        url = urlparse(self.path)
        if url.path == PATH + "health":
            self._reply(200, {"ok": True})
        elif url.path == PATH + "info":
            info = self.server.mailbox.info
            self._reply(200 if info else 404, info or None)
        elif url.path == PATH + "take" and (where := self._where()) is not None:
            self._reply(200, self.server.mailbox.take(*where, wait=self._wait()))
        else:
            self._reply(404)

    def do_PUT(self) -> None:  # noqa: N802
        path = urlparse(self.path).path
        where = self._where()
        if not (path == PATH + "info" or (path == PATH + "post" and where is not None)):
            self._reply(404)
            return
        try:
            n = int(self.headers.get("Content-Length", "-1"))
        except ValueError:
            n = -1
        if not 0 < n <= MAX_BODY:
            self.close_connection = True
            self._reply(413 if n > MAX_BODY else 411)
            return
        try:
            msg = json.loads(self.rfile.read(n))
        except ValueError:
            self._reply(400)
            return
        if not isinstance(msg, dict):
            self._reply(400)
            return
        if where is None:  # info: small, replaced whole
            if len(msg) > 16:
                self._reply(400)
                return
            self.server.mailbox.info = msg
            self._reply(204)
            return
        self._reply(204 if self.server.mailbox.post(*where, msg) else 503)


class MailboxServer(ThreadingHTTPServer):
    """The mailbox over HTTP on ``(host, port)``, served by a daemon thread until ``close``."""

    daemon_threads = True

    def __init__(self, host: str, port: int, *, ttl: float = 600.0) -> None:
        self.mailbox = Mailbox(ttl=ttl)
        super().__init__((host, int(port)), _Handler)
        self._thread = threading.Thread(target=self.serve_forever, name="kvwire-sglang-bootstrap", daemon=True)
        self._thread.start()

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.server_address[:2]
        return str(host), int(port)

    def close(self) -> None:
        self.shutdown()
        self.server_close()
        self._thread.join(timeout=5)


class MailboxClient:
    """Posts to and takes from a ``MailboxServer`` at ``host:port``; every call is bounded by ``timeout``."""

    def __init__(self, host: str, port: int, *, timeout: float = 5.0) -> None:
        self.base = f"http://{host}:{int(port)}{PATH}"
        self.timeout = timeout

    def _put(self, url: str, msg: Any) -> None:
        data = json.dumps(msg).encode()
        if len(data) > MAX_BODY:
            raise OSError(f"message of {len(data)} bytes exceeds {MAX_BODY}")
        req = urllib.request.Request(url, data=data, method="PUT", headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=self.timeout) as r:
            if r.status != 204:
                raise OSError(f"bootstrap answered {r.status}")

    def post(self, dp: int, rank: int, msg: Any) -> None:
        """Deliver ``msg``; raises ``OSError`` (refused, unreachable, full, timed out)."""
        self._put(f"{self.base}post?dp={_int(dp)}&rank={_int(rank)}", msg)

    def put_info(self, info: dict[str, Any]) -> None:
        self._put(f"{self.base}info", info)

    def info(self) -> dict[str, Any]:
        """The prefill instance's parallel info; ``OSError`` if not registered (yet) or unreachable."""
        with urllib.request.urlopen(f"{self.base}info", timeout=self.timeout) as r:
            out = json.loads(r.read(1 << 16))
        if not isinstance(out, dict):
            raise OSError("bootstrap info is not a map")
        return out

    def take(self, dp: int, rank: int, wait: float = 0.0) -> list[Any]:
        """Take ``(dp, rank)``'s messages; the server holds the call up to ``wait`` s (at most 2) for one."""
        url = f"{self.base}take?dp={_int(dp)}&rank={_int(rank)}&wait={float(wait):g}"
        with urllib.request.urlopen(url, timeout=self.timeout + min(float(wait), 2.0)) as r:
            raw = r.read(MAX_BODY * 4 + 1)
        if len(raw) > MAX_BODY * 4:
            raise OSError("bootstrap answer too large")
        out = json.loads(raw)
        if not isinstance(out, list):
            raise OSError("bootstrap answer is not a list")
        return out


__all__ = ["MAX_BODY", "Mailbox", "MailboxClient", "MailboxServer"]
