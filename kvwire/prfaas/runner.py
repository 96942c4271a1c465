"""The model behind a PrfaaS node: the ``NodeBackend`` interface and its light in-process transformers runner.

Owns: building the served model from the deployment's ``ModelSpec`` (seeded, identical in every process),
prefill streamed layer by layer into a kvwire transfer, greedy decode from a received cache, prefix
checkpoints (attention KV and linear states at exactly ``length`` tokens) and their export/import as kvwire
transfers, and the single-process reference the deployment's tokens are checked against.

Conventions (every node and the reference share them, so tokens are bit-identical across processes):
- ``N - 1``: prefill computes the first ``N - 1`` prompt tokens (state position S = N - 1), decode feeds the
  last prompt token and yields every generated token. A prompt needs at least 2 tokens.
- Canonical chunks: prefill runs its tokens in chunks that end on every ``block_size`` boundary (and at S), so
  the arithmetic is the same whether it starts from token 0 or from a checkpoint at any block boundary; the
  last chunk runs with forward hooks that hand each finished layer to kvwire while the next layer computes.
  A checkpoint is the cache at the block-aligned floor of S, cloned at that chunk boundary (free: no rerun).
- One thread per process computes (``torch.set_num_threads(1)``): same reduction order everywhere.

Must not know: HTTP, routing, the node's queues, or kvwire internals (public API and the HF adapter only).
torch/transformers are imported when a runner is built, never by ``import kvwire.prfaas``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from ..codec.layout import TOKEN, ModelLayout, RequestSpec, plan_segments
from ..errors import KvwireError, LayoutError
from .config import ModelSpec
from .prefix import block_keys

if TYPE_CHECKING:
    from ..tcp import IncomingTransfer, OutgoingTransfer, Receiver, Session

__all__ = ["CacheAllocError", "Checkpoint", "Incoming", "NodeBackend", "PrefillResult", "TransformersRunner"]

#: called with a request's cache bytes before they are allocated; raises to refuse them (a node's budget)
Reserve = Callable[[int], None]


class CacheAllocError(KvwireError, MemoryError):
    """The destination buffers of a cache could not be allocated (torch raised: the host is out of memory)."""


@dataclass
class Checkpoint:
    """A prompt prefix's cache: per layer ``[K, V]`` (``(1, kv_heads, length, head_dim)``) or ``[conv, state]``.

    ``has_state``: False for a KV-only entry (a decode node's: it saw the state at S, never at ``length``);
    such an entry can shorten what crosses to decode (``send_from``) but cannot restart a prefill.
    """

    key: str  # the block key of its last block (prefix.block_keys)
    length: int
    layers: list[list[Any]]
    kv: list[bool]  # per layer: True where ``layers[i]`` is [K, V]
    has_state: bool = True

    def kv_prefix(self, key: str, length: int) -> Checkpoint:
        """The KV of the first ``length`` tokens (views, no copy) as a KV-only checkpoint under ``key``."""
        if length > self.length:
            raise ValueError(f"a {self.length}-token checkpoint holds no {length}-token prefix")
        layers = [[t[:, :, :length] for t in ts] if is_kv else [] for ts, is_kv in zip(self.layers, self.kv)]
        return Checkpoint(key, length, layers, list(self.kv), has_state=False)

    @property
    def nbytes(self) -> int:
        return sum(int(t.numel() * t.element_size()) for ts in self.layers for t in ts)


@dataclass
class PrefillResult:
    """What a prefill did: the transfer carrying the cache (maybe still in flight) and the new checkpoint."""

    transfer: OutgoingTransfer
    computed_tokens: int
    reused_tokens: int
    checkpoint: Checkpoint | None
    prefill_s: float
    nbytes: int  # the transfer's payload


@dataclass
class Incoming:
    """A decode-side request: the destination tensors registered with the receiver and the held prefix."""

    request_id: str
    prompt: list[int]
    handle: IncomingTransfer
    tensors: list[Any]
    prefix: Checkpoint | None
    extra: dict[str, Any] = field(default_factory=dict)


class NodeBackend(Protocol):
    """What a PrfaaS node needs from its model engine (the in-process runner; a vLLM engine would be another)."""

    block_size: int
    vocab_size: int

    def prefill(self, prompt: Sequence[int], session: Session, request_id: str, *, start: Checkpoint | None = None,
                send_from: int = 0, timeout: float = 60.0) -> PrefillResult: ...

    def expect(self, receiver: Receiver, request_id: str, prompt: Sequence[int], *,
               prefix: Checkpoint | None = None, timeout: float = 60.0, reserve: Reserve | None = None
               ) -> Incoming: ...

    def expect_nbytes(self, num_tokens: int, prefix_length: int = 0) -> int: ...

    def decode(self, incoming: Incoming, max_tokens: int, *, stop: Sequence[int] = (),
               timeout: float = 60.0) -> Iterator[int]: ...

    def kv_checkpoint(self, incoming: Incoming) -> Checkpoint | None: ...

    def send_checkpoint(self, checkpoint: Checkpoint, session: Session, request_id: str, *,
                        timeout: float = 60.0) -> OutgoingTransfer: ...

    def expect_checkpoint(self, receiver: Receiver, request_id: str, prompt: Sequence[int], length: int, *,
                          timeout: float = 60.0, reserve: Reserve | None = None
                          ) -> tuple[IncomingTransfer, Checkpoint]: ...


def build_model(spec: ModelSpec) -> Any:
    """The served model: ``spec.hf`` over transformers' config for ``spec.kind``, weights seeded by ``spec.seed``."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(spec.kind, **spec.hf_kwargs())
    torch.manual_seed(spec.seed)
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, spec.dtype)).eval()
    if spec.decay_range is not None:  # long-memory linear heads (see ModelSpec.decay_range)
        lo, hi = spec.decay_range
        gen = torch.Generator().manual_seed(spec.seed + 1)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("A_log"):
                    p.copy_(torch.empty(p.shape).uniform_(lo, hi, generator=gen).log().to(p.dtype))
    return model


class TransformersRunner:
    """The light in-process ``NodeBackend``: one transformers model, one forward at a time (``lock``)."""

    def __init__(self, spec: ModelSpec, block_size: int) -> None:
        import torch

        from ..adapters.transformers import hf_layout

        torch.set_num_threads(1)
        self.spec, self.block_size = spec, block_size
        self.vocab_size = spec.vocab_size
        self.model = build_model(spec)
        self.layout: ModelLayout = hf_layout(self.model)
        self.lock = threading.Lock()  # one forward at a time: the hooks are per module, not per call
        self.decoder_layers = list(self.model.base_model.layers)
        self.kv_layers = [bool(spec.caches) and spec.caches[0].indexing == TOKEN for spec in self.layout.layers]

    # -- helpers ---------------------------------------------------------------------------------------
    def _check_prompt(self, prompt: Sequence[int]) -> list[int]:
        ids = [int(t) for t in prompt]
        if len(ids) < 2:
            raise LayoutError("a prompt needs at least 2 tokens (prefill N-1, decode feeds the last)")
        if any(not 0 <= t < self.vocab_size for t in ids):
            raise LayoutError(f"token ids must lie in [0, {self.vocab_size})")
        return ids

    def _new_cache(self) -> Any:
        from transformers import DynamicCache

        return DynamicCache(config=self.model.config)

    def _forward(self, ids: list[int], cache: Any) -> Any:
        import torch

        from ..adapters.transformers import cache_kwargs

        x = torch.tensor([ids], dtype=torch.long)
        with torch.no_grad():
            return self.model(x, use_cache=True, **cache_kwargs(self.model, cache)).logits[:, -1]

    def _layers_of(self, cache: Any, clone: bool) -> list[list[Any]]:
        from ..adapters.transformers import layer_tensors

        out = []
        for spec, layer in zip(self.layout.layers, cache.layers):
            ts = layer_tensors(layer, spec.caches) if spec.caches else []
            out.append([t.clone() for t in ts] if clone else list(ts))
        return out

    def cache_from(self, checkpoint: Checkpoint) -> Any:
        """A fresh DynamicCache holding a copy of ``checkpoint`` (the forward updates states in place)."""
        from ..adapters.transformers import build_cache

        if not checkpoint.has_state:
            raise KvwireError("a KV-only checkpoint cannot restart a prefill (no linear state at its length)")
        return build_cache(self.model.config, self.layout, [t.clone() for ts in checkpoint.layers for t in ts])

    def _chunks(self, start: int, stop: int) -> list[tuple[int, int]]:
        b, out, s = self.block_size, [], start
        while s < stop:
            e = min((s // b + 1) * b, stop)
            out.append((s, e))
            s = e
        return out

    def _request(self, request_id: str, n: int, s: int, hit: int) -> RequestSpec:
        return RequestSpec(request_id, num_tokens=n, state_position=s, prefix_hit={"attn": hit} if hit else {})

    # -- prefill ---------------------------------------------------------------------------------------
    def prefill(self, prompt: Sequence[int], session: Session, request_id: str, *, start: Checkpoint | None = None,
                send_from: int = 0, timeout: float = 60.0) -> PrefillResult:
        """Prefill ``prompt[:N-1]`` (from ``start`` if given), streaming the last chunk's layers to ``session``.

        ``send_from``: the decode side already holds the first ``send_from`` tokens' KV; only ``[send_from,
        N-1)`` of it (and every linear state) is sent. Returns when the forward is done.
        """
        ids = self._check_prompt(prompt)
        n, s = len(ids), len(ids) - 1
        begin = 0 if start is None else start.length
        if start is not None and (start.length > s or start.key != block_keys(ids[:start.length],
                                                                               self.block_size)[-1]):
            raise LayoutError(f"checkpoint of {start.length} tokens is not a prefix of this prompt")
        if not 0 <= send_from <= s or send_from % self.block_size:
            raise LayoutError(f"send_from {send_from} must be a multiple of {self.block_size} in [0, {s}]")
        ckpt_len = s // self.block_size * self.block_size
        request = self._request(request_id, n, s, send_from)
        with self.lock:
            t0 = time.monotonic()
            cache = self._new_cache() if start is None else self.cache_from(start)
            transfer = session.send(self.layout, request, timeout=timeout)
            checkpoint: Checkpoint | None = None
            try:
                chunks = self._chunks(begin, s)
                for i, (a, e) in enumerate(chunks):
                    if i == len(chunks) - 1:
                        with _Streamer(self, transfer, cache, send_from):
                            self._forward(ids[a:e], cache)
                    else:
                        self._forward(ids[a:e], cache)
                    if e == ckpt_len and ckpt_len > begin:
                        checkpoint = Checkpoint(block_keys(ids[:e], self.block_size)[-1], e,
                                                self._layers_of(cache, clone=True), list(self.kv_layers))
                if not chunks:  # the checkpoint already holds all S tokens: send it as it is
                    _Streamer(self, transfer, cache, send_from).write_all()
            except BaseException as exc:
                transfer.cancel(f"prefill failed: {type(exc).__name__}: {exc}")
                raise
            nbytes = sum(seg.nbytes for seg in plan_segments(self.layout, request))
            return PrefillResult(transfer, s - begin, begin, checkpoint, time.monotonic() - t0, nbytes)

    # -- decode ----------------------------------------------------------------------------------------
    def _shapes(self, request: RequestSpec) -> list[tuple[int, ...]]:
        out = []
        for seg in plan_segments(self.layout, request):
            cache = self.layout.layers[seg.layer].caches[seg.cache]
            spec = cache.tensors[seg.tensor]
            token = cache.indexing == TOKEN
            out.append((1, spec.shape[0], seg.token_count, spec.shape[1]) if token else (1, *spec.shape))
        return out

    def _nbytes(self, request: RequestSpec) -> int:
        return sum(seg.nbytes for seg in plan_segments(self.layout, request))

    def expect_nbytes(self, num_tokens: int, prefix_length: int = 0) -> int:
        """The bytes ``expect`` allocates for a ``num_tokens``-token prompt with ``prefix_length`` tokens of its
        KV held here (what a node's ``pending_bytes`` budget is counted in)."""
        return self._nbytes(self._request("size", num_tokens, num_tokens - 1, prefix_length))

    def _alloc(self, request: RequestSpec, reserve: Reserve | None = None) -> list[Any]:
        """The destination tensors of ``request``'s payload; ``reserve(nbytes)`` first (it may refuse). A failed
        allocation is ``CacheAllocError``."""
        import torch

        if reserve is not None:
            reserve(self._nbytes(request))
        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
        out = []
        try:
            for seg, shape in zip(plan_segments(self.layout, request), self._shapes(request)):
                spec = self.layout.layers[seg.layer].caches[seg.cache].tensors[seg.tensor]
                out.append(torch.empty(shape, dtype=dtype.get(spec.dtype, torch.float32)))
        except (RuntimeError, MemoryError) as e:  # torch's CPU allocator raises RuntimeError
            out.clear()
            raise CacheAllocError(f"cannot allocate {self._nbytes(request)} bytes of cache buffers for "
                                  f"{request.request_id!r}: {e}") from None
        return out

    def expect(self, receiver: Receiver, request_id: str, prompt: Sequence[int], *,
               prefix: Checkpoint | None = None, timeout: float = 60.0, reserve: Reserve | None = None
               ) -> Incoming:
        """Register destination tensors for the prompt's cache (only ``[prefix.length, N-1)`` of the KV when a
        prefix is held here); ``reserve(nbytes)`` is called before they are allocated."""
        ids = self._check_prompt(prompt)
        n, s = len(ids), len(ids) - 1
        hit = 0 if prefix is None else prefix.length
        if prefix is not None and (hit > s or prefix.key != block_keys(ids[:hit], self.block_size)[-1]):
            raise LayoutError(f"held prefix of {hit} tokens is not a prefix of this prompt")
        request = self._request(request_id, n, s, hit)
        tensors = self._alloc(request, reserve)
        handle = receiver.expect(request_id, tensors, layout=self.layout, state_position=s, timeout=timeout)
        return Incoming(request_id, ids, handle, tensors, prefix)

    def _received_cache(self, incoming: Incoming) -> Any:
        import torch

        from ..adapters.transformers import build_cache

        full: list[Any] = []
        it = iter(incoming.tensors)
        for li, spec in enumerate(self.layout.layers):
            for c in spec.caches:
                for ti in range(len(c.tensors)):
                    t = next(it)
                    if c.indexing == TOKEN and incoming.prefix is not None:
                        t = torch.cat([incoming.prefix.layers[li][ti], t], dim=2)
                    full.append(t)
        return build_cache(self.model.config, self.layout, full)

    def decode(self, incoming: Incoming, max_tokens: int, *, stop: Sequence[int] = (),
               timeout: float = 60.0) -> Iterator[int]:
        """Wait (bounded) for the cache, then greedy-decode up to ``max_tokens`` tokens, stopping after a stop id.

        Raises the transfer's typed error if it failed, ``TimeoutError`` if it did not end in ``timeout``.
        """
        import torch

        if max_tokens < 1:
            raise LayoutError("max_tokens must be >= 1")
        incoming.handle.result(timeout)
        with self.lock:
            cache = self._received_cache(incoming)
            incoming.extra["cache"] = cache
        tok = incoming.prompt[-1]
        stops = set(stop)
        for _ in range(max_tokens):
            with self.lock:
                logits = self._forward([tok], cache)
            tok = int(torch.argmax(logits, dim=-1))
            yield tok
            if tok in stops:
                return

    def kv_checkpoint(self, incoming: Incoming) -> Checkpoint | None:
        """A KV-only checkpoint of a served prompt at its block-aligned floor (for a later ``send_from``)."""
        cache = incoming.extra.get("cache")
        s = len(incoming.prompt) - 1
        length = s // self.block_size * self.block_size
        if cache is None or length == 0:
            return None
        layers = [[t[:, :, :length].clone() for t in ts] if is_kv else []
                  for ts, is_kv in zip(self._layers_of(cache, clone=False), self.kv_layers)]
        return Checkpoint(block_keys(incoming.prompt[:length], self.block_size)[-1], length, layers,
                          list(self.kv_layers), has_state=False)

    # -- checkpoint moves ------------------------------------------------------------------------------
    def send_checkpoint(self, checkpoint: Checkpoint, session: Session, request_id: str, *,
                        timeout: float = 60.0) -> OutgoingTransfer:
        """Ship ``checkpoint`` whole (KV of ``length`` tokens, states at ``length``) as one kvwire transfer."""
        if not checkpoint.has_state:
            raise KvwireError("a KV-only checkpoint cannot be moved for a prefill")
        length = checkpoint.length
        transfer = session.send(self.layout, RequestSpec(request_id, num_tokens=length, state_position=length),
                                timeout=timeout)
        try:
            for i, ts in enumerate(checkpoint.layers):
                if ts:
                    transfer.write_layer(i, ts)
            transfer.finish()
        except BaseException as exc:
            transfer.cancel(f"checkpoint send failed: {exc}")
            raise
        return transfer

    def expect_checkpoint(self, receiver: Receiver, request_id: str, prompt: Sequence[int], length: int, *,
                          timeout: float = 60.0, reserve: Reserve | None = None
                          ) -> tuple[IncomingTransfer, Checkpoint]:
        """Register tensors for a moved checkpoint of ``prompt[:length]``; the checkpoint is valid once the
        returned handle is done. ``reserve(nbytes)`` is called before they are allocated."""
        ids = self._check_prompt(prompt)
        if length < self.block_size or length % self.block_size or length > len(ids) - 1:
            raise LayoutError(f"reuse length {length} must be a multiple of {self.block_size} in "
                              f"[{self.block_size}, {len(ids) - 1}]")
        tensors = self._alloc(RequestSpec(request_id, num_tokens=length, state_position=length), reserve)
        handle = receiver.expect(request_id, tensors, layout=self.layout, state_position=length, timeout=timeout)
        it = iter(tensors)
        layers = [[next(it) for c in spec.caches for _ in c.tensors] for spec in self.layout.layers]
        return handle, Checkpoint(block_keys(ids[:length], self.block_size)[-1], length, layers, list(self.kv_layers))

    def forward_tokens(self, ids: Sequence[int], *, chunked: bool = False, split_at: Sequence[int] = ()) -> Any:
        """Run ``ids`` through a fresh cache: one forward, forwards split at ``split_at``, or (``chunked``) the
        node's block-aligned chunks; returns the last logits. For profiling and benchmarks: nothing is kept."""
        tokens = [int(t) for t in ids]
        if chunked:
            spans = self._chunks(0, len(tokens))
        else:
            cuts = [0, *sorted(c for c in set(split_at) if 0 < c < len(tokens)), len(tokens)]
            spans = list(zip(cuts, cuts[1:]))
        cache = self._new_cache()
        with self.lock:
            logits = None
            for a, e in spans:
                logits = self._forward(tokens[a:e], cache)
        return logits

    # -- reference -------------------------------------------------------------------------------------
    def reference(self, prompt: Sequence[int], max_tokens: int, *, stop: Sequence[int] = ()) -> list[int]:
        """The single-process greedy run the deployment must reproduce (same chunks, same N-1 feed)."""
        import torch

        ids = self._check_prompt(prompt)
        cache = self._new_cache()
        out: list[int] = []
        with self.lock:
            for a, e in self._chunks(0, len(ids) - 1):
                self._forward(ids[a:e], cache)
            tok = ids[-1]
            for _ in range(max_tokens):
                tok = int(torch.argmax(self._forward([tok], cache), dim=-1))
                out.append(tok)
                if tok in stop:
                    break
        return out


class _Streamer:
    """Forward hooks over the decoder layers: when layer ``i`` returns, its cache (KV from ``send_from``, states)
    goes to the transfer while layer ``i + 1`` computes."""

    def __init__(self, runner: TransformersRunner, transfer: OutgoingTransfer, cache: Any, send_from: int) -> None:
        self.runner, self.transfer, self.cache, self.send_from = runner, transfer, cache, send_from
        self.written: list[int] = []
        self._handles: list[Any] = []

    def __enter__(self) -> _Streamer:
        for i, module in enumerate(self.runner.decoder_layers):
            if self.runner.layout.layers[i].caches:
                self._handles.append(module.register_forward_hook(self._hook(i)))
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        if exc[1] is None:
            self.transfer.finish()

    def _hook(self, i: int) -> Any:
        def hook(module: Any, args: Any, output: Any) -> None:
            self.write(i)

        return hook

    def write(self, i: int) -> None:
        from ..adapters.transformers import layer_tensors

        spec = self.runner.layout.layers[i].caches
        ts = layer_tensors(self.cache.layers[i], spec)
        if self.runner.kv_layers[i] and self.send_from:
            ts = [t[:, :, self.send_from:].contiguous() for t in ts]
        self.transfer.write_layer(i, [t if t.is_contiguous() else t.contiguous() for t in ts])
        self.written.append(i)

    def write_all(self) -> None:
        for i, spec in enumerate(self.runner.layout.layers):
            if spec.caches:
                self.write(i)
        self.transfer.finish()
