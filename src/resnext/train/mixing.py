"""Mixup (Zhang et al., 2018) and CutMix (Yun et al., 2019) of training batches, with soft targets.

Each micro-batch (what one process computes at a time) is mixed with itself in reverse order, with
one λ ~ Beta(α, α) per optimiser step: mixup blends whole images, CutMix pastes a box of area
fraction 1 − λ (clipped at the border, λ then recomputed from the pasted area). With both enabled,
each step uses one of them with probability 1/2. The draws come from torch's global RNG, which
training checkpoints save, so resumed runs mix alike; every process draws the same (the same seed,
one draw per step whatever the world size), so one process accumulating W micro-batches mixes
exactly as W processes do.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.nn import functional as F

from resnext.errors import ConfigError


def _beta(alpha: float) -> float:
    return float(torch.distributions.Beta(alpha, alpha).sample())


def cutmix_box(height: int, width: int, lam: float) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) of a box of about (1 − lam)·H·W pixels at a uniform random centre."""
    ratio = math.sqrt(1.0 - lam)
    cut_h, cut_w = int(height * ratio), int(width * ratio)
    cy = int(torch.randint(0, height, ()))
    cx = int(torch.randint(0, width, ()))
    top, bottom = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, height)
    left, right = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, width)
    return top, bottom, left, right


@dataclass(frozen=True)
class Mix:
    """One step's draw: the partner's share is 1 − lam (CutMix: in `box`, (top, bottom, left, right))."""

    lam: float
    box: tuple[int, int, int, int] | None = None


class BatchMixer:
    """Mixes (images, labels) into (mixed images, soft targets) of `num_classes` columns."""

    def __init__(self, num_classes: int, mixup_alpha: float = 0.0, cutmix_alpha: float = 0.0):
        if num_classes < 2:
            raise ConfigError(f"num_classes: mixing needs at least 2 classes, got {num_classes}")
        for key, value in (("data.mixup_alpha", mixup_alpha), ("data.cutmix_alpha", cutmix_alpha)):
            if not (value >= 0 and math.isfinite(value)):
                raise ConfigError(f"{key}: expected a finite value >= 0, got {value!r}")
        if mixup_alpha == 0 and cutmix_alpha == 0:
            raise ConfigError("data.mixup_alpha / data.cutmix_alpha: at least one must be > 0")
        self.num_classes = num_classes
        self.mixup_alpha, self.cutmix_alpha = float(mixup_alpha), float(cutmix_alpha)

    def _use_cutmix(self) -> bool:
        if self.mixup_alpha and self.cutmix_alpha:
            return bool(torch.rand(()) < 0.5)
        return self.cutmix_alpha > 0

    def draw(self, height: int, width: int) -> Mix:
        """The random part of one step's mixing, for images of `height` × `width`."""
        if self._use_cutmix():
            top, bottom, left, right = box = cutmix_box(height, width, _beta(self.cutmix_alpha))
            return Mix(1.0 - (bottom - top) * (right - left) / (height * width), box)
        return Mix(_beta(self.mixup_alpha))

    def apply(
        self, images: torch.Tensor, labels: torch.Tensor, mix: Mix
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`images` mixed by `mix` with their reverse, and the soft targets of `labels`."""
        onehot = F.one_hot(labels, self.num_classes).to(torch.float32)
        partner = images.flip(0)
        if mix.box is not None:
            top, bottom, left, right = mix.box
            mixed = images.clone()
            mixed[..., top:bottom, left:right] = partner[..., top:bottom, left:right]
        else:
            mixed = images * mix.lam + partner * (1.0 - mix.lam)
        target = onehot * mix.lam + onehot.flip(0) * (1.0 - mix.lam)
        return mixed, target.to(images.device)

    def __call__(
        self, images: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`images` (one micro-batch) mixed under a fresh draw."""
        return self.apply(images, labels, self.draw(*images.shape[-2:]))

    def __repr__(self) -> str:
        return f"BatchMixer(mixup_alpha={self.mixup_alpha}, cutmix_alpha={self.cutmix_alpha})"
