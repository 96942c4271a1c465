"""One side of the two-process HF adapter test: a long-lived prefill or decode process driven by JSON lines.

    hf_peer.py decode          -> prints {"port": P}; then per line: expect / decode
    hf_peer.py prefill PORT    -> prints {"ok": true}; then per line: prefill

Both build the same seeded tiny models (tests/hf_tiny.py) on one CPU thread, so the prefill here and the
decode side's own reference prefill compute bit-identical caches. Nothing but JSON crosses the pipes; the
cache crosses through kvwire.
"""

from __future__ import annotations

import copy
import json
import sys
import time
from typing import Any

import torch
from hf_tiny import prompt, tiny_model

import kvwire
from kvwire.adapters import StatePolicy
from kvwire.adapters.transformers import IncomingCache, cache_kwargs, expect_cache, send_prefill

KEY = b"hf-two-process"
_models: dict[str, Any] = {}


def model(name: str) -> Any:
    if name not in _models:
        _models[name] = tiny_model(name)
    return _models[name]


def reply(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def greedy(m: Any, cache: Any, first: Any, steps: int) -> tuple[Any, list[int]]:
    tok, logits, tokens = first, [], []
    with torch.no_grad():
        for _ in range(steps):
            out = m(tok, use_cache=True, **cache_kwargs(m, cache)).logits[:, -1].float()
            tok = out.argmax(-1, keepdim=True)
            logits.append(out)
            tokens.append(int(tok))
    return torch.cat(logits), tokens


def layer_tensors(layer: Any) -> list[Any]:
    out = []
    if getattr(layer, "keys", None) is not None and layer.keys.numel():
        out += [layer.keys, layer.values]
    if getattr(layer, "conv_states", {}).get(0) is not None:
        out += [layer.conv_states[0], layer.recurrent_states[0]]
    return out


def negative_control(cache: Any) -> tuple[Any, str]:
    """A deep copy of ``cache`` with one layer's recurrent state zeroed (K of layer 0 for attention-only)."""
    ctl = copy.deepcopy(cache)
    for i, layer in enumerate(ctl.layers):
        if getattr(layer, "recurrent_states", {}).get(0) is not None:
            layer.recurrent_states[0].zero_()
            return ctl, f"layer {i} recurrent state zeroed"
    ctl.layers[0].keys.zero_()
    return ctl, "layer 0 K zeroed"


def decode_side() -> None:
    rx = kvwire.Receiver("127.0.0.1", 0, key=KEY, peer_timeout=30.0)
    reply({"port": rx.address[1]})
    pending: dict[str, tuple[IncomingCache, dict[str, Any]]] = {}
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["cmd"] == "expect":
            m = model(cmd["model"])
            pending[cmd["rid"]] = (expect_cache(rx, m, cmd["rid"], cmd["n"], policy=cmd["policy"], timeout=120), cmd)
            reply({"ok": True})
        elif cmd["cmd"] == "decode":
            incoming, req = pending.pop(cmd["rid"])
            m, ids, policy = model(req["model"]), prompt(req["n"]), StatePolicy.parse(req["policy"])
            cache = incoming.cache(60)
            layer_times = incoming.layer_times
            s = policy.prefill_tokens(req["n"])
            ref = type(cache)(config=m.config)  # the same split in this one process
            with torch.no_grad():
                ref_logits = m(ids[:, :s], use_cache=True, **cache_kwargs(m, ref)).logits[:, -1]
            got = [t for layer in cache.layers for t in layer_tensors(layer)]
            want = [t for layer in ref.layers for t in layer_tensors(layer)]
            bytes_equal = len(got) == len(want) and all(torch.equal(a, b) for a, b in zip(got, want))
            ref_first = int(ref_logits.argmax(-1))
            first = ids[:, s:s + 1] if policy is StatePolicy.N_MINUS_1 else torch.tensor([[cmd["first_token"]]])
            control, what = negative_control(cache)
            steps = cmd["steps"]
            rx_logits, rx_tokens = greedy(m, cache, first, steps)
            ref_logits_all, ref_tokens = greedy(m, ref, first, steps)
            ctl_logits, ctl_tokens = greedy(m, control, first, steps)
            reply({"bytes_equal": bytes_equal, "ref_first": ref_first, "tensors": len(got),
                   "max_diff": float((rx_logits - ref_logits_all).abs().max()),
                   "tokens": rx_tokens, "ref_tokens": ref_tokens, "ctl_tokens": ctl_tokens, "control": what,
                   "ctl_diff": float((ctl_logits - ref_logits_all).abs().max()),
                   "layer_times": {str(k): v for k, v in layer_times.items()}})


def prefill_side(port: int) -> None:
    session = kvwire.connect("127.0.0.1", port, lanes=2, key=KEY, peer_timeout=30.0)
    reply({"ok": True})
    for line in sys.stdin:
        cmd = json.loads(line)
        m, ids = model(cmd["model"]), prompt(cmd["n"])
        start = time.monotonic()
        pf = send_prefill(m, ids, session, cmd["rid"], policy=cmd["policy"])
        forward_end = time.monotonic()
        pf.result(60)
        reply({"first_token": int(pf.logits.argmax(-1)), "layers_written": pf.stream.layers_written,
               "copies": pf.stream.copies, "forward_start": start, "forward_end": forward_end})


if __name__ == "__main__":
    torch.set_num_threads(1)  # same reduction order in both processes
    if sys.argv[1] == "decode":
        decode_side()
    else:
        prefill_side(int(sys.argv[2]))
