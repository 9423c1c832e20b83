"""Range and consistency checks of a built Config: one ConfigError naming the key and the valid range."""

from __future__ import annotations

import math
import re

from resnext.config.schema import (
    AMP_CHOICES,
    CIFAR_KINDS,
    DATA_KINDS,
    OPTIMIZERS,
    SCHEDULES,
    Config,
)
from resnext.errors import ConfigError, ResNeXtError

# The CPU training fast paths: eager-only kernels on channels-last tensors (key, what it is).
FAST_PATH_KEYS = (
    ("fused_bn", "fused batch norm"),
    ("grouped_kernels", "grouped kernels"),
    ("gemm_weight_grad", "GEMM weight gradients"),
    ("fast_maxpool", "fast max pooling"),
)


def _positive(key: str, value: float) -> None:
    if not value > 0:
        raise ConfigError(f"{key}: expected a value > 0, got {value!r}")


def _non_negative(key: str, value: float) -> None:
    if not value >= 0:
        raise ConfigError(f"{key}: expected a value >= 0, got {value!r}")


def _choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{key}: expected one of {', '.join(choices)}, got {value!r}")


def validate(cfg: Config) -> Config:
    """`cfg` itself when every field is in range; otherwise a ConfigError naming the first bad key."""
    # The run folder is runs/<name>: '.' and '..' would be the runs folder or its parent.
    if not cfg.name or "/" in cfg.name or cfg.name in (".", ".."):
        raise ConfigError(
            f"name: expected a non-empty name without '/', other than '.' and '..', got {cfg.name!r}"
        )
    d, o, s, t, f = cfg.data, cfg.optim, cfg.schedule, cfg.train, cfg.finetune
    _choice("data.kind", d.kind, DATA_KINDS)
    if d.kind in ("cifar10", "cifar100", "imagefolder") and not d.root:
        raise ConfigError(f"data.root: expected the dataset folder for data.kind={d.kind!r}")
    for key, value in (
        ("data.batch_size", d.batch_size),
        ("data.eval_batch_size", d.eval_batch_size),
        ("data.image_size", d.image_size),
        ("optim.base_batch", o.base_batch),
        ("optim.accum_steps", o.accum_steps),
        ("optim.base_lr", o.base_lr),
        ("train.epochs", t.epochs),
        ("train.log_every", t.log_every),
        ("train.eval_every", t.eval_every),
    ):
        _positive(key, value)
    if o.lr is not None:
        _positive("optim.lr", o.lr)
    if d.planned and d.kind != "imagefolder":
        raise ConfigError(
            f"data.planned: the planned uint8 pipeline reads image files (data.kind='imagefolder'); "
            f"got data.kind={d.kind!r}"
        )
    if d.kind not in CIFAR_KINDS:
        # Only the CIFAR training pipeline has these steps; another would train without them.
        for key, value in (("data.cutout", d.cutout), ("data.trivial_augment", d.trivial_augment)):
            if value:
                raise ConfigError(
                    f"{key}: a step of the CIFAR training pipeline (data.kind 'cifar10' or "
                    f"'cifar100'), which data.kind={d.kind!r} does not run; expected it off, "
                    f"got {value!r} (a run saved with it trained without it and resumes with "
                    f"{key}={'0' if key == 'data.cutout' else 'false'})"
                )
    if d.batch_size % o.accum_steps:
        raise ConfigError(
            f"data.batch_size: expected a multiple of optim.accum_steps={o.accum_steps}, "
            f"got {d.batch_size}"
        )
    for key, value in (
        ("data.workers", d.workers),
        ("data.cutout", d.cutout),
        ("data.mixup_alpha", d.mixup_alpha),
        ("data.cutmix_alpha", d.cutmix_alpha),
        ("optim.momentum", o.momentum),
        ("optim.weight_decay", o.weight_decay),
        ("optim.grad_clip", o.grad_clip),
        ("schedule.warmup_epochs", s.warmup_epochs),
        ("schedule.min_lr", s.min_lr),
        ("train.seed", t.seed),
        ("train.checkpoint_every", t.checkpoint_every),
        ("train.threads", t.threads),
        ("train.eval_shift", t.eval_shift),
        ("finetune.num_classes", f.num_classes),
        ("finetune.frozen_stages", f.frozen_stages),
    ):
        _non_negative(key, value)
    if not 0 <= o.label_smoothing < 1:
        raise ConfigError(
            f"optim.label_smoothing: expected 0 <= value < 1, got {o.label_smoothing}"
        )
    _choice("optim.name", o.name, OPTIMIZERS)
    if len(o.betas) != 2 or not all(0 <= b < 1 for b in o.betas):
        raise ConfigError(
            f"optim.betas: expected two numbers, each 0 <= value < 1, got {list(o.betas)}"
        )
    if not o.eps > 0:
        raise ConfigError(f"optim.eps: expected a number > 0, got {o.eps}")
    if not 0 <= o.momentum < 1:
        raise ConfigError(f"optim.momentum: expected 0 <= value < 1, got {o.momentum}")
    if o.nesterov and o.momentum == 0:
        raise ConfigError("optim.nesterov: requires optim.momentum > 0")
    _choice("schedule.kind", s.kind, SCHEDULES)
    if not 0 < s.gamma <= 1:
        raise ConfigError(f"schedule.gamma: expected 0 < value <= 1, got {s.gamma}")
    if not 0 < s.warmup_start <= 1:
        raise ConfigError(f"schedule.warmup_start: expected 0 < value <= 1, got {s.warmup_start}")
    if any(m <= 0 for m in s.milestones) or list(s.milestones) != sorted(set(s.milestones)):
        raise ConfigError(
            f"schedule.milestones: expected strictly increasing epochs > 0, got {list(s.milestones)}"
        )
    _choice("train.amp", t.amp, AMP_CHOICES)
    _choice("train.device", t.device.split(":")[0], ("auto", "cpu", "cuda"))
    if not re.fullmatch(r"auto|(cpu|cuda)(:(0|[1-9][0-9]*))?", t.device):
        raise ConfigError(
            f"train.device: expected auto, cpu, cuda or cpu:N / cuda:N with N a device index "
            f"(0, 1, ...), got {t.device!r}"
        )
    if t.resume not in ("auto", "never") and not t.resume.endswith((".pt", ".pth")):
        raise ConfigError(
            f"train.resume: expected 'auto', 'never' or a checkpoint path (.pt), got {t.resume!r}"
        )
    for key, what in FAST_PATH_KEYS:
        if getattr(t, key) and t.compile:
            raise ConfigError(
                f"train.{key}: the {what} run eagerly and torch.compile would bypass them; "
                f"set train.{key} or train.compile, not both"
            )
        if getattr(t, key) and not t.channels_last:
            raise ConfigError(
                f"train.{key}: the {what} read channels-last tensors; "
                "set train.channels_last: true as well"
            )
    if t.fp16_products and not t.gemm_weight_grad:
        raise ConfigError(
            "train.fp16_products: the float16 products are one of the 1×1 products "
            "train.gemm_weight_grad chooses between; set train.gemm_weight_grad: true as well"
        )
    if t.fp16_products and t.amp not in ("none", "auto"):
        raise ConfigError(
            f"train.fp16_products: float16 products replace float32 ones; expected train.amp "
            f"'none' or 'auto' (float32 where bf16 is not faster), got {t.amp!r}"
        )
    if t.merge_groups and t.grouped_kernels:
        raise ConfigError(
            "train.merge_groups: the GPU's merged groups and the CPU's grouped kernels replace "
            "the same convolutions; set train.merge_groups or train.grouped_kernels, not both"
        )
    if any(math.isnan(v) for v in (o.base_lr, o.weight_decay)):
        raise ConfigError("optim: NaN is not a valid value")
    _check_model(cfg)
    return cfg


def _check_model(cfg: Config) -> None:
    # Imported here: the model package is heavier than the config package needs at import time.
    from resnext.models import get_spec

    try:
        get_spec(cfg.model.name, **cfg.model.spec)
    except ResNeXtError as exc:
        raise ConfigError(f"model: {exc}") from exc
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"model.spec: {exc}") from exc
    if cfg.finetune.frozen_stages:
        stages = len(get_spec(cfg.model.name, **cfg.model.spec).depths)
        if cfg.finetune.frozen_stages > stages:
            raise ConfigError(
                f"finetune.frozen_stages: expected 0..{stages} for {cfg.model.name}, "
                f"got {cfg.finetune.frozen_stages}"
            )
