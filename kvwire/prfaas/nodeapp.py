"""The HTTP/JSON control API of a PrfaaS node: a starlette app over ``node.Node``, every request signed.

Owns: routes, request parsing (typed 400s naming the field), the request bounds (a ``prompt`` longer than
``node.limits.max_prompt_tokens`` or ``max_tokens`` over ``max_output_tokens`` is a 400 before the node sees
it: any key holder reaches this API past the front door's checks), JSON/NDJSON responses, ``GET /metrics`` (the
``kvwire.metrics.Metrics`` it is given: the control server's cuts), and wrapping the app in
``controlauth.ControlAuth`` (the shared key). Errors are ``{"error": text}`` with 400/401/404/409/413/503/504.
Must not know: how the node prefills, decodes or moves caches (``Node``'s), or the router.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from ..metrics import CONTENT_TYPE, Metrics
from .controlauth import ControlAuth
from .nodestate import NodeFault
from .sessions import Peer

if TYPE_CHECKING:
    from .node import Node
    from .vllm_node import VllmNode


def app(node: Node | VllmNode, metrics: Metrics | None = None) -> Any:
    """The control API (starlette). Errors: JSON ``{"error": text}`` with 400/404/409/503/504. ``metrics``:
    served at ``GET /metrics`` (unsigned, as ``/health``: a Prometheus scrape cannot sign)."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response, StreamingResponse
    from starlette.routing import Route

    async def body(request: Request) -> dict[str, Any]:
        try:
            data = await request.json()
        except ValueError:
            raise NodeFault(400, "body must be JSON") from None
        if not isinstance(data, dict):
            raise NodeFault(400, "body must be a JSON object")
        return data

    def field(data: dict[str, Any], name: str, kind: type, default: Any = ...) -> Any:
        v = data.get(name, default)
        if v is ...:
            raise NodeFault(400, f"missing {name!r}")
        if kind is int and (isinstance(v, bool) or not isinstance(v, int)):
            raise NodeFault(400, f"{name!r} must be an int")
        if kind is list and (not isinstance(v, list) or any(isinstance(t, bool) or not isinstance(t, int)
                                                            for t in v)):
            raise NodeFault(400, f"{name!r} must be a list of ints")
        if kind is str and (not isinstance(v, str) or not v):
            raise NodeFault(400, f"{name!r} must be a non-empty string")
        return v

    def prompt(data: dict[str, Any]) -> list[int]:
        p = data.get("prompt")
        most = node.limits.max_prompt_tokens
        if isinstance(p, list) and len(p) > most:  # before anything is sized from it
            raise NodeFault(400, f"'prompt' has {len(p)} tokens; this deployment's max_prompt_tokens is {most}")
        out: list[int] = field(data, "prompt", list)
        return out

    def peer(v: Any, name: str) -> Peer:
        if not (isinstance(v, list) and len(v) == 2 and isinstance(v[0], str) and isinstance(v[1], int)):
            raise NodeFault(400, f"{name!r} must be [host, port]")
        return (v[0], v[1])

    async def health(_: Request) -> Response:
        return JSONResponse(node.health())

    async def link(_: Request) -> Response:
        return JSONResponse(node.link())

    async def checkpoints(_: Request) -> Response:
        return JSONResponse(node.store.listing())

    async def expect(request: Request) -> Response:
        d = await body(request)
        node.expect(field(d, "request_id", str), prompt(d), field(d, "reuse_length", int, 0))
        return JSONResponse({"ok": True})

    async def prefill(request: Request) -> Response:
        d = await body(request)
        rf = d.get("reuse_from")
        out = await node.prefill(field(d, "request_id", str), prompt(d),
                                 (field(d, "decode_host", str), field(d, "decode_data_port", int)),
                                 field(d, "reuse_length", int, 0), None if rf is None else peer(rf, "reuse_from"),
                                 field(d, "send_from", int, 0))
        return JSONResponse(out)

    async def export(request: Request) -> Response:
        d = await body(request)
        return JSONResponse(await node.export(field(d, "request_id", str), prompt(d),
                                              field(d, "length", int), (field(d, "dest_host", str),
                                                                        field(d, "dest_data_port", int))))

    async def generate(request: Request) -> Response:
        d = await body(request)
        stop = field(d, "stop", list, [])
        max_tokens = field(d, "max_tokens", int)
        if not 1 <= max_tokens <= node.limits.max_output_tokens:
            raise NodeFault(400, f"max_tokens must be in 1..{node.limits.max_output_tokens} (this deployment's "
                                 "max_output_tokens)")
        rid = field(d, "request_id", str)
        if not node.is_expected(rid):
            raise NodeFault(404, f"request {rid!r} was not expected here")

        async def lines() -> AsyncIterator[bytes]:
            async for item in node.generate(rid, max_tokens, stop):
                yield (json.dumps(item) + "\n").encode()

        return StreamingResponse(lines(), media_type="application/x-ndjson")

    async def cancel(request: Request) -> Response:
        node.cancel(field(await body(request), "request_id", str))
        return JSONResponse({"ok": True})

    async def drain(request: Request) -> Response:
        d = await body(request) if await request.body() else {}
        timeout = d.get("timeout", 60.0)
        await node.drain(float(timeout) if isinstance(timeout, (int, float)) else 60.0)
        return JSONResponse(node.health())

    async def set_role(request: Request) -> Response:
        node.set_role(field(await body(request), "role", str))
        return JSONResponse(node.health())

    async def resume(_: Request) -> Response:
        node.resume()
        return JSONResponse(node.health())

    async def scrape(_: Request) -> Response:
        assert metrics is not None
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    async def fault(_: Request, exc: Exception) -> Response:
        assert isinstance(exc, NodeFault)
        return JSONResponse({"error": str(exc)}, status_code=exc.status)

    routes = [Route("/health", health), Route("/link", link), Route("/checkpoints", checkpoints),
              Route("/expect", expect, methods=["POST"]), Route("/prefill", prefill, methods=["POST"]),
              Route("/export", export, methods=["POST"]), Route("/generate", generate, methods=["POST"]),
              Route("/cancel", cancel, methods=["POST"]), Route("/drain", drain, methods=["POST"]),
              Route("/set_role", set_role, methods=["POST"]), Route("/resume", resume, methods=["POST"])]
    if metrics is not None:
        routes.append(Route("/metrics", scrape))
    return ControlAuth(Starlette(routes=routes, exception_handlers={NodeFault: fault}), node.key)
