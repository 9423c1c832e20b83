"""Small float32 networks of 1×1 bottlenecks for the tests of the passes that swap kernels in."""

from __future__ import annotations

import torch
from torch import nn


class Bottleneck(nn.Module):
    """1×1 → ReLU → 1×1 → identity → + shortcut → ReLU, the shortcut a projection or x."""

    def __init__(self, cin: int, width: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, width, 1)
        self.conv3 = nn.Conv2d(width, cout, 1, stride=stride)
        self.bn3 = nn.Identity()
        self.relu = nn.ReLU()
        project = stride != 1 or cin != cout
        self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride)) if project else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.relu(self.bn3(self.conv3(self.relu(self.conv1(x)))) + shortcut)


class Net(nn.Module):
    """A 3×3 stem, then three bottlenecks: identity shortcuts and projections, one of stride 2."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 64, 3, padding=1)
        self.blocks = nn.Sequential(
            Bottleneck(64, 32, 128, 1), Bottleneck(128, 32, 128, 1), Bottleneck(128, 64, 256, 2)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.stem(x))
