"""A vLLM 0.32 stand-in for the connector contract tests: config objects, an HMA-shaped CPU cache, requests,
and the engine's call order for one step (scheduler and worker side), as observed (research/vllm-cpu.md)
and as read in vLLM's scheduler and ``kv_connector_model_runner_mixin``.

Where vLLM is importable, the spec and config classes are vLLM's own; the cache is allocated the way vLLM
0.32 lays it out (all layers alias one int8 buffer; one KV-cache group per layer position; the CPU
attention view ``[blocks, heads, block_size, 2 * head_size]``; Mamba pages ``[blocks, 1, 1, bytes]`` with a
padded page stride holding conv (SD) then ssm).
"""

from __future__ import annotations

import types
from dataclasses import dataclass, field
from typing import Any

import torch

from kvwire.adapters import vllm as adapter
from kvwire.adapters.endpoints import join_endpoint

HEADS, HEAD = 2, 32
CONV_SHAPE, SSM_SHAPE = (3, 64), (2, 8, 8)  # conv SD (K-1, dim) bf16; GDN ssm (H, V, K) fp32
BLOCK = 32

try:
    from vllm.config import KVTransferConfig  # type: ignore[import-not-found]
    from vllm.v1.attention.backends.registry import MambaAttentionBackendEnum  # type: ignore[import-not-found]
    from vllm.v1.kv_cache_interface import (  # type: ignore[import-not-found]
        FullAttentionSpec,
        KVCacheConfig,
        KVCacheGroupSpec,
        KVCacheTensor,
        MambaSpec,
    )

    REAL_VLLM = True
except ImportError:
    REAL_VLLM = False


def attention_spec() -> Any:
    if REAL_VLLM:
        return FullAttentionSpec(block_size=BLOCK, num_kv_heads=HEADS, head_size=HEAD, dtype=torch.bfloat16)
    return types.SimpleNamespace(block_size=BLOCK, num_kv_heads=HEADS, head_size=HEAD, head_size_v=HEAD,
                                 dtype=torch.bfloat16, sliding_window=None)


def mamba_spec(page: int) -> Any:
    if REAL_VLLM:
        return MambaSpec(block_size=BLOCK, shapes=(CONV_SHAPE, SSM_SHAPE), dtypes=(torch.bfloat16, torch.float32),
                         page_size_padded=page, mamba_type=MambaAttentionBackendEnum.GDN_ATTN)
    return types.SimpleNamespace(block_size=BLOCK, shapes=(CONV_SHAPE, SSM_SHAPE),
                                 dtypes=(torch.bfloat16, torch.float32), page_size_padded=page,
                                 mamba_type=types.SimpleNamespace(name="GDN_ATTN"))


ATTN_PAGE = HEADS * BLOCK * 2 * HEAD * 2
MAMBA_BYTES = 3 * 64 * 2 + 2 * 8 * 8 * 4
PAGE = max(ATTN_PAGE, MAMBA_BYTES)  # vLLM pads every group's page to one size


def layer_names(n_groups: int = 4, per_group: int = 2) -> list[list[str]]:
    """Qwen3-Next-like: every 4th layer full attention (group 0), the others GDN (groups 1..3)."""
    groups: list[list[str]] = [[] for _ in range(n_groups)]
    for i in range(n_groups * per_group):
        g = 0 if i % n_groups == n_groups - 1 else 1 + i % n_groups
        kind = "self_attn.attn" if g == 0 else "linear_attn"
        groups[g].append(f"model.layers.{i}.{kind}")
    return groups


def kv_cache_config(num_blocks: int) -> Any:
    names = layer_names()
    specs = [attention_spec()] + [mamba_spec(PAGE) for _ in names[1:]]
    tensors_layers = [[g[j] for g in names] for j in range(len(names[0]))]  # one layer of each group
    if REAL_VLLM:
        total = len(tensors_layers) * num_blocks * PAGE
        return KVCacheConfig(num_blocks=num_blocks,
                             kv_cache_tensors=[KVCacheTensor(size=total, layers=ls, layer_stride=num_blocks * PAGE,
                                                             block_stride=PAGE, offset=j * num_blocks * PAGE)
                                               for j, ls in enumerate(tensors_layers)],
                             kv_cache_groups=[KVCacheGroupSpec(n, s) for n, s in zip(names, specs)])
    return types.SimpleNamespace(num_blocks=num_blocks, kv_cache_groups=[
        types.SimpleNamespace(layer_names=n, kv_cache_spec=s) for n, s in zip(names, specs)])


def allocate(num_blocks: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One int8 buffer; position ``j`` of every group aliases the same pages (groups use disjoint block ids)."""
    names = layer_names()
    per = len(names[0])
    buf = torch.zeros(per * num_blocks * PAGE, dtype=torch.int8)
    views: dict[str, torch.Tensor] = {}
    for j in range(per):
        base = j * num_blocks * PAGE
        for g, group in enumerate(names):
            if g == 0:  # [B, H, N, C] with C the bytes of K and V of one token and head, as bf16
                v = torch.as_strided(buf, (num_blocks, HEADS, BLOCK, 4 * HEAD), (PAGE, BLOCK * 4 * HEAD, 4 * HEAD, 1),
                                     base).view(torch.bfloat16)
            else:
                v = torch.as_strided(buf, (num_blocks, 1, 1, MAMBA_BYTES), (PAGE, PAGE, PAGE, 1), base)
            views[group[j]] = v
    return buf, views


def transfer_config(role: str, **extra: Any) -> Any:
    if REAL_VLLM:
        return KVTransferConfig(kv_connector="KvwireConnector", kv_role=role,
                                kv_connector_module_path="kvwire.adapters.vllm", kv_connector_extra_config=extra)
    return types.SimpleNamespace(kv_connector="KvwireConnector", kv_role=role, kv_connector_extra_config=extra,
                                 kv_load_failure_policy="fail")


def vllm_config(role: str, **extra: Any) -> Any:
    return types.SimpleNamespace(kv_transfer_config=transfer_config(role, **extra),
                                 parallel_config=types.SimpleNamespace(tensor_parallel_size=1),
                                 cache_config=types.SimpleNamespace(mamba_cache_mode="none"),
                                 model_config=types.SimpleNamespace(model="tiny-qwen3-next"))


@dataclass(eq=False)
class Request:
    request_id: str
    num_prompt_tokens: int
    kv_transfer_params: dict[str, Any] | None
    num_computed_tokens: int = 0
    status: str = "RequestStatus.WAITING"


@dataclass
class Blocks:
    ids: tuple[list[int], ...]

    def get_block_ids(self) -> tuple[list[int], ...]:
        return self.ids


@dataclass
class Manager:
    """The scheduler's KV cache manager, as the connector sees it."""

    ids: dict[str, tuple[list[int], ...]] = field(default_factory=dict)
    block_pool: Any = None

    def get_block_ids(self, request_id: str) -> tuple[list[int], ...]:
        return self.ids[request_id]


@dataclass
class Output:
    finished_sending: set[str] | None = None
    finished_recving: set[str] | None = None
    failed_recving: set[str] = field(default_factory=set)


class Instance:
    """One vLLM instance: a scheduler-side and a worker-side connector over one HMA-shaped CPU cache."""

    def __init__(self, role: str, num_blocks: int = 24, **extra: Any) -> None:
        cfg = vllm_config(role, key="contract-test", timeout=extra.pop("timeout", 20), **extra)
        kcc = kv_cache_config(num_blocks)
        self.sched = adapter.KvwireConnector(cfg, adapter.KVConnectorRole.SCHEDULER, kcc)
        self.worker = adapter.KvwireConnector(cfg, adapter.KVConnectorRole.WORKER, kcc)
        self.manager = Manager()
        self.sched.bind_kv_cache_manager(self.manager)
        self.buf, self.views = allocate(num_blocks)
        self.worker.register_kv_caches(self.views)
        self.finished: set[str] = set()  # requests vLLM finished, passed once as finished_req_ids
        self.results: list[Any] = []

    @property
    def endpoint(self) -> str:
        assert self.worker.inbox is not None
        return join_endpoint(*self.worker.inbox.address)  # "[v6addr]:port" when it listens on IPv6

    def admit(self, req: Request, block_ids: tuple[list[int], ...]) -> tuple[int | None, bool]:
        """``on_new_request``, ``get_num_new_matched_tokens``, allocation, ``update_state_after_alloc``."""
        self.sched.on_new_request(req)
        n, is_async = self.sched.get_num_new_matched_tokens(req, req.num_computed_tokens)
        self.manager.ids[req.request_id] = block_ids
        self.sched.update_state_after_alloc(req, Blocks(block_ids), n or 0)
        if is_async:
            req.status = "RequestStatus.WAITING_FOR_REMOTE_KVS"
        return n, is_async

    def step(self, scheduled: dict[Request, int], forward: Any = None) -> Any:
        """One engine step: scheduler meta, worker bind / forward (``forward(worker)`` calls save_kv_layer per
        attention layer after writing it) / start_load_kv (async loads: after the forward) / wait_for_save /
        get_transfer_results / clear, then the scheduler's update_connector_output."""
        so = types.SimpleNamespace(num_scheduled_tokens={r.request_id: n for r, n in scheduled.items()},
                                   finished_req_ids=set(self.finished))
        self.finished.clear()
        meta = self.sched.build_connector_meta(so)
        self.worker.handle_preemptions(meta) if hasattr(self.worker, "handle_preemptions") else None
        self.worker.bind_connector_metadata(meta)
        if forward is not None:
            forward(self.worker)
        self.worker.start_load_kv(None)
        self.worker.wait_for_save()
        res = self.worker.get_transfer_results(so.finished_req_ids)
        self.worker.get_block_ids_with_load_errors()
        self.worker.clear_connector_metadata()
        for r, n in scheduled.items():
            r.num_computed_tokens += n
        out = Output(res.finished_sending or None, res.finished_recving or None, set(res.failed_recving))
        self.sched.update_connector_output(out)
        self.results.append(res)
        return res

    def finish(self, req: Request, aborted: bool = False) -> tuple[bool, Any]:
        req.status = "RequestStatus.FINISHED_ABORTED" if aborted else "RequestStatus.FINISHED_LENGTH_CAPPED"
        self.finished.add(req.request_id)
        return self.sched.request_finished_all_groups(req, self.manager.ids[req.request_id])

    def close(self) -> None:
        self.worker.shutdown()
        self.sched.shutdown()
