"""Training-mode batch norm + ReLU (+ residual) on channels-last tensors: `kernels/bn_act*.c` via ctypes.

Built on first use like the other C parts (`resnext.native`); runs on torch's OpenMP threads.
Each function takes channels-last contiguous CPU tensors of one dtype and per-channel float32
vectors; `FusedBatchNorm2d` (in `resnext.speed.fused_bn`) decides when they apply and falls back
to torch otherwise. Two builds: `bn_act.c` for AVX-512 (float32 and bfloat16) and
`bn_act_avx2.c` for CPUs with AVX2 + FMA only (float32); `BUILD` is this CPU's, following the
grouped kernel's choice (`grouped_kernel.ISA`).
"""

from __future__ import annotations

import ctypes
import functools
from dataclasses import dataclass
from pathlib import Path

import torch

from resnext import native
from resnext.speed import grouped_kernel

KERNELS = Path(__file__).with_name("kernels")
LIBS = ("-lm",)
DTYPES = {torch.float32: 0, torch.bfloat16: 1}
MASK_NONE, MASK_FROM_X, MASK_FROM_BITS = 0, 1, 2


@dataclass(frozen=True)
class Build(native.Build):
    """One build of the kernels (`native.Build`) and the dtypes it takes."""

    dtypes: tuple[torch.dtype, ...]


BUILDS = {
    "avx512": Build(
        "avx512",
        KERNELS / "bn_act.c",
        ("-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mfma", "-fopenmp"),
        frozenset({"avx512f", "avx512bw", "avx512vl"}),
        (torch.float32, torch.bfloat16),
        libs=LIBS,
        headers=KERNELS,
    ),
    "avx2": Build(
        "avx2",
        KERNELS / "bn_act_avx2.c",
        grouped_kernel.AVX2.flags,
        grouped_kernel.AVX2.cpu_needs,
        (torch.float32,),
        libs=LIBS,
        headers=KERNELS,
    ),
}
BUILD = BUILDS[grouped_kernel.ISA.name]  # this CPU's; fixed for the process
SOURCE = BUILD.source

_P, _L, _I, _D = ctypes.c_void_p, ctypes.c_long, ctypes.c_int, ctypes.c_double


@functools.cache
def _library_for(build: Build) -> ctypes.CDLL:
    lib = build.load()
    lib.bn_act_forward.argtypes = [_P, _P, _P, _I, _L, _L, _P, _P, _D, _I, _P, _P, _P, _I, _P]
    lib.bn_act_forward.restype = _I
    lib.bn_act_backward.argtypes = [_P] * 5 + [_I, _L, _L] + [_P] * 4 + [_I, _P, _P, _I]
    lib.bn_act_backward.restype = _I
    lib.bn_update_running.argtypes = [_P, _P, _P, _P, _L, _D, _L]
    lib.bn_update_running.restype = None
    return lib


def _library() -> ctypes.CDLL:
    return _library_for(BUILD)


@functools.cache
def _library_problem(build: Build) -> str | None:
    return native.problem(lambda: _library_for(build))


def unavailable_reason() -> str | None:
    """None if the kernels can run here, else why not (one line; decided once per process)."""
    return _library_problem(BUILD)


def takes(x: torch.Tensor) -> bool:
    """Whether `x` is a tensor the kernels read as it is: 4-d, CPU, a dtype of this build
    (float32, and bf16 on AVX-512), channels-last dense."""
    return (
        x.dim() == 4
        and x.device.type == "cpu"
        and x.dtype in BUILD.dtypes
        and x.is_contiguous(memory_format=torch.channels_last)
        and x.shape[1] > 0
        and x.shape[0] * x.shape[2] * x.shape[3] > 1
    )


def _rows(x: torch.Tensor) -> tuple[int, int]:
    n, c, h, w = x.shape
    return n * h * w, c


def mask_words(channels: int) -> int:
    """16-bit words per row of the ReLU mask bits (one per 16-channel block)."""
    return -(-channels // 16)


def _vec(v: torch.Tensor | None) -> torch.Tensor | None:
    if v is None or (v.dtype == torch.float32 and v.is_contiguous()):
        return v  # read through data_ptr only: a parameter as it is, no detach op per call
    return v.detach().to(torch.float32).contiguous()


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _check(failed: int, what: str) -> None:
    if failed == 3:  # the AVX2 build's answer to bf16, which `takes` keeps from it
        raise ValueError(f"bn_act.{what}: the {BUILD.name} build takes {BUILD.dtypes} only")
    if failed:
        raise MemoryError(f"bn_act.{what}: could not allocate its per-channel sums")


def forward(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    residual: torch.Tensor | None,
    relu: bool,
    want_bits: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(relu?(BN(x) [+ residual]) with batch statistics, mean, 1/std, biased variance, bits).

    The statistics are float32 vectors of shape (C,); the output is a new tensor like `x`. With
    `want_bits` (and `relu`) `bits` is the mask output > 0 as one bit per value (an int16 tensor
    of rows × ⌈C/16⌉ words) for `backward`'s MASK_FROM_BITS; else None.
    """
    rows, channels = _rows(x)
    out = torch.empty_like(x, memory_format=torch.channels_last)
    mean, invstd, var = torch.empty(3, channels, dtype=torch.float32)
    bits = (
        torch.empty(rows, mask_words(channels), dtype=torch.int16) if want_bits and relu else None
    )
    weight, bias = _vec(weight), _vec(bias)
    failed = _library().bn_act_forward(
        x.data_ptr(), _ptr(residual), out.data_ptr(), DTYPES[x.dtype], rows, channels,
        _ptr(weight), _ptr(bias), eps, int(relu),
        mean.data_ptr(), invstd.data_ptr(), var.data_ptr(), torch.get_num_threads(), _ptr(bits),
    )  # fmt: skip
    _check(failed, "bn_act_forward")
    return out, mean, invstd, var, bits


def backward(
    grad: torch.Tensor,
    x: torch.Tensor,
    bits: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    mean: torch.Tensor,
    invstd: torch.Tensor,
    mask: int,
    residual_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """(dx, dweight, dbias, the residual's gradient) of `forward`, given the output gradient.

    `mask` says where the ReLU's mask comes from (MASK_FROM_X, MASK_FROM_BITS with the `bits`
    `forward` returned, or MASK_NONE); the residual's gradient is the masked gradient (a new
    tensor) or `grad` itself.
    """
    rows, channels = _rows(x)
    words = mask_words(channels)
    if mask == MASK_FROM_BITS and (bits is None or tuple(bits.shape) != (rows, words)):
        raise ValueError(f"bits: expected the ({rows}, {words}) mask of forward")
    dx = torch.empty_like(x, memory_format=torch.channels_last)
    masked = None
    if residual_grad and mask != MASK_NONE:
        masked = torch.empty_like(x, memory_format=torch.channels_last)
    dweight = None if weight is None else torch.empty(channels, dtype=torch.float32)
    dbias = None if bias is None else torch.empty(channels, dtype=torch.float32)
    weight, bias = _vec(weight), _vec(bias)
    failed = _library().bn_act_backward(
        grad.data_ptr(), x.data_ptr(), _ptr(bits), _ptr(masked), dx.data_ptr(), DTYPES[x.dtype],
        rows, channels, _ptr(weight), _ptr(bias), mean.data_ptr(), invstd.data_ptr(), mask,
        _ptr(dweight), _ptr(dbias), torch.get_num_threads(),
    )  # fmt: skip
    _check(failed, "bn_act_backward")
    d_residual = (masked if masked is not None else grad) if residual_grad else None
    return dx, dweight, dbias, d_residual


def update_running(
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    mean: torch.Tensor,
    var: torch.Tensor,
    factor: float,
    count: int,
) -> bool:
    """running ← (1 − factor)·running + factor·batch, the variance unbiased over `count` values
    per channel, in place, as nn.BatchNorm2d does; False (nothing written) unless all four are
    contiguous float32 CPU vectors of one length."""
    vectors = (running_mean, running_var, mean, var)
    n = mean.numel()
    if any(
        v.dtype != torch.float32
        or v.device.type != "cpu"
        or not v.is_contiguous()
        or v.numel() != n
        for v in vectors
    ):
        return False
    _library().bn_update_running(
        mean.data_ptr(), var.data_ptr(), running_mean.data_ptr(), running_var.data_ptr(), n,
        factor, count,
    )  # fmt: skip
    return True
