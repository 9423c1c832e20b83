"""Fixtures shared by the speed tests."""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager

import pytest
import torch
from torch import nn


def _randomize_bn(model: nn.Module) -> None:
    """Non-trivial, seeded BN statistics and affines, so that folding them changes the convs."""
    gen = torch.Generator().manual_seed(3)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0.0, 0.1, generator=gen)
            m.running_var.uniform_(0.5, 2.0, generator=gen)
            m.weight.data.uniform_(0.5, 1.5, generator=gen)
            m.bias.data.normal_(0.0, 0.1, generator=gen)


@pytest.fixture
def randomize_bn() -> Callable[[nn.Module], None]:
    """Sets a model's BNs to seeded non-trivial values (see `_randomize_bn`)."""
    return _randomize_bn


@contextlib.contextmanager
def _threads(n: int) -> Iterator[None]:
    """torch (and so our kernels, which take torch's thread count) on `n` threads for the block."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture
def on_threads() -> Callable[[int], AbstractContextManager[None]]:
    """``with on_threads(n):`` runs the block on n threads, then restores the count."""
    return _threads


# the modules whose kernels run on AMX tiles (each loads them with `grouped_amx.load_amx`), each
# with its `unavailable_reason`; test_without_amx.py checks that none is missing
AMX_MODULES = (
    "conv_x3",
    "grouped_amx",
    "grouped_dgrad_amx",
    "grouped_quads",
    "grouped_wgrad_amx",
    "pointwise_wgrad_amx",
    "stem",
)


@pytest.fixture
def without_amx(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every AMX kernel reports itself unavailable, as on a CPU without AMX.

    On a CPU with AMX the fast path's AMX passes run first and take the layers that the vector
    kernels' passes would take; a test of those passes through `optimize` asks for this so that it
    tests them on every CPU that has their kernels."""
    for name in AMX_MODULES:
        module = importlib.import_module(f"resnext.speed.{name}")
        monkeypatch.setattr(module, "unavailable_reason", lambda *_: "as on a CPU without AMX")
