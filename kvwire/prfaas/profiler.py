"""Measure a served model's PrfaaS profile on this machine: prefill time and kvwire's KV bytes vs length.

Owns: timing a torch model's prefill (one forward over the whole prompt with its cache on, inference
mode, the fastest of ``repeats`` runs after a warm-up: on a shared machine interference only adds time),
the bytes kvwire ships per request at each length (the model's ``ModelLayout``, exactly), a check that
this layout describes the timed model (its own cache must grow by the layout's bytes per token), and the
tiny hybrid model measured by default: Qwen3-Next-style, three gated-delta-rule layers (conv + recurrent
state) per full-attention GQA layer, built from config, seeded, CPU. Writes a ``ServedProfile`` (JSON)
that the planner reads.
Torch and transformers are imported lazily, here only. Must not know: the planner, routing, sockets.

    python -m kvwire.prfaas.profiler --out profile.json --lengths 128,256,512,1024,2048 [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from collections.abc import Sequence
from typing import Any

import kvwire

from ..codec.hf import layout_from_hf_config
from ..codec.layout import ModelLayout
from .profile import KvSize, PrefillProfile, ServedProfile

#: the default tiny hybrid: 4 layers, GDN:attention 3:1 (``full_attention_interval=4``), GQA 4:2
TINY_HYBRID: dict[str, Any] = dict(
    hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
    num_hidden_layers=4, head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16,
    linear_value_head_dim=24, linear_conv_kernel_dim=4, full_attention_interval=4, num_experts=4,
    num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=32, dtype="float32")


class LayoutMismatchError(ValueError):
    """The layout's bytes per token differ from how the model's own cache grows."""


def tiny_hybrid(seed: int = 0, **overrides: Any) -> tuple[Any, dict[str, Any]]:
    """(model, config dict): the default tiny hybrid model, the same weights for the same ``seed``."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model("qwen3_next", **{**TINY_HYBRID, **overrides})
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg).eval(), cfg.to_dict()


def layout_of(config: dict[str, Any]) -> ModelLayout:
    """kvwire's layout for a model config, with the cache in the model's own dtype."""
    dtype = str(config.get("dtype") or config.get("torch_dtype") or "bfloat16")
    return layout_from_hf_config(config, kv_dtype=dtype, ssm_dtype=dtype)


def payload_bytes(layout: ModelLayout, length: int) -> int:
    """What kvwire ships for one request of ``length`` prompt tokens (state after all of them)."""
    return sum(s.nbytes for s in kvwire.plan_segments(layout, kvwire.RequestSpec("p", length, length)))


def _prompt(length: int, vocab: int, seed: int) -> Any:
    import torch

    return torch.randint(0, vocab, (1, length), generator=torch.Generator().manual_seed(seed + length))


def _cache_bytes(cache: Any) -> int:
    """Bytes of every tensor the model's cache object holds (one level into each layer)."""
    import torch

    total = 0
    for layer in getattr(cache, "layers", [cache]):
        for v in vars(layer).values():
            items = v if isinstance(v, list | tuple) else [v]
            total += sum(t.numel() * t.element_size() for t in items if isinstance(t, torch.Tensor))
    return total


def prefill(model: Any, length: int, vocab: int, seed: int = 0) -> tuple[float, Any]:
    """(seconds, cache) of one prefill of a seeded random prompt."""
    import torch

    ids = _prompt(length, vocab, seed)
    with torch.inference_mode():
        t0 = time.perf_counter()
        out = model(ids, use_cache=True)
        return time.perf_counter() - t0, out.past_key_values


def check_layout(model: Any, layout: ModelLayout, vocab: int, lengths: tuple[int, int] = (16, 48)) -> float:
    """The model's cache growth per token (bytes); raises ``LayoutMismatchError`` unless it is the layout's."""
    (_, c1), (_, c2) = (prefill(model, n, vocab) for n in lengths)
    grow = (_cache_bytes(c2) - _cache_bytes(c1)) / (lengths[1] - lengths[0])
    if grow != layout.kv_bytes_per_token():
        raise LayoutMismatchError(f"the model's cache grows {grow:g} B/token, layout {layout.name} says "
                                  f"{layout.kv_bytes_per_token()}")
    return grow


def measure(model: Any, config: dict[str, Any], lengths: Sequence[int], repeats: int = 3, seed: int = 0,
            name: str | None = None) -> ServedProfile:
    """Time ``repeats`` prefills per length (after one warm-up) and keep the fastest; KV bytes from the layout."""
    import torch

    if len(lengths) < 2 or repeats < 1 or any(n < 1 for n in lengths):
        raise ValueError("need at least two lengths >= 1 and repeats >= 1")
    lengths = sorted(set(int(n) for n in lengths))
    layout = layout_of(config)
    vocab = int(config["vocab_size"])
    check_layout(model, layout, vocab)
    prefill(model, lengths[0], vocab, seed)  # warm-up: first-call allocations and lazy kernels
    seconds = []
    for n in lengths:
        runs = [prefill(model, n, vocab, seed + r)[0] for r in range(repeats)]
        seconds.append(min(runs))
    hardware = (f"{platform.machine()} {platform.processor() or platform.system()}, {os.cpu_count()} CPUs, "
                f"torch {torch.__version__} with {torch.get_num_threads()} threads")
    return ServedProfile(name or str(config.get("model_type")), hardware, PrefillProfile(lengths, seconds),
                         KvSize(lengths, [payload_bytes(layout, n) for n in lengths]),
                         {"repeats": repeats, "statistic": "min", "layout": layout.name,
                          "layers": layout.num_layers, "kv_bytes_per_token": layout.kv_bytes_per_token(),
                          "state_bytes_per_request": layout.state_bytes_per_request()})


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="where to write the profile (JSON)")
    ap.add_argument("--lengths", default="128,256,512,1024,2048")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    a = ap.parse_args(argv)
    if a.threads:
        import torch

        torch.set_num_threads(a.threads)
    model, config = tiny_hybrid(a.seed)
    prof = measure(model, config, [int(x) for x in a.lengths.split(",")], a.repeats, a.seed, "tiny-qwen3-next")
    prof.save(a.out)
    for n, s, b in zip(prof.prefill.lengths, prof.prefill.seconds, prof.kv.values):
        print(f"{int(n):>7} tokens  prefill {s * 1e3:8.1f} ms  KV {b / 1024:9.1f} KiB")
    print(f"wrote {a.out} ({prof.hardware})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
