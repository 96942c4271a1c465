"""A PrfaaS node process: ``python -m kvwire.prfaas.node --config deploy.toml --name p0``.

Owns: one node of the deployment: its model backend (``runner.TransformersRunner``; a node whose config says
``backend = "vllm"`` runs ``vllm_node.VllmNode`` instead, same control API), its data port (a kvwire
``Receiver``: decode nodes receive caches on it, prefill nodes receive prefix moves), one kvwire ``Session``
per peer data port (reused; re-dialled when unhealthy) watched by a ``LinkMonitor`` (the egress ``LinkState``
served at ``/link``), its checkpoint store, the prefill queue (one compute thread, FIFO), the byte budget of
the cache buffers it holds for expected requests and prefix moves (``[cache].pending_bytes``: 503 when full;
at most ``pending_requests`` expected requests, each dropped with its buffers ``expect_timeout_s`` after its
``/expect`` if its ``/generate`` has not come, its cache arrived or not), and the process entry (``main``).
Role state (ready / draining / converting) is ``nodestate.NodeState``'s; the HTTP/JSON control API
(starlette, served by uvicorn; the contract is /work PRFAAS_API.md, the client ``nodeclient.NodeClient``) is
``nodeapp``'s. The shared key comes from ``KVWIRE_KEY``.
Must not know: routing policy, the prefix index, the front door, or kvwire internals (public API only).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from typing import Any

import kvwire

from ..congestion.monitor import LinkMonitor
from ..errors import KvwireError, LayoutError, TransferCancelled, TransferError
from ..metrics import Metrics
from .config import PENDING_PROMPTS, ROLES, DeployConfig, NodeSpec, load
from .nodestate import NodeFault, NodeState
from .runner import CacheAllocError, Checkpoint, Incoming, NodeBackend, TransformersRunner
from .sessions import Peer, SessionPool
from .store import CheckpointStore

log = logging.getLogger("kvwire.prfaas.node")


async def _ended(handle: Any, timeout: float) -> None:
    """Wait for a transfer handle's end on the event loop (no thread held while the bytes travel); raises its
    typed error, or ``TimeoutError``."""
    try:
        await asyncio.wait_for(asyncio.wrap_future(handle.future), timeout)
    except asyncio.TimeoutError:  # a distinct class before Python 3.11
        raise TimeoutError(f"transfer not ended in {timeout} s") from None


def _state_of(exc: BaseException) -> str:
    name = type(exc).__name__
    return {"TransferTimedOut": "timed_out", "TransferCancelled": "cancelled"}.get(name, "failed")


def _out_of_memory(exc: BaseException) -> bool:
    """torch's allocators raise RuntimeError (CPU: "can't allocate memory", CUDA: "out of memory")."""
    text = str(exc)
    return isinstance(exc, MemoryError) or isinstance(exc, RuntimeError) and (
        "can't allocate memory" in text or "out of memory" in text.lower())


class _Hold:
    """One request's cache buffers counted against the node's ``pending_bytes`` budget: the runner calls it
    with their size before allocating them (``NodeFault`` 503 when they do not fit); ``release`` once."""

    def __init__(self, node: Node, what: str) -> None:
        self.node, self.what, self.nbytes = node, what, 0

    def __call__(self, nbytes: int) -> None:
        node = self.node
        if node.pending_bytes + nbytes > node.pending_budget:
            raise NodeFault(503, f"node {node.spec.name} holds {node.pending_bytes} bytes of cache buffers for "
                                 f"expected requests; {nbytes} more for {self.what} would pass its pending_bytes "
                                 f"budget of {node.pending_budget}")
        node.pending_bytes += nbytes
        self.nbytes += nbytes

    def release(self) -> None:
        self.node.pending_bytes -= self.nbytes
        self.nbytes = 0


class Node(NodeState):
    """The node's state and operations (the HTTP layer in ``app`` only parses and serializes)."""

    def __init__(self, config: DeployConfig, spec: NodeSpec, key: bytes, backend: NodeBackend | None = None, *,
                 transfer_timeout: float = 60.0, peer_timeout: float = 5.0) -> None:
        super().__init__(config, spec, key)
        self.transfer_timeout, self.peer_timeout = transfer_timeout, peer_timeout
        self.backend: NodeBackend = backend if backend is not None else TransformersRunner(
            config.model, config.cache.block_size)
        self.store = CheckpointStore(config.cache.block_size, config.cache.store_bytes)
        self.receiver = kvwire.Receiver(spec.host, spec.data_port, key=key, peer_timeout=peer_timeout,
                                        transfer_timeout=transfer_timeout)
        self._sessions = SessionPool(self._dial, name=f"node {spec.name}")
        self._compute = ThreadPoolExecutor(1, thread_name_prefix=f"prfaas-{spec.name}")
        self._pending: dict[str, Incoming] = {}  # decode: expected, not yet generating
        self._ended: OrderedDict[str, tuple[str, str]] = OrderedDict()  # expected, transfer ended badly first
        self._outgoing: dict[str, Any] = {}  # prefill: request id -> transfer in flight
        # cache buffers of expected requests (until their generate ends) and of prefix moves in flight
        self.pending_bytes = 0
        self.pending_budget = (config.cache.pending_bytes if config.cache.pending_bytes is not None else
                               PENDING_PROMPTS * self.backend.expect_nbytes(self.limits.max_prompt_tokens))
        self.monitor = LinkMonitor(self._sessions.lane_sockets, interval=0.1).start()

    # -- sessions and link -----------------------------------------------------------------------------
    def session(self, peer: Peer) -> kvwire.Session:
        """The one session to ``peer``'s data port (dialled on first use, replaced when unhealthy)."""
        return self._sessions.get(peer)

    def _dial(self, peer: Peer) -> kvwire.Session:
        return kvwire.connect(peer[0], peer[1], lanes=2, key=self.key, peer_timeout=self.peer_timeout)

    def link(self) -> dict[str, Any] | None:
        if self.role == "decode":
            return None
        st = self.monitor.latest()
        if st is None:
            return {"utilization": None, "congested": False, "capacity_bps": None, "rtt_s": None}
        d = {k: v for k, v in asdict(st).items() if k != "lanes"}
        d["capacity_bps"] = None if st.capacity is None else st.capacity * 8
        d["rtt_s"] = st.srtt if st.srtt is not None else st.min_rtt
        return d

    def health(self) -> dict[str, Any]:
        return {"name": self.spec.name, "cluster": self.spec.cluster, "role": self.role, "state": self.state,
                "queued": self.queued, "running": self.running + len(self._pending),
                "data_port": self.receiver.address[1], "checkpoints": len(self.store)}

    # -- admission -------------------------------------------------------------------------------------
    def _held(self) -> int:
        return len(self._pending)

    # -- decode side -----------------------------------------------------------------------------------
    def expect(self, request_id: str, prompt: list[int], reuse_length: int = 0) -> None:
        """Register the incoming cache (call on the event loop)."""
        self._admit("decode")
        if request_id in self._pending:
            raise NodeFault(409, f"request {request_id!r} already expected")
        self._room_to_expect()
        prefix: Checkpoint | None = None
        if reuse_length:
            prefix = self.store.kv_prefix(prompt, reuse_length)
            if prefix is None:
                raise NodeFault(409, f"no held prefix of {reuse_length} tokens for {request_id!r}")
        hold = _Hold(self, f"request {request_id!r}")
        try:
            incoming = self.backend.expect(self.receiver, request_id, prompt, prefix=prefix,
                                           timeout=self.transfer_timeout, reserve=hold)
        except BaseException as e:
            hold.release()
            if isinstance(e, (LayoutError, ValueError)):
                raise NodeFault(400, str(e)) from e
            if isinstance(e, CacheAllocError):
                raise NodeFault(503, str(e)) from e
            raise
        incoming.extra["hold"] = hold
        self._pending[request_id] = incoming
        loop = asyncio.get_running_loop()
        # a transfer that fails, times out or is cancelled before anyone generates: forget the request
        def ended(_: Any) -> None:
            with contextlib.suppress(RuntimeError):  # the loop is closed (main closes the node after uvicorn)
                loop.call_soon_threadsafe(self._expire, request_id, incoming)

        incoming.handle.add_done_callback(ended)
        incoming.extra["timer"] = loop.call_later(self.config.cache.expect_timeout_s, self._drop, request_id,
                                                  incoming)
        self._settle()

    def _drop(self, request_id: str, incoming: Incoming) -> None:
        """``expect_timeout_s`` passed and ``request_id``'s generate has not come (a router that crashed after
        ``/expect``): stop its transfer if still on, free its buffers, keep what a late generate reports."""
        if self._pending.get(request_id) is not incoming:
            return
        del self._pending[request_id]
        reason = f"no /generate within {self.config.cache.expect_timeout_s:g} s of /expect on {self.spec.name}: " \
                 "dropped"
        if not incoming.handle.finished:
            incoming.handle.cancel(reason)
        self._release(incoming)
        self._ended[request_id] = ("timed_out", reason)
        while len(self._ended) > 1024:
            self._ended.popitem(last=False)
        self._settle()

    def _expire(self, request_id: str, incoming: Incoming) -> None:
        h = incoming.handle
        if self._pending.get(request_id) is incoming and h.state.value != "done":
            del self._pending[request_id]
            self._release(incoming)
            self._ended[request_id] = (h.state.value, h.reason)  # what a late generate() reports
            while len(self._ended) > 1024:
                self._ended.popitem(last=False)
            self._settle()

    @staticmethod
    def _release(incoming: Incoming) -> None:
        timer = incoming.extra.pop("timer", None)
        if timer is not None:
            timer.cancel()
        hold = incoming.extra.get("hold")
        if hold is not None:
            hold.release()

    def is_expected(self, request_id: str) -> bool:
        return request_id in self._pending or request_id in self._ended

    async def generate(self, request_id: str, max_tokens: int, stop: list[int]) -> AsyncIterator[dict[str, Any]]:
        incoming = self._pending.pop(request_id, None)
        if incoming is None:
            ended = self._ended.pop(request_id, None)
            if ended is None:
                raise NodeFault(404, f"request {request_id!r} was not expected here")
            yield {"error": ended[1] or ended[0], "state": ended[0]}
            return
        self.running += 1
        it = self.backend.decode(incoming, max_tokens, stop=stop, timeout=self.transfer_timeout)
        have_cache = False
        try:
            while True:
                try:
                    if not have_cache:  # the first step: wait for the cache here, not on a worker thread
                        await _ended(incoming.handle, self.transfer_timeout)
                        have_cache = True
                    tok = await asyncio.to_thread(next, it, None)
                except (TransferError, TimeoutError) as e:
                    yield {"error": str(e) or "cache transfer timed out", "state": _state_of(e)}
                    return
                except (RuntimeError, MemoryError) as e:
                    if not _out_of_memory(e):
                        raise
                    yield {"error": f"decode ran out of memory: {e}", "state": "failed"}
                    return
                if tok is None:
                    break
                yield {"token": tok}
            kv = self.backend.kv_checkpoint(incoming)
            if kv is not None:
                self.store.put(kv, incoming.prompt)
        finally:
            if not incoming.handle.finished:  # the client went away before the cache came: stop the transfer
                incoming.handle.cancel("decode request ended early")
            self._release(incoming)
            self.running -= 1
            self._settle()

    # -- prefill side ----------------------------------------------------------------------------------
    async def prefill(self, request_id: str, prompt: list[int], decode: Peer, reuse_length: int = 0,
                      reuse_from: Peer | None = None, send_from: int = 0) -> dict[str, Any]:
        self._admit("prefill")
        out: dict[str, Any] = {"state": "failed", "reason": "", "bytes": 0, "queued_s": 0.0, "prefill_s": 0.0,
                               "tail_s": 0.0, "move_s": 0.0, "computed_tokens": 0, "reused_tokens": 0,
                               "checkpoint_length": None, "move_bytes": 0}
        self.queued += 1
        self._settle()
        picked_up = False
        try:
            start: Checkpoint | None = None
            if reuse_length and reuse_from is not None:
                start = await self._move_in(request_id, prompt, reuse_length, reuse_from, out)
            elif reuse_length:
                start = self.store.exact(prompt, reuse_length)
                if start is None:
                    out["reason"] = f"no own checkpoint of {reuse_length} tokens; prefilled in full. "
            submitted = time.monotonic()  # queued_s: from here (after any prefix move) to a compute thread
            loop = asyncio.get_running_loop()
            picked = loop.create_future()

            def job() -> Any:
                loop.call_soon_threadsafe(picked.set_result, time.monotonic())
                if request_id in self._cancelled:  # cancelled while it waited: no compute, nothing sent
                    raise TransferCancelled("cancelled by the router before it started")
                return self.backend.prefill(prompt, self.session(decode), request_id, start=start,
                                            send_from=send_from, timeout=self.transfer_timeout)

            fut = loop.run_in_executor(self._compute, job)
            started = await picked
            picked_up = True
            self.queued -= 1
            self.running += 1
            try:
                res = await fut
            finally:
                self.running -= 1
            out["queued_s"] = started - submitted
            out.update(prefill_s=res.prefill_s, computed_tokens=res.computed_tokens,
                       reused_tokens=res.reused_tokens)
            out["bytes"] = res.nbytes
            if res.checkpoint is not None and self.store.put(res.checkpoint, prompt):
                out["checkpoint_length"], out["checkpoint_key"] = res.checkpoint.length, res.checkpoint.key
            self._outgoing[request_id] = res.transfer
            produced = time.monotonic()
            try:
                await _ended(res.transfer, self.transfer_timeout + 5)
                out["state"] = "done"
            except (TransferError, TimeoutError) as e:
                out["state"], out["reason"] = _state_of(e), out["reason"] + str(e)
            finally:
                self._outgoing.pop(request_id, None)
            out["tail_s"] = time.monotonic() - produced
            return out
        except (LayoutError, ValueError) as e:
            raise NodeFault(400, str(e)) from e
        except (RuntimeError, MemoryError) as e:
            if not _out_of_memory(e):
                raise
            raise NodeFault(503, f"prefill ran out of memory: {e}") from e
        except TransferCancelled as e:
            out["state"], out["reason"] = "cancelled", out["reason"] + str(e)
            return out
        except KvwireError as e:  # the decode peer is unreachable, the session failed
            out["reason"] += f"{type(e).__name__}: {e}"
            return out
        finally:
            self._cancelled.pop(request_id, None)
            if not picked_up:
                self.queued -= 1
            self._settle()

    async def _move_in(self, request_id: str, prompt: list[int], length: int, source: Peer,
                       out: dict[str, Any]) -> Checkpoint | None:
        """Pull the checkpoint of ``prompt[:length]`` from the node at ``source`` over kvwire; None (and a
        reason) when that fails: the prefill then runs in full."""
        from .nodeclient import NodeClient, NodeError

        t0 = time.monotonic()
        mid = f"{request_id}/move"
        hold = _Hold(self, f"the prefix move of {request_id!r}")
        try:
            handle, ck = self.backend.expect_checkpoint(self.receiver, mid, prompt, length,
                                                        timeout=self.transfer_timeout, reserve=hold)
        except (NodeFault, CacheAllocError) as e:  # no room for the checkpoint now: prefill in full
            hold.release()
            out["reason"] = f"no room to move the prefix here ({e}); prefilled in full. "
            return None
        except BaseException:
            hold.release()
            raise
        client = NodeClient(source[0], source[1], timeout=self.transfer_timeout, key=self.key)
        try:
            sent = await client.export(mid, prompt, length, dest_host=self.spec.host,
                                       dest_data_port=self.receiver.address[1])
            await _ended(handle, self.transfer_timeout)
            out["move_bytes"] = int(sent.get("bytes", 0))
        except (NodeError, TransferError, TimeoutError) as e:
            handle.cancel("prefix move failed")
            out["reason"] = f"prefix move from {source[0]}:{source[1]} failed ({e}); prefilled in full. "
            return None
        finally:
            hold.release()  # from here the checkpoint is the store's (its own store_bytes bound)
            await client.aclose()
            out["move_s"] = time.monotonic() - t0
        self.store.put(ck, prompt)
        return ck

    async def export(self, request_id: str, prompt: list[int], length: int, dest: Peer) -> dict[str, Any]:
        ck = self.store.exact(prompt, length)
        if ck is None:
            raise NodeFault(404, f"no checkpoint of {length} tokens of this prompt on {self.spec.name}")

        def send() -> Any:
            return self.backend.send_checkpoint(ck, self.session(dest), request_id, timeout=self.transfer_timeout)

        try:
            await _ended(await asyncio.to_thread(send), self.transfer_timeout + 5)
            return {"state": "done", "bytes": ck.nbytes}
        except (TransferError, TimeoutError, KvwireError) as e:
            return {"state": _state_of(e), "reason": str(e), "bytes": 0}

    def cancel(self, request_id: str) -> None:
        incoming = self._pending.pop(request_id, None)
        if incoming is not None:
            incoming.handle.cancel("cancelled by the router")
            self._release(incoming)
            self._settle()
        transfer = self._outgoing.get(request_id)
        if transfer is not None:
            transfer.cancel("cancelled by the router")
        if incoming is None and transfer is None:  # a prefill still queued (or not yet here): refuse it then
            self._refuse_when_it_comes(request_id)

    # -- roles -----------------------------------------------------------------------------------------
    def set_role(self, role: str) -> None:
        if role not in ROLES:
            raise NodeFault(400, f"role must be one of {ROLES}")
        if self.spec.cluster != "local" and role != self.role:
            raise NodeFault(409, "only local-cluster nodes convert between prefill and decode")
        if self.state != "draining" or not self._idle.is_set():
            raise NodeFault(409, f"drain node {self.spec.name} first (it is {self.state})")
        if role != self.role:
            self.state = "converting"
            self.store.clear()  # a decode node's entries are KV-only; a new role starts from an empty store
            self.role = role
            self.state = "draining"

    def close(self) -> None:
        self._sessions.close()
        for incoming in list(self._pending.values()):
            incoming.handle.cancel("node shutting down")
            self._release(incoming)
        self._pending.clear()
        self._compute.shutdown(wait=True, cancel_futures=True)
        self.monitor.stop()
        self.receiver.close()


#: requests the control API serves at once (uvicorn's ``limit_concurrency``: past it, a 503); connections
#: waiting for a request head hold at most ``httpgate.MAX_WAITING`` of them
LIMIT_CONCURRENCY = 256


def control_server(asgi: Any, host: str, port: int, log_level: str = "warning", metrics: Metrics | None = None
                   ) -> Any:
    """The control API's ``httpgate.GatedServer`` for ``asgi``, configured as ``main`` serves it; its cuts are
    ``metrics``' ``prfaas_http_cuts_total{server="node"}``."""
    from . import httpgate

    return httpgate.server(asgi, host, port, name="node", metrics=metrics, log_level=log_level,
                           timeout_graceful_shutdown=5, lifespan="off", limit_concurrency=LIMIT_CONCURRENCY)


def main(argv: list[str] | None = None) -> int:
    from .nodeapp import app

    parser = argparse.ArgumentParser(prog="python -m kvwire.prfaas.node", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="the deployment's TOML config")
    parser.add_argument("--name", required=True, help="this node's name in the config")
    parser.add_argument("--log-level", default="warning")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    key = os.environ.get("KVWIRE_KEY")
    if not key:
        parser.error("KVWIRE_KEY must be set (the deployment's shared key)")
    config = load(args.config)
    spec = config.node(args.name)
    node: Any
    if config.backend_of(spec.name) == "vllm":  # a vLLM engine with kvwire's connector (vllm_node)
        from .vllm_node import VllmNode

        node = VllmNode(config, spec, key.encode())
    else:
        node = Node(config, spec, key.encode())
    # uvicorn shuts down on SIGTERM/SIGINT, restores the handlers it found and re-raises the signal: with the
    # default handlers that kills the process before node.close(). Found handlers that do nothing let it return.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    try:
        metrics = Metrics()  # GET /metrics: the control server's cuts
        server = control_server(app(node, metrics), spec.host, spec.control_port, args.log_level, metrics)
        server.run()  # returns on SIGTERM/SIGINT after the open requests ended (or 5 s)
    finally:
        with contextlib.suppress(Exception):
            node.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
