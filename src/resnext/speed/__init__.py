"""Fast paths: `optimize` (BN folding, channels_last, bf16, compiled graph; CPU kernels), allocator, benchmarks."""

from __future__ import annotations

from resnext.speed.allocator import find_allocator, loaded_allocator, reexec_with_allocator
from resnext.speed.capability import bf16_faster, bf16_supported, cpu_capability
from resnext.speed.conv_guard import guard_conv_backward
from resnext.speed.fastpath import optimize
from resnext.speed.fold import fold_batchnorm

__all__ = [
    "bf16_faster",
    "bf16_supported",
    "cpu_capability",
    "find_allocator",
    "fold_batchnorm",
    "guard_conv_backward",
    "loaded_allocator",
    "optimize",
    "reexec_with_allocator",
]
