"""The embedded digits dataset: real sizes, a stratified deterministic split, RGB images."""

from __future__ import annotations

import numpy as np
import pytest

from resnext.data.digits import DigitsDataset, load_digits_arrays, stratified_split
from resnext.data.stats import DIGITS_MEAN, DIGITS_STD

pytest.importorskip("sklearn", reason="the digits ship inside scikit-learn")


def test_sizes_split_and_classes() -> None:
    images, labels = load_digits_arrays()
    assert images.shape == (1797, 8, 8) and images.max() == 16  # UCI optdigits: 1,797, 0..16
    from sklearn.datasets import load_digits  # the reference loader

    ref = load_digits()
    np.testing.assert_array_equal(images, ref.images.astype(np.uint8))
    np.testing.assert_array_equal(labels, ref.target)
    train, test = DigitsDataset(True, size=16), DigitsDataset(False, size=16)
    assert len(train) + len(test) == 1797 and abs(len(test) - 0.2 * 1797) < 10
    assert train.classes == [str(d) for d in range(10)]
    assert set(train.indices).isdisjoint(test.indices)
    per_class = np.bincount(test.targets, minlength=10) / np.bincount(labels, minlength=10)
    assert np.all(np.abs(per_class - 0.2) < 0.01)  # stratified
    x, y = train[0]
    assert x.shape == (3, 16, 16) and y == labels[train.indices[0]]
    assert np.array_equal(train.data[0, :, :, 0], train.data[0, :, :, 2])  # grey in 3 channels


def test_split_is_deterministic_and_seeded() -> None:
    _, labels = load_digits_arrays()
    a = stratified_split(labels, 0.2, seed=0)
    b = stratified_split(labels, 0.2, seed=0)
    c = stratified_split(labels, 0.2, seed=1)
    assert np.array_equal(a[1], b[1]) and not np.array_equal(a[1], c[1])
    assert len(np.intersect1d(a[0], a[1])) == 0 and len(a[0]) + len(a[1]) == 1797


@pytest.mark.parametrize("size", [16, 32])
def test_mean_std_constants_match_data(size: int) -> None:
    data = DigitsDataset(True, size=size).data.astype(np.float64) / 255
    assert abs(data.mean() - DIGITS_MEAN[0]) < 0.01
    assert abs(data.std() - DIGITS_STD[0]) < 0.01
