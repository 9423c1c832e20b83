"""Base class of the datasets held in memory as one (N, H, W, 3) uint8 array with integer targets."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from PIL import Image

from resnext.data.functional import to_tensor


class InMemoryImages(torch.utils.data.Dataset):
    """Items are (transform(PIL image of data[i]), targets[i]); subclasses fill data and targets."""

    data: np.ndarray
    targets: list[int]
    transform: Callable[[Image.Image], Any] | None

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        img = Image.fromarray(self.data[index])
        return (self.transform(img) if self.transform else to_tensor(img)), self.targets[index]
