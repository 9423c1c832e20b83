"""Training batch norm + ReLU (+ residual add), forward and backward, per layer: torch against ours.

Usage: .venv/bin/python benchmarks/bench_fused_bn.py [--models resnext50_32x4d] [--batch 16]
           [--image-size 224] [--rounds 7] [--dtype fp32|bf16] [--against OLD.c] [--cold]

One forward of each model records every call its blocks make to a batch norm with its ReLU and
residual (shape, residual or not, ReLU or not). Each distinct call is then timed in `--dtype`
(float32, or bf16 activations as the autocast training step gives them), channels-last, forward +
backward: torch's `nn.BatchNorm2d` (+ add) (+ ReLU) against
`FusedBatchNorm2d` on this CPU's build of `kernels/bn_act*.c`, and with `--against` another
revision of that build's source (e.g. `git show REV:src/resnext/speed/kernels/bn_act_avx2.c >
/tmp/old.c`). Variants alternate in each round; per-layer medians, ratios, and the network's
total (each layer's median times its count) are recorded. `--cold` empties the caches before
each call: in the training step a batch norm's input is the fresh output of a convolution whose
operands have pushed it out of L2 (stop 39), and alone, repeated, it would sit in cache.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

import bench_args
import resnext
from resnext.speed import bn_kernel
from resnext.speed.allocator import keep_freed_memory
from resnext.speed.fused_bn import FusedBatchNorm2d, use_fused_batchnorm
from resnext.speed.measure import cache_evictor, interleaved
from resnext.speed.provenance import write_results

Call = tuple[tuple[int, ...], bool, bool]  # input shape, with a residual, with a ReLU


def recorded_calls(name: str, batch: int, size: int) -> Counter[Call]:
    """How many times one training forward of `name` calls each kind of fused batch norm."""
    model = resnext.create_model(name).train().to(memory_format=torch.channels_last)
    use_fused_batchnorm(model)
    calls: Counter[Call] = Counter()
    original = FusedBatchNorm2d.forward_act

    def spy(self, x, residual=None, relu=True):  # type: ignore[no-untyped-def]
        calls[(tuple(x.shape), residual is not None, relu)] += 1
        return original(self, x, residual, relu)

    FusedBatchNorm2d.forward_act = spy  # type: ignore[method-assign]
    try:
        x = torch.randn(batch, 3, size, size).contiguous(memory_format=torch.channels_last)
        with torch.no_grad():
            model(x)
    finally:
        FusedBatchNorm2d.forward_act = original  # type: ignore[method-assign]
    return calls


def timed_calls(
    call: Call, against: bn_kernel.Build | None, dtype: torch.dtype = torch.float32
) -> dict[str, object]:
    """One layer's forward + backward on `dtype` activations, each way, as argument-free
    callables."""
    shape, with_residual, relu = call

    def cl(t: torch.Tensor) -> torch.Tensor:
        return t.to(dtype).contiguous(memory_format=torch.channels_last)

    x = cl(torch.randn(shape)).requires_grad_()
    residual = cl(torch.randn(shape)) if with_residual else None
    grad = cl(torch.randn(shape))
    plain, fused = nn.BatchNorm2d(shape[1]), FusedBatchNorm2d(shape[1])
    ours = bn_kernel.BUILD

    def torch_way() -> None:
        y = plain(x)
        if residual is not None:
            y = y + residual
        (torch.relu(y) if relu else y).backward(grad)

    def fused_way(build: bn_kernel.Build):  # type: ignore[no-untyped-def]
        def run() -> None:
            bn_kernel.BUILD = build
            try:
                fused.forward_act(x, residual, relu).backward(grad)
            finally:
                bn_kernel.BUILD = ours

        return run

    ways = {"torch": torch_way, "ours": fused_way(ours)}
    if against is not None:
        ways["against"] = fused_way(against)
    return ways


def main() -> int:
    parser = bench_args.parser(
        __doc__, models="resnext50_32x4d", batch=16, image_size=224, rounds=7
    )
    parser.add_argument("--against", type=Path, help="another source of this CPU's build")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--cold", action="store_true", help="caches emptied before each call")
    args = parser.parse_args()
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    keep_freed_memory()
    if bn_kernel.unavailable_reason() is not None:
        print(f"the fused batch norm cannot run here: {bn_kernel.unavailable_reason()}")
        return 1
    against = None
    if args.against is not None and not args.against.is_file():
        print(f"--against {args.against}: no such file (expected a bn_act source to build)")
        return 1
    if args.against is not None:
        against = dataclasses.replace(
            bn_kernel.BUILD, name="against", source=args.against.resolve()
        )
        # else the fused module would fall back to torch's batch norm without a word
        problem = bn_kernel._library_problem(against)
        if problem is not None:
            print(f"--against {args.against}: {problem}")
            return 1
    with cache_evictor() as evict:
        results = run(args, dtype, against, evict if args.cold else None)
    config = {**vars(args), "against": str(args.against)}
    print(f"results: {write_results(args.out, 'bench-fused-bn', config, results)}")
    return 0


def run(
    args: argparse.Namespace,
    dtype: torch.dtype,
    against: bn_kernel.Build | None,
    before: Callable[[], object] | None,
) -> dict[str, object]:
    """Every model's batch norms timed each way; `before` (if any) runs ahead of each call."""
    results: dict[str, object] = {"build": bn_kernel.BUILD.name, "models": {}}
    for name in args.models.split(","):
        layers = []
        totals: Counter[str] = Counter()
        for call, count in sorted(recorded_calls(name, args.batch, args.image_size).items()):
            ways = timed_calls(call, against, dtype)
            runs = {way: (fn, 1) for way, fn in ways.items()}
            timings = interleaved(runs, rounds=args.rounds, iters=1, warmup=2, before=before)
            ms = {way: [1e3 * s for s in t.seconds] for way, t in timings.items()}
            median = {way: statistics.median(t) for way, t in ms.items()}
            speedup = statistics.median(t / o for t, o in zip(ms["torch"], ms["ours"], strict=True))
            for way, value in median.items():
                totals[way] += count * value
            shape, with_residual, relu = call
            layers.append(
                {
                    "shape": list(shape),
                    "residual": with_residual,
                    "relu": relu,
                    "count": count,
                    "median_ms": median,
                    "torch_over_ours_per_round": speedup,
                }
            )
            print(
                f"{name} {shape} residual={with_residual} relu={relu} ×{count}: "
                + ", ".join(f"{w} {v:.2f}" for w, v in median.items())
                + f" ms; ours {speedup:.2f}× torch",
                flush=True,
            )
        results["models"][name] = {"layers": layers, "network_ms": dict(totals)}
        print(
            f"{name}, all its batch norms once: "
            + ", ".join(f"{w} {v:.1f} ms" for w, v in totals.items())
            + f"; ours {totals['torch'] / totals['ours']:.2f}× torch"
        )
    return results


if __name__ == "__main__":
    raise SystemExit(main())
