"""Loader determinism: same seed and epoch give the same batches, with and without workers."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset

from resnext.data.loader import build_loader, default_workers, set_epoch
from resnext.data.transforms import Compose, Lighting
from resnext.errors import ConfigError


class _NoisyDataset(Dataset):
    """Each item draws from torch's, numpy's and random's global RNGs, like augmentations do."""

    def __len__(self) -> int:
        return 24

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.tensor(
            [float(index), torch.rand(()).item(), float(np.random.rand()), random.random()]
        )


class _GeneratorDataset(Dataset):
    """Items drawn from a transform that holds its own torch.Generator."""

    def __init__(self) -> None:
        self.transform = Lighting(0.1, generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return 8

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.transform(torch.zeros(3, 1, 1)).flatten()


def _epoch(loader, epoch: int) -> torch.Tensor:
    set_epoch(loader, epoch)
    return torch.cat(list(loader))


def test_same_seed_same_batches_with_workers() -> None:
    a = build_loader(_NoisyDataset(), 4, shuffle=True, workers=2, seed=11)
    b = build_loader(_NoisyDataset(), 4, shuffle=True, workers=2, seed=11)
    a0, a1 = _epoch(a, 0), _epoch(a, 1)
    assert torch.equal(a0, _epoch(b, 0))
    assert sorted(a0[:, 0].tolist()) == list(range(24))  # each sample once
    assert not torch.equal(a0[:, 0], a1[:, 0])  # another shuffle order in epoch 1
    assert not torch.equal(a0[:, 1:], a1[:, 1:])  # and other augmentation draws
    # Resuming at epoch 1 in a fresh loader reproduces epoch 1 exactly (numpy/random too).
    c = build_loader(_NoisyDataset(), 4, shuffle=True, workers=2, seed=11)
    assert torch.equal(_epoch(c, 1), a1)
    # The two workers draw different random streams.
    first_two = a0[:8, 1]
    assert len(set(first_two.tolist())) == 8
    other = build_loader(_NoisyDataset(), 4, shuffle=True, workers=2, seed=12)
    assert not torch.equal(_epoch(other, 0)[:, 0], a0[:, 0])


def test_in_process_loader_shuffle_is_seeded() -> None:
    orders = []
    for _ in range(2):
        loader = build_loader(_NoisyDataset(), 5, shuffle=True, workers=0, seed=3)
        orders.append(_epoch(loader, 2)[:, 0])
    assert torch.equal(orders[0], orders[1])
    plain = build_loader(_NoisyDataset(), 5, shuffle=False, workers=0, seed=3, drop_last=True)
    assert _epoch(plain, 0)[:, 0].tolist() == list(range(20))  # 24 // 5 full batches, in order


def test_options(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "cpu_count", lambda: 1)
    assert default_workers() == 0
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    assert default_workers() == 8
    loader = build_loader(_NoisyDataset(), 4, shuffle=False, workers=0, pin_memory=None)
    assert loader.pin_memory == torch.cuda.is_available()
    with pytest.raises(ConfigError, match="not initialised"):
        build_loader(_NoisyDataset(), 4, shuffle=True, workers=0, distributed=True)
    with pytest.raises(ConfigError, match="batch_size"):
        build_loader(_NoisyDataset(), 0, shuffle=True, workers=0)


def test_transform_generators_get_one_stream_per_worker() -> None:
    loader = build_loader(_GeneratorDataset(), 2, shuffle=False, workers=2, seed=0)
    batches = list(loader)  # batch 0 comes from worker 0, batch 1 from worker 1
    assert not torch.equal(batches[0][0], batches[1][0])
    again = list(build_loader(_GeneratorDataset(), 2, shuffle=False, workers=2, seed=0))
    assert all(torch.equal(a, b) for a, b in zip(batches, again, strict=True))


class _Draw:
    """A transform step that returns one draw of its numpy generator."""

    def __init__(self, generator: np.random.Generator) -> None:
        self.generator = generator

    def __call__(self, _: object) -> float:
        return float(self.generator.random())


class _SharedNumpyGeneratorDataset(Dataset):
    """Two transform steps drawing from one numpy Generator, as Compose([...]) holds them."""

    def __init__(self) -> None:
        shared = np.random.default_rng(0)
        self.transform = Compose([_Draw(shared), _Draw(shared)])

    def __len__(self) -> int:
        return 16

    def __getitem__(self, index: int) -> torch.Tensor:
        first, second = self.transform.transforms
        same = first.generator is second.generator
        return torch.tensor([first(None), second(None), float(same)], dtype=torch.float64)


def test_steps_sharing_a_numpy_generator_share_one_in_the_workers() -> None:
    items = torch.cat(
        list(build_loader(_SharedNumpyGeneratorDataset(), 4, shuffle=False, workers=1))
    )
    assert items[:, 2].eq(1).all()  # still one generator for both steps
    # One stream: the second step takes the draw after the first one's, never the same number
    # (with a generator each, seeded alike, every pair was equal and two flips always cancelled).
    assert not items[:, 0].eq(items[:, 1]).any()
    assert len(set(items[:, :2].flatten().tolist())) == 32


class _TwoGeneratorsDataset(Dataset):
    """Two transform steps with a generator each (numpy or torch), seeded alike by the user."""

    def __init__(self, kind: str) -> None:
        def make() -> object:
            return np.random.default_rng(0) if kind == "numpy" else torch.Generator().manual_seed(0)

        self.transform = Compose([_TorchOrNumpyDraw(make()), _TorchOrNumpyDraw(make())])

    def __len__(self) -> int:
        return 16

    def __getitem__(self, index: int) -> torch.Tensor:
        first, second = self.transform.transforms
        return torch.tensor([first(None), second(None)], dtype=torch.float64)


class _TorchOrNumpyDraw:
    """A transform step that returns one uniform draw of its generator, of either library."""

    def __init__(self, generator: object) -> None:
        self.generator = generator

    def __call__(self, _: object) -> float:
        if isinstance(self.generator, torch.Generator):
            return float(torch.rand(1, generator=self.generator, dtype=torch.float64))
        return float(self.generator.random())


@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_distinct_generators_get_distinct_streams_in_the_workers(kind: str) -> None:
    # Reseeded with one seed, two generators would draw equal numbers: a crop's scale and a
    # flip's coin would move together in every sample.
    items = torch.cat(list(build_loader(_TwoGeneratorsDataset(kind), 4, shuffle=False, workers=1)))
    assert not items[:, 0].eq(items[:, 1]).any()
