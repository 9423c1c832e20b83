"""Fixtures of the training tests: a tiny learnable dataset and a tiny-model config.

The subprocess scripts of the resume and DDP tests load this file by path to build the same data.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils.data import TensorDataset

from resnext.config import Config, make_config

HERE = Path(__file__).resolve().parent


def tiny_dataset(n: int, classes: int = 4, seed: int = 1) -> TensorDataset:
    """n random 3x8x8 images whose mean brightness depends on the label (learnable in a few steps)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=g)
    x = torch.randn(n, 3, 8, 8, generator=g) + 0.5 * y.view(-1, 1, 1, 1).float()
    return TensorDataset(x, y)


def tiny_config(out: Path | str, **sections: Any) -> Config:
    """resnext_tiny with 4 classes on 8x8 inputs, float32, one thread; `sections` update the dict."""
    data: dict[str, Any] = {
        "name": "tiny",
        "output_dir": str(out),
        "model": {"name": "resnext_tiny", "spec": {"num_classes": 4}},
        "data": {"batch_size": 16, "eval_batch_size": 40},
        "optim": {"lr": 0.05},
        "schedule": {"kind": "cosine"},
        "train": {"epochs": 2, "amp": "none", "threads": 1, "log_every": 100},
    }
    for key, value in sections.items():
        if isinstance(value, dict):
            data.setdefault(key, {}).update(value)
        else:
            data[key] = value
    return make_config(data)


@pytest.fixture
def tiny_data() -> Callable[..., TensorDataset]:
    return tiny_dataset


@pytest.fixture
def tiny_cfg() -> Callable[..., Config]:
    return tiny_config


@pytest.fixture
def support_file() -> Path:
    """This file's path, for subprocess scripts that need the same data and config."""
    return Path(__file__).resolve()


@pytest.fixture(autouse=True)
def _restore_threads():
    """Put torch's thread count back: configs here set train.threads=1."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)
