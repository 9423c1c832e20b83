"""Mixed precision: which autocast dtype to use on a device, and whether a GradScaler is needed."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from resnext.errors import ConfigError
from resnext.speed.capability import bf16_supported

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_amp(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for `amp` on `device` (None = full float32).

    `auto` is bfloat16 where the device runs it natively (Ampere+ GPUs; CPUs with AVX512-BF16 or
    AMX), float16 on older GPUs, and float32 on CPUs without native bf16, where bf16 autocast is
    emulated and several times slower than float32 (8× for a convolution on an AVX2-only CPU).
    """
    if amp == "none":
        return None
    if amp == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if bf16_supported() else None
    if amp == "float16" and device.type == "cpu":
        raise ConfigError("train.amp: float16 autocast is for GPUs; use bfloat16 or none on CPU")
    return _DTYPES[amp]


def make_scaler(dtype: torch.dtype | None, device: torch.device) -> torch.amp.GradScaler | None:
    """A GradScaler for float16 (whose small range underflows gradients); None otherwise."""
    if dtype is torch.float16:
        return torch.amp.GradScaler(device.type)
    return None


@contextlib.contextmanager
def autocast(dtype: torch.dtype | None, device: torch.device) -> Iterator[None]:
    """Autocast to `dtype` on `device`, or nothing when dtype is None."""
    if dtype is None:
        yield
        return
    with torch.autocast(device_type=device.type, dtype=dtype):
        yield
