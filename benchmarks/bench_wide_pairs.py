"""bf16 inference with and without a pair-dot-product kernel for grouped 3×3s: the wide groups'
(16-64 channels per group, the default) or that of 8 channels per group (`--cpg 8`).

Usage: .venv/bin/python benchmarks/bench_wide_pairs.py [--models resnext50_32x4d]
           [--batch 16] [--rounds 9] [--cpg wide|8]

Two `optimize`d copies of each model (bf16, the compiled graph, every kernel choice made by
timing as users get it), one with the grouped layers of those widths offered the pair kernel
(`grouped_kernel.WIDE_PAIR_CPG`, or 8 in `NARROW_PAIR_CPG`), one without it, as before that
kernel. They run the batch, and then one image, in alternating rounds in one process; the
per-round time ratio is the measure, this machine being noisy.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

import bench_args
import resnext
from resnext.speed import grouped_kernel
from resnext.speed.allocator import keep_freed_memory
from resnext.speed.fastpath import default_example
from resnext.speed.provenance import write_results

# each kernel's table of channels per group in `grouped_kernel`, and that table without it
WITHOUT = {"wide": ("WIDE_PAIR_CPG", ()), "8": ("NARROW_PAIR_CPG", (4,))}


def build(
    name: str, examples: list[torch.Tensor], cpg: str, offered: bool
) -> tuple[list[Callable], list]:
    """`name` optimised for each example's shape, the `cpg` pair kernel offered or not; a runner
    per example and the grouped layers' choices at the first."""
    model = resnext.create_model(name).eval()
    table, without = WITHOUT[cpg]
    saved = getattr(grouped_kernel, table)
    setattr(grouped_kernel, table, saved if offered else without)
    try:
        fast = [resnext.optimize(model, torch.bfloat16, example_input=x) for x in examples]
    finally:
        setattr(grouped_kernel, table, saved)
    runners = []
    for module, x in zip(fast, examples, strict=True):

        def run(module: torch.nn.Module = module, x: torch.Tensor = x) -> object:
            with torch.no_grad():
                return module(x)

        runners.append(run)
    return runners, fast[0].grouped_choices


def alternate(runs: dict[str, Callable], rounds: int, calls: int) -> dict[str, list[float]]:
    """Seconds per call of each runner, `calls` a round (the median), the runners taking turns."""
    for run in runs.values():  # first calls: memory mapped in
        run()
    seconds: dict[str, list[float]] = {arm: [] for arm in runs}
    arms = list(runs)
    for r in range(rounds):
        for arm in arms if r % 2 == 0 else arms[::-1]:  # neither always follows the other
            run = runs[arm]
            times = []
            for _ in range(calls):
                start = time.perf_counter()
                run()
                times.append(time.perf_counter() - start)
            seconds[arm].append(statistics.median(times))
    return seconds


def main() -> int:
    parser = bench_args.parser(__doc__, models="resnext50_32x4d", batch=16, rounds=9)
    parser.add_argument("--cpg", choices=tuple(WITHOUT), default="wide")
    args = parser.parse_args()
    keep_freed_memory()
    reason = grouped_kernel.unavailable_reason(torch.bfloat16)
    if reason is not None or not grouped_kernel.takes_pairs(512, 32, torch.bfloat16):
        print(f"the bf16 pair kernel cannot run here: {reason or 'no AVX512-BF16 build'}")
        return 1
    results = {}
    for name in args.models.split(","):
        one = default_example(resnext.create_model(name))  # one image of its natural size
        examples = [one.expand(args.batch, -1, -1, -1).clone(), one]
        arms = {arm: build(name, examples, args.cpg, arm == "with") for arm in ("with", "without")}
        paired = {
            arm: [c.name for c in choices if c.chosen != "native" and "pairs" in c.variant]
            for arm, (_, choices) in arms.items()
        }
        out: dict[str, object] = {"layers_on_pairs_at_batch": paired}
        for i, label in enumerate((f"batch {args.batch}", "batch 1")):
            runs = {arm: runners[i] for arm, (runners, _) in arms.items()}
            seconds = alternate(runs, args.rounds, 3 if i == 0 else 10)
            ratios = [a / b for a, b in zip(seconds["without"], seconds["with"], strict=True)]
            out[label] = {
                "median_ms": {arm: 1e3 * statistics.median(s) for arm, s in seconds.items()},
                "rounds_ms": {arm: [1e3 * t for t in s] for arm, s in seconds.items()},
                "speedup_per_round_median": statistics.median(ratios),
                "rounds_won": sum(r > 1 for r in ratios),
            }
            medians = out[label]["median_ms"]
            print(
                f"{name} {label}: with {medians['with']:.1f} ms, without "
                f"{medians['without']:.1f} ms, speed-up per round {statistics.median(ratios):.3f} "
                f"(won {out[label]['rounds_won']} of {args.rounds})",
                flush=True,
            )
        results[name] = out
    path = write_results(args.out, "bench-wide-pairs", vars(args), {"models": results})
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
