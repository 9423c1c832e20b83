"""Float32 1×1 convolutions: oneDNN (as the frozen graph runs it) vs each build of our FMA kernel.

Usage: .venv/bin/python benchmarks/bench_pointwise_fma.py [--batch 16] [--rounds 7]
           [--models resnext50_32x4d,resnet50] [--blockings "K_SLICE=128;TILES_PER_BLOCK=2"]

Every distinct 1×1 convolution of the models (input shape, outputs, stride, taken from the
models themselves) is timed by oneDNN and by each build of `pointwise_fma` this CPU runs
(`avx512`: `kernels/pointwise_fma512.c`, `avx2`: `kernels/pointwise_fma.c`; the first is the
one `optimize` uses) with what follows it in the frozen graph, interleaved: a
block's last 1×1 with the residual add and ReLU written over the residual, the others with a
ReLU into a new output (a projection shortcut has none, timed with one all the same). Weighted
by how often each model has each: the models' whole 1×1 time a batch, oneDNN's against ours. `--blockings`
adds builds of the first build's source with other blocking constants (`;`-separated builds,
each a `,`-separated list of NAME=VALUE compiler defines), to rerun the choice the kernel's
comment records on another CPU.
"""

from __future__ import annotations

import ctypes
import functools
from collections import Counter
from collections.abc import Callable

import torch
from torch import nn

import bench_args
import resnext
from resnext.speed import operators, pointwise_fma
from resnext.speed.allocator import keep_freed_memory
from resnext.speed.conv_x3_swap import fma_eligible
from resnext.speed.dense_swap import onednn_runner
from resnext.speed.fold import fold_batchnorm
from resnext.speed.grouped_swap import input_shapes
from resnext.speed.measure import interleaved
from resnext.speed.provenance import write_results

# batch, in, out, height, width, stride, and whether the residual add comes after
Shape = tuple[int, int, int, int, int, int, bool]


def model_shapes(name: str, batch: int) -> Counter[Shape]:
    """How many of each 1×1 convolution shape the kernel takes `name` has at 224²."""
    model = fold_batchnorm(resnext.create_model(name).eval())
    names = [n for n, m in model.named_modules() if fma_eligible(m)]
    seen = input_shapes(model, names, torch.randn(batch, 3, 224, 224))
    counts: Counter[Shape] = Counter()
    for layer, (n, c, h, w) in seen.items():
        conv = model.get_submodule(layer)
        add = layer.endswith("conv3")  # a bottleneck's last 1×1
        counts[(n, c, conv.out_channels, h, w, conv.stride[0], add)] += 1
    return counts


def label(shape: Shape) -> str:
    _, cin, cout, h, w, stride, add = shape
    return f"{cin}->{cout} {h}x{w} s{stride} {'+add+relu' if add else '+relu'}"


def time_layers(
    shapes: list[Shape],
    variants_of: Callable[[Shape], dict[str, tuple]],
    rounds: int,
    digits: int = 2,
) -> dict[str, dict[str, dict[str, float]]]:
    """Each shape's ways (`variants_of`, oneDNN's first) timed interleaved, as ms and GFLOP/s by
    label, each printed against oneDNN's (ms to `digits` decimals)."""
    layers: dict[str, dict[str, dict[str, float]]] = {}
    for shape in shapes:
        n, cin, cout, h, w, stride, _ = shape
        flops = 2 * n * cin * cout * ((h - 1) // stride + 1) * ((w - 1) // stride + 1)
        with torch.no_grad():
            timings = interleaved(variants_of(shape), rounds=rounds, iters=3)
        key = label(shape)
        layers[key] = {
            v: {"median_ms": 1e3 * t.median_s, "gflops": flops / t.median_s / 1e9}
            for v, t in timings.items()
        }
        base = layers[key]["onednn"]["median_ms"]
        row = "  ".join(
            f"{v} {r['median_ms']:.{digits}f} ms ({r['gflops']:.0f} GFLOP/s, "
            f"{base / r['median_ms']:.2f}×)"
            for v, r in layers[key].items()
        )
        print(f"{key:32s} {row}", flush=True)
    return layers


def model_totals(
    per_model: dict[str, Counter[Shape]],
    layers: dict[str, dict[str, dict[str, float]]],
    variants: tuple[str, ...],
    what: str,
) -> dict[str, dict[str, float]]:
    """Each model's layers summed per variant (ms a batch, each shape as often as the model has
    it), printed against the first variant."""
    totals: dict[str, dict[str, float]] = {}
    for name, counts in per_model.items():
        totals[name] = {
            v: sum(layers[label(s)][v]["median_ms"] * k for s, k in counts.items())
            for v in variants
        }
        base = totals[name][variants[0]]
        print(
            f"{name}: its {sum(counts.values())} {what} a batch: "
            + ", ".join(f"{v} {ms:.1f} ms ({base / ms:.3f}×)" for v, ms in totals[name].items())
        )
    return totals


def time_models(
    per_model: dict[str, Counter[Shape]],
    variants_of: Callable[[Shape], dict[str, tuple]],
    ways: tuple[str, ...],
    rounds: int,
    digits: int = 2,
) -> tuple[list[Shape], dict[str, dict[str, dict[str, float]]], dict[str, dict[str, float]]]:
    """The models' distinct 1×1 shapes, each timed its ways (`time_layers`), and each model's
    1×1s summed per way (`model_totals`)."""
    shapes = sorted({s for counts in per_model.values() for s in counts}, key=lambda s: s[1:])
    layers = time_layers(shapes, variants_of, rounds, digits)
    return shapes, layers, model_totals(per_model, layers, ways, "1×1s")


def time_ours_against(
    models: str,
    batch: int,
    rounds: int,
    taken: Callable[[Counter[Shape]], Counter[Shape]],
    shape_variants: Callable[..., dict[str, tuple]],
    against: ctypes.CDLL | None,
) -> tuple[list[Shape], dict[str, dict[str, dict[str, float]]], dict[str, dict[str, float]]]:
    """`time_models` for a kernel's layer bench: each model's (comma-separated `models`) 1×1s
    that `taken` keeps, oneDNN's way and ours (`shape_variants(shape, against=...)`), and with
    `against` another build's."""
    per_model = {name: taken(model_shapes(name, batch)) for name in models.split(",")}
    variants_of = functools.partial(shape_variants, against=against)
    ways = ("onednn", "ours") + (("against",) if against is not None else ())
    return time_models(per_model, variants_of, ways, rounds, digits=3)


def keep_freed_memory_as_bench_runs() -> None:
    """Keep freed memory, as `resnext bench` runs, and say which: without it every new output
    is a fresh mmap, page-faulted in by whichever kernel writes it first, which is most of a
    56² layer's time in both ways."""
    kept = keep_freed_memory()
    print(f"allocator: glibc, freed memory {'kept' if kept else 'returned (not glibc?)'}")


def shape_variants(shape: Shape, builds: dict[str, ctypes.CDLL]) -> dict[str, tuple]:
    """oneDNN and each build of ours on one shape, as `interleaved` takes them."""
    n, cin, cout, h, w, stride, add = shape
    conv = nn.Conv2d(cin, cout, 1, stride=stride).eval().requires_grad_(False)
    x = torch.randn(n, cin, h, w).contiguous(memory_format=torch.channels_last)
    onednn = onednn_runner(conv, True, tuple(x.shape))
    packed = pointwise_fma.pack(conv.weight)
    bias = conv.bias.detach().contiguous()
    out = operators.pointwise_output_shape(tuple(x.shape), cout, stride)
    # written over in place, as in the graph: its values drift from call to call
    res = torch.randn(out).contiguous(memory_format=torch.channels_last) if add else None
    threads = torch.get_num_threads()
    variants: dict[str, tuple] = {"onednn": (lambda: onednn(x, res), n)}
    for name, lib in builds.items():

        def ours(lib: ctypes.CDLL = lib) -> torch.Tensor:
            # a new output each call, as oneDNN's and the operator's, unless written in place
            y = torch.empty(out, memory_format=torch.channels_last) if res is None else res
            args = (x.data_ptr(), packed.data_ptr(), bias.data_ptr(), None, y.data_ptr())
            if res is not None:
                args = (*args[:3], y.data_ptr(), y.data_ptr())
            lib.pointwise_fma(*args, n, h, w, cin, cout, stride, 1, threads)
            return y

        variants[name] = (ours, n)
    return variants


def main() -> int:
    parser = bench_args.parser(__doc__, batch=16, rounds=7, models="resnext50_32x4d,resnet50")
    parser.add_argument("--blockings", default="", help="extra builds: 'A=1,B=2;C=3'")
    args = parser.parse_args()
    keep_freed_memory_as_bench_runs()
    reason = pointwise_fma.unavailable_reason()
    if reason is not None:
        print(f"the kernel cannot run here: {reason}")
        return 1
    runnable = pointwise_fma.CHOICE.runnable()
    builds = {b.name: pointwise_fma.library(b) for b in runnable}
    for spec in filter(None, args.blockings.split(";")):
        defines = tuple(f"-D{d}" for d in spec.split(","))
        builds[f"{runnable[0].name} {spec}"] = pointwise_fma.load(defines, build=runnable[0])
    per_model = {name: model_shapes(name, args.batch) for name in args.models.split(",")}
    variants_of = functools.partial(shape_variants, builds=builds)
    _, layers, totals = time_models(per_model, variants_of, ("onednn", *builds), args.rounds)
    config = vars(args)
    path = write_results(
        args.out, "bench-pointwise-fma", config, {"layers": layers, "totals": totals}
    )
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
