"""The input gradient of a stride-2 grouped 3×3 convolution on the vector kernels, in four phases.

The input gradient's pixels of one row and column parity (a phase) are a stride-1 convolution of
the output gradient with 1, 2 or 4 of the weight's taps, each group's matrix transposed. The
forward row kernels of `kernels/grouped3x3.c` (and its AVX2 build) run each phase with a map from
kernel positions to the weight's taps, skipping the positions with none, and store its pixels
two apart into the gradient (`kernels/dgrad_phases.h`): 9 taps' products in all, as the forward
has. Widening (float32 or bf16) or, for bf16, the pair dot-product kernels. Without AMX oneDNN was
the only stride-2 input gradient; `resnext.speed.grouped_train` offers this one beside it.
"""

from __future__ import annotations

import functools

import torch

from resnext.speed import grouped_kernel

# For each parity of an input row (or column), the taps of the stride-1 convolution of the output
# gradient that computes it: (its kernel row, the original kernel row). Input row 2a takes output
# row a through kernel row 1; input row 2a + 1 takes output row a + 1 through row 0 and row a
# through row 2 (with padding 1: input row i = 2·oh − 1 + kh).
PHASE_TAPS = {0: ((1, 1),), 1: ((2, 0), (1, 2))}


def group_transposed(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """The (C, C/groups, 3, 3) weight with each group's (out, in) matrix transposed: the output
    gradient's channels become the inputs."""
    c, cpg = weight.shape[:2]
    return weight.reshape(groups, cpg, cpg, 3, 3).transpose(1, 2).reshape(c, cpg, 3, 3)


def check_stride2_grad(grad: torch.Tensor, input_size: tuple[int, int]) -> None:
    """A ValueError unless the 4-d `grad` has the size of a stride-2, padding-1 3×3
    convolution's output for an input of `input_size` (H, W)."""
    ho, wo = grad.shape[2:]
    h, w = input_size
    if (ho, wo) != ((h - 1) // 2 + 1, (w - 1) // 2 + 1):
        raise ValueError(
            f"grad: a {ho}×{wo} gradient is not the stride-2 output of a {h}×{w} input"
        )


@functools.cache
def tap_maps() -> torch.Tensor:
    """(4, 9) int8: for phase 2·ph + pw, the weight's tap (3·kh + kw) at each kernel position of
    its stride-1 convolution, −1 where it has none."""
    maps = torch.full((4, 9), -1, dtype=torch.int8)
    for ph in (0, 1):
        for pw in (0, 1):
            for new_h, kh in PHASE_TAPS[ph]:
                for new_w, kw in PHASE_TAPS[pw]:
                    maps[2 * ph + pw, 3 * new_h + new_w] = 3 * kh + kw
    return maps


def input_grad(
    grad: torch.Tensor,
    weight: torch.Tensor,
    groups: int,
    input_size: tuple[int, int],
    pairs: bool = False,
) -> torch.Tensor:
    """The input gradient (channels-last, grad's dtype) of ``conv2d(x, weight, stride=2,
    padding=1, groups=groups)`` for an input of `input_size` (H, W), given the output gradient
    `grad`; `pairs` runs the bf16 pair dot-product kernels (`grouped_kernel.takes_pairs`)."""
    grouped_kernel.check_activation(grad, "grad")
    n, c = grad.shape[:2]
    h, w = input_size
    if weight.shape != (c, c // max(groups, 1), 3, 3) or groups < 1 or c % groups:
        raise ValueError(
            f"weight: expected shape (C, C/groups, 3, 3) = ({c}, {c // max(groups, 1)}, 3, 3) "
            f"for {c} channels in {groups} groups, got {tuple(weight.shape)}"
        )
    check_stride2_grad(grad, input_size)
    if not grouped_kernel.supports(c, groups, 2):
        raise ValueError(
            f"grad: {c} channels in {groups} groups is not a shape the {grouped_kernel.ISA.name} "
            f"build takes (C % {grouped_kernel.ISA.lanes} == 0, C/groups in "
            f"{grouped_kernel.SUPPORTED_CPG})"
        )
    transposed = group_transposed(weight.detach(), groups)
    packed = grouped_kernel.pack_weights(transposed, groups, pairs=pairs)
    packing = grouped_kernel.packing_of(c, groups, 2, packed, None, grad.dtype)
    grad = grad.contiguous(memory_format=torch.channels_last)
    dx = torch.empty(n, c, h, w, dtype=grad.dtype, memory_format=torch.channels_last)
    if dx.numel():
        rc = grouped_kernel.library().grouped3x3_dgrad_s2(
            grad.data_ptr(), packed.data_ptr(), tap_maps().data_ptr(), dx.data_ptr(),
            int(grad.dtype == torch.bfloat16), packing, n, h, w, c, c // groups,
            torch.get_num_threads(),
        )  # fmt: skip
        if rc != 0:
            raise ValueError(
                f"grouped3x3_dgrad_s2 refused grad {tuple(grad.shape)} {grad.dtype}, "
                f"groups={groups}, packing {packing}"
            )
    return dx
