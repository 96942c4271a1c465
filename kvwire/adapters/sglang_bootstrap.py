"""The kvwire SGLang backend's control plane: a mailbox on the prefill instance's bootstrap port.

Owns: ``Mailbox`` (bounded, expiring per-(DP rank, TP rank) message queues), ``MailboxServer`` (HTTP/JSON over
it, started where SGLang starts its bootstrap server), ``MailboxClient``, and how a request to it is
authenticated. Decode ranks post their request's destination (kvwire endpoint, page and slot indices, aux row:
the N convention, decode allocates first) or an abort; each prefill rank takes its own messages. Must not
know: SGLang's classes, kvwire's transport, what a message means (``sglang`` validates every field it reads).

The port is reachable from the network. Every request but ``health`` carries ``X-Kvwire-Auth: <ts> <nonce>
<head-mac> <body-mac>``, HMAC-SHA256s under the session's pre-shared key (``KVWIRE_KEY``): the head MAC over
method, path and query, the wall-clock time, a random nonce and the body's length; the body MAC over the head
MAC and the body. Before it is authenticated a request may send ``MAX_HEAD`` bytes (request line and headers)
and no body, within ``HEAD_TIMEOUT`` s, and holds one of ``MAX_UNAUTHENTICATED`` slots of a ``HandshakeGate``
(a new connection always gets in; the oldest of the busiest source is cut). The head MAC is checked before a
body byte is read: a time more than ``WINDOW`` s off this host's clock, or a nonce seen within it, is refused
(401, replay); only then may the body (at most ``MAX_BODY`` bytes) be read, all of it within
``signing.body_seconds(length)`` s (408 and the connection cut past that: a key holder, or a broken peer,
dribbling its body holds a thread that long at most), and nothing changes until its MAC verifies. At most
``MAX_QUEUED`` messages of ``MAX_QUEUED_BYTES`` wait in all; one nobody takes within ``ttl`` s is dropped.
JSON only, never pickle. Answers are not authenticated: what prefill takes leads to a kvwire transfer that
authenticates its peer with the same key.
"""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.request
from collections import deque
from http.server import BaseHTTPRequestHandler
from typing import Any
from urllib.parse import parse_qs, urlparse

from ..signing import AUTH, WINDOW, Nonces, Scheme, body_seconds
from ..tcp import GatedHTTPServer, HandshakeGate

#: the largest body an authenticated request may send. The worst legitimate one is decode's destination for a
#: 1M-token prompt at page size 1: 2^20 page indices of a 16M-token pool, 9.8 MB of JSON (measured, with SWA
#: and Mamba slots, an IPv6 endpoint); 16 MiB leaves room. 128K tokens at page size 1 is 1.1 MB, at 16: 63 KB.
MAX_BODY = 16 << 20
#: request line and headers before authentication (a signed request's are under 400 bytes); no body before it
MAX_HEAD = 4 << 10
MAX_UNAUTHENTICATED = 64  # connections not yet authenticated, at most half of them from one address
HEAD_TIMEOUT = 5.0  # s for an unauthenticated connection to send its head
IO_TIMEOUT = 10.0  # s any one socket read or write may block
MAX_QUEUED = 100_000
MAX_QUEUED_BYTES = 256 << 20  # JSON bytes of the messages waiting in all
PATH = "/kvwire/v1/"


def _key(key: bytes | str | None) -> bytes:
    k = key.encode() if isinstance(key, str) else (key or b"")
    if not k:
        raise ValueError("the bootstrap mailbox needs the session's pre-shared key (KVWIRE_KEY)")
    return k


#: the mailbox's signatures (a domain of its own: never valid on another kvwire API)
SCHEME = Scheme(b"kvwire-sglang-mailbox/1 ")
head_mac, body_mac, sign = SCHEME.head_mac, SCHEME.body_mac, SCHEME.sign


class Mailbox:
    """Per ``(dp, rank)`` FIFO of JSON messages; thread-safe, bounded in count and in (JSON) bytes."""

    def __init__(self, *, ttl: float = 600.0, max_queued: int = MAX_QUEUED,
                 max_bytes: int = MAX_QUEUED_BYTES) -> None:
        self.ttl = ttl
        self.max_queued = max_queued
        self.max_bytes = max_bytes
        self._q: dict[tuple[int, int], deque[tuple[float, int, Any]]] = {}
        self._n = 0
        self._bytes = 0
        self._lock = threading.Lock()
        self._mail = threading.Condition(self._lock)
        self.info: dict[str, Any] = {}  # the prefill instance's parallel info (register_to_bootstrap)

    def _expire(self, now: float) -> None:
        for key in list(self._q):
            q = self._q[key]
            while q and now - q[0][0] > self.ttl:
                self._bytes -= q.popleft()[1]
                self._n -= 1
            if not q:
                del self._q[key]

    def post(self, dp: int, rank: int, msg: Any, size: int = 0) -> bool:
        """Queue ``msg`` (``size``: its JSON bytes); ``False`` when the mailbox is full."""
        now = time.monotonic()
        with self._lock:
            self._expire(now)
            if self._n >= self.max_queued or self._bytes + size > self.max_bytes:
                return False
            self._q.setdefault((dp, rank), deque()).append((now, size, msg))
            self._n += 1
            self._bytes += size
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
            self._bytes -= sum(size for _t, size, _m in q)
            return [m for _t, _s, m in q]


def _int(v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise ValueError("not an int")
    return v


class _HeadTooLarge(ConnectionError):
    pass


class _BodyTooSlow(TimeoutError):
    pass


class _Capped:
    """The request's input: ``left`` more bytes may be read (``MAX_HEAD`` until the head authenticates)."""

    def __init__(self, raw: Any, left: int) -> None:
        self.raw = raw
        self.left = left

    def readline(self, limit: int = -1) -> bytes:
        n = self.left + 1 if limit < 0 else min(limit, self.left + 1)
        line: bytes = self.raw.readline(n)
        self.left -= len(line)
        if self.left < 0:
            raise _HeadTooLarge(f"request head over {MAX_HEAD} bytes")
        return line

    def read_by(self, n: int, sock: socket.socket, deadline: float) -> bytes:
        """Up to ``n`` bytes (fewer only at EOF), all by the monotonic ``deadline``: each read waits at most
        ``IO_TIMEOUT`` s and never past it (``_BodyTooSlow`` then)."""
        if n > self.left:
            raise _HeadTooLarge("read past what was authenticated")
        buf = bytearray()
        try:
            while len(buf) < n:
                wait = deadline - time.monotonic()
                if wait <= 0:
                    raise _BodyTooSlow(f"{len(buf)} of {n} body bytes came before the deadline")
                sock.settimeout(min(IO_TIMEOUT, wait))
                try:
                    chunk: bytes = self.raw.read1(min(n - len(buf), 1 << 16))
                except TimeoutError:
                    raise _BodyTooSlow(f"{len(buf)} of {n} body bytes came before the deadline") from None
                if not chunk:
                    break
                buf += chunk
        finally:
            sock.settimeout(IO_TIMEOUT)  # for the answer
            self.left -= len(buf)
        return bytes(buf)

    def close(self) -> None:
        self.raw.close()


class _Handler(BaseHTTPRequestHandler):
    server: MailboxServer
    rfile: _Capped  # type: ignore[assignment]

    def setup(self) -> None:
        super().setup()
        self.rfile = _Capped(self.rfile, MAX_HEAD)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet
        pass

    def _reply(self, code: int, body: Any = None) -> None:
        data = b"" if body is None else json.dumps(body, separators=(",", ":")).encode()
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

    def _authenticated_body(self) -> bytes | None:
        """The request's body once its head and body verify under the key; ``None`` once refused (replied)."""
        self.close_connection = True  # one request per connection
        try:
            n = int(self.headers.get("Content-Length", "0"))
            sig = SCHEME.parse(str(self.headers.get(AUTH, "")))
        except ValueError:
            self._reply(401)
            return None
        srv = self.server
        if not SCHEME.head_ok(srv.key, sig, self.command, self.path, n):
            self._reply(401)
            return None
        why = srv.nonces.check(sig.ts, sig.nonce)
        if why is not None:
            self._reply(503 if why == "busy" else 401, {"error": why})
            return None
        srv.passed(self.request)  # a key holder's: out of the unauthenticated connections' gate
        if n > MAX_BODY:
            self._reply(413)
            return None
        self.rfile.left = n
        limit = body_seconds(n)
        try:
            body = self.rfile.read_by(n, self.connection, time.monotonic() + limit)
        except _BodyTooSlow as e:
            self._reply(408, {"error": f"body not received within {limit:.1f} s: {e}"})
            return None
        if len(body) != n or not SCHEME.body_ok(srv.key, sig, body):
            self._reply(401)
            return None
        return body

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        url = urlparse(self.path)
        if url.path == PATH + "health":
            self._reply(200, {"ok": True})
        elif url.path not in (PATH + "info", PATH + "take"):
            self._reply(404)
        elif self._authenticated_body() is None:
            return
        elif url.path == PATH + "info":
            info = self.server.mailbox.info
            self._reply(200 if info else 404, info or None)
        elif (where := self._where()) is not None:
            self._reply(200, self.server.mailbox.take(*where, wait=self._wait()))
        else:
            self._reply(400)

    def do_PUT(self) -> None:  # noqa: N802
        path = urlparse(self.path).path
        where = self._where()
        if not (path == PATH + "info" or (path == PATH + "post" and where is not None)):
            self._reply(404)
            return
        body = self._authenticated_body()
        if body is None:
            return
        try:
            msg = json.loads(body)
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
        self._reply(204 if self.server.mailbox.post(*where, msg, size=len(body)) else 503)


class MailboxServer(GatedHTTPServer):
    """The mailbox over HTTP on ``(host, port)`` (IPv4, IPv6, dual-stack on ``"::"``), requests signed with
    ``key``, served by a daemon thread until ``close``."""

    def __init__(self, host: str, port: int, key: bytes | str, *, ttl: float = 600.0,
                 max_unauthenticated: int = MAX_UNAUTHENTICATED) -> None:
        self.key = _key(key)
        self.mailbox = Mailbox(ttl=ttl)
        self.nonces = Nonces()
        gate = HandshakeGate(max_unauthenticated, max(1, max_unauthenticated // 2), HEAD_TIMEOUT)
        super().__init__(host, int(port), _Handler, gate, IO_TIMEOUT, name="kvwire-sglang-bootstrap")
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


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


class MailboxClient:
    """Signed requests to a ``MailboxServer`` at ``host:port`` (an IPv6 literal is fine); every call is
    bounded by ``timeout``."""

    def __init__(self, host: str, port: int, key: bytes | str, *, timeout: float = 5.0) -> None:
        self.key = _key(key)
        self.base = f"http://{_url_host(str(host).strip('[]'))}:{int(port)}"
        self.timeout = timeout

    def _open(self, method: str, target: str, body: bytes, timeout: float) -> Any:
        headers = {AUTH: sign(self.key, method, target, body), "Content-Type": "application/json"}
        req = urllib.request.Request(self.base + target, data=body if method == "PUT" else None, method=method,
                                     headers=headers)
        return urllib.request.urlopen(req, timeout=timeout)

    def _put(self, target: str, msg: Any) -> None:
        data = json.dumps(msg, separators=(",", ":")).encode()
        if len(data) > MAX_BODY:
            raise OSError(f"message of {len(data)} bytes exceeds {MAX_BODY}")
        with self._open("PUT", target, data, self.timeout) as r:
            if r.status != 204:
                raise OSError(f"bootstrap answered {r.status}")

    def post(self, dp: int, rank: int, msg: Any) -> None:
        """Deliver ``msg``; raises ``OSError`` (refused, unreachable, full, timed out)."""
        self._put(f"{PATH}post?dp={_int(dp)}&rank={_int(rank)}", msg)

    def put_info(self, info: dict[str, Any]) -> None:
        self._put(f"{PATH}info", info)

    def info(self) -> dict[str, Any]:
        """The prefill instance's parallel info; ``OSError`` if not registered (yet) or unreachable."""
        with self._open("GET", f"{PATH}info", b"", self.timeout) as r:
            raw = r.read(MAX_BODY + 1)  # it carries prefill's layout (a few KB per 100 buffers)
        if len(raw) > MAX_BODY:
            raise OSError("bootstrap info too large")
        out = json.loads(raw)
        if not isinstance(out, dict):
            raise OSError("bootstrap info is not a map")
        return out

    def take(self, dp: int, rank: int, wait: float = 0.0) -> list[Any]:
        """Take ``(dp, rank)``'s messages; the server holds the call up to ``wait`` s (at most 2) for one."""
        target = f"{PATH}take?dp={_int(dp)}&rank={_int(rank)}&wait={float(wait):g}"
        with self._open("GET", target, b"", self.timeout + min(float(wait), 2.0)) as r:
            raw = r.read(MAX_QUEUED_BYTES + 1)
        if len(raw) > MAX_QUEUED_BYTES:
            raise OSError("bootstrap answer too large")
        out = json.loads(raw)
        if not isinstance(out, list):
            raise OSError("bootstrap answer is not a list")
        return out


__all__ = ["AUTH", "MAX_BODY", "MAX_HEAD", "WINDOW", "Mailbox", "MailboxClient", "MailboxServer", "Nonces", "sign"]
