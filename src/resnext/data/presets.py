"""The standard train/eval pipelines: ImageNet (fb.resnet.torch), CIFAR, digits, ten-crop."""

from __future__ import annotations

from collections.abc import Sequence

from resnext.data.batch_ops import BatchPipeline
from resnext.data.rng import RandomSource
from resnext.data.stats import IMAGENET_MEAN, IMAGENET_STD
from resnext.data.transforms import (
    CenterCrop,
    ColorJitter,
    Compose,
    Cutout,
    Lighting,
    Normalize,
    RandomCrop,
    RandomHorizontalFlip,
    RandomResizedCrop,
    Resize,
    TenCrop,
    ToTensor,
)
from resnext.data.trivial_augment import TrivialAugment


def imagenet_train(
    size: int = 224,
    *,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    interpolation: str = "bicubic",
    jitter: float = 0.4,
    lighting_std: float = 0.1,
    aspect_sampling: str = "uniform-swap",
    generator: RandomSource = None,
) -> Compose:
    """fb.resnet.torch: random-sized crop, flip, colour jitter, PCA lighting, normalise.

    The crop's aspect ratio is drawn as fb.resnet.torch draws it (uniform in [3/4, 4/3], then
    width and height swapped with probability 1/2); `aspect_sampling="log-uniform"` is
    torchvision's rule."""
    return Compose(
        [
            RandomResizedCrop(
                size,
                interpolation=interpolation,
                aspect_sampling=aspect_sampling,
                generator=generator,
            ),
            RandomHorizontalFlip(0.5, generator=generator),
            ToTensor(),
            ColorJitter(jitter, jitter, jitter, generator=generator),
            Lighting(lighting_std, generator=generator),
            Normalize(mean, std),
        ]
    )


def imagenet_batch(
    train: bool,
    *,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    jitter: float = 0.4,
    lighting_std: float = 0.1,
) -> BatchPipeline:
    """The planned pipeline's batch stage: `imagenet_train`'s colour jitter and lighting (when
    training), then normalisation, on whole uint8 batches."""
    if not train:
        return BatchPipeline(mean, std)
    return BatchPipeline(mean, std, jitter=jitter, lighting_std=lighting_std)


def imagenet_eval(
    size: int = 224,
    resize: int = 256,
    *,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    interpolation: str = "bicubic",
    antialias: bool = True,
    ten_crop: bool = False,
) -> Compose:
    """Resize the shorter side to `resize`, centre-crop `size` (or ten-crop), normalise.

    Bicubic, as fb.resnet.torch's evaluation resizes (its `Scale` default), like its crops."""
    head = [Resize(resize, interpolation, antialias)]
    if ten_crop:
        return Compose([*head, ToTensor(), Normalize(mean, std), TenCrop(size)])
    return Compose([*head, CenterCrop(size), ToTensor(), Normalize(mean, std)])


def cifar_train(
    mean: Sequence[float],
    std: Sequence[float],
    *,
    size: int = 32,
    padding: int = 4,
    flip: bool = True,
    cutout: int = 0,
    trivial_augment: bool = False,
    generator: RandomSource = None,
) -> Compose:
    """fb.resnet.torch CIFAR: normalise, then zero-pad by 4 and crop 32 at random, flip.

    Not in the paper's recipe: `trivial_augment` first applies one TrivialAugment operation to
    the 8-bit image; `cutout` > 0 adds a random zeroed square of that side at the end.
    """
    head: list = [TrivialAugment(generator=generator)] if trivial_augment else []
    steps = [
        *head,
        ToTensor(),
        Normalize(mean, std),
        RandomCrop(size, padding, generator=generator),
    ]
    if flip:
        steps.append(RandomHorizontalFlip(0.5, generator=generator))
    if cutout:
        steps.append(Cutout(cutout, generator=generator))
    return Compose(steps)


def cifar_eval(mean: Sequence[float], std: Sequence[float]) -> Compose:
    """To tensor and normalise."""
    return Compose([ToTensor(), Normalize(mean, std)])
