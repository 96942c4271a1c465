"""A node's control API bounds what one signed request may make it hold (kvwire/prfaas/node.py, nodeapp.py).

Any holder of the deployment's key (every node is one) reaches the node API directly, past the front door's
checks: the node itself refuses a prompt over ``[router].max_prompt_tokens`` (or the model's
``max_position_embeddings``) and ``max_tokens`` over ``max_output_tokens`` with 400 before allocating, caps
the bytes of caches it holds for expected requests (``[cache].pending_bytes``; 503 when full, room again when
one is taken or ends) and their count (``pending_requests``), drops one whose ``/generate`` never comes
(``expect_timeout_s``), and answers a failed allocation with a typed 503. Each refusal has its negative
control: the legitimate call at the limit still works. The node's ASGI app runs in-process over
``httpx.ASGITransport`` on a tiny model, requests signed as ``NodeClient`` signs them.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("starlette")
httpx = pytest.importorskip("httpx")

from prfaas_nodes import free_ports  # noqa: E402

from kvwire.prfaas import config as cfg  # noqa: E402
from kvwire.prfaas.controlauth import AUTH, sign  # noqa: E402
from kvwire.prfaas.node import Node  # noqa: E402
from kvwire.prfaas.nodeapp import app  # noqa: E402

KEY = b"prfaas-node-limits-key"
PROMPT_CAP, OUTPUT_CAP = 4096, 1024  # the documented defaults ([router] max_prompt_tokens / max_output_tokens)
TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4, "full_attention_interval": 4,
        "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 32, "linear_num_key_heads": 1,
        "linear_num_value_heads": 2, "linear_key_head_dim": 16, "linear_value_head_dim": 16,
        "mlp_only_layers": [0, 1, 2, 3]}


def make_node(*, router: dict[str, Any] | None = None, cache: dict[str, Any] | None = None,
              hf: dict[str, Any] | None = None) -> Node:
    control, data = free_ports(2)
    c = cfg.from_dict({"model": {"hf": {**TINY, **(hf or {})}}, "cache": {"block_size": 16, **(cache or {})},
                       "router": router or {},
                       "nodes": [{"name": "d0", "cluster": "local", "role": "decode", "control_port": control,
                                  "data_port": data}]})
    return Node(c, c.node("d0"), KEY, transfer_timeout=0.5)


@pytest.fixture
def node() -> Iterator[Node]:
    n = make_node()
    try:
        yield n
    finally:
        n.close()


async def call(node: Node, path: str, body: dict[str, Any]) -> httpx.Response:
    """One signed POST to the node's app, in-process."""
    content = json.dumps(body).encode()
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app(node)), base_url="http://node") as http:
        return await http.post(path, content=content, headers={AUTH: sign(KEY, "POST", path, content),
                                                               "content-type": "application/json"})


def prompt(n: int) -> list[int]:
    return [(7 * i + 3) % 512 for i in range(n)]


def test_limits_come_from_the_router_table_and_the_model() -> None:
    base = {"nodes": [{"name": "d0", "cluster": "local", "role": "decode", "control_port": 9101, "data_port": 9102}]}
    lim = cfg.request_limits(cfg.from_dict(base))
    assert (lim.max_prompt_tokens, lim.max_output_tokens) == (cfg.MAX_PROMPT_TOKENS, cfg.MAX_OUTPUT_TOKENS)
    lim = cfg.request_limits(cfg.from_dict({**base, "router": {"max_prompt_tokens": 100, "max_output_tokens": 7}}))
    assert (lim.max_prompt_tokens, lim.max_output_tokens) == (100, 7)
    small = cfg.from_dict({**base, "model": {"hf": {"max_position_embeddings": 1000}}})
    assert cfg.request_limits(small).max_prompt_tokens == 1000  # the model's positions cap the router's 4096
    with pytest.raises(cfg.ConfigError, match="max_prompt_tokens"):
        cfg.request_limits(cfg.from_dict({**base, "router": {"max_prompt_tokens": "many"}}))
    from kvwire.prfaas.settings import FrontSettings
    s = FrontSettings()
    assert (s.max_prompt_tokens, s.max_output_tokens) == (cfg.MAX_PROMPT_TOKENS, cfg.MAX_OUTPUT_TOKENS)


def test_expect_refuses_an_overlong_prompt_and_allocates_nothing(node: Node) -> None:
    async def run() -> None:
        r = await call(node, "/expect", {"request_id": "huge", "prompt": [1] * 100_000})
        assert r.status_code == 400, r.text
        assert "max_prompt_tokens" in r.json()["error"]
        assert node._pending == {}
        r = await call(node, "/expect", {"request_id": "one-over", "prompt": prompt(PROMPT_CAP + 1)})
        assert r.status_code == 400 and "one-over" not in node._pending
        # negative control: a prompt of exactly max_prompt_tokens is expected (its buffers registered)
        r = await call(node, "/expect", {"request_id": "longest", "prompt": prompt(PROMPT_CAP)})
        assert r.status_code == 200, r.text
        assert list(node._pending) == ["longest"]
        held = sum(t.numel() * t.element_size() for t in node._pending["longest"].tensors)
        assert node.limits.max_prompt_tokens == PROMPT_CAP and node.pending_bytes == held > 0
    asyncio.run(run())


def test_every_prompt_endpoint_is_bounded(node: Node) -> None:
    over = prompt(PROMPT_CAP + 1)

    async def run() -> None:
        r = await call(node, "/prefill", {"request_id": "p", "prompt": over, "decode_host": "127.0.0.1",
                                          "decode_data_port": 9})
        assert r.status_code == 400 and "max_prompt_tokens" in r.json()["error"], r.text
        r = await call(node, "/export", {"request_id": "x", "prompt": over, "length": 16, "dest_host": "127.0.0.1",
                                         "dest_data_port": 9})
        assert r.status_code == 400 and "max_prompt_tokens" in r.json()["error"], r.text
        # negative control: a prompt at the limit passes the check (then 409: this is a decode node; 404: no
        # checkpoint held here)
        ok = prompt(PROMPT_CAP)
        r = await call(node, "/prefill", {"request_id": "p", "prompt": ok, "decode_host": "127.0.0.1",
                                          "decode_data_port": 9})
        assert r.status_code == 409, r.text
        r = await call(node, "/export", {"request_id": "x", "prompt": ok, "length": 16, "dest_host": "127.0.0.1",
                                         "dest_data_port": 9})
        assert r.status_code == 404, r.text
    asyncio.run(run())


def test_generate_refuses_max_tokens_over_the_cap(node: Node) -> None:
    cap = OUTPUT_CAP

    async def run() -> None:
        assert (await call(node, "/expect", {"request_id": "g", "prompt": prompt(40)})).status_code == 200
        r = await call(node, "/generate", {"request_id": "g", "max_tokens": 10**9})
        assert r.status_code == 400 and "max_output_tokens" in r.json()["error"], r.text
        r = await call(node, "/generate", {"request_id": "g", "max_tokens": cap + 1})
        assert r.status_code == 400, r.text
        assert "g" in node._pending  # refused before the request was taken
        # negative control: max_tokens == cap is accepted (the stream then reports the cache that never came)
        r = await call(node, "/generate", {"request_id": "g", "max_tokens": cap})
        assert r.status_code == 200, r.text
        item = json.loads(r.text.splitlines()[0])
        assert "error" in item and item["state"] in ("timed_out", "failed", "cancelled")
        assert node.limits.max_output_tokens == cap
    asyncio.run(run())


def test_pending_bytes_are_bounded_and_freed() -> None:
    probe = make_node(router={"max_prompt_tokens": 256})
    one = probe.backend.expect_nbytes(256)
    assert probe.pending_budget == cfg.PENDING_PROMPTS * one  # the documented default
    probe.close()
    node = make_node(router={"max_prompt_tokens": 256}, cache={"pending_bytes": 3 * one})
    try:
        async def run() -> None:
            for i in range(3):
                r = await call(node, "/expect", {"request_id": f"r{i}", "prompt": prompt(256)})
                assert r.status_code == 200, r.text
            assert node.pending_bytes == 3 * one
            r = await call(node, "/expect", {"request_id": "r3", "prompt": prompt(256)})
            assert r.status_code == 503 and "pending_bytes" in r.json()["error"], r.text
            assert "r3" not in node._pending and node.pending_bytes == 3 * one
            # one is taken (cancelled by the router): room again
            assert (await call(node, "/cancel", {"request_id": "r0"})).status_code == 200
            assert node.pending_bytes == 2 * one
            assert (await call(node, "/expect", {"request_id": "r3", "prompt": prompt(256)})).status_code == 200
            assert (await call(node, "/expect", {"request_id": "r4", "prompt": prompt(256)})).status_code == 503
            # the others expire (no cache came within transfer_timeout): all room again
            deadline = asyncio.get_running_loop().time() + 10
            while node._pending:
                assert asyncio.get_running_loop().time() < deadline, node._pending
                await asyncio.sleep(0.05)
            assert node.pending_bytes == 0
            for i in range(3):
                r = await call(node, "/expect", {"request_id": f"again{i}", "prompt": prompt(256)})
                assert r.status_code == 200, r.text
            # a taken request's buffers count until its generate ends, then are freed
            r = await call(node, "/generate", {"request_id": "again0", "max_tokens": 2})
            assert r.status_code == 200 and "error" in r.text
            assert node.pending_bytes == 2 * one
        asyncio.run(run())
    finally:
        node.close()


def test_an_expected_request_without_generate_is_dropped_cache_or_not() -> None:
    """A router that crashed after /expect never sends /generate. The request's buffers were held until its
    transfer ended badly, and for ever once its cache had arrived (measured: 60160 bytes still held 10 s after
    a delivered cache, transfer_timeout 2 s): a few such crashes filled ``pending_bytes`` and every /expect
    after was a 503. Now each is dropped ``[cache] expect_timeout_s`` after its /expect, delivered or still
    in flight (transfer_timeout 30 s here), its buffers freed; a late /generate gets one ``timed_out`` line.
    At most ``pending_requests`` are held (503). Negative control: a request whose /generate comes at once, as
    the router sends it, streams its tokens and frees its buffers."""
    pc, pdata, dc, ddata = free_ports(4)
    c = cfg.from_dict({"model": {"hf": TINY}, "cache": {"block_size": 16, "expect_timeout_s": 1.5,
                                                        "pending_requests": 2},
                       "nodes": [{"name": "p0", "cluster": "prfaas", "role": "prefill", "control_port": pc,
                                  "data_port": pdata},
                                 {"name": "d0", "cluster": "local", "role": "decode", "control_port": dc,
                                  "data_port": ddata}]})
    pre, dec = Node(c, c.node("p0"), KEY, transfer_timeout=30), Node(c, c.node("d0"), KEY, transfer_timeout=30)
    dest = ("127.0.0.1", ddata)

    async def run() -> None:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        assert (await call(dec, "/expect", {"request_id": "delivered", "prompt": prompt(200)})).status_code == 200
        assert (await pre.prefill("delivered", prompt(200), dest))["state"] == "done"
        assert (await call(dec, "/expect", {"request_id": "lost", "prompt": prompt(64)})).status_code == 200
        r = await call(dec, "/expect", {"request_id": "third", "prompt": prompt(64)})
        assert r.status_code == 503 and "pending_requests" in r.json()["error"], r.text
        assert dec._pending["delivered"].handle.state.value == "done" and dec.pending_bytes > 0
        while dec._pending:
            assert loop.time() - t0 < 5, (dec._pending, dec.pending_bytes)
            await asyncio.sleep(0.05)
        assert loop.time() - t0 > 1.4 and dec.pending_bytes == 0
        r = await call(dec, "/generate", {"request_id": "delivered", "max_tokens": 2})
        line = json.loads(r.text.splitlines()[0])
        assert line["state"] == "timed_out" and "no /generate within 1.5 s" in line["error"], line
        # negative control: /generate right after /expect (it waits there for the cache), then the prefill
        assert (await call(dec, "/expect", {"request_id": "served", "prompt": prompt(200)})).status_code == 200
        gen, rep = await asyncio.gather(call(dec, "/generate", {"request_id": "served", "max_tokens": 3}),
                                        pre.prefill("served", prompt(200), dest))
        assert rep["state"] == "done"
        assert [list(json.loads(x)) for x in gen.text.splitlines()] == [["token"]] * 3, gen.text
        assert dec._pending == {} and dec.pending_bytes == 0
    try:
        asyncio.run(run())
    finally:
        pre.close()
        dec.close()


def test_allocation_failure_is_a_typed_503(node: Node, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    def no_memory(*a: Any, **k: Any) -> Any:
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory")

    async def run() -> None:
        monkeypatch.setattr(torch, "empty", no_memory)
        r = await call(node, "/expect", {"request_id": "oom", "prompt": prompt(64)})
        assert r.status_code == 503 and "allocate" in r.json()["error"], r.text
        assert node._pending == {} and node.pending_bytes == 0
        monkeypatch.undo()  # negative control: the same call with memory to spare
        r = await call(node, "/expect", {"request_id": "oom", "prompt": prompt(64)})
        assert r.status_code == 200, r.text
    asyncio.run(run())


def test_the_client_surfaces_refusals_as_typed_errors(node: Node) -> None:
    """``NodeClient`` (what the orchestrator and other nodes use) gets a ``NodeError`` with the status."""
    from kvwire.prfaas.nodeclient import NodeClient, NodeError

    async def run() -> None:
        client = NodeClient("node", 80, key=KEY)
        await client._http.aclose()
        client._http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app(node)), base_url="http://node")
        try:
            with pytest.raises(NodeError, match="max_prompt_tokens") as e:
                await client.expect("big", [1] * 100_000)
            assert e.value.status == 400
            with pytest.raises(NodeError, match="max_output_tokens") as e:
                async for _ in client.generate("big", max_tokens=10**6):
                    pass
            assert e.value.status == 400
            await client.expect("fine", prompt(PROMPT_CAP))  # negative control
        finally:
            await client.aclose()
    asyncio.run(run())


def test_the_orchestrator_sends_nothing_the_nodes_refuse(monkeypatch: pytest.MonkeyPatch) -> None:
    """With the model's positions below ``[router].max_prompt_tokens`` the orchestrator refuses what every node
    would (it never sends a prompt a node answers 400); a prompt at the nodes' cap passes its check."""
    pytest.importorskip("prometheus_client")
    monkeypatch.setenv("KVWIRE_KEY", KEY.decode())
    from kvwire.prfaas.orchestrator import Orchestrator, RequestError
    from kvwire.prfaas.settings import FrontSettings
    from kvwire.prfaas.telemetry import Telemetry

    c = cfg.from_dict({"model": {"hf": {**TINY, "max_position_embeddings": 300}}, "router": {"max_output_tokens": 9},
                       "nodes": [{"name": "d0", "cluster": "local", "role": "decode", "control_port": 9101,
                                  "data_port": 9102}]})
    orch = Orchestrator(c, FrontSettings.from_table(c.router), Telemetry())
    assert (orch.max_prompt_tokens, orch.max_output_tokens) == (300, 9) == (
        cfg.request_limits(c).max_prompt_tokens, cfg.request_limits(c).max_output_tokens)

    async def first(ids: list[int], max_tokens: int) -> None:
        await orch.complete(ids, max_tokens=max_tokens).__anext__()

    async def run() -> None:
        try:
            with pytest.raises(RequestError, match="need 2..300"):
                await first(prompt(301), 4)
            with pytest.raises(RequestError, match=r"1\.\.9"):
                await first(prompt(300), 10)
            with pytest.raises(Exception) as e:  # the limits pass; no healthy node serves it here
                await first(prompt(300), 9)
            assert not isinstance(e.value, RequestError), e.value
        finally:
            await orch.fleet.aclose()
    asyncio.run(run())


def test_a_node_that_refuses_a_request_is_not_marked_down(monkeypatch: pytest.MonkeyPatch) -> None:
    """A decode node whose cache budget is full answers /expect with 503: it serves, so the request fails
    (Unavailable) but the node stays in the fleet; marking it down took a busy node out until the next health
    poll. Negative control: a node that cannot be reached (no status) is marked down."""
    pytest.importorskip("prometheus_client")
    monkeypatch.setenv("KVWIRE_KEY", KEY.decode())
    from types import SimpleNamespace

    from kvwire.prfaas.nodeclient import NodeError
    from kvwire.prfaas.orchestrator import Completion, Orchestrator, Unavailable
    from kvwire.prfaas.settings import FrontSettings
    from kvwire.prfaas.telemetry import Telemetry

    c = cfg.from_dict({"model": {"hf": TINY}, "nodes": [
        {"name": "d0", "cluster": "local", "role": "decode", "control_port": 9101, "data_port": 9102}]})
    orch = Orchestrator(c, FrontSettings.from_table(c.router), Telemetry())
    marked: list[str] = []
    monkeypatch.setattr(orch.fleet, "mark_down", lambda view, why: marked.append(why))

    def attempt(error: BaseException) -> None:
        async def expect(*_: Any, **__: Any) -> None:
            raise error

        dec = SimpleNamespace(name="d0", client=SimpleNamespace(expect=expect))

        async def run() -> None:
            try:
                with pytest.raises(Unavailable):
                    await orch._run(Completion("r", 2), "r", [1, 2], 4, [], SimpleNamespace(), dec,  # type: ignore[arg-type]
                                    0, None, 0)
            finally:
                await orch.fleet.aclose()
        asyncio.run(run())

    attempt(NodeError("expect: 503 cache budget full", status=503))
    attempt(NodeError("expect: 400 prompt too long", status=400))
    assert marked == []
    attempt(NodeError("expect: connection refused"))  # negative control: unreachable
    attempt(OSError("no route"))
    assert len(marked) == 2
