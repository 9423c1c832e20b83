"""DataLoaders with reproducible shuffling and per-worker seeding, resumable at any epoch."""

from __future__ import annotations

import hashlib
import os
import random

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from resnext.errors import ConfigError

_SEED_MASK = (1 << 63) - 1


def default_workers() -> int:
    """Worker processes that fit this machine: one core left for the main process, at most 8."""
    return max(0, min((os.cpu_count() or 1) - 1, 8))


def epoch_seed(seed: int, epoch: int, rank: int = 0) -> int:
    """A 63-bit seed that depends only on (seed, epoch, rank)."""
    digest = hashlib.blake2b(f"{seed}:{epoch}:{rank}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & _SEED_MASK


def _reseed_transform_generators(transform: object, seed: int) -> None:
    # A generator handed to a transform is copied into every worker with the same state, which
    # would give all workers the same augmentations: give each worker its own stream instead.
    # Steps that share one generator keep sharing one stream: a replacement per step would make
    # them draw the same numbers (two flips sharing a stream would always cancel). Distinct
    # generators get distinct seeds, else their streams would be equal (crop and flip in step).
    steps = getattr(transform, "transforms", [transform])
    # by id; the original is kept in the entry so its id cannot be reused while we look it up
    streams: dict[int, tuple[object, object]] = {}
    for step in steps:
        gen = getattr(step, "generator", None)
        if not isinstance(gen, (torch.Generator, np.random.Generator)):
            continue
        if id(gen) not in streams:
            # the first keeps the worker's seed itself, so a single shared generator is unchanged
            k = len(streams)
            stream_seed = seed if k == 0 else epoch_seed(seed, k)
            if isinstance(gen, torch.Generator):
                gen.manual_seed(stream_seed)
                streams[id(gen)] = (gen, gen)
            else:
                streams[id(gen)] = (gen, np.random.default_rng(stream_seed))
        step.generator = streams[id(gen)][1]


def seed_worker(worker_id: int) -> None:
    """Seed numpy, random and the dataset's transform generators from torch's worker seed.

    torch gives each worker base_seed + worker_id, and the base seed comes from the loader's
    generator, which SeededDataLoader.set_epoch derives from (seed, epoch, rank).
    """
    seed = torch.initial_seed()
    random.seed(seed)
    np.random.seed(seed % 2**32)
    info = torch.utils.data.get_worker_info()
    if info is not None:
        _reseed_transform_generators(getattr(info.dataset, "transform", None), seed)


class SeededDataLoader(DataLoader):
    """A DataLoader whose shuffle order and worker seeds are functions of (seed, epoch, rank)."""

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        *,
        shuffle: bool,
        sampler: DistributedSampler | None,
        workers: int,
        drop_last: bool,
        pin_memory: bool,
        persistent_workers: bool,
        seed: int,
        rank: int,
    ) -> None:
        super().__init__(
            dataset,
            batch_size=batch_size,
            shuffle=shuffle if sampler is None else False,
            sampler=sampler,
            num_workers=workers,
            drop_last=drop_last,
            pin_memory=pin_memory,
            persistent_workers=persistent_workers and workers > 0,
            worker_init_fn=seed_worker if workers > 0 else None,
            generator=torch.Generator(),
        )
        self.seed, self.rank, self.epoch = seed, rank, 0

    def set_epoch(self, epoch: int) -> None:
        """Re-derive the shuffle order and worker seeds for `epoch` (call before iterating)."""
        self.epoch = epoch
        if isinstance(self.sampler, DistributedSampler):
            self.sampler.set_epoch(epoch)
        if self.generator is not None:
            # The generator drives both the shuffle and torch's base seed for the workers.
            self.generator.manual_seed(epoch_seed(self.seed, epoch, self.rank))


def build_loader(
    dataset: Dataset,
    batch_size: int,
    *,
    shuffle: bool,
    workers: int | None = None,
    seed: int = 0,
    drop_last: bool = False,
    distributed: bool = False,
    pin_memory: bool | None = None,
    persistent_workers: bool = False,
) -> SeededDataLoader:
    """A loader whose batches are the same for the same (seed, epoch), whatever the run history.

    workers=None fits the machine; distributed=True shards with DistributedSampler (needs an
    initialised process group); pin_memory=None pins when CUDA is available. Persistent workers
    keep their RNG across epochs, so they are reproducible only for an uninterrupted run.
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size must be at least 1, got {batch_size}")
    workers = default_workers() if workers is None else workers
    if workers < 0:
        raise ConfigError(f"workers must be >= 0, got {workers}")
    rank, sampler = 0, None
    if distributed:
        if not (dist.is_available() and dist.is_initialized()):
            raise ConfigError("distributed=True but torch.distributed is not initialised")
        rank = dist.get_rank()
        sampler = DistributedSampler(dataset, shuffle=shuffle, seed=seed, drop_last=drop_last)
    loader = SeededDataLoader(
        dataset,
        batch_size,
        shuffle=shuffle,
        sampler=sampler,
        workers=workers,
        drop_last=drop_last,
        pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
        persistent_workers=persistent_workers,
        seed=seed,
        rank=rank,
    )
    loader.set_epoch(0)
    return loader


def set_epoch(loader: DataLoader, epoch: int) -> None:
    """Prepare `loader` for `epoch`: reseed a SeededDataLoader or a distributed sampler."""
    if isinstance(loader, SeededDataLoader):
        loader.set_epoch(epoch)
    elif hasattr(loader.sampler, "set_epoch"):
        loader.sampler.set_epoch(epoch)
