"""Random cases through our C kernels against reference computations, optionally with every kernel
built with AddressSanitizer.

    .venv/bin/python scripts/fuzz_kernels.py optimize|train|crop|int8 [--cases N] [--seed S] [--asan]

- optimize: `resnext.optimize` on random specs and input sizes, float32, bf16 and float16
  products where this CPU runs them, eager and replayed, every chooser's timings drawn at random;
  outputs against the float64 model, and a replay that refuses its recording is a failure.
- train: one training step of a random spec with the fast paths, every op's implementation drawn
  at random, against the step every op's reference (oneDNN) takes; specs whose last maps leave
  batch norm fewer than 16 values a channel are not drawn (there the gradient is too
  ill-conditioned for any rounding: benchmarks/RESULTS.md, stop 61).
- crop: JPEGs from --root with bytes changed, inserted or cut, through the planned path's crop
  decoder and through Pillow: the same verdict (an image or a DataError), except the documented
  one (damage only below the crop, which the crop decoder never reads: counted, not failed).
- int8: the int8 grouped 3×3 kernel, a build that runs here drawn per case, on random layers
  (channels, group width, stride, ReLU, bias, map sizes from 1 pixel, input ranges that put the
  zero point anywhere in 0–255, 1 or 2 threads) against the quantized convolution's definition
  in float64, and the int8 add-and-ReLU kernel on random pairs of maps (sizes from one value,
  either layout, scales and zero points anywhere) against the quantized add's: at most one code
  off, and only at a few rounding ties.

--asan rebuilds the kernels with -fsanitize=address into their own cache folder and runs again
with libasan (and libstdc++, whose exceptions torch throws) preloaded: a memory error ends the run
with AddressSanitizer's report. Exit status 1 when a case failed. What stops 60 and 61 found
this way is in benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import importlib
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

CHILD = "RESNEXT_FUZZ_ASAN"  # set in the process that runs under AddressSanitizer
ASAN_FLAGS = ("-fsanitize=address", "-fno-omit-frame-pointer", "-g")


def _compiler_file(name: str) -> str:
    cc = os.environ.get("CC", "cc")
    found = subprocess.run([cc, f"-print-file-name={name}"], capture_output=True, text=True)
    path = found.stdout.strip()
    if not os.path.isabs(path) or not os.path.exists(path):
        raise SystemExit(f"--asan: {cc} does not know where {name} is (got {path!r})")
    return path


def _rerun_under_asan(argv: list[str], cache: Path) -> None:
    env = dict(os.environ)
    env[CHILD] = "1"
    env["RESNEXT_KERNEL_CACHE"] = str(cache)
    env["LD_PRELOAD"] = f"{_compiler_file('libasan.so')} {_compiler_file('libstdc++.so.6')}"
    env["ASAN_OPTIONS"] = "detect_leaks=0:halt_on_error=1"  # Python itself leaks by design
    os.execve(sys.executable, [sys.executable, __file__, *argv], env)


def _build_with_asan() -> None:
    from resnext import native

    plain = native.build

    def build(source, flags, libs=(), out_dir=None):
        return plain(source, [*flags, *ASAN_FLAGS], libs, out_dir)

    native.build = build


def _random_spec(rng: random.Random, num_classes: int):
    import resnext

    cardinality = rng.choice([1, 2, 4, 8, 32])
    width = rng.choice([2, 4, 8, 16]) if cardinality > 1 else rng.choice([8, 16, 64])
    stem = rng.choice(["imagenet", "cifar", "deep"])
    depths = tuple(rng.randint(1, 2) for _ in range(3 if stem == "cifar" else 4))
    option = rng.choice([{}, {}, {"avg_down": True}, {"se_reduction": 4}, {"stride_in_1x1": True}])
    spec = resnext.ModelSpec(
        depths=depths, cardinality=cardinality, base_width=width, stem=stem, num_classes=num_classes
    )
    return dataclasses.replace(spec, **option)


def _random_bn(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0.0, 0.1)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_(0.0, 0.1)


def _draw_choices(rng: random.Random) -> Callable[[], None]:
    """Every chooser of `optimize` (the modules timing ways through `timing_cache.cached`) gets
    times drawn from `rng` instead of measured, until the function returned is called."""
    import resnext
    from resnext.speed import timing_cache

    speed = Path(resnext.__file__).parent / "speed"
    imports = re.compile(r"^from resnext\.speed\.timing_cache import .*\bcached\b", re.M)

    def drawn(cache, key, count, measure):
        return [rng.uniform(0.5, 1.5) for _ in range(count)]

    patched = []
    for path in sorted(speed.glob("*.py")):
        if imports.search(path.read_text()):
            module = importlib.import_module(f"resnext.speed.{path.stem}")
            assert module.cached is timing_cache.cached, module.__name__
            module.cached = drawn
            patched.append(module)

    def restore() -> None:
        for module in patched:
            module.cached = timing_cache.cached

    return restore


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    scale = want.double().abs().max().clamp(min=1e-300)
    return ((got.double() - want.double()).abs().max() / scale).item()


def fuzz_optimize(rng: random.Random, case: int) -> str | None:
    """One random `optimize` case: None, or what went wrong."""
    import resnext
    from resnext.speed import pointwise_fp16, replay
    from resnext.speed.capability import bf16_supported

    spec = _random_spec(rng, rng.choice([7, 10, 1000]))
    torch.manual_seed(case)
    model = resnext.build_model(spec).eval()
    _random_bn(model)
    dtypes = ["fp32", "fp32"] + (["bf16"] if bf16_supported() else [])
    dtypes += ["fp16"] if pointwise_fp16.unavailable_reason() is None else []
    dtype = rng.choice(dtypes)
    backends = ["none"] + (["replay"] if replay.unavailable_reason() is None else [])
    backend = rng.choice(backends)
    n, h, w = rng.randint(1, 5), rng.randint(8, 48), rng.randint(8, 48)
    torch.set_num_threads(rng.choice([1, 2]))
    x = torch.randn(n, 3, h, w)
    what = f"{spec} on {(n, 3, h, w)}, {dtype}, backend {backend}"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fast = resnext.optimize(model, dtype, backend=backend, example_input=x)
        bound = {"fp32": 1e-4, "fp16": 1e-2}.get(dtype, 3e-2)
        reference = copy.deepcopy(model).double()
        with torch.no_grad():
            for batch in (x, x[:1]):
                err = _rel_err(fast(batch.clone()), reference(batch.double()))
                if not err < bound:
                    return f"{what}: output {err:.3g} off (bound {bound}) at batch {len(batch)}"
    # a replay that could not record (at the build, or a new shape since) ran eager instead
    refused = re.compile(r"recording failed|replay: inputs like .* run without it")
    for warning in caught:
        if refused.search(str(warning.message)):
            return f"{what}: {warning.message}"
    return None


def fuzz_int8(rng: random.Random, case: int) -> str | None:
    """One random int8 grouped 3×3: None, or what went wrong."""
    from resnext.speed import grouped_int8
    from resnext.speed.int8 import quantize_conv

    cpg = rng.choice(grouped_int8.SUPPORTED_CPG)
    groups = rng.choice([g for g in (2, 3, 4, 8, 32) if g * cpg % 16 == 0 and g * cpg <= 2048])
    channels, stride, relu = groups * cpg, rng.choice([1, 2]), rng.random() < 0.5
    n, h, w = rng.randint(1, 3), rng.randint(1, 30), rng.randint(1, 30)
    torch.manual_seed(case)
    conv = nn.Conv2d(channels, channels, 3, stride, 1, groups=groups, bias=rng.random() < 0.7)
    # shifted and scaled so that the input's zero point falls anywhere from 0 to 255
    x = torch.randn(n, channels, h, w) * rng.uniform(0.1, 5) + rng.uniform(-6, 6)
    qconv, qx = quantize_conv(conv, x, relu=relu, activation_bits=rng.choice([7, 8]))
    torch.set_num_threads(rng.choice([1, 2]))
    build = rng.choice(_int8_builds())
    got = grouped_int8.GroupedInt8(qconv, build)(qx, float(qconv.scale), int(qconv.zero_point))
    problem = _codes_off(got, grouped_int8.reference(qconv, qx))
    if problem is not None:
        return (
            f"{build.name}: {channels} channels, {cpg} a group, stride {stride}, relu {relu}, "
            f"{(n, h, w)}, input zero point {qx.q_zero_point()}: {problem}"
        )
    from resnext.speed import add_int8

    return _fuzz_int8_add(rng) if add_int8.unavailable_reason() is None else None


@functools.cache
def _int8_builds() -> list:
    """The builds of the int8 grouped kernel that run on this machine."""
    from resnext.speed import grouped_int8

    return grouped_int8.CHOICE.runnable()


def _codes_off(got: torch.Tensor, want: torch.Tensor) -> str | None:
    """None where the codes differ from the reference's by at most one, at a few ties."""
    diff = (got.int_repr().double() - want).abs()
    ties = int((diff > 0).sum())
    if diff.max() > 1 or ties > max(2, 2e-3 * diff.numel()):
        return f"{ties} codes off, up to {diff.max().item():.0f}"
    return None


def _fuzz_int8_add(rng: random.Random) -> str | None:
    """One random int8 add-and-ReLU of two maps: None, or what went wrong."""
    from resnext.speed import add_int8

    shape = (rng.randint(1, 3), rng.randint(1, 70), rng.randint(1, 9), rng.randint(1, 9))
    fmt = rng.choice([torch.channels_last, torch.contiguous_format])
    a, b = (
        torch.quantize_per_tensor(
            torch.randn(shape) * rng.uniform(0.1, 5), rng.uniform(0.005, 0.2),
            rng.randint(0, 255), torch.quint8,
        ).contiguous(memory_format=fmt)
        for _ in range(2)
    )  # fmt: skip
    scale, zero_point, relu = rng.uniform(0.005, 0.2), rng.randint(0, 255), rng.random() < 0.5
    got = add_int8.add_relu(a, b, scale, zero_point, relu)
    problem = _codes_off(got, add_int8.reference(a, b, scale, zero_point, relu))
    if problem is not None:
        return f"add of {shape}, relu {relu}: {problem}"
    return None


def _last_map_values(model: nn.Module, shape: tuple[int, ...]) -> int:
    """How many values a channel of the network's smallest map has, for an input of `shape`."""
    with torch.no_grad():
        last = model.eval().forward_stages(torch.zeros(shape))[-1]
    return last.shape[0] * last.shape[2] * last.shape[3]


def _training_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, dtype: str):
    xg = x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
        loss = nn.functional.cross_entropy(model(xg), y)
    loss.backward()
    grads = [p.grad.flatten() for p in model.parameters() if p.grad is not None]
    return loss.detach(), xg.grad, torch.cat(grads)


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return nn.functional.cosine_similarity(a.double().flatten(), b.double().flatten(), dim=0).item()


def fuzz_train(rng: random.Random, case: int) -> str | None:
    """One random training-step case: None, or what went wrong."""
    import resnext
    from resnext.speed import autotune, pointwise_fp16
    from resnext.speed.capability import bf16_supported
    from resnext.speed.conv_guard import guard_conv_backward
    from resnext.speed.train_paths import use_training_fast_paths

    dtypes = ["fp32", "fp32"] + (["bf16"] if bf16_supported() else [])
    dtypes += ["fp16"] if pointwise_fp16.unavailable_reason() is None else []
    while True:  # a network whose batch norms all see enough values to be well-conditioned
        spec = _random_spec(rng, rng.choice([7, 10]))
        shape = (rng.randint(2, 4), 3, rng.randint(8, 48), rng.randint(8, 48))
        torch.manual_seed(case)
        model = resnext.build_model(spec)
        if _last_map_values(model, shape) >= 16:
            break
    dtype = rng.choice(dtypes)
    torch.set_num_threads(rng.choice([1, 2]))
    model = model.train().to(memory_format=torch.channels_last)
    guard_conv_backward(model)
    use_training_fast_paths(
        model,
        fused_bn=True,
        grouped_kernels=True,
        gemm_weight_grad=True,
        fast_maxpool=True,
        fp16_products=dtype == "fp16",
    )
    x = torch.randn(shape).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, spec.num_classes, (shape[0],))
    chooser = autotune.CHOOSER
    try:
        reference = autotune.CHOOSER = autotune.Chooser()
        with reference.prefer():  # no name preferred: every op runs its reference
            want = _training_step(copy.deepcopy(model), x, y, dtype)
        autotune.CHOOSER = autotune.Chooser(
            margin=0.0, warmup=0, repeats=1, clock=random.Random(rng.random()).random
        )
        got = _training_step(copy.deepcopy(model), x, y, dtype)
    finally:
        autotune.CHOOSER = chooser
    what = f"{spec} on {shape}, {dtype}"
    if not all(torch.isfinite(t).all() for t in got):
        return f"{what}: a loss or gradient is not finite"
    # the bounds of tests/speed/test_random_choices.py, measured there
    loss_bound, direction = {"fp32": (1e-4, 0.999), "fp16": (3e-2, 0.94)}.get(dtype, (3e-2, 0.97))
    if not _rel_err(got[0], want[0]) < loss_bound:
        return f"{what}: loss {_rel_err(got[0], want[0]):.3g} off"
    cosines = (_cosine(got[1], want[1]), _cosine(got[2], want[2]))
    if not min(cosines) > direction:
        return f"{what}: gradient directions {cosines[0]:.4f} (input), {cosines[1]:.4f} (weights)"
    return None


def _mutated(data: bytes, rng: random.Random) -> bytes:
    out = bytearray(data)
    kind = rng.randrange(4)
    if kind == 0:
        return bytes(out[: rng.randint(2, len(out))])  # truncated
    if kind == 3:
        at = rng.randint(2, len(out) - 1)
        out[at:at] = bytes(rng.randint(0, 255) for _ in range(rng.randint(1, 64)))
        return bytes(out)
    for _ in range(rng.randint(1, 8)):
        out[rng.randint(2, len(out) - 1)] = rng.randint(0, 255)
    return bytes(out)


class CropFuzz:
    """Mutated JPEGs of `root` through the crop decoder and Pillow, in a private folder."""

    def __init__(self, root: Path) -> None:
        self.files = sorted(p for p in root.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg"))
        if not self.files:
            raise SystemExit(f"--root: no .jpg or .jpeg files under {root}")
        self.folder = Path(tempfile.mkdtemp(prefix="resnext-fuzz-"))
        self.below_the_crop = 0  # the documented exception

    def case(self, rng: random.Random, case: int) -> str | None:
        from resnext.data.planned import PlannedCenterCrop, PlannedRandomResizedCrop, load_planned
        from resnext.errors import DataError

        path = self.folder / "case.jpg"
        path.write_bytes(_mutated(rng.choice(self.files).read_bytes(), rng))
        size = rng.choice([8, 17, 48, 112, 224])
        random_crop = rng.random() < 0.7
        verdicts = []
        for decoder in ("crop", "pillow"):
            plan = (
                PlannedRandomResizedCrop(size, generator=torch.Generator().manual_seed(case))
                if random_crop
                else PlannedCenterCrop(size, size)
            )
            try:
                verdicts.append(tuple(load_planned(path, plan, decoder=decoder).shape))
            except DataError:
                verdicts.append("DataError")
        crop, pillow = verdicts
        if crop == pillow:
            return None
        if pillow == "DataError":
            self.below_the_crop += 1
            return None
        return f"case {case}: crop decoder {crop}, Pillow {pillow} ({size}, random {random_crop})"

    def close(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=("optimize", "train", "crop", "int8"))
    parser.add_argument("--cases", type=int, default=100, help="how many random cases (100)")
    parser.add_argument("--seed", type=int, default=0, help="the cases' generator seed (0)")
    parser.add_argument("--asan", action="store_true", help="kernels built with AddressSanitizer")
    parser.add_argument(
        "--root",
        type=Path,
        default=Path(__file__).resolve().parents[2] / "shared" / "data" / "imagenet-sample",
        help="crop: the JPEGs to mutate (default ../shared/data/imagenet-sample)",
    )
    parser.add_argument(
        "--asan-cache",
        type=Path,
        default=Path(tempfile.gettempdir()) / "resnext-kernels-asan",
        help="--asan: where the instrumented kernels are built",
    )
    args = parser.parse_args(argv)
    if args.cases < 1:
        parser.error(f"--cases: expected at least 1, got {args.cases}")
    if args.asan and os.environ.get(CHILD) != "1":
        _rerun_under_asan(sys.argv[1:] if argv is None else argv, args.asan_cache)
    if os.environ.get(CHILD) == "1":
        _build_with_asan()
    rng = random.Random(args.seed)
    crop = CropFuzz(args.root) if args.what == "crop" else None
    run: Callable[[random.Random, int], str | None] = fuzz_train
    restore: Callable[[], None] = lambda: None  # noqa: E731
    if crop is not None:
        run = crop.case
    elif args.what == "optimize":
        restore = _draw_choices(rng)
        run = fuzz_optimize
    elif args.what == "int8":
        warnings.simplefilter("ignore")  # torch.ao's and quantized tensors' deprecation notices
        run = fuzz_int8
    threads = torch.get_num_threads()
    failures = []
    try:
        for case in range(args.cases):
            problem = run(rng, case)
            if problem is not None:
                failures.append(problem)
                print(f"FAILED {problem}", flush=True)
    finally:
        restore()
        torch.set_num_threads(threads)
        if crop is not None:
            crop.close()
    under = " with AddressSanitizer" if os.environ.get(CHILD) == "1" else ""
    extra = ""
    if crop is not None:
        extra = f"; {crop.below_the_crop} decoded where Pillow refuses (damage below the crop)"
    print(f"{args.what}: {args.cases} cases{under}, {len(failures)} failed{extra}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
