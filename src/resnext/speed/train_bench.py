"""Training-step benchmark: eager vs channels_last + bf16 autocast + torch.compile, with checkpointing."""

from __future__ import annotations

import resource
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

import resnext
from resnext.config import OptimConfig
from resnext.errors import ConfigError
from resnext.speed import autotune
from resnext.speed.measure import (
    interleaved,
    matmul_probe,
    model_pairs,
    phase_lines,
    ratios,
    ratios_by_phase,
    validate_bench_config,
)
from resnext.speed.train_paths import use_training_fast_paths
from resnext.train.optim import build_optimizer

VARIANTS = (
    "eager-fp32",
    "cl-bf16",
    "cl-bf16-fused",
    "cl-bf16-fused-grouped",
    "cl-bf16-fused-grouped-gemm",
    "cl-bf16-fused-grouped-gemm-pool",
    "cl-bf16-compile",
    "cl-bf16-ckpt",
    "cl-fp32",  # float32 variants: for CPUs without native bf16 (e.g. AVX2-only ones)
    "cl-fp32-grouped",
    "cl-fp32-fused-grouped",
    "cl-fp32-grouped-gemm",
    "cl-fp32-fused-grouped-gemm",
    "cl-fp32-fused-grouped-gemm-pool",
    # the float32 1×1 products may run with float16 products where faster (`train.fp16_products`)
    "cl-fp32-fused-grouped-gemm-fp16",
    "cl-fp32-fused-grouped-gemm-fp16-pool",
    "cl-fp32-compile",
    "cl-fp32-ckpt",
)
DEFAULT_VARIANTS = ("eager-fp32", "cl-bf16", "cl-bf16-compile")
# Where the CPU has no native bf16 (bf16 autocast is emulated there, several times slower).
FP32_DEFAULT_VARIANTS = ("eager-fp32", "cl-fp32", "cl-fp32-fused-grouped-gemm")


@dataclass(frozen=True)
class TrainConfig:
    """What one training benchmark run measures."""

    models: tuple[str, ...] = ("resnext50_32x4d",)
    variants: tuple[str, ...] = DEFAULT_VARIANTS
    batch: int = 16
    image_size: int = 224
    rounds: int = 5
    iters: int = 1
    # Untimed interleaved rounds first: a step's time drifts down over its first few steps in
    # a process (memory still being mapped and reused), which would favour later variants.
    warmup_rounds: int = 3

    def validate(self) -> None:
        validate_bench_config(self, VARIANTS)
        if self.warmup_rounds < 0:
            raise ConfigError("warmup_rounds: expected an integer >= 0")


def make_step(
    model: nn.Module, variant: str, x: torch.Tensor, y: torch.Tensor
) -> Callable[[], float]:
    """One SGD step (forward, cross-entropy, backward, update) of `model` done the `variant` way."""
    channels_last = variant.startswith("cl-")
    bf16 = "-bf16" in variant
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    use_training_fast_paths(
        model,
        fused_bn="-fused" in variant,
        grouped_kernels="-grouped" in variant,
        gemm_weight_grad="-gemm" in variant,
        fast_maxpool=variant.endswith("-pool"),
        fp16_products="-fp16" in variant,
    )
    # -ckpt: each block's activations recomputed in backward (`train.grad_checkpointing`)
    model.set_grad_checkpointing(variant.endswith("-ckpt"))
    net: nn.Module = model
    if variant.endswith("-compile"):
        net = torch.compile(net)
    opt = build_optimizer(model, OptimConfig(weight_decay=1e-4), lr=0.01)  # as `resnext train`
    loss_fn = nn.CrossEntropyLoss()

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = loss_fn(net(x), y)
        loss.backward()
        opt.step()
        return loss.item()

    return step


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_train_bench(config: TrainConfig, log: Callable[[str], None] = print) -> dict[str, object]:
    """Build every (model, variant) step, report img/s (interleaved) and peak memory growth."""
    config.validate()
    x = torch.randn(config.batch, 3, config.image_size, config.image_size)
    steps: dict[str, tuple[Callable[[], object], int]] = {}
    memory: dict[str, float] = {}
    for name in config.models:
        for variant in config.variants:
            key = f"{name}/{variant}"
            model = resnext.create_model(name).train()
            y = torch.randint(0, model.num_classes, (config.batch,))
            step = make_step(model, variant, x, y)
            before = _peak_rss_mb()
            step()  # first step: compilation and the variant's activation memory
            step()
            memory[key] = _peak_rss_mb() - before
            log(f"{key}: ready, peak RSS grew {memory[key]:.0f} MB")
            steps[key] = (step, config.batch)
    if config.warmup_rounds:
        interleaved(steps, rounds=config.warmup_rounds, iters=config.iters, warmup=0)
    probe = matmul_probe()
    timings = interleaved(steps, rounds=config.rounds, iters=config.iters, warmup=0, probe=probe)
    return {
        "throughput": {
            k: {**t.as_dict(), "peak_rss_growth_mb": memory[k]} for k, t in timings.items()
        },
        "ratio_to_first": ratios(timings, next(iter(timings))),
        # the per-round time ratios, in the machine's slower and faster rounds apart
        "by_phase": ratios_by_phase(
            timings, next(iter(timings)), model_pairs(config.models, config.variants, timings)
        ),
        # What the fast paths' chooser picked for each op and shape, and the times behind it.
        "autotune": [d.as_dict() for d in autotune.decisions()],
        "note": "peak RSS growth is process-wide and monotone: it is exact for the first "
        "variant only and a lower bound on later ones; run a variant alone for its peak",
    }


def summary_lines(result: dict[str, object]) -> list[str]:
    """Human-readable lines: img/s, median ms per step, ratio to the first variant."""
    ratio = result["ratio_to_first"]
    lines = [
        f"{key:42s} {row['throughput']:6.1f} img/s  {row['median_ms']:8.1f} ms/step  "
        f"×{ratio[key]:.2f}  peak RSS +{row['peak_rss_growth_mb']:.0f} MB"
        for key, row in result["throughput"].items()
    ]
    if "by_phase" in result:
        lines += phase_lines(result["by_phase"])
    return lines
