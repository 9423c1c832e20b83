"""The grouped 3×3 convolution's training ops, every implementation the fast path chooses from,
per ResNeXt-50 layer shape.

Usage: .venv/bin/python benchmarks/bench_grouped_train.py [--batch 16] [--rounds 5] [--dtypes bf16,fp32]
For each distinct conv2 shape of ResNeXt-50 32×4d (stride-1 blocks and each stage's stride-2
first block): forward, input gradient and weight gradient, each timed with every candidate
`resnext.speed.grouped_train` offers the chooser on this CPU (oneDNN, our widening kernels,
our AVX512-BF16 pair kernels, our AMX kernel), interleaved in one process; GFLOP/s and oneDNN ÷
each.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

import bench_args
from resnext.speed import grouped_train
from resnext.speed.allocator import keep_freed_memory
from resnext.speed.measure import interleaved
from resnext.speed.provenance import write_results

# (channels, input size, stride, how many of these layers ResNeXt-50 has): Table 1's conv2s.
LAYERS = [
    (128, 56, 1, 3),
    (256, 56, 2, 1),
    (256, 28, 1, 3),
    (512, 28, 2, 1),
    (512, 14, 1, 5),
    (1024, 14, 2, 1),
    (1024, 7, 1, 2),
]
GROUPS = 32
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def layer_ops(
    c: int, size: int, stride: int, batch: int, dtype: torch.dtype
) -> dict[str, Callable[[], object]]:
    """Each training op of one layer ("op/implementation"), as the fast path's chooser sees it."""
    g = torch.Generator().manual_seed(c + size)
    x = torch.randn(batch, c, size, size, generator=g).to(dtype)
    x = x.contiguous(memory_format=torch.channels_last)
    w = torch.randn(c, c // GROUPS, 3, 3, generator=g).to(dtype)
    out = F.conv2d(x, w, None, stride, 1, 1, GROUPS)
    gy = torch.randn(out.shape, generator=g).to(dtype).contiguous(memory_format=torch.channels_last)
    ops: dict[str, Callable[[], object]] = {}
    for op, candidates in (
        ("forward", grouped_train.conv_candidates(x, w, GROUPS, stride)),
        ("input_grad", grouped_train.input_grad_candidates(gy, x, w, GROUPS, stride)),
        ("weight_grad", grouped_train.weight_grad_candidates(gy, x, w, GROUPS, stride)),
    ):
        ops.update({f"{op}/{name}": fn for name, fn in candidates.items()})
    return ops


def main() -> int:
    parser = bench_args.parser(__doc__, batch=16, rounds=5, dtypes="bf16,fp32")
    args = parser.parse_args()
    keep_freed_memory()
    results: dict[str, object] = {}
    for dname in args.dtypes.split(","):
        dtype = DTYPES[dname]
        for c, size, stride, count in LAYERS:
            ops = layer_ops(c, size, stride, args.batch, dtype)
            timings = interleaved(
                {k: (f, args.batch) for k, f in ops.items()}, rounds=args.rounds, iters=3
            )
            out_size = (size - 1) // stride + 1
            gflop = 2 * args.batch * c * (c // GROUPS) * 9 * out_size**2 / 1e9
            row: dict[str, object] = {"layers_in_resnext50": count, "gflop": gflop}
            line = [f"{dname} C={c} {size}² s{stride} ×{count}:"]
            for op in ("forward", "input_grad", "weight_grad"):
                base = timings[f"{op}/onednn"].median_s
                ms = {
                    k.split("/", 1)[1]: 1e3 * t.median_s
                    for k, t in timings.items()
                    if k.startswith(op + "/")
                }
                row[op] = {
                    "ms": ms,
                    "gflops": {name: gflop / (t / 1e3) for name, t in ms.items()},
                    "onednn_over": {name: 1e3 * base / t for name, t in ms.items()},
                    "fastest": min(ms, key=ms.__getitem__),
                }
                parts = [f"{name} {t:.2f}" for name, t in ms.items()]
                line.append(f"{op}: " + " / ".join(parts))
            results[f"{dname}/{c}x{size}/s{stride}"] = row
            print("  ".join(line), flush=True)
    path = write_results(args.out, "bench-grouped-train", vars(args), results)
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
