"""A whole network run with one of our CPU kernels built from this checkout and from another source.

Usage: .venv/bin/python benchmarks/bench_network_ab.py
       --kernel pointwise_fma|pointwise_bf16|pointwise_fp16|grouped|grouped_bf16|grouped_split|
                grouped_wgrad_bf16|pointwise_wgrad_amx
       --against OLD.c [--models resnext50_32x4d] [--batch 16] [--image-size N] [--rounds 11]
       [--step infer|train] [--backend inductor|none]

The kernel-level A/Bs (`bench_grouped_ab.py`, `bench_pointwise_fma.py --blockings`) time each
layer on its own, its input left in cache by the call before; a change that wins there can be
lost in the network (stop 33: prefetches that took 5–9 % off ResNeXt-50's 1×1s timed alone gained
0–3 % in the network, within its noise). This times what a user gets:
- `--step infer`: `optimize` builds the model once per source, that source's build in place
  while it times and compiles, with the kernel forced on (every layer it takes, so that both run
  it at the same layers rather than at per-layer picks that differ by noise) and our other
  kernels off (likewise; the AMX grouped kernels reported unavailable, or on a CPU with AMX the
  grouped layers could take them instead of the source under test); the two then run the batch in
  alternating rounds (3 calls a round), each with its own build swapped in;
- `--step train`: one fast-path training step (`cl-fp32-fused-grouped-gemm`, as `resnext bench
  train`), the two builds taking turns step by step on the same model, our kernel pinned wherever
  the step offers it (and torch's convolutions elsewhere) rather than picked by timing.
`--kernel pointwise_fma` swaps this CPU's build of the float32 1×1s (`kernels/pointwise_fma512.c`
on AVX-512, `kernels/pointwise_fma.c` on AVX2), `--kernel
pointwise_bf16` `kernels/pointwise_gemm.c` (the bf16 1×1s; the network runs in bf16, and in
training the bf16 step), `--kernel grouped` this CPU's grouped 3×3 forward source
(`kernels/grouped3x3_avx2.c` on AVX2; in training also the stride-1 input gradient), `--kernel
grouped_bf16` the same source with the network in bf16 (on AVX-512: its pair kernels where they
take a layer), `--kernel grouped_split` the same source with bf16's split-order kernels
(`kernels/grouped3x3_split.h`, included by name: an old copy beside `--against`'s source is
the one that build takes; inference only), `--kernel grouped_wgrad_bf16`
`kernels/grouped3x3_wgrad.c` (the grouped weight gradient of the bf16 step, its pair kernel
pinned; training only), `--kernel pointwise_wgrad_amx` `kernels/pointwise_wgrad_amx.c` (the 1×1
weight gradient on AMX tiles, pinned with the other AMX training kernels; training only, on a
CPU with AMX), `--kernel pointwise_fp16` `kernels/pointwise_fp16.c` (float16 products in the
float32 1×1s, `optimize(model, "fp16")` and `train.fp16_products`: the products, both gradients;
on a CPU with AVX512-FP16). First both
builds are checked to compute the same function (inference outputs, or one training step's loss
and update from the same weights), to float32's or bf16's precision. Reports each build's
median, the per-round ratio (against ÷ ours, time) and the rounds each won, and that ratio in
the rounds below and at or above the median of a matrix-product probe run before each round
(`measure.ratios_by_phase`): on a machine whose speed moves, whether the phase moved it.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import statistics
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

import bench_args
import resnext
from resnext.native import NativeUnavailable
from resnext.speed import (
    autotune,
    grouped_amx,
    grouped_kernel,
    grouped_quads,
    grouped_split,
    grouped_wgrad,
    pointwise_fma,
    pointwise_fp16,
    pointwise_gemm,
    pointwise_wgrad_amx,
)
from resnext.speed.allocator import keep_freed_memory
from resnext.speed.fastpath import default_example, optimize
from resnext.speed.measure import interleaved, matmul_probe, phase_lines, ratios_by_phase
from resnext.speed.provenance import write_results
from resnext.speed.train_bench import make_step

OPTIMIZE_KERNELS = (
    "grouped_kernel",
    "fuse_pointwise",
    "fuse_block",
    "conv_x3",
    "fuse_stem",
    "pointwise_fma",
    "pointwise_bf16",
    "pointwise_mkl",
    "pointwise_fp16",
    "split_groups",
)


@dataclasses.dataclass(frozen=True)
class Subject:
    """A kernel this bench swaps: the network's dtype, `optimize`'s switch for it, the training
    variant that runs it, and the agreement asked of the two builds."""

    dtype: str
    switch: str  # one of OPTIMIZE_KERNELS, forced on (the others off)
    train_variant: str
    # training: the candidates pinned (autotune's names), so that both builds run the kernel
    # wherever it is offered and the rest as torch does, whatever a timing would pick
    pinned: tuple[str, ...]
    infer_tolerance: float  # output against the plain float32 model, relative to its largest
    train_tolerance: float  # loss and update of the two builds, relative


FP32 = {"dtype": "fp32", "train_variant": "cl-fp32-fused-grouped-gemm", "infer_tolerance": 1e-4}
FP32_TRAIN = 1e-3
# bf16's 8 significant bits through the network (the registry test's bound)
BF16 = {"dtype": "bf16", "train_variant": "cl-bf16-fused-grouped-gemm", "infer_tolerance": 3e-2}
SUBJECTS = {
    "pointwise_fma": Subject(**FP32, switch="pointwise_fma", pinned=("ours-fma",), train_tolerance=FP32_TRAIN),
    "pointwise_bf16": Subject(**BF16, switch="pointwise_bf16", pinned=("ours",), train_tolerance=2e-2),
    "grouped": Subject(**FP32, switch="grouped_kernel", pinned=("ours",), train_tolerance=FP32_TRAIN),
    "grouped_bf16": Subject(**BF16, switch="grouped_kernel", pinned=("ours-pairs", "ours"), train_tolerance=2e-2),
    # inference only: the training step has no split-order kernel
    "grouped_split": Subject(**BF16, switch="split_groups", pinned=(), train_tolerance=2e-2),
    # training only: inference has no weight gradient (its switch: none)
    "grouped_wgrad_bf16": Subject(**BF16, switch="", pinned=("ours-pairs",), train_tolerance=2e-2),
    # training only; "ours-amx" also pins the grouped products' AMX kernels, the same in both builds
    "pointwise_wgrad_amx": Subject(**BF16, switch="", pinned=("ours-amx",), train_tolerance=2e-2),
    # float32 with float16 products in the 1×1s (forward, input and weight gradients): the
    # registry test's bound, an eighth of bf16's, against the float32 model
    "pointwise_fp16": Subject(dtype="fp16", switch="pointwise_fp16", train_variant="cl-fp32-fused-grouped-gemm-fp16",
                              pinned=("ours-fp16",), infer_tolerance=3e-2 / 8, train_tolerance=FP32_TRAIN),
}  # fmt: skip

Swap = Callable[[str], contextlib.AbstractContextManager[None]]


@contextlib.contextmanager
def replaced(owner: object, attribute: str, value: object) -> Iterator[None]:
    """`owner.attribute` set to `value` for the block, restored however it ends."""
    before = getattr(owner, attribute)
    setattr(owner, attribute, value)
    try:
        yield
    finally:
        setattr(owner, attribute, before)


def swapper(kernel: str, against: Path) -> Swap:
    """`use(build)`: a context in which `kernel` runs this checkout's build ('ours') or
    `against`'s ('against'), both built before the first use."""
    if kernel == "pointwise_fma":
        libs = {"ours": pointwise_fma.load(), "against": pointwise_fma.load(source=against)}
        return lambda build: replaced(pointwise_fma, "_library", lambda: libs[build])
    if kernel == "pointwise_bf16":
        libs = {"ours": pointwise_gemm.load(), "against": pointwise_gemm.load(source=against)}
        return lambda build: replaced(pointwise_gemm, "_library", lambda: libs[build])
    if kernel == "pointwise_fp16":
        libs = {"ours": pointwise_fp16.load(), "against": pointwise_fp16.load(source=against)}
        return lambda build: replaced(pointwise_fp16, "_library", lambda: libs[build])
    if kernel == "pointwise_wgrad_amx":
        libs = {"ours": pointwise_wgrad_amx.load(), "against": pointwise_wgrad_amx.load(against)}
        return lambda build: replaced(pointwise_wgrad_amx, "_library", lambda: libs[build])
    if kernel == "grouped_wgrad_bf16":
        isa = grouped_kernel.ISA
        libs = {"ours": grouped_wgrad.load(isa), "against": grouped_wgrad.load(isa, against)}
        return lambda build: replaced(grouped_wgrad, "_library", lambda: libs[build])
    isas = {"ours": grouped_kernel.ISA}
    # the same name: the weight gradient and batch-norm builds are looked up by it
    isas["against"] = dataclasses.replace(grouped_kernel.ISA, source=against)
    for isa in isas.values():
        grouped_kernel._library_for(isa)
    return lambda build: replaced(grouped_kernel, "ISA", isas[build])


def unavailable(kernel: str) -> str | None:
    """Why `kernel` cannot run on this CPU, or None."""
    if kernel == "pointwise_fma":
        return pointwise_fma.unavailable_reason()
    if kernel == "pointwise_bf16":
        return pointwise_gemm.unavailable_reason()
    if kernel == "pointwise_fp16":
        return pointwise_fp16.unavailable_reason()
    if kernel == "grouped_bf16":
        return grouped_kernel.unavailable_reason(torch.bfloat16)
    if kernel == "grouped_wgrad_bf16":
        if not grouped_wgrad.wide_takes(torch.bfloat16):
            return "its pair kernel needs AVX512-BF16 and the AVX-512 build"
        return grouped_wgrad.unavailable_reason(torch.bfloat16)
    if kernel == "grouped_split":
        return grouped_split.unavailable_reason()
    if kernel == "pointwise_wgrad_amx":
        return pointwise_wgrad_amx.unavailable_reason()
    return grouped_kernel.unavailable_reason(torch.float32)


def _amx_off(dtype: torch.dtype = torch.bfloat16) -> str:
    """The AMX grouped kernels' `unavailable_reason` while a build is optimized: every subject is a
    vector kernel."""
    return "off in this bench, which times a vector kernel's source"


def inference_calls(
    model: torch.nn.Module, x: torch.Tensor, kernel: str, backend: str, use: Swap
) -> dict[str, Callable[[], object]]:
    """Each build's `optimize`d model on x, checked to agree with the plain model."""
    # the other kernels off: their per-layer picks would differ between the builds by noise
    subject = SUBJECTS[kernel]
    forced = dict.fromkeys(OPTIMIZE_KERNELS, "off")
    forced[subject.switch] = "on"
    with torch.no_grad():
        reference = model(x)
    calls = {}
    for build in ("ours", "against"):
        with (
            use(build),
            replaced(grouped_amx, "unavailable_reason", _amx_off),
            replaced(grouped_quads, "unavailable_reason", _amx_off),
        ):
            fast = optimize(model, subject.dtype, backend=backend, example_input=x, **forced)
            with torch.no_grad():
                error = ((fast(x) - reference).abs().max() / reference.abs().max()).item()
        if error > subject.infer_tolerance:
            raise RuntimeError(f"{build}: output off the plain model's by {error:.2e} relative")

        def call(fast: torch.nn.Module = fast, build: str = build) -> object:
            with use(build), torch.no_grad():
                return fast(x)

        calls[build] = call
    return calls


def check_training_agrees(
    model: torch.nn.Module, x: torch.Tensor, labels: torch.Tensor, kernel: str, use: Swap
) -> None:
    """A RuntimeError unless a step from the same weights gives both builds the same loss and
    the same update (relative to the largest one), to the subject's tolerance."""
    subject = SUBJECTS[kernel]
    before = [p.detach().clone() for p in model.parameters()]
    after: dict[str, tuple[float, list[torch.Tensor]]] = {}
    for build in ("ours", "against"):
        twin = copy.deepcopy(model)
        step = make_step(twin, subject.train_variant, x, labels)
        with use(build), autotune.CHOOSER.prefer(*subject.pinned):
            loss = step()
        after[build] = (
            loss,
            [p.detach() - b for p, b in zip(twin.parameters(), before, strict=True)],
        )
    (loss, ours), (other_loss, against) = after["ours"], after["against"]
    largest = max(d.abs().max().item() for d in ours)
    off = max((d - e).abs().max().item() for d, e in zip(ours, against, strict=True))
    tol = subject.train_tolerance
    if abs(loss - other_loss) > tol * abs(loss) or off > tol * largest:
        raise RuntimeError(
            f"against: a training step differs from ours (loss {other_loss:.6f} against "
            f"{loss:.6f}, update off by {off:.2e} of at most {largest:.2e})"
        )


def training_calls(
    model: torch.nn.Module, x: torch.Tensor, kernel: str, use: Swap
) -> dict[str, Callable[[], object]]:
    """One fast-path SGD step on the same model with each build in place, both first checked
    to compute the same step."""
    labels = torch.randint(0, model.num_classes, (x.shape[0],))
    check_training_agrees(model, x, labels, kernel, use)
    subject = SUBJECTS[kernel]
    step = make_step(model, subject.train_variant, x, labels)

    def call_with(build: str) -> Callable[[], object]:
        def call() -> object:
            with use(build), autotune.CHOOSER.prefer(*subject.pinned):
                return step()

        return call

    return {build: call_with(build) for build in ("ours", "against")}


def main() -> int:
    parser = bench_args.parser(__doc__, models="resnext50_32x4d", batch=16, rounds=11)
    parser.add_argument("--kernel", choices=tuple(SUBJECTS), required=True)
    parser.add_argument("--against", type=Path, required=True, help="another source of the kernel")
    parser.add_argument("--step", choices=("infer", "train"), default="infer")
    parser.add_argument("--backend", choices=("inductor", "none"), default="inductor")
    parser.add_argument(
        "--image-size", type=int, help="the input's side (default: 224, or 32 for a CIFAR model)"
    )
    args = parser.parse_args()
    if args.image_size is not None and args.image_size < 32:
        print(f"--image-size: expected at least 32 (five stride-2 steps), got {args.image_size}")
        return 1
    if not args.against.is_file():
        print(f"--against {args.against}: no such file (expected a {args.kernel} kernel source)")
        return 1
    if args.step == "train" and not SUBJECTS[args.kernel].pinned:
        print(f"--kernel {args.kernel} is an inference kernel: the training step does not run it")
        return 1
    if args.step == "infer" and not SUBJECTS[args.kernel].switch:
        print(f"--kernel {args.kernel} is a training kernel: inference does not run it")
        return 1
    reason = unavailable(args.kernel)
    if reason is not None:
        print(f"the {args.kernel} kernel cannot run here: {reason}")
        return 1
    keep_freed_memory()
    try:
        use = swapper(args.kernel, args.against.resolve())
    except NativeUnavailable as exc:  # e.g. a source that does not compile
        print(f"--against {args.against}: {exc}")
        return 1
    results = {}
    probe = matmul_probe()  # one product's operands for every model's rounds
    for name in args.models.split(","):
        torch.manual_seed(0)
        model = resnext.create_model(name)
        x = default_example(model, args.batch)  # 224², or 32² for a CIFAR model
        if args.image_size is not None:
            x = torch.randn(args.batch, x.shape[1], args.image_size, args.image_size)
        try:
            if args.step == "infer":
                calls = inference_calls(model.eval(), x, args.kernel, args.backend, use)
            else:
                calls = training_calls(model, x, args.kernel, use)
        except RuntimeError as exc:  # the two builds do not compute the same function
            print(f"{name}: {exc}")
            return 1
        # the builds take turns (and turns about who goes first), each round tagged by the probe
        timings = interleaved(
            {build: (call, args.batch) for build, call in calls.items()},
            rounds=args.rounds,
            iters=3 if args.step == "infer" else 1,
            probe=probe,
        )
        seconds = {build: t.seconds for build, t in timings.items()}
        ratios = [a / o for o, a in zip(seconds["ours"], seconds["against"], strict=True)]
        median_ms = {build: 1e3 * statistics.median(s) for build, s in seconds.items()}
        by_phase = ratios_by_phase(timings, "ours")
        against_over_ours = by_phase["time_ratios"]["against"]["all"]
        results[name] = {
            "median_ms": median_ms,
            "ms": {build: [1e3 * t for t in s] for build, s in seconds.items()},
            "probe_gflops": timings["ours"].probe_gflops,
            "against_over_ours_per_round_median": against_over_ours,
            "ours_faster_rounds": sum(r > 1 for r in ratios),
            "by_phase": by_phase,
        }
        print(
            f"{name} {args.step} (batch {args.batch}): ours {median_ms['ours']:.1f} ms, against "
            f"{median_ms['against']:.1f} ms; against ÷ ours per round {against_over_ours:.3f}"
            f", ours faster in {results[name]['ours_faster_rounds']} of {args.rounds}"
        )
        print("\n".join(phase_lines(by_phase)))
    config = {**vars(args), "against": str(args.against)}
    path = write_results(args.out, "bench-network-ab", config, results)
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
