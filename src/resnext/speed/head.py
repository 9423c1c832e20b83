"""The classifier head (global average pooling, then the linear layer) in C (`kernels/head.c`).

Only the replay backend uses it (`optimize(..., backend="replay")`): there every torch operator
after our kernels costs Python and dispatch on cold caches (~0.1–0.25 ms each at batch 1 on the
Xeon), while a C call joins the replayed loop. `swap_head` puts `PooledMean` and `KernelLinear`
in place of a network's `avgpool` and `fc`, together, since they hand each other float32 means:
bf16 models get them rounded to bf16, as torch's bf16 pooling would give, and bf16 logits
widened to float32, as the optimized model returns them.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from resnext import native
from resnext.speed.kernel_module import KernelModule

SOURCE = Path(__file__).with_name("kernels") / "head.c"
FLAGS = ("-O3", "-mavx2", "-mfma", "-fopenmp")
REQUIRED_FLAGS = frozenset({"avx2", "fma"})
DTYPES = (torch.float32, torch.bfloat16)


@functools.lru_cache(maxsize=1)
def _library() -> ctypes.CDLL:
    lib = native.load(SOURCE, FLAGS, cpu_needs=REQUIRED_FLAGS)
    lib.head_pool.argtypes = [ctypes.c_void_p] * 2 + [ctypes.c_int] * 5
    lib.head_pool.restype = ctypes.c_int
    lib.head_linear.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int] * 5
    lib.head_linear.restype = ctypes.c_int
    return lib


@functools.lru_cache(maxsize=1)
def unavailable_reason() -> str | None:
    """None if the kernels can run here, else why not (one line; decided once per process)."""
    return native.problem(_library)


def _runs_kernel(x: torch.Tensor, dtype: torch.dtype) -> bool:
    return (
        x.device.type == "cpu"
        and x.dtype == dtype
        and not (torch.is_grad_enabled() and x.requires_grad)
        and unavailable_reason() is None
    )


def _check(rc: int, what: str) -> None:
    if rc != 0:
        raise RuntimeError(f"{what}: the head kernel refused its arguments")


class PooledMean(KernelModule):
    """Global average pooling of a `dtype` map to float32 (N, C, 1, 1) means, rounded to bf16
    values for bf16 maps: the kernel on channels-last CPU maps, torch elsewhere."""

    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__()
        if dtype not in DTYPES:
            raise ValueError(f"dtype: expected float32 or bfloat16, got {dtype}")
        self.dtype = dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.dtype != self.dtype:
            raise ValueError(f"x: expected a 4-d {self.dtype} map, got {x.dtype} {tuple(x.shape)}")
        n, c, h, w = x.shape
        if not (_runs_kernel(x, self.dtype) and x.is_contiguous(memory_format=torch.channels_last)):
            return x.mean((2, 3), keepdim=True, dtype=torch.float32).to(self.dtype).float()
        y = torch.empty((n, c, 1, 1), dtype=torch.float32)
        if y.numel():
            bf16 = int(self.dtype == torch.bfloat16)
            rc = _library().head_pool(
                x.data_ptr(), y.data_ptr(), n, h * w, c, bf16, torch.get_num_threads()
            )
            _check(rc, "head_pool")
        return y


class KernelLinear(KernelModule):
    """`linear` (its weight and bias in `dtype`) of float32 inputs, to float32 outputs: for bf16
    the inputs as bf16 and the outputs rounded to bf16, as torch's bf16 linear layer gives them."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.dtype = linear.weight.dtype
        if self.dtype not in DTYPES:
            raise ValueError(f"linear: expected float32 or bfloat16 weights, got {self.dtype}")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight.detach().contiguous()
        self.bias = None if linear.bias is None else linear.bias.detach().contiguous()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2 or x.shape[1] != self.in_features or x.dtype != torch.float32:
            raise ValueError(
                f"x: expected float32 (N, {self.in_features}), got {x.dtype} {tuple(x.shape)}"
            )
        if not _runs_kernel(x, torch.float32):
            return F.linear(x.to(self.dtype), self.weight, self.bias).float()
        x = x.contiguous()
        n = x.shape[0]
        y = torch.empty((n, self.out_features), dtype=torch.float32)
        if y.numel():
            rc = _library().head_linear(
                x.data_ptr(),
                self.weight.data_ptr(),
                None if self.bias is None else self.bias.data_ptr(),
                y.data_ptr(),
                n,
                self.in_features,
                self.out_features,
                int(self.dtype == torch.bfloat16),
                torch.get_num_threads(),
            )
            _check(rc, "head_linear")
        return y


def swap_head(model: nn.Module) -> bool:
    """Put `PooledMean` and `KernelLinear` in place of `model.avgpool` (a global average
    pooling) and `model.fc` (a float32 or bf16 CPU linear layer), in place; whether it did."""
    pool, fc = getattr(model, "avgpool", None), getattr(model, "fc", None)
    if not (
        isinstance(pool, nn.AdaptiveAvgPool2d)
        and pool.output_size in (1, (1, 1))
        and isinstance(fc, nn.Linear)
        and fc.weight.dtype in DTYPES
        and fc.weight.device.type == "cpu"
        and unavailable_reason() is None
    ):
        return False
    model.avgpool = PooledMean(fc.weight.dtype)
    model.fc = KernelLinear(fc)
    return True
