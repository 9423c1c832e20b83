"""AMX tile products with and without operand loads, beside oneDNN's bf16 1×1 and matrix product, round by round.

Usage: .venv/bin/python benchmarks/bench_tile_loads.py [--rounds 40] [--seconds 0.05]
Each round measures, in an order that alternates between rounds: the register-only tile rate
(`peak.amx_peak`), the same products loading one operand tile from L1 each (`loaded=True`: a
matrix product's 2 × 2 blocked inner loop), a 2048² bf16 matrix product (`measure.matmul_probe`)
and a bf16 1×1 convolution of ResNeXt-50's stage 3 (1024 → 512 channels at 14², batch 16) on
oneDNN with its weight prepacked and its ReLU fused (`PrepackedConv`, as the fast path runs it).
It reports each rate per round and its median, loaded ÷ register-only per round, and the
correlation of the two oneDNN rates with each tile rate over the rounds: which ceiling the
machine's real products follow as its speed changes. Needs a CPU with AMX-BF16.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

import bench_args
from resnext.speed import peak
from resnext.speed.measure import matmul_probe
from resnext.speed.prepacked import PrepackedConv
from resnext.speed.provenance import write_results

BATCH, CIN, COUT, SIDE = 16, 1024, 512, 14


def conv_probe() -> Callable[[], float]:
    """A function timing one stage-3 bf16 1×1 (with ReLU) on oneDNN prepacked; returns GFLOP/s."""
    conv = nn.Conv2d(CIN, COUT, 1).to(torch.bfloat16)
    x = torch.randn(BATCH, CIN, SIDE, SIDE).to(torch.bfloat16)
    x = x.contiguous(memory_format=torch.channels_last)
    layer = PrepackedConv(conv, relu=True, in_place=False, input_size=tuple(x.shape))
    flop = 2 * BATCH * SIDE * SIDE * CIN * COUT

    def probe() -> float:
        start = time.perf_counter()
        layer(x)
        return flop / (time.perf_counter() - start) / 1e9

    probe()  # the first call may allocate: not a rate
    return probe


def main() -> int:
    parser = bench_args.parser(__doc__, rounds=40)
    parser.add_argument("--seconds", type=float, default=0.05, help="per tile-rate measurement")
    args = parser.parse_args()
    if args.rounds < 3:  # a correlation needs three rounds
        parser.error(f"--rounds: expected >= 3, got {args.rounds}")
    if args.seconds <= 0:
        parser.error(f"--seconds: expected > 0, got {args.seconds}")
    reason = peak.amx_unavailable_reason()
    if reason is not None:
        print(f"bench_tile_loads: needs AMX-BF16 ({reason})")
        return 1
    probes = {
        "register": lambda: peak.amx_peak(seconds=args.seconds),
        "loaded": lambda: peak.amx_peak(seconds=args.seconds, loaded=True),
        "matmul": matmul_probe(torch.bfloat16),
        "conv1x1": conv_probe(),
    }
    names = list(probes)
    rates: dict[str, list[float]] = {name: [] for name in names}
    for r in range(args.rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            rates[name].append(probes[name]())
    loaded_share = [a / b for a, b in zip(rates["loaded"], rates["register"], strict=True)]
    results = {
        "threads": torch.get_num_threads(),
        "rounds": rates,
        "medians_gflops": {name: statistics.median(v) for name, v in rates.items()},
        "loaded_over_register": {
            "per_round": loaded_share,
            "median": statistics.median(loaded_share),
            "min": min(loaded_share),
            "max": max(loaded_share),
        },
        "correlation": {
            f"{real}~{tile}": statistics.correlation(rates[real], rates[tile])
            for real in ("matmul", "conv1x1")
            for tile in ("register", "loaded")
        },
    }
    for name, value in results["medians_gflops"].items():
        print(
            f"{name:9s} median {value:7.0f} GFLOP/s  (min {min(rates[name]):.0f}, max "
            f"{max(rates[name]):.0f})"
        )
    share = results["loaded_over_register"]
    print(
        f"loaded ÷ register per round: median {share['median']:.2f} "
        f"({share['min']:.2f}–{share['max']:.2f})"
    )
    for pair, value in results["correlation"].items():
        print(f"correlation {pair}: {value:+.2f}")
    config = {"rounds": args.rounds, "seconds": args.seconds, "conv": [BATCH, CIN, COUT, SIDE]}
    path = write_results(args.out, "bench-tile-loads", config, results)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
