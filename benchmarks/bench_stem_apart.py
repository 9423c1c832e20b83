"""The eager fast paths' stem where no fused stem kernel takes it: its ReLU and pooling, before and after.

Usage: .venv/bin/python benchmarks/bench_stem_apart.py [--models resnext50_32x4d] [--batch 16]
           [--image-size 224] [--dtype fp32] [--rounds 9] [--backends none,replay]

Where the stem is not one kernel (`resnext.speed.stem_fusion`: float32 without AMX, or a CPU
without AVX512-BF16), `optimize(..., backend="none" | "replay")` now has the convolution apply
the ReLU (`stem_fusion.fuse_stem_relu`) and pools with the max-pool kernel without indices
(`maxpool.InferenceMaxPool2d`). Before, the ReLU was a pass of its own over the network's largest
tensor, and torch's pooling wrote an int64 index per value (which a replay also copied).

For each model, one `optimize(..., backend="none")` build, and a copy of it with the stem put
back as it was (the convolution without its ReLU, the folded BN an identity, `nn.MaxPool2d`):
every other choice is the same in both. Each is also replayed (`Replayed`). All run in turns
(`measure.interleaved`), and the ratio is the median over rounds of the two times; the stem's
own three steps are timed the same way on the model's input.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

import bench_args
import resnext
from resnext.speed import maxpool
from resnext.speed.allocator import keep_freed_memory
from resnext.speed.fastpath import optimize
from resnext.speed.measure import interleaved, median_ratio
from resnext.speed.provenance import write_results
from resnext.speed.replay import Replayed
from resnext.speed.stem_fusion import ReluApplied

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def stem_as_before(fast: nn.Module) -> nn.Module:
    """A copy of an eager fast path (`CastInput` around the network) with its stem apart as it
    was before `fuse_stem_relu` and `use_inference_maxpool`."""
    before = copy.deepcopy(fast)
    net = before.model
    if not isinstance(net.bn1, ReluApplied) or not isinstance(
        net.maxpool, maxpool.InferenceMaxPool2d
    ):
        raise SystemExit(
            f"the stem is not apart here ({type(net.conv1).__name__}, {type(net.bn1).__name__}, "
            f"{type(net.maxpool).__name__}): a fused stem kernel took it, nothing to compare"
        )
    net.conv1.relu = False
    net.bn1 = nn.Identity()
    net.maxpool.__class__ = nn.MaxPool2d
    return before


def time_stem(fast: nn.Module, x: torch.Tensor, rounds: int) -> dict[str, object]:
    """The stem's steps alone, as before and as now, on the network's input (ms, medians)."""
    net = fast.model
    conv, (k, s, p) = net.conv1, maxpool.window(net.maxpool)
    apart = copy.deepcopy(conv)
    apart.relu = False
    plain = nn.MaxPool2d(k, s, p)
    x = x.to(conv.dtype).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        y = conv(x)
    ways = {
        "before: conv, relu_, torch pool": (lambda: plain(torch.relu_(apart(x))), 1),
        "now: conv+relu, kernel pool": (lambda: maxpool.pool(conv(x), k, s, p), 1),
        "conv alone": (lambda: apart(x), 1),
        "conv+relu alone": (lambda: conv(x), 1),
        "relu_ alone": (lambda: torch.relu_(y), 1),
        "torch pool alone": (lambda: plain(y), 1),
        "kernel pool alone": (lambda: maxpool.pool(y, k, s, p), 1),
    }
    with torch.no_grad():
        timings = interleaved(ways, rounds=rounds, iters=1, warmup=2)
    row: dict[str, object] = {name: t.median_s * 1e3 for name, t in timings.items()}
    before, now = timings["before: conv, relu_, torch pool"], timings["now: conv+relu, kernel pool"]
    row["now ÷ before, time"] = median_ratio(now.seconds, before.seconds)
    return row


def main() -> int:
    parser = bench_args.parser(
        __doc__, models="resnext50_32x4d", batch=16, image_size=224, rounds=9
    )
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--backends", default="none,replay")
    args = parser.parse_args()
    if args.rounds < 1 or args.batch < 1:
        parser.error(f"--rounds, --batch: expected at least 1, got {args.rounds}, {args.batch}")
    backends = args.backends.split(",")
    if unknown := [b for b in backends if b not in ("none", "replay")]:
        parser.error(f"--backends: expected none and/or replay, got {unknown}")
    keep_freed_memory()  # as `resnext bench` runs: no page faults on each new output
    torch.manual_seed(0)
    results: dict[str, object] = {}
    for name in args.models.split(","):
        model = resnext.create_model(name).eval()
        x = torch.randn(args.batch, 3, args.image_size, args.image_size)
        now = optimize(model, DTYPES[args.dtype], backend="none", example_input=x)
        before = stem_as_before(now)
        ways = {}
        for backend in backends:
            for label, eager in (("before", before), ("now", now)):
                run = eager
                if backend == "replay":
                    run = Replayed(eager)
                    run.build(x)
                ways[f"{backend} {label}"] = (lambda run=run, x=x: run(x), args.batch)
        with torch.no_grad():
            want = before(x)
            for label, (fn, _) in ways.items():
                if not torch.equal(fn(), want):
                    raise SystemExit(f"{name} {label}: the output differs from the stem apart")
            timings = interleaved(ways, rounds=args.rounds, iters=1, warmup=1)
        row: dict[str, object] = {k: t.throughput for k, t in timings.items()}
        for backend in backends:
            b, n = timings[f"{backend} before"], timings[f"{backend} now"]
            row[f"{backend}: now ÷ before, time"] = median_ratio(n.seconds, b.seconds)
            print(
                f"{name} {args.dtype} batch {args.batch} {backend}: before {b.throughput:.2f} "
                f"img/s, now {n.throughput:.2f} img/s; now ÷ before, time ×"
                f"{row[f'{backend}: now ÷ before, time']:.3f} (median over {args.rounds} rounds)"
            )
        stem_row = time_stem(now, x, args.rounds * 3)
        print(f"{name} stem alone, ms: " + ", ".join(f"{k} {v:.3f}" for k, v in stem_row.items()))
        results[name] = {"network img/s": row, "stem ms": stem_row}
    config = {k: str(v) for k, v in vars(args).items()}
    print(f"results: {write_results(args.out, 'bench-stem-apart', config, results)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
