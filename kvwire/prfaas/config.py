"""The PrfaaS deployment config: one TOML file every process of a deployment reads (nodes, router, launcher).

Owns: the file format, its validation (typed ``ConfigError`` naming the bad key) and the frozen dataclasses it
loads into. Sections:

- ``[model]``: the served model, so every node builds identical seeded weights. ``kind`` (``"qwen3_next"``),
  ``seed``, ``dtype`` (``"float32"``), ``hf``: a table of transformers config keywords laid over
  ``DEFAULT_HF`` (a small Qwen3-Next: gated-delta-rule layers interleaved 3:1 with full-attention GQA), and
  ``backend``: the nodes' engine, ``"transformers"`` (the in-process runner, default) or ``"vllm"`` (a vLLM
  engine with kvwire's connector; ``vllm_node``); a node's own ``backend`` key overrides it.
- ``[cache]``: ``block_size`` (tokens per prefix block; the router's index and the nodes' checkpoints use the
  same), ``store_bytes`` (each node's checkpoint store bound), ``pending_bytes`` (each node's bound on the
  cache buffers it holds for expected requests and prefix moves; absent: ``PENDING_PROMPTS`` caches of a
  ``max_prompt_tokens`` prompt), ``pending_requests`` (the most requests a decode node holds expected, from
  ``/expect`` until their ``/generate``: ``PENDING_REQUESTS``) and ``expect_timeout_s`` (an expected request
  whose ``/generate`` has not come this long after its ``/expect`` is dropped, its buffers freed:
  ``EXPECT_TIMEOUT_S``).
- ``[[nodes]]``: ``name``, ``cluster`` (``"prfaas"`` | ``"local"``), ``role`` (``"prefill"`` | ``"decode"``),
  ``host``, ``control_port``, ``data_port``; names and (host, port) pairs are unique.
- ``[router]`` and any other table: kept as plain dicts for their owner (``DeployConfig.router`` / ``extra``).
  The nodes read two of its keys too (``request_limits``): ``max_prompt_tokens`` and ``max_output_tokens``
  bound every request, at the front door and on each node's control API (which any key holder can call).

The shared key is not in the file: processes read ``KVWIRE_KEY`` from the environment.
Must not know: how nodes serve, how the router routes, or how the launcher starts processes.
Python 3.11+ reads TOML with ``tomllib``; on 3.10 the ``tomli`` backport (the ``prfaas`` extra) is used.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

CLUSTERS = ("prfaas", "local")
ROLES = ("prefill", "decode")
MODEL_KINDS = ("qwen3_next",)
BACKENDS = ("transformers", "vllm")

#: the default served model (5.5M parameters; a 512-token prefill ~0.1 s, a decode step ~6 ms on one core of
#: the 2-core CI machine): 8 layers (6 gated-delta-rule + 2 full attention, 3:1), dense MLPs, vocab 512,
#: initializer_range 0.5 so a perturbed state changes greedy tokens (see tests/hf_tiny.py)
DEFAULT_HF: Mapping[str, Any] = MappingProxyType(dict(
    vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=8, full_attention_interval=4,
    num_attention_heads=4, num_key_value_heads=2, head_dim=64, linear_num_key_heads=2, linear_num_value_heads=4,
    linear_key_head_dim=64, linear_value_head_dim=64, linear_conv_kernel_dim=4, num_experts=4,
    num_experts_per_tok=2, moe_intermediate_size=64, shared_expert_intermediate_size=64,
    mlp_only_layers=list(range(8)), max_position_embeddings=65536, initializer_range=0.5))


#: the longest prompt and the most output tokens one request may have (``[router]`` ``max_prompt_tokens`` /
#: ``max_output_tokens``): the front door and orchestrator refuse more, and so does every node's control API
MAX_PROMPT_TOKENS = 4096
MAX_OUTPUT_TOKENS = 1024
#: a node's default ``pending_bytes``: the caches of this many ``max_prompt_tokens`` prompts (the default
#: model: 32 x 8.4 MiB = 269 MiB at 4096 tokens; requests in flight on one decode node stay far below 32 on
#: a CPU deployment, and short prompts take a fraction of a max-size one's bytes)
PENDING_PROMPTS = 32
#: a decode node's default ``pending_requests``: an ``/expect`` past this many held is a 503, as one past
#: ``pending_bytes`` is (a vLLM node holds each one's prompt, 16 KiB at 4096 tokens: 16 MiB in all)
PENDING_REQUESTS = 1024
#: a node's default ``expect_timeout_s``: the router sends ``/generate`` right after ``/expect`` (it waits for
#: the cache there); a caller that prefills first takes at most the prefill's own bound (``prefill_timeout_s``,
#: 60 s) between them. One that never comes (a router that crashed after ``/expect``) frees its entry then.
EXPECT_TIMEOUT_S = 120.0


class ConfigError(ValueError):
    """The deployment config is missing a key, has one of the wrong type, or is inconsistent."""


@dataclass(frozen=True)
class ModelSpec:
    kind: str = "qwen3_next"
    seed: int = 0
    dtype: str = "float32"
    hf: Mapping[str, Any] = field(default_factory=lambda: dict(DEFAULT_HF))
    #: the linear layers' decay rates A (``A_log = log A``) are redrawn uniformly in this range: transformers'
    #: init draws A in [0.01, 16], which at these weights forgets the state within a few tokens (zeroing every
    #: recurrent state after 256 tokens left greedy tokens unchanged); small A keeps the state informative
    #: over hundreds of tokens, as in trained hybrid models' long-memory heads. None: keep the init.
    decay_range: tuple[float, float] | None = (0.0001, 0.005)
    backend: str = "transformers"  # the nodes' engine (BACKENDS); a node's own ``backend`` overrides it

    @property
    def vocab_size(self) -> int:
        return int(self.hf["vocab_size"])

    def hf_kwargs(self) -> dict[str, Any]:
        """The transformers config keywords (a fresh dict: callers may not change the spec)."""
        return {k: (list(v) if isinstance(v, list) else v) for k, v in self.hf.items()}


@dataclass(frozen=True)
class CacheConfig:
    block_size: int = 256
    store_bytes: int = 256 << 20
    pending_bytes: int | None = None  # None: PENDING_PROMPTS caches of a max_prompt_tokens prompt
    pending_requests: int = PENDING_REQUESTS  # requests a decode node holds expected (503 beyond)
    expect_timeout_s: float = EXPECT_TIMEOUT_S  # from /expect to /generate, or the entry is dropped


@dataclass(frozen=True)
class RequestLimits:
    """What one request may ask of a node: ``max_prompt_tokens`` (also capped by the model's
    ``max_position_embeddings``) and ``max_output_tokens``."""

    max_prompt_tokens: int = MAX_PROMPT_TOKENS
    max_output_tokens: int = MAX_OUTPUT_TOKENS


@dataclass(frozen=True)
class NodeSpec:
    name: str
    cluster: str
    role: str
    host: str
    control_port: int
    data_port: int
    backend: str | None = None  # None: the model's

    @property
    def control_url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.control_port}"


@dataclass(frozen=True)
class DeployConfig:
    model: ModelSpec
    cache: CacheConfig
    nodes: tuple[NodeSpec, ...]
    router: Mapping[str, Any] = field(default_factory=dict)
    extra: Mapping[str, Any] = field(default_factory=dict)  # other top-level tables, untouched
    path: str | None = None

    def node(self, name: str) -> NodeSpec:
        for n in self.nodes:
            if n.name == name:
                return n
        raise ConfigError(f"no node named {name!r} (nodes: {[n.name for n in self.nodes]})")

    def backend_of(self, name: str) -> str:
        """The engine node ``name`` runs: its own ``backend`` key, else ``[model].backend``."""
        return self.node(name).backend or self.model.backend

    def by(self, *, cluster: str | None = None, role: str | None = None) -> list[NodeSpec]:
        return [n for n in self.nodes if (cluster is None or n.cluster == cluster) and (role is None or n.role == role)]


def request_limits(config: DeployConfig) -> RequestLimits:
    """The request bounds every node enforces: ``[router]`` ``max_prompt_tokens`` / ``max_output_tokens``
    (the front door's, same defaults), the prompt also capped by ``[model.hf].max_position_embeddings``."""
    r = config.router
    prompt = _take(r, "max_prompt_tokens", int, "[router]", MAX_PROMPT_TOKENS)
    output = _take(r, "max_output_tokens", int, "[router]", MAX_OUTPUT_TOKENS)
    if prompt < 2 or output < 1:
        raise ConfigError("[router]: need max_prompt_tokens >= 2 and max_output_tokens >= 1")
    positions = config.model.hf.get("max_position_embeddings")
    if isinstance(positions, int) and not isinstance(positions, bool) and positions >= 2:
        prompt = min(prompt, positions)
    return RequestLimits(max_prompt_tokens=prompt, max_output_tokens=output)


def _take(table: Mapping[str, Any], key: str, kind: type | tuple[type, ...], where: str, default: Any = ...) -> Any:
    if key not in table:
        if default is ...:
            raise ConfigError(f"{where}: missing {key!r}")
        return default
    value = table[key]
    if isinstance(value, bool) and kind is not bool or not isinstance(value, kind):
        raise ConfigError(f"{where}.{key}: expected {kind}, got {type(value).__name__} {value!r}")
    return value


def _unknown(table: Mapping[str, Any], allowed: set[str], where: str) -> None:
    extra = sorted(set(table) - allowed)
    if extra:
        raise ConfigError(f"{where}: unknown keys {extra} (allowed: {sorted(allowed)})")


def _port(table: Mapping[str, Any], key: str, where: str) -> int:
    p = _take(table, key, int, where)
    if not 0 < p < 65536:
        raise ConfigError(f"{where}.{key}: {p} is not a TCP port")
    return int(p)


def _model(t: Mapping[str, Any]) -> ModelSpec:
    _unknown(t, {"kind", "seed", "dtype", "hf", "decay_range", "backend"}, "[model]")
    kind = _take(t, "kind", str, "[model]", "qwen3_next")
    if kind not in MODEL_KINDS:
        raise ConfigError(f"[model].kind: {kind!r} not in {MODEL_KINDS}")
    dtype = _take(t, "dtype", str, "[model]", "float32")
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ConfigError(f"[model].dtype: {dtype!r} not float32/bfloat16/float16")
    hf = {**DEFAULT_HF, **_take(t, "hf", dict, "[model]", {})}
    if not isinstance(hf.get("vocab_size"), int) or hf["vocab_size"] < 2:
        raise ConfigError("[model.hf].vocab_size must be an int >= 2")
    dr = _take(t, "decay_range", list, "[model]", [*ModelSpec.decay_range] if ModelSpec.decay_range else [])
    if dr and (len(dr) != 2 or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in dr)
               or not 0 < dr[0] <= dr[1]):
        raise ConfigError(f"[model].decay_range: need [lo, hi] with 0 < lo <= hi, got {dr!r}")
    return ModelSpec(kind=kind, seed=int(_take(t, "seed", int, "[model]", 0)), dtype=dtype, hf=hf,
                     decay_range=(float(dr[0]), float(dr[1])) if dr else None,
                     backend=_backend(t, "[model]", "transformers"))


def _backend(t: Mapping[str, Any], where: str, default: str | None) -> Any:
    b = _take(t, "backend", str, where, default)
    if b is not None and b not in BACKENDS:
        raise ConfigError(f"{where}.backend: {b!r} not in {BACKENDS}")
    return b


def _cache(t: Mapping[str, Any]) -> CacheConfig:
    _unknown(t, {"block_size", "store_bytes", "pending_bytes", "pending_requests", "expect_timeout_s"}, "[cache]")
    bs = _take(t, "block_size", int, "[cache]", CacheConfig.block_size)
    sb = _take(t, "store_bytes", int, "[cache]", CacheConfig.store_bytes)
    pb = _take(t, "pending_bytes", int, "[cache]", None)
    if bs < 1 or sb < 0 or (pb is not None and pb < 0):
        raise ConfigError("[cache]: need block_size >= 1, store_bytes >= 0 and pending_bytes >= 0")
    pr = _take(t, "pending_requests", int, "[cache]", PENDING_REQUESTS)
    if pr < 1:
        raise ConfigError(f"[cache].pending_requests: need >= 1, got {pr}")
    et = _take(t, "expect_timeout_s", (int, float), "[cache]", EXPECT_TIMEOUT_S)
    if not 0 < et < float("inf"):  # NaN too
        raise ConfigError(f"[cache].expect_timeout_s: need a finite number of seconds > 0, got {et!r}")
    return CacheConfig(block_size=bs, store_bytes=sb, pending_bytes=pb, pending_requests=pr,
                       expect_timeout_s=float(et))


def _nodes(items: Any) -> tuple[NodeSpec, ...]:
    if not isinstance(items, list) or not items:
        raise ConfigError("[[nodes]]: at least one node is needed")
    out: list[NodeSpec] = []
    for i, t in enumerate(items):
        where = f"[[nodes]][{i}]"
        if not isinstance(t, dict):
            raise ConfigError(f"{where}: a table is needed")
        _unknown(t, {"name", "cluster", "role", "host", "control_port", "data_port", "backend"}, where)
        n = NodeSpec(name=_take(t, "name", str, where), cluster=_take(t, "cluster", str, where),
                     role=_take(t, "role", str, where), host=_take(t, "host", str, where, "127.0.0.1"),
                     control_port=_port(t, "control_port", where), data_port=_port(t, "data_port", where),
                     backend=_backend(t, where, None))
        if n.cluster not in CLUSTERS:
            raise ConfigError(f"{where}.cluster: {n.cluster!r} not in {CLUSTERS}")
        if n.role not in ROLES:
            raise ConfigError(f"{where}.role: {n.role!r} not in {ROLES}")
        if n.cluster == "prfaas" and n.role != "prefill":
            raise ConfigError(f"{where}: PrfaaS nodes prefill only (role {n.role!r})")
        out.append(n)
    names = [n.name for n in out]
    if len(set(names)) != len(names):
        raise ConfigError(f"[[nodes]]: duplicate names in {names}")
    ports = [(n.host, p) for n in out for p in (n.control_port, n.data_port)]
    if len(set(ports)) != len(ports):
        raise ConfigError("[[nodes]]: a (host, port) pair is used twice")
    return tuple(out)


def from_dict(data: Mapping[str, Any], path: str | None = None) -> DeployConfig:
    """A ``DeployConfig`` from the parsed TOML document (or an equal dict built in code)."""
    if not isinstance(data, Mapping):
        raise ConfigError("the config must be a table")
    model = _model(_take(data, "model", dict, "config", {}))
    cache = _cache(_take(data, "cache", dict, "config", {}))
    nodes = _nodes(data.get("nodes"))
    router = dict(_take(data, "router", dict, "config", {}))
    extra = {k: v for k, v in data.items() if k not in ("model", "cache", "nodes", "router")}
    return DeployConfig(model=model, cache=cache, nodes=nodes, router=router, extra=extra, path=path)


def _toml() -> Any:
    if sys.version_info >= (3, 11):
        import tomllib

        return tomllib
    try:
        import tomli
    except ImportError as e:  # pragma: no cover - 3.10 without the extra
        raise ConfigError("reading the config on Python 3.10 needs tomli (pip install kvwire[prfaas])") from e
    return tomli


def load(path: str | os.PathLike[str]) -> DeployConfig:
    """Read and validate the deployment config at ``path`` (TOML)."""
    toml = _toml()
    try:
        with open(path, "rb") as f:
            data = toml.load(f)
    except OSError as e:
        raise ConfigError(f"cannot read config {os.fspath(path)!r}: {e}") from e
    except toml.TOMLDecodeError as e:
        raise ConfigError(f"{os.fspath(path)}: not valid TOML: {e}") from e
    return from_dict(data, path=os.fspath(path))


def to_toml(config: DeployConfig) -> str:
    """The config as TOML text ``load`` reads back equal (for launchers and tests that write one)."""
    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, str):
            return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(value(x) for x in v) + "]"
        raise ConfigError(f"cannot write {type(v).__name__} {v!r} to TOML")

    def table(name: str, t: Mapping[str, Any]) -> list[str]:
        plain = [f"{k} = {value(v)}" for k, v in t.items() if not isinstance(v, Mapping)]
        out = [f"[{name}]", *plain, ""]
        for k, v in t.items():
            if isinstance(v, Mapping):
                out += table(f"{name}.{k}", v)
        return out

    m = config.model
    lines = table("model", {"kind": m.kind, "seed": m.seed, "dtype": m.dtype, "backend": m.backend,
                            "decay_range": list(m.decay_range) if m.decay_range else [], "hf": dict(m.hf)})
    cache: dict[str, Any] = {"block_size": config.cache.block_size, "store_bytes": config.cache.store_bytes}
    if config.cache.pending_bytes is not None:
        cache["pending_bytes"] = config.cache.pending_bytes
    if config.cache.pending_requests != PENDING_REQUESTS:  # (defaults unwritten: vllm_node.model_dir's digest)
        cache["pending_requests"] = config.cache.pending_requests
    if config.cache.expect_timeout_s != EXPECT_TIMEOUT_S:
        cache["expect_timeout_s"] = config.cache.expect_timeout_s
    lines += table("cache", cache)
    for n in config.nodes:
        keys = ("name", "cluster", "role", "host", "control_port", "data_port") + (("backend",) if n.backend else ())
        lines += ["[[nodes]]", *(f"{k} = {value(getattr(n, k))}" for k in keys), ""]
    lines += table("router", config.router)
    for k, v in config.extra.items():
        if isinstance(v, Mapping):
            lines += table(k, v)
    return "\n".join(lines)
