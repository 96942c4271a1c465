"""The front door's HTTP edge, in process (its starlette app called over ASGI; no node, no socket).

What an unauthenticated client can make it do: the body is bounded before it is read (a Content-Length over the
cap is refused unread, a chunked body is cut as soon as it passes the cap), a malformed body is a 400 and never
a 500, and ``POST /admin/convert`` (it changes node roles) takes only a request signed with the deployment key.
The orchestrator is stubbed where a request would reach the nodes.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("starlette")
pytest.importorskip("prometheus_client")

from kvwire.prfaas import config as deploy_config  # noqa: E402
from kvwire.prfaas import frontdoor  # noqa: E402
from kvwire.prfaas.controlauth import AUTH, sign  # noqa: E402
from kvwire.prfaas.frontdoor import FrontDoor  # noqa: E402
from kvwire.prfaas.orchestrator import Completion  # noqa: E402

DEFAULT = Path(__file__).resolve().parents[1] / "kvwire" / "prfaas" / "deploy-default.toml"
KEY = "frontdoor-tests"


@dataclass
class Reply:
    status: int
    body: bytes
    pulled: int  # receive() calls the app made
    pulled_bytes: int  # body bytes those calls handed over

    def json(self) -> Any:
        return json.loads(self.body)


def call(app: Any, method: str, path: str, chunks: Sequence[bytes] = (), headers: dict[str, str] | None = None,
         content_length: bool = True) -> Reply:
    """One request through the ASGI app; ``chunks`` are handed over one ``receive()`` at a time (chunked
    transfer when ``content_length`` is false), and how many the app pulled is counted."""
    hdrs = [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    if content_length:
        hdrs.append((b"content-length", str(sum(map(len, chunks))).encode()))
    else:
        hdrs.append((b"transfer-encoding", b"chunked"))
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "http",
             "path": path, "raw_path": path.encode(), "root_path": "", "query_string": b"", "headers": hdrs,
             "server": ("127.0.0.1", 18100), "client": ("127.0.0.1", 50000)}
    out = Reply(0, b"", 0, 0)
    left = list(chunks)

    async def receive() -> dict[str, Any]:
        if not left:
            await asyncio.sleep(3600)  # the client sent everything: a disconnect only when the app is done
        out.pulled += 1
        part = left.pop(0)
        out.pulled_bytes += len(part)
        return {"type": "http.request", "body": part, "more_body": bool(left)}

    async def send(msg: dict[str, Any]) -> None:
        if msg["type"] == "http.response.start":
            out.status = msg["status"]
        elif msg["type"] == "http.response.body":
            out.body += msg.get("body", b"")

    asyncio.run(asyncio.wait_for(app(scope, receive, send), 10))
    return out


@dataclass
class FakeOrch:
    """Stands in for the orchestrator's two calls the edge makes; records them."""

    converted: list[tuple[str, str]] = field(default_factory=list)
    prompts: list[list[int]] = field(default_factory=list)

    async def convert(self, name: str, role: str) -> dict[str, Any]:
        self.converted.append((name, role))
        return {"node": name, "role": role, "changed": True}

    async def complete(self, prompt: Sequence[int], *, max_tokens: int, info: Completion,
                       **_: Any) -> AsyncIterator[int]:
        self.prompts.append(list(prompt))
        info.route, info.finish_reason = "local", "length"
        for t in prompt[:max_tokens]:
            yield t


@pytest.fixture
def door(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[FrontDoor, FakeOrch]]:
    monkeypatch.setenv("KVWIRE_KEY", KEY)
    d = FrontDoor(deploy_config.load(DEFAULT))
    fake = FakeOrch()
    monkeypatch.setattr(d.orch, "convert", fake.convert)
    monkeypatch.setattr(d.orch, "complete", fake.complete)
    yield d, fake


def body(**fields: Any) -> bytes:
    return json.dumps(fields).encode()


def in_chunks(data: bytes, size: int = 64 << 10) -> list[bytes]:
    return [data[i:i + size] for i in range(0, len(data), size)] or [b""]


# ------------------------------------------------------------ the body cap
def test_the_cap_fits_a_maximal_prompt_in_either_form(door: tuple[FrontDoor, FakeOrch]) -> None:
    d, fake = door
    n, top = d.settings.max_prompt_tokens, d.vocab - 1
    as_text = json.dumps({"prompt": "\x01" * n, "max_tokens": 1, "stop": ["a"] * 4}).encode()  # \u0001 each
    as_ids = json.dumps({"prompt": [[top] * n], "max_tokens": 1}).encode()  # a batch of one, widest ids
    assert len(as_text) > 6 * n and len(as_ids) > n * (len(str(top)) + 2)
    cap = frontdoor.max_body_bytes(d.settings, d.vocab)
    assert max(len(as_text), len(as_ids)) <= cap < 2 * max(len(as_text), len(as_ids)) + (64 << 10)
    for data in (as_text, as_ids):
        for cl in (True, False):
            r = call(d.app, "POST", "/v1/completions", in_chunks(data), content_length=cl)
            assert r.status == 200, r.body
            assert r.json()["usage"]["prompt_tokens"] == n
    assert fake.prompts == [[1] * n] * 2 + [[top] * n] * 2


def test_a_content_length_over_the_cap_is_refused_unread(door: tuple[FrontDoor, FakeOrch]) -> None:
    d, fake = door
    cap = frontdoor.max_body_bytes(d.settings, d.vocab)
    big = body(prompt="x" * (8 << 20))  # 8 MiB, handed over in 64 KiB pieces
    r = call(d.app, "POST", "/v1/completions", in_chunks(big))
    assert r.status == 413 and "bytes" in r.json()["error"]["message"]
    assert r.pulled == 0 and r.pulled_bytes == 0  # not a byte of it was read
    assert fake.prompts == []
    # negative control: a body just under the cap is read in full (and its prompt refused as too long)
    ok = body(prompt="x" * (cap - 100))
    r = call(d.app, "POST", "/v1/completions", in_chunks(ok))
    assert r.status == 400 and r.pulled_bytes == len(ok) and "tokens" in r.json()["error"]["message"]


def test_a_chunked_body_is_cut_as_soon_as_it_passes_the_cap(door: tuple[FrontDoor, FakeOrch]) -> None:
    d, fake = door
    cap = frontdoor.max_body_bytes(d.settings, d.vocab)
    big = body(prompt="x" * (8 << 20))
    r = call(d.app, "POST", "/v1/completions", in_chunks(big), content_length=False)
    assert r.status == 413 and fake.prompts == []
    assert cap < r.pulled_bytes <= cap + (64 << 10)  # stopped at the first piece past the cap
    assert r.pulled_bytes < len(big) // 50
    # negative control: the same body under the cap, chunked, is read to the end
    ok = body(prompt="x" * (cap - 100))
    r = call(d.app, "POST", "/v1/completions", in_chunks(ok), content_length=False)
    assert r.status == 400 and r.pulled_bytes == len(ok)


def test_an_over_long_prompt_is_refused_before_it_is_tokenized(door: tuple[FrontDoor, FakeOrch],
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    d, fake = door
    n = d.settings.max_prompt_tokens
    seen: list[int] = []
    encode, check = d.tokenizer.encode, d.tokenizer.check

    def counted_encode(text: str) -> list[int]:
        seen.append(len(text))
        return encode(text)

    def counted_check(ids: Sequence[object], vocab: int | None = None) -> list[int]:
        seen.append(len(ids))
        return check(ids, vocab)

    monkeypatch.setattr(d.tokenizer, "encode", counted_encode)
    monkeypatch.setattr(d.tokenizer, "check", counted_check)
    for prompt in ("y" * (n + 1), [7] * (n + 1)):
        r = call(d.app, "POST", "/v1/completions", [body(prompt=prompt)])
        assert r.status == 400 and f"need 2..{n}" in r.json()["error"]["message"]
    assert seen == [] and fake.prompts == []
    r = call(d.app, "POST", "/v1/completions", [body(prompt="y" * n, max_tokens=1)])  # control: n tokens pass
    assert r.status == 200 and seen == [n] and len(fake.prompts) == 1


@pytest.mark.parametrize("raw", [b'{"prompt": "\xff\xfe hi"}', b"\xff\xfe{\x00}\x00", b"[" * 20000 + b"]" * 20000,
                                 b'{"prompt": [' + b"9" * 5000 + b"]}", b"not json", b""],
                         ids=["not-utf8", "utf16", "nested-20000-deep", "a-5000-digit-int", "not-json", "empty"])
def test_a_malformed_body_is_a_400_json_error(door: tuple[FrontDoor, FakeOrch], raw: bytes) -> None:
    d, fake = door
    r = call(d.app, "POST", "/v1/completions", [raw])
    assert r.status == 400, r.body
    assert r.json()["error"]["type"] == "invalid_request_error" and fake.prompts == []
    signed = {AUTH: sign(KEY.encode(), "POST", "/admin/convert", raw)}
    r = call(d.app, "POST", "/admin/convert", [raw], signed)
    assert r.status == 400, r.body
    assert "error" in r.json() and fake.converted == []


# ------------------------------------------------------------ /admin/convert takes the deployment key
def test_convert_needs_the_deployment_key(door: tuple[FrontDoor, FakeOrch]) -> None:
    d, fake = door
    data = body(node="local-p0", role="decode")
    for headers in ({}, {AUTH: sign(b"not-the-key", "POST", "/admin/convert", data)},
                    {AUTH: sign(KEY.encode(), "POST", "/admin/timeline", data)},  # signed for another path
                    {AUTH: sign(KEY.encode(), "POST", "/admin/convert", body(node="local-d0", role="decode"))}):
        r = call(d.app, "POST", "/admin/convert", [data], headers)
        assert r.status == 401 and fake.converted == [], r.body
    signed = {AUTH: sign(KEY.encode(), "POST", "/admin/convert", data)}
    r = call(d.app, "POST", "/admin/convert", [data], signed)  # negative control: signed, it converts
    assert r.status == 200 and r.json()["changed"] and fake.converted == [("local-p0", "decode")]
    r = call(d.app, "POST", "/admin/convert", [data], signed)  # the same signature again: a replay
    assert r.status == 401 and fake.converted == [("local-p0", "decode")]


def test_the_read_only_routes_stay_open_and_unknown_paths_404(door: tuple[FrontDoor, FakeOrch]) -> None:
    d, _ = door
    assert call(d.app, "GET", "/v1/models").status == 200
    assert call(d.app, "GET", "/metrics").status == 200
    assert call(d.app, "GET", "/admin/timeline").status == 200
    assert call(d.app, "GET", "/health").status == 503  # no node answered yet: open, and says so
    assert call(d.app, "POST", "/admin/nope").status == 404
    assert call(d.app, "GET", "/nope").status == 404
    assert call(d.app, "GET", "/admin/convert").status == 405


def test_the_front_door_needs_the_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KVWIRE_KEY", raising=False)
    with pytest.raises(ValueError, match="KVWIRE_KEY"):
        FrontDoor(deploy_config.load(DEFAULT))
