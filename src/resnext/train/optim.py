"""SGD with momentum or AdamW (optionally exempting BN and biases from weight decay) and per-step LR
schedules."""

from __future__ import annotations

import math

import torch
from torch import nn

from resnext.config import OptimConfig, ScheduleConfig


def resolve_lr(optim: OptimConfig, global_batch: int) -> float:
    """The peak LR: explicit `lr`, else `base_lr` per `base_batch` images scaled linearly (Goyal et al.)."""
    if optim.lr is not None:
        return optim.lr
    return optim.base_lr * global_batch / optim.base_batch


def param_groups(model: nn.Module, weight_decay: float, exempt_norm_bias: bool) -> list[dict]:
    """Trainable parameters, with 1-D ones (BN γ/β, biases) in a no-decay group when exempted."""
    decay, no_decay = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        (no_decay if exempt_norm_bias and p.ndim <= 1 else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


# Devices whose fused SGD kernel torch ships. The fused step computes the per-parameter loop's
# update in one pass per tensor, equal to within float32 rounding (tests/train/test_optim.py).
FUSED_SGD_DEVICES = frozenset({"cpu", "cuda"})


def fused_sgd_applies(params: list[torch.Tensor]) -> bool:
    """Whether torch's fused SGD step takes these parameters (floating point, on CPU or CUDA)."""
    return bool(params) and all(
        p.is_floating_point() and p.device.type in FUSED_SGD_DEVICES for p in params
    )


def build_optimizer(model: nn.Module, optim: OptimConfig, lr: float) -> torch.optim.Optimizer:
    """The paper's optimiser (SGD, momentum 0.9, weight decay, Nesterov as configured), or AdamW.

    The fused step is used where it applies: on this project's 2-core machine it takes a
    ResNeXt-50 SGD update from ~15 to ~9 ms (benchmarks/bench_pointwise_train.py).
    """
    groups = param_groups(model, optim.weight_decay, optim.wd_exempt_norm_bias)
    params = [p for group in groups for p in group["params"]]
    if optim.name == "adamw":
        return torch.optim.AdamW(
            groups,
            lr=lr,
            betas=(optim.betas[0], optim.betas[1]),
            eps=optim.eps,
            fused=True if fused_sgd_applies(params) else None,
        )
    return torch.optim.SGD(
        groups,
        lr=lr,
        momentum=optim.momentum,
        nesterov=optim.nesterov,
        fused=True if fused_sgd_applies(params) else None,
    )


class LRFactor:
    """The multiplier of the peak LR at an optimiser step: linear warmup, then step decay or cosine."""

    def __init__(self, schedule: ScheduleConfig, steps_per_epoch: int, epochs: int, peak_lr: float):
        self.kind = schedule.kind
        self.steps_per_epoch = steps_per_epoch
        self.total = steps_per_epoch * epochs
        # A short run (epochs overridden below the warmup) warms up over half of it at most.
        self.warmup = min(round(schedule.warmup_epochs * steps_per_epoch), self.total // 2)
        self.warmup_start = schedule.warmup_start
        self.milestones = [m * steps_per_epoch for m in schedule.milestones]
        self.gamma = schedule.gamma
        self.min_factor = schedule.min_lr / peak_lr if peak_lr > 0 else 0.0

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return self.warmup_start + (1.0 - self.warmup_start) * step / self.warmup
        if self.kind == "step":
            return self.gamma ** sum(step >= m for m in self.milestones)
        span = max(1, self.total - self.warmup)
        progress = min(1.0, (step - self.warmup) / span)
        return self.min_factor + (1 - self.min_factor) * 0.5 * (1 + math.cos(math.pi * progress))


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    schedule: ScheduleConfig,
    steps_per_epoch: int,
    epochs: int,
    peak_lr: float,
) -> torch.optim.lr_scheduler.LambdaLR:
    """A scheduler stepped once per optimiser step (so mid-epoch resume restores the exact LR)."""
    factor = LRFactor(schedule, steps_per_epoch, epochs, peak_lr)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda=factor)
