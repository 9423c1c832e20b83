"""Alternative implementations of the grouped 3×3 convolution, to measure the 'grouped-conv tax'.

Each function computes exactly ``F.conv2d(x, w, stride=s, padding=1, groups=g)``; they differ in
how the work is laid out for the CPU: one oneDNN grouped kernel, one batched matmul over groups
after im2col, dense convolutions over block-diagonal weights packing k groups per GEMM, or sums of
depthwise convolutions over channel-rotated inputs (eagerly, or as shifted multiply-adds that a
compiler can fuse into one loop nest).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def grouped_native(x: torch.Tensor, w: torch.Tensor, stride: int, groups: int) -> torch.Tensor:
    """The reference: torch's grouped convolution (oneDNN on CPU)."""
    return F.conv2d(x, w, stride=stride, padding=1, groups=groups)


def grouped_bmm(x: torch.Tensor, w: torch.Tensor, stride: int, groups: int) -> torch.Tensor:
    """im2col (unfold) then one batched matmul with the groups as the batch dimension."""
    n, _, h, wd = x.shape
    out_ch, cg, k, _ = w.shape
    cols = F.unfold(x, k, padding=1, stride=stride)  # (n, c*k*k, L), channel-major
    length = cols.shape[-1]
    cols = cols.view(n, groups, cg * k * k, length)
    weight = w.view(groups, out_ch // groups, cg * k * k)
    out = torch.matmul(weight.unsqueeze(0), cols)  # (n, g, out/g, L)
    ho = (h + 2 - k) // stride + 1
    wo = (wd + 2 - k) // stride + 1
    return out.reshape(n, out_ch, ho, wo)


def block_diagonal_weight(w: torch.Tensor, groups: int, pack: int) -> torch.Tensor:
    """Weights of a conv with groups/pack groups equal to `w` with `groups` groups (zeros elsewhere)."""
    out_ch, cg, k, k2 = w.shape
    og = out_ch // groups
    packed = w.new_zeros(out_ch, cg * pack, k, k2)
    for g in range(groups):
        slot = g % pack
        packed[g * og : (g + 1) * og, slot * cg : (slot + 1) * cg] = w[g * og : (g + 1) * og]
    return packed


def grouped_packed(
    x: torch.Tensor, packed_w: torch.Tensor, stride: int, groups: int, pack: int
) -> torch.Tensor:
    """A conv with groups/pack groups on block-diagonal weights: pack× the FLOPs, bigger GEMMs."""
    return F.conv2d(x, packed_w, stride=stride, padding=1, groups=groups // pack)


def conv_flops(x_shape: tuple[int, ...], w: torch.Tensor, stride: int) -> int:
    """Multiply-adds ×2 of the true grouped convolution (zeros in packed weights not counted)."""
    n, _, h, wd = x_shape
    out_ch, cg, k, k2 = w.shape
    ho, wo = (h + 2 - k) // stride + 1, (wd + 2 - k) // stride + 1
    return 2 * n * out_ch * cg * k * k2 * ho * wo


def rotations(w: torch.Tensor, groups: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Channel orders and depthwise weights of the diagonal decomposition of a grouped conv.

    With k channels per group, output channel g·k + o is the sum over d < k of a depthwise filter
    applied to input channel g·k + (o + d) mod k. Returns the k input orders and the (k, C, 3, 3)
    depthwise weights, one per diagonal d.
    """
    out_ch, k = w.shape[0], w.shape[1]
    if out_ch != k * groups:
        raise ValueError(
            f"w: expected {k * groups} output channels for {groups} groups, got {out_ch}"
        )
    idx = torch.arange(out_ch)
    base, o = idx - idx % k, idx % k
    orders = [base + (o + d) % k for d in range(k)]
    weights = torch.stack([w[idx, (o + d) % k] for d in range(k)])
    return orders, weights


def grouped_depthwise_sum(
    x: torch.Tensor, orders: list[torch.Tensor], weights: torch.Tensor, stride: int
) -> torch.Tensor:
    """The grouped conv as k depthwise convolutions of channel-rotated copies of `x`, summed."""
    c = x.shape[1]
    out = F.conv2d(x, weights[0].unsqueeze(1), stride=stride, padding=1, groups=c)
    for d in range(1, len(orders)):
        out = out + F.conv2d(
            x[:, orders[d]], weights[d].unsqueeze(1), stride=stride, padding=1, groups=c
        )
    return out


def grouped_shifted_sum(
    x: torch.Tensor, orders: list[torch.Tensor], weights: torch.Tensor, stride: int
) -> torch.Tensor:
    """The same sum as 9·k shifted, rotated multiply-adds: no convolution calls, for torch.compile."""
    c, h, w = x.shape[1:]
    ho, wo = (h - 1) // stride + 1, (w - 1) // stride + 1
    padded = F.pad(x, (1, 1, 1, 1))
    out = None
    for d, order in enumerate(orders):
        rotated = padded[:, order]
        for dy in range(3):
            for dx in range(3):
                window = rotated[
                    :, :, dy : dy + stride * ho : stride, dx : dx + stride * wo : stride
                ]
                term = window * weights[d, :, dy, dx].view(1, c, 1, 1)
                out = term if out is None else out + term
    return out
