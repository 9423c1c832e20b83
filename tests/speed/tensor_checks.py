"""Tensor helpers the speed tests share: channels-last copies and relative errors in float64."""

from __future__ import annotations

import torch


def nhwc(t: torch.Tensor) -> torch.Tensor:
    """`t` in channels-last memory order (the layout our kernels read and write)."""
    return t.contiguous(memory_format=torch.channels_last)


def rel_err(got: torch.Tensor, expected: torch.Tensor) -> float:
    """Largest difference relative to the largest expected magnitude, computed in float64 so
    that the measure adds no rounding of its own."""
    scale = expected.double().abs().max().clamp(min=1e-300)
    return ((got.double() - expected.double()).abs().max() / scale).item()
