"""This CPU's grouped 3×3 kernel against another revision of its source, on ResNeXt-50's layers.

Usage: .venv/bin/python benchmarks/bench_grouped_ab.py --against OLD.c [--batch 16] [--rounds 15]
           [--dtype fp32|bf16]

Every distinct grouped 3×3 of ResNeXt-50 32×4d (channels, input size, stride; the stride-1 ones
also stand for the training input gradient, which runs the same kernel), channels-last float32
(the widening kernels) or bf16 (the pair-dot-product kernels, on their own packing), forward
through `grouped_kernel.run_kernel`: this CPU's build of the kernel ("ours") and the
same build of `--against` (e.g. `git show REV:src/resnext/speed/kernels/grouped3x3_avx2.c >
/tmp/old.c`), in alternating rounds. Both are first checked against `F.conv2d`. Reports each
layer's median ms and GFLOP/s, the per-round ratio, and the sum over the network's 16 layers.

`--split` (bf16) runs the layers the split-order kernels take (4 or 8 channels per group) on
those, their channels in the split order, as `optimize` runs them inside a bottleneck. `--cold`
empties the caches before each call, as a layer finds its input in the network (written by the
1×1 before it and pushed out by what followed); by default each call finds its input in cache.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

import bench_args
from bench_grouped_train import GROUPS, LAYERS  # ResNeXt-50's grouped 3×3 shapes
from resnext.speed import grouped, grouped_kernel, grouped_split
from resnext.speed.allocator import keep_freed_memory
from resnext.speed.measure import cache_evictor, interleaved, median_ratio
from resnext.speed.provenance import write_results

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def forward_with(
    build: grouped_kernel.Isa, kernel: Callable[[], torch.Tensor]
) -> Callable[[], torch.Tensor]:
    """An argument-free call of `kernel` on `build` (the module's build swapped in for it)."""

    def run() -> torch.Tensor:
        ours = grouped_kernel.ISA
        grouped_kernel.ISA = build
        try:
            return kernel()
        finally:
            grouped_kernel.ISA = ours

    return run


def layer_call(
    x: torch.Tensor, w: torch.Tensor, stride: int, split: bool
) -> tuple[Callable[[], torch.Tensor], torch.Tensor]:
    """The kernel's call on one layer and the float64 reference of its output (in the split order
    where `split`: the input's channels and the output's permuted as a bottleneck holds them)."""
    reference = F.conv2d(x.double(), w.double(), stride=stride, padding=1, groups=GROUPS)
    if split:
        c = x.shape[1]
        xs = x[:, grouped_split.input_order(c, GROUPS)].contiguous(
            memory_format=torch.channels_last
        )
        packed = grouped_split.pack_weights(w.float(), GROUPS)
        reference = reference[:, grouped_split.output_order(c, GROUPS)]
        return lambda: grouped_split.run_split(xs, packed, None, GROUPS, stride), reference
    pairs = grouped_kernel.takes_pairs(x.shape[1], GROUPS, x.dtype)
    packed = grouped_kernel.pack_weights(w.float(), GROUPS, pairs)
    return lambda: grouped_kernel.run_kernel(x, packed, None, GROUPS, stride), reference


def main() -> int:
    parser = bench_args.parser(__doc__, batch=16, rounds=15)
    parser.add_argument("--against", type=Path, required=True, help="another source of this build")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="fp32")
    parser.add_argument("--split", action="store_true", help="the split-order kernels (bf16)")
    parser.add_argument("--cold", action="store_true", help="caches emptied before each call")
    args = parser.parse_args()
    if args.split and args.dtype != "bf16":
        print("--split: the split-order kernels are bf16 only (add --dtype bf16)")
        return 1
    keep_freed_memory()
    dtype = DTYPES[args.dtype]
    reason = grouped_kernel.unavailable_reason(dtype)
    if reason is not None:
        print(f"the grouped kernel cannot run here: {reason}")
        return 1
    if not args.against.is_file():
        print(f"--against {args.against}: no such file (expected a grouped kernel source)")
        return 1
    ours = grouped_kernel.ISA
    against = dataclasses.replace(ours, name="against", source=args.against.resolve())
    problem = grouped_kernel._library_problem(against)  # before any timing, with its message
    if problem is not None:
        print(f"--against {args.against}: {problem}")
        return 1
    with cache_evictor() as evict:
        rows, totals = time_layers(args, dtype, ours, against, evict if args.cold else None)
    if rows is None:
        return 1
    print(
        f"ResNeXt-50's 16 grouped 3×3s, a batch: ours {totals['ours']:.1f} ms, "
        f"against {totals['against']:.1f} ms ({totals['against'] / totals['ours']:.3f})"
    )
    config = {**vars(args), "against": str(args.against), "build": ours.name}
    config["kernels"] = "pairs" if args.dtype == "bf16" else "widening"
    if args.split:
        config["kernels"] = "split where it takes the layer, else pairs"
    results = {"layers": rows, "network_ms": totals}
    path = write_results(args.out, "bench-grouped-ab", config, results)
    print(f"results: {path}")
    return 0


def time_layers(
    args: argparse.Namespace,
    dtype: torch.dtype,
    ours: grouped_kernel.Isa,
    against: grouped_kernel.Isa,
    before: Callable[[], None] | None,
) -> tuple[list[dict[str, object]] | None, dict[str, float]]:
    """Each layer's rows of results and the network's totals (None for the rows where a build
    computed a wrong output, with a message)."""
    torch.manual_seed(0)
    rows = []
    totals = {"ours": 0.0, "against": 0.0}
    for channels, size, stride, count in LAYERS:
        x = torch.randn(args.batch, channels, size, size, dtype=dtype).contiguous(
            memory_format=torch.channels_last
        )
        w = (torch.randn(channels, channels // GROUPS, 3, 3) * 0.1).to(dtype)
        split = args.split and grouped_split.supports(channels, GROUPS, stride)
        kernel, reference = layer_call(x, w, stride, split)
        ways = {"ours": forward_with(ours, kernel)}
        ways["against"] = forward_with(against, kernel)
        # float32 sums; bf16 outputs are rounded once more (8 significant bits)
        bound = 1e-3 if dtype == torch.float32 else 2**-8 * reference.abs().max().item() + 1e-3
        for way, run in ways.items():
            error = (run().double() - reference).abs().max().item()
            if error > bound:
                print(f"{way}: {channels} channels at {size}² stride {stride} is off by {error}")
                return None, totals
        timings = interleaved(
            {way: (run, args.batch) for way, run in ways.items()},
            rounds=args.rounds,
            iters=1,
            before=before,
        )
        ms = {way: [1e3 * s for s in t.seconds] for way, t in timings.items()}
        median = {way: statistics.median(t) for way, t in ms.items()}
        gflop = grouped.conv_flops(tuple(x.shape), w, stride) / 1e9
        per_round = median_ratio(ms["against"], ms["ours"])
        for way in totals:
            totals[way] += count * median[way]
        rows.append(
            {
                "channels": channels,
                "size": size,
                "stride": stride,
                "kernel": "split" if split else "pairs or widening",
                "layers": count,
                "median_ms": median,
                "gflops": {way: gflop / (m / 1e3) for way, m in median.items()},
                "against_over_ours_per_round_median": per_round,
            }
        )
        print(
            f"{channels:5d} at {size:3d}² s{stride} (×{count}): ours {median['ours']:6.2f} ms "
            f"({gflop / median['ours'] * 1e3:5.1f} GFLOP/s), against {median['against']:6.2f} ms, "
            f"against ÷ ours per round {per_round:.3f}"
        )
    return rows, totals


if __name__ == "__main__":
    raise SystemExit(main())
