"""The async client of a PrfaaS node's control API (``node.py``): what the router and other nodes call.

Owns: the HTTP/JSON calls (httpx.AsyncClient, one per node), each signed with the shared key
(``controlauth.sign``), and turning every failure (node unreachable, died
mid-call, answered with an error, timed out, sent something malformed) into one typed ``NodeError``. Every
call is bounded by ``timeout``; ``generate`` bounds each read (the wait for the cache and each token).

A pooled keep-alive connection the node has closed is dropped by httpx before it is used, but one the node
cuts just as a request goes out on it (``httpgate`` aborts a waiting connection at its head deadline, or
evicts it for a newer one under a flood, and drops what it had not parsed) fails that request with a reset,
and httpx's own ``retries`` re-dial failed connects only. So a request that fails on a reused connection before
any response head (httpcore's ``trace`` says which connection and how far) is sent once more, the same signed
bytes, on a fresh connection (``_fresh``, which keeps none). That is safe: each signature's nonce is accepted
once, when its head is checked, so a request the node did take is refused (401 ``replayed nonce``), never run
twice. A failure on a fresh connection, or once the response head came, is a ``NodeError`` as before.
Must not know: routing, models, kvwire transfers.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING, Any

from ..errors import KvwireError
from .controlauth import AUTH, control_key, sign

if TYPE_CHECKING:
    import httpx

__all__ = ["NodeClient", "NodeError"]
log = logging.getLogger("kvwire.prfaas.nodeclient")


class NodeError(KvwireError):
    """A node call failed. ``status``: the node's HTTP status (None: unreachable, died, timed out);
    ``state``: the cache transfer's terminal state when that is what failed (``generate``)."""

    def __init__(self, message: str, *, status: int | None = None, state: str | None = None) -> None:
        super().__init__(message)
        self.status, self.state = status, state


class NodeClient:
    """``key``: the deployment's shared key that signs every request (default: ``KVWIRE_KEY`` from the
    environment; ValueError when neither is set)."""

    def __init__(self, host: str, control_port: int, *, timeout: float = 30.0, key: bytes | str | None = None
                 ) -> None:
        import httpx

        self.host, self.control_port, self.timeout = host, control_port, timeout
        self._key = control_key(key)
        h = f"[{host}]" if ":" in host else host
        self.base = f"http://{h}:{control_port}"
        self._http = httpx.AsyncClient(base_url=self.base, timeout=timeout)
        # the retry's: a new connection each request, closed after it
        self._fresh = httpx.AsyncClient(base_url=self.base, timeout=timeout,
                                        limits=httpx.Limits(max_keepalive_connections=0))

    def __repr__(self) -> str:
        return f"NodeClient({self.base})"

    async def aclose(self) -> None:
        await self._http.aclose()
        await self._fresh.aclose()

    async def __aenter__(self) -> NodeClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def _call(self, method: str, path: str, body: dict[str, Any] | None = None,
                    timeout: float | None = None) -> Any:
        import httpx

        content, headers = self._signed(method, path, body)
        try:
            r = await self._send(method, path, content, headers, self.timeout if timeout is None else timeout)
        except httpx.TimeoutException as e:
            raise NodeError(f"{self.base}{path}: no answer in {timeout or self.timeout} s ({type(e).__name__})") \
                from None
        except httpx.HTTPError as e:
            raise NodeError(f"{self.base}{path}: {type(e).__name__}: {e}") from None
        try:
            data = r.json()
        except ValueError:
            raise NodeError(f"{self.base}{path}: HTTP {r.status_code}, not JSON", status=r.status_code) from None
        if r.status_code != 200:
            msg = data.get("error") if isinstance(data, dict) else None
            raise NodeError(f"{self.base}{path}: HTTP {r.status_code}: {msg or data}", status=r.status_code)
        return data

    async def _send(self, method: str, path: str, content: bytes, headers: dict[str, str], timeout: float,
                    stream: bool = False) -> httpx.Response:
        """The response to one request; sent again on a fresh connection when a reused one died before any
        response head (see above). Raises httpx's errors."""
        import httpx

        events: set[str] = set()

        async def trace(event: str, info: dict[str, Any]) -> None:
            events.add(event)

        request = self._http.build_request(method, path, content=content, headers=headers, timeout=timeout,
                                           extensions={"trace": trace})
        try:
            return await self._http.send(request, stream=stream)
        except (httpx.ReadError, httpx.WriteError, httpx.RemoteProtocolError) as e:
            if "connection.connect_tcp.started" in events or "http11.receive_response_headers.complete" in events:
                raise  # a fresh connection, or the response head came: the node may have taken it
            log.info("%s%s: the pooled connection died before an answer (%s: %s); sending it again on a fresh one",
                     self.base, path, type(e).__name__, e)
        request = self._fresh.build_request(method, path, content=content, headers=headers, timeout=timeout)
        return await self._fresh.send(request, stream=stream)

    def _signed(self, method: str, path: str, body: dict[str, Any] | None) -> tuple[bytes, dict[str, str]]:
        content = b"" if body is None else json.dumps(body).encode()
        headers = {AUTH: sign(self._key, method, path, content)}
        if body is not None:
            headers["content-type"] = "application/json"
        return content, headers

    async def health(self) -> dict[str, Any]:
        out: dict[str, Any] = await self._call("GET", "/health")
        return out

    async def link(self) -> dict[str, Any] | None:
        out: dict[str, Any] | None = await self._call("GET", "/link")
        return out

    async def checkpoints(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = await self._call("GET", "/checkpoints")
        return out

    async def expect(self, request_id: str, prompt: Sequence[int], *, reuse_length: int = 0) -> None:
        await self._call("POST", "/expect", {"request_id": request_id, "prompt": list(prompt),
                                             "reuse_length": reuse_length})

    async def prefill(self, request_id: str, prompt: Sequence[int], *, decode_host: str, decode_data_port: int,
                      reuse_length: int = 0, reuse_from: tuple[str, int] | None = None,
                      send_from: int = 0) -> dict[str, Any]:
        out: dict[str, Any] = await self._call("POST", "/prefill", {
            "request_id": request_id, "prompt": list(prompt), "decode_host": decode_host,
            "decode_data_port": decode_data_port, "reuse_length": reuse_length,
            "reuse_from": None if reuse_from is None else list(reuse_from), "send_from": send_from})
        return out

    async def export(self, request_id: str, prompt: Sequence[int], length: int, *, dest_host: str,
                     dest_data_port: int) -> dict[str, Any]:
        """Ask the node to send its checkpoint of ``prompt[:length]`` to ``dest``'s data port (a prefix move)."""
        out: dict[str, Any] = await self._call("POST", "/export", {
            "request_id": request_id, "prompt": list(prompt), "length": length, "dest_host": dest_host,
            "dest_data_port": dest_data_port})
        if out.get("state") != "done":
            raise NodeError(f"{self.base}/export: {out.get('state')}: {out.get('reason')}", state=out.get("state"))
        return out

    async def generate(self, request_id: str, *, max_tokens: int, stop: list[int] | None = None
                       ) -> AsyncIterator[int]:
        """Token ids as the decode node produces them; NodeError if the cache never arrived or the node failed."""
        import httpx

        content, headers = self._signed("POST", "/generate", {"request_id": request_id, "max_tokens": max_tokens,
                                                              "stop": list(stop or [])})
        try:
            r = await self._send("POST", "/generate", content, headers, self.timeout, stream=True)
            async with contextlib.aclosing(r):
                if r.status_code != 200:
                    text = (await r.aread()).decode(errors="replace")
                    try:
                        text = json.loads(text).get("error", text)
                    except (ValueError, AttributeError):
                        pass
                    raise NodeError(f"{self.base}/generate: HTTP {r.status_code}: {text}", status=r.status_code)
                done = False
                async for line in r.aiter_lines():
                    if not line:
                        continue
                    try:
                        item = json.loads(line)
                    except ValueError:
                        raise NodeError(f"{self.base}/generate: malformed line {line[:80]!r}") from None
                    if "error" in item:
                        raise NodeError(f"{request_id}: {item['error']}", state=item.get("state"))
                    tok = item.get("token")
                    if isinstance(tok, bool) or not isinstance(tok, int):
                        raise NodeError(f"{self.base}/generate: malformed item {item!r}")
                    yield tok
                    done = True
                if not done:
                    raise NodeError(f"{self.base}/generate: the stream ended without a token")
        except httpx.TimeoutException as e:
            raise NodeError(f"{self.base}/generate: no answer in {self.timeout} s ({type(e).__name__})") from None
        except httpx.HTTPError as e:
            raise NodeError(f"{self.base}/generate: {type(e).__name__}: {e}") from None

    async def cancel(self, request_id: str) -> None:
        await self._call("POST", "/cancel", {"request_id": request_id})

    async def drain(self, timeout: float = 60.0) -> None:
        await self._call("POST", "/drain", {"timeout": timeout}, timeout=timeout + 5)

    async def set_role(self, role: str) -> None:
        await self._call("POST", "/set_role", {"role": role})

    async def resume(self) -> None:
        await self._call("POST", "/resume", {})
