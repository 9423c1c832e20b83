"""The per-sample seeding of the training loader: each item transformed under torch's RNG seeded for
(seed, epoch, index), the same in a worker process as in the caller's, the caller's own RNG
streams left as they were."""

from __future__ import annotations

import random

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from resnext.train.sampler import SeededDataset, mix_seed


class _Draws(Dataset):
    """Item i: draws from each RNG a transform might use (torch, Python's, numpy's), plus i."""

    def __len__(self) -> int:
        return 6

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.cat(
            [
                torch.rand(3, dtype=torch.float64),
                torch.tensor([random.random(), float(np.random.rand()), float(index)]),
            ]
        )


def _as_seeded(seed: int, index: int) -> torch.Tensor:
    """Item `index` with every RNG seeded from `seed` by the libraries' own seed functions."""
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)
    return _Draws()[index]


def test_an_item_is_drawn_as_after_seeding_every_rng_with_its_own_seed() -> None:
    data = SeededDataset(_Draws(), seed=7)
    for epoch, index in [(0, 0), (0, 5), (3, 2)]:
        got = data[(epoch, index)]
        assert torch.equal(got, _as_seeded(mix_seed(7, epoch, index), index))
    assert not torch.equal(data[(0, 1)][:5], data[(1, 1)][:5])  # another epoch, other draws


def test_the_callers_rng_streams_are_left_as_they_were() -> None:
    torch.manual_seed(1)
    random.seed(1)
    np.random.seed(1)
    want = (torch.rand(2), random.random(), np.random.rand())
    torch.manual_seed(1)
    random.seed(1)
    np.random.seed(1)
    SeededDataset(_Draws(), seed=7)[(0, 3)]
    got = (torch.rand(2), random.random(), np.random.rand())
    assert torch.equal(got[0], want[0]) and got[1:] == want[1:]


def test_a_worker_process_draws_what_the_caller_draws() -> None:
    data = SeededDataset(_Draws(), seed=11)
    keys = [(2, i) for i in range(6)]
    in_process = torch.stack([data[k] for k in keys])
    loader = DataLoader(data, batch_size=6, sampler=keys, num_workers=1)
    (in_worker,) = list(loader)
    assert torch.equal(in_worker, in_process)


def test_a_batch_fetched_at_once_is_its_items_fetched_one_by_one() -> None:
    data = SeededDataset(_Draws(), seed=5)
    keys = [(1, 4), (1, 0), (1, 4)]
    batch, one_by_one = data.__getitems__(keys), [data[k] for k in keys]
    assert len(batch) == 3 and all(
        torch.equal(a, b) for a, b in zip(batch, one_by_one, strict=True)
    )


def test_the_loaders_generator_is_a_stream_apart_from_the_sampler_order() -> None:
    # The loader's generator only draws the workers' base seed, but had it shared the sampler's
    # (seed, epoch) seed, that base seed would have been the permutation's first random draw.
    from resnext.train.data_setup import seed_loader, train_loader

    loader, sampler = train_loader(
        list(range(32)),
        global_batch=8,
        seed=5,
        rank=0,
        world_size=1,
        accum_steps=1,
        workers=0,
        pin_memory=False,
    )
    for epoch in (0, 3):
        seed_loader(loader, 5, epoch)
        sampler.set_epoch(epoch)
        permutation_gen = torch.Generator().manual_seed(mix_seed(5, epoch))
        # this is the generator the sampler's order comes from
        assert torch.randperm(32, generator=permutation_gen).tolist() == [i for _, i in sampler]
        permutation_gen.manual_seed(mix_seed(5, epoch))
        assert not torch.equal(
            torch.randint(0, 2**62, (4,), generator=loader.generator),
            torch.randint(0, 2**62, (4,), generator=permutation_gen),
        )
