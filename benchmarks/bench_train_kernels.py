"""The training step with and without some of our gradient kernels, side by side in one process.

Usage: .venv/bin/python benchmarks/bench_train_kernels.py [--models resnext50_32x4d,resnet50]
       [--batch 16] [--image-size 224] [--rounds 12] [--arms none,wgrads,all] [--margins 0.05,0]
Each model's fast training step (`cl-bf16-fused-grouped-gemm-pool`, random data) is built once
per arm from the same weights; each arm has its own kernel chooser (`resnext.speed.autotune`),
which never runs the kernels the arm leaves out:
  - none: without the AMX grouped weight gradient, the AMX 1×1 weight gradient and the stride-2
    grouped input gradients in phases (AMX's, and since stop 43 the vector kernels'): what the
    chooser offered before them;
  - wgrads: with the two weight gradients (on a CPU without AMX the same kernels as none: an
    A/A control of the noise);
  - all: with all three.
`--arms` runs some of them (in that order; the first is the baseline of the ratios).
The arms' steps then alternate, in one order on even rounds and the reverse on odd ones, so that
this machine's drifts of speed (tens of per cent within minutes) fall on all of them alike; the
median and best step of each arm and their ratios to `none` are reported. Separate processes
(`resnext bench train`) cannot resolve differences of a few per cent here.

With `--margins` the arms are instead choosers that keep every kernel and differ in their margin
(`autotune.Chooser(margin=…)`: how much faster than oneDNN a kernel must time to replace it),
named `margin=<value>`, the first the baseline of the ratios.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

import bench_args
import resnext
from resnext.speed import autotune
from resnext.speed.allocator import keep_freed_memory
from resnext.speed.measure import median_ratio
from resnext.speed.provenance import write_results
from resnext.speed.train_bench import make_step

VARIANT = "cl-bf16-fused-grouped-gemm-pool"
# each kernel left out: the chooser's (op, candidate) pairs it is
KERNELS = {
    "grouped-wgrad": (("grouped3x3.weight_grad", "ours-amx"),),
    "pointwise-wgrad": (("conv1x1.weight_grad", "ours-amx"),),
    "grouped-dgrad-s2": tuple(
        ("grouped3x3.input_grad", name)
        for name in ("ours-amx-phases", "ours-phases", "ours-pairs-phases")
    ),
}
ARMS = {
    "none": (),
    "wgrads": ("grouped-wgrad", "pointwise-wgrad"),
    "all": tuple(KERNELS),
}


def _chooser(kept: tuple[str, ...]) -> autotune.Chooser:
    """A chooser that never runs the kernels of KERNELS not in `kept`."""
    left_out = [pair for name, pairs in KERNELS.items() if name not in kept for pair in pairs]
    return autotune.Chooser(exclude=left_out)


def arm_names(text: str) -> list[str]:
    """`--arms`: one or more of ARMS, comma-separated, each once."""
    names = text.split(",")
    if len(set(names)) < len(names) or not set(names) <= set(ARMS):
        raise argparse.ArgumentTypeError(
            f"expected distinct names from {', '.join(ARMS)}, got {text!r}"
        )
    return names


def kernel_arms(names: list[str] | None = None) -> dict[str, autotune.Chooser]:
    """A chooser per entry of ARMS (or of `names`, in their order)."""
    return {arm: _chooser(ARMS[arm]) for arm in (names or list(ARMS))}


def margins(text: str) -> list[float]:
    """`--margins`: two or more distinct fractions in [0, 1), comma-separated."""
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected fractions like 0.05,0, got {text!r}") from None
    if len(values) < 2 or len(set(values)) < len(values) or not all(0 <= v < 1 for v in values):
        raise argparse.ArgumentTypeError(
            f"expected two or more distinct fractions in [0, 1), got {text!r}"
        )
    return values


def margin_arms(values: list[float]) -> dict[str, autotune.Chooser]:
    """An arm per margin, every kernel kept."""
    return {f"margin={v:g}": autotune.Chooser(margin=v) for v in values}


def run_arms(
    name: str, batch: int, image_size: int, rounds: int, choosers: dict[str, autotune.Chooser]
) -> dict[str, dict[str, object]]:
    """Median and best step time of each arm of model `name`, in alternating rounds; the first
    arm is the baseline of the ratios."""
    torch.manual_seed(0)
    x = torch.randn(batch, 3, image_size, image_size)
    y = torch.randint(0, 10, (batch,))
    base = resnext.create_model(name).train()
    arms = {
        arm: (make_step(copy.deepcopy(base), VARIANT, x, y), chooser)
        for arm, chooser in choosers.items()
    }
    previous = autotune.CHOOSER

    def step(arm: str) -> float:
        fn, chooser = arms[arm]
        autotune.CHOOSER = chooser
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    times: dict[str, list[float]] = {arm: [] for arm in arms}
    try:
        for arm in arms:  # first steps: the choosers time their candidates
            step(arm)
            step(arm)
        order = list(arms)
        for r in range(rounds):
            for arm in order if r % 2 == 0 else order[::-1]:
                times[arm].append(step(arm))
    finally:
        autotune.CHOOSER = previous
    first = next(iter(times))
    median0, best0 = statistics.median(times[first]), min(times[first])
    results = {}
    for arm, seconds in times.items():
        median, best = statistics.median(seconds), min(seconds)
        results[arm] = {
            "median_ms": 1e3 * median,
            "min_ms": 1e3 * best,
            "img_per_s": batch / median,
            "median_over_first": median / median0,
            "min_over_first": best / best0,
            # per round, this arm's step ÷ the first arm's in the same round
            "round_ratio_median": median_ratio(seconds, times[first]),
            "rounds_ms": [1e3 * s for s in seconds],
            "choices": [d.as_dict() for d in arms[arm][1].decisions()],
        }
    return results


def main() -> int:
    parser = bench_args.parser(
        __doc__, models="resnext50_32x4d,resnet50", batch=16, image_size=224, rounds=12
    )
    # one or the other: the margin arms keep every kernel, so --arms would be dropped unsaid
    arms = parser.add_mutually_exclusive_group()
    arms.add_argument(
        "--arms", type=arm_names, default=None, help=f"some of {', '.join(ARMS)} (default: all)"
    )
    arms.add_argument(
        "--margins", type=margins, default=None, help="arms by chooser margin instead, e.g. 0.05,0"
    )
    args = parser.parse_args()
    keep_freed_memory()  # as the CLI does: otherwise every step page-faults its activations
    results = {}
    for name in args.models.split(","):
        choosers = kernel_arms(args.arms) if args.margins is None else margin_arms(args.margins)
        results[name] = run_arms(name, args.batch, args.image_size, args.rounds, choosers)
        first = next(iter(choosers))
        for arm, r in results[name].items():
            print(
                f"{name} {arm:11s}: median {r['median_ms']:.1f} ms ({r['img_per_s']:.1f} img/s), "
                f"best {r['min_ms']:.1f}; ÷ {first} {r['median_over_first']:.3f} (best "
                f"{r['min_over_first']:.3f}, per round {r['round_ratio_median']:.3f})",
                flush=True,
            )
    arms = (
        {a: ARMS[a] for a in args.arms or ARMS}
        if args.margins is None
        else list(margin_arms(args.margins))
    )
    config = vars(args) | {"out": str(args.out), "variant": VARIANT, "arms": arms}
    print(f"results: {write_results(args.out, 'bench-train-kernels', config, results)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
