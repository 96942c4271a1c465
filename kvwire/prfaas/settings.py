"""The front door's settings: the ``[router]`` table of the deployment config, validated.

Owns: the keys of ``[router]`` (listen address, threshold, control-loop periods, timeouts, bounds on requests,
the long loop's planning inputs) and their typed errors. Must not know: HTTP, nodes' protocol, routing.

    [router]
    host = "127.0.0.1"
    port = 18000
    t_star = 48          # planned threshold, tokens (prompts longer than this prefill on PrfaaS)
    poll_s = 0.2         # short loop: read every node's /health and the PrfaaS nodes' /link this often
    use_link = true      # false: the short loop ignores /link (loopback: microsecond RTTs read as queueing)
    replan_s = 0         # long loop period (0: off): re-plan t* and the local prefill/decode split, convert
    profile = ""         # a ServedProfile JSON to plan with; empty: the prefill times, cache sizes and
                         # decode steps measured from the running deployment (kvwire.prfaas.observed)
    decode_batch = 8     # the planner's decode profile: sequences per decode node, output tokens each
    decode_l_out = 32
    limit_concurrency = 256  # connections and requests served at once; past it a 503 (LIMIT_CONCURRENCY)
    [router.loop]        # RouterConfig fields (hold_s, cooldown_s, high_util, queue_high, ...)
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .config import MAX_OUTPUT_TOKENS, MAX_PROMPT_TOKENS, ConfigError
from .router import RouterConfig

#: the front door's default ``limit_concurrency``: connections uvicorn holds open and requests it serves at
#: once; past it each new request is a 503 at once, its connection closed (before: no bound but the process's
#: descriptor limit). Each completion in flight holds its client's connection and up to two node connections (a
#: prefill, then the decode stream): 256 (the waiting connections, ``httpgate.MAX_WAITING``, counted in) keep
#: the front door within the usual 1024-descriptor soft limit, as the nodes' 256 (``node.LIMIT_CONCURRENCY``)
LIMIT_CONCURRENCY = 256


@dataclass(frozen=True)
class FrontSettings:
    host: str = "127.0.0.1"
    port: int = 18000
    t_star: float = 48.0
    poll_s: float = 0.2
    use_link: bool = True  # feed the PrfaaS nodes' egress LinkState to the short loop (off: queue depth only)
    node_timeout_s: float = 2.0  # one control call (health, link, expect, cancel)
    prefill_timeout_s: float = 60.0  # a whole prefill incl. its transfer
    first_token_timeout_s: float = 60.0
    unhealthy_after: int = 1  # failed health polls before a node is taken out
    replan_s: float = 0.0
    profile: str = ""
    decode_t_step_s: float = 0.01  # the long loop's decode profile: step time, batch, output length
    decode_batch: int = 8
    decode_l_out: int = 32
    egress_gbps: float = 1.0  # PrfaaS egress the long loop plans with when no link capacity is known
    max_prompt_tokens: int = MAX_PROMPT_TOKENS  # every node refuses more too (config.request_limits)
    max_output_tokens: int = MAX_OUTPUT_TOKENS
    limit_concurrency: int = LIMIT_CONCURRENCY  # connections and requests served at once (uvicorn's; 503 beyond)
    loop: RouterConfig = field(default_factory=RouterConfig)

    @staticmethod
    def from_table(table: Mapping[str, Any]) -> FrontSettings:
        known = {f.name: f for f in dataclasses.fields(FrontSettings)}
        unknown = sorted(set(table) - set(known))
        if unknown:
            raise ConfigError(f"[router]: unknown keys {unknown} (allowed: {sorted(known)})")
        kw: dict[str, Any] = {}
        for key, value in table.items():
            if key == "loop":
                kw[key] = _loop(value)
                continue
            want = type(getattr(FrontSettings(), key))
            if want is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            if isinstance(value, bool) != (want is bool) or not isinstance(value, want):
                raise ConfigError(f"[router].{key}: expected {want.__name__}, got {value!r}")
            kw[key] = value
        s = FrontSettings(**kw)
        if not 0 < s.port < 65536 or s.poll_s <= 0 or s.node_timeout_s <= 0 or s.prefill_timeout_s <= 0:
            raise ConfigError("[router]: need a TCP port, poll_s > 0 and positive timeouts")
        if s.limit_concurrency < 1:
            raise ConfigError(f"[router].limit_concurrency: need >= 1, got {s.limit_concurrency}")
        if s.t_star < 0 or s.replan_s < 0 or s.max_prompt_tokens < 2 or s.max_output_tokens < 1:
            raise ConfigError("[router]: need t_star >= 0, replan_s >= 0, max_prompt_tokens >= 2, "
                              "max_output_tokens >= 1")
        return s


def _loop(value: Any) -> RouterConfig:
    if not isinstance(value, Mapping):
        raise ConfigError("[router.loop]: a table is needed")
    names = {f.name for f in dataclasses.fields(RouterConfig)}
    unknown = sorted(set(value) - names)
    if unknown:
        raise ConfigError(f"[router.loop]: unknown keys {unknown} (allowed: {sorted(names)})")
    kw: dict[str, Any] = {k: (math.inf if v == "inf" else v) for k, v in value.items()}
    try:
        return RouterConfig(**kw)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"[router.loop]: {e}") from e
