"""The datasets and loaders of a run: the config's dataset, or datasets handed in by the caller."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Dataset

from resnext.config import DataConfig
from resnext.errors import ConfigError
from resnext.train.sampler import SeededDataset, ShardSampler, TrainSampler, mix_seed


@dataclass(frozen=True)
class Splits:
    """The training and validation datasets and their class count."""

    train: Dataset
    val: Dataset
    num_classes: int | None


@dataclass(frozen=True)
class BatchTransforms:
    """What turns loader batches into model input on the device (None: the loader already did)."""

    train: Callable[[torch.Tensor], torch.Tensor] | None = None
    val: Callable[[torch.Tensor], torch.Tensor] | None = None


def batch_transforms(data: DataConfig) -> BatchTransforms:
    """The batch stage of the planned pipeline: jitter + lighting + normalise (train), normalise (val)."""
    if not data.planned:
        return BatchTransforms()
    from resnext.data.presets import imagenet_batch
    from resnext.data.stats import dataset_stats

    mean, std = dataset_stats(data.kind)
    return BatchTransforms(
        train=imagenet_batch(True, mean=mean, std=std),
        val=imagenet_batch(False, mean=mean, std=std),
    )


def _planned_transforms(data: DataConfig) -> tuple[Callable, Callable]:
    from resnext.data.planned import PlannedCenterCrop, PlannedRandomResizedCrop

    size = data.image_size
    return PlannedRandomResizedCrop(size), PlannedCenterCrop(size, round(size * 256 / 224))


def class_count(dataset: Dataset) -> int | None:
    """len(dataset.classes) when the dataset names its classes."""
    classes = getattr(dataset, "classes", None)
    return len(classes) if classes is not None else None


def build_splits(data: DataConfig) -> Splits:
    """The config's training and validation datasets with the data package's default transforms."""
    from resnext.data import build_dataset, default_transforms

    root = data.root or None
    if data.planned:
        train_tf, val_tf = _planned_transforms(data)
    else:
        train_tf = default_transforms(
            data.kind,
            "train",
            image_size=data.image_size,
            cutout=data.cutout,
            trivial_augment=data.trivial_augment,
        )
        val_tf = default_transforms(data.kind, "val", image_size=data.image_size)
    train = build_dataset(
        data.kind, root, data.train_split, train_tf, image_size=data.image_size, strict=data.strict
    )
    val = build_dataset(
        data.kind, root, data.val_split, val_tf, image_size=data.image_size, strict=data.strict
    )
    return Splits(train=train, val=val, num_classes=class_count(train))


def train_loader(
    dataset: Dataset,
    *,
    global_batch: int,
    seed: int,
    rank: int,
    world_size: int,
    accum_steps: int,
    workers: int,
    pin_memory: bool,
    persistent_workers: bool = False,
) -> tuple[DataLoader, TrainSampler]:
    """A loader of this rank's share of each global batch, and its resumable sampler (with
    `persistent_workers`, its worker processes kept from one pass to the next)."""
    if global_batch % (world_size * accum_steps):
        raise ConfigError(
            f"data.batch_size: expected a multiple of world size x optim.accum_steps "
            f"= {world_size * accum_steps}, got {global_batch}"
        )
    n = len(dataset)  # type: ignore[arg-type]
    if n < global_batch:
        raise ConfigError(
            f"data.batch_size: {global_batch} is larger than the training set ({n} images)"
        )
    sampler = TrainSampler(
        n,
        global_batch,
        seed=seed,
        rank=rank,
        world_size=world_size,
        accum_steps=accum_steps,
    )
    loader = DataLoader(
        SeededDataset(dataset, seed),
        batch_size=global_batch // world_size,
        sampler=sampler,
        num_workers=workers,
        pin_memory=pin_memory,
        drop_last=False,
        persistent_workers=persistent_workers and workers > 0,
        generator=_own_generator(seed, 0),
    )
    return loader, sampler


# Any constant other than an index works: (seed, epoch, index) seeds each sample's transforms.
_LOADER_STREAM = -1


def _own_generator(seed: int, epoch: int) -> torch.Generator:
    # Each new iterator of a DataLoader draws its workers' base seed from `generator`, or from
    # the global RNG when it has none: a resumed run creates its iterator right after restoring
    # the RNGs, which would shift every later global draw (mixup/CutMix) by one. The stream tag
    # keeps it apart from the sampler's permutation, which is seeded by (seed, epoch) alone.
    return torch.Generator().manual_seed(mix_seed(seed, epoch, _LOADER_STREAM))


def seed_loader(loader: DataLoader, seed: int, epoch: int) -> None:
    """Reseed the loader's own generator for `epoch`, so the workers' base seed of an epoch is
    the same in a resumed run as in an uninterrupted one."""
    if loader.generator is not None:
        loader.generator.manual_seed(mix_seed(seed, epoch, _LOADER_STREAM))


def eval_loader(
    dataset: Dataset, *, batch_size: int, rank: int, world_size: int, workers: int, pin_memory: bool
) -> DataLoader:
    """A loader of this rank's shard of the evaluation set, in a fixed order."""
    return DataLoader(
        SeededDataset(dataset, 0),
        batch_size=batch_size,
        sampler=ShardSampler(len(dataset), rank, world_size),  # type: ignore[arg-type]
        num_workers=workers,
        pin_memory=pin_memory,
        generator=_own_generator(0, 0),
    )
