"""Our float32 1×1 convolution on AMX tiles as three bf16 products (`kernels/pointwise_x3_amx.c`).

Each float32 operand is split into a bf16 high part and a bf16 low part; the product keeps
hi·hi + hi·lo + lo·hi with float32 accumulation, which is float32 accuracy to ~1e-5 of each
product (the C source derives the bound) at the AMX tile rate, ~5× the float32 FMA rate of the
Intel Xeon it was written on. Exposed as ``torch.ops.resnext.pointwise_x3`` (a new output) and
``torch.ops.resnext.pointwise_x3_`` (written over the residual). Runs only on CPUs with AMX-BF16
whose OS grants the tile state; `unavailable_reason` says why not elsewhere.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch

from resnext import native
from resnext.speed import operators
from resnext.speed.grouped_amx import FLAGS, REQUIRED_FLAGS, overlap
from resnext.speed.grouped_kernel import output_for

SOURCE = Path(__file__).with_name("kernels") / "pointwise_x3_amx.c"


def build(out_dir: Path | None = None) -> Path:
    """Compile the kernel (unless this source, these flags and this compiler already were)."""
    return native.build(SOURCE, FLAGS, out_dir=out_dir)


@functools.lru_cache(maxsize=1)
def _library() -> ctypes.CDLL:
    lib = native.load(SOURCE, FLAGS, cpu_needs=REQUIRED_FLAGS)
    lib.pointwise_x3_amx.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int] * 8
    lib.pointwise_x3_amx.restype = ctypes.c_int
    lib.pointwise_x3_allowed.restype = ctypes.c_int
    if not lib.pointwise_x3_allowed():
        raise native.NativeUnavailable("the operating system refuses this process AMX tile state")
    return lib


@functools.lru_cache(maxsize=1)
def _library_problem() -> str | None:
    return native.problem(_library)


def unavailable_reason() -> str | None:
    """None if the kernel can run here, else why not (one line)."""
    return _library_problem()


def supports(in_channels: int, out_channels: int, stride: int) -> bool:
    """Whether the kernel takes a 1×1 convolution of this shape (no padding, groups 1)."""
    return (
        in_channels >= 32
        and in_channels % 32 == 0
        and out_channels >= 16
        and out_channels % 16 == 0
        and stride in (1, 2)
    )


def split_bf16(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 `t` as bf16 (hi, lo) with hi = bf16(t) and lo = bf16(t − hi), each rounded to
    nearest even, as the kernel splits its inputs."""
    hi = t.float().to(torch.bfloat16)
    return hi, (t.float() - hi.float()).to(torch.bfloat16)


def pack(weight: torch.Tensor) -> torch.Tensor:
    """A (C, K, 1, 1) float32 weight as the kernel reads it: bf16 [C/16][K/32][2][16][16][2]
    (16-output tile, 32-deep K step, hi then lo, K pair, output, pair member)."""
    if weight.dim() != 4 or weight.shape[2:] != (1, 1) or not supports(*weight.shape[1::-1], 1):
        raise ValueError(
            "weight: expected a (C, K, 1, 1) weight with C a multiple of 16 and K of 32, got "
            f"shape {tuple(weight.shape)}"
        )
    out_ch, in_ch = weight.shape[:2]
    parts = []
    for part in split_bf16(weight.detach().reshape(out_ch, in_ch)):
        w = part.reshape(out_ch // 16, 16, in_ch // 32, 16, 2)
        parts.append(w.permute(0, 2, 3, 1, 4))  # (tile, step, pair, output, member)
    return torch.stack(parts, dim=2).contiguous()


def _check_packed(packed: torch.Tensor, in_ch: int) -> int:
    """The output channels of `packed`, a ValueError naming it unless it is `pack`'s output for
    `in_ch` input channels."""
    if (
        packed.dtype != torch.bfloat16
        or packed.dim() != 6
        or packed.shape[1:] != (in_ch // 32, 2, 16, 16, 2)
        or in_ch % 32
        or not packed.is_contiguous()
    ):
        raise ValueError(
            f"packed: expected a contiguous bf16 pointwise_x3.pack weight for {in_ch} input "
            f"channels (a multiple of 32), got {packed.dtype} {tuple(packed.shape)}"
        )
    return packed.shape[0] * 16


def _check_float_nhwc(name: str, t: torch.Tensor, shape: tuple[int, ...] | None = None) -> None:
    if t.dtype != torch.float32 or t.dim() != 4 or t.device.type != "cpu":
        raise ValueError(
            f"{name}: expected a 4-d float32 CPU tensor, got {t.dtype} {tuple(t.shape)} on "
            f"{t.device}"
        )
    if shape is not None and tuple(t.shape) != shape:
        raise ValueError(f"{name}: expected shape {shape}, got {tuple(t.shape)}")


def run(
    x: torch.Tensor,
    packed: torch.Tensor,
    bias: torch.Tensor,
    stride: int = 1,
    relu: bool = False,
    residual: torch.Tensor | None = None,
    in_place: bool = False,
) -> torch.Tensor:
    """``relu?(conv2d(x, w, bias, stride) + residual)`` in float32 with `packed` = pack(w),
    written over `residual` (channels_last, which is then returned) if `in_place`."""
    operators.check_no_grad("pointwise_x3", x, residual)
    _check_float_nhwc("x", x)
    n, k, h, w = x.shape
    c = _check_packed(packed, k)
    if stride not in (1, 2):
        raise ValueError(f"stride: expected 1 or 2, got {stride}")
    if bias.dtype != torch.float32 or bias.numel() != c:
        raise ValueError(f"bias: expected {c} float32 values, got {bias.dtype} {bias.numel()}")
    expected = (n, c, (h - 1) // stride + 1, (w - 1) // stride + 1)
    if residual is not None:
        _check_float_nhwc("residual", residual, expected)
    if in_place:
        if residual is None or not residual.is_contiguous(memory_format=torch.channels_last):
            raise ValueError("residual: writing in place needs a channels_last residual")
        if overlap(x, residual):
            raise ValueError("residual: must not share memory with x when written in place")
        y = residual
    else:
        if residual is not None:
            residual = residual.contiguous(memory_format=torch.channels_last)
        y = output_for(x, stride, c)
    x = x.contiguous(memory_format=torch.channels_last)
    if y.numel():
        rc = _library().pointwise_x3_amx(
            x.data_ptr(),
            packed.data_ptr(),
            bias.contiguous().data_ptr(),
            None if residual is None else residual.data_ptr(),
            y.data_ptr(),
            n,
            h,
            w,
            k,
            c,
            stride,
            int(relu),
            torch.get_num_threads(),
        )
        if rc == -2:
            raise MemoryError("pointwise_x3_amx: out of memory for its per-thread buffers")
        if rc != 0:
            raise RuntimeError(f"pointwise_x3_amx refused {tuple(x.shape)} → {c}, stride {stride}")
    return y


def _in_place(
    x: torch.Tensor,
    packed: torch.Tensor,
    bias: torch.Tensor,
    stride: int,
    relu: bool,
    residual: torch.Tensor,
) -> None:
    run(x, packed, bias, stride, relu, residual, in_place=True)


def _fake(
    x: torch.Tensor,
    packed: torch.Tensor,
    bias: torch.Tensor,
    stride: int,
    relu: bool,
    residual: torch.Tensor | None,
) -> torch.Tensor:
    return output_for(x, stride, packed.shape[0] * 16)


def _fake_in_place(
    x: torch.Tensor,
    packed: torch.Tensor,
    bias: torch.Tensor,
    stride: int,
    relu: bool,
    residual: torch.Tensor,
) -> None:
    return None


_ARGS = "Tensor x, Tensor packed, Tensor bias, int stride, bool relu"
operators.define(f"pointwise_x3({_ARGS}, Tensor? residual) -> Tensor", run, _fake)
operators.define(f"pointwise_x3_({_ARGS}, Tensor(a!) residual) -> ()", _in_place, _fake_in_place)
