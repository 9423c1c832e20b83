"""bf16 1×1 convolutions as one matrix product: `kernels/pointwise_gemm.c` via ctypes.

A stride-1 1×1 convolution of a channels-last tensor is the product of its (N·H·W) × C_in
pixel rows with the weight matrix; its input gradient is the product of the output gradient's
rows with the weight transposed. The kernel computes both in bf16 with float32 sums, from a
weight packed into VDPBF16PS's operand layout (pairs of rows in one 32-bit word), and needs
AVX512-BF16. For inference, `conv1x1` (the operators ``torch.ops.resnext.pointwise_conv_bf16``
and ``pointwise_conv_bf16_``, written over the residual) adds the bias and a residual and applies
a ReLU in the same store, from a weight packed strip by strip (`pack_conv`), and reads a strided
one's pixels (a projection shortcut's) in place. Built on first use
like the project's other C parts (`resnext.native`); runs on torch's OpenMP threads.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch

from resnext import native
from resnext.speed import operators

SOURCE = Path(__file__).with_name("kernels") / "pointwise_gemm.c"
FLAGS = ("-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-fopenmp")
REQUIRED_FLAGS = frozenset({"avx512f", "avx512bw", "avx512vl", "avx512_bf16"})
BUILD = native.Build("avx512-bf16", SOURCE, FLAGS, REQUIRED_FLAGS, headers=SOURCE.parent)
COLUMN_BLOCK = 64  # the kernel's register tile is 64 output channels wide
ABI = 3  # pointwise_gemm_abi() of the sources these bindings call


def load(source: Path = SOURCE) -> ctypes.CDLL:
    """The kernels built (from this package's source, or another revision's `source` for
    `benchmarks/bench_network_ab.py`) and loaded, their C signatures declared."""
    lib = BUILD.load(source)
    # ctypes would call an older source's functions with this revision's arguments
    abi = getattr(lib, "pointwise_gemm_abi", None)
    if abi is None or abi() != ABI:
        raise native.NativeUnavailable(
            f"{source}: its functions' signatures are revision "
            f"{'1 (no pointwise_gemm_abi)' if abi is None else abi()}, these bindings' {ABI}"
        )
    lib.pointwise_gemm_bf16.argtypes = [
        ctypes.c_void_p, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_long,
        ctypes.c_long, ctypes.c_int, ctypes.c_int, ctypes.c_int,
    ]  # fmt: skip
    for pack in (lib.pack_pairs_rows, lib.pack_pairs_cols):
        pack.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p] + [ctypes.c_int] * 3
    lib.pointwise_wgrad_bf16.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_long] + [ctypes.c_int] * 3
    lib.pointwise_conv_bf16.argtypes = (
        [ctypes.c_void_p] * 5 + [ctypes.c_long] * 3 + [ctypes.c_int] * 5
    )
    lib.pointwise_conv_bf16_shortcut.argtypes = (
        [ctypes.c_void_p] * 5 + [ctypes.c_long] * 3 + [ctypes.c_int] * 6
    )
    for fn in (
        lib.pointwise_gemm_bf16,
        lib.pointwise_conv_bf16,
        lib.pointwise_conv_bf16_shortcut,
        lib.pack_pairs_rows,
        lib.pack_pairs_cols,
        lib.pointwise_wgrad_bf16,
    ):
        fn.restype = ctypes.c_int
    return lib


@functools.lru_cache(maxsize=1)
def _library() -> ctypes.CDLL:
    return load()


@functools.lru_cache(maxsize=1)
def unavailable_reason() -> str | None:
    """None if the kernel can run here, else why not (one line; decided once per process)."""
    return native.problem(_library)  # REQUIRED_FLAGS names avx512_bf16: checked before building


def takes(in_channels: int, out_channels: int) -> bool:
    """Whether the kernel computes a 1×1 convolution with these channels, forward and backward."""
    # Output columns come in blocks of 64 (C_out forward, C_in for the input gradient); the
    # reduction runs over pairs (C_in forward, C_out backward).
    return takes_weight_grad(in_channels) and out_channels % COLUMN_BLOCK == 0


def takes_weight_grad(in_channels: int) -> bool:
    """Whether `weight_grad` takes a 1×1 convolution with this many input channels (any output)."""
    return in_channels % COLUMN_BLOCK == 0


def _check_activation(name: str, t: torch.Tensor) -> None:
    if t.dtype != torch.bfloat16 or t.dim() != 4 or t.device.type != "cpu":
        raise ValueError(
            f"{name}: expected a 4-D bfloat16 CPU tensor, got {tuple(t.shape)} {t.dtype}"
        )


WEIGHT_DTYPES = {torch.float32: 1, torch.bfloat16: 0}  # the packs' `f32` flag


def _check_weight(weight: torch.Tensor) -> tuple[int, int]:
    if weight.dtype not in WEIGHT_DTYPES or weight.dim() != 4 or weight.shape[2:] != (1, 1):
        raise ValueError(
            f"weight: expected a float32 or bfloat16 (C_out, C_in, 1, 1) tensor, got "
            f"{tuple(weight.shape)} {weight.dtype}"
        )
    c_out, c_in = weight.shape[:2]
    if not takes(c_in, c_out):
        raise ValueError(
            f"weight: expected channel counts that are multiples of {COLUMN_BLOCK}, got "
            f"{c_out} out, {c_in} in"
        )
    return c_out, c_in


def _pack(weight: torch.Tensor, pairs_of_inputs: bool) -> torch.Tensor:
    c_out, c_in = _check_weight(weight)
    w = weight.detach().reshape(c_out, c_in).contiguous()
    pairs, columns = (c_in // 2, c_out) if pairs_of_inputs else (c_out // 2, c_in)
    packed = torch.empty(pairs, columns, 2, dtype=torch.bfloat16)
    pack = _library().pack_pairs_rows if pairs_of_inputs else _library().pack_pairs_cols
    flag = WEIGHT_DTYPES[w.dtype]
    pack(w.data_ptr(), flag, packed.data_ptr(), c_out, c_in, torch.get_num_threads())
    return packed


def pack_forward(weight: torch.Tensor) -> torch.Tensor:
    """The forward product's bf16 operand (C_in/2, C_out, 2) from a (C_out, C_in, 1, 1) weight.

    A float32 weight is rounded to bf16 (to nearest even, as `Tensor.to` does) while packing.
    """
    return _pack(weight, pairs_of_inputs=True)


def pack_input_grad(weight: torch.Tensor) -> torch.Tensor:
    """The input gradient's bf16 operand (C_out/2, C_in, 2) from a (C_out, C_in, 1, 1) weight."""
    return _pack(weight, pairs_of_inputs=False)


def matmul_channels(x: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    """y[n, :, h, w] = x[n, :, h, w] · B for every pixel, B the matrix `packed` holds; channels-last.

    `x` is (N, K, H, W) bf16, `packed` is (K/2, C, 2) from `pack_forward` (K = C_in, C = C_out)
    or `pack_input_grad` (K = C_out, C = C_in).
    """
    _check_activation("x", x)
    n, k, h, w = x.shape
    if packed.dim() != 3 or packed.shape[0] * 2 != k or packed.shape[2] != 2:
        raise ValueError(
            f"packed: expected ({k // 2}, C, 2) for x with {k} channels, got {tuple(packed.shape)}"
        )
    c = packed.shape[1]
    x = x.contiguous(memory_format=torch.channels_last)
    y = torch.empty(n, c, h, w, dtype=torch.bfloat16, memory_format=torch.channels_last)
    rows = n * h * w
    if rows == 0:
        return y
    rc = _library().pointwise_gemm_bf16(
        x.data_ptr(), k, packed.data_ptr(), y.data_ptr(), c, rows, k, c, torch.get_num_threads()
    )
    if rc != 0:
        raise ValueError(
            f"pointwise_gemm refused x {tuple(x.shape)} with packed {tuple(packed.shape)}"
        )
    return y


def weight_grad(x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """float32 (C_out, C_in, 1, 1) gradient of a stride-1 1×1 convolution's weight.

    `x` (N, C_in, H, W) is the convolution's input (already subsampled for a strided one), `grad`
    (N, C_out, H, W) its output's gradient, both bf16; C_in must be a multiple of 64.
    """
    _check_activation("x", x)
    _check_activation("grad", grad)
    n, c_in, h, w = x.shape
    if grad.shape[0] != n or grad.shape[2:] != x.shape[2:] or not takes_weight_grad(c_in):
        raise ValueError(
            f"x, grad: expected the same batch and map size and C_in a multiple of {COLUMN_BLOCK}, "
            f"got x {tuple(x.shape)}, grad {tuple(grad.shape)}"
        )
    c_out = grad.shape[1]
    x = x.contiguous(memory_format=torch.channels_last)
    grad = grad.contiguous(memory_format=torch.channels_last)
    dw = torch.empty(c_out, c_in, 1, 1, dtype=torch.float32)
    rc = _library().pointwise_wgrad_bf16(
        grad.data_ptr(), x.data_ptr(), dw.data_ptr(), n * h * w, c_out, c_in,
        torch.get_num_threads(),
    )  # fmt: skip
    if rc == 2:
        raise MemoryError("pointwise_wgrad: could not allocate the per-thread buffers")
    if rc != 0:
        raise ValueError(f"pointwise_wgrad refused x {tuple(x.shape)}, grad {tuple(grad.shape)}")
    return dw


def _check_bf16_4d(name: str, t: torch.Tensor, shape: tuple[int, ...]) -> None:
    if t.dtype != torch.bfloat16 or tuple(t.shape) != shape or t.device.type != "cpu":
        raise ValueError(
            f"{name}: expected a bfloat16 CPU tensor of shape {shape}, got {t.dtype} "
            f"{tuple(t.shape)} on {t.device}"
        )


def _strips(pairs: torch.Tensor) -> torch.Tensor:
    k2, n, _ = pairs.shape
    return pairs.reshape(k2, n // COLUMN_BLOCK, COLUMN_BLOCK, 2).transpose(0, 1).contiguous()


def pack_conv(weight: torch.Tensor) -> torch.Tensor:
    """`conv1x1`'s bf16 operand (C_out/64, C_in/2, 64, 2) from a (C_out, C_in, 1, 1) weight:
    `pack_forward`'s pairs, each 64-column strip stored whole, so that it streams in one run."""
    return _strips(pack_forward(weight))


def pack_conv_input_grad(weight: torch.Tensor) -> torch.Tensor:
    """`conv1x1`'s operand (C_in/64, C_out/2, 64, 2) for the input gradient of a stride-1 1×1
    convolution with this (C_out, C_in, 1, 1) weight: conv1x1(grad, it, 0) is that gradient."""
    return _strips(pack_input_grad(weight))


def checked_outputs(
    packed_name: str, packed: torch.Tensor, bias_name: str, bias: torch.Tensor | None, k: int
) -> int:
    """The output channels of a `pack_conv` weight for inputs of `k` channels with its float32
    bias, after checking both (a ValueError naming `packed_name` or `bias_name`)."""
    if (
        packed.dtype != torch.bfloat16
        or packed.dim() != 4
        or packed.shape[1:] != (k // 2, COLUMN_BLOCK, 2)
        or k % 2
        or not packed.is_contiguous()
    ):
        raise ValueError(
            f"{packed_name}: expected a pack_conv weight (C/{COLUMN_BLOCK}, {k // 2}, "
            f"{COLUMN_BLOCK}, 2) for x with {k} channels, got {packed.dtype} {tuple(packed.shape)}"
        )
    c = packed.shape[0] * COLUMN_BLOCK
    if bias is None:
        raise ValueError(f"{bias_name}: expected {c} float32 values, got None")
    operators.check_bias(bias, c)
    return c


def conv1x1(
    x: torch.Tensor,
    packed: torch.Tensor,
    bias: torch.Tensor,
    relu: bool = False,
    residual: torch.Tensor | None = None,
    in_place: bool = False,
    stride: int = 1,
) -> torch.Tensor:
    """``relu?(conv2d(x, w, bias, stride) + residual)`` in bf16 (float32 sums, one rounding) for
    a 1×1 weight `w` with `packed` = pack_conv(w) and a float32 `bias`; written over `residual`
    (channels_last, then returned) if `in_place`. For inference: no gradient."""
    operators.check_no_grad("pointwise_conv_bf16", x, residual)
    _check_activation("x", x)
    if isinstance(stride, bool) or not isinstance(stride, int) or stride < 1:
        raise ValueError(f"stride: expected a positive integer, got {stride!r}")
    n, k, h, w = x.shape
    c = checked_outputs("packed", packed, "bias", bias, k)
    shape = (n, c, (h - 1) // stride + 1, (w - 1) // stride + 1)
    if residual is not None:
        _check_bf16_4d("residual", residual, shape)
    if in_place:
        if residual is None or not residual.is_contiguous(memory_format=torch.channels_last):
            raise ValueError("residual: writing in place needs a channels_last residual")
        if operators.overlap(x, residual):
            raise ValueError("residual: must not share memory with x when written in place")
        y = residual
    else:
        if residual is not None:
            residual = residual.contiguous(memory_format=torch.channels_last)
        y = torch.empty(shape, dtype=torch.bfloat16, memory_format=torch.channels_last)
    x = x.contiguous(memory_format=torch.channels_last)
    if y.numel():
        rc = _library().pointwise_conv_bf16(
            x.data_ptr(), packed.data_ptr(), bias.contiguous().data_ptr(),
            None if residual is None else residual.data_ptr(), y.data_ptr(),
            n, h, w, k, c, stride, int(relu), torch.get_num_threads(),
        )  # fmt: skip
        if rc == 2:
            raise MemoryError("pointwise_conv_bf16: could not allocate a strided input's row table")
        if rc != 0:
            raise ValueError(
                f"pointwise_conv_bf16 refused x {tuple(x.shape)} → {c} channels, stride {stride}"
            )
    return y


def _conv(
    x: torch.Tensor,
    packed: torch.Tensor,
    bias: torch.Tensor,
    stride: int,
    relu: bool,
    residual: torch.Tensor | None,
    in_place: bool = False,
) -> torch.Tensor:
    return conv1x1(x, packed, bias, relu, residual, in_place, stride)


def _output_shape(
    x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor, stride: int, relu: bool
) -> tuple[int, ...]:
    return operators.pointwise_output_shape(tuple(x.shape), packed.shape[0] * COLUMN_BLOCK, stride)


operators.define_over_residual(
    "pointwise_conv_bf16",
    "Tensor x, Tensor packed, Tensor bias, int stride, bool relu",
    _conv,
    _output_shape,
)


def pack_conv_shortcut(last: torch.Tensor, shortcut: torch.Tensor) -> torch.Tensor:
    """`conv1x1_shortcut`'s operand from a block's last 1×1 weight (C_out, C1, 1, 1) and its
    projection's (C_out, C2, 1, 1): both `pack_conv`ed, each strip's pairs of the last 1×1
    followed by the projection's, (C_out/64, (C1 + C2)/2, 64, 2)."""
    if last.shape[0] != shortcut.shape[0]:
        raise ValueError(
            f"shortcut: expected {last.shape[0]} outputs as the last 1×1 has, got "
            f"{tuple(shortcut.shape)}"
        )
    return torch.cat([pack_conv(last), pack_conv(shortcut)], dim=1).contiguous()


def conv1x1_shortcut(
    g: torch.Tensor,
    x: torch.Tensor,
    packed: torch.Tensor,
    bias: torch.Tensor,
    stride: int = 1,
    relu: bool = True,
) -> torch.Tensor:
    """``relu?(conv2d(g, w1) + conv2d(x, w2, stride=stride) + bias)`` in bf16 (float32 sums, one
    rounding): a block's last 1×1 `w1` and its projection shortcut `w2` as one product, with
    `packed` = pack_conv_shortcut(w1, w2) and `bias` (float32) the sum of their biases. The
    projection's output never goes to memory. For inference: no gradient."""
    operators.check_no_grad("pointwise_conv_bf16_shortcut", g, x)
    _check_activation("g", g)
    _check_activation("x", x)
    if isinstance(stride, bool) or not isinstance(stride, int) or stride < 1:
        raise ValueError(f"stride: expected a positive integer, got {stride!r}")
    n, k1, h, w = g.shape
    k2 = x.shape[1]
    out_h, out_w = (x.shape[2] - 1) // stride + 1, (x.shape[3] - 1) // stride + 1
    if x.shape[0] != n or (out_h, out_w) != (h, w):
        raise ValueError(
            f"x: expected {n} images whose {stride}-strided pixels are g's {h}x{w}, got "
            f"{tuple(x.shape)}"
        )
    if (
        packed.dtype != torch.bfloat16
        or packed.dim() != 4
        or packed.shape[1:] != ((k1 + k2) // 2, COLUMN_BLOCK, 2)
        or k1 % 2
        or k2 % 2
        or not packed.is_contiguous()
    ):
        raise ValueError(
            f"packed: expected a pack_conv_shortcut weight (C/{COLUMN_BLOCK}, {(k1 + k2) // 2}, "
            f"{COLUMN_BLOCK}, 2) for g with {k1} and x with {k2} channels, got {packed.dtype} "
            f"{tuple(packed.shape)}"
        )
    c = packed.shape[0] * COLUMN_BLOCK
    operators.check_bias(bias, c)
    g = g.contiguous(memory_format=torch.channels_last)
    x = x.contiguous(memory_format=torch.channels_last)
    y = torch.empty(n, c, h, w, dtype=torch.bfloat16, memory_format=torch.channels_last)
    if y.numel():
        rc = _library().pointwise_conv_bf16_shortcut(
            g.data_ptr(), x.data_ptr(), packed.data_ptr(), bias.contiguous().data_ptr(),
            y.data_ptr(), n, x.shape[2], x.shape[3], k1, k2, c, stride, int(relu),
            torch.get_num_threads(),
        )  # fmt: skip
        if rc == 2:
            raise MemoryError("pointwise_conv_bf16_shortcut: could not allocate its row table")
        if rc != 0:
            raise ValueError(
                f"pointwise_conv_bf16_shortcut refused g {tuple(g.shape)} and x "
                f"{tuple(x.shape)} → {c} channels, stride {stride}"
            )
    return y


def _shortcut_shape(
    g: torch.Tensor,
    x: torch.Tensor,
    packed: torch.Tensor,
    bias: torch.Tensor,
    stride: int,
    relu: bool,
) -> torch.Tensor:
    n, _, h, w = g.shape
    shape = (n, packed.shape[0] * COLUMN_BLOCK, h, w)
    return g.new_empty(shape).contiguous(memory_format=torch.channels_last)


operators.define(
    "pointwise_conv_bf16_shortcut(Tensor g, Tensor x, Tensor packed, Tensor bias, int stride, "
    "bool relu) -> Tensor",
    conv1x1_shortcut,
    _shortcut_shape,
)
