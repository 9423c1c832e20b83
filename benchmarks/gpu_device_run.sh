#!/usr/bin/env bash
# Issue 5's target 5 on a lent GPU machine: ResNeXt-50 and ResNet-50, ours against timm's and
# torchvision's, inference and training, bf16 + channels_last (`resnext bench gpu`). The package
# runs from src/ without installing (that machine has torch, torchvision and timm). Four short
# runs, each writing its own JSON and each under its own time limit, so that a slow compile loses
# at most that run; a run that fails does not stop the next (the exit status says whether all
# passed). The log goes to OUT_DIR/gpu_device_run.log as well.
#   RESNEXT_GIT_COMMIT=<commit> bash benchmarks/gpu_device_run.sh [OUT_DIR]
# Time limits per run in seconds (a lease is short): GPU_STEP_LIMITS="eager infer-compiled train-compiled ops".
# On an H200 (stop 34) the three took 61, 64 and 109 s (the last with two training compiles; the
# merged-groups variant adds a third); the fourth, a profile, is short. The defaults leave room,
# and a device call of 600 s holds all four.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-benchmarks/results}}"
mkdir -p "$out"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
python="${PYTHON:-$(command -v python3 || command -v python)}"
read -r limit_eager limit_infer limit_train limit_ops <<<"${GPU_STEP_LIMITS:-110 150 210 80}"
# extra options for every run, e.g. a smoke run here: "--device cpu --batch 2 --image-size 64"
extra="${GPU_BENCH_ARGS:-}"
# and for the profile (its own options), e.g. "--device cpu --batch 2 --image-size 32"
ops_extra="${GPU_OPS_ARGS:-}"
failed=0
# limited LIMIT SCRIPT ARGS...: one benchmark under its time limit; a failure is noted, not fatal
limited() {
  local limit=$1 script=$2
  shift 2
  echo "== $(date -u +%H:%M:%S) $script $* (limit ${limit} s)"
  timeout --kill-after=10 "$limit" "$python" "benchmarks/$script" --out "$out" "$@" ||
    { echo "== that run failed or ran out of time (status $?)"; failed=1; }
}
bench() {
  local limit=$1
  shift
  limited "$limit" bench_gpu.py --allocator none "$@" $extra
}

main() {
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit --format=csv || true
  "$python" -c 'import torch, timm, torchvision; print(torch.__version__, timm.__version__, torchvision.__version__)' || true
  # 1. every library the same way, nothing compiled: the like-for-like comparison, and quick
  bench "$limit_eager" --variants infer-ours-eager,infer-timm-eager,infer-torchvision-eager,train-ours-eager,train-timm-eager,train-torchvision-eager
  # 2. inference compiled: `optimize` (BN folded, frozen inductor graph) against timm compiled
  bench "$limit_infer" --variants infer-ours-optimize,infer-timm-compile,infer-ours-eager
  # 3. training compiled, ours (plain, and with grouped convolutions merged where faster) and
  # timm's, ResNeXt-50 only (each training compile takes ~45 s there)
  bench "$limit_train" --models resnext50_32x4d --variants train-ours-fast,train-ours-compile,train-timm-compile --rounds 3
  # 4. where ResNeXt-50's extra time over ResNet-50's goes, by kind of work (torch.profiler)
  limited "$limit_ops" bench_gpu_ops.py $ops_extra
  echo "== $(date -u +%H:%M:%S) done"
  return $failed
}
main 2>&1 | tee "$out/gpu_device_run.log"
