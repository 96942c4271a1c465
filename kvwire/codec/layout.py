"""Cache layout descriptors: what one model instance caches, per layer, and what one request's payload is.

Owns: dtypes, cache kinds, tensor specs with explicit layout tags and TP sharding, the request
descriptor, the per-request segment list (the payload's byte layout on the wire), fingerprints, how a
conv state's channels split over TP ranks (``conv_rank_split``) and the bounds on every field of these:
one copy, checked where each is built, so a layout made in code is one the wire can carry. Must not
know: sockets, threads, clocks, torch, how HF configs are parsed (``hf.py`` builds layouts from configs)
or re-sharding plans (``reshard.py``); whether two layouts can exchange bytes is
``compat.check_compatible``, which knows both.

Wire form of a segment: one tensor of one layer, contiguous. Token-indexed tensors are token-major,
``(tokens, *per_token_shape)``, except K/V tagged ``HND``: ``(heads, tokens, dim)``; request-indexed
tensors are the state in their declared layout.
Gathering from paged engine storage into this form is the stager's job, not the codec's.
"""

from __future__ import annotations

import hashlib
import importlib
import operator
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import msgpack

from ..errors import LayoutError, StatePositionMismatch

DTYPE_SIZES: Mapping[str, int] = {
    "bfloat16": 2,
    "float16": 2,
    "float32": 4,
    "float8_e4m3fn": 1,
    "float8_e5m2": 1,
    "int8": 1,
    "uint8": 1,
}

TOKEN = "token"
REQUEST = "request"

#: cache kind -> (indexing of its tensors, group it belongs to)
CACHE_KINDS: Mapping[str, tuple[str, str]] = {
    "gqa": (TOKEN, "attn"),
    "mla": (TOKEN, "attn"),
    "swa": (TOKEN, "swa"),
    "gdn": (REQUEST, "state"),
    "kda": (REQUEST, "state"),
    "mamba1": (REQUEST, "state"),
    "mamba2": (REQUEST, "state"),
    "lightning": (REQUEST, "state"),
    # per-request engine metadata carried beside the cache (SGLang's first output token, logprobs, hidden
    # states: the "aux" rows a decode instance needs to continue)
    "aux": (REQUEST, "aux"),
}

#: Known layout tags. Token-indexed K/V travel NHD (tokens, heads, dim), or HND (heads, tokens, dim) where the
#: engine keeps them that way (transformers), so neither side copies; the tag is part of the fingerprint.
LAYOUT_TAGS = frozenset(
    {
        "NHD",  # token-indexed K or V: (tokens, heads, head_dim)
        "HND",  # token-indexed K or V: (heads, tokens, head_dim), HF DynamicCache order (batch 1)
        "latent",  # MLA: (tokens, kv_lora_rank + rope_dim)
        "conv:SD",  # (K-1, dim), dim contiguous (vLLM default, SGLang KDA)
        "conv:DS",  # (dim, K-1) (vLLM NIXL P/D, SGLang Mamba2/GDN)
        "conv:HF",  # (dim, K) full kernel width (HF transformers)
        "ssm:HVK",  # GDN/KDA recurrent (H, V, K): vLLM >= #33291, SGLang >= #20283
        "ssm:HKV",  # GDN/KDA recurrent (H, K, V): HF transformers, older engines
        "ssm:HPN",  # Mamba2 (heads, head_dim, d_state)
        "ssm:DN",  # Mamba1 (d_inner, d_state)
        "ssm:HDD",  # lightning / linear attention (heads, d, d)
        "raw",  # engine bytes kvwire does not interpret: (bytes,) per token or per request, uint8
    }
)

PAGE_LAYOUTS = frozenset({"block_major", "kv_major"})  # (num_blocks, 2, ...) vs (2, num_blocks, ...)


def dtype_size(dtype: str) -> int:
    try:
        return DTYPE_SIZES[dtype]
    except KeyError:
        raise LayoutError(f"unknown dtype {dtype!r}; known: {sorted(DTYPE_SIZES)}") from None


_MAX_DIM = 1 << 31  # no tensor dimension of a real cache comes near it; bounds nbytes of any wire layout
MAX_NAME = 256  # the longest layout or tensor name (characters)
MAX_CACHES = 4  # caches of one layer (Falcon-H1 has two)
MAX_CACHE_TENSORS = 16  # tensors of one cache
MAX_BLOCKS = 1 << 20  # block ids of one request, over its groups
_MAX_ID = (1 << 63) - 1  # a token count or block id: what a signed 64-bit engine index holds


# The rules below are the only copy: every dataclass checks its fields with them where it is built, so a
# layout built in code and one read off the wire (``from_list`` / ``from_dict`` only take the structure
# apart and call the constructors) are held to the same bounds.

def _bounded(what: str, v: Any, lo: int, hi: int) -> int:
    """``v`` if it is an exact int (not a bool, float or numpy scalar) in ``[lo, hi]``, else ``LayoutError``."""
    if type(v) is not int or not lo <= v <= hi:
        raise LayoutError(f"{what} must be an int in [{lo}, {hi}], got {v!r}")
    return v


def _text(what: str, v: Any, choices: Iterable[str] | None = None) -> str:
    """``v`` if it is a str of at most ``MAX_NAME`` characters (one of ``choices`` if given), else ``LayoutError``."""
    if type(v) is not str or len(v) > MAX_NAME:
        raise LayoutError(f"{what} must be a string of at most {MAX_NAME} characters, got {_short(v)}")
    if choices is not None and v not in choices:
        raise LayoutError(f"{what} must be one of {sorted(choices)}, got {v!r}")
    return v


def _items(what: str, v: Any, of: type, most: int) -> tuple[Any, ...]:
    """``v`` if it is a tuple of at most ``most`` instances of ``of``, else ``LayoutError``."""
    if type(v) is not tuple or len(v) > most or not all(isinstance(x, of) for x in v):
        raise LayoutError(f"{what} must be a tuple of at most {most} {of.__name__}, got {_short(v)}")
    return v


def _short(v: Any) -> str:
    r = repr(v)
    return f"{type(v).__name__} {r if len(r) <= 80 else r[:77] + '...'}"


def _prod(shape: Iterable[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


@dataclass(frozen=True)
class TensorSpec:
    """One cached tensor of one layer (per TP rank).

    ``shape`` is per token for token-indexed tensors and the whole per-request state otherwise.
    ``sub_projections`` lists the global channel split of a conv state (GDN ``[q|k|v]``, Mamba2
    ``[x|B|C]``); each part is TP-sharded separately.
    """

    name: str
    shape: tuple[int, ...]
    dtype: str
    layout: str
    indexing: str
    replicated: bool = False
    sub_projections: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        # what a layout on the wire may carry: a layout that could never be sent or whose fingerprint cannot
        # be packed is refused here, where it is built, and ``from_list`` refuses nothing else
        _text("tensor name", self.name)
        what = f"tensor {self.name!r}"
        dtype_size(_text(f"{what}: dtype", self.dtype))
        if _text(f"{what}: layout", self.layout) not in LAYOUT_TAGS:
            raise LayoutError(f"{what}: unknown layout tag {self.layout!r}")
        _text(f"{what}: indexing", self.indexing, (TOKEN, REQUEST))
        if type(self.replicated) is not bool:
            raise LayoutError(f"{what}: replicated must be a bool, got {_short(self.replicated)}")
        if (type(self.shape) is not tuple or not self.shape or len(self.shape) > 8
                or any(type(d) is not int or not 0 < d <= _MAX_DIM for d in self.shape)):
            raise LayoutError(f"{what}: shape must be 1 to 8 ints in [1, {_MAX_DIM}], "
                              f"got {_short(self.shape)}")
        if (type(self.sub_projections) is not tuple or len(self.sub_projections) > 8
                or any(type(d) is not int or not 0 <= d <= _MAX_DIM for d in self.sub_projections)):
            raise LayoutError(f"{what}: sub_projections must be up to 8 ints in [0, {_MAX_DIM}], "
                              f"got {_short(self.sub_projections)}")

    @property
    def itemsize(self) -> int:
        return DTYPE_SIZES[self.dtype]

    @property
    def nbytes(self) -> int:
        """Bytes per token (token-indexed) or per request (request-indexed)."""
        return _prod(self.shape) * self.itemsize

    def to_list(self) -> list[Any]:
        return [
            self.name,
            list(self.shape),
            self.dtype,
            self.layout,
            self.indexing,
            self.replicated,
            list(self.sub_projections),
        ]

    @classmethod
    def from_list(cls, v: Any) -> TensorSpec:
        if not isinstance(v, list) or len(v) != 7 or not isinstance(v[1], list) or not isinstance(v[6], list):
            raise LayoutError("tensor spec must be a 7-item list with shape and sub_projections lists")
        name, shape, dtype, layout, indexing, replicated, subs = v
        return cls(name, tuple(shape), dtype, layout, indexing, replicated, tuple(subs))


@dataclass(frozen=True)
class CacheSpec:
    """One cache of one layer: a kind and its tensors. SWA caches carry their window in tokens."""

    kind: str
    tensors: tuple[TensorSpec, ...]
    window: int = 0

    def __post_init__(self) -> None:
        _text("cache kind", self.kind, CACHE_KINDS)
        _bounded(f"{self.kind} cache window", self.window, 0, _MAX_DIM)
        if (self.kind == "swa") != (self.window > 0):
            raise LayoutError("a window is given for SWA caches and only for them")
        if not _items(f"{self.kind} cache tensors", self.tensors, TensorSpec, MAX_CACHE_TENSORS):
            raise LayoutError(f"{self.kind} cache has no tensors")
        indexing = CACHE_KINDS[self.kind][0]
        for t in self.tensors:
            if t.indexing != indexing:
                raise LayoutError(f"{self.kind} tensor {t.name!r} must be {indexing}-indexed")

    @property
    def indexing(self) -> str:
        return CACHE_KINDS[self.kind][0]

    @property
    def group(self) -> str:
        return CACHE_KINDS[self.kind][1]

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    def to_list(self) -> list[Any]:
        return [self.kind, self.window, [t.to_list() for t in self.tensors]]

    @classmethod
    def from_list(cls, v: Any) -> CacheSpec:
        if not isinstance(v, list) or len(v) != 3 or not isinstance(v[2], list):
            raise LayoutError("cache spec must be a 3-item list with a list of tensors")
        kind, window, tensors = v
        return cls(kind, tuple(TensorSpec.from_list(t) for t in tensors), window)


@dataclass(frozen=True)
class LayerSpec:
    """One decoder layer. ``caches`` is empty for cache-less layers (MLP/MoE), two for Falcon-H1."""

    index: int
    caches: tuple[CacheSpec, ...] = ()

    def __post_init__(self) -> None:
        _bounded("layer index", self.index, 0, _MAX_DIM)
        _items(f"layer {self.index} caches", self.caches, CacheSpec, MAX_CACHES)

    @property
    def kinds(self) -> tuple[str, ...]:
        return tuple(c.kind for c in self.caches)


@dataclass(frozen=True)
class ModelLayout:
    """The cache of one model instance (one TP rank): per layer, its caches and tensors.

    ``block_size`` is the engine's paged-attention block size in tokens (never assumed 16; see
    ``hf.hybrid_block_size``). It does not change the wire bytes, so it is not in the fingerprint.
    """

    name: str
    layers: tuple[LayerSpec, ...]
    block_size: int = 16
    tp_size: int = 1
    tp_rank: int = 0
    page_layout: str = "block_major"

    def __post_init__(self) -> None:
        _text("layout field 'name'", self.name)
        _bounded("layout field 'block_size'", self.block_size, 1, 1 << 20)
        _bounded("layout field 'tp_size'", self.tp_size, 1, 1 << 16)
        _bounded("layout field 'tp_rank'", self.tp_rank, 0, (1 << 16) - 1)
        if self.tp_rank >= self.tp_size:
            raise LayoutError(f"tp_rank {self.tp_rank} outside tp_size {self.tp_size}")
        _text("layout field 'page_layout'", self.page_layout, PAGE_LAYOUTS)
        # the layer count is the reader's limit (``from_dict``'s ``max_layers``), not the layout's
        if type(self.layers) is not tuple or not all(isinstance(x, LayerSpec) for x in self.layers):
            raise LayoutError(f"layout field 'layers' must be a tuple of LayerSpec, got {_short(self.layers)}")
        for i, layer in enumerate(self.layers):
            if layer.index != i:
                raise LayoutError(f"layer {i} carries index {layer.index}")

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def kv_bytes_per_token(self) -> int:
        """Token-indexed bytes per token over all layers (SWA included, unbounded by its window)."""
        return sum(c.nbytes for layer in self.layers for c in layer.caches if c.indexing == TOKEN)

    def state_bytes_per_request(self) -> int:
        return sum(c.nbytes for layer in self.layers for c in layer.caches if c.indexing == REQUEST)

    def layers_of(self, kind: str) -> list[int]:
        return [layer.index for layer in self.layers if kind in layer.kinds]

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "block_size": self.block_size,
            "tp_size": self.tp_size,
            "tp_rank": self.tp_rank,
            "page_layout": self.page_layout,
            "layers": [[c.to_list() for c in layer.caches] for layer in self.layers],
        }

    def num_tensors(self) -> int:
        """The tensors its caches have, over every layer."""
        return sum(len(c.tensors) for layer in self.layers for c in layer.caches)

    @classmethod
    def from_dict(cls, d: Any, max_layers: int = 1024, max_tensors: int = 1 << 16) -> ModelLayout:
        """Rebuild from ``to_dict`` output; validates everything (it may come from the network). At most
        ``max_layers`` layers and ``max_tensors`` tensors over them (counted before they are built)."""
        if not isinstance(d, dict):
            raise LayoutError("layout must be a map")
        layers = d.get("layers")
        if not isinstance(layers, list) or len(layers) > max_layers:
            raise LayoutError(f"layout needs a list of at most {max_layers} layers")
        built = []
        tensors = 0
        for i, caches in enumerate(layers):
            if not isinstance(caches, list):
                raise LayoutError(f"layer {i}: malformed caches")
            tensors += sum(len(c[2]) for c in caches if isinstance(c, list) and len(c) == 3 and isinstance(c[2], list))
            if tensors > max_tensors:
                raise LayoutError(f"layout has more than {max_tensors} tensors")
            built.append(LayerSpec(i, tuple(CacheSpec.from_list(c) for c in caches)))
        return cls(
            name=d.get("name", ""),
            layers=tuple(built),
            block_size=d.get("block_size", 16),
            tp_size=d.get("tp_size", 1),
            tp_rank=d.get("tp_rank", 0),
            page_layout=d.get("page_layout", "block_major"),
        )

    def fingerprint(self) -> bytes:
        """16 bytes naming everything that decides the meaning of the wire bytes."""
        canon = {
            "layers": self.to_dict()["layers"],
            "tp_size": self.tp_size,
            "tp_rank": self.tp_rank,
        }
        return hashlib.sha256(msgpack.packb(canon, use_bin_type=True)).digest()[:16]


def conv_rank_split(spec: TensorSpec, tp_size: int) -> tuple[int, ...]:
    """Channels each global sub-projection contributes to one rank's conv state, in order.

    Normally ``p // tp_size`` each. With Mamba2 groups padded up to TP the B and C parts hold a whole
    (replicated) group per rank, so they are larger than ``p // tp_size``; they are read off the shape.
    """
    if not spec.layout.startswith("conv:") or not spec.sub_projections:
        raise LayoutError(f"tensor {spec.name!r} is not a conv state with sub-projections")
    dim = spec.shape[1] if spec.layout == "conv:SD" else spec.shape[0]
    parts = spec.sub_projections
    if all(p % tp_size == 0 for p in parts) and sum(p // tp_size for p in parts) == dim:
        return tuple(p // tp_size for p in parts)
    if len(parts) == 3 and parts[1] == parts[2] and parts[0] % tp_size == 0:
        rest = dim - parts[0] // tp_size
        if rest > 0 and rest % 2 == 0 and rest // 2 >= parts[1] // tp_size:
            return (parts[0] // tp_size, rest // 2, rest // 2)
    raise LayoutError(f"conv dim {dim} does not split {parts} over tp_size={tp_size}")


#: the longest request id (characters) a ``RequestSpec`` takes, and so every end that checks one early
MAX_REQUEST_ID = 256


def utf8_text(text: str) -> bool:
    """``text`` encodes as UTF-8, as the wire carries every string (a lone surrogate, as ``surrogateescape``
    leaves of undecodable bytes, does not)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


@dataclass(frozen=True)
class RequestSpec:
    """One request's transfer: its tokens, the state's resume position and the receiver's prefix hits.

    ``state_position`` S is the number of tokens the state has absorbed (N or N-1, the engine's
    convention); token-indexed KV is shipped for tokens ``[hit, S)``. ``prefix_hit`` maps a group
    (``attn``, ``swa``) to tokens the receiver already holds. ``block_ids`` maps a group to the
    sender's block ids (informational; the receiver uses its own).
    """

    request_id: str
    num_tokens: int
    state_position: int
    prefix_hit: Mapping[str, int] = field(default_factory=dict)
    block_ids: Mapping[str, tuple[int, ...]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.request_id, str) or not 0 < len(self.request_id) <= MAX_REQUEST_ID:
            raise LayoutError(f"request_id must be a string of 1..{MAX_REQUEST_ID} characters")
        if not utf8_text(self.request_id):  # (the manifest could not carry it: send() failed past its checks)
            raise LayoutError(f"request_id {self.request_id!r} is not UTF-8 text (a lone surrogate)")
        for name in ("num_tokens", "state_position"):  # numpy/torch integers are ints; str, float, bool are not
            object.__setattr__(self, name, _integer(name, getattr(self, name)))
        if not 1 <= self.num_tokens <= _MAX_ID:
            raise LayoutError(f"num_tokens must be in [1, {_MAX_ID}] (a request of {self.num_tokens} tokens "
                              f"has no cache or no wire form)")
        if not 0 <= self.state_position <= self.num_tokens:
            raise LayoutError(
                f"need 0 <= state_position ({self.state_position}) <= num_tokens ({self.num_tokens})"
            )
        if not isinstance(self.prefix_hit, Mapping) or not isinstance(self.block_ids, Mapping):
            raise LayoutError("prefix_hit and block_ids must be maps")
        hits: dict[str, int] = {}
        for g, hit in self.prefix_hit.items():
            if g not in ("attn", "swa"):
                raise LayoutError(f"prefix hit group must be 'attn' or 'swa', got {_short(g)}")
            hits[g] = _integer(f"prefix hit {g}", hit)
            if not 0 <= hits[g] <= self.state_position:
                raise LayoutError(f"prefix hit {g}={hit} outside [0, state_position]")
        object.__setattr__(self, "prefix_hit", hits)
        groups = frozenset(g for _, g in CACHE_KINDS.values())
        blocks: dict[str, tuple[int, ...]] = {}
        total = 0
        for g, ids in self.block_ids.items():
            if g not in groups or not isinstance(ids, (list, tuple)):
                raise LayoutError(f"block_ids must map a group {sorted(groups)} to a list of block ids, "
                                  f"got {_short(g)}: {_short(ids)}")
            total += len(ids)
            if total > MAX_BLOCKS:
                raise LayoutError(f"a request has at most {MAX_BLOCKS} block ids")
            blocks[g] = tuple(_integer(f"block id of {g}", b) for b in ids)
            if not all(0 <= b <= _MAX_ID for b in blocks[g]):
                raise LayoutError(f"block ids of {g} must be in [0, {_MAX_ID}]")
        object.__setattr__(self, "block_ids", blocks)

    def to_dict(self) -> dict[str, Any]:
        return {
            "request_id": self.request_id,
            "num_tokens": self.num_tokens,
            "state_position": self.state_position,
            "prefix_hit": dict(self.prefix_hit),
            "block_ids": {k: list(v) for k, v in self.block_ids.items()},
        }

    @classmethod
    def from_dict(cls, d: Any) -> RequestSpec:
        """Rebuild from ``to_dict`` output (it may come from the network): the constructor checks every field."""
        if not isinstance(d, dict):
            raise LayoutError("request must be a map")
        try:
            return cls(d["request_id"], d["num_tokens"], d["state_position"], d.get("prefix_hit", {}),
                       d.get("block_ids", {}))
        except KeyError as e:
            raise LayoutError(f"malformed request: no {e}") from None


def check_state_position(request: RequestSpec, expected: int) -> None:
    """The receiver resumes at ``expected``; a state taken elsewhere would corrupt decoding."""
    if request.state_position != expected:
        raise StatePositionMismatch(
            f"request {request.request_id}: state taken after {request.state_position} tokens, "
            f"receiver resumes at {expected} (N vs N-1 convention mismatch?)"
        )


class Segment(NamedTuple):
    """One tensor of one layer in a request's payload: ``nbytes`` contiguous bytes on the wire.

    For token-indexed tensors ``token_start``/``token_count`` say which tokens it holds.
    """

    index: int  # type: ignore[assignment]  # shadows tuple.index on purpose: the segment number
    layer: int
    cache: int
    tensor: int
    name: str
    nbytes: int
    token_start: int = 0
    token_count: int = 0


def _integer(name: str, v: Any) -> int:
    """``v`` as a Python int if it is an integer of any kind (``operator.index``), else ``LayoutError``."""
    if isinstance(v, bool):
        raise LayoutError(f"{name} must be an int, got bool {v!r}")
    try:
        return operator.index(v)
    except TypeError:
        raise LayoutError(f"{name} must be an int, got {type(v).__name__} {v!r}") from None


def token_range(cache: CacheSpec, request: RequestSpec) -> tuple[int, int]:
    """Tokens ``[start, stop)`` of a token-indexed cache that the receiver lacks."""
    stop = request.state_position
    start = request.prefix_hit.get(cache.group, 0)
    if cache.kind == "swa":
        start = max(start, stop - (cache.window - 1))
    start = max(0, min(start, stop))
    return start, stop


def plan_segments(layout: ModelLayout, request: RequestSpec) -> list[Segment]:
    """The request's payload, layer by layer, in send order. Zero-byte tensors are left out."""
    if not isinstance(layout, ModelLayout):
        hint = " (pass kvwire.load_layout(name) for a preset)" if isinstance(layout, str) else ""
        raise TypeError(f"layout must be a ModelLayout, not {type(layout).__name__}{hint}")
    if not isinstance(request, RequestSpec):
        raise TypeError(f"request must be a RequestSpec, not {type(request).__name__}")
    out: list[Segment] = []
    for layer in layout.layers:
        for ci, cache in enumerate(layer.caches):
            if cache.indexing == TOKEN:
                start, stop = token_range(cache, request)
                for ti, t in enumerate(cache.tensors):
                    n = (stop - start) * t.nbytes
                    if n:
                        out.append(Segment(len(out), layer.index, ci, ti, f"{layer.index}.{cache.kind}.{t.name}",
                                           n, start, stop - start))
            else:
                for ti, t in enumerate(cache.tensors):
                    out.append(Segment(len(out), layer.index, ci, ti, f"{layer.index}.{cache.kind}.{t.name}",
                                       t.nbytes))
    return out


def payload_bounds(layout: ModelLayout, state_position: int | None = None
                   ) -> tuple[tuple[int, int], tuple[int, int | None]]:
    """What any request's payload on ``layout`` can be, whatever the sender's prefix hits: ``(min, max)``
    segment count and ``(min, max)`` bytes (max ``None`` when ``state_position`` is unknown). The
    smallest ships only the state; the largest every token up to ``state_position``."""
    state = [t.nbytes for layer in layout.layers for c in layer.caches if c.indexing == REQUEST for t in c.tensors]
    tokens = sum(len(c.tensors) for layer in layout.layers for c in layer.caches if c.indexing == TOKEN)
    if state_position is None:
        return (len(state), len(state) + tokens), (sum(state), None)
    full = plan_segments(layout, RequestSpec("bounds", max(state_position, 1), state_position))
    return (len(state), len(full)), (sum(state), sum(s.nbytes for s in full))


def __getattr__(name: str) -> Any:
    """``check_compatible`` moved up to ``compat`` (it needs re-sharding plans, which build on this module):
    resolved there with a DeprecationWarning, looked up by name so that this module never imports it."""
    if name == "check_compatible":
        warnings.warn("kvwire.codec.layout.check_compatible moved: use 'from kvwire.codec.compat import "
                      "check_compatible'", DeprecationWarning, stacklevel=2)
        return importlib.import_module("kvwire.codec.compat").check_compatible
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
