"""Signed requests on a PrfaaS node's control API, under the deployment's shared key (``KVWIRE_KEY``).

Owns: the ``X-Kvwire-Auth`` header (``ts nonce head-mac body-mac``, HMAC-SHA256 in the ``kvwire-prfaas-control/1``
domain: the head MAC covers method, path, time, nonce and body length; the body MAC the head MAC and the body),
``sign`` for clients and ``ControlAuth``, a plain ASGI middleware for the node: the head is checked before a
byte of the body is read (an unauthenticated caller cannot make the node read, parse or allocate for a body:
``/expect`` sizes cache buffers from the prompt), each nonce is accepted once within the time window
(``Nonces``, shared with the SGLang bootstrap mailbox), bodies are bounded (``MAX_BODY``) before and after.
``GET /health`` stays open (``OPEN_ROUTES``): the liveness probe launchers poll.
Must not know: what the routes do, starlette, httpx.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from ..adapters.sglang_bootstrap import WINDOW, Nonces

__all__ = ["AUTH", "MAX_BODY", "ControlAuth", "control_key", "sign"]

AUTH = "X-Kvwire-Auth"
#: a 1M-token prompt is ~7 MB of JSON token ids; 32 MiB leaves room and bounds what a key holder can send
MAX_BODY = 32 << 20
_DOMAIN = b"kvwire-prfaas-control/1 "
#: answered without a signature: the liveness probe launchers and supervisors poll (it reads no body and
#: tells only the node's name, role, state and queue counts)
OPEN_ROUTES = frozenset({("GET", "/health")})

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


def _head_mac(key: bytes, method: str, path: str, ts: str, nonce: str, length: int) -> bytes:
    return hmac.new(key, _DOMAIN + f"head\n{method}\n{path}\n{ts}\n{nonce}\n{length}".encode(),
                    hashlib.sha256).digest()


def _body_mac(key: bytes, head: bytes, body: bytes) -> bytes:
    return hmac.new(key, _DOMAIN + b"body\n" + head + body, hashlib.sha256).digest()


def sign(key: bytes, method: str, path: str, body: bytes, now: float | None = None) -> str:
    """The ``X-Kvwire-Auth`` value for one request (``path`` without the query: the API takes none)."""
    ts = f"{time.time() if now is None else now:.3f}"
    nonce = os.urandom(16).hex()
    head = _head_mac(key, method.upper(), path, ts, nonce, len(body))
    return f"{ts} {nonce} {head.hex()} {_body_mac(key, head, body).hex()}"


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
            ts, nonce, head_hex, body_hex = headers.get(AUTH.lower().encode(), b"").decode().split(" ")
            head, body_want = bytes.fromhex(head_hex), bytes.fromhex(body_hex)
        except (ValueError, UnicodeDecodeError):
            await _reply(send, 401, "missing or malformed X-Kvwire-Auth")
            return
        if length < 0 or b"transfer-encoding" in headers or not hmac.compare_digest(
                head, _head_mac(self.key, scope["method"], scope["path"], ts, nonce, length)):
            await _reply(send, 401, "bad signature")
            return
        why = self.nonces.check(ts, nonce)
        if why is not None:
            await _reply(send, 503 if why == "busy" else 401, why)
            return
        if length > MAX_BODY:
            await _reply(send, 413, f"body over {MAX_BODY} bytes")
            return
        chunks, got = [], 0
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            part = msg.get("body", b"")
            got += len(part)
            if got > length:
                await _reply(send, 401, "body longer than signed")
                return
            chunks.append(part)
            if not msg.get("more_body", False):
                break
        body = b"".join(chunks)
        if got != length or not hmac.compare_digest(body_want, _body_mac(self.key, head, body)):
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


async def _reply(send: Send, status: int, error: str) -> None:
    body = json.dumps({"error": error}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
