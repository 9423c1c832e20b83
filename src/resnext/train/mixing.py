"""Mixup (Zhang et al., 2018) and CutMix (Yun et al., 2019) of training batches, with soft targets.

Each batch is mixed with itself in reverse order, with one λ ~ Beta(α, α) per batch: mixup blends
whole images, CutMix pastes a box of area fraction 1 − λ (clipped at the border, λ then recomputed
from the pasted area). With both enabled, each batch uses one of them with probability 1/2. The
draws come from torch's global RNG, which training checkpoints save, so resumed runs mix alike.
"""

from __future__ import annotations

import math

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

    def __call__(
        self, images: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        onehot = F.one_hot(labels, self.num_classes).to(torch.float32)
        partner = images.flip(0)
        if self._use_cutmix():
            lam = _beta(self.cutmix_alpha)
            h, w = images.shape[-2:]
            top, bottom, left, right = cutmix_box(h, w, lam)
            mixed = images.clone()
            mixed[..., top:bottom, left:right] = partner[..., top:bottom, left:right]
            lam = 1.0 - (bottom - top) * (right - left) / (h * w)
        else:
            lam = _beta(self.mixup_alpha)
            mixed = images * lam + partner * (1.0 - lam)
        target = onehot * lam + onehot.flip(0) * (1.0 - lam)
        return mixed, target.to(images.device)

    def __repr__(self) -> str:
        return f"BatchMixer(mixup_alpha={self.mixup_alpha}, cutmix_alpha={self.cutmix_alpha})"
