"""The grouped-conv tax: grouped 3×3 implementations vs a dense 3×3, per ResNeXt-50 stage shape.

Usage: .venv/bin/python benchmarks/bench_grouped.py [--batch 16] [--rounds 5] [--dtypes fp32,bf16]
In bf16 on channels-last tensors, `grouped-ours` is the pair kernel in channel order and
`grouped-split` the split-order kernel (`resnext.speed.grouped_split`, its input permuted once).
Also profiles whole-model time per layer kind (grouped 3×3, 1×1, other) with forward hooks,
for ResNeXt-50 with oneDNN's grouped convolution and with our kernel (`grouped_kernel="on"`).
"""

from __future__ import annotations

import time
from collections import defaultdict

import torch
from torch import nn

import bench_args
import resnext
from resnext.speed import grouped, grouped_amx, grouped_kernel, grouped_split
from resnext.speed.fastpath import optimize
from resnext.speed.grouped_swap import FastGroupedConv3x3
from resnext.speed.measure import interleaved
from resnext.speed.provenance import write_results

# (channels, spatial size, stride) of conv2 in the first block of each ResNeXt-50 32x4d stage,
# and of the later blocks (stride 1); the dense reference uses ResNet-50's conv2 widths.
STAGES = [(128, 56, 1), (256, 28, 1), (512, 14, 1), (1024, 7, 1)]
RESNET_WIDTH = {128: 64, 256: 128, 512: 256, 1024: 512}


def layer_variants(
    c: int, size: int, stride: int, batch: int, dtype: torch.dtype, cl: bool, compiled: bool
):
    groups = 32
    fmt = torch.channels_last if cl else torch.contiguous_format
    x = torch.randn(batch, c, size, size).to(dtype).contiguous(memory_format=fmt)
    w = torch.randn(c, c // groups, 3, 3).to(dtype)
    flops = grouped.conv_flops(tuple(x.shape), w, stride)
    rn = RESNET_WIDTH[c]
    xd = torch.randn(batch, rn, size, size).to(dtype).contiguous(memory_format=fmt)
    wd = torch.randn(rn, rn, 3, 3).to(dtype).contiguous(memory_format=fmt)
    variants = {
        "dense-resnet50-3x3": (lambda: torch.nn.functional.conv2d(xd, wd, padding=1), batch),
        "grouped-native": (lambda: grouped.grouped_native(x, w, stride, groups), batch),
        "grouped-bmm": (lambda: grouped.grouped_bmm(x, w, stride, groups), batch),
    }
    if cl and grouped_kernel.unavailable_reason(dtype) is None:
        pairs = grouped_kernel.takes_pairs(c, groups, dtype)  # bf16 pair kernel where it applies
        packed = grouped_kernel.pack_weights(w.float(), groups, pairs)
        variants["grouped-ours"] = (
            lambda: grouped_kernel.run_kernel(x, packed, None, groups, stride),
            batch,
        )
    split = cl and dtype == torch.bfloat16 and grouped_split.supports(c, groups, stride)
    if split and grouped_split.unavailable_reason() is None:
        x_split = x[:, grouped_split.input_order(c, groups)]  # its input in the split order
        x_split = x_split.contiguous(memory_format=torch.channels_last)
        packed_split = grouped_split.pack_weights(w.float(), groups)
        variants["grouped-split"] = (
            lambda: grouped_split.run_split(x_split, packed_split, None, groups, stride),
            batch,
        )
    if cl and grouped_amx.unavailable_reason(dtype) is None:
        packed_amx = grouped_amx.pack_weights(w, groups)
        variants["grouped-ours-amx"] = (
            lambda: grouped_amx.run_kernel(x, packed_amx, None, groups, stride),
            batch,
        )
    for pack in (2, 4, 8):
        pw = grouped.block_diagonal_weight(w, groups, pack).contiguous(memory_format=fmt)
        variants[f"packed-{pack}"] = (
            lambda pw=pw, pack=pack: grouped.grouped_packed(x, pw, stride, groups, pack),
            batch,
        )
    orders, rot = grouped.rotations(w, groups)
    variants["depthwise-sum"] = (
        lambda: grouped.grouped_depthwise_sum(x, orders, rot, stride),
        batch,
    )
    if compiled:
        torch._dynamo.reset()  # one compiled graph per shape; the recompile limit would stop at 8
        shifted = torch.compile(grouped.grouped_shifted_sum, dynamic=False)
        variants["shifted-sum-inductor"] = (lambda: shifted(x, orders, rot, stride), batch)
    dense_flops = grouped.conv_flops(tuple(xd.shape), wd, 1)
    flop_of = {k: flops for k in variants}
    flop_of["dense-resnet50-3x3"] = dense_flops
    return variants, flop_of


def profile_layers(
    name: str, batch: int, dtype: torch.dtype, kernel: str = "off"
) -> dict[str, float]:
    """Seconds per image by layer kind in the eager fast path (BN folded, channels_last)."""
    # 'off': oneDNN for every grouped 3×3, the split-order kernels off too
    split = "off" if kernel == "off" else "auto"
    model = optimize(
        resnext.create_model(name), dtype, backend="none", grouped_kernel=kernel, split_groups=split
    ).model
    totals: dict[str, float] = defaultdict(float)
    starts: dict[int, float] = {}

    def kind(m: nn.Module) -> str:
        if isinstance(m, FastGroupedConv3x3) or (m.kernel_size == (3, 3) and m.groups > 1):
            return "grouped 3x3"
        if m.kernel_size == (3, 3):
            return "dense 3x3"
        return "1x1" if m.kernel_size == (1, 1) else "stem"

    for m in model.modules():
        if isinstance(m, (nn.Conv2d, FastGroupedConv3x3)):
            m.register_forward_pre_hook(
                lambda mod, inp: starts.__setitem__(id(mod), time.perf_counter())
            )
            m.register_forward_hook(
                lambda mod, inp, out: totals.__setitem__(
                    kind(mod), totals[kind(mod)] + time.perf_counter() - starts[id(mod)]
                )
            )
    x = torch.randn(batch, 3, 224, 224).to(dtype).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        model(x)
        totals.clear()
        start = time.perf_counter()
        for _ in range(3):
            model(x)
        total = (time.perf_counter() - start) / 3
    out = {k: v / 3 / batch for k, v in totals.items()}
    out["everything else"] = total / batch - sum(out.values())
    out["total"] = total / batch
    return out


def main() -> int:
    parser = bench_args.parser(__doc__, batch=16, rounds=5, dtypes="fp32,bf16")
    parser.add_argument(
        "--compiled",
        action="store_true",
        help="also time the shifted-sum decomposition compiled by inductor (slow to compile)",
    )
    args = parser.parse_args()
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    results: dict[str, object] = {"layers": {}, "profile": {}}
    for dname in args.dtypes.split(","):
        dtype = dtypes[dname]
        for c, size, stride in STAGES:
            for cl in (False, True):
                variants, flops = layer_variants(
                    c, size, stride, args.batch, dtype, cl, args.compiled
                )
                with torch.no_grad():
                    timings = interleaved(variants, rounds=args.rounds, iters=3)
                key = f"{dname}/c{c}/{size}x{size}/{'channels_last' if cl else 'nchw'}"
                rows = {}
                for v, t in timings.items():
                    rows[v] = {"median_ms": 1e3 * t.median_s, "gflops": flops[v] / t.median_s / 1e9}
                dense = rows["dense-resnet50-3x3"]["gflops"]
                line = "  ".join(f"{v} {r['gflops']:.0f}" for v, r in rows.items())
                print(
                    f"{key:34s} GFLOP/s: {line}  (native/dense {rows['grouped-native']['gflops'] / dense:.2f})"
                )
                results["layers"][key] = rows
        profiles = [("resnext50_32x4d", "off"), ("resnet50", "off")]
        if grouped_kernel.unavailable_reason(dtype) is None:
            profiles.insert(1, ("resnext50_32x4d", "on"))
        for name, kernel in profiles:
            prof = profile_layers(name, args.batch, dtype, kernel)
            label = f"{name}+kernel" if kernel == "on" else name
            results["profile"][f"{dname}/{label}"] = {k: 1e3 * v for k, v in prof.items()}
            print(
                f"{dname}/{label} ms/img: "
                + ", ".join(f"{k} {1e3 * v:.1f}" for k, v in prof.items())
            )
    path = write_results(args.out, "bench-grouped", vars(args), results)
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
