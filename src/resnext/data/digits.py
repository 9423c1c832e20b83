"""The embedded default dataset: scikit-learn's 1,797 real 8x8 handwritten digits, as RGB images."""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from resnext.data.in_memory import InMemoryImages
from resnext.errors import ConfigError, DataError

DIGITS_CLASSES = tuple(str(d) for d in range(10))
_GREY_LEVELS = 16  # the UCI digits count 4x4 blocks of a 32x32 bitmap: values 0..16


def _digits_csv() -> Path | None:
    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data" / "digits.csv.gz"
    return path if path.is_file() else None


@lru_cache(maxsize=1)
def load_digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """(images (1797, 8, 8) uint8 in 0..16, labels (1797,) int64) from scikit-learn's copy."""
    path = _digits_csv()
    if path is None:
        raise DataError(
            "the digits dataset ships inside scikit-learn, which is not installed: "
            "pip install scikit-learn"
        )
    try:
        with gzip.open(path, "rt") as f:
            table = np.loadtxt(f, delimiter=",", dtype=np.int64)
    except (OSError, ValueError, EOFError) as exc:
        raise DataError(f"{path}: unreadable digits table ({exc})") from None
    if table.ndim != 2 or table.shape[1] != 65 or table[:, :64].max() > _GREY_LEVELS:
        raise DataError(
            f"{path}: expected rows of 64 pixels (0..16) and a label, got {table.shape}"
        )
    return table[:, :64].reshape(-1, 8, 8).astype(np.uint8), table[:, 64]


def _order_key(seed: int, index: int) -> bytes:
    # A hash order is the same on every numpy version and machine, unlike a Generator stream.
    return hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()


def stratified_split(
    labels: np.ndarray, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, test indices): per class, round(test_fraction * n_c) go to test."""
    if not 0.0 < test_fraction < 1.0:
        raise ConfigError(f"test_fraction must be in (0, 1), got {test_fraction}")
    train, test = [], []
    for cls in np.unique(labels):
        members = sorted(np.flatnonzero(labels == cls).tolist(), key=lambda i: _order_key(seed, i))
        n_test = round(test_fraction * len(members))
        test.extend(members[:n_test])
        train.extend(members[n_test:])
    return np.array(sorted(train), dtype=np.int64), np.array(sorted(test), dtype=np.int64)


def upscale_digits(images: np.ndarray, size: int) -> np.ndarray:
    """(N, 8, 8) 0..16 grey levels -> (N, size, size, 3) uint8 RGB, bilinear."""
    out = np.empty((len(images), size, size, 3), dtype=np.uint8)
    scaled = np.rint(images.astype(np.float64) * (255.0 / _GREY_LEVELS)).astype(np.uint8)
    for i, img in enumerate(scaled):
        big = Image.fromarray(img).resize((size, size), Image.Resampling.BILINEAR)
        out[i] = np.asarray(big)[:, :, None]
    return out


class DigitsDataset(InMemoryImages):
    """scikit-learn's handwritten digits as (size x size) RGB images, with a fixed stratified split."""

    def __init__(
        self,
        train: bool,
        transform: Callable[[Image.Image], Any] | None = None,
        size: int = 32,
        seed: int = 0,
        test_fraction: float = 0.2,
    ) -> None:
        if size < 8:
            raise ConfigError(f"digits image size must be at least 8, got {size}")
        images, labels = load_digits_arrays()
        train_idx, test_idx = stratified_split(labels, test_fraction, seed)
        self.indices = train_idx if train else test_idx
        self.data = upscale_digits(images[self.indices], size)
        self.targets = [int(t) for t in labels[self.indices]]
        self.classes = list(DIGITS_CLASSES)
        self.train, self.transform = train, transform

    def __repr__(self) -> str:
        split = "train" if self.train else "test"
        return f"DigitsDataset({split}, n={len(self)}, size={self.data.shape[1]})"
