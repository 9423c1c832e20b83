"""The fast path with its 1×1s free to take MKL's packed product against the same without it.

Usage: .venv/bin/python benchmarks/bench_pointwise_mkl.py [--models resnext50_32x4d,resnet50]
           [--batches 1,16] [--backends replay,none] [--image-size 224] [--rounds 15]

For each model, batch and backend: `optimize(..., "fp32")` twice, `pointwise_mkl="auto"` and
`"off"`, on one timing cache (so both take the same choices for every other layer), timed in
turns (`measure.interleaved`: `--rounds` rounds, 5 calls a turn at batch 1, one above). Both must
agree with each other to 1e-4 of the output's largest value on a fresh input first. The ratio is
the median over rounds of the two times in the same round; beside it, how many 1×1s the chooser
gave MKL and the bytes of their packed weights. The process keeps freed memory, as `resnext`
commands run.
"""

from __future__ import annotations

import argparse

import torch

import bench_args
import resnext
from resnext.speed.allocator import keep_freed_memory
from resnext.speed.fastpath import BACKENDS, optimize
from resnext.speed.measure import interleaved, median_ratio
from resnext.speed.pointwise_mkl import MklConv1x1, unavailable_reason
from resnext.speed.provenance import write_results
from resnext.speed.timing_cache import TimingCache


def backend_list(text: str) -> list[str]:
    """`--backends`: comma-separated `optimize` backends."""
    names = text.split(",")
    unknown = sorted(set(names) - set(BACKENDS))
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown {unknown}, expected of {BACKENDS}")
    return names


def main() -> int:
    parser = bench_args.parser(
        __doc__, models="resnext50_32x4d,resnet50", image_size=224, rounds=15
    )
    parser.add_argument("--batches", type=bench_args.int_list, default="1,16")
    parser.add_argument("--backends", type=backend_list, default="replay,none")
    args = parser.parse_args()
    if args.rounds < 1 or min(args.batches) < 1:
        parser.error(f"--rounds, --batches: expected at least 1, got {args.rounds}, {args.batches}")
    reason = unavailable_reason()
    if reason is not None:
        raise SystemExit(f"the MKL 1×1 kernel cannot run here: {reason}")
    keep_freed_memory()
    torch.manual_seed(0)
    results: dict[str, object] = {}
    for name in args.models.split(","):
        model = resnext.create_model(name).eval()
        for batch in args.batches:
            x = torch.randn(batch, 3, args.image_size, args.image_size)
            for backend in args.backends:
                cache = TimingCache.in_memory()
                built = {
                    mode: optimize(
                        model,
                        "fp32",
                        backend=backend,
                        example_input=x,
                        pointwise_mkl=mode,
                        timing_cache=cache,
                    )
                    for mode in ("auto", "off")
                }
                fresh = torch.randn_like(x)
                with torch.no_grad():
                    want, got = built["off"](fresh), built["auto"](fresh)
                    if (got - want).abs().max() > 1e-4 * want.abs().max():
                        raise SystemExit(f"{name} batch {batch} {backend}: the two disagree")
                    ways = {
                        f"mkl {mode}": (lambda f=fast, x=x: f(x), batch)
                        for mode, fast in built.items()
                    }
                    calls = 5 if batch == 1 else 1
                    timings = interleaved(ways, rounds=args.rounds, iters=calls, warmup=2)
                eager = getattr(built["auto"], "module", built["auto"])
                taken = [m for m in eager.modules() if isinstance(m, MklConv1x1)]
                row: dict[str, object] = {k: t.median_s * 1e3 for k, t in timings.items()}
                row["1x1s on mkl"] = len(taken)
                row["1x1s weighed"] = sum(
                    c.variant.startswith("mkl") for c in eager.pointwise_choices
                )
                row["packed MB"] = sum(m.packed.numel() for m in taken) / 2**20
                row["auto ÷ off, time"] = median_ratio(
                    timings["mkl auto"].seconds, timings["mkl off"].seconds
                )
                results[f"{name}/batch{batch}/{backend}"] = row
                print(
                    f"{name} fp32 batch {batch} {backend}: mkl auto {row['mkl auto']:.2f} ms, "
                    f"off {row['mkl off']:.2f} ms, auto ÷ off ×{row['auto ÷ off, time']:.3f} "
                    f"(median over {args.rounds} rounds); {row['1x1s on mkl']} of "
                    f"{row['1x1s weighed']} 1×1s on MKL, {row['packed MB']:.0f} MB packed"
                )
    config = {k: str(v) for k, v in vars(args).items()}
    print(f"results: {write_results(args.out, 'bench-pointwise-mkl', config, results)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
