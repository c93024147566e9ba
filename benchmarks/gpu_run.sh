#!/usr/bin/env bash
# The prepared GPU run, in one command (a lent GPU's time is short and counted): whether the CUDA path computes
# what the CPU path does, and how fast the model and the engine run on the GPU:
#
#     bash benchmarks/gpu_run.sh [OUTDIR]        (OUTDIR defaults to $OUT, else /tmp/gpu-out)
#
# 1. machine facts; 2. benchmarks/model_gpu_check.py (writes the 20b-shaped checkpoint, CUDA vs CPU on a
# tiny checkpoint, packed memory, prefill and decode timings, then the same with experts dequantized at
# load); 3. benchmarks/engine_bench.py on that checkpoint (KV pool from free memory; the prefix cache, the
# 2k-token TTFT and the scheduler overhead first, then c = 16, 64 and the one-at-a-time baseline, the longest,
# last). Each step has its own time limit and its own log, so a step that fails or runs long still leaves the
# others' figures.
set -u
out=${1:-${OUT:-/tmp/gpu-out}}
work=${GPU_WORKDIR:-/tmp/gpu-check}
py=${PYTHON:-python3}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."
{
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    "$py" -c "import torch, safetensors; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'safetensors', safetensors.__version__)"
    echo "cpus: $(nproc)"
} 2>&1 | tee "$out/machine.txt"
SECONDS=0
timeout "${MODEL_LIMIT:-270}" "$py" benchmarks/model_gpu_check.py --workdir "$work" --device cuda \
    --dequantized-too 2>&1 | tee "$out/model_gpu_check.txt"
echo "model_gpu_check: exit ${PIPESTATUS[0]} after ${SECONDS} s" | tee -a "$out/model_gpu_check.txt"
SECONDS=0
timeout "${ENGINE_LIMIT:-240}" "$py" benchmarks/engine_bench.py --device cuda --preset 20b-shaped \
    --checkpoint "$work/20b" --latency-first --concurrency 16,64,1 2>&1 | tee "$out/engine_bench.txt"
echo "engine_bench: exit ${PIPESTATUS[0]} after ${SECONDS} s" | tee -a "$out/engine_bench.txt"
