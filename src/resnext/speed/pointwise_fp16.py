"""Float32 1×1 convolutions with float16 products (`kernels/pointwise_fp16.c`, AVX512-FP16).

On a CPU with AVX512-FP16 a 512-bit float16 FMA does twice the multiply-adds of a float32 one. The
kernel rounds the (power-of-two scaled) weight and input to float16, sums runs of 64 products in
float16 and the runs in float32, then applies the bias, optionally a residual, and optionally a
ReLU in float32: inputs and outputs stay float32, and the scaling keeps every partial sum in
float16's range. The result is float16-precise, not float32-exact, so `optimize` uses it only
where asked (`pointwise_fp16`). Exposed, through ctypes, as ``torch.ops.resnext.pointwise_fp16``
and ``pointwise_fp16_`` (written over the residual); `Fp16Conv1x1` is the module the pass swaps
in (`conv_x3_swap.swap_convs_fp16`).
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from resnext import native
from resnext.speed import operators
from resnext.speed.conv1x1_kernel import Conv1x1Kernel, float32_cpu_inference

SOURCE = Path(__file__).with_name("kernels") / "pointwise_fp16.c"
FLAGS = (
    "-O3",
    "-mavx512f",
    "-mavx512bw",
    "-mavx512vl",
    "-mavx512dq",
    "-mavx512fp16",
    "-mfma",
    "-fopenmp",
)
REQUIRED_FLAGS = frozenset({"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_fp16"})
BUILD = native.Build("avx512-fp16", SOURCE, FLAGS, REQUIRED_FLAGS, headers=SOURCE.parent)
PANEL = 32  # output channels a packed panel holds: the kernel takes multiples of it
RUN = 64  # products summed in float16 before they join the float32 sums


def load(source: Path = SOURCE) -> ctypes.CDLL:
    """The kernel built (from this package's source, or another revision's `source` for
    `benchmarks/bench_pointwise_fp16.py`) and loaded, its functions' C signatures declared."""
    lib = BUILD.load(source)
    lib.pointwise_fp16_pack.argtypes = (
        [ctypes.c_void_p] * 2 + [ctypes.c_int] * 2 + [ctypes.POINTER(ctypes.c_int)]
    )
    lib.pointwise_fp16_pack.restype = ctypes.c_int
    lib.pointwise_fp16.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int] * 9
    lib.pointwise_fp16.restype = ctypes.c_int
    lib.pointwise_fp16_wgrad.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int] * 7
    lib.pointwise_fp16_wgrad.restype = ctypes.c_int
    return lib


@functools.lru_cache(maxsize=1)
def _library() -> ctypes.CDLL:
    return load()


@functools.lru_cache(maxsize=1)
def unavailable_reason() -> str | None:
    """None if the kernel can run here, else why not (one line; decided once per process)."""
    return native.problem(_library)


class NonFiniteWeight(ValueError):
    """`pack` was given a weight holding an infinity or NaN."""


def takes(out_channels: int) -> bool:
    """Whether the kernel computes a layer of `out_channels` outputs (a multiple of 32)."""
    return out_channels >= PANEL and out_channels % PANEL == 0


def pack(weight: torch.Tensor, transposed: bool = False) -> tuple[torch.Tensor, int]:
    """A (C_out, C_in, 1, 1) float32 weight as the kernel's float16 panels, scaled by 2^e so that
    its largest magnitude lies in [0.5, 1), and e. With `transposed`, the panels of its transpose
    (C_in outputs, C_out inputs: the weight of the convolution's input gradient)."""
    if weight.dim() != 4 or weight.shape[2:] != (1, 1):
        raise ValueError(f"weight: expected a (C, Cin, 1, 1) weight, got {tuple(weight.shape)}")
    rows, columns = weight.shape[:2]
    out_ch, in_ch = (columns, rows) if transposed else (rows, columns)
    if not takes(out_ch):
        raise ValueError(
            f"weight: expected a multiple of {PANEL} "
            + ("input channels (transposed)" if transposed else "output channels")
            + f", got {out_ch}"
        )
    w = weight.detach().float().reshape(rows, columns)
    # Panel p holds, for each input channel, its 32 outputs 32p..32p+31 side by side.
    if transposed:
        panels = w.reshape(in_ch, out_ch // PANEL, PANEL).transpose(0, 1).contiguous()
    else:
        panels = w.reshape(out_ch // PANEL, PANEL, in_ch).transpose(1, 2).contiguous()
    packed = torch.empty(out_ch * in_ch, dtype=torch.float16)
    exponent = ctypes.c_int(0)
    # The sizes are checked above: the kernel refuses only a non-finite value (its scan is ~8x
    # faster than torch.isfinite's, and packing runs on every training step).
    if _library().pointwise_fp16_pack(
        panels.data_ptr(), packed.data_ptr(), out_ch, in_ch, ctypes.byref(exponent)
    ):
        raise NonFiniteWeight("weight: expected finite values, got an infinity or NaN")
    return packed, exponent.value


def _check_rc(rc: int, function: str, x: torch.Tensor, channels: int, stride: int) -> None:
    """The C function's refusal (1: sizes, 2: no memory for its buffers) as a RuntimeError."""
    if rc != 0:
        raise RuntimeError(
            f"{function} refused {tuple(x.shape)} → {channels}, stride {stride}"
            + (" (no memory for its buffers)" if rc == 2 else "")
        )


def run(
    x: torch.Tensor,
    packed: torch.Tensor,
    exponent: int,
    out_channels: int,
    bias: torch.Tensor,
    stride: int = 1,
    relu: bool = False,
    residual: torch.Tensor | None = None,
    in_place: bool = False,
) -> torch.Tensor:
    """``relu?(conv2d(x, w, bias, stride) + residual)`` in float32 with float16 products, for a
    1×1 weight `w` of `out_channels` outputs with ``packed, exponent = pack(w)``; written over
    `residual` (channels_last, then returned) if `in_place`."""
    operators.check_no_grad("pointwise_fp16", x, residual)
    operators.check_float32_4d("x", x)
    n, cin, h, w = x.shape
    if stride < 1:
        raise ValueError(f"stride: expected a positive integer, got {stride}")
    if packed.dtype != torch.float16 or packed.dim() != 1 or not packed.is_contiguous():
        raise ValueError(
            f"packed: expected pointwise_fp16.pack's float16 panels, got {packed.dtype}"
        )
    if packed.numel() != out_channels * cin or not takes(out_channels):
        raise ValueError(
            f"packed: expected {out_channels}×{cin} weights (out_channels a multiple of "
            f"{PANEL}), got {packed.numel()} values"
        )
    if not -126 <= exponent <= 126:
        raise ValueError(f"exponent: expected pack's scale exponent in [-126, 126], got {exponent}")
    x, y, residual = operators.pointwise_operands(x, out_channels, stride, bias, residual, in_place)
    rc = _library().pointwise_fp16(
        x.data_ptr(),
        packed.data_ptr(),
        bias.contiguous().data_ptr(),
        None if residual is None else residual.data_ptr(),
        y.data_ptr(),
        n,
        h,
        w,
        cin,
        out_channels,
        stride,
        int(relu),
        exponent,
        torch.get_num_threads(),
    )
    _check_rc(rc, "pointwise_fp16", x, out_channels, stride)
    return y


def weight_grad(x: torch.Tensor, grad: torch.Tensor, stride: int = 1) -> torch.Tensor:
    """The weight gradient (C_out, C_in, 1, 1) of a bias-free float32 1×1 convolution of `x` at
    `stride`, given its output's gradient `grad`, with float16 products and float32 sums
    (`pointwise_fp16_wgrad`; C_in a multiple of 32)."""
    operators.check_no_grad("pointwise_fp16.weight_grad", x, grad)
    operators.check_float32_4d("x", x)
    operators.check_float32_4d("grad", grad)
    if stride < 1:
        raise ValueError(f"stride: expected a positive integer, got {stride}")
    n, cin, h, w = x.shape
    out_shape = operators.pointwise_output_shape(tuple(x.shape), grad.shape[1], stride)
    if tuple(grad.shape) != out_shape:
        raise ValueError(
            f"grad: expected the output's shape {out_shape} for x {tuple(x.shape)} at stride "
            f"{stride}, got {tuple(grad.shape)}"
        )
    cout = grad.shape[1]
    if not takes(cin):
        raise ValueError(f"x: expected a multiple of {PANEL} channels, got {cin}")
    x = x.contiguous(memory_format=torch.channels_last)
    grad = grad.contiguous(memory_format=torch.channels_last)
    dw = torch.empty(cout, cin, 1, 1)
    rc = _library().pointwise_fp16_wgrad(
        x.data_ptr(), grad.data_ptr(), dw.data_ptr(), n, h, w, cin, cout, stride,
        torch.get_num_threads(),
    )  # fmt: skip
    _check_rc(rc, "pointwise_fp16_wgrad", x, cout, stride)
    return dw


def _output_shape(
    x: torch.Tensor,
    packed: torch.Tensor,
    exponent: int,
    out_channels: int,
    bias: torch.Tensor,
    stride: int,
    relu: bool,
) -> tuple[int, ...]:
    return operators.pointwise_output_shape(tuple(x.shape), out_channels, stride)


operators.define_over_residual(
    "pointwise_fp16",
    "Tensor x, Tensor packed, int exponent, int out_channels, Tensor bias, int stride, bool relu",
    run,
    _output_shape,
)


class Fp16Conv1x1(Conv1x1Kernel):
    """A float32 1×1 convolution (any stride) with its bias, then optionally a residual add and a
    ReLU, its products in float16 (`pointwise_fp16.run`). With `in_place` the result is written
    over the residual (which the pass allows only where it is dead after). Inputs of another
    dtype or device, and inputs needing a gradient, take torch's float32 convolution: the same
    function, exactly."""

    OP = torch.ops.resnext.pointwise_fp16
    OP_IN_PLACE = torch.ops.resnext.pointwise_fp16_
    KIND = "float16 products"

    def __init__(self, conv: nn.Conv2d, relu: bool, in_place: bool) -> None:
        if not eligible(conv):
            raise ValueError(
                "conv: expected a float32 1×1 convolution with equal strides, no padding, groups "
                f"1, a multiple of {PANEL} outputs and finite weights, got {conv}"
            )
        weight = conv.weight.detach().float().contiguous()
        packed, exponent = pack(weight)
        super().__init__(conv, packed, relu, in_place)
        self.weight, self.exponent = weight, exponent

    def _args(self, x: torch.Tensor) -> tuple:
        return (x, self.packed, self.exponent, self.out_channels, self.bias, self.stride, self.relu)

    def takes(self, x: torch.Tensor) -> bool:
        return float32_cpu_inference(x)

    def fallback(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """The same function in float32 with torch's operators."""
        y = F.conv2d(x, self.weight.to(x.dtype), self.bias.to(x.dtype), self.stride)
        if residual is not None:
            y = y + residual
        return F.relu(y) if self.relu else y


def eligible(module: nn.Module) -> bool:
    """Whether `module` is a float32 Conv2d the kernel computes (1×1, equal strides, no padding,
    groups 1, no dilation, a multiple of 32 outputs, finite weights)."""
    return (
        isinstance(module, nn.Conv2d)
        and module.weight.dtype == torch.float32
        and module.kernel_size == (1, 1)
        and module.padding == (0, 0)
        and module.padding_mode == "zeros"
        and module.groups == 1
        and module.dilation == (1, 1)
        and module.stride[0] == module.stride[1]
        and takes(module.out_channels)
        and bool(torch.isfinite(module.weight).all())
    )
