"""Our int8 kernels (grouped 3×3s, residual add-and-ReLUs) vs torch's quantized engine, per layer and in the network.

Usage: .venv/bin/python benchmarks/bench_int8_kernels.py [--batch 16] [--rounds 7] [--against FILE]
Per layer (ResNeXt-50 32×4d's grouped 3×3s, stride 1 and the stride-2 first blocks of stages
2–4), side by side in interleaved rounds: torch's quantized convolution on its engine
(`engine-grouped`), our kernel (`ours-grouped`) and ResNet-50's dense int8 3×3 of the same stage
(`engine-dense-resnet50`). Per residual add (each stage's output shape): torch's add_relu and
ours (skipped where our add kernel cannot run). Then the networks (random weights, calibrated on
a batch of their own) timed by layer kind (the blocks' 3×3s and residual adds, whichever runs
them): ResNeXt-50 and ResNet-50, each on torch's engine alone and with our kernels (the grouped
layers where their first forward timed ours faster), in rounds that alternate their order
(medians).
With `--against FILE` (another revision of the kernel's source this CPU builds,
kernels/grouped3x3_int8.c with AVX512-VNNI, else kernels/grouped3x3_int8_avx2.c, e.g. `git show
REV:src/resnext/speed/kernels/grouped3x3_int8.c > /tmp/old.c`) each layer also times that build
(`against-grouped`), after checking it gives this checkout's codes exactly; the run stops, writing
nothing, where it does not.
(Named bench_int8_grouped.py in stop 63 before the add kernel; its records are
bench-int8-grouped-*.json.)
"""

from __future__ import annotations

import functools
import statistics
import time
import warnings
from collections import defaultdict
from pathlib import Path
from unittest import mock

import torch
from torch import nn
from torch.ao.nn.quantized import QFunctional

import bench_args
import resnext
from resnext.native import NativeUnavailable
from resnext.speed import add_int8, grouped_int8
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


class DifferentCodes(Exception):
    """The --against build computes other codes than this checkout's on a layer."""


def layer_rows(batch: int, rounds: int, against: Path | None = None) -> dict[str, dict[str, float]]:
    rows: dict[str, dict[str, float]] = {}
    # another revision of the build this CPU runs (AVX512-VNNI, else AVX2)
    other = None if against is None else grouped_int8.load(grouped_int8.active(), against)
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
        if other is not None:
            run_other = functools.partial(_with_library, other, kernel, qx, scale, zp)
            if not torch.equal(run_other().int_repr(), kernel(qx, scale, zp).int_repr()):
                raise DifferentCodes(
                    f"{against} gives other codes than this checkout on {c} channels, {size}², stride {stride}"
                )
            variants["against-grouped"] = (run_other, batch)
        with torch.no_grad():
            timings = interleaved(variants, rounds=rounds, iters=5)
        key = f"c{c}/{size}x{size}/s{stride}"
        rows[key] = {v: 1e3 * t.median_s / batch for v, t in timings.items()}
        ours, engine = rows[key]["ours-grouped"], rows[key]["engine-grouped"]
        vs = f"  against/ours {rows[key]['against-grouped'] / ours:.2f}" if other else ""
        print(
            f"{key:18s} ms/img: engine {engine:.3f}  ours {ours:.3f}  "
            f"dense-resnet50 {rows[key]['engine-dense-resnet50']:.3f}  engine/ours {engine / ours:.2f}"
            + vs
        )
    return rows


def _with_library(lib, kernel, qx, scale, zp):
    """`kernel(qx, scale, zp)` on another build of the kernel's library."""
    with mock.patch.object(grouped_int8, "_library", lambda build: lib):
        return kernel(qx, scale, zp)


# (N-less shape) of each ResNeXt-50 (and ResNet-50) stage's residual add
ADDS = [(256, 56), (512, 28), (1024, 14), (2048, 7)]


def add_rows(batch: int, rounds: int) -> dict[str, dict[str, float]]:
    rows: dict[str, dict[str, float]] = {}
    for c, size in ADDS:
        a, b = (
            torch.quantize_per_tensor(torch.randn(batch, c, size, size), scale, zp, torch.quint8)
            for scale, zp in ((0.0513, 117), (0.0731, 96))
        )
        a, b = (t.contiguous(memory_format=torch.channels_last) for t in (a, b))
        engine = QFunctional()
        engine.scale, engine.zero_point = 0.0617, 0
        variants = {
            "engine-add-relu": (functools.partial(engine.add_relu, a, b), batch),
            "ours-add-relu": (functools.partial(add_int8.add_relu, a, b, 0.0617, 0), batch),
        }
        timings = interleaved(variants, rounds=rounds, iters=5)
        key = f"c{c}/{size}x{size}"
        rows[key] = {v: 1e3 * t.median_s / batch for v, t in timings.items()}
        ours, theirs = rows[key]["ours-add-relu"], rows[key]["engine-add-relu"]
        print(
            f"add {key:14s} ms/img: engine {theirs:.3f}  ours {ours:.3f}  engine/ours {theirs / ours:.2f}"
        )
    return rows


def timed_network(name: str, kernel: bool, batch: int):
    """The int8 network (random weights, calibrated on a batch of its own) with its 3×3s and
    residual adds timed: (net, per-kind seconds of the last forward, which the wrappers fill)."""
    model = resnext.create_model(name).eval()
    calibration = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    net = quantize_int8(model, [calibration]).use_kernels(kernel)
    totals: dict[str, float] = defaultdict(float)
    for block in (b for s in net.stage_names for b in getattr(net, s)):
        inner = block._conv2
        kind = "grouped 3x3" if block.conv2.groups > 1 else "dense 3x3"

        def timed(x, inner=inner, kind=kind):
            start = time.perf_counter()
            out = inner(x)
            totals[kind] += time.perf_counter() - start
            return out

        block._conv2 = timed  # around the block's conv2 call, whichever runs it
        if block.residual:
            block._add_relu = functools.partial(_timed_add, block._add_relu, totals)
    return net, totals


def _timed_add(inner, totals, out, identity):
    start = time.perf_counter()
    y = inner(out, identity)
    totals["residual add"] += time.perf_counter() - start
    return y


def profiles(batch: int, rounds: int) -> dict[str, dict[str, float]]:
    """ms per image by layer kind, median over rounds that alternate the networks' order."""
    nets = {
        f"{name}{'+ours' if kernels else ''}": timed_network(name, kernels, batch)
        for name in ("resnext50_32x4d", "resnet50")
        for kernels in (False, True)
    }
    x = torch.randn(batch, 3, 224, 224).contiguous(memory_format=torch.channels_last)
    samples: dict[str, dict[str, list[float]]] = {k: defaultdict(list) for k in nets}
    order = list(nets)
    with torch.no_grad():
        for net, _ in nets.values():
            net(x)
        for r in range(rounds):
            turn = order[r % len(order) :] + order[: r % len(order)]
            for label in turn if r % 2 == 0 else turn[::-1]:
                net, totals = nets[label]
                totals.clear()
                start = time.perf_counter()
                net(x)
                total = time.perf_counter() - start
                for kind, seconds in totals.items():
                    samples[label][kind].append(1e3 * seconds / batch)
                samples[label]["everything else"].append(
                    1e3 * (total - sum(totals.values())) / batch
                )
                samples[label]["total"].append(1e3 * total / batch)
    return {
        label: {kind: statistics.median(v) for kind, v in kinds.items()}
        for label, kinds in samples.items()
    }


def main() -> int:
    parser = bench_args.parser(__doc__, batch=16, rounds=7)
    parser.add_argument(
        "--against", type=Path, help="another revision of the grouped kernel's source to time too"
    )
    args = parser.parse_args()
    if args.against is not None and not args.against.is_file():
        parser.error(f"--against: {args.against} is not a file")
    reason = grouped_int8.unavailable_reason()
    if reason is not None:
        print(f"skipped: our int8 grouped kernel cannot run here ({reason})")
        return 0
    engine = resolve_engine("auto")
    results: dict[str, object] = {"engine": engine, "build": grouped_int8.active().name}
    with warnings.catch_warnings(), quantized_engine(engine):
        warnings.simplefilter("ignore")  # torch.ao's and quantized tensors' deprecation notices
        try:
            results["layers"] = layer_rows(args.batch, args.rounds, args.against)
        except DifferentCodes as exc:
            print(f"against: refused: {exc}")
            return 1
        except NativeUnavailable as exc:
            print(f"against: cannot be used: {exc}")
            return 1
        add_reason = add_int8.unavailable_reason()
        if add_reason is None:
            results["adds"] = add_rows(args.batch, args.rounds)
        else:
            print(f"adds skipped: our int8 add kernel cannot run here ({add_reason})")
        by_kind = profiles(args.batch, args.rounds)
        for label, kinds in by_kind.items():
            print(f"{label} ms/img: " + ", ".join(f"{k} {v:.2f}" for k, v in kinds.items()))
        results["profile"] = by_kind
    path = write_results(args.out, "bench-int8-kernels", vars(args), results)
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
