"""bf16 1×1 convolutions, forward, input and weight gradient: oneDNN vs ours (`kernels/pointwise_gemm.c`).

Usage: .venv/bin/python benchmarks/bench_pointwise_gemm.py [--models resnext50_32x4d,resnet50]
       [--batch 16] [--image-size 224] [--rounds 5]
Every distinct stride-1 1×1 convolution of the models whose channels the product takes, timed
the way a training step runs it, interleaved in one process: from the float32 parameter (oneDNN:
cast to bf16, then `F.conv2d` / `convolution_backward`; ours: pack, then the product). The weight
gradient (float32 out) also by the one-GEMM path of `pointwise_train` (`torch.mm`). Each op
cycles through 4 sets of activations, so that like in a training step its operands are not all
hot in cache.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import torch
import torch.nn.functional as F

import bench_args
from bench_pointwise_train import SETS, pointwise_shapes, tensor_sets
from resnext.speed import pointwise_gemm
from resnext.speed.allocator import keep_freed_memory
from resnext.speed.measure import interleaved
from resnext.speed.pointwise_train import gemm_weight_grad
from resnext.speed.provenance import write_results


def layer_ops(cin: int, cout: int, size: int, batch: int) -> dict[str, Callable[[], object]]:
    """The layer's three products by oneDNN, ours (and the GEMM's weight gradient), each from the
    float32 weight and cycling through SETS activations."""
    g = torch.Generator().manual_seed(cin * 7 + cout + size)
    bf16 = torch.bfloat16
    xs = tensor_sets((batch, cin, size, size), bf16, g)
    gs = tensor_sets((batch, cout, size, size), bf16, g)
    weight = torch.randn(cout, cin, 1, 1, generator=g)
    names = ("fwd_onednn", "fwd_ours", "dx_onednn", "dx_ours", "dw_onednn", "dw_gemm", "dw_ours")
    turn = dict.fromkeys(names, 0)

    def next_set(key: str) -> int:
        turn[key] = (turn[key] + 1) % SETS
        return turn[key]

    def fwd_onednn() -> object:
        return F.conv2d(xs[next_set("fwd_onednn")], weight.to(bf16))

    def fwd_ours() -> object:
        packed = pointwise_gemm.pack_forward(weight)
        return pointwise_gemm.matmul_channels(xs[next_set("fwd_ours")], packed)

    def dx_onednn() -> object:
        i = next_set("dx_onednn")
        return torch.ops.aten.convolution_backward(
            gs[i], xs[i], weight.to(bf16), None, [1, 1], [0, 0], [1, 1], False, [0, 0], 1,
            [True, False, False],
        )  # fmt: skip

    def dx_ours() -> object:
        packed = pointwise_gemm.pack_input_grad(weight)
        return pointwise_gemm.matmul_channels(gs[next_set("dx_ours")], packed)

    def dw_onednn() -> object:
        i = next_set("dw_onednn")
        _, dw, _ = torch.ops.aten.convolution_backward(
            gs[i], xs[i], weight.to(bf16), None, [1, 1], [0, 0], [1, 1], False, [0, 0], 1,
            [False, True, False],
        )  # fmt: skip
        return dw.float()

    def dw_gemm() -> object:
        i = next_set("dw_gemm")
        return gemm_weight_grad(xs[i], gs[i], 1).float()

    def dw_ours() -> object:
        i = next_set("dw_ours")
        return pointwise_gemm.weight_grad(xs[i], gs[i])

    ops = (fwd_onednn, fwd_ours, dx_onednn, dx_ours, dw_onednn, dw_gemm, dw_ours)
    return dict(zip(names, ops, strict=True))


def main() -> int:
    parser = bench_args.parser(
        __doc__, models="resnext50_32x4d,resnet50", batch=16, image_size=224, rounds=5
    )
    args = parser.parse_args()
    problem = pointwise_gemm.unavailable_reason()
    if problem is not None:
        raise SystemExit(f"our 1×1 product cannot run here: {problem}")
    keep_freed_memory()
    shapes: Counter[tuple[int, int, int]] = Counter()
    counts: dict[tuple[int, int, int], dict[str, int]] = {}
    for name in args.models.split(","):
        for (cin, cout, size, stride), n in pointwise_shapes(name, args.image_size).items():
            if stride == 1 and pointwise_gemm.takes(cin, cout):
                shapes[(cin, cout, size)] += n
                counts.setdefault((cin, cout, size), {})[name] = n
    results: dict[str, dict[str, object]] = {}
    totals = Counter()
    for cin, cout, size in sorted(shapes, key=lambda s: (-s[2], s)):
        ops = layer_ops(cin, cout, size, args.batch)
        t = interleaved(
            {k: (f, args.batch) for k, f in ops.items()}, rounds=args.rounds, iters=SETS
        )
        ms = {k: 1e3 * v.median_s for k, v in t.items()}
        gflop = 2 * args.batch * size * size * cin * cout / 1e9
        results[f"{cin}-{cout}/{size}"] = {
            "layers": counts[(cin, cout, size)],
            "ms": ms,
            "gflops": {k: gflop / (v / 1e3) for k, v in ms.items()},
            "fwd_onednn_over_ours": ms["fwd_onednn"] / ms["fwd_ours"],
            "dx_onednn_over_ours": ms["dx_onednn"] / ms["dx_ours"],
            "dw_onednn_over_ours": ms["dw_onednn"] / ms["dw_ours"],
            "dw_gemm_over_ours": ms["dw_gemm"] / ms["dw_ours"],
        }
        for name, n in counts[(cin, cout, size)].items():
            for k, v in ms.items():
                totals[f"{name}/{k}"] += n * v
        print(
            f"{cin}→{cout} {size}² {counts[(cin, cout, size)]}: forward oneDNN "
            f"{ms['fwd_onednn']:.2f} ms ({gflop / ms['fwd_onednn'] * 1e3:.0f} GFLOP/s), ours "
            f"{ms['fwd_ours']:.2f} ({gflop / ms['fwd_ours'] * 1e3:.0f}), "
            f"×{ms['fwd_onednn'] / ms['fwd_ours']:.2f}; input gradient oneDNN "
            f"{ms['dx_onednn']:.2f} ms, ours {ms['dx_ours']:.2f}, "
            f"×{ms['dx_onednn'] / ms['dx_ours']:.2f}; weight gradient oneDNN "
            f"{ms['dw_onednn']:.2f} ms, GEMM {ms['dw_gemm']:.2f}, ours {ms['dw_ours']:.2f}",
            flush=True,
        )
    for key, v in sorted(totals.items()):
        print(f"summed over the model's layers, {key}: {v:.1f} ms")
    path = write_results(
        args.out,
        "bench-pointwise-gemm",
        vars(args),
        {"layers": results, "summed_ms": dict(totals)},
    )
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
