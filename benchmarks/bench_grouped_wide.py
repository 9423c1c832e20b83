"""Training steps with and without our kernels for wide groups (16-64 channels per group).

Usage: .venv/bin/python benchmarks/bench_grouped_wide.py [--models resnext29_4x16d]
           [--batch 64] [--image-size 32] [--rounds 8] [--dtype fp32|bf16]

Two copies of each model take the CPU training fast path (grouped kernels, the 1×1 products
chosen per shape, and in bf16 the fused batch norm), in float32 or under bf16 autocast: in one
the grouped layers with 16, 32 or 64 channels per group get our kernels as candidates
(`grouped_wgrad.WIDE_CPG`: the AVX2 build's float32 weight gradient, the AVX512-BF16 pair
kernel's bf16 one), in the other they stay torch's convolution, as before those kernels (in
bf16 on a CPU with AMX, the AMX tile kernels, which take every width, stay in both). Their
SGD steps alternate in one process, in alternating order; the per-round time ratio is the
measure, this machine being noisy.
"""

from __future__ import annotations

import statistics
import time

import torch
from torch import nn

import bench_args
import resnext
from resnext.config import OptimConfig
from resnext.speed import autotune, grouped_kernel, grouped_wgrad
from resnext.speed.allocator import keep_freed_memory
from resnext.speed.grouped_train import TrainingGroupedConv2d
from resnext.speed.measure import median_ratio
from resnext.speed.provenance import write_results
from resnext.speed.train_paths import use_training_fast_paths
from resnext.train.optim import build_optimizer


def make_step(name: str, x: torch.Tensor, wide: bool, bf16: bool) -> tuple[object, int]:
    """One SGD step of `name` on the fast path (under bf16 autocast if `bf16`), wide groups taken
    or not; how many grouped layers took the fast path."""
    model = resnext.create_model(name).train().to(memory_format=torch.channels_last)
    saved = grouped_wgrad.WIDE_CPG
    grouped_wgrad.WIDE_CPG = saved if wide else ()
    try:
        use_training_fast_paths(
            model, fused_bn=bf16, grouped_kernels=True, gemm_weight_grad=True, fast_maxpool=bf16
        )
    finally:
        grouped_wgrad.WIDE_CPG = saved
    swapped = sum(isinstance(m, TrainingGroupedConv2d) for m in model.modules())
    y = torch.randint(0, model.num_classes, (x.shape[0],))
    opt = build_optimizer(model, OptimConfig(weight_decay=1e-4), lr=0.01)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()

    return step, swapped


def main() -> int:
    parser = bench_args.parser(__doc__, models="resnext29_4x16d", batch=64, image_size=32, rounds=8)
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    args = parser.parse_args()
    keep_freed_memory()
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    if grouped_wgrad.unavailable_reason(dtype) is not None:
        print(f"the grouped kernels cannot run here: {grouped_wgrad.unavailable_reason(dtype)}")
        return 1
    if not grouped_wgrad.wide_takes(dtype):
        print(
            f"--dtype {args.dtype}: this CPU's build ({grouped_kernel.ISA.name}) takes no wide "
            "groups in it (the AVX2 build takes float32, AVX512-BF16 CPUs bf16)"
        )
        return 1
    results = {}
    for name in args.models.split(","):
        x = torch.randn(args.batch, 3, args.image_size, args.image_size)
        x = x.contiguous(memory_format=torch.channels_last)
        steps = {
            arm: make_step(name, x, arm == "with", args.dtype == "bf16")
            for arm in ("with", "without")
        }
        for _ in range(3):  # first calls: the chooser's timing, memory mapped in
            for step, _ in steps.values():
                step()
        seconds: dict[str, list[float]] = {arm: [] for arm in steps}
        for r in range(args.rounds):
            # alternate which goes first: a fixed order can favour one of two equal steps
            for arm, (step, _) in list(steps.items())[:: 1 if r % 2 == 0 else -1]:
                start = time.perf_counter()
                step()
                seconds[arm].append(time.perf_counter() - start)
        results[name] = {
            "grouped_layers_taken": {arm: n for arm, (_, n) in steps.items()},
            "median_ms": {arm: 1e3 * statistics.median(s) for arm, s in seconds.items()},
            "rounds_ms": {arm: [1e3 * t for t in s] for arm, s in seconds.items()},
            "with_over_without_per_round_median": median_ratio(seconds["with"], seconds["without"]),
        }
        print(
            f"{name}: grouped layers taken {results[name]['grouped_layers_taken']}, median ms "
            f"{ {k: round(v, 1) for k, v in results[name]['median_ms'].items()} }, time with ÷ "
            f"without per round {results[name]['with_over_without_per_round_median']:.3f}",
            flush=True,
        )
    decisions = [d.as_dict() for d in autotune.decisions()]
    path = write_results(
        args.out, "bench-grouped-wide", vars(args), {"models": results, "autotune": decisions}
    )
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
