"""The PrfaaS router service: an OpenAI-compatible front door over the deployment's nodes.

``python -m kvwire.prfaas.frontdoor --config deploy.toml`` serves, at ``[router] host:port``:

* ``POST /v1/completions`` — OpenAI's completions API, streaming (SSE) or not. ``prompt``: text (byte-level
  tokenizer) or a list of token ids; ``max_tokens``; ``stop`` (a string or up to 4). Greedy decoding only
  (``temperature``/``top_p`` are accepted and ignored; ``n`` must be 1). Each choice (and each streamed
  chunk) also carries ``token_ids``: the generated ids, since ids past 255 have no byte. Header
  ``X-Prfaas-Route: prfaas|local`` forces the prefill cluster, ``X-Prfaas-Reuse: off`` ignores cached
  prefixes (tests, operations); the response says
  where it ran in ``X-Prfaas-Route``/``X-Prfaas-Prefill``/``X-Prfaas-Decode`` headers and ``prfaas``.
* ``GET /metrics`` — Prometheus text (``telemetry``), ``GET /health`` — router and node states (200 while
  some prefill and decode node can serve, 503 otherwise), ``POST /admin/convert`` ``{"node", "role"}`` —
  convert a local node now (what the long loop does), ``GET /admin/timeline`` — health/role/t changes.

No authentication on ``/v1/*``, ``/metrics``, ``/health`` and ``GET /admin/timeline`` (by design: the public,
read-only side). So a body is bounded before it is read (``max_body_bytes``: a Content-Length over it is a 413
without a byte read, a chunked body a 413 as soon as it passes it; one that has not all come within
``signing.body_seconds`` a 408) and a prompt longer than
``max_prompt_tokens`` is refused before it is tokenized. ``POST /admin/convert`` changes node roles: it takes
only a request signed with the deployment's shared key (``KVWIRE_KEY``), as node control calls are
(``controlauth.ControlAuth``: header ``X-Kvwire-Auth: controlauth.sign(key, "POST", "/admin/convert", body)``,
each signature accepted once); anything else is a 401 and converts nothing.

Served by uvicorn over a starlette app: a maintained ASGI server and toolkit (HTTP/1.1 keep-alive, chunked
streaming, disconnect handling, graceful SIGTERM) rather than a hand-written HTTP loop; through ``httpgate``, as
the nodes are: a connection must send each request head within ``httpgate.HEAD_SECONDS`` of its accept or of its
previous response, and at most ``httpgate.MAX_WAITING`` connections wait for one at once; at most
``[router] limit_concurrency`` (``settings.LIMIT_CONCURRENCY``, 256) are open or served at once, each request past
it a 503 at once, and half of them at most for one source address (``httpgate`` ``per_source``: a 503 past
it). What the server cuts is in ``/metrics`` (``prfaas_http_cuts_total{server="frontdoor"}``).
Must not know: how routing is decided or nodes are driven (``orchestrator``), metric families (``telemetry``),
the signature scheme (``controlauth``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import signal
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route, request_response

from ..metrics import Metrics
from ..signing import body_seconds
from . import config as deploy_config
from .controlauth import ControlAuth, control_key
from .orchestrator import Completion, Orchestrator, RequestError, Unavailable
from .settings import FrontSettings
from .telemetry import Telemetry
from .tokenizer import ByteTokenizer, TokenizerError

log = logging.getLogger("kvwire.prfaas.frontdoor")
MODEL_NAME = "kvwire-prfaas"
ROUTE_HEADER = "x-prfaas-route"
REUSE_HEADER = "x-prfaas-reuse"
#: room in a ``/v1/completions`` body for every field but the prompt (``max_tokens``, up to 4 ``stop`` strings,
#: ``stream``, ``temperature``...): a client's ordinary request is a few hundred bytes of them
OTHER_FIELDS_BYTES = 64 << 10
#: the most of an ``/admin/convert`` body parsed (``{"node": name, "role": role}``: tens of bytes; it is signed,
#: and ``ControlAuth`` bounds what it reads by ``controlauth.MAX_BODY``)
ADMIN_BODY_BYTES = 64 << 10


class BodyError(ValueError):
    """A request body the front door will not read (413: over the cap) or cannot parse (400)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def max_body_bytes(settings: FrontSettings, vocab: int) -> int:
    """The largest ``/v1/completions`` body the front door reads: a prompt of ``n = max_prompt_tokens`` tokens
    in its widest JSON form, plus ``OTHER_FIELDS_BYTES``.

    As text, each token is one UTF-8 byte, which a JSON encoder may write as a 6-character ``\\u00XX`` escape
    (control characters; a 2-, 3- or 4-byte character's escape is 3, 2 or 3 characters a byte): ``6 n``. As
    token ids, each is at most ``d`` digits (``d = len(str(vocab - 1))``) and ``", "`` apart: ``(d + 2) n``.
    Plus 4 for the quotes and a batch of one's brackets. The defaults (4096 tokens, vocab 512):
    ``6 * 4096 + 4 + 65536 = 90116`` bytes, where the 48 MiB body that prompted this was read in full before.
    """
    n, digits = settings.max_prompt_tokens, len(str(max(vocab - 1, 0)))
    return max(6 * n, (digits + 2) * n) + 4 + OTHER_FIELDS_BYTES


async def read_json(request: Request, cap: int) -> Any:
    """The request's JSON body, read only up to ``cap`` bytes; ``BodyError`` (413) past it, before any byte is
    read when the Content-Length says so, (408) when it has not all come within ``signing.body_seconds`` (a
    client dribbling a body held its connection for as long as it liked), and (400) for a body that is not
    UTF-8 JSON or a client that went away before all of it came."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            length = int(declared)
        except ValueError:
            raise BodyError(400, f"bad Content-Length {declared[:40]!r}") from None
        if length > cap:
            raise BodyError(413, f"the body has {length} bytes; the most read is {cap}")
    chunks: list[bytes] = []
    got = 0
    limit = body_seconds(length if declared is not None else cap)
    try:
        async with asyncio.timeout(limit):
            async for part in request.stream():  # chunked (or a Content-Length not held to): count
                got += len(part)
                if got > cap:
                    raise BodyError(413, f"the body is over {cap} bytes, the most read")
                chunks.append(part)
    except TimeoutError:
        raise BodyError(408, f"the body did not come within {limit:.1f} s") from None
    except ClientDisconnect:  # before: a traceback in the log per such client, a key or none
        raise BodyError(400, f"the client went away after {got} bytes of its body") from None
    try:
        return json.loads(b"".join(chunks).decode("utf-8"))
    except UnicodeDecodeError:
        raise BodyError(400, "the body is not UTF-8") from None
    except (ValueError, RecursionError):  # JSONDecodeError, an int past Python's digit limit, deep nesting
        raise BodyError(400, "the body is not JSON") from None


def _error(status: int, message: str, kind: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": None, "code": None}}, status)


class FrontDoor:
    """The starlette app (``app``) over one ``Orchestrator``."""

    def __init__(self, config: deploy_config.DeployConfig, settings: FrontSettings | None = None,
                 wait_healthy_s: float = 30.0) -> None:
        self.config = config
        self.settings = settings or FrontSettings.from_table(config.router)
        self.key = control_key()  # the deployment's shared key: the orchestrator's node calls are signed with it too
        self.telemetry = Telemetry()
        self.http_metrics = Metrics()  # the HTTP server's cuts (httpgate), appended to the telemetry at /metrics
        self.orch = Orchestrator(config, self.settings, self.telemetry)
        self.tokenizer = ByteTokenizer()
        self.vocab = config.model.vocab_size
        if self.vocab < self.tokenizer.size:
            raise deploy_config.ConfigError(f"the model's vocab ({self.vocab}) is smaller than the byte "
                                            f"tokenizer's {self.tokenizer.size}")
        self.max_body = max_body_bytes(self.settings, self.vocab)
        self.wait_healthy_s = wait_healthy_s
        self.app = Starlette(routes=[
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/metrics", self.metrics, methods=["GET"]),
            Route("/health", self.health, methods=["GET"]),
            Route("/admin/convert", ControlAuth(request_response(self.convert), self.key, open_routes=frozenset()),
                  methods=["POST"]),
            Route("/admin/timeline", self.timeline, methods=["GET"]),
        ], lifespan=self._lifespan)

    @contextlib.asynccontextmanager
    async def _lifespan(self, app: Starlette) -> AsyncIterator[None]:
        await self.orch.start(self.wait_healthy_s)
        try:
            yield
        finally:
            await self.orch.stop()

    # ------------------------------------------------------------ parsing
    def _parse(self, body: Any) -> tuple[list[int], int, list[list[int]], bool]:
        if not isinstance(body, dict):
            raise RequestError("the body must be a JSON object")
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]  # a batch of one
        most = self.settings.max_prompt_tokens  # refused here before tokenizing; the orchestrator checks it too
        if isinstance(prompt, str):
            if len(prompt) > most:  # every character is at least one byte, so at least one token
                raise RequestError(f"prompt has at least {len(prompt)} tokens; need 2..{most}")
            ids = self.tokenizer.encode(prompt)
        elif isinstance(prompt, list):
            if len(prompt) > most:
                raise RequestError(f"prompt has {len(prompt)} tokens; need 2..{most}")
            ids = self.tokenizer.check(prompt, self.vocab)
        else:
            raise RequestError("prompt must be a string or a list of token ids (one prompt per request)")
        max_tokens = body.get("max_tokens", 16)
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int):
            raise RequestError("max_tokens must be an integer")
        if body.get("n", 1) != 1 or body.get("best_of", 1) != 1:
            raise RequestError("only n = 1 is served")
        stop = body.get("stop")
        stops = [stop] if isinstance(stop, str) else stop if isinstance(stop, list) else [] if stop is None else None
        if stops is None or len(stops) > 4 or not all(isinstance(x, str) and x for x in stops):
            raise RequestError("stop must be a non-empty string or a list of up to 4 of them")
        return ids, max_tokens, [self.tokenizer.encode(x) for x in stops], bool(body.get("stream", False))

    # ------------------------------------------------------------ endpoints
    async def completions(self, request: Request) -> Response:
        try:
            body = await read_json(request, self.max_body)
        except BodyError as e:
            return _error(e.status, str(e))
        try:
            ids, max_tokens, stops, stream = self._parse(body)
        except (RequestError, TokenizerError) as e:
            return _error(400, str(e))
        route = request.headers.get(ROUTE_HEADER) or None
        info = Completion(uuid.uuid4().hex[:16], len(ids))
        reuse = request.headers.get(REUSE_HEADER, "on").lower() not in ("off", "0", "no", "false")
        gen = self.orch.complete(ids, max_tokens=max_tokens, stops=stops, route=route, reuse=reuse, info=info)
        try:  # nothing is sent before the first token exists (or the request failed as a whole)
            first: list[int] = [await gen.__anext__()]
        except StopAsyncIteration:
            first = []
        except RequestError as e:
            return _error(400, str(e))
        except Unavailable as e:
            return _error(503, str(e), "service_unavailable")
        headers = {"X-Prfaas-Route": info.route, "X-Prfaas-Prefill": info.prefill_node,
                   "X-Prfaas-Decode": info.decode_node, "X-Prfaas-Request": info.request_id}
        cid, created = f"cmpl-{info.request_id}", int(time.time())
        if stream:
            return StreamingResponse(self._sse(cid, created, first, gen, info), media_type="text/event-stream",
                                     headers=headers)
        out = list(first)
        try:
            async for tok in gen:
                out.append(tok)
        except Exception as e:
            log.warning("%s failed mid-stream: %s", cid, e)
            return _error(502, f"generation failed: {e}", "server_error")
        return JSONResponse({
            "id": cid, "object": "text_completion", "created": created, "model": MODEL_NAME,
            "choices": [{"index": 0, "text": self.tokenizer.decode(out), "logprobs": None,
                         "finish_reason": info.finish_reason, "token_ids": out}],
            "usage": {"prompt_tokens": len(ids), "completion_tokens": len(out),
                      "total_tokens": len(ids) + len(out)},
            "prfaas": self._summary(info)}, headers=headers)

    def _summary(self, info: Completion) -> dict[str, Any]:
        return {"route": info.route, "prefill_node": info.prefill_node, "decode_node": info.decode_node,
                "reprefilled": info.reprefilled, "reused_tokens": info.reused, "moved_prefix": info.moved_prefix,
                "ttft_s": info.ttft_s, "events": info.events}

    async def _sse(self, cid: str, created: int, first: list[int], gen: AsyncIterator[int],
                   info: Completion) -> AsyncIterator[bytes]:
        decoder = self.tokenizer.stream_decoder()

        def chunk(text: str, ids: list[int], finish: str | None, extra: dict[str, Any] | None = None) -> bytes:
            c: dict[str, Any] = {"id": cid, "object": "text_completion", "created": created, "model": MODEL_NAME,
                                 "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish,
                                              "token_ids": ids}]}
            if extra:
                c.update(extra)
            return f"data: {json.dumps(c)}\n\n".encode()

        try:
            if first:
                yield chunk(decoder.feed(first), first, None)
            async for tok in gen:
                yield chunk(decoder.feed([tok]), [tok], None)
        except Exception as e:  # after the first token: tell the client in-band, the status is sent
            log.warning("%s failed mid-stream: %s", cid, e)
            err = {"error": {"message": f"generation failed: {e}", "type": "server_error"}}
            yield f"data: {json.dumps(err)}\n\n".encode()
            return
        finally:
            await gen.aclose()  # type: ignore[attr-defined]
        yield chunk(decoder.flush(), [], info.finish_reason, {"prfaas": self._summary(info)})
        yield b"data: [DONE]\n\n"

    async def models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [{"id": MODEL_NAME, "object": "model", "created": 0,
                                                         "owned_by": "kvwire"}]})

    async def metrics(self, request: Request) -> Response:
        return Response(self.telemetry.exposition() + self.http_metrics.render().encode(),
                        media_type=self.telemetry.content_type)

    async def health(self, request: Request) -> Response:
        snap = self.orch.snapshot()
        nodes = snap["nodes"].values()
        ok = any(n["healthy"] and n["state"] == "ready" and n["role"] == "decode" for n in nodes) and \
            any(n["healthy"] and n["state"] == "ready" and n["role"] == "prefill" for n in nodes)
        snap["status"] = "ok" if ok else "unavailable"
        return JSONResponse(snap, 200 if ok else 503)

    async def convert(self, request: Request) -> Response:
        """Reached only through ``ControlAuth``: signed with the deployment key, the body verified."""
        try:
            body = await read_json(request, ADMIN_BODY_BYTES)
        except BodyError as e:
            return _error(e.status, str(e))
        try:
            result = await self.orch.convert(str(body["node"]), str(body["role"]))
        except (KeyError, TypeError):
            return _error(400, 'the body must be {"node": name, "role": "prefill"|"decode"}')
        except RequestError as e:
            return _error(400, str(e))
        except Unavailable as e:
            return _error(409, str(e), "conflict")
        return JSONResponse(result)

    async def timeline(self, request: Request) -> Response:
        return JSONResponse({"transitions": [{"at": at, "who": who, "what": what}
                                             for at, who, what in self.orch.transitions],
                             "threshold": self.orch.router.t, "now": self.orch.uptime()})


def http_server(door: FrontDoor, log_level: str = "warning", **options: Any) -> Any:
    """``door``'s ``httpgate.GatedServer``, as ``main`` serves it (``options``: more ``uvicorn.Config`` keywords).
    A connection waiting for a request head holds it ``httpgate.HEAD_SECONDS`` at most, and at most
    ``httpgate.MAX_WAITING`` wait at once (an idle socket held an fd for ever before); at most
    ``[router] limit_concurrency`` connections are served at once (503 past it), half of them at most from one
    source address (``per_source``: one client whose bodies never come cannot take every slot; 503 past it).
    Its cuts are in ``/metrics``."""
    from . import httpgate

    limit = door.settings.limit_concurrency
    return httpgate.server(door.app, door.settings.host, door.settings.port, name="frontdoor",
                           metrics=door.http_metrics, log_level=log_level, timeout_graceful_shutdown=5,
                           limit_concurrency=limit, per_source=max(1, limit // 2), **options)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kvwire.prfaas.frontdoor", description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True, help="the deployment's TOML config")
    ap.add_argument("--wait-healthy", type=float, default=30.0, help="seconds to wait for the nodes at start")
    ap.add_argument("--log-level", default="warning")
    a = ap.parse_args(argv)
    logging.basicConfig(level=a.log_level.upper(), format="%(asctime)s frontdoor %(levelname)s %(message)s")
    try:
        door = FrontDoor(deploy_config.load(a.config), wait_healthy_s=a.wait_healthy)
    except ValueError as e:  # ConfigError, or no KVWIRE_KEY
        ap.error(str(e))
    # uvicorn shuts down on SIGTERM/SIGINT (lifespan exit included), restores the handlers it found and re-raises
    # the signal: with the defaults the process then dies of it (-15). Found handlers that do nothing let it return 0.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    server = http_server(door, a.log_level)
    server.run()
    return 0 if server.started else 3  # uvicorn.run's exit status when it could not start (a port in use)


if __name__ == "__main__":
    raise SystemExit(main())
