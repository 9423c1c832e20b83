"""Build datasets and their standard transforms by kind name: cifar10, cifar100, imagefolder, digits."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from resnext.data import functional as TF
from resnext.data.cifar import CIFARDataset
from resnext.data.digits import DigitsDataset
from resnext.data.folder import ImageFolderDataset
from resnext.data.presets import cifar_eval, cifar_train, imagenet_eval, imagenet_train
from resnext.data.rng import RandomSource
from resnext.data.stats import dataset_stats
from resnext.errors import ConfigError, DataError

DATASET_KINDS = ("cifar10", "cifar100", "digits", "imagefolder")
SPLITS = ("train", "val", "test")
NUM_CLASSES = {"cifar10": 10, "cifar100": 100, "digits": 10}
DEFAULT_IMAGE_SIZE = {"cifar10": 32, "cifar100": 32, "digits": 32, "imagefolder": 224}


def _check(kind: str, split: str) -> None:
    if kind not in DATASET_KINDS:
        raise ConfigError(f"unknown dataset kind {kind!r}; allowed: {', '.join(DATASET_KINDS)}")
    if split not in SPLITS:
        raise ConfigError(f"unknown split {split!r}; allowed: {', '.join(SPLITS)}")


def build_dataset(
    kind: str,
    root: str | Path | None,
    split: str,
    transform: Callable[[Any], Any] | None,
    *,
    image_size: int | None = None,
    strict: bool = False,
) -> Dataset:
    """The `split` ('train', 'val' or 'test'; val and test are the same for CIFAR and digits)."""
    _check(kind, split)
    train = split == "train"
    if kind == "digits":
        return DigitsDataset(train, transform, size=image_size or DEFAULT_IMAGE_SIZE["digits"])
    if root is None:
        raise ConfigError(f"dataset kind {kind!r} needs a data root (a path); none was given")
    if kind in ("cifar10", "cifar100"):
        return CIFARDataset(root, train, transform, variant=kind)
    folder = Path(root) / split
    if not folder.is_dir():
        raise DataError(
            f"image folder split {folder} does not exist: expected {root}/{split}/<class>/<images>"
        )
    # Reduced-scale JPEG decoding only where it speeds augmentation up: validation decodes in full,
    # as `resnext eval` does, so a run's val errors (and its best.pt) match what eval reports.
    return ImageFolderDataset(folder, transform, strict=strict, use_draft=train)


def default_transforms(
    kind: str,
    split: str,
    *,
    image_size: int | None = None,
    resize_size: int | None = None,
    interpolation: str | None = None,
    ten_crop: bool = False,
    cutout: int = 0,
    trivial_augment: bool = False,
    generator: RandomSource = None,
) -> Callable[[Any], Any]:
    """The standard train or eval pipeline for a dataset kind (normalised float CHW tensors).

    `interpolation` resamples the ImageFolder crops; None keeps the pipelines' own (bicubic for
    training and evaluation, as fb.resnet.torch). CIFAR and digits images are used
    whole, unresampled, so it does not act on them, but a bad name is refused for every kind."""
    _check(kind, split)
    # None keeps the preset's own filter; a name is checked here, whichever kind it is for.
    resampling = {"interpolation": interpolation} if interpolation is not None else {}
    if interpolation is not None:
        TF.pil_interpolation(interpolation)
    mean, std = dataset_stats(kind)
    train = split == "train"
    if kind == "imagefolder":
        size = image_size or DEFAULT_IMAGE_SIZE[kind]
        if train:
            return imagenet_train(size, mean=mean, std=std, generator=generator, **resampling)
        resize = resize_size or round(size * 256 / 224)
        return imagenet_eval(size, resize, mean=mean, std=std, ten_crop=ten_crop, **resampling)
    if not train:
        return cifar_eval(mean, std)
    size = image_size or DEFAULT_IMAGE_SIZE[kind]
    if kind == "digits":  # mirrored digits are other symbols: no flip, a smaller shift
        return cifar_train(
            mean, std, size=size, padding=max(1, size // 16), flip=False, generator=generator
        )
    return cifar_train(
        mean,
        std,
        size=size,
        padding=4,
        cutout=cutout,
        trivial_augment=trivial_augment,
        generator=generator,
    )


def dataset_class_names(dataset: object, head: int) -> tuple[str, ...] | None:
    """The dataset's class names (folder or CIFAR meta names), when it has one per class of the
    model's `head`; None otherwise (a dataset without names, or a head of another size)."""
    classes = getattr(dataset, "classes", None)
    if not isinstance(classes, (list, tuple)) or len(classes) != head:
        return None
    return tuple(str(name) for name in classes)
