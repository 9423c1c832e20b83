#!/usr/bin/env bash
# Issue 5's target 5 on a lent GPU machine: ResNeXt-50 and ResNet-50, ours against timm's and
# torchvision's, inference and training, bf16 + channels_last (`resnext bench gpu`). The package
# runs from src/ without installing (that machine has torch, torchvision and timm). Three short
# runs, each writing its own JSON, so that a time limit loses at most the last one; a run that
# fails does not stop the next (the exit status says whether all three passed).
#   RESNEXT_GIT_COMMIT=<commit> bash benchmarks/gpu_device_run.sh [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-benchmarks/results}}"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
python="${PYTHON:-python}"
failed=0
bench() { "$python" benchmarks/bench_gpu.py --allocator none --out "$out" "$@" || failed=1; }

nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit --format=csv || true
"$python" -c 'import torch, timm, torchvision; print(torch.__version__, timm.__version__, torchvision.__version__)' || true
# 1. every library the same way, nothing compiled: the like-for-like comparison, and quick
bench --variants infer-ours-eager,infer-timm-eager,infer-torchvision-eager,train-ours-eager,train-timm-eager,train-torchvision-eager
# 2. inference compiled: `optimize` (BN folded, frozen inductor graph) against timm compiled
bench --variants infer-ours-optimize,infer-timm-compile,infer-ours-eager
# 3. training compiled, ours and timm's
bench --variants train-ours-compile,train-timm-compile --rounds 3
exit $failed
