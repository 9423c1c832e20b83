"""Our AMX grouped 3×3 convolution for 4 or 8 channels per group (`kernels/grouped3x3_quads_amx.c`).

A tile row is a "quad" of 16 / cpg adjacent output pixels of one group (4 pixels at 4 channels per
group, 2 at 8) and its 16 columns are those pixels times the group's outputs, so each kernel row
is one 32-deep tile product against a Toeplitz weight: half the tile products of `grouped_amx`'s
block-diagonal form (see the C source). Stride 1, bf16 only; ResNeXt-50's first two stages (4 and
8 channels in 32 groups) are the shapes it is for.
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
from resnext.speed.grouped_amx import call_grouped, check_packed, load_amx
from resnext.speed.grouped_kernel import check_bias, fake_grouped

SOURCE = Path(__file__).with_name("kernels") / "grouped3x3_quads_amx.c"
CPG = (4, 8)  # channels per group the kernel takes


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
    """Whether the kernel takes this convolution (shape only): 4 or 8 channels per group, whole
    sets of 4 groups, stride 1."""
    if groups <= 0 or channels % groups:
        return False
    cpg = channels // groups
    return cpg in CPG and channels % (4 * cpg) == 0 and stride == 1


def pack_weights(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """A (C, cpg, 3, 3) grouped weight as the kernel reads it: bf16 [C / (4 cpg)][4][3][16][16][2]
    (set of 4 groups, group in the set, kernel row, K pair, column, pair member). With P = 16 / cpg
    output pixels a quad, K index cpg·j + c is input pixel j (0 to 32 / cpg − 1) of a quad's row,
    channel c; column cpg·d + o is output pixel d (0 to P − 1), output o; the value is
    w[o][c][kh][j − d] where 0 ≤ j − d ≤ 2, else 0."""
    channels = weight.shape[0]
    cpg = weight.shape[1] if weight.dim() == 4 else 0
    shape_ok = weight.dim() == 4 and weight.shape[2:] == (3, 3) and cpg * groups == channels
    if not shape_ok or not supports(channels, groups, 1):
        raise ValueError(
            f"weight: expected a (C, C/groups, 3, 3) weight of {groups} groups of 4 or 8 channels "
            f"(whole sets of 4 groups), got shape {tuple(weight.shape)}"
        )
    sets, pixels, reach = channels // (4 * cpg), 16 // cpg, 32 // cpg
    w = weight.detach().float().reshape(sets, 4, cpg, cpg, 3, 3)  # set, g, o, c, kh, kw
    toeplitz = torch.zeros(sets, 4, 3, reach, cpg, pixels, cpg)  # set, g, kh, j, c, d, o
    for d in range(pixels):
        for kw in range(3):
            toeplitz[:, :, :, d + kw, :, d, :] = w[..., kw].permute(0, 1, 4, 3, 2)
    k_by_n = toeplitz.reshape(sets, 4, 3, 16, 2, 16)  # ..., K pair, member, column
    return k_by_n.permute(0, 1, 2, 3, 5, 4).contiguous().to(torch.bfloat16)


def packed_numel(channels: int, cpg: int) -> int:
    """How many bf16 values pack_weights makes for this many channels and channels per group."""
    return channels // (4 * cpg) * 4 * 3 * 512


def check_grouped(name: str, c: int, groups: int, stride: int, packed: torch.Tensor) -> None:
    """ValueErrors unless the quads form takes `c` channels in `groups` at `stride` (blamed on the
    argument `name` that gave c) and `packed` is pack_weights' output for them."""
    if not supports(c, groups, stride):
        raise ValueError(
            f"{name}: {c} channels in {groups} groups with stride {stride} is not a shape the "
            f"quads form takes (4 or 8 channels per group, whole sets of 4 groups, stride 1)"
        )
    check_packed(packed, packed_numel(c, c // groups))


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
    check_grouped("x", c, groups, stride, packed)
    check_bias(bias, c)
    return call_grouped(_library().grouped3x3_quads_amx, x, packed, bias, groups, stride, relu)


operators.define(
    "grouped_conv3x3_quads(Tensor x, Tensor packed, Tensor? bias, int groups, int stride, "
    "bool relu) -> Tensor",
    run_kernel,
    fake_grouped,
)
