"""bf16 1×1 convolutions for inference: oneDNN (as the frozen graph runs it) vs our dot-product kernel.

Usage: .venv/bin/python benchmarks/bench_pointwise_bf16.py [--batch 16] [--rounds 7]
           [--models resnext50_32x4d,resnet50] [--against OLD.c]

Every distinct 1×1 convolution of the models that `pointwise_gemm.conv1x1` takes (input shape,
outputs, stride, and whether a residual add follows, taken from the models themselves) is timed
both ways with its epilogue, interleaved: oneDNN's fused op on the weight prepacked for the
input size, as inductor packs it, and ours on `pack_conv`'s weight; a block's last 1×1 adds and
applies the ReLU over its residual in place, the others apply a ReLU into a new output. Caches
are warm here (`optimize`'s chooser times each layer cold instead, as a network's batch-1 layers
find their weights in memory). Weighted by how often each model has each: the models' whole
1×1 time a batch, oneDNN's against ours. A strided one (a projection shortcut) is also timed as
the kernel ran it before stop 39 ("gathered": its pixels at the stride copied into a dense
tensor, then the stride-1 product; not in the totals). `--against` times another source of the
kernel (`pointwise_gemm.c` of another revision, with this revision's signatures: stop 40 on) as
a third way, on the same packed weight.
"""

from __future__ import annotations

import ctypes
from collections import Counter
from pathlib import Path

import torch
from torch import nn

import bench_args
from bench_network_ab import replaced
from bench_pointwise_fma import Shape, keep_freed_memory_as_bench_runs, time_ours_against
from resnext.speed import pointwise_gemm
from resnext.speed.dense_swap import onednn_runner
from resnext.speed.provenance import write_results


def taken(counts: Counter[Shape]) -> Counter[Shape]:
    """The shapes the kernel takes (channels in 64s, any stride)."""
    return Counter({s: k for s, k in counts.items() if pointwise_gemm.takes(s[1], s[2])})


def shape_variants(shape: Shape, against: ctypes.CDLL | None = None) -> dict[str, tuple]:
    """oneDNN's and our way of one shape (and `against`'s build of our kernel), as `interleaved`
    takes them."""
    n, cin, cout, h, w, stride, add = shape
    # a bf16 layer, as in the bf16 model: oneDNN's weight is then packed for bf16 inputs
    conv = nn.Conv2d(cin, cout, 1, stride=stride).to(torch.bfloat16).eval().requires_grad_(False)
    x = torch.randn(n, cin, h, w, dtype=torch.bfloat16).contiguous(
        memory_format=torch.channels_last
    )
    res = None
    if add:  # written over in place, as in the graph: its values drift from call to call
        res = torch.randn(n, cout, (h - 1) // stride + 1, (w - 1) // stride + 1)
        res = res.to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    onednn = onednn_runner(conv, True, tuple(x.shape))
    packed = pointwise_gemm.pack_conv(conv.weight)
    bias = conv.bias.detach().to(torch.bfloat16).float()  # the bf16 model's bias

    def native() -> object:
        return onednn(x, res)

    def conv(inp: torch.Tensor, s: int) -> object:
        if res is None:
            return torch.ops.resnext.pointwise_conv_bf16(inp, packed, bias, s, True, None)
        torch.ops.resnext.pointwise_conv_bf16_(inp, packed, bias, s, True, res)
        return res

    def ours() -> object:
        return conv(x, stride)

    def gathered() -> object:  # as before stop 39: the pixels at the stride copied first
        return conv(x[:, :, ::stride, ::stride].contiguous(memory_format=torch.channels_last), 1)

    ways = {"onednn": (native, n), "ours": (ours, n)}
    if stride > 1:
        ways["gathered"] = (gathered, n)
    if against is not None:

        def other() -> object:
            with replaced(pointwise_gemm, "_library", lambda: against):
                return ours()

        ways["against"] = (other, n)
    return ways


def main() -> int:
    parser = bench_args.parser(__doc__, batch=16, rounds=7, models="resnext50_32x4d,resnet50")
    parser.add_argument("--against", type=Path, help="another source of the kernel, timed too")
    args = parser.parse_args()
    keep_freed_memory_as_bench_runs()
    against, refused = bench_args.kernel_or_refusal(
        args.against, pointwise_gemm.load, "pointwise_gemm.c", pointwise_gemm.unavailable_reason
    )
    if refused:
        print(refused)
        return 1
    _, layers, totals = time_ours_against(
        args.models, args.batch, args.rounds, taken, shape_variants, against
    )
    path = write_results(
        args.out, "bench-pointwise-bf16", vars(args), {"layers": layers, "totals": totals}
    )
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
