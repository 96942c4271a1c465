"""The router's view of the deployment's nodes: health, role, queues, egress, and which prefixes they hold.

Owns: one ``NodeView`` per node (two ``NodeClient``s: short control calls and long work calls), polling a node's
``/health`` (and a PrfaaS node's ``/link``) into it, taking a node out when it stops answering (its ``down``
event aborts the work in flight there) and back when it answers again, the global prefix index and each node's
own (fed from ``/checkpoints`` and prefill results), picking the least loaded usable node of a cluster and role,
converting a local node between prefill and decode (drain, set_role, resume), and the per-node gauges.
Must not know: routing policy, completions, HTTP serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..congestion.estimator import LinkState
from .config import DeployConfig, NodeSpec
from .nodeclient import NodeClient, NodeError
from .prefix import PrefixIndex
from .router import Backlog

if TYPE_CHECKING:
    from .telemetry import Telemetry

log = logging.getLogger("kvwire.prfaas.router")


class ConvertError(ValueError):
    """A conversion that cannot be asked for (not a local node, unknown role)."""


class Busy(RuntimeError):
    """A conversion that cannot run now (another one runs, or it would leave no decode node)."""


@dataclass
class NodeView:
    spec: NodeSpec
    client: NodeClient  # short calls: health, link, expect, cancel, checkpoints, role changes
    work: NodeClient  # long ones: prefill (returns when its transfer ends), generate, drain
    healthy: bool = False
    role: str = ""
    state: str = "unknown"
    queued: int = 0
    running: int = 0
    data_port: int = 0
    assigned: int = 0  # requests the router has in flight there
    failures: int = 0
    link: LinkState | None = None
    down: asyncio.Event = field(default_factory=asyncio.Event)  # set when taken out; in-flight work aborts

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def usable(self) -> bool:
        return self.healthy and self.state == "ready"


def link_state(d: dict[str, Any], now: float) -> LinkState:
    """A node's ``/link`` JSON as a ``LinkState`` (fields it lacks read as unknown). A link with nothing in
    flight over the estimator's window (``busy`` 0) is not congested, whatever its last RTTs said: TCP's srtt
    is not updated without traffic, so an idle egress would otherwise read congested for as long as the
    router keeps requests off it, and t would climb to t_max and stay there."""
    def num(key: str, default: float | None = None) -> float | None:
        v = d.get(key, default)
        return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else default

    return LinkState(timestamp=num("timestamp", now) or now, goodput=num("goodput", 0.0) or 0.0,
                     btl_bw=num("btl_bw", 0.0) or 0.0, capacity=num("capacity"), utilization=num("utilization"),
                     available_bw=num("available_bw"), min_rtt=num("min_rtt"), srtt=num("srtt"),
                     queueing_ratio=num("queueing_ratio"), loss_rate=num("loss_rate", 0.0) or 0.0,
                     busy=num("busy", 0.0) or 0.0, rwnd_limited=num("rwnd_limited", 0.0) or 0.0,
                     sndbuf_limited=num("sndbuf_limited", 0.0) or 0.0,
                     congested=bool(d.get("congested")) and (num("busy", 1.0) or 0.0) > 0,
                     saturated=bool(d.get("saturated")))


def backlog(prfaas: Sequence[tuple[int, int]], local_queued: Sequence[int], prefill_s: float | None,
            kv_bytes: float | None, capacity: float | None) -> Backlog:
    """The short loop's view of both prefill queues from the nodes' (queued, running) on PrfaaS and queued
    on the local prefill nodes. ``prfaas_queue`` is the PrfaaS queue per node beyond the local one (raising
    t only moves work across, so a queue both sides share is no reason to; measured: at saturation on one
    machine, feeding the PrfaaS queue alone pushed t up, offload fell from 54 % to 30 % and throughput to
    0.57x). With a typical prefill's seconds (``prefill_s``) the waits too: local = queued per local prefill
    node x ``prefill_s``; PrfaaS = the same for its nodes plus, with the egress ``capacity`` (bytes/s) and a
    typical KV size known, the KV of every request there (queued or running) ahead of a new one at that
    capacity. Without ``prefill_s`` or either cluster: counts only (the loop is one-sided)."""
    if any(q < 0 or r < 0 for q, r in prfaas) or any(q < 0 for q in local_queued):
        raise ValueError("queue depths must be >= 0")
    mine = sum(q for q, _ in prfaas) / len(prfaas) if prfaas else 0.0
    theirs = sum(local_queued) / len(local_queued) if local_queued else 0.0
    excess, local_q = max(0, round(mine - theirs)), round(theirs)
    if prefill_s is None or not prfaas or not local_queued:
        return Backlog(excess, local_q)
    ahead = sum(q + r for q, r in prfaas) * kv_bytes / capacity if kv_bytes and capacity else 0.0
    return Backlog(excess, local_q, mine * prefill_s + ahead, theirs * prefill_s)


class Fleet:
    def __init__(self, config: DeployConfig, telemetry: Telemetry, *, control_timeout_s: float,
                 work_timeout_s: float, unhealthy_after: int = 1) -> None:
        self.tm = telemetry
        self.block_size = config.cache.block_size
        self.unhealthy_after = unhealthy_after
        self.nodes = {n.name: NodeView(n, NodeClient(n.host, n.control_port, timeout=control_timeout_s),
                                       NodeClient(n.host, n.control_port, timeout=work_timeout_s))
                      for n in config.nodes}
        self.index = PrefixIndex(self.block_size)  # every node's checkpoints: the router's cache view
        self._own = {name: PrefixIndex(self.block_size) for name in self.nodes}  # each node's alone
        self.transitions: list[tuple[float, str, str]] = []  # (seconds since start, who, what)
        self.t0 = time.monotonic()
        self._converting = False

    def note(self, who: str, what: str) -> None:
        self.transitions.append((time.monotonic() - self.t0, who, what))

    async def aclose(self) -> None:
        for v in self.nodes.values():
            await v.client.aclose()
            await v.work.aclose()

    # ------------------------------------------------------------ health
    async def poll(self) -> None:
        await asyncio.gather(*(self.poll_one(v) for v in self.nodes.values()))

    async def poll_one(self, v: NodeView) -> None:
        try:
            h = await v.client.health()
            link = await v.client.link() if v.spec.cluster == "prfaas" else None
        except (NodeError, OSError) as e:
            v.failures += 1
            if v.healthy and v.failures >= self.unhealthy_after:
                self.mark_down(v, f"health: {e}")
            return
        v.failures = 0
        v.role, v.state = str(h.get("role", v.spec.role)), str(h.get("state", "unknown"))
        v.queued, v.running = int(h.get("queued", 0)), int(h.get("running", 0))
        v.data_port = int(h.get("data_port", v.spec.data_port))
        v.link = None if link is None else link_state(link, time.monotonic())
        if not v.healthy:
            v.healthy = True
            v.down = asyncio.Event()
            self.note(v.name, "healthy")
            await self.refresh_checkpoints(v)
        self._export(v)

    def _export(self, v: NodeView) -> None:
        tm = self.tm
        tm.healthy.labels(v.name).set(1 if v.healthy else 0)
        tm.queued.labels(v.name).set(v.queued)
        tm.running.labels(v.name).set(v.running)
        for role in ("prefill", "decode"):
            tm.role.labels(v.name, role).set(1 if v.role == role else 0)
        if v.link is not None:
            tm.egress.labels(v.name).set(v.link.utilization or 0.0)
            tm.congested.labels(v.name).set(1 if v.link.congested else 0)

    def mark_down(self, v: NodeView, why: str) -> None:
        """Stop routing to ``v`` until its /health answers again; abort what waits on it."""
        if v.healthy:
            log.warning("node %s unhealthy: %s", v.name, why)
            self.note(v.name, f"unhealthy: {why}")
        v.healthy = False
        v.down.set()
        self.forget(v.name)  # its checkpoints may be gone; re-read when it is back
        self._export(v)

    # ------------------------------------------------------------ prefixes
    async def refresh_checkpoints(self, v: NodeView) -> None:
        try:
            held = await v.client.checkpoints()
        except (NodeError, OSError):
            return
        self.forget(v.name)
        for c in held:
            with contextlib.suppress(ValueError, KeyError, TypeError):
                self.remember(v, str(c["key"]), int(c["length"]))

    def remember(self, v: NodeView, key: str, length: int) -> None:
        self.index.add(v.name, v.spec.cluster, key, length)
        self._own[v.name].add(v.name, v.spec.cluster, key, length)

    def forget(self, name: str) -> None:
        self.index.remove_node(name)
        self._own[name].remove_node(name)

    def held_by(self, node: str, prompt: Sequence[int]) -> int:
        """The longest checkpoint of ``prompt`` the node itself holds (what it need not receive)."""
        return max((h.length for h in self._own[node].lookup(prompt).values()), default=0)

    # ------------------------------------------------------------ choosing and converting
    def pick(self, cluster: str, role: str, prefer: str | None = None) -> NodeView | None:
        cands = [v for v in self.nodes.values() if v.spec.cluster == cluster and v.role == role and v.usable]
        for v in cands:
            if v.name == prefer:
                return v
        return min(cands, key=lambda v: (v.assigned + v.queued + v.running, v.name), default=None)

    def local_split(self) -> tuple[list[NodeView], list[NodeView]]:
        """The healthy local nodes by role: (prefill, decode)."""
        local = [v for v in self.nodes.values() if v.spec.cluster == "local" and v.healthy]
        return [v for v in local if v.role == "prefill"], [v for v in local if v.role == "decode"]

    async def convert(self, name: str, role: str) -> dict[str, Any]:
        """Drain the local node ``name``, switch it to ``role``, resume it. One conversion at a time; the
        node takes no new work meanwhile (its state is not ``ready``)."""
        v = self.nodes.get(name)
        if v is None or v.spec.cluster != "local" or role not in ("prefill", "decode"):
            raise ConvertError(f"cannot convert {name!r} to {role!r}: only local nodes, to prefill or decode")
        if self._converting:
            raise Busy("a conversion is already running")
        if v.role == role:
            return {"node": name, "role": role, "changed": False}
        others = [o for o in self.nodes.values() if o is not v and o.usable and o.role == v.role]
        if v.role == "decode" and not others:
            raise Busy(f"{name} is the last decode node")
        self._converting = True
        t0 = time.monotonic()
        try:
            v.state = "draining"
            self.note(name, f"drain ({v.role} -> {role})")
            await v.work.drain()
            await v.client.set_role(role)
            await v.client.resume()
            self.forget(name)
            await self.poll_one(v)
        finally:
            self._converting = False
        self.tm.conversions.labels(name, role).inc()
        self.note(name, f"now {v.role}")
        return {"node": name, "role": v.role, "changed": True, "seconds": time.monotonic() - t0}

    def snapshot(self) -> dict[str, Any]:
        return {v.name: {"cluster": v.spec.cluster, "role": v.role, "state": v.state, "healthy": v.healthy,
                         "queued": v.queued, "running": v.running, "assigned": v.assigned,
                         "egress_utilization": None if v.link is None else v.link.utilization}
                for v in self.nodes.values()}
