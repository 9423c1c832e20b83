"""Where an inference batch's time goes, layer by layer, on our eager fast path (and OpenVINO's).

Usage: .venv/bin/python benchmarks/bench_infer_layers.py [--models resnext50_32x4d,resnet50]
           [--batch 16] [--image-size 224] [--rounds 5] [--dtype bf16|fp32|fp16] [--top 12]
           [--openvino]

Each model is `optimize`d without a compiled graph (`backend="none"`: the same kernels the
compiled path calls, one module each) and, after two warm-up batches, run `--rounds` times, the
models taking turns within each round (so that a shared machine's slow phase falls on all of
them); each leaf module is timed by a clock read in forward hooks (a few microseconds each); a
layer's time and the batch's are medians over the rounds. Every layer gets
its FLOPs from the plain model's convolutions and linear layers of the same name, so its rate
shows beside its time; layers are summed into kinds (1×1 convolutions, grouped 3×3s, dense
3×3s, the stem, the rest). With two models, their kinds are printed side by side with the
difference, which is where ResNeXt-50's time per image goes beyond ResNet-50's, and the median
over the rounds of their batch times' ratio. With
`--openvino` (where it is installed) OpenVINO's own per-node counters (`PERF_COUNT`) of the same
model and batch are summed by node type too: a peer's breakdown measured the same way it runs.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

import torch
from torch import nn

import bench_args
import resnext
from resnext.speed.allocator import keep_freed_memory
from resnext.speed.fastpath import optimize
from resnext.speed.measure import median_ratio
from resnext.speed.provenance import write_results

KINDS = ("1x1", "grouped 3x3", "dense 3x3", "stem", "other")
SKIP = (nn.Identity, nn.ReLU, nn.Flatten)  # steps that move no data of their own


def plain_layers(model: nn.Module, x: torch.Tensor) -> dict[str, tuple[str, int]]:
    """(kind, FLOPs) of each convolution and linear layer of the plain model on input x."""
    layers: dict[str, tuple[str, int]] = {}
    handles = []
    first = next((n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)), None)

    def record(name: str, module: nn.Module):  # type: ignore[no-untyped-def]
        def hook(mod: nn.Module, inputs: tuple, out: torch.Tensor) -> None:
            if isinstance(mod, nn.Linear):
                layers[name] = ("other", 2 * out.numel() * mod.in_features)
                return
            per_output = mod.in_channels // mod.groups * mod.kernel_size[0] * mod.kernel_size[1]
            if name == first:
                kind = "stem"
            elif mod.kernel_size == (1, 1):
                kind = "1x1"
            else:
                kind = "grouped 3x3" if mod.groups > 1 else "dense 3x3"
            layers[name] = (kind, 2 * out.numel() * per_output)

        return hook

    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d | nn.Linear):
            handles.append(module.register_forward_hook(record(name, module)))
    try:
        with torch.no_grad():
            model(x)
    finally:
        for handle in handles:
            handle.remove()
    return layers


@contextmanager
def leaf_timer(model: nn.Module) -> Iterator[dict[str, float]]:
    """Seconds spent in each leaf module of `model` (summed over calls) while the block runs."""
    seconds: dict[str, float] = defaultdict(float)
    starts: dict[str, float] = {}
    handles = []
    for name, module in model.named_modules():
        if next(module.children(), None) is not None or isinstance(module, SKIP):
            continue

        def before(mod: nn.Module, inputs: tuple, name: str = name) -> None:
            starts[name] = time.perf_counter()

        def after(mod: nn.Module, inputs: tuple, out: object, name: str = name) -> None:
            seconds[name] += time.perf_counter() - starts[name]

        handles.append(module.register_forward_pre_hook(before))
        handles.append(module.register_forward_hook(after))
    try:
        yield seconds
    finally:
        for handle in handles:
            handle.remove()


@dataclasses.dataclass
class Run:
    """One model's eager fast path, its input and plain FLOPs, and what its timed batches took."""

    name: str
    fast: nn.Module
    x: torch.Tensor
    flops: dict[str, tuple[str, int]]
    batches: list[float] = dataclasses.field(default_factory=list)  # seconds, one per round
    by_round: list[dict[str, float]] = dataclasses.field(default_factory=list)  # per leaf


def prepare(name: str, batch: int, size: int, dtype: torch.dtype | str) -> Run:
    """`name` optimized on the eager fast path for a random batch, and its layers' FLOPs."""
    torch.manual_seed(0)
    model = resnext.create_model(name).eval()
    x = torch.randn(batch, 3, size, size)
    flops = plain_layers(model, x)
    return Run(name, optimize(model, dtype, backend="none", example_input=x), x, flops)


def time_rounds(runs: list[Run], rounds: int) -> None:
    """Each round times one batch of every model, in alternating order, each leaf module on its
    own clock: a shared machine's slow phases (2x and more on one of them) then fall on every
    model alike, as one model's rounds after the other's would not."""
    with ExitStack() as stack, torch.no_grad():
        clocks = [stack.enter_context(leaf_timer(run.fast)) for run in runs]
        for run in runs:
            for _ in range(2):
                run.fast(run.x)
        for r in range(rounds):
            turns = list(zip(runs, clocks, strict=True))
            for run, clock in turns if r % 2 == 0 else turns[::-1]:
                before = dict(clock)
                start = time.perf_counter()
                run.fast(run.x)
                run.batches.append(time.perf_counter() - start)
                run.by_round.append({leaf: s - before.get(leaf, 0.0) for leaf, s in clock.items()})


def summary(run: Run) -> dict[str, object]:
    """A model's batch and per-layer ms (medians over the rounds), and the layers by kind."""
    # medians: a mean takes in every burst of load on a shared machine
    total = statistics.median(run.batches)
    layers = []
    for leaf in run.by_round[0]:
        plain = leaf.removeprefix("model.")  # the fast path wraps the model
        kind, flop = run.flops.get(plain, ("other", 0))
        ms = 1e3 * statistics.median(r.get(leaf, 0.0) for r in run.by_round)
        row = {"layer": plain, "module": type(run.fast.get_submodule(leaf)).__name__, "kind": kind}
        row |= {"ms": ms, "gflops": flop / ms / 1e6 if flop and ms else 0.0}
        layers.append(row)
    kinds = {kind: sum(r["ms"] for r in layers if r["kind"] == kind) for kind in KINDS}
    kinds["outside the layers"] = 1e3 * total - sum(kinds.values())
    return {
        "batch_ms": 1e3 * total,
        "rounds_ms": [1e3 * b for b in run.batches],
        "kinds_ms": kinds,
        "layers": layers,
    }


def openvino_profile(
    name: str, batch: int, size: int, dtype: str, rounds: int
) -> dict[str, float] | None:
    """OpenVINO's per-node counters of the model, ms a batch by node and implementation type,
    or None where OpenVINO is not installed."""
    try:
        import openvino as ov
    except ImportError:
        return None
    torch.manual_seed(0)
    model = resnext.create_model(name).eval()
    x = torch.randn(batch, 3, size, size)
    with torch.no_grad():
        converted = ov.convert_model(model, example_input=x)
    config = {
        "INFERENCE_PRECISION_HINT": {"fp32": "f32", "fp16": "f16"}.get(dtype, dtype),
        "INFERENCE_NUM_THREADS": torch.get_num_threads(),
        "PERF_COUNT": "YES",
    }
    request = ov.Core().compile_model(converted, "CPU", config).create_infer_request()
    for _ in range(2):
        request.infer([x.numpy()])
    totals: dict[str, float] = defaultdict(float)
    for _ in range(rounds):
        request.infer([x.numpy()])
        for node in request.get_profiling_info():
            key = f"{node.node_type} ({node.exec_type})"
            totals[key] += node.real_time.total_seconds() * 1e3 / rounds
    return dict(sorted(totals.items(), key=lambda kv: -kv[1]))


def main() -> int:
    parser = bench_args.parser(
        __doc__, models="resnext50_32x4d,resnet50", batch=16, image_size=224, rounds=5
    )
    parser.add_argument("--dtype", choices=("bf16", "fp32", "fp16"), default="bf16")
    parser.add_argument("--top", type=int, default=12, help="slowest layers printed per model")
    parser.add_argument("--openvino", action="store_true", help="also OpenVINO's own counters")
    args = parser.parse_args()
    if args.rounds < 1 or args.batch < 1:
        print(f"--rounds and --batch: expected at least 1, got {args.rounds} and {args.batch}")
        return 1
    keep_freed_memory()  # as `resnext bench` runs: no page faults on every batch
    # fp16: float32 with the 1x1s' products in float16 (`optimize`'s "fp16")
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": "fp16"}[args.dtype]
    names = args.models.split(",")
    runs = [prepare(name, args.batch, args.image_size, dtype) for name in names]
    time_rounds(runs, args.rounds)
    results: dict[str, object] = {}
    for name, run in zip(names, runs, strict=True):
        row = summary(run)
        if args.openvino:
            row["openvino_ms"] = openvino_profile(
                name, args.batch, args.image_size, args.dtype, args.rounds
            )
        results[name] = row
        print(f"\n{name} ({args.dtype}, batch {args.batch}): {row['batch_ms']:.1f} ms a batch")
        for layer in sorted(row["layers"], key=lambda r: -r["ms"])[: args.top]:
            print(
                f"  {layer['ms']:7.2f} ms {layer['gflops']:6.0f} GFLOP/s  {layer['layer']:28s} "
                f"{layer['module']}"
            )
        if row.get("openvino_ms"):
            total = sum(row["openvino_ms"].values())
            print(f"  OpenVINO's counters, {total:.1f} ms a batch:")
            for node, ms in list(row["openvino_ms"].items())[:6]:
                print(f"  {ms:7.2f} ms  {node}")
    print(f"\n{'ms a batch':22s}" + "".join(f"{n[:18]:>20s}" for n in names))
    for kind in (*KINDS, "outside the layers"):
        cells = [results[n]["kinds_ms"][kind] for n in names]
        diff = f"{cells[0] - cells[1]:+10.1f}" if len(cells) == 2 else ""
        print(f"{kind:22s}" + "".join(f"{c:20.1f}" for c in cells) + diff)
    if len(runs) == 2:
        # each round's two batches ran back to back: their ratio leaves out the machine's phase
        ratio = median_ratio(runs[0].batches, runs[1].batches)
        results["time_ratio_per_round"] = {f"{names[0]} / {names[1]}": ratio}
        print(f"{names[0]} ÷ {names[1]}, batch time per round (median): {ratio:.3f}")
    path = write_results(args.out, "bench-infer-layers", vars(args), results)
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
