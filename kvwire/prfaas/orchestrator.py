"""The router service's core: runs each completion across the nodes, and the two control loops, for real.

Owns: the router's view of every node (health, role, queue, egress ``LinkState``), the global prefix index
fed from the nodes' checkpoints, one completion's life (route with ``Router`` on the index's cached lengths,
pick nodes, move a prefix when the decision says so, expect → prefill → generate, re-prefill locally when a
PrfaaS prefill fails before the first token), the short loop (every ``poll_s``: health, links, both prefill
queues → ``Router.observe``) and the long loop (``Router.maybe_replan`` → drain / set_role / resume a local node).
Nothing reaches the client before the decode node has the whole cache (its ``generate`` yields only then),
so a re-prefill never duplicates tokens.
Must not know: HTTP, Prometheus exposition, the tokenizer, how nodes compute or transfer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from . import model
from .config import DeployConfig, request_limits
from .fleet import Busy, ConvertError, Fleet, NodeView, backlog
from .nodeclient import NodeError
from .observed import ObservedProfile
from .prefix import block_keys
from .profile import ServedProfile
from .router import PD, PRFAAS, Router
from .router import RouteRequest as _RouteRequest
from .settings import FrontSettings
from .telemetry import Telemetry
from .tokenizer import StopMatcher

log = logging.getLogger("kvwire.prfaas.router")
ROUTES = ("prfaas", "local")  # what a caller may force; PD (the router's name) is the local cluster
_CLUSTER = {PRFAAS: "prfaas", PD: "local"}


class RequestError(ValueError):
    """The completion request is invalid (prompt too long, no decode node can take it...)."""


class Unavailable(RuntimeError):
    """No healthy node can serve this now."""


@dataclass
class Completion:
    """Filled in as the completion runs; ``finish_reason`` once its tokens are exhausted."""

    request_id: str
    prompt_tokens: int
    route: str = ""
    prefill_node: str = ""
    decode_node: str = ""
    reprefilled: bool = False
    moved_prefix: int = 0
    reused: int = 0
    completion_tokens: int = 0
    finish_reason: str | None = None
    ttft_s: float | None = None
    events: list[str] = field(default_factory=list)


class Orchestrator:
    def __init__(self, config: DeployConfig, settings: FrontSettings, telemetry: Telemetry) -> None:
        self.config = config
        self.settings = settings
        # what every node accepts (its max_position_embeddings may be below [router].max_prompt_tokens)
        limits = request_limits(config)
        self.max_prompt_tokens = min(settings.max_prompt_tokens, limits.max_prompt_tokens)
        self.max_output_tokens = min(settings.max_output_tokens, limits.max_output_tokens)
        self.tm = telemetry
        self.block_size = config.cache.block_size
        self.fleet = Fleet(config, telemetry, control_timeout_s=settings.node_timeout_s,
                           work_timeout_s=max(settings.prefill_timeout_s, settings.first_token_timeout_s),
                           unhealthy_after=settings.unhealthy_after)
        self.nodes = self.fleet.nodes
        self.observed = ObservedProfile()
        self.router = Router(settings.t_star, settings.loop, deployment=self._deployment())
        self._tasks: list[asyncio.Task[Any]] = []
        self._background: set[asyncio.Task[Any]] = set()
        self.tm.planned.set(self.router.t_star)
        self.tm.threshold.set(self.router.t)

    @property
    def transitions(self) -> list[tuple[float, str, str]]:
        return self.fleet.transitions

    def _deployment(self) -> model.Deployment | None:
        """What the long loop plans with: the profile file if ``[router] profile`` names one, else the
        prefill times, cache sizes and decode steps measured so far (``None`` until there are enough)."""
        s = self.settings
        n_prfaas, n_pd = len(self.config.by(cluster="prfaas")), len(self.config.by(cluster="local"))
        if s.profile:
            prof = ServedProfile.load(s.profile)
            return model.Deployment(prof.prefill, prof.prefill, prof.kv, model.DecodeProfile(
                s.decode_t_step_s, s.decode_batch, s.decode_l_out), n_prfaas, n_pd, s.egress_gbps * model.GBPS)
        return self.observed.deployment(n_prfaas, n_pd, batch=s.decode_batch, l_out=s.decode_l_out,
                                        b_out=s.egress_gbps * model.GBPS)

    # ------------------------------------------------------------ lifecycle
    async def start(self, wait_healthy_s: float = 0.0) -> None:
        await self.poll()
        deadline = time.monotonic() + wait_healthy_s
        while not all(v.healthy for v in self.nodes.values()) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
            await self.poll()
        self._tasks = [asyncio.create_task(self._short_loop(), name="prfaas-short-loop")]
        if self.settings.replan_s > 0:
            self._tasks.append(asyncio.create_task(self._long_loop(), name="prfaas-long-loop"))

    async def stop(self) -> None:
        for t in [*self._tasks, *self._background]:
            t.cancel()
        for t in [*self._tasks, *self._background]:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        await self.fleet.aclose()

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # ------------------------------------------------------------ short loop
    async def _short_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.poll_s)
            try:
                await self.poll()
            except Exception:  # the loop must outlive any one bad poll
                log.exception("poll failed")

    async def poll(self) -> None:
        """Read every node's health (and the PrfaaS nodes' egress), then move t."""
        await self.fleet.poll()
        prfaas = [v for v in self.nodes.values() if v.spec.cluster == "prfaas" and v.healthy]
        links = [v.link for v in prfaas if v.link is not None] if self.settings.use_link else []
        link = max(links, key=lambda s: (s.congested, s.utilization or 0.0), default=None)
        before = self.router.t
        local = [v.queued for v in self.nodes.values()
                 if v.spec.cluster == "local" and v.role == "prefill" and v.healthy]
        prefill_s, kv_bytes = self.observed.typical() or (None, None)
        # the KV ahead drains at the measured goodput while the link is full, else at its capacity
        rate = None if link is None else link.goodput if (link.congested or link.saturated) and link.goodput > 0 \
            else link.capacity
        self.router.observe(time.monotonic(), link, backlog([(v.queued, v.running) for v in prfaas], local,
                                                            prefill_s, kv_bytes, rate))
        if self.router.t != before:
            self.fleet.note("router", f"t {before:.0f} -> {self.router.t:.0f} ({self.router.history[-1].why})")
        self.tm.threshold.set(self.router.t)

    # ------------------------------------------------------------ long loop
    async def _long_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.replan_s)
            try:
                await self.replan()
            except Exception:
                log.exception("re-plan failed")

    async def replan(self) -> model.Throughput | None:
        """§2.5: re-plan t* and the local prefill/decode split on the lengths and costs seen; convert one
        local node toward the planned split (drain, set_role, resume)."""
        self.router.deployment = self._deployment()
        plan = self.router.maybe_replan(time.monotonic(), force=True)
        if plan is None:
            return None
        self.tm.planned.set(self.router.t_star)
        self.tm.planned_split.labels("prefill").set(plan.n_p)
        self.tm.planned_split.labels("decode").set(plan.n_d)
        self.fleet.note("planner", f"t* {self.router.t_star:.0f}, local split {plan.n_p}P/{plan.n_d}D "
                                   f"(bottleneck {plan.bottleneck}, Λ_max {plan.lam_max:.2f} req/s)")
        prefill, decode = self.fleet.local_split()
        prfaas_ok = self.fleet.pick("prfaas", "prefill") is not None
        if len(prefill) > plan.n_p and len(decode) < plan.n_d and (plan.n_p > 0 or prfaas_ok):
            await self.convert(min(prefill, key=lambda v: v.assigned).name, "decode")
        elif len(decode) > plan.n_d and len(prefill) < plan.n_p and len(decode) > 1:
            await self.convert(min(decode, key=lambda v: v.assigned).name, "prefill")
        return plan

    async def convert(self, name: str, role: str) -> dict[str, Any]:
        """Convert a local node now (what the long loop does); ``RequestError``/``Unavailable`` if not."""
        try:
            return await self.fleet.convert(name, role)
        except ConvertError as e:
            raise RequestError(str(e)) from e
        except Busy as e:
            raise Unavailable(str(e)) from e

    # ------------------------------------------------------------ one completion
    async def complete(self, prompt: Sequence[int], *, max_tokens: int, stops: Sequence[Sequence[int]] = (),
                       route: str | None = None, reuse: bool = True, info: Completion | None = None
                       ) -> AsyncIterator[int]:
        """Token ids of the completion (stop sequences removed), in order; ``info`` is filled in.
        ``route``: force the prefill cluster; ``reuse=False``: ignore cached prefixes (prefill all)."""
        prompt = list(prompt)
        if not 2 <= len(prompt) <= self.max_prompt_tokens:
            raise RequestError(f"prompt has {len(prompt)} tokens; need 2..{self.max_prompt_tokens}")
        if not 1 <= max_tokens <= self.max_output_tokens:
            raise RequestError(f"max_tokens must be in 1..{self.max_output_tokens}")
        if route is not None and route not in ROUTES:
            raise RequestError(f"route must be one of {ROUTES}")
        info = info or Completion(uuid.uuid4().hex[:16], len(prompt))
        arrived = time.monotonic()
        single = sorted({int(x[0]) for x in stops if len(x) == 1})
        matcher = StopMatcher(stops)
        tokens, first, last_at = await self._start(info, prompt, max_tokens, single, route, reuse)
        outcome = "error"
        try:
            n = 0
            async for tok in _chain(first, tokens):
                n += 1
                if info.ttft_s is None:
                    info.ttft_s = time.monotonic() - arrived
                    self.tm.ttft.labels(info.route).observe(info.ttft_s)
                last_at = time.monotonic()
                for out in matcher.feed(tok):
                    info.completion_tokens += 1
                    yield out
                if matcher.stopped:
                    info.finish_reason = "stop"
                    break
            if info.finish_reason is None:
                for out in matcher.flush():
                    info.completion_tokens += 1
                    yield out
                info.finish_reason = "length" if n >= max_tokens else "stop"
            if n > 1 and info.ttft_s is not None:
                tpot = (last_at - arrived - info.ttft_s) / (n - 1)
                self.tm.tpot.labels(info.route).observe(tpot)
                self.observed.record_tpot(tpot)
            outcome = "ok"
        finally:
            await _aclose(tokens)
            if outcome != "ok" or info.finish_reason == "stop":  # the decode node may still be generating
                self._spawn(self._cancel(info.decode_node, info.request_id))
            dec = self.nodes.get(info.decode_node)
            if dec is not None:
                dec.assigned -= 1
                self._spawn(self.fleet.refresh_checkpoints(dec))
            self.tm.requests.labels(outcome).inc()

    async def _cancel(self, node: str, rid: str) -> None:
        v = self.nodes.get(node)
        if v is not None:
            with contextlib.suppress(NodeError, OSError):
                await v.client.cancel(rid)

    async def _start(self, info: Completion, prompt: list[int], max_tokens: int, stops: list[int],
                     route: str | None, reuse: bool) -> tuple[AsyncIterator[int], int, float]:
        """Prefill and get the first token; a failed PrfaaS attempt is re-run locally once."""
        base = info.request_id
        why = "override" if route else "threshold"
        for attempt in range(2):
            rid = base if attempt == 0 else f"{base}-r{attempt}"
            try:
                return await self._attempt(info, rid, prompt, max_tokens, stops, route, why, reuse)
            except _PrefillFailed as e:
                if attempt or info.route != "prfaas":
                    raise Unavailable(f"prefill failed: {e}") from e
                info.reprefilled = True
                info.events.append(f"re-prefill locally: {e}")
                self.tm.retries.labels(e.kind).inc()
                route, why = "local", "retry"
        raise AssertionError("unreachable")

    def _decide(self, rid: str, prompt: list[int], route: str | None, reuse: bool
                ) -> tuple[str, int, str | None, bool]:
        """(cluster, cached prefix used, cluster holding it, whether it crosses clusters)."""
        hits = self.fleet.index.lookup(prompt) if reuse else {}
        usable = {c: h for c, h in hits.items() if self.nodes[h.node].usable}
        pd = usable["local"].length if "local" in usable else 0
        pf = usable["prfaas"].length if "prfaas" in usable else 0
        d = self.router.route(_RouteRequest(rid, len(prompt), cached_pd=pd, cached_prfaas=pf))
        target, prefix, at = _CLUSTER[d.target], d.prefix, (None if d.prefix_at is None else _CLUSTER[d.prefix_at])
        if route is not None and route != target:  # forced: the longer prefix anywhere, moved if it must
            target = route
            prefix = max(pd, pf)
            at = None if not prefix else (target if {"local": pd, "prfaas": pf}[target] == prefix
                                          else ("local" if pd == prefix else "prfaas"))
        return target, prefix, at, at is not None and at != target

    async def _attempt(self, info: Completion, rid: str, prompt: list[int], max_tokens: int, stops: list[int],
                       route: str | None, why: str, reuse: bool) -> tuple[AsyncIterator[int], int, float]:
        target, prefix, at, _ = self._decide(rid, prompt, route, reuse)
        if target == "prfaas" and self.fleet.pick("prfaas", "prefill") is None:
            target, why = "local", "fallback"
        if target == "local" and self.fleet.pick("local", "prefill") is None:
            if route == "local" or self.fleet.pick("prfaas", "prefill") is None:
                raise Unavailable("no healthy prefill node")
            target, why = "prfaas", "fallback"
        hit = self.fleet.index.lookup(prompt).get(at) if at else None
        if hit is None or hit.length != prefix or not self.nodes[hit.node].usable:
            hit, prefix = None, 0
        pre = self.fleet.pick(target, "prefill", prefer=hit.node if hit else None)
        dec = self.fleet.pick("local", "decode")
        if pre is None or dec is None:
            raise Unavailable("no healthy decode node" if dec is None else "no healthy prefill node")
        reuse_from = None
        if hit is not None and hit.node != pre.name:
            src = self.nodes[hit.node].spec
            reuse_from = (src.host, src.control_port)
        send_from = self.fleet.held_by(dec.name, prompt) if reuse else 0
        info.route, info.prefill_node, info.decode_node = target, pre.name, dec.name
        self.tm.decisions.labels(target, why).inc()
        dec.assigned += 1
        pre.assigned += 1
        try:
            return await self._run(info, rid, prompt, max_tokens, stops, pre, dec, prefix, reuse_from, send_from)
        except BaseException:
            dec.assigned -= 1
            raise
        finally:
            pre.assigned -= 1

    async def _run(self, info: Completion, rid: str, prompt: list[int], max_tokens: int, stops: list[int],
                   pre: NodeView, dec: NodeView, prefix: int, reuse_from: tuple[str, int] | None,
                   send_from: int) -> tuple[AsyncIterator[int], int, float]:
        s = self.settings
        try:
            await dec.client.expect(rid, prompt, reuse_length=send_from)
        except (NodeError, OSError) as e:
            if _node_broke(e):
                self.fleet.mark_down(dec, f"expect: {e}")
            raise Unavailable(f"decode node {dec.name}: {e}") from e
        if reuse_from is not None:
            src = next(v for v in self.nodes.values() if (v.spec.host, v.spec.control_port) == reuse_from)
            self.tm.prefix_moves.labels(src.spec.cluster, pre.spec.cluster).inc()
            info.moved_prefix = prefix
        info.reused = prefix
        prefill = asyncio.create_task(asyncio.wait_for(pre.work.prefill(
            rid, prompt, decode_host=dec.spec.host, decode_data_port=dec.data_port or dec.spec.data_port,
            reuse_length=prefix, reuse_from=reuse_from, send_from=send_from), s.prefill_timeout_s))
        prefill.add_done_callback(lambda t: self._prefilled(t, pre, prompt))
        tokens = dec.work.generate(rid, max_tokens=max_tokens, stop=stops or None)
        first = asyncio.ensure_future(asyncio.wait_for(tokens.__anext__(), s.first_token_timeout_s))
        pre_down = asyncio.ensure_future(pre.down.wait())
        try:
            done, _ = await asyncio.wait({prefill, first, pre_down}, return_when=asyncio.FIRST_COMPLETED)
            if pre_down in done and not first.done():  # the health poll lost the prefill node
                raise _PrefillFailed("node-down", f"{pre.name} went unhealthy during the prefill")
            if prefill in done and not first.done():
                failure = _failure(prefill)
                if failure is not None:
                    raise failure
                await asyncio.wait({first})
            try:
                tok = first.result()
            except StopAsyncIteration:
                raise _PrefillFailed("empty", "the decode node produced no token") from None
            except (NodeError, OSError, asyncio.TimeoutError) as e:
                await asyncio.wait({prefill}, timeout=s.node_timeout_s)
                failure = _failure(prefill) if prefill.done() else None
                if isinstance(e, NodeError) and failure is None and not prefill.done():
                    failure = _PrefillFailed("transfer", str(e))
                if failure is None:
                    if _node_broke(e):
                        self.fleet.mark_down(dec, f"generate: {e}")
                    raise Unavailable(f"decode node {dec.name}: {e}") from e
                raise failure from e
        except BaseException:
            first.cancel()
            prefill.cancel()
            pre_down.cancel()
            await _aclose(tokens)
            self._spawn(self._cancel(dec.name, rid))
            raise
        pre_down.cancel()
        if reuse_from is not None and prefill.done() and not prefill.cancelled() and prefill.exception() is None:
            self.tm.reused_tokens.inc(prefix)
        info.request_id = rid
        return tokens, tok, time.monotonic()

    def _prefilled(self, task: asyncio.Task[Any], pre: NodeView, prompt: list[int]) -> None:
        if task.cancelled():
            self.tm.transfers.labels("cancelled").inc()
            return
        e = task.exception()
        if e is not None:
            self.tm.transfers.labels("error").inc()
            if isinstance(e, (NodeError, OSError)) and _node_broke(e):
                self.fleet.mark_down(pre, f"prefill: {e}")
            return
        r = task.result()
        self.tm.transfers.labels(str(r.get("state"))).inc()
        if r.get("state") == "done":
            self.observed.record_prefill(int(r.get("computed_tokens", 0)), float(r.get("prefill_s", 0.0)),
                                         int(r.get("bytes", 0)))
        length = r.get("checkpoint_length")
        if r.get("state") == "done" and isinstance(length, int) and length >= self.block_size:
            with contextlib.suppress(ValueError, IndexError):
                self.fleet.remember(pre, block_keys(prompt[:length], self.block_size)[-1], length)

    def uptime(self) -> float:
        """Seconds since this orchestrator started: the clock of ``transitions``."""
        return time.monotonic() - self.fleet.t0

    def snapshot(self) -> dict[str, Any]:
        plan = self.router.last_plan
        return {"threshold": self.router.t, "t_star": self.router.t_star, "scarce": self.router.scarce,
                "nodes": self.fleet.snapshot(), "long_loop": self.settings.replan_s > 0,
                "plan": None if plan is None else {"n_p": plan.n_p, "n_d": plan.n_d, "t": plan.split.t,
                                                   "lam_max": plan.lam_max, "bottleneck": plan.bottleneck}}


class _PrefillFailed(Exception):
    def __init__(self, kind: str, reason: str) -> None:
        super().__init__(f"{kind}: {reason}")
        self.kind = kind


def _failure(prefill: asyncio.Task[Any]) -> _PrefillFailed | None:
    if prefill.cancelled():
        return _PrefillFailed("cancelled", "prefill cancelled")
    e = prefill.exception()
    if isinstance(e, asyncio.TimeoutError):
        return _PrefillFailed("timeout", "prefill timed out")
    if e is not None:
        return _PrefillFailed("node", str(e) or type(e).__name__)
    r = prefill.result()
    if r.get("state") != "done":
        return _PrefillFailed(str(r.get("state")), str(r.get("reason", "")))
    return None


async def _chain(first: int, rest: AsyncIterator[int]) -> AsyncIterator[int]:
    yield first
    async for tok in rest:
        yield tok


async def _aclose(it: AsyncIterator[int]) -> None:
    close = getattr(it, "aclose", None)
    if close is not None:
        with contextlib.suppress(Exception):
            await close()


def _node_broke(e: BaseException) -> bool:
    """A node call's failure says the node is down (unreachable, died, timed out, a server error), not that it
    answered: a 4xx refusal or a 503 (its cache budget full: ``node.pending_bytes``) comes from a node that
    serves, and marking it down for one took a busy node out of the fleet until the next health poll."""
    status = getattr(e, "status", None)
    return status is None or (status >= 500 and status != 503)

