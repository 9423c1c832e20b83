"""Small building layers shared by the blocks and stems: convolutions, squeeze-and-excitation, shortcuts."""

from __future__ import annotations

import torch
from torch import nn


def conv1x1(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    """1×1 convolution without bias (a BN always follows)."""
    return nn.Conv2d(in_ch, out_ch, kernel_size=1, stride=stride, bias=False)


def conv3x3(in_ch: int, out_ch: int, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    """3×3 convolution, padding 1, without bias; `groups` > 1 is the aggregated transformation."""
    return nn.Conv2d(
        in_ch, out_ch, kernel_size=3, stride=stride, padding=1, groups=groups, bias=False
    )


def norm_act(
    bn: nn.Module, act: nn.Module, x: torch.Tensor, residual: torch.Tensor | None = None
) -> torch.Tensor:
    """act(bn(x) [+ residual]); one fused call when `bn` computes that itself.

    A norm layer that has a `forward_act(x, residual)` method (the training fast path's
    `FusedBatchNorm2d`) is given the ReLU and the residual to apply in the same pass.
    """
    fused = getattr(bn, "forward_act", None)
    if fused is not None and isinstance(act, nn.ReLU):
        return fused(x, residual)
    out = bn(x)
    if residual is not None:
        out = out + residual
    return act(out)


def drop_path(x: torch.Tensor, rate: float) -> torch.Tensor:
    """Stochastic depth (Huang et al. 2016) on a residual branch: each image's `x` is zeroed with
    probability `rate`, or kept and scaled by 1/(1 - rate) so that its expectation is unchanged."""
    keep = 1.0 - rate
    shape = (x.shape[0],) + (1,) * (x.dim() - 1)
    mask = torch.empty(shape, dtype=x.dtype, device=x.device).bernoulli_(keep)
    return x * mask.div_(keep)


class SqueezeExcite(nn.Module):
    """Squeeze-and-excitation gate (Hu et al.): channel weights from globally pooled features."""

    def __init__(self, channels: int, reduction: int) -> None:
        super().__init__()
        hidden = max(1, channels // reduction)
        self.fc1 = nn.Conv2d(channels, hidden, kernel_size=1, bias=True)
        self.fc2 = nn.Conv2d(hidden, channels, kernel_size=1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.mean((2, 3), keepdim=True)
        s = self.fc2(torch.relu(self.fc1(s)))
        return x * torch.sigmoid(s)


def make_shortcut(in_ch: int, out_ch: int, stride: int, avg_down: bool) -> nn.Sequential | None:
    """Projection shortcut (type B) where the shape changes, else None for identity.

    With `avg_down` the stride is taken by a 2×2 average pool before a stride-1 projection (the
    'd' variants of Bag of Tricks); keys then follow timm: pool `0`, conv `1`, BN `2`.
    """
    if stride == 1 and in_ch == out_ch:
        return None
    if avg_down:
        pool: nn.Module = (
            nn.AvgPool2d(stride, stride, ceil_mode=True, count_include_pad=False)
            if stride > 1
            else nn.Identity()
        )
        return nn.Sequential(pool, conv1x1(in_ch, out_ch), nn.BatchNorm2d(out_ch))
    return nn.Sequential(conv1x1(in_ch, out_ch, stride), nn.BatchNorm2d(out_ch))
