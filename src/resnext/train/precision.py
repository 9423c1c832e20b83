"""Mixed precision: which autocast dtype to use on a device, and whether a GradScaler is needed."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from resnext.errors import ConfigError
from resnext.speed import pointwise_fp16
from resnext.speed.capability import bf16_faster
from resnext.speed.pointwise_train import takes_module

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_amp(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for `amp` on `device` (None = full float32).

    `auto` is bfloat16 where the device runs it natively and faster (Ampere+ GPUs; CPUs whose bf16
    convolutions measure at least 1.2× float32's speed: AMX, or AVX512-BF16 on AMD Zen 4), float16
    on older GPUs, and float32 on other CPUs: without native bf16, autocast is emulated (8× slower
    for a convolution on an AVX2-only CPU), and on a Xeon with AVX512-BF16 but no AMX native bf16
    ran at 0.6× float32's speed.
    """
    if amp == "none":
        return None
    if amp == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if bf16_faster() else None
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


def fp16_products_unused(amp_dtype: torch.dtype | None, device: torch.device) -> str | None:
    """Why `train.fp16_products` cannot act in this run (one line), or None where it can: they
    replace float32 products of CPU 1×1 convolutions, with a kernel that needs AVX512-FP16."""
    if device.type != "cpu":
        return f"the 1×1 fast path is a CPU one and this run trains on {device.type}"
    if amp_dtype is not None:
        return f"this run computes in {amp_dtype}"
    reason = pointwise_fp16.unavailable_reason()
    return None if reason is None else f"the float16 kernel cannot run here ({reason})"


def fp16_products_offer(
    model: nn.Module, amp_dtype: torch.dtype | None, device: torch.device
) -> str | None:
    """A one-line suggestion of `train.fp16_products` for a float32 CPU run on the 1×1 fast path
    (`train.gemm_weight_grad`) that has them off where they would act (the float16 kernel runs
    here and `model` has 1×1s it takes), else None."""
    if fp16_products_unused(amp_dtype, device) is not None:
        return None
    # the 1×1s the fast path takes, of outputs the float16 kernel computes
    if not any(takes_module(m) and pointwise_fp16.takes(m.out_channels) for m in model.modules()):
        return None
    return (
        "this CPU has float16 FMAs (AVX512-FP16): train.fp16_products=true runs the 1×1 "
        "convolutions' products in float16 (1.4× the float32 step of ResNeXt-50 on such a Xeon, "
        "at float16's precision; docs/training.md)"
    )
