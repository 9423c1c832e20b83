"""The ImageNet stem (conv, bias, ReLU, 3×3/2 max pooling) in one bf16 kernel on AVX512-BF16 pair
dot products (`kernels/stem_dot.c`), for CPUs without AMX.

The same pass as `resnext.speed.stem` (bands of pooled rows, a ring of convolution rows, only
the pooled output written; the code they share is `kernels/stem_common.h`), its product the
bf16 1×1 kernel's register tile run over the kernel's rows. bf16 only: float32 sums of bf16
products, one rounding of each pooled value. Exposed as ``torch.ops.resnext.stem_dot``.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch

from resnext import native
from resnext.speed import operators, pointwise_gemm, stem
from resnext.speed.conv_x3 import check_rc
from resnext.speed.stem import check_input, checked_io, output_shape

SOURCE = Path(__file__).with_name("kernels") / "stem_dot.c"
COLUMN_BLOCK = pointwise_gemm.COLUMN_BLOCK  # outputs per strip of the register tile


@functools.lru_cache(maxsize=1)
def _library() -> ctypes.CDLL:
    lib = native.load(SOURCE, pointwise_gemm.FLAGS, cpu_needs=pointwise_gemm.REQUIRED_FLAGS)
    lib.stem_dot.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int] * 11
    lib.stem_dot.restype = ctypes.c_int
    return lib


@functools.lru_cache(maxsize=1)
def unavailable_reason() -> str | None:
    """None if the kernel can run here, else why not (one line; decided once per process)."""
    return native.problem(_library)


def supports(in_channels: int, out_channels: int, kernel: int, stride: int, padding: int) -> bool:
    """Whether the kernel takes this square convolution (groups 1, zero padding) as a stem."""
    return stem.supports(in_channels, out_channels, kernel, stride, padding, COLUMN_BLOCK)


def row_pairs(in_channels: int, kernel: int) -> int:
    """Pairs of values per kernel row: its kernel·in_channels values, rounded up to even."""
    return -(-kernel * in_channels // 2)


def pack(weight: torch.Tensor) -> torch.Tensor:
    """A (C, Cin, k, k) weight as the kernel reads it: bf16 [C/64][k][pairs][64][2] (64-output
    strip, kernel row, pair, output, pair member); kernel row i's values are its columns, then
    channels, with a zero after them where k·Cin is odd."""
    if weight.dim() != 4 or weight.shape[2] != weight.shape[3] or weight.shape[0] % COLUMN_BLOCK:
        raise ValueError(
            f"weight: expected a (C, Cin, k, k) weight with C a multiple of {COLUMN_BLOCK}, got "
            f"shape {tuple(weight.shape)}"
        )
    out_ch, in_ch, k, _ = weight.shape
    pairs = row_pairs(in_ch, k)
    rows = weight.detach().float().permute(0, 2, 3, 1).reshape(out_ch, k, k * in_ch)
    rows = torch.nn.functional.pad(rows, (0, 2 * pairs - k * in_ch))
    strips = rows.reshape(out_ch // COLUMN_BLOCK, COLUMN_BLOCK, k, pairs, 2)
    return strips.permute(0, 2, 3, 1, 4).contiguous().to(torch.bfloat16)


def _check_packed(packed: torch.Tensor, in_ch: int, kernel: int) -> int:
    """The output channels of `packed`, a ValueError naming it unless it is `pack`'s output for
    `in_ch` input channels and this kernel size."""
    want = (kernel, row_pairs(in_ch, kernel), COLUMN_BLOCK, 2)
    if (
        packed.dtype != torch.bfloat16
        or packed.dim() != 5
        or packed.shape[1:] != want
        or not packed.is_contiguous()
    ):
        raise ValueError(
            f"packed: expected a contiguous bf16 stem_dot.pack weight for {in_ch} input channels "
            f"and a {kernel}×{kernel} kernel (C/{COLUMN_BLOCK}, {', '.join(map(str, want))}), got "
            f"{packed.dtype} {tuple(packed.shape)}"
        )
    return packed.shape[0] * COLUMN_BLOCK


def run(
    x: torch.Tensor,
    packed: torch.Tensor,
    bias: torch.Tensor,
    kernel: int,
    stride: int,
    padding: int,
) -> torch.Tensor:
    """``max_pool2d(relu(conv2d(x, w, bias, stride, padding)), 3, 2, 1)`` in bf16 with `packed` =
    pack(w), channels_last. x may be bf16 or float32, NCHW or channels_last: the kernel rounds
    each input value to bf16 once as it reads it, as a cast would."""
    check_input("stem_dot", x)
    c = _check_packed(packed, x.shape[1], kernel)
    x, nchw, y = checked_io(
        x, c, kernel, stride, padding, bias, torch.bfloat16, supports, COLUMN_BLOCK
    )
    n, cin, h, w = x.shape
    if y.numel():
        rc = _library().stem_dot(
            x.data_ptr(), packed.data_ptr(), bias.contiguous().data_ptr(), y.data_ptr(),
            int(x.dtype == torch.bfloat16), int(nchw), n, h, w, cin, c, kernel, stride, padding,
            torch.get_num_threads(),
        )  # fmt: skip
        check_rc(rc, "stem_dot", f"{tuple(x.shape)} → {c}, {kernel}×{kernel}, stride {stride}")
    return y


def _fake(
    x: torch.Tensor,
    packed: torch.Tensor,
    bias: torch.Tensor,
    kernel: int,
    stride: int,
    padding: int,
) -> torch.Tensor:
    shape = output_shape(tuple(x.shape), packed.shape[0] * COLUMN_BLOCK, kernel, stride, padding)
    return torch.empty(
        shape, dtype=torch.bfloat16, device=x.device, memory_format=torch.channels_last
    )


operators.define(
    "stem_dot(Tensor x, Tensor packed, Tensor bias, int kernel, int stride, int padding) -> Tensor",
    run,
    _fake,
)
