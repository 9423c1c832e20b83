"""Our AMX grouped 3×3 convolution for 4 channels per group (`kernels/grouped3x3_quads_amx.c`).

A tile row is a "quad" of 4 adjacent output pixels of one group and its 16 columns are those
pixels times the group's 4 outputs, so each kernel row is one 32-deep tile product against a
Toeplitz weight: half the tile products of `grouped_amx`'s block-diagonal form (see the C source).
Stride 1, bf16 only; ResNeXt-50's first stage (128 channels in 32 groups) is the shape it is for.
Exposed as the operator ``torch.ops.resnext.grouped_conv3x3_quads`` and offered to the grouped
swap's timing as the variant 'quads'. Runs only on CPUs with AMX-BF16 whose OS grants the tile
state; `unavailable_reason` says why not elsewhere.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch

from resnext import native
from resnext.speed import operators
from resnext.speed.grouped_amx import call_grouped, load_amx
from resnext.speed.grouped_kernel import check_bias, fake_grouped

SOURCE = Path(__file__).with_name("kernels") / "grouped3x3_quads_amx.c"
CPG = 4  # channels per group the kernel takes
TAPS_ROW = 8  # input pixels a quad's kernel row reads (6 used): one 32-deep K step of 4 channels


@functools.lru_cache(maxsize=1)
def _library() -> ctypes.CDLL:
    lib = load_amx(SOURCE, "grouped3x3_quads_amx_allowed")
    lib.grouped3x3_quads_amx.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int] * 8
    lib.grouped3x3_quads_amx.restype = ctypes.c_int
    return lib


@functools.lru_cache(maxsize=2)
def unavailable_reason(dtype: torch.dtype = torch.bfloat16) -> str | None:
    """None if the kernel runs here for `dtype` activations, else why not (one line)."""
    if dtype != torch.bfloat16:
        return f"the quads kernel computes in bf16 only, not {dtype}"
    return native.problem(_library)


def supports(channels: int, groups: int, stride: int) -> bool:
    """Whether the kernel takes this convolution (shape only)."""
    return groups > 0 and channels == CPG * groups and channels % 16 == 0 and stride == 1


def pack_weights(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """A (C, 4, 3, 3) grouped weight as the kernel reads it: bf16 [C/16][4][3][16][16][2] (16-channel
    block, group in the block, kernel row, K pair, column, pair member). K index 4 j + c is input
    pixel j (0–7) of a quad's row, channel c; column 4 d + o is output pixel d (0–3), output o;
    the value is w[o][c][kh][j − d] where 0 ≤ j − d ≤ 2, else 0."""
    channels = weight.shape[0]
    if weight.dim() != 4 or weight.shape[1:] != (CPG, 3, 3) or not supports(channels, groups, 1):
        raise ValueError(
            f"weight: expected a ({CPG * groups}, {CPG}, 3, 3) weight of {groups} groups of "
            f"{CPG} channels (a multiple of 16 channels), got shape {tuple(weight.shape)}"
        )
    w = weight.detach().float().reshape(channels // 16, 4, CPG, CPG, 3, 3)  # b, g, o, c, kh, kw
    toeplitz = torch.zeros(channels // 16, 4, 3, TAPS_ROW, CPG, 4, CPG)  # b, g, kh, j, c, d, o
    for d in range(4):
        for kw in range(3):
            toeplitz[:, :, :, d + kw, :, d, :] = w[..., kw].permute(0, 1, 4, 3, 2)
    k_by_n = toeplitz.reshape(channels // 16, 4, 3, 16, 2, 16)  # ..., K pair, member, column
    return k_by_n.permute(0, 1, 2, 3, 5, 4).contiguous().to(torch.bfloat16)


def packed_numel(channels: int) -> int:
    """How many bf16 values pack_weights makes for this many channels."""
    return channels // 16 * 4 * 3 * 512


def run_kernel(
    x: torch.Tensor,
    packed: torch.Tensor,
    bias: torch.Tensor | None,
    groups: int,
    stride: int,
    relu: bool = False,
) -> torch.Tensor:
    """``conv2d(x, w, bias, stride, padding=1, groups)`` (then ReLU) in bf16, with
    `packed` = pack_weights(w); float32 accumulation, one rounding to bf16."""
    operators.check_bf16_input("the quads kernel", x)
    c = x.shape[1]
    if not supports(c, groups, stride):
        raise ValueError(
            f"x: {c} channels in {groups} groups with stride {stride} is not a shape the quads "
            f"kernel takes ({CPG} channels per group, a multiple of 16 channels, stride 1)"
        )
    want = packed_numel(c)
    if packed.dtype != torch.bfloat16 or not packed.is_contiguous() or packed.numel() != want:
        raise ValueError(
            f"packed: expected a contiguous bf16 tensor of {want} values from pack_weights, "
            f"got {packed.dtype} with {packed.numel()}"
        )
    check_bias(bias, c)
    return call_grouped(_library().grouped3x3_quads_amx, x, packed, bias, groups, stride, relu)


operators.define(
    "grouped_conv3x3_quads(Tensor x, Tensor packed, Tensor? bias, int groups, int stride, "
    "bool relu) -> Tensor",
    run_kernel,
    fake_grouped,
)
