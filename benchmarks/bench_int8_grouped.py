"""Int8 grouped 3×3s: our VNNI kernel vs torch's quantized engine, per ResNeXt-50 layer and in the network.

Usage: .venv/bin/python benchmarks/bench_int8_grouped.py [--batch 16] [--rounds 7]
Per layer (ResNeXt-50 32×4d's grouped 3×3s, stride 1 and the stride-2 first blocks of stages
2–4), side by side in interleaved rounds: torch's quantized convolution on its engine
(`engine-grouped`), our kernel (`ours-grouped`) and ResNet-50's dense int8 3×3 of the same stage
(`engine-dense-resnet50`). Then the networks (random weights, calibrated on a batch of their own)
timed by layer kind with forward hooks: ResNeXt-50 with the grouped 3×3s on the engine and on our
kernel, and ResNet-50.
"""

from __future__ import annotations

import time
import warnings
from collections import defaultdict

import torch
from torch import nn

import bench_args
import resnext
from resnext.speed import grouped_int8
from resnext.speed.int8 import quantize_conv, quantize_int8, quantized_engine, resolve_engine
from resnext.speed.measure import interleaved
from resnext.speed.provenance import write_results

# (channels, input size, stride) of ResNeXt-50 32x4d's grouped 3x3s; ResNet-50's width per stage
LAYERS = [
    (128, 56, 1),
    (256, 56, 2),
    (256, 28, 1),
    (512, 28, 2),
    (512, 14, 1),
    (1024, 14, 2),
    (1024, 7, 1),
]
RESNET_WIDTH = {128: 64, 256: 128, 512: 256, 1024: 512}


def quantized_conv(channels: int, groups: int, size: int, stride: int, batch: int):
    """A quantized conv+ReLU with random weights, and a quint8 input for it."""
    conv = nn.Conv2d(channels, channels, 3, stride, 1, groups=groups)
    return quantize_conv(
        conv, torch.randn(batch, channels, size, size), relu=True, activation_bits=7
    )


def layer_rows(batch: int, rounds: int) -> dict[str, dict[str, float]]:
    rows: dict[str, dict[str, float]] = {}
    for c, size, stride in LAYERS:
        grouped, qx = quantized_conv(c, 32, size, stride, batch)
        rn = RESNET_WIDTH[c]
        dense, qxd = quantized_conv(rn, 1, size, stride, batch)
        kernel = grouped_int8.GroupedInt8(grouped)
        scale, zp = float(grouped.scale), int(grouped.zero_point)
        variants = {
            "engine-grouped": (lambda g=grouped, q=qx: g(q), batch),
            "ours-grouped": (lambda k=kernel, q=qx, s=scale, z=zp: k(q, s, z), batch),
            "engine-dense-resnet50": (lambda d=dense, q=qxd: d(q), batch),
        }
        with torch.no_grad():
            timings = interleaved(variants, rounds=rounds, iters=5)
        key = f"c{c}/{size}x{size}/s{stride}"
        rows[key] = {v: 1e3 * t.median_s / batch for v, t in timings.items()}
        ours, engine = rows[key]["ours-grouped"], rows[key]["engine-grouped"]
        print(
            f"{key:18s} ms/img: engine {engine:.3f}  ours {ours:.3f}  "
            f"dense-resnet50 {rows[key]['engine-dense-resnet50']:.3f}  engine/ours {engine / ours:.2f}"
        )
    return rows


def profile(name: str, kernel: bool, batch: int, passes: int = 5) -> dict[str, float]:
    """ms per image by layer kind in the int8 network (grouped 3×3 timed around the block's
    conv2 call, whichever runs it)."""
    model = resnext.create_model(name).eval()
    calibration = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    net = quantize_int8(model, [calibration]).use_grouped_kernel(kernel)
    totals: dict[str, float] = defaultdict(float)
    for block in (b for s in net.stage_names for b in getattr(net, s)):
        inner = block._conv2
        kind = "grouped 3x3" if block.conv2.groups > 1 else "dense 3x3"

        def timed(x, inner=inner, kind=kind):
            start = time.perf_counter()
            out = inner(x)
            totals[kind] += time.perf_counter() - start
            return out

        block._conv2 = timed
    x = torch.randn(batch, 3, 224, 224).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        net(x)
        totals.clear()
        start = time.perf_counter()
        for _ in range(passes):
            net(x)
        total = (time.perf_counter() - start) / passes
    out = {k: 1e3 * v / passes / batch for k, v in totals.items()}
    out["everything else"] = 1e3 * total / batch - sum(out.values())
    out["total"] = 1e3 * total / batch
    return out


def main() -> int:
    parser = bench_args.parser(__doc__, batch=16, rounds=7)
    args = parser.parse_args()
    reason = grouped_int8.unavailable_reason()
    if reason is not None:
        print(f"our int8 grouped kernel does not run here: {reason}")
        return 1
    engine = resolve_engine("auto")
    results: dict[str, object] = {"engine": engine}
    with warnings.catch_warnings(), quantized_engine(engine):
        warnings.simplefilter("ignore")  # torch.ao's and quantized tensors' deprecation notices
        results["layers"] = layer_rows(args.batch, args.rounds)
        profiles = {}
        for name, kernel in (
            ("resnext50_32x4d", False),
            ("resnext50_32x4d", True),
            ("resnet50", False),
        ):
            label = f"{name}+ours" if kernel else name
            profiles[label] = profile(name, kernel, args.batch)
            print(
                f"{label} ms/img: " + ", ".join(f"{k} {v:.2f}" for k, v in profiles[label].items())
            )
        results["profile"] = profiles
    path = write_results(args.out, "bench-int8-grouped", vars(args), results)
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
