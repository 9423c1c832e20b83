"""build_dataset / default_transforms by kind, and the published CIFAR-10 channel statistics."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from resnext.data.registry import build_dataset, default_transforms
from resnext.data.stats import CIFAR10_MEAN, CIFAR10_STD, compute_mean_std
from resnext.errors import ConfigError, DataError


def test_unknown_kind_lists_allowed() -> None:
    with pytest.raises(ConfigError, match="cifar10, cifar100, digits, imagefolder"):
        build_dataset("mnist", None, "train", None)
    with pytest.raises(ConfigError, match="split"):
        default_transforms("cifar10", "holdout")
    with pytest.raises(ConfigError, match="needs a data root"):
        build_dataset("cifar10", None, "train", None)


def test_cifar_by_kind(cifar10_mini: Path) -> None:
    ds = build_dataset(
        "cifar10", cifar10_mini.parent, "test", default_transforms("cifar10", "test")
    )
    x, _ = ds[0]
    raw = ds.data[0].astype(np.float64) / 255
    expected = (raw[5, 7] - np.array(CIFAR10_MEAN)) / np.array(CIFAR10_STD)
    np.testing.assert_allclose(x[:, 5, 7].numpy(), expected, atol=1e-5)
    train = build_dataset("cifar10", cifar10_mini, "train", default_transforms("cifar10", "train"))
    assert train[0][0].shape == (3, 32, 32)


def test_cifar10_stats_agree_with_published_values(cifar10_mini: Path) -> None:
    data = build_dataset("cifar10", cifar10_mini, "train", None).data
    mean, std = compute_mean_std(data)
    # fb.resnet.torch's full-set values (125.3, 123.0, 113.9)/255, std (63.0, 62.1, 66.7)/255;
    # this 10 % subset lands within 0.005 of them.
    for got, want in zip(mean + std, (125.3, 123.0, 113.9, 63.0, 62.1, 66.7), strict=True):
        assert abs(got - want / 255) < 0.005
    naive = data.reshape(-1, 3).astype(np.float64) / 255
    np.testing.assert_allclose(mean, naive.mean(0), atol=1e-9)
    np.testing.assert_allclose(std, naive.std(0), atol=1e-9)


def test_imagefolder_and_digits_by_kind(tmp_path: Path) -> None:
    for split in ("train", "val"):
        for cls in ("a", "b"):
            (tmp_path / split / cls).mkdir(parents=True)
            Image.new("RGB", (300, 260), (10, 20, 30)).save(tmp_path / split / cls / "x.png")
    train = build_dataset(
        "imagefolder", tmp_path, "train", default_transforms("imagefolder", "train")
    )
    val = build_dataset("imagefolder", tmp_path, "val", default_transforms("imagefolder", "val"))
    assert train[0][0].shape == (3, 224, 224) and val[1][0].shape == (3, 224, 224)
    assert val[1][1] == 1
    with pytest.raises(DataError, match="test"):
        build_dataset("imagefolder", tmp_path, "test", None)
    small = default_transforms("imagefolder", "val", image_size=64)
    assert small(Image.new("RGB", (100, 80)))[0].shape == (64, 64)
    digits = build_dataset(
        "digits", None, "test", default_transforms("digits", "train", image_size=16), image_size=16
    )
    assert digits[0][0].shape == (3, 16, 16)


def test_interpolation_reaches_the_training_crop_and_bad_names_are_refused() -> None:
    # A black and white checkerboard: nearest keeps only 0 and 255, bicubic makes greys between.
    board = np.kron((np.indices((16, 16)).sum(0) % 2) * 255, np.ones((4, 4))).astype(np.uint8)
    img = Image.fromarray(board).convert("RGB")

    def crop_values(pipeline) -> set[int]:  # type: ignore[no-untyped-def]
        crop = pipeline.transforms[0]  # the random-resized crop, before any colour step
        return set(np.unique(np.asarray(crop(img))).tolist())

    nearest = default_transforms("imagefolder", "train", interpolation="nearest")
    assert crop_values(nearest) <= {0, 255}
    # unset: fb.resnet.torch's bicubic, as before
    assert len(crop_values(default_transforms("imagefolder", "train"))) > 2
    for kind in ("imagefolder", "cifar10", "digits"):
        for split in ("train", "val"):
            with pytest.raises(ConfigError, match=r"interpolation 'foo' is not one of \["):
                default_transforms(kind, split, interpolation="foo")


def test_imagefolder_validation_decodes_in_full_as_eval_does(tmp_path: Path) -> None:
    # A photo far larger than the validation resize: a reduced-scale (draft) decode would give
    # other pixels than the full decode `resnext eval` uses, and the run's val errors would differ.
    rng = np.random.default_rng(3)
    for split in ("train", "val"):
        (tmp_path / split / "a").mkdir(parents=True)
        pixels = rng.integers(0, 256, (768, 1024, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(tmp_path / split / "a" / "x.jpg", quality=90)
    tf = default_transforms("imagefolder", "val", image_size=56)
    val = build_dataset("imagefolder", tmp_path, "val", tf)
    with Image.open(tmp_path / "val" / "a" / "x.jpg") as img:
        full = tf(img.convert("RGB"))
    assert np.array_equal(np.asarray(val[0][0]), np.asarray(full))
    # training keeps the faster decode where its crop allows it
    assert build_dataset("imagefolder", tmp_path, "train", tf).use_draft
