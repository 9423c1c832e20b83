"""Test helpers: tiny models whose logits are known in closed form, and a hand-written preprocessing."""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image
from torch import nn

MEAN = np.array([0.5, 0.4, 0.3], dtype=np.float64)
STD = np.array([0.2, 0.25, 0.3], dtype=np.float64)


class ColourNet(nn.Module):
    """Logits = fc(mean colour): fully convolutional (its feature map is the image itself)."""

    def __init__(self, num_classes: int = 8, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.fc = nn.Linear(3, num_classes)
        with torch.no_grad():
            self.fc.weight.copy_(torch.randn(num_classes, 3, generator=g) * 3)
            self.fc.bias.copy_(torch.randn(num_classes, generator=g))
        self.num_classes = num_classes

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.mean(dim=(2, 3)))


class LeftHalfNet(ColourNet):
    """Logits = fc(mean colour of the left half): sensitive to crop position and mirroring."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x[..., : x.shape[-1] // 2].mean(dim=(2, 3)))


def random_images(n: int, seed: int = 0) -> list[Image.Image]:
    """Images of assorted sizes and aspect ratios with smooth random colour gradients."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        w, h = int(rng.integers(26, 60)), int(rng.integers(26, 60))
        base = rng.uniform(0, 255, size=(1, 1, 3))
        gx = rng.uniform(-3, 3, size=(1, w, 3)) * np.arange(w)[None, :, None] / 1.0
        gy = rng.uniform(-3, 3, size=(h, 1, 3)) * np.arange(h)[:, None, None] / 1.0
        noise = rng.uniform(-20, 20, size=(h, w, 3))
        arr = np.clip(base + gx + gy + noise, 0, 255).astype(np.uint8)
        out.append(Image.fromarray(arr))
    return out


def hand_resize(img: Image.Image, short: int) -> Image.Image:
    """Shorter side to `short`, the other side floor-scaled, PIL bilinear."""
    w, h = img.size
    size = (short, math.floor(short * h / w)) if w <= h else (math.floor(short * w / h), short)
    return img if size == (w, h) else img.resize(size, Image.Resampling.BILINEAR)


def hand_array(img: Image.Image) -> np.ndarray:
    """HWC float64, scaled to [0, 1] and normalised with MEAN/STD."""
    return (np.asarray(img, dtype=np.float64) / 255.0 - MEAN) / STD


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max())
    return e / e.sum()


def fc_numpy(model: ColourNet, colour: np.ndarray) -> np.ndarray:
    w = model.fc.weight.detach().double().numpy()
    b = model.fc.bias.detach().double().numpy()
    return w @ colour + b


def topk_counts(probs: list[np.ndarray], labels: list[int], k: int = 5) -> tuple[int, int]:
    """(top-1 hits, top-k hits) by sorting each probability vector."""
    top1 = sum(int(np.argmax(p) == y) for p, y in zip(probs, labels, strict=True))
    topk = sum(int(y in np.argsort(-p)[:k]) for p, y in zip(probs, labels, strict=True))
    return top1, topk
