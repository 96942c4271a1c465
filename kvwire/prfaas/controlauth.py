"""Signed requests on a PrfaaS node's control API, under the deployment's shared key (``KVWIRE_KEY``).

Owns: the ``X-Kvwire-Auth`` header (``ts nonce head-mac body-mac``, HMAC-SHA256 in the ``kvwire-prfaas-control/1``
domain: the head MAC covers method, path, time, nonce and body length; the body MAC the head MAC and the body),
``sign`` for clients and ``ControlAuth``, a plain ASGI middleware for the node (and the front door's
``POST /admin/convert``): the head is checked before a
byte of the body is read (an unauthenticated caller cannot make the node read, parse or allocate for a body:
``/expect`` sizes cache buffers from the prompt), each nonce is accepted once within the time window
(``kvwire.signing``: the scheme and ``Nonces`` the SGLang bootstrap mailbox uses too, in its own domain),
bodies are bounded (``MAX_BODY``) before and after, and a signed body must arrive whole within
``signing.body_seconds`` (408 past it: a key holder dribbling bodies cannot hold the server's connection slots).
``GET /health`` and ``GET /metrics`` stay open (``OPEN_ROUTES``): the liveness probe launchers poll, the scrape.
Must not know: what the routes do, starlette, httpx.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from ..signing import AUTH, WINDOW, Nonces, Scheme, body_seconds

__all__ = ["AUTH", "MAX_BODY", "ControlAuth", "control_key", "sign"]

#: a 1M-token prompt is ~7 MB of JSON token ids; 32 MiB leaves room and bounds what a key holder can send
MAX_BODY = 32 << 20
_SCHEME = Scheme(b"kvwire-prfaas-control/1 ")
#: answered without a signature: the liveness probe launchers and supervisors poll (it reads no body and
#: tells only the node's name, role, state and queue counts), and the Prometheus scrape (counts only)
OPEN_ROUTES = frozenset({("GET", "/health"), ("GET", "/metrics")})

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


def control_key(key: bytes | str | None = None) -> bytes:
    """``key``, else ``KVWIRE_KEY`` from the environment; ValueError when neither is set."""
    k = key if key is not None else os.environ.get("KVWIRE_KEY", "")
    out = k.encode() if isinstance(k, str) else k
    if not out:
        raise ValueError("the PrfaaS control API needs the deployment's shared key (KVWIRE_KEY)")
    return out


def sign(key: bytes, method: str, path: str, body: bytes, now: float | None = None) -> str:
    """The ``X-Kvwire-Auth`` value for one request (``path`` without the query: the API takes none)."""
    return _SCHEME.sign(key, method.upper(), path, body, now)


class ControlAuth:
    """ASGI middleware: a request reaches ``app`` only with a valid signature, its body already verified."""

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]], key: bytes, *,
                 window: float = WINDOW, open_routes: frozenset[tuple[str, str]] = OPEN_ROUTES) -> None:
        self.app, self.key, self.open_routes = app, key, open_routes
        self.nonces = Nonces(window)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or (scope["method"], scope["path"]) in self.open_routes:
            await self.app(scope, receive, send)  # liveness: read-only, no body read
            return
        headers = {k.lower(): v for k, v in scope.get("headers", [])}
        try:
            length = int(headers.get(b"content-length", b"0"))
            sig = _SCHEME.parse(headers.get(AUTH.lower().encode(), b"").decode())
        except (ValueError, UnicodeDecodeError):
            await _reply(send, 401, "missing or malformed X-Kvwire-Auth")
            return
        if b"transfer-encoding" in headers or not _SCHEME.head_ok(self.key, sig, scope["method"], scope["path"],
                                                                  length):
            await _reply(send, 401, "bad signature")
            return
        why = self.nonces.check(sig.ts, sig.nonce)
        if why is not None:
            await _reply(send, 503 if why == "busy" else 401, why)
            return
        if length > MAX_BODY:
            await _reply(send, 413, f"body over {MAX_BODY} bytes")
            return
        chunks: list[bytes] = []
        limit = body_seconds(length)
        try:
            async with asyncio.timeout(limit):
                got = await _read_body(receive, chunks, length)
        except TimeoutError:
            await _reply(send, 408, f"body not received within {limit:.1f} s ({sum(map(len, chunks))} of {length} "
                                    f"bytes)")
            return
        if got is None:  # the client went away
            return
        if got > length:
            await _reply(send, 401, "body longer than signed")
            return
        body = b"".join(chunks)
        if got != length or not _SCHEME.body_ok(self.key, sig, body):
            await _reply(send, 401, "bad signature")
            return
        delivered = False

        async def replay() -> Message:  # the verified body once, then the connection's own events
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


async def _read_body(receive: Receive, chunks: list[bytes], length: int) -> int | None:
    """Append the request's body parts to ``chunks`` until the last one, or one past ``length`` bytes; the
    bytes read, or None when the client disconnected."""
    got = 0
    while True:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            return None
        part = msg.get("body", b"")
        got += len(part)
        chunks.append(part)
        if got > length or not msg.get("more_body", False):
            return got


async def _reply(send: Send, status: int, error: str) -> None:
    body = json.dumps({"error": error}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
