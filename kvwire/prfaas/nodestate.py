"""What every kind of PrfaaS node shares, below the node kinds and their HTTP layer.

Owns: ``NodeFault`` (a request a node refuses, with the HTTP status the control API answers) and ``NodeState``
(role, the ready / draining / converting state, admission, drain and resume, the ids of prefills cancelled
before they arrived, ``limits``: the request bounds every node kind's control API enforces, and the bound on
requests held expected, ``[cache] pending_requests``). ``node.Node``
(the in-process runner) and ``vllm_node.VllmNode`` build on it and ``nodeapp`` maps ``NodeFault`` to
responses, so none of the three imports another for these. Must not know: models, caches, kvwire transfers,
HTTP.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict

from .config import DeployConfig, NodeSpec, request_limits


class NodeFault(Exception):
    """A request the node refuses: ``status`` is the HTTP status the control API answers with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class NodeState:
    """What every node kind shares: its role, the ready / draining / converting state, admission of new work,
    drain and resume, and the ids of prefills cancelled before they arrived (bounded). A node kind adds its
    requests held between the counts (``_held``: expected, not yet generating)."""

    def __init__(self, config: DeployConfig, spec: NodeSpec, key: bytes) -> None:
        self.config, self.spec, self.key = config, spec, key
        self.limits = request_limits(config)  # the front door's max_prompt_tokens / max_output_tokens
        self.role, self.state = spec.role, "ready"
        self.queued = self.running = 0
        self._cancelled: OrderedDict[str, None] = OrderedDict()  # prefills cancelled before they started
        self._idle = asyncio.Event()
        self._idle.set()

    def _held(self) -> int:
        return 0

    def _admit(self, role: str) -> None:
        """503 unless ready, 409 in the other role."""
        if self.state != "ready":
            raise NodeFault(503, f"node {self.spec.name} is {self.state}")
        if self.role != role:
            raise NodeFault(409, f"node {self.spec.name} is a {self.role} node, not {role}")

    def _room_to_expect(self) -> None:
        """503 when the node already holds ``[cache] pending_requests`` expected requests (as a full
        ``pending_bytes`` budget is: the caller may retry once one is taken, cancelled or expired)."""
        most = self.config.cache.pending_requests
        if self._held() >= most:
            raise NodeFault(503, f"node {self.spec.name} holds {self._held()} expected requests, its [cache] "
                                 f"pending_requests bound; one is freed when taken, cancelled or expired "
                                 f"(expect_timeout_s {self.config.cache.expect_timeout_s:g} s)")

    def _settle(self) -> None:
        if self.queued == 0 and self.running == 0 and not self._held():
            self._idle.set()
        else:
            self._idle.clear()

    def _refuse_when_it_comes(self, request_id: str) -> None:
        self._cancelled[request_id] = None
        while len(self._cancelled) > 1024:
            self._cancelled.popitem(last=False)

    async def drain(self, timeout: float) -> None:
        if self.state == "ready":
            self.state = "draining"
        self._settle()
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except asyncio.TimeoutError:
            raise NodeFault(504, f"node {self.spec.name} still has work after {timeout} s") from None

    def resume(self) -> None:
        if self.state == "converting":
            raise NodeFault(409, "node is converting")
        self.state = "ready"
