"""Inference benchmark: eager vs the `optimize` fast paths vs peer engines, interleaved rounds."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn

import resnext
from resnext.errors import ConfigError
from resnext.speed import autotune, peers
from resnext.speed.allocator import loaded_allocator
from resnext.speed.fastpath import optimize
from resnext.speed.measure import (
    interleaved,
    matmul_probe,
    medians_by_phase,
    model_pairs,
    phase_lines,
    ratios,
    ratios_by_phase,
    validate_bench_config,
)
from resnext.speed.timing_cache import TimingCache

VARIANTS = (
    "eager",
    "eager-fast-fp32",
    "eager-fast-bf16",
    "eager-fast-fp16",
    "eager-int8",
    "eager-engine-int8",
    "inductor-fp32",
    "inductor-bf16",
    "inductor-fp16",
    "inductor-py-fp32",
    "inductor-py-bf16",
    "inductor-onednn-fp32",
    "inductor-onednn-bf16",
    "inductor-unfused-bf16",
    "inductor-pointwise-bf16",
    "inductor-strict-fp32",
    "inductor-nostem-fp32",
    "inductor-nostem-bf16",
    "inductor-nofma-fp32",
    "inductor-nodot-bf16",
    "inductor-nosplit-bf16",
    "jit-fp32",
    "jit-bf16",
    "replay-fp32",
    "replay-bf16",
    "replay-fp16",
    "replay-nofma-fp32",
    "ort-fp32",
    "ort-int8",
    "openvino-fp32",
    "openvino-bf16",
    "openvino-fp16",
)
DEFAULT_VARIANTS = ("eager", "inductor-fp32", "inductor-bf16", "ort-fp32", "openvino-bf16")
# Where the CPU has no native bf16 (`optimize` would run the bf16 variant in float32 anyway).
FP32_DEFAULT_VARIANTS = (
    "eager",
    "inductor-fp32",
    "inductor-onednn-fp32",
    "inductor-nofma-fp32",
    "ort-fp32",
    "openvino-fp32",
)


@dataclass(frozen=True)
class InferConfig:
    """What one inference benchmark run measures."""

    models: tuple[str, ...] = ("resnext50_32x4d",)
    variants: tuple[str, ...] = DEFAULT_VARIANTS
    batch: int = 16
    image_size: int = 224
    rounds: int = 5
    iters: int = 2
    latency_rounds: int = 0
    # one in-memory timing cache per model for every variant: builds that time the same layers
    # the same ways make the same choices, so variants differ by what they are, not by the
    # moment each build timed its layers in (on machine B the choices follow its phase)
    share_timings: bool = False

    def validate(self) -> None:
        validate_bench_config(self, VARIANTS)
        if self.latency_rounds < 0:
            raise ConfigError(
                f"latency_rounds: expected an integer >= 0, got {self.latency_rounds}"
            )


def _torch_runner(model: nn.Module, x: torch.Tensor) -> Callable[[], object]:
    def run() -> object:
        with torch.no_grad():
            return model(x)

    return run


def build_runner(
    variant: str, model: nn.Module, example: torch.Tensor, timings: TimingCache | None = None
) -> tuple[Callable[[torch.Tensor], torch.Tensor], float]:
    """A callable computing `model` by `variant` (outputs as a float tensor), and its build time;
    our fast paths read and keep their layer timings in `timings` where given."""
    start = time.perf_counter()
    threads = torch.get_num_threads()
    kind, _, dtype = variant.rpartition("-")
    if variant == "eager":
        fn: Callable[[torch.Tensor], torch.Tensor] = model
    elif variant in ("eager-int8", "eager-engine-int8", "ort-int8"):
        # int8 after training, its ranges observed on a batch of its own (not the timed one)
        calibration = torch.randn(example.shape, generator=torch.Generator().manual_seed(1))
        if variant != "ort-int8":
            from resnext.speed.int8 import quantize_int8  # torch.ao's quantization, when asked

            # eager-engine-int8: every op on torch's quantized engine, none on our int8 kernels
            fn = quantize_int8(model, [calibration]).use_kernels(variant == "eager-int8")
        else:
            session = peers.onnxruntime_int8_runner(model, example, calibration, threads)
            fn = lambda x: torch.from_numpy(session(x.numpy())[0])  # noqa: E731
    elif kind in (
        "eager-fast",
        "inductor",
        "inductor-onednn",
        "inductor-py",
        "inductor-unfused",
        "inductor-pointwise",
        "inductor-strict",
        "inductor-nostem",
        "inductor-nofma",
        "inductor-nodot",
        "inductor-nosplit",
        "jit",
        "replay",
        "replay-nofma",
    ):
        # inductor-onednn: the compiled path with oneDNN for every grouped conv (our kernels off);
        # inductor-py: with inductor's Python wrapper instead of its C++ one;
        # inductor-unfused: our grouped kernels alone, nothing fused into them;
        # inductor-pointwise: with the first 1×1 fused in, but not the rest of the block;
        # inductor-strict: float32 FMAs throughout (our AMX bf16×3 convolutions off);
        # inductor-nostem: the stem's convolution and pooling apart (the fused stem off);
        # inductor-nofma, replay-nofma: oneDNN for the 1×1s our FMA kernel would take
        # (pointwise_fma off)
        # inductor-nodot: oneDNN for the bf16 1×1s our dot-product kernel would take
        # inductor-nosplit: no grouped 3×3 on the split channel order (split_groups off)
        # replay: the eager fast path's kernel calls recorded and replayed (no Python per layer)
        # …-fp16: float32 with the 1×1s' products in float16 where faster (`pointwise_fp16`)
        backend = "none" if kind == "eager-fast" else kind.split("-")[0]
        mode = "off" if kind == "inductor-onednn" else "auto"
        fn = optimize(
            model,
            dtype,
            backend=backend,
            example_input=example,
            grouped_kernel=mode,
            cpp_wrapper=kind != "inductor-py",
            fuse_pointwise="off" if kind == "inductor-unfused" else "auto",
            fuse_block="off" if kind in ("inductor-unfused", "inductor-pointwise") else "auto",
            conv_x3="off" if kind == "inductor-strict" else "auto",
            fuse_stem="off" if kind in ("inductor-strict", "inductor-nostem") else "auto",
            pointwise_fma="off" if kind.endswith("-nofma") else "auto",
            pointwise_bf16="off" if kind == "inductor-nodot" else "auto",
            split_groups="off" if kind in ("inductor-onednn", "inductor-nosplit") else "auto",
            timing_cache=timings,
        )
    elif kind == "ort":
        session = peers.onnxruntime_runner(model, example, threads)
        fn = lambda x: torch.from_numpy(session(x.numpy())[0])  # noqa: E731
    else:
        request = peers.openvino_runner(
            model, example, threads, {"fp32": "f32", "fp16": "f16"}.get(dtype, dtype)
        )
        fn = lambda x: torch.from_numpy(next(iter(request(x.numpy()).values())))  # noqa: E731
    return fn, time.perf_counter() - start


def _peer_missing(variant: str) -> str | None:
    package = {"ort": "onnxruntime", "openvino": "openvino"}.get(variant.split("-")[0])
    if package and not peers.available(package):
        return f"{variant}: skipped, {package} is not installed"
    if package == "openvino" and loaded_allocator() is not None:
        # Measured: OpenVINO 2026.4 aborts ('free(): invalid pointer') under a preloaded allocator.
        return f"{variant}: skipped, OpenVINO crashes with LD_PRELOAD; rerun with glibc malloc"
    return None


def run_infer_bench(config: InferConfig, log: Callable[[str], None] = print) -> dict[str, object]:
    """Build every (model, variant), check outputs against eager, time them interleaved."""
    config.validate()
    x = torch.randn(config.batch, 3, config.image_size, config.image_size)
    x1 = x[:1].clone()
    runners: dict[str, tuple[Callable[[], object], int]] = {}
    latency: dict[str, tuple[Callable[[], object], int]] = {}
    info: dict[str, dict[str, object]] = {}
    for name in config.models:
        model = resnext.create_model(name).eval()
        timings = TimingCache.in_memory() if config.share_timings else None
        with torch.no_grad():
            reference = model(x)
        for variant in config.variants:
            note = _peer_missing(variant)
            if note:
                log(note)
                continue
            key = f"{name}/{variant}"
            try:
                fn, build_s = build_runner(variant, model, x, timings)
            except Exception as exc:  # a broken peer must not end the whole run
                log(f"{key}: skipped, build failed ({type(exc).__name__}: {exc})")
                continue
            with torch.no_grad():
                out = fn(x).float()
            err = ((out - reference).abs().max() / reference.abs().max()).item()
            agree = (out.argmax(1) == reference.argmax(1)).float().mean().item()
            info[key] = {"build_s": build_s, "max_rel_err": err, "argmax_agreement": agree}
            choices = getattr(fn, "grouped_choices", [])
            swapped = [c.name for c in choices if c.chosen != "native"]
            if swapped:
                info[key]["grouped_kernel_layers"] = swapped
            if choices:  # each grouped layer's timings and the implementation it got
                info[key]["grouped_choices"] = [asdict(c) for c in choices]
            fusions = getattr(fn, "fusion_choices", [])
            if fusions:  # each 1×1 + grouped pair's timings, fused or separate
                info[key]["fusion_choices"] = [asdict(c) for c in fusions]
            blocks = getattr(fn, "block_choices", [])
            if blocks:  # each block's timings with its rest in one kernel, or separate
                info[key]["block_choices"] = [asdict(c) for c in blocks]
            x3 = getattr(fn, "conv_x3_choices", [])
            if x3:  # each float32 convolution's timings, our bf16×3 kernel or oneDNN
                info[key]["conv_x3_choices"] = [asdict(c) for c in x3]
            pointwise = getattr(fn, "pointwise_choices", [])
            if pointwise:  # each float32 1×1's timings, our FMA kernel or oneDNN
                info[key]["pointwise_choices"] = [asdict(c) for c in pointwise]
            stems = getattr(fn, "stem_choices", [])
            if stems:  # the stem's timings, fused into one kernel or apart
                info[key]["stem_choices"] = [asdict(c) for c in stems]
            if variant.startswith("replay"):  # the exit weight its choosers used (`optimize`)
                info[key]["replay_exit_ms"] = getattr(fn, "replay_exit_ms", None)
            log(f"{key}: built in {build_s:.1f} s, max rel err {err:.2e}")
            runners[key] = (_torch_runner(fn, x), config.batch)
            if config.latency_rounds:
                # Compiled variants and peers specialise on shape: batch 1 gets its own build.
                fn1 = fn if variant == "eager" else build_runner(variant, model, x1, timings)[0]
                latency[key] = (_torch_runner(fn1, x1), 1)
    probe = matmul_probe()
    timings = interleaved(runners, rounds=config.rounds, iters=config.iters, probe=probe)
    result: dict[str, object] = {
        "throughput": {k: {**t.as_dict(), **info[k]} for k, t in timings.items()},
        "ratio_to_first": ratios(timings, next(iter(timings))) if timings else {},
    }
    if timings:  # the per-round time ratios, in the machine's slower and faster rounds apart
        result["by_phase"] = ratios_by_phase(
            timings, next(iter(timings)), model_pairs(config.models, config.variants, timings)
        )
    if latency:
        lat = interleaved(latency, rounds=config.latency_rounds, iters=5, probe=probe)
        by_phase = medians_by_phase(lat)
        result["latency_batch1"] = {
            k: {**t.as_dict(), "median_ms_by_phase": by_phase[k]} for k, t in lat.items()
        }
    if autotune.decisions():  # int8's grouped layers: our kernel or torch's engine, by shape
        result["autotune"] = [d.as_dict() for d in autotune.decisions()]
    return result


def summary_lines(result: dict[str, object]) -> list[str]:
    """Human-readable lines: img/s, median ms, ratio to the first variant."""
    lines = []
    ratio = result["ratio_to_first"]
    for key, row in result["throughput"].items():
        lines.append(
            f"{key:42s} {row['throughput']:7.1f} img/s  {row['median_ms']:8.1f} ms/batch  "
            f"×{ratio[key]:.2f}  err {row['max_rel_err']:.1e}"
        )
    for key, row in result.get("latency_batch1", {}).items():
        phases = row.get("median_ms_by_phase", {})
        split = "".join(
            f", {half} rounds {phases[half]:.1f}" for half in ("slower", "faster") if half in phases
        )
        lines.append(f"{key:42s} batch-1 latency {row['median_ms']:.1f} ms{split}")
    if "by_phase" in result:
        lines += phase_lines(result["by_phase"])
    return lines


def config_dict(config: InferConfig) -> dict[str, object]:
    return asdict(config)


def parse_list(
    text: str, allowed: Sequence[str] | None = None, what: str = "list"
) -> tuple[str, ...]:
    """A comma-separated list; with `allowed`, each item must be one of them (a ConfigError
    naming `what`, the option it came from, otherwise)."""
    items = tuple(s.strip() for s in text.split(",") if s.strip())
    if allowed is not None:
        bad = [s for s in items if s not in allowed]
        if bad:
            raise ConfigError(f"{what}: unknown {bad}; expected some of {list(allowed)}")
    return items
