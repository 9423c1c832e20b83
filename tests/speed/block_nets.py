"""Small float32 networks of 1×1 bottlenecks for the tests of the passes that swap kernels in,
and what those passes fuse after each of their 1×1s."""

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
    """A 3×3 stem, then three bottlenecks: identity shortcuts and projections, one of stride 2.

    `width` is the first two bottlenecks' (the third's is 64): 64 gives every 1×1 channels in
    64s, as the bf16 kernel needs."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 64, 3, padding=1)
        self.blocks = nn.Sequential(
            Bottleneck(64, width, 128, 1),
            Bottleneck(128, width, 128, 1),
            Bottleneck(128, 64, 256, 2),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.stem(x))


# What a dense-kernel pass fuses after each 1×1 of `Net`'s blocks (and of any net with those
# blocks), from the graph: the suffix the pass adds to its variant's name.
EPILOGUES = {
    "blocks.0.downsample.0": "",  # its add is the later 1×1's
    "blocks.0.conv1": "+relu",
    "blocks.0.conv3": "+add+relu, in place",  # over the projection's output
    "blocks.1.conv1": "+relu",
    "blocks.1.conv3": "+add+relu, in place",  # over x: read by conv1 before, then dead
    "blocks.2.downsample.0": "",  # stride 2, as conv3
    "blocks.2.conv1": "+relu",
    "blocks.2.conv3": "+add+relu, in place",
}


def pointwise_choices(variant: str) -> dict[str, str]:
    """{layer: variant name} a pass of `variant` makes when it takes every 1×1 of those blocks."""
    return {name: variant + suffix for name, suffix in EPILOGUES.items()}
