"""Our AMX bf16×3 float32 convolution against oneDNN, per ResNeXt-50 / ResNet-50 conv shape.

Usage: .venv/bin/python benchmarks/bench_conv_x3.py [--batch 16] [--rounds 9]
Per shape (ResNeXt-50's 1×1s, the 7×7 stem, ResNet-50's dense 3×3s), interleaved: oneDNN's
float32 convolution with a prepacked weight and the ReLU fused (what the frozen compiled graph
runs), ours with the ReLU, and, for scale, oneDNN's bf16 convolution (a third of the products
ours makes). Also each float32 way's largest error against a float64 reference, relative to
the output's largest value. Needs a CPU with AMX.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import bench_args
from resnext.speed import conv_x3
from resnext.speed.allocator import keep_freed_memory
from resnext.speed.measure import interleaved
from resnext.speed.prepacked import onednn_weights
from resnext.speed.provenance import write_results

# (input channels, output channels, input size, kernel, stride, padding)
SHAPES = [
    (3, 64, 224, 7, 2, 3),  # the stem
    (256, 128, 56, 1, 1, 0),  # ResNeXt-50's 1×1s: stage 1, first 1×1
    (128, 256, 56, 1, 1, 0),  # stage 1, last 1×1
    (256, 512, 56, 1, 2, 0),  # stage 2's projection shortcut
    (512, 256, 28, 1, 1, 0),
    (256, 512, 28, 1, 1, 0),
    (1024, 512, 14, 1, 1, 0),
    (512, 1024, 14, 1, 1, 0),
    (2048, 1024, 7, 1, 1, 0),
    (1024, 2048, 7, 1, 1, 0),
    (1024, 2048, 14, 1, 2, 0),  # stage 4's projection shortcut
    (64, 64, 56, 3, 1, 1),  # ResNet-50's dense 3×3s
    (128, 128, 28, 3, 1, 1),
    (256, 256, 14, 3, 1, 1),
    (512, 512, 7, 3, 1, 1),
]


def _prepacked(conv: nn.Conv2d, dtype: torch.dtype, input_size: list[int]):
    """oneDNN's convolution + ReLU with the weight prepacked for it (for inputs of `input_size`,
    as inductor packs it), in `dtype`."""
    _, bias, packed = onednn_weights(conv, dtype, input_size)
    geometry = (list(conv.padding), list(conv.stride), [1, 1], 1)
    return lambda x: torch.ops.mkldnn._convolution_pointwise(
        x, packed, bias, *geometry, "relu", [None], ""
    )


def shape_variants(
    cin: int, cout: int, size: int, kernel: int, stride: int, padding: int, batch: int
) -> tuple[dict, dict]:
    """The three ways as calls for `interleaved`, and the float32 ways' relative errors."""
    gen = torch.Generator().manual_seed(cin + cout + size)
    x = torch.randn(batch, cin, size, size, generator=gen).contiguous(
        memory_format=torch.channels_last
    )
    weight = (torch.randn(cout, cin, kernel, kernel, generator=gen) / cin**0.5).contiguous(
        memory_format=torch.channels_last
    )
    bias = torch.randn(cout, generator=gen) * 0.1
    ours_packed = conv_x3.pack(weight)
    conv = nn.Conv2d(cin, cout, kernel, stride, padding)
    conv.weight.data, conv.bias.data = weight, bias
    onednn = _prepacked(conv, torch.float32, list(x.shape))
    onednn_bf16 = _prepacked(conv, torch.bfloat16, list(x.shape))
    xb = x.bfloat16()
    exact = F.relu(F.conv2d(x.double(), weight.double(), bias.double(), stride, padding))

    def rel(y: torch.Tensor) -> float:
        return ((y.double() - exact).abs().max() / exact.abs().max()).item()

    def ours() -> torch.Tensor:
        return conv_x3.run(x, ours_packed, bias, kernel, stride, padding, True)

    errors = {"onednn fp32": rel(onednn(x)), "ours bf16x3": rel(ours())}
    variants = {
        "onednn fp32": (lambda: onednn(x), batch),
        "ours bf16x3": (ours, batch),
        "onednn bf16": (lambda: onednn_bf16(xb), batch),
    }
    return variants, errors


def main() -> int:
    parser = bench_args.parser(__doc__, batch=16, rounds=9)
    args = parser.parse_args()
    reason = conv_x3.unavailable_reason()
    if reason is not None:
        print(f"skipped: the AMX kernel cannot run here ({reason})")
        return 0
    keep_freed_memory()  # as `resnext bench` runs: no page faults on each new output
    results: dict[str, object] = {}
    with torch.no_grad():
        for cin, cout, size, kernel, stride, padding in SHAPES:
            key = f"{cin}->{cout} {size}x{size} {kernel}x{kernel} stride {stride}"
            variants, errors = shape_variants(cin, cout, size, kernel, stride, padding, args.batch)
            timings = interleaved(variants, rounds=args.rounds, iters=3)
            results[key] = {
                "ms": {name: t.as_dict() for name, t in timings.items()},
                "max_rel_err": errors,
            }
            cells = "  ".join(f"{name} {1e3 * t.median_s:.2f} ms" for name, t in timings.items())
            fp32 = timings["onednn fp32"].median_s / timings["ours bf16x3"].median_s
            print(f"{key}: {cells}  (×{fp32:.2f}; err {errors['ours bf16x3']:.1e})")
    config = {k: str(v) for k, v in vars(args).items()}
    print(f"results: {write_results(args.out, 'bench-conv-x3', config, results)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
