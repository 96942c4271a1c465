"""vLLM KV connector: disaggregated prefill -> decode over kvwire, hybrid (attention + Mamba/GDN) models included.

Owns: ``KvwireConnector(KVConnectorBase_V1, SupportsHMA)`` — both roles (scheduler, worker), push-based —
its metadata, and the ``kv_transfer_params`` protocol. Plug in with::

    --kv-transfer-config '{"kv_connector": "KvwireConnector", "kv_connector_module_path": "kvwire.adapters.vllm",
                           "kv_role": "kv_producer", "kv_connector_extra_config": {"key": "..."}}'

(decode: ``"kv_role": "kv_consumer"`` and ``"port": 7400`` in the extra config). Per request, the proxy
passes ``kv_transfer_params`` (``prefill_params`` and ``decode_params`` make and check them): to prefill
``{"do_remote_decode": true, "kvwire_endpoint": "host:port", "kvwire_request_id": ID}`` (an IPv6 endpoint:
``"[v6addr]:port"``), to decode ``{"do_remote_prefill": true, "kvwire_request_id": ID}``. Malformed ones that
reach the scheduler fail that request alone: a prefill request computes but sends nothing (its output's
``kv_transfer_params`` say why, under ``kvwire_error``; decode's load then times out), a decode request
without a request id is computed, not loaded. Under the
N-1 state policy (the default; what vLLM's NIXL connector does for Mamba), prefill is given the prompt
without its last token and ``max_tokens=1``, decode the whole prompt: decode loads N-1 tokens of KV and the
state after them, and computes the last prompt token itself.

Call order served (vLLM 0.32, hybrid manager on):

* prefill worker: ``bind_connector_metadata`` (a request's final prefill chunk: its transfer begins),
  ``save_kv_layer`` per attention layer (that layer is staged and sent), ``wait_for_save`` (the Mamba/GDN
  states, then the transfer's end), ``get_transfer_results`` (``finished_sending`` once the decode side
  confirmed, or the transfer failed: the scheduler then frees the blocks ``request_finished_all_groups``
  kept).
* decode scheduler: ``get_num_new_matched_tokens`` (``(S - computed, True)``: an async load of the S
  tokens the policy says prefill computed), ``update_state_after_alloc`` (the blocks, per group);
  decode worker ``start_load_kv`` expects the transfer into them (one that arrived earlier waits in a
  staging buffer); ``get_transfer_results`` reports it in ``finished_recving``, and in ``failed_recving``
  too if it failed, timed out or was cancelled; vLLM's ``kv_load_failure_policy`` decides (recompute or
  fail). A failed load never retries the transfer. ``get_block_ids_with_load_errors`` stays empty: vLLM
  refuses block-level errors for hybrid models (block ids are unique per group only).
* aborts: ``request_finished_all_groups`` keeps the blocks of a request still transferring and tells the
  worker to cancel it (its pinned receive buffers go back to the pool then); the blocks are freed when the
  cancelled transfer is reported.

vLLM is imported lazily: where it is not installed, minimal stand-ins of its base classes make this module
importable and contract-testable (``VLLM_AVAILABLE`` says which). Must not know: kvwire's internals beyond
``lifecycle``, ``endpoints`` and ``kvwire.cuda``; how vLLM schedules beyond the connector API.
"""

from __future__ import annotations

import enum
import logging
import os
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..codec.layout import RequestSpec
from ..errors import LayoutError, LayoutMismatch
from .endpoints import check_request_id, split_endpoint
from .lifecycle import Ended, Inbox, Outbox, tail_parity_setting
from .positions import StatePolicy
from .vllm_cache import VllmCacheMap, attention_kv_views

log = logging.getLogger("kvwire.adapters.vllm")

try:  # the real base classes where vLLM is installed
    from vllm.distributed.kv_transfer.kv_connector.v1.base import (
        KVConnectorBase_V1,
        KVConnectorMetadata,
        KVConnectorRole,
        KVConnectorTransferResults,
        SupportsHMA,
    )

    VLLM_AVAILABLE = True
except ImportError:  # minimal stand-ins with the same names and signatures
    VLLM_AVAILABLE = False

    class KVConnectorRole(enum.Enum):  # type: ignore[no-redef]
        SCHEDULER = 0
        WORKER = 1

    class KVConnectorMetadata(ABC):  # type: ignore[no-redef]  # noqa: B024
        pass

    @dataclass
    class KVConnectorTransferResults:  # type: ignore[no-redef]
        finished_sending: set[str] = field(default_factory=set)
        finished_recving: set[str] = field(default_factory=set)
        failed_recving: set[str] = field(default_factory=set)

    class SupportsHMA(ABC):  # type: ignore[no-redef]
        @abstractmethod
        def request_finished_all_groups(self, request: Any, block_ids: tuple[list[int], ...]
                                        ) -> tuple[bool, dict[str, Any] | None]:
            raise NotImplementedError

    class KVConnectorBase_V1(ABC):  # type: ignore[no-redef]  # noqa: N801, B024
        def __init__(self, vllm_config: Any, role: Any, kv_cache_config: Any) -> None:
            if vllm_config.kv_transfer_config is None:
                raise ValueError("kv_transfer_config must be set for KVConnectorBase_V1")
            self._connector_metadata: Any = None
            self._vllm_config = vllm_config
            self._kv_transfer_config = vllm_config.kv_transfer_config
            self._kv_cache_config = kv_cache_config
            self._role = role

        @property
        def role(self) -> Any:
            return self._role

        def bind_connector_metadata(self, connector_metadata: Any) -> None:
            self._connector_metadata = connector_metadata

        def clear_connector_metadata(self) -> None:
            self._connector_metadata = None

        def _get_connector_metadata(self) -> Any:
            assert self._connector_metadata is not None
            return self._connector_metadata

if TYPE_CHECKING:
    import torch

__all__ = ["VLLM_AVAILABLE", "KvwireConnector", "KvwireMetadata", "decode_params", "prefill_params"]


def prefill_params(request_id: str, endpoint: str | tuple[str, int]) -> dict[str, Any]:
    """``kv_transfer_params`` of the prefill request: send to ``endpoint``, the decode's ``"host:port"``,
    ``"[v6addr]:port"`` (an IPv6 literal takes brackets) or ``(host, port)``. Checked here, as the connector
    parses it: ``TypeError`` for a request id that is not a string or an endpoint of the wrong type,
    ``ValueError`` for an empty or too long id, or an endpoint without a host or a port in 1..65535."""
    check_request_id(request_id, what="kvwire_request_id")
    split_endpoint(endpoint, what="kvwire_endpoint")
    return {"do_remote_decode": True, "kvwire_request_id": request_id, "kvwire_endpoint": endpoint}


def decode_params(request_id: str) -> dict[str, Any]:
    """``kv_transfer_params`` of the decode request (the request id checked as in ``prefill_params``)."""
    check_request_id(request_id, what="kvwire_request_id")
    return {"do_remote_prefill": True, "kvwire_request_id": request_id}


@dataclass
class _Save:
    req_id: str
    kv_id: str
    endpoint: tuple[str, int]
    block_ids: tuple[list[int], ...]
    num_tokens: int


@dataclass
class _Load:
    req_id: str
    kv_id: str
    block_ids: tuple[list[int], ...]
    num_prompt_tokens: int
    state_position: int


@dataclass
class KvwireMetadata(KVConnectorMetadata):
    """Scheduler -> worker, one step: transfers to begin (final prefill chunk), loads to expect, and
    requests whose transfer must be cancelled (aborted)."""

    saves: list[_Save] = field(default_factory=list)
    loads: list[_Load] = field(default_factory=list)
    cancels: list[str] = field(default_factory=list)


def _producer_params(params: dict[str, Any]) -> tuple[str, tuple[str, int]]:
    """The kvwire request id and decode endpoint of a prefill request's ``kv_transfer_params``, as
    ``prefill_params`` makes them. A non-string id is taken as its text (older clients sent ints; decode
    reads it the same way); ``ValueError``/``TypeError`` (the reason) for a missing or malformed one."""
    if "kvwire_request_id" not in params or "kvwire_endpoint" not in params:
        raise ValueError("kv_transfer_params lack kvwire_request_id or kvwire_endpoint (see prefill_params)")
    kv_id = check_request_id(str(params["kvwire_request_id"]), what="kvwire_request_id")
    return kv_id, split_endpoint(params["kvwire_endpoint"], what="kvwire_endpoint")


class KvwireConnector(KVConnectorBase_V1, SupportsHMA):
    """See the module docstring. Extra config (``kv_connector_extra_config``): ``key`` (pre-shared key; or
    the ``KVWIRE_KEY`` environment variable), ``host``/``port`` (decode: where to listen), ``state_policy``
    (``N-1`` default, ``N`` for attention-only models), ``lanes``, ``timeout`` (s), ``pool_bytes``,
    ``staging_bytes``, ``tail_parity`` (prefill: parity chunks per group of the last layer, ``kvwire.connect``'s
    ``tail_parity``: unset or ``"auto"``, its default, 2 on a long path when zfec is installed; 0: none)."""

    def __init__(self, vllm_config: Any, role: Any, kv_cache_config: Any = None) -> None:
        super().__init__(vllm_config, role, kv_cache_config)
        if kv_cache_config is None:
            raise LayoutError("KvwireConnector needs the kv_cache_config (vLLM's 3-argument constructor)")
        tc = vllm_config.kv_transfer_config
        extra = dict(getattr(tc, "kv_connector_extra_config", None) or {})
        self.extra = extra
        self.is_producer = getattr(tc, "kv_role", None) in ("kv_producer", "kv_both")
        self.is_consumer = getattr(tc, "kv_role", None) in ("kv_consumer", "kv_both")
        self.policy = StatePolicy.parse(extra.get("state_policy", "N-1"))
        self.tail_parity = tail_parity_setting(extra.get("tail_parity"), "tail_parity")
        tp = int(getattr(getattr(vllm_config, "parallel_config", None), "tensor_parallel_size", 1) or 1)
        if tp != 1:
            raise LayoutError("KvwireConnector supports tensor_parallel_size 1 only (one endpoint per instance)")
        cache_cfg = getattr(vllm_config, "cache_config", None)
        self.map = VllmCacheMap(kv_cache_config, conv_layout=_conv_layout(),
                                name=str(getattr(getattr(vllm_config, "model_config", None), "model", "vllm")))
        if self.map.has_state:
            if self.policy is StatePolicy.N:
                raise LayoutError("state policy N cannot serve a model with Mamba/GDN state on vLLM: decode "
                                  "recomputes the last prompt token, which would advance the state twice; use N-1")
            mode = getattr(cache_cfg, "mamba_cache_mode", "none")
            if mode not in ("none", None):
                raise LayoutError(f"prefix caching of Mamba states (mamba_cache_mode {mode!r}) is not supported: "
                                  "start vLLM with --no-enable-prefix-caching")
        self.num_groups = len(self.map.group_names)
        # scheduler side
        self._kv_manager: Any = None
        self._producing: dict[str, tuple[str, tuple[str, int], Any]] = {}  # req_id -> (kv id, endpoint, request)
        self._to_load: dict[str, _Load] = {}
        self._loading: set[str] = set()
        self._saving: set[str] = set()  # a save was emitted: its transfer began on the worker
        self._no_remote: set[str] = set()  # a load failed: vLLM recomputes (or fails) it, never reloads
        self._refused: dict[str, str] = {}  # prefill requests with malformed kv_transfer_params: the reason
        self._delayed: set[str] = set()  # blocks kept by request_finished_all_groups, not reported yet
        self._cancels: list[str] = []
        # worker side
        self.outbox: Outbox | None = None
        self.inbox: Inbox | None = None
        self._sends: dict[str, Any] = {}  # req_id -> Sending, while this step's forward runs
        self._kv_of: dict[str, str] = {}  # req_id -> kvwire request id (loads)
        self._load_of: dict[str, _Load] = {}  # req_id -> its load, until it ended
        self._kv_caches: dict[str, Any] = {}
        self._done_sending: set[str] = set()
        self._done_recving: set[str] = set()
        self._failed_recving: set[str] = set()
        self._sending_ids: set[str] = set()
        self._finished_reqs: set[str] = set()

    # ------------------------------------------------------------------ scheduler side
    def bind_kv_cache_manager(self, kv_cache_manager: Any) -> None:
        self._kv_manager = kv_cache_manager
        if VLLM_AVAILABLE:
            super().bind_kv_cache_manager(kv_cache_manager)

    def on_new_request(self, request: Any) -> None:
        params = request.kv_transfer_params or {}
        if self.is_producer and params.get("do_remote_decode"):
            try:
                kv_id, endpoint = _producer_params(params)
            except (TypeError, ValueError) as e:  # one bad request (an older or foreign client): never the engine
                log.error("kvwire: request %s computes, but its KV is not sent: %s", request.request_id, e)
                self._refused[request.request_id] = f"kvwire: not sent: {e}"
                return
            self._producing[request.request_id] = (kv_id, endpoint, request)

    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> tuple[int | None, bool]:
        params = request.kv_transfer_params or {}
        if not (self.is_consumer and params.get("do_remote_prefill")) or request.request_id in self._loading \
                or request.request_id in self._no_remote:
            return 0, False
        try:
            check_request_id(str(params.get("kvwire_request_id", "")), what="kvwire_request_id")
        except ValueError as e:  # nothing to load: vLLM computes the prompt itself
            log.error("kvwire: request %s is computed here, not loaded: %s", request.request_id, e)
            self._no_remote.add(request.request_id)
            return 0, False
        s = self.policy.prefill_tokens(int(request.num_prompt_tokens))
        if s <= num_computed_tokens:
            return 0, False
        return s - num_computed_tokens, True

    def update_state_after_alloc(self, request: Any, blocks: Any, num_external_tokens: int) -> None:
        params = request.kv_transfer_params or {}
        if num_external_tokens <= 0 or not params.get("do_remote_prefill"):
            return
        n = int(request.num_prompt_tokens)
        self._to_load[request.request_id] = _Load(
            request.request_id, str(params["kvwire_request_id"]), tuple(list(g) for g in blocks.get_block_ids()),
            n, self.policy.prefill_tokens(n))
        self._loading.add(request.request_id)

    def get_loaded_kv_cache_group_ids(self, request: Any) -> tuple[int, ...]:
        """A transfer of the request's own blocks restores every group, the Mamba ones included."""
        return tuple(range(self.num_groups))

    def build_connector_meta(self, scheduler_output: Any) -> KvwireMetadata:
        meta = KvwireMetadata(loads=list(self._to_load.values()), cancels=self._cancels)
        self._to_load, self._cancels = {}, []
        scheduled = scheduler_output.num_scheduled_tokens
        for req_id, (kv_id, endpoint, request) in list(self._producing.items()):
            n = scheduled.get(req_id, 0)
            if n and request.num_computed_tokens + n >= request.num_prompt_tokens:  # the final prefill chunk
                ids = self._kv_manager.get_block_ids(req_id)
                meta.saves.append(_Save(req_id, kv_id, endpoint, tuple(list(g) for g in ids),
                                        int(request.num_prompt_tokens)))
                del self._producing[req_id]
                self._saving.add(req_id)
        return meta

    def update_connector_output(self, connector_output: Any) -> None:
        for req_id in (connector_output.finished_sending or ()):
            self._delayed.discard(req_id)
        for req_id in (connector_output.finished_recving or ()):
            self._delayed.discard(req_id)
            self._loading.discard(req_id)
        self._no_remote |= set(getattr(connector_output, "failed_recving", None) or ())

    def request_finished_all_groups(self, request: Any, block_ids: tuple[list[int], ...]
                                    ) -> tuple[bool, dict[str, Any] | None]:
        req_id = request.request_id
        self._producing.pop(req_id, None)  # finished before its final prefill chunk: nothing was sent
        self._no_remote.discard(req_id)
        refused = self._refused.pop(req_id, None)
        if refused is not None:  # nothing was sent: vLLM frees now; the reason goes back with the output
            return False, {"kvwire_error": refused}
        if req_id in self._loading:  # decode, still receiving into these blocks: cancel, free once reported
            self._cancels.append(req_id)
            self._delayed.add(req_id)
            return True, None
        if req_id in self._saving:  # prefill: the blocks stay until the transfer ended
            self._saving.discard(req_id)
            if "ABORTED" in str(getattr(request, "status", "")):
                self._cancels.append(req_id)
            self._delayed.add(req_id)
            return True, None
        return False, None

    def has_pending_push_work(self) -> bool:
        return bool(self._delayed)

    # ------------------------------------------------------------------ worker side
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        from ..cuda import PinnedPool, Stager, Unstager

        self._kv_caches = dict(kv_caches)
        cache = self.map.paged_cache(kv_caches)
        pool = PinnedPool(int(self.extra.get("pool_bytes", 1 << 30)), backend="torch")
        timeout = float(self.extra.get("timeout", 120.0))
        key = self.extra.get("key") or os.environ.get("KVWIRE_KEY") or None
        if self.is_producer:
            self.outbox = Outbox(Stager(cache, pool), timeout=timeout, key=key,
                                 lanes=int(self.extra.get("lanes", 4)), tail_parity=self.tail_parity)
        if self.is_consumer:
            self.inbox = Inbox(Unstager(cache, pool), timeout=timeout, key=key,
                               staging_bytes=int(self.extra.get("staging_bytes", 1 << 30)),
                               host=str(self.extra.get("host", "127.0.0.1")), port=int(self.extra.get("port", 0)))
            log.info("kvwire decode endpoint %s:%d", *self.inbox.address)

    def bind_connector_metadata(self, connector_metadata: Any) -> None:
        super().bind_connector_metadata(connector_metadata)
        meta: KvwireMetadata = connector_metadata
        for req_id in meta.cancels:
            if self.outbox is not None:
                self.outbox.cancel(req_id, "request aborted")
            if self.inbox is not None and req_id in self._kv_of:
                self.inbox.cancel(self._kv_of[req_id], "request aborted")
        if self.outbox is None:
            return
        for s in meta.saves:
            request = RequestSpec(s.kv_id, s.num_tokens, s.num_tokens)
            try:
                tables, slots = self.map.tables(s.block_ids)
            except Exception as e:  # noqa: BLE001 - a failed send, reported like any other
                tables, slots = {}, {}
                log.error("request %s: %s", s.req_id, e)
            self._sending_ids.add(s.req_id)
            self._sends[s.req_id] = self.outbox.begin(s.req_id, request, s.endpoint, tables, slots,
                                                      release=self._sent)

    def start_load_kv(self, forward_context: Any, **kwargs: Any) -> None:
        if self.inbox is None or not self.has_connector_metadata():
            return
        meta: KvwireMetadata = self._get_connector_metadata()
        for ld in meta.loads:
            self._kv_of[ld.req_id] = ld.kv_id
            self._load_of[ld.req_id] = ld
            request = RequestSpec(ld.kv_id, ld.num_prompt_tokens, ld.state_position)
            try:
                tables, slots = self.map.tables(ld.block_ids)
            except Exception as e:  # noqa: BLE001 - reported through the lease
                tables, slots = {}, {}
                log.error("request %s: %s", ld.req_id, e)
            self.inbox.expect(ld.req_id, request, tables, slots, release=self._received)

    def has_connector_metadata(self) -> bool:
        return self._connector_metadata is not None

    def wait_for_layer_load(self, layer_name: str) -> None:
        return  # loads complete before the request is scheduled (async load)

    def save_kv_layer(self, layer_name: str, kv_layer: Any, attn_metadata: Any, **kwargs: Any) -> None:
        layer = self.map.layer_of.get(layer_name)
        if layer is None:
            return
        for sending in self._sends.values():
            sending.stage(layer)

    def wait_for_save(self) -> None:
        for sending in self._sends.values():
            sending.finish()  # the state layers, then the end of the transfer
        self._sends = {}

    def _sent(self, ended: Ended) -> None:
        if not ended.ok:
            log.warning("kvwire send of %s %s: %s", ended.key, ended.state.value, ended.reason)
        self._done_sending.add(ended.key)

    def _clear_tail(self, ld: _Load) -> None:
        """Zero the last attention block's rows past the loaded tokens. The load writes rows [0, S) only; the
        rest of that block holds whatever its page held before (blocks are reused across requests and KV-cache
        groups: GDN state bytes read as bf16 can be NaN), and vLLM-CPU's attention over the block's context
        multiplies masked rows' V by zero weights: a NaN there made every later greedy token 0 (seen on the
        deployment with vLLM nodes: prompts whose N-1 is not a block multiple, on reused blocks)."""
        bs, s = self.map.block_size, ld.state_position
        if s % bs == 0:
            return
        for g, names in enumerate(self.map.group_names):
            if self.map.groups.state_groups[g] or len(ld.block_ids[g]) <= s // bs:
                continue
            block = ld.block_ids[g][s // bs]
            for name in names:
                t = self._kv_caches.get(name)
                spec = self.map.layout.layers[self.map.layer_of[name]].caches[0]
                if t is None:
                    continue
                try:
                    k, v = attention_kv_views(t, bs, spec.tensors[0].shape)
                except (LayoutError, LayoutMismatch):
                    continue
                k[block, :, s % bs:].zero_()
                v[block, :, s % bs:].zero_()

    def _received(self, ended: Ended) -> None:
        ld = self._load_of.pop(ended.key, None)
        if ended.ok and ld is not None:
            self._clear_tail(ld)
        if not ended.ok:
            log.warning("kvwire receive of %s %s: %s", ended.key, ended.state.value, ended.reason)
            self._failed_recving.add(ended.key)
        self._kv_of.pop(ended.key, None)
        self._done_recving.add(ended.key)

    def get_transfer_results(self, finished_req_ids: set[str]) -> KVConnectorTransferResults:
        if self.outbox is not None:
            self.outbox.poll()
        if self.inbox is not None:
            self.inbox.poll()
        self._finished_reqs |= set(finished_req_ids) & self._sending_ids
        sending = self._done_sending & self._finished_reqs  # only requests vLLM has finished
        self._done_sending -= sending
        self._finished_reqs -= sending
        self._sending_ids -= sending
        recving, failed = self._done_recving, self._failed_recving
        self._done_recving, self._failed_recving = set(), set()
        return KVConnectorTransferResults(finished_sending=sending, finished_recving=recving,
                                          failed_recving=failed)

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        r = self.get_transfer_results(finished_req_ids)
        return r.finished_sending or None, r.finished_recving or None

    def get_block_ids_with_load_errors(self) -> set[int]:
        """Always empty: a failed transfer fails the request as a whole, reported by id in
        ``failed_recving`` (vLLM 0.32 refuses block-level errors once there are several KV-cache groups,
        and block ids are only unique within a group)."""
        return set()

    def shutdown(self) -> None:
        """Sends still in flight get up to ``shutdown_grace`` seconds (extra config, default 30) to finish:
        ``LLM.generate`` returns once prefill's one token is out, possibly before its transfer ended."""
        if self.outbox is not None:
            self.outbox.close(grace=float(self.extra.get("shutdown_grace", 30.0)))
            self.outbox.stager.close()
        if self.inbox is not None:
            self.inbox.close()
            self.inbox.unstager.close()


def _conv_layout() -> str:
    """vLLM's conv-state layout (``VLLM_SSM_CONV_STATE_LAYOUT``; SD by default, as on CPU)."""
    if VLLM_AVAILABLE:
        try:
            from vllm.model_executor.layers.mamba.mamba_utils import get_conv_state_layout

            return str(get_conv_state_layout())
        except ImportError:
            pass
    return os.environ.get("VLLM_SSM_CONV_STATE_LAYOUT", "SD")
