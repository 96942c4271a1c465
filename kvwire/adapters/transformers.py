"""HF transformers adapter: stream a ``DynamicCache`` layer by layer while prefill runs; rebuild it on decode.

Owns: the mapping between a transformers 5.x ``DynamicCache`` (``DynamicLayer`` K/V ``(1, kv_heads, tokens,
head_dim)``, ``LinearAttentionLayer`` conv/recurrent states, ``LinearAttentionAndFullAttentionLayer`` with
both) and a kvwire layout built with ``engine="transformers"`` (tags ``HND``, ``conv:HF``, ``ssm:HKV`` /
``ssm:HPN`` / ``ssm:DN``), so both sides hand the transport the cache's own tensors, never a copy. Verified on
transformers ``VERIFIED_TRANSFORMERS``; caches and forward keywords are checked by their structure, not by
version (outside that range: ``UntestedTransformersWarning``, and ``LayoutMismatch`` where the structure differs):

- prefill: ``send_prefill`` (or ``PrefillStream`` around your own forward) puts a forward hook on every
  decoder layer; when layer *i* returns, its cache entry is complete and goes to ``write_layer(i, ...)`` as
  zero-copy views while layer *i+1* computes;
- decode: ``expect_cache`` allocates one tensor per segment, registers them with ``Receiver.expect``
  (layout and state position checked before a byte lands) and ``IncomingCache.cache()`` returns a
  ``DynamicCache`` whose tensors are those buffers, ready for ``generate(past_key_values=...)`` or a loop.

Which prompt tokens prefill computes and decode feeds is ``StatePolicy`` (N or N-1). Batch size 1: one
request is one sequence. Must not know: the transport's internals (public kvwire API only), other engines.
torch and transformers are imported when a function here is called, never by ``import kvwire.adapters``.
"""

from __future__ import annotations

import re
import threading
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .._args import check_wait_timeout
from ..codec.hf import layout_from_hf_config
from ..codec.layout import TOKEN, CacheSpec, ModelLayout, RequestSpec, plan_segments
from ..errors import KvwireError, LayoutError, LayoutMismatch, TransferCancelled, TransferError
from .positions import StatePolicy

if TYPE_CHECKING:

    from ..tcp import IncomingTransfer, OutgoingTransfer, Receiver, Session

__all__ = ["VERIFIED_TRANSFORMERS", "IncomingCache", "Prefill", "PrefillStream", "UntestedTransformersWarning",
           "build_cache", "cache_kwargs", "expect_cache", "hf_layout", "layer_tensors", "send_prefill"]

#: the transformers (major, minor) releases this adapter was run against, first and last (tests/test_adapter_hf*.py,
#: tests/test_hf_layouts.py and the README block on each); setup.py pins the same window
VERIFIED_TRANSFORMERS = ((5, 17), (5, 24))


class UntestedTransformersWarning(UserWarning):
    """The installed transformers lies outside ``VERIFIED_TRANSFORMERS``. The adapter still runs: every cache
    it touches is checked structurally and a cache that is not as expected raises ``LayoutMismatch``."""

#: layout tags the HF cache holds its tensors in, per tensor name
_HF_TAGS = {"k": ("HND",), "v": ("HND",), "conv": ("conv:HF",), "ssm": ("ssm:HKV", "ssm:HPN", "ssm:DN")}


def _verified_range() -> str:
    (a, b), (c, d) = VERIFIED_TRANSFORMERS
    return f"{a}.{b}-{c}.{d}"


def _version_note() -> str:
    """``transformers X, kvwire verified A-B``: the note error messages about a cache's structure carry."""
    import transformers

    return f"transformers {transformers.__version__}, kvwire verified {_verified_range()}"


def _check_transformers_version() -> None:
    """Warn (``UntestedTransformersWarning``, once per call site) when transformers is outside the verified range.

    A warning, not an error: the checks here are structural (a cache's tensors, a forward's keywords), so a
    newer release that keeps the structure works, and one that changes it fails with a ``LayoutMismatch``
    naming the version at the first layer, before a byte is sent.
    """
    import transformers

    version = str(transformers.__version__)
    m = re.match(r"(\d+)\.(\d+)", version)
    lo, hi = VERIFIED_TRANSFORMERS
    if m is None or not lo <= (int(m[1]), int(m[2])) <= hi:
        warnings.warn(f"transformers {version} is outside the range the kvwire HF adapter was verified on "
                      f"({_verified_range()}); a cache whose structure changed is refused with LayoutMismatch",
                      UntestedTransformersWarning, stacklevel=3)


def _dtype_name(dtype: Any) -> str:
    return str(dtype).removeprefix("torch.")


def hf_layout(model_or_config: Any, *, dtype: Any = None, ssm_dtype: str | None = None,
              name: str | None = None) -> ModelLayout:
    """The kvwire layout of a transformers model's ``DynamicCache`` (one sequence).

    ``model_or_config``: a ``PreTrainedModel`` (its config and dtype are used), a ``PretrainedConfig``, a
    config dict or a ``config.json`` path. ``dtype``: the model's dtype when no model is given (a config
    often carries none; a model built from it runs in float32). Recurrent states are float32 (transformers'
    PyTorch scans keep them so) unless ``ssm_dtype`` says otherwise.
    """
    config = getattr(model_or_config, "config", model_or_config)
    if dtype is None and hasattr(model_or_config, "config"):
        dtype = getattr(model_or_config, "dtype", None)
    return layout_from_hf_config(config, engine="transformers", model_dtype=None if dtype is None
                                 else _dtype_name(dtype), ssm_dtype=ssm_dtype, name=name)


def _check_hf_tags(layout: ModelLayout) -> None:
    for layer in layout.layers:
        for cache in layer.caches:
            if cache.kind not in ("gqa", "gdn", "mamba1", "mamba2"):
                raise LayoutMismatch(f"layer {layer.index}: the transformers adapter carries no {cache.kind} cache")
            for t in cache.tensors:
                if t.layout not in _HF_TAGS.get(t.name, ()):
                    raise LayoutMismatch(
                        f"layer {layer.index} {cache.kind}.{t.name}: a DynamicCache holds it as "
                        f"{_HF_TAGS.get(t.name)}, the layout says {t.layout} (build it with hf_layout or "
                        f"engine='transformers')")
                if t.replicated or layout.tp_size != 1:
                    raise LayoutMismatch("the transformers adapter moves unsharded caches (tp_size=1)")


def _shape(cache: CacheSpec, spec_shape: tuple[int, ...], tokens: int) -> tuple[int, ...]:
    """The tensor's shape in the DynamicCache, batch axis included."""
    if cache.indexing == TOKEN:
        heads, dim = spec_shape
        return (1, heads, tokens, dim)
    return (1, *spec_shape)


def _decoder_layers(model: Any, layout: ModelLayout) -> Sequence[Any]:
    base = getattr(model, "base_model", model)
    layers = getattr(base, "layers", None)
    if layers is None or len(layers) != layout.num_layers:
        got = "none" if layers is None else len(layers)
        raise LayoutMismatch(f"{type(model).__name__}: {got} decoder layers, the layout has {layout.num_layers}")
    return list(layers)


#: the forward keywords that take the cache, in preference order: ``cache`` (transformers >= 5.24, every
#: family), ``past_key_values`` (earlier 5.x), ``cache_params`` (Mamba/Mamba2 before the rename)
_CACHE_KEYWORDS = ("cache", "past_key_values", "cache_params")


def cache_kwargs(model: Any, cache: Any) -> dict[str, Any]:
    """``{keyword: cache}`` for ``model``'s forward, the keyword read off its signature (``_CACHE_KEYWORDS``).

    LayoutMismatch when the forward names none of them (passing the cache under a name the model ignores
    would leave it empty: the model would build its own).
    """
    import inspect

    params = inspect.signature(model.forward).parameters
    for name in _CACHE_KEYWORDS:
        if name in params:
            return {name: cache}
    raise LayoutMismatch(f"{type(model).__name__}.forward takes none of {_CACHE_KEYWORDS}: no cache to stream "
                         f"({_version_note()})")


def _new_cache(config: Any) -> Any:
    from transformers import DynamicCache

    return DynamicCache(config=config)


def layer_tensors(layer: Any, spec_caches: tuple[CacheSpec, ...]) -> list[Any]:
    """The cache's own tensors of one layer, in segment order (K, V, then conv, state)."""
    out: list[Any] = []
    for cache in spec_caches:
        if cache.indexing == TOKEN:
            keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
            if keys is None or values is None or keys.numel() == 0:
                raise LayoutMismatch(f"{type(layer).__name__} holds no K/V where the layout has {cache.kind} "
                                     f"({_version_note()})")
            out += [keys, values]
        else:
            conv = getattr(layer, "conv_states", {}).get(0)
            state = getattr(layer, "recurrent_states", {}).get(0)
            if conv is None or state is None or getattr(layer, "number_of_states", 1) != 1:
                raise LayoutMismatch(f"{type(layer).__name__} holds no single conv/recurrent state where the "
                                     f"layout has {cache.kind} ({_version_note()})")
            out += [conv, state]
    return out


class PrefillStream:
    """Hooks on a model's decoder layers that stream one prefill forward's cache into ``transfer``.

    Use as a context manager around exactly one forward that fills ``cache`` with ``state_position``
    tokens; ``finish()`` is called on a clean exit, ``cancel()`` on an exception. Tensors are sent
    zero-copy: leave the cache alone until ``transfer.result()`` returns (a further forward would change
    the recurrent states in place).
    """

    def __init__(self, model: Any, transfer: OutgoingTransfer, layout: ModelLayout, cache: Any) -> None:
        _check_transformers_version()
        _check_hf_tags(layout)
        self.model, self.transfer, self.layout, self.cache = model, transfer, layout, cache
        self.tokens = transfer.manifest.request.state_position
        self.layers_written: list[int] = []  # in the order the hooks wrote them
        self.copies = 0  # tensors that had to be made contiguous (0 for every family tested)
        self._modules = _decoder_layers(model, layout)
        self._handles: list[Any] = []
        with_bytes = {seg.layer for seg in plan_segments(layout, transfer.manifest.request)}
        self._pending = sorted(with_bytes)

    def __enter__(self) -> PrefillStream:
        for i, module in enumerate(self._modules):
            if self.layout.layers[i].caches:
                self._handles.append(module.register_forward_hook(self._hook(i)))
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        if exc is not None:
            self.transfer.cancel(f"prefill failed: {type(exc).__name__}: {exc}")
            return
        missing = [i for i in self._pending if i not in self.layers_written]
        if missing:
            self.transfer.cancel(f"prefill left layers {missing[:8]} unwritten")
            raise KvwireError(f"the forward never completed layers {missing[:8]} (one whole forward per stream)")
        self.transfer.finish()

    def _hook(self, i: int) -> Callable[..., None]:
        def hook(module: Any, args: Any, output: Any) -> None:
            self.write_layer(i)

        return hook

    def write_layer(self, i: int) -> None:
        """Hand layer ``i``'s cache tensors to the transfer (the hook calls this when the layer returns)."""
        if i in self.layers_written:
            raise KvwireError(f"layer {i} ran twice in one prefill stream (chunked prefill is not streamed)")
        spec = self.layout.layers[i].caches
        tensors = layer_tensors(self.cache.layers[i], spec)
        expected = [(_shape(c, t.shape, self.tokens), t.dtype) for c in spec for t in c.tensors]
        bufs = []
        for (shape, dtype), t in zip(expected, tensors):
            if tuple(t.shape) != shape or _dtype_name(t.dtype) != dtype:
                raise LayoutMismatch(f"layer {i}: cache tensor {tuple(t.shape)} {_dtype_name(t.dtype)}, the "
                                     f"layout needs {shape} {dtype}")
            if t.device.type != "cpu":
                raise LayoutMismatch(f"layer {i}: the transformers adapter sends CPU tensors (got {t.device}); "
                                     "stage GPU caches through kvwire.cuda")
            if not t.is_contiguous():
                t = t.contiguous()
                self.copies += 1
            bufs.append(t)
        self.transfer.write_layer(i, bufs)
        self.layers_written.append(i)


@dataclass
class Prefill:
    """What ``send_prefill`` returns: the forward's output, its cache and the transfer carrying it."""

    output: Any
    cache: Any
    transfer: OutgoingTransfer
    request: RequestSpec
    stream: PrefillStream

    @property
    def logits(self) -> Any:
        """Logits of the last prefilled token (under N they pick the first generated token)."""
        return self.output.logits[:, -1, :]

    def result(self, timeout: float | None = None) -> Any:
        """Wait until the receiver verified every byte; raises TransferFailed/TimedOut/Cancelled."""
        return self.transfer.result(timeout)


def send_prefill(model: Any, input_ids: Any, session: Session, request_id: str, *,
                 policy: StatePolicy | str = StatePolicy.N, layout: ModelLayout | None = None,
                 timeout: float | None = 300.0, hashing: bool | None = None) -> Prefill:
    """Run prefill on ``input_ids`` (shape ``(1, N)``) and stream its cache to the session's receiver.

    Prefill computes ``policy.prefill_tokens(N)`` tokens (N-1 under ``N_MINUS_1``). Returns once the forward
    is done; the transfer may still be in flight (``Prefill.result()`` waits for it).
    """
    import torch

    policy = StatePolicy.parse(policy)
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise LayoutError("input_ids must be a (1, N) tensor: one request is one sequence")
    n = int(input_ids.shape[1])
    s = policy.prefill_tokens(n)
    layout = layout if layout is not None else hf_layout(model)
    _check_hf_tags(layout)
    request = RequestSpec(request_id, num_tokens=n, state_position=s)
    cache = _new_cache(model.config)
    forward_cache = cache_kwargs(model, cache)  # a forward that takes no cache is refused before the send
    transfer = session.send(layout, request, timeout=timeout, hashing=hashing)
    try:
        stream = PrefillStream(model, transfer, layout, cache)
    except BaseException as e:
        transfer.cancel(f"prefill not started: {e}")
        raise
    with stream, torch.no_grad():
        output = model(input_ids[:, :s], use_cache=True, **forward_cache)
    return Prefill(output, cache, transfer, request, stream)


class IncomingCache:
    """The decode side of one request: destination tensors registered with the receiver, then a cache.

    ``cache()`` returns the ``DynamicCache`` once every byte is verified, or raises the transfer's typed
    error (``TransferFailed``/``TransferTimedOut``/``TransferCancelled``). When the transfer ends in any
    way but done, this object drops its destination tensors at once (no lane writes into them any more).
    """

    def __init__(self, model_config: Any, layout: ModelLayout, request: RequestSpec, tensors: list[Any],
                 transfer: IncomingTransfer) -> None:
        self.layout, self.request = layout, request
        self.feed: slice = slice(request.state_position, request.num_tokens)  # prompt tokens decode feeds first
        self._config = model_config
        self._lock = threading.Lock()
        self._tensors: list[Any] | None = tensors
        self._transfer: IncomingTransfer | None = transfer
        self._error: tuple[type[TransferError], str] | None = None
        self._cache: Any = None
        transfer.add_done_callback(self._on_done)

    @property
    def tensors(self) -> list[Any]:
        """The destination tensors, one per segment (empty once released)."""
        return list(self._tensors or [])

    @property
    def layer_times(self) -> dict[int, float]:
        """``time.monotonic()`` at which each layer was verified here (empty once released)."""
        t = self._transfer
        return dict(t.layer_times) if t is not None else {}

    @property
    def finished(self) -> bool:
        with self._lock:
            return self._transfer is None or self._transfer.finished

    def _on_done(self, fut: Any) -> None:
        exc = fut.exception()
        if exc is not None:
            self._release(exc)

    def _release(self, exc: BaseException) -> None:
        """Drop the tensors and the handle (the receiver resolves a failed handle only once no lane writes
        into it). Only the error's type and text are kept: the exception object's traceback would hold the
        handle, and through it the buffers."""
        with self._lock:
            if self._transfer is None:
                return
            kind = type(exc) if isinstance(exc, TransferError) else TransferCancelled
            self._error = (kind, str(exc))
            self._tensors, self._transfer = None, None

    def _failure(self) -> TransferError:
        assert self._error is not None
        kind, text = self._error
        return kind(text)

    def wait_layer(self, layer: int, timeout: float | None = None) -> None:
        """Return once ``layer`` is verified in its tensors (it may be read, not yet used for decode).
        ``timeout``: seconds (<= 0: no wait) or ``None``; ``TypeError``/``ValueError`` for a non-number, NaN or
        infinity, checked first."""
        timeout = check_wait_timeout("timeout", timeout)
        t = self._transfer
        if t is None:
            raise self._failure()
        t.wait_layer(layer, timeout)

    def cancel(self, reason: str = "cancelled by the decode side") -> None:
        """Give the request up: the sender is told, the tensors are released."""
        t = self._transfer
        if t is not None:
            t.cancel(reason)

    def cache(self, timeout: float | None = None) -> Any:
        """The received ``DynamicCache`` (built once). Builtin TimeoutError if this wait runs out first.
        ``timeout`` as ``wait_layer``'s."""
        timeout = check_wait_timeout("timeout", timeout)
        t = self._transfer
        if t is None:
            raise self._failure()
        failed = False
        try:
            t.result(timeout)
        except TransferError as e:
            self._release(e)
            failed = True
        if failed:
            del t  # the raised error's frame must not keep the buffers alive
            raise self._failure() from None
        with self._lock:
            if self._cache is None:
                self._cache = build_cache(self._config, self.layout, self._tensors or [])
            return self._cache


def expect_cache(receiver: Receiver, model: Any, request_id: str, num_prompt_tokens: int, *,
                 policy: StatePolicy | str = StatePolicy.N, layout: ModelLayout | None = None,
                 timeout: float | None = None) -> IncomingCache:
    """Register destination tensors for ``request_id`` with ``receiver`` (before the sender starts).

    ``model``: the decode model, or its ``PretrainedConfig`` (then pass ``layout=hf_layout(config,
    dtype=...)`` unless the config names the dtype the model runs in).

    A sender whose layout (dtype, tag, shape) or state position differs is refused before a byte lands.
    Under ``N`` decode feeds the first generated token next; under ``N_MINUS_1`` the last prompt token
    (``policy.decode_feed``).
    """
    import torch

    _check_transformers_version()
    policy = StatePolicy.parse(policy)
    s = policy.state_position(num_prompt_tokens)
    layout = layout if layout is not None else hf_layout(model)
    _check_hf_tags(layout)
    request = RequestSpec(request_id, num_tokens=num_prompt_tokens, state_position=s)
    tensors = []
    for seg in plan_segments(layout, request):
        cache = layout.layers[seg.layer].caches[seg.cache]
        spec = cache.tensors[seg.tensor]
        tensors.append(torch.empty(_shape(cache, spec.shape, s), dtype=getattr(torch, spec.dtype)))
    handle = receiver.expect(request_id, tensors, layout=layout, state_position=s, timeout=timeout)
    incoming = IncomingCache(getattr(model, "config", model), layout, request, tensors, handle)
    return incoming


def build_cache(config: Any, layout: ModelLayout, tensors: list[Any]) -> Any:
    """A DynamicCache for ``config`` whose layers hold ``tensors`` themselves (no copy)."""
    cache = _new_cache(config)
    if len(cache.layers) != layout.num_layers:
        raise LayoutMismatch(f"DynamicCache has {len(cache.layers)} layers, the layout {layout.num_layers}")
    it = iter(tensors)
    for spec, layer in zip(layout.layers, cache.layers):
        for c in spec.caches:
            if c.indexing == TOKEN:
                _set_kv(layer, next(it), next(it))
            else:
                _set_state(layer, next(it), next(it))
    return cache


def _set_kv(layer: Any, keys: Any, values: Any) -> None:
    if getattr(layer, "is_sliding", False) or not hasattr(layer, "lazy_initialization"):
        raise LayoutMismatch(f"{type(layer).__name__}: a full-attention layer was expected")
    layer.lazy_initialization(keys[:, :, :0], values[:, :, :0])  # sets dtype/device; allocates nothing
    layer.keys, layer.values = keys, values


def _set_state(layer: Any, conv: Any, state: Any) -> None:
    needed = ("conv_states", "recurrent_states", "is_conv_states_initialized", "is_recurrent_states_initialized",
              "has_previous_state", "conv_kernel_size")
    if any(not hasattr(layer, a) for a in needed) or getattr(layer, "number_of_states", 1) != 1:
        raise LayoutMismatch(f"{type(layer).__name__}: a linear-attention layer with one state was expected")
    layer.conv_states[0], layer.recurrent_states[0] = conv, state
    layer.is_conv_states_initialized[0] = layer.is_recurrent_states_initialized[0] = True
    layer.has_previous_state[0] = True
    layer.conv_kernel_size[0] = int(conv.shape[-1])
    if getattr(layer, "device", None) is None:
        layer.dtype, layer.device = conv.dtype, conv.device
