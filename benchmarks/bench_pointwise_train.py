"""The 1×1 convolutions' weight gradient (oneDNN, one GEMM, ours), and the SGD step (loop vs fused).

Usage: .venv/bin/python benchmarks/bench_pointwise_train.py [--models resnext50_32x4d,resnet50]
       [--batch 16] [--image-size 224] [--rounds 5] [--dtypes bf16,fp32] [--against OLD.c]
       [--against-fp16 OLD.c]
Part 1: every distinct 1×1 convolution of the models (found by running them once), its weight
gradient timed with oneDNN (`torch.ops.aten.convolution_backward`), as the GEMM of
`resnext.speed.pointwise_train`, in bf16 on a CPU with AVX512-BF16 by our pair-dot-product
kernel (`pointwise_gemm.weight_grad`; with `--against`, also built from another source of
`kernels/pointwise_gemm.c`) and on a CPU with AMX by our tile kernel
(`resnext.speed.pointwise_wgrad_amx`), in float32 on a CPU with AVX512-FP16 with float16 products
(`pointwise_fp16.weight_grad`, `train.fp16_products`; with `--against-fp16`, also built from
another source of `kernels/pointwise_fp16.c`, with the largest difference of its result from this
build's: 0 where a change keeps the arithmetic), interleaved in one process. Each op cycles through 4 sets of
tensors, so that like in a training step its operands are not all hot in cache.
(The training fast path times these candidates itself at each shape: `resnext.speed.autotune`.) Part 2: one SGD update (momentum, Nesterov,
weight decay) of each model's parameters with torch's per-parameter loop, foreach and fused
implementations; `resnext train` uses the fused one.
"""

from __future__ import annotations

import ctypes
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

import bench_args
import resnext
from bench_network_ab import replaced
from resnext.speed import pointwise_fp16, pointwise_gemm, pointwise_wgrad_amx
from resnext.speed.allocator import keep_freed_memory
from resnext.speed.measure import interleaved
from resnext.speed.pointwise_train import gemm_weight_grad
from resnext.speed.provenance import write_results

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
SETS = 4


def pointwise_shapes(name: str, image_size: int) -> Counter[tuple[int, int, int, int]]:
    """(C_in, C_out, input size, stride) of each 1×1 convolution of model `name`, with counts."""
    model = resnext.create_model(name).eval()
    shapes: Counter[tuple[int, int, int, int]] = Counter()

    def record(conv: nn.Module, inputs: tuple[torch.Tensor, ...], _: torch.Tensor) -> None:
        shapes[(conv.in_channels, conv.out_channels, inputs[0].shape[-1], conv.stride[0])] += 1

    hooks = [
        m.register_forward_hook(record)
        for m in model.modules()
        if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1)
    ]
    with torch.no_grad():
        model(torch.zeros(1, 3, image_size, image_size))
    for h in hooks:
        h.remove()
    return shapes


def tensor_sets(
    shape: tuple[int, ...], dtype: torch.dtype, generator: torch.Generator
) -> list[torch.Tensor]:
    """SETS equal random channels-last tensors: an op cycling through them finds its operands
    cold in cache, as in a training step, and every round computes the same thing."""
    first = torch.randn(shape, generator=generator).to(dtype)
    first = first.contiguous(memory_format=torch.channels_last)
    return [first] + [first.clone(memory_format=torch.channels_last) for _ in range(SETS - 1)]


def weight_grad_ops(
    cin: int,
    cout: int,
    size: int,
    stride: int,
    batch: int,
    dtype: torch.dtype,
    against: ctypes.CDLL | None = None,
    against_fp16: ctypes.CDLL | None = None,
) -> dict[str, Callable[[], object]]:
    """The layer's weight gradient by oneDNN, by the GEMM and by our kernels where they run
    (`against`, `against_fp16`: our pair or float16 kernel from another source too), each
    cycling through SETS tensors."""
    g = torch.Generator().manual_seed(cin * 7 + cout + size)
    out = (size - 1) // stride + 1
    xs = tensor_sets((batch, cin, size, size), dtype, g)
    gs = tensor_sets((batch, cout, out, out), dtype, g)
    w = torch.randn(cout, cin, 1, 1, generator=g).to(dtype)
    turn = dict.fromkeys(("onednn", "gemm", "amx", "ours", "against", "fp16", "fp16_against"), 0)

    def onednn() -> object:
        i = turn["onednn"] = (turn["onednn"] + 1) % SETS
        return torch.ops.aten.convolution_backward(
            gs[i], xs[i], w, None, [stride] * 2, [0, 0], [1, 1], False, [0, 0], 1,
            [False, True, False],
        )  # fmt: skip

    def gemm() -> object:
        i = turn["gemm"] = (turn["gemm"] + 1) % SETS
        return gemm_weight_grad(xs[i], gs[i], stride)

    def amx() -> object:
        i = turn["amx"] = (turn["amx"] + 1) % SETS
        return pointwise_wgrad_amx.weight_grad(xs[i], gs[i], stride)

    def ours(name: str = "ours", lib: ctypes.CDLL | None = None) -> object:
        i = turn[name] = (turn[name] + 1) % SETS
        x = xs[i][:, :, ::stride, ::stride]
        if lib is None:
            return pointwise_gemm.weight_grad(x, gs[i])
        with replaced(pointwise_gemm, "_library", lambda: lib):
            return pointwise_gemm.weight_grad(x, gs[i])

    def fp16(name: str = "fp16", lib: ctypes.CDLL | None = None) -> object:
        i = turn[name] = (turn[name] + 1) % SETS
        if lib is None:
            return pointwise_fp16.weight_grad(xs[i], gs[i], stride)
        with replaced(pointwise_fp16, "_library", lambda: lib):
            return pointwise_fp16.weight_grad(xs[i], gs[i], stride)

    ops = {"onednn": onednn, "gemm": gemm}
    if (
        dtype == torch.float32
        and pointwise_fp16.unavailable_reason() is None
        and pointwise_fp16.takes(cin)
    ):
        ops["fp16"] = fp16
        if against_fp16 is not None:
            ops["fp16_against"] = lambda: fp16("fp16_against", against_fp16)
    if (
        dtype == torch.bfloat16
        and pointwise_gemm.unavailable_reason() is None
        and pointwise_gemm.takes_weight_grad(cin)
    ):
        ops["ours"] = ours
        if against is not None:
            ops["against"] = lambda: ours("against", against)
    if pointwise_wgrad_amx.unavailable_reason() is None and pointwise_wgrad_amx.applies(
        xs[0], gs[0]
    ):
        ops["amx"] = amx
    return ops


def sgd_ops(name: str) -> dict[str, Callable[[], object]]:
    """One SGD update of model `name`'s parameters by each of torch's three implementations."""
    model_params = list(resnext.create_model(name).parameters())
    ops = {}
    for impl, kw in (
        ("loop", {"foreach": False}),
        ("foreach", {"foreach": True}),
        ("fused", {"fused": True}),
    ):
        params = [p.detach().clone() for p in model_params]  # each optimiser its own copy
        for p in params:
            p.grad = torch.randn_like(p) * 1e-3
        opt = torch.optim.SGD(params, lr=0.01, momentum=0.9, nesterov=True, weight_decay=1e-4, **kw)
        ops[impl] = opt.step
    return ops


def main() -> int:
    parser = bench_args.parser(
        __doc__,
        models="resnext50_32x4d,resnet50",
        batch=16,
        image_size=224,
        rounds=5,
        dtypes="bf16,fp32",
    )
    parser.add_argument(
        "--against", type=Path, help="another source of kernels/pointwise_gemm.c, timed beside"
    )
    parser.add_argument(
        "--against-fp16", type=Path, help="another source of kernels/pointwise_fp16.c, likewise"
    )
    args = parser.parse_args()
    against, refused = bench_args.pointwise_against(args.against)
    against_fp16, refused_fp16 = bench_args.kernel_against(
        args.against_fp16, pointwise_fp16.load, "pointwise_fp16.c"
    )
    if refused or refused_fp16:
        print(refused or refused_fp16)
        return 1
    keep_freed_memory()
    models = args.models.split(",")
    shapes: Counter[tuple[int, int, int, int]] = Counter()
    counts: dict[tuple[int, int, int, int], dict[str, int]] = {}
    for name in models:
        for shape, n in pointwise_shapes(name, args.image_size).items():
            shapes[shape] += n
            counts.setdefault(shape, {})[name] = n
    results: dict[str, object] = {"weight_grad": {}, "sgd": {}}
    for dname in args.dtypes.split(","):
        for shape in sorted(shapes, key=lambda s: (-s[2], s)):
            cin, cout, size, stride = shape
            ops = weight_grad_ops(
                cin, cout, size, stride, args.batch, DTYPES[dname], against, against_fp16
            )
            t = interleaved(
                {k: (f, args.batch) for k, f in ops.items()}, rounds=args.rounds, iters=SETS
            )
            out = (size - 1) // stride + 1
            rows = args.batch * out * out
            gflop = 2 * rows * cin * cout / 1e9
            onednn, gemm = t["onednn"].median_s, t["gemm"].median_s
            record = {
                "rows": rows,
                "layers": counts[shape],
                "onednn_ms": 1e3 * onednn,
                "gemm_ms": 1e3 * gemm,
                "onednn_gflops": gflop / onednn,
                "gemm_gflops": gflop / gemm,
                "onednn_over_gemm": onednn / gemm,
            }
            line = (
                f"{dname} {cin}→{cout} {size}² s{stride} ({rows} rows, {counts[shape]}): "
                f"oneDNN {1e3 * onednn:.2f} ms ({gflop / onednn:.0f} GFLOP/s), "
                f"GEMM {1e3 * gemm:.2f} ms ({gflop / gemm:.0f}), ×{onednn / gemm:.2f}"
            )
            # the kernels that compete with the better of oneDNN and the GEMM
            for kernel, label in (("amx", "AMX"), ("fp16", "fp16")):
                if kernel in t:
                    mine, best = t[kernel].median_s, min(onednn, gemm)
                    record |= {
                        f"{kernel}_ms": 1e3 * mine,
                        f"{kernel}_gflops": gflop / mine,
                        f"best_other_over_{kernel}": best / mine,
                    }
                    line += (
                        f", {label} {1e3 * mine:.2f} ms ({gflop / mine:.0f}), ×{best / mine:.2f}"
                    )
            for kernel in ("ours", "against"):
                if kernel in t:
                    mine = t[kernel].median_s
                    record |= {f"{kernel}_ms": 1e3 * mine, f"{kernel}_gflops": gflop / mine}
                    line += f", {kernel} {1e3 * mine:.2f} ms ({gflop / mine:.0f})"
            if "fp16_against" in t:
                other, mine = t["fp16_against"].median_s, t["fp16"].median_s
                # the next call of each takes the same set of tensors
                diff = (ops["fp16_against"]() - ops["fp16"]()).abs().max().item()
                record |= {
                    "fp16_against_ms": 1e3 * other,
                    "fp16_against_over_fp16": other / mine,
                    "fp16_against_difference": diff,
                }
                line += (
                    f", fp16 against {1e3 * other:.2f} ms (×{other / mine:.3f}, diff {diff:.1e})"
                )
            results["weight_grad"][f"{dname}/{cin}-{cout}/{size}/s{stride}"] = record
            print(line, flush=True)
    for name in models:
        t = interleaved({k: (f, 1) for k, f in sgd_ops(name).items()}, rounds=args.rounds, iters=5)
        results["sgd"][name] = {k: 1e3 * v.median_s for k, v in t.items()}
        print(
            f"SGD step {name}: " + ", ".join(f"{k} {1e3 * v.median_s:.2f} ms" for k, v in t.items())
        )
    config = {
        **vars(args),
        "against": str(args.against) if args.against else None,
        "against_fp16": str(args.against_fp16) if args.against_fp16 else None,
    }
    path = write_results(args.out, "bench-pointwise-train", config, results)
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
