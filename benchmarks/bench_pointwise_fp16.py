"""Float32 1×1 convolutions for inference: oneDNN vs our float16 products (`pointwise_fp16`).

Usage: .venv/bin/python benchmarks/bench_pointwise_fp16.py [--batch 16] [--rounds 7]
           [--models resnext50_32x4d,resnet50] [--against OLD.c]

Every distinct 1×1 convolution of the models that `pointwise_fp16` takes (outputs in 32s; input
shape, outputs, stride, and whether a residual add follows, taken from the models themselves) is
timed both ways with its epilogue, interleaved: oneDNN's float32 op on the weight prepacked for
the input size, as inductor packs it, and ours on `pack`'s float16 panels; a block's last 1×1
adds and applies the ReLU over its residual in place, the others apply a ReLU into a new output.
Caches are warm. Weighted by how often each model has each: the models' whole 1×1 time a batch.
`--against` times another source of the kernel (`pointwise_fp16.c` of another revision, with
this revision's signatures) as a third way on the same packed weight, and reports, per shape,
the largest difference between the two builds' outputs on one input relative to the output's
largest value: 0 where the change keeps the arithmetic, as a change of speed alone should.
"""

from __future__ import annotations

import ctypes
from collections import Counter
from pathlib import Path

import torch
from torch import nn

import bench_args
from bench_network_ab import replaced
from bench_pointwise_fma import Shape, keep_freed_memory_as_bench_runs, label, time_ours_against
from resnext.speed import operators, pointwise_fp16
from resnext.speed.dense_swap import onednn_runner
from resnext.speed.provenance import write_results


def taken(counts: Counter[Shape]) -> Counter[Shape]:
    """The shapes the kernel takes (outputs in 32s, any inputs and stride)."""
    return Counter({s: k for s, k in counts.items() if pointwise_fp16.takes(s[2])})


def layer(shape: Shape) -> tuple[nn.Conv2d, torch.Tensor, torch.Tensor | None]:
    """A float32 1×1 of `shape`, a channels-last input, and its residual where a residual add
    follows (the same values on every call)."""
    n, cin, cout, h, w, stride, add = shape
    torch.manual_seed(0)
    conv = nn.Conv2d(cin, cout, 1, stride=stride).eval().requires_grad_(False)
    x = torch.randn(n, cin, h, w).contiguous(memory_format=torch.channels_last)
    out = operators.pointwise_output_shape(tuple(x.shape), cout, stride)
    res = torch.randn(out).contiguous(memory_format=torch.channels_last) if add else None
    return conv, x, res


def shape_variants(shape: Shape, against: ctypes.CDLL | None = None) -> dict[str, tuple]:
    """oneDNN's and our way of one shape (and `against`'s build of our kernel), as `interleaved`
    takes them."""
    n, _, cout, _, _, stride, _ = shape
    conv, x, res = layer(shape)
    onednn = onednn_runner(conv, True, tuple(x.shape))
    packed, exponent = pointwise_fp16.pack(conv.weight)
    bias = conv.bias.detach().contiguous()
    ops = torch.ops.resnext

    def native() -> object:
        return onednn(x, res)

    def ours() -> object:
        if res is None:
            return ops.pointwise_fp16(x, packed, exponent, cout, bias, stride, True, None)
        # written over in place, as in the graph: its values drift from call to call
        ops.pointwise_fp16_(x, packed, exponent, cout, bias, stride, True, res)
        return res

    ways = {"onednn": (native, n), "ours": (ours, n)}
    if against is not None:

        def other() -> object:
            with replaced(pointwise_fp16, "_library", lambda: against):
                return ours()

        ways["against"] = (other, n)
    return ways


def build_difference(shape: Shape, against: ctypes.CDLL) -> float:
    """The largest difference between this build's output and `against`'s on one input (no
    residual, so that both read the same values), over the output's largest magnitude."""
    _, _, cout, _, _, stride, _ = shape
    conv, x, _ = layer(shape)
    packed, exponent = pointwise_fp16.pack(conv.weight)
    bias = conv.bias.detach().contiguous()
    with torch.no_grad():
        mine = pointwise_fp16.run(x, packed, exponent, cout, bias, stride, relu=True)
        with replaced(pointwise_fp16, "_library", lambda: against):
            theirs = pointwise_fp16.run(x, packed, exponent, cout, bias, stride, relu=True)
    return float((mine - theirs).abs().max() / mine.abs().max().clamp_min(1e-30))


def main() -> int:
    parser = bench_args.parser(__doc__, batch=16, rounds=7, models="resnext50_32x4d,resnet50")
    parser.add_argument("--against", type=Path, help="another source, timed too")
    args = parser.parse_args()
    keep_freed_memory_as_bench_runs()
    against, refused = bench_args.kernel_or_refusal(
        args.against, pointwise_fp16.load, "pointwise_fp16.c", pointwise_fp16.unavailable_reason
    )
    if refused:
        print(refused)
        return 1
    shapes, layers, totals = time_ours_against(
        args.models, args.batch, args.rounds, taken, shape_variants, against
    )
    results: dict[str, object] = {"layers": layers, "totals": totals}
    if against is not None:
        differences = {label(s): build_difference(s, against) for s in shapes}
        results["against_difference"] = differences
        print(f"largest difference between the builds' outputs: {max(differences.values()):.2e}")
    path = write_results(args.out, "bench-pointwise-fp16", vars(args), results)
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
