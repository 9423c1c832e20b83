"""The datasets and loaders of a run: the config's dataset, or datasets handed in by the caller."""

from __future__ import annotations

from dataclasses import dataclass

from torch.utils.data import DataLoader, Dataset

from resnext.config import DataConfig
from resnext.errors import ConfigError
from resnext.train.sampler import SeededDataset, ShardSampler, TrainSampler


@dataclass(frozen=True)
class Splits:
    """The training and validation datasets and their class count."""

    train: Dataset
    val: Dataset
    num_classes: int | None


def class_count(dataset: Dataset) -> int | None:
    """len(dataset.classes) when the dataset names its classes."""
    classes = getattr(dataset, "classes", None)
    return len(classes) if classes is not None else None


def build_splits(data: DataConfig) -> Splits:
    """The config's training and validation datasets with the data package's default transforms."""
    from resnext.data import build_dataset, default_transforms

    root = data.root or None
    train = build_dataset(
        data.kind,
        root,
        data.train_split,
        default_transforms(
            data.kind,
            "train",
            image_size=data.image_size,
            cutout=data.cutout,
            trivial_augment=data.trivial_augment,
        ),
        image_size=data.image_size,
        strict=data.strict,
    )
    val = build_dataset(
        data.kind,
        root,
        data.val_split,
        default_transforms(data.kind, "val", image_size=data.image_size),
        image_size=data.image_size,
        strict=data.strict,
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
) -> tuple[DataLoader, TrainSampler]:
    """A loader of this rank's share of each global batch, and its resumable sampler."""
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
    )
    return loader, sampler


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
    )
