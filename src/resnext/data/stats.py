"""Per-dataset channel mean/std (RGB, [0, 1] scale) and a function that measures them."""

from __future__ import annotations

import numpy as np

from resnext.errors import ConfigError

Stats = tuple[tuple[float, float, float], tuple[float, float, float]]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The training sets' per-channel statistics to 4 places; fb.resnet.torch (datasets/cifar10.lua,
# cifar100.lua) rounds CIFAR-10's mean to (125.3, 123.0, 113.9)/255 = 0.4914, 0.4824, 0.4467.
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)
# Measured on the digits training split (grey, so equal per channel). The mean is 0.305 at any
# size; the std depends on the bilinear upscaling (0.3185 at 16 px, 0.3233 at 32 px, 0.3757 at
# the native 8 px): 0.320 is within 0.004 of both sizes the recipes use.
DIGITS_MEAN = (0.305, 0.305, 0.305)
DIGITS_STD = (0.320, 0.320, 0.320)

DATASET_STATS: dict[str, Stats] = {
    "imagefolder": (IMAGENET_MEAN, IMAGENET_STD),
    "imagenet": (IMAGENET_MEAN, IMAGENET_STD),
    "cifar10": (CIFAR10_MEAN, CIFAR10_STD),
    "cifar100": (CIFAR100_MEAN, CIFAR100_STD),
    "digits": (DIGITS_MEAN, DIGITS_STD),
}


def dataset_stats(kind: str) -> Stats:
    """(mean, std) for a dataset kind."""
    try:
        return DATASET_STATS[kind]
    except KeyError:
        raise ConfigError(
            f"no channel statistics for dataset kind {kind!r}; known: {sorted(DATASET_STATS)}"
        ) from None


def compute_mean_std(images: np.ndarray) -> Stats:
    """Per-channel mean and population std of uint8 (N, H, W, 3) images, on the [0, 1] scale."""
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ConfigError(f"expected (N, H, W, 3) images, got shape {images.shape}")
    flat = images.reshape(len(images), -1, 3)
    sums = np.zeros(3)
    squares = np.zeros(3)
    for start in range(0, len(flat), 1024):  # chunks keep the float copy small
        chunk = flat[start : start + 1024].reshape(-1, 3).astype(np.float64)
        sums += chunk.sum(axis=0)
        squares += (chunk * chunk).sum(axis=0)
    total = flat.shape[0] * flat.shape[1]
    mean = sums / total
    std = np.sqrt(np.maximum(squares / total - mean**2, 0.0))
    m = (float(mean[0]) / 255, float(mean[1]) / 255, float(mean[2]) / 255)
    s = (float(std[0]) / 255, float(std[1]) / 255, float(std[2]) / 255)
    return m, s
