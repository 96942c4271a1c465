"""PrfaaS node processes end to end: real processes on loopback, real sockets, the real seeded hybrid model.

Three nodes from one config (``p0``: PrfaaS prefill, ``lp``: local prefill, ``d0``: local decode) serve every
test of this module (one start: each process imports torch and builds the model). The reference is the same
model built in this process (``TransformersRunner.reference``: one process, same chunks, same N-1 feed).
Asserted: tokens from p0→d0 and lp→d0 equal the reference for 20 prompts of 2..700 tokens; a prefix move
(checkpoint on lp in "local", prefill on p0 in "prfaas" pulling it over kvwire, only the increment crossing to
d0) still matches with computed_tokens = N-1-L and move bytes > 0; a negative control (the moved checkpoint,
received here over kvwire, with one linear state perturbed) changes the tokens; drain/convert/resume; a prefill
node SIGKILLed mid-request gives NodeError at the client within a bound and ends the decode request; every
process exits 0 on SIGTERM and its ports are free. The module runs in ~30-40 s on two loaded cores.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Iterator
from typing import Any

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
pytest.importorskip("httpx")

from prfaas_nodes import KEY, Nodes, free_ports, port_free  # noqa: E402

import kvwire  # noqa: E402
from kvwire.prfaas.config import MAX_PROMPT_TOKENS, CacheConfig, ModelSpec  # noqa: E402
from kvwire.prfaas.nodeclient import NodeError  # noqa: E402
from kvwire.prfaas.runner import TransformersRunner  # noqa: E402

BLOCK = CacheConfig().block_size  # 256
STEPS = 6
LENGTHS = [2, 3, 17, 64, 128, 200, 255, 256, 257, 258, 300, 383, 450, 511, 512, 513, 514, 600, 700, 769]


def prompt(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(512) for _ in range(n)]


@pytest.fixture(scope="module")
def reference() -> TransformersRunner:
    return TransformersRunner(ModelSpec(), BLOCK)


@pytest.fixture(scope="module")
def nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Nodes]:
    d = Nodes(tmp_path_factory.mktemp("prfaas"), [("p0", "prfaas", "prefill"), ("lp", "local", "prefill"),
                                                  ("d0", "local", "decode")])
    try:
        asyncio.run(d.wait_ready())
        yield d
    finally:
        d.stop()


async def serve(nodes: Nodes, prefill_node: str, rid: str, ids: list[int], *, steps: int = STEPS,
                stop: list[int] | None = None, **kw: Any) -> tuple[dict[str, Any], list[int]]:
    """expect on d0, prefill on ``prefill_node``, generate on d0: (prefill report, tokens)."""
    d0 = nodes.spec("d0")
    async with nodes.client("d0") as dec, nodes.client(prefill_node) as pre:
        await dec.expect(rid, ids, reuse_length=kw.pop("expect_reuse", 0))
        report = await pre.prefill(rid, ids, decode_host=d0.host, decode_data_port=d0.data_port, **kw)
        tokens = [t async for t in dec.generate(rid, max_tokens=steps, stop=stop)]
    return report, tokens


def test_tokens_match_reference_prfaas_and_local(nodes: Nodes, reference: TransformersRunner) -> None:
    prompts = [prompt(n, seed=i) for i, n in enumerate(LENGTHS)]
    want = [reference.reference(p, STEPS) for p in prompts]

    async def run() -> list[tuple[dict[str, Any], list[int]]]:
        sem = asyncio.Semaphore(4)  # several requests in flight on d0 at once

        async def one(node: str, i: int) -> tuple[dict[str, Any], list[int]]:
            async with sem:
                return await serve(nodes, node, f"{node}-{i}", prompts[i])
        return await asyncio.gather(*(one(node, i) for node in ("p0", "lp") for i in range(len(prompts))))

    results = asyncio.run(run())
    for k, (report, tokens) in enumerate(results):
        i = k % len(prompts)
        assert report["state"] == "done", report
        assert report["computed_tokens"] == LENGTHS[i] - 1 and report["reused_tokens"] == 0
        assert report["checkpoint_length"] == ((LENGTHS[i] - 1) // BLOCK * BLOCK or None)
        assert tokens == want[i], f"prompt {i} ({LENGTHS[i]} tokens) via {'p0' if k < len(prompts) else 'lp'}"
    # a stop id ends the stream right after it
    rep, toks = asyncio.run(serve(nodes, "p0", "stop", prompts[7], steps=STEPS, stop=[want[7][2]]))
    assert toks == want[7][:want[7].index(want[7][2]) + 1]


def test_prefix_move_across_clusters(nodes: Nodes, reference: TransformersRunner) -> None:
    first = prompt(300, seed=100)
    follow = first + prompt(230, seed=101)  # a multi-turn follow-up extending the first prompt
    L = 256

    async def run() -> tuple[dict[str, Any], list[int], dict[str, Any], list[int], dict[str, Any], list[int]]:
        r1, t1 = await serve(nodes, "lp", "turn1", first)  # lp (local) checkpoints first[:256]; d0 keeps its KV
        lp = nodes.spec("lp")
        # p0 (prfaas) pulls lp's checkpoint over kvwire, computes the rest; d0 gets only [256, N-1) of the KV
        r2, t2 = await serve(nodes, "p0", "turn2", follow, reuse_length=L, reuse_from=(lp.host, lp.control_port),
                             send_from=L, expect_reuse=L)
        full, t3 = await serve(nodes, "p0", "turn2-full", follow)  # the same prompt with nothing reused
        return r1, t1, r2, t2, full, t3

    r1, t1, r2, t2, full, t3 = asyncio.run(run())
    assert r1["checkpoint_length"] == L and t1 == reference.reference(first, STEPS)
    assert r2["state"] == "done" and r2["reason"] == "", r2
    assert r2["reused_tokens"] == L and r2["computed_tokens"] == len(follow) - 1 - L
    assert r2["move_bytes"] > 0 and r2["move_s"] > 0
    assert r2["bytes"] < full["bytes"]  # only the increment crossed to decode
    want = reference.reference(follow, STEPS)
    assert t2 == want and t3 == want


def test_negative_control_perturbed_checkpoint_changes_tokens(nodes: Nodes, reference: TransformersRunner,
                                                               no_leaks: None) -> None:
    """The moved checkpoint, received here over kvwire, reproduces the reference; perturbing one linear state
    of it changes the tokens (so the comparisons above can fail)."""
    first = prompt(260, seed=200)
    follow = first + prompt(100, seed=201)
    rx = kvwire.Receiver("127.0.0.1", 0, key=KEY.encode(), peer_timeout=5.0)
    try:
        async def run() -> None:
            await serve(nodes, "lp", "ctl-1", first)
            handle, ck = reference.expect_checkpoint(rx, "ctl-move", follow, 256, timeout=20)
            async with nodes.client("lp") as lp:
                sent = await lp.export("ctl-move", follow, 256, dest_host="127.0.0.1", dest_data_port=rx.address[1])
            assert sent["bytes"] > 0
            await asyncio.to_thread(handle.result, 20)
            want = reference.reference(follow, STEPS)
            assert _from_checkpoint(reference, follow, ck) == want
            state_layer = next(i for i, kv in enumerate(ck.kv) if not kv and ck.layers[i])
            ck.layers[state_layer][1].zero_()  # that layer's recurrent state
            assert _from_checkpoint(reference, follow, ck) != want, "a perturbed state left the tokens unchanged"
        asyncio.run(run())
    finally:
        rx.close()


def _from_checkpoint(runner: TransformersRunner, ids: list[int], ck: Any) -> list[int]:
    """Prefill ``ids`` in this process from ``ck`` to a loopback receiver, decode: the tokens."""
    rx = kvwire.Receiver("127.0.0.1", 0, key=b"local", peer_timeout=5.0)
    s = kvwire.connect("127.0.0.1", rx.address[1], key=b"local", lanes=1)
    try:
        inc = runner.expect(rx, "x", ids, timeout=20)
        runner.prefill(ids, s, "x", start=ck).transfer.result(20)
        return list(runner.decode(inc, STEPS))
    finally:
        s.close()
        rx.close()


def test_bad_input_and_unreachable_peers(nodes: Nodes, reference: TransformersRunner) -> None:
    """Typed errors at the call; an unreachable decode port or prefix source never hangs a prefill."""
    ids = prompt(300, seed=500)
    d0 = nodes.spec("d0")
    closed_port = free_ports(1)[0]

    async def run() -> None:
        async with nodes.client("d0") as dec, nodes.client("p0") as pre:
            for bad, match in (([5], "at least 2"), ([1, 512], r"\[0, 512\)"), ([1, -1], r"\[0, 512\)")):
                with pytest.raises(NodeError, match=match) as e:
                    await dec.expect("bad", bad)
                assert e.value.status == 400
            with pytest.raises(NodeError, match="list of ints") as e:
                await pre.prefill("bad", ["a", 1], decode_host=d0.host, decode_data_port=d0.data_port)  # type: ignore
            with pytest.raises(NodeError, match="multiple of") as e:
                await pre.prefill("bad", ids, decode_host=d0.host, decode_data_port=d0.data_port, send_from=100)
            with pytest.raises(NodeError, match="no held prefix") as e:
                await dec.expect("bad", prompt(600, seed=501), reuse_length=BLOCK)
            assert e.value.status == 409
            with pytest.raises(NodeError, match="not expected") as e:
                await _drain(dec.generate("never-expected", max_tokens=2))
            assert e.value.status == 404
            # no decode node listens there: the prefill ends failed at once
            t0 = time.monotonic()
            out = await pre.prefill("nowhere", ids, decode_host="127.0.0.1", decode_data_port=closed_port)
            assert out["state"] == "failed" and out["reason"] and time.monotonic() - t0 < 10
            # the prefix source is down: p0 prefills in full, says so, and the tokens still match
            out, toks = await serve(nodes, "p0", "src-down", ids, reuse_length=BLOCK,
                                    reuse_from=("127.0.0.1", closed_port))
            assert out["state"] == "done" and out["reused_tokens"] == 0 and "prefilled in full" in out["reason"]
            assert toks == reference.reference(ids, STEPS)
            assert not await _busy(dec) and not await _busy(pre)
        # a client that gives up while the decode node waits for the cache: the node cancels the request
        async with nodes.client("d0", timeout=1.0) as impatient, nodes.client("d0") as dec:
            await dec.expect("gave-up", ids)
            with pytest.raises(NodeError, match="no answer"):
                await _drain(impatient.generate("gave-up", max_tokens=2))
            deadline = time.monotonic() + 5
            while await _busy(dec):
                assert time.monotonic() < deadline, await dec.health()
                await asyncio.sleep(0.05)
    asyncio.run(run())


def test_control_api_is_signed(nodes: Nodes) -> None:
    """Unsigned, wrongly keyed, replayed or tampered requests get 401 before the node reads a body; an
    over-long signed body 413 (its bytes never read); nothing of them reaches the node."""
    import httpx

    from kvwire.prfaas.controlauth import AUTH, MAX_BODY, sign

    url = nodes.spec("d0").control_url
    body = json.dumps({"request_id": "forged", "prompt": list(range(1000))}).encode()

    async def run() -> None:
        async with httpx.AsyncClient(base_url=url, timeout=5) as http:
            assert (await http.get("/health")).status_code == 200  # the liveness probe stays open
            assert (await http.get("/checkpoints")).status_code == 401
            assert (await http.post("/expect", content=body)).status_code == 401
            bad = sign(b"not-the-key", "POST", "/expect", body)
            assert (await http.post("/expect", content=body, headers={AUTH: bad})).status_code == 401
            good = sign(KEY.encode(), "POST", "/expect", body)
            r = await http.post("/expect", content=body.replace(b"forged", b"forgex"), headers={AUTH: good})
            assert r.status_code == 401
            good = sign(KEY.encode(), "GET", "/checkpoints", b"")
            assert (await http.get("/checkpoints", headers={AUTH: good})).status_code == 200
            assert (await http.get("/checkpoints", headers={AUTH: good})).status_code == 401  # replayed nonce
        # a head that claims a huge body: refused at once, no body awaited (the node would otherwise block)
        for key, status in ((b"wrong", 401), (KEY.encode(), 413)):
            reader, writer = await asyncio.open_connection(nodes.spec("d0").host, nodes.spec("d0").control_port)
            n = MAX_BODY + 1
            auth = sign(key, "POST", "/expect", b"x" * n)
            writer.write(f"POST /expect HTTP/1.1\r\nHost: x\r\nContent-Length: {n}\r\n{AUTH}: {auth}\r\n\r\n"
                         .encode())
            await writer.drain()
            line = await asyncio.wait_for(reader.readline(), 5)
            assert line.split()[1] == str(status).encode(), line
            writer.close()
        async with nodes.client("d0") as dec:
            assert not await _busy(dec)
    asyncio.run(run())


def test_cancel_a_queued_prefill(nodes: Nodes) -> None:
    """A prefill cancelled while it waits behind another is never computed nor sent; the other completes."""
    long_ids, short_ids = prompt(3000, seed=600), prompt(300, seed=601)
    d0 = nodes.spec("d0")

    async def run() -> None:
        async with nodes.client("d0") as dec, nodes.client("p0") as pre:
            await dec.expect("q-long", long_ids)
            await dec.expect("q-short", short_ids)
            first = asyncio.create_task(pre.prefill("q-long", long_ids, decode_host=d0.host,
                                                    decode_data_port=d0.data_port))
            while not first.done() and (await pre.health())["running"] == 0:
                await asyncio.sleep(0.01)
            second = asyncio.create_task(pre.prefill("q-short", short_ids, decode_host=d0.host,
                                                     decode_data_port=d0.data_port))
            while not second.done() and (await pre.health())["queued"] == 0:
                await asyncio.sleep(0.01)
            assert not first.done(), "the long prefill ended before the short one queued: nothing tested"
            await pre.cancel("q-short")
            await dec.cancel("q-short")
            a, b = await first, await second
            assert a["state"] == "done" and b["state"] == "cancelled" and b["computed_tokens"] == 0, (a, b)
            assert len(await _drain(dec.generate("q-long", max_tokens=2))) == 2
            assert not await _busy(dec) and not await _busy(pre)
    asyncio.run(run())


def test_drain_convert_resume(nodes: Nodes) -> None:
    ids = prompt(900, seed=300)

    async def run() -> None:
        async with nodes.client("lp") as lp:
            with pytest.raises(NodeError, match="drain .* first") as e:
                await lp.set_role("decode")
            assert e.value.status == 409
            d0 = nodes.spec("d0")
            async with nodes.client("d0") as dec:
                await dec.expect("drain-1", ids)
                running = asyncio.create_task(lp.prefill("drain-1", ids, decode_host=d0.host,
                                                         decode_data_port=d0.data_port))
                while not running.done() and not await _busy(lp):
                    await asyncio.sleep(0.01)
                await lp.drain()
                # drain waited for the request: the node holds nothing; the reply to the prefill call comes
                # back on its own HTTP connection, so the client task may finish a moment after the drain
                assert not await _busy(lp)
                assert (await asyncio.wait_for(running, 10))["state"] == "done"
                assert len(await _drain(dec.generate("drain-1", max_tokens=2))) == 2
            with pytest.raises(NodeError) as e:
                await serve(nodes, "lp", "drain-2", ids)
            assert e.value.status == 503
            async with nodes.client("d0") as dec:
                assert await _busy(dec)  # drain-2 is expected there
                await dec.cancel("drain-2")  # what a router does when the prefill is refused
                assert not await _busy(dec)
            await lp.set_role("decode")
            await lp.resume()
            h = await lp.health()
            assert (h["role"], h["state"], h["checkpoints"]) == ("decode", "ready", 0)
            await lp.expect("as-decode", ids)  # it takes decode work now
            await lp.cancel("as-decode")
            await lp.drain()
            await lp.set_role("prefill")
            await lp.resume()
            assert (await lp.health())["role"] == "prefill"
        async with nodes.client("p0") as p0:
            await p0.drain()
            with pytest.raises(NodeError, match="only local"):
                await p0.set_role("decode")
            await p0.resume()
    asyncio.run(run())


def test_prefill_node_killed_mid_request(nodes: Nodes) -> None:
    """Runs last: p0 is SIGKILLed while it prefills a long prompt (the longest the nodes take: max_prompt_tokens)."""
    ids = prompt(MAX_PROMPT_TOKENS, seed=400)
    d0 = nodes.spec("d0")

    async def run() -> None:
        async with nodes.client("d0") as dec, nodes.client("p0", timeout=30) as pre:
            await dec.expect("kill-1", ids)
            task = asyncio.create_task(pre.prefill("kill-1", ids, decode_host=d0.host,
                                                   decode_data_port=d0.data_port))
            deadline = time.monotonic() + 20
            while (await pre.health())["running"] == 0:
                assert time.monotonic() < deadline and not task.done(), "p0 never started the prefill"
                await asyncio.sleep(0.02)
            await asyncio.sleep(0.05)
            nodes.kill("p0")
            t0 = time.monotonic()
            with pytest.raises(NodeError):
                await asyncio.wait_for(task, 10)
            assert time.monotonic() - t0 < 5
            t0 = time.monotonic()
            with pytest.raises(NodeError) as e:
                await asyncio.wait_for(_drain(dec.generate("kill-1", max_tokens=4)), 15)
            assert e.value.state in ("failed", "cancelled", "timed_out")
            assert time.monotonic() - t0 < 10
            deadline = time.monotonic() + 5  # the node ends the request just after sending its error line
            while await _busy(dec):
                assert time.monotonic() < deadline, await dec.health()
                await asyncio.sleep(0.02)
            assert (await dec.health())["state"] == "ready"
    asyncio.run(run())


async def _busy(client: Any) -> bool:
    h = await client.health()
    return bool(h["queued"] + h["running"])


async def _drain(it: Any) -> list[int]:
    return [t async for t in it]


def test_stop_is_clean(nodes: Nodes) -> None:
    """SIGTERM: every live node exits 0 (uvicorn shutdown, sessions and receiver closed), its ports free."""
    codes = nodes.stop()
    assert {n: c for n, c in codes.items() if n != "p0"} == {"lp": 0, "d0": 0}, \
        {n: nodes.log(n) for n in codes}
    for n in nodes.procs:
        s = nodes.spec(n)
        assert port_free(s.control_port) and port_free(s.data_port), n
