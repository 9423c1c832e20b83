"""Restricted-label evaluation: argmax/top-k over a class subset, labels mapped into it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from eval_helpers import MEAN, STD, ColourNet, fc_numpy, hand_array, random_images, softmax

from resnext.errors import ConfigError, DataError
from resnext.evaluate import LabelSubset, Normalization, evaluate, get_protocol, read_class_subset

NORM = Normalization(MEAN.tolist(), STD.tolist())
K = 12
SUBSET = [7, 2, 9, 4, 11, 0]


def _images(n: int) -> list:
    return [img.resize((20, 20)) for img in random_images(n, seed=11)]


def _hand_subset_predictions(model: ColourNet, images: list) -> list[np.ndarray]:
    out = []
    for img in images:
        logits = fc_numpy(model, hand_array(img).mean(axis=(0, 1)))
        out.append(softmax(logits[SUBSET]))  # softmax over the subset only
    return out


def test_model_space_labels_are_mapped_to_subset_positions() -> None:
    model, images = ColourNet(K, seed=2), _images(16)
    rng = np.random.default_rng(0)
    labels = [int(rng.choice(SUBSET)) for _ in images]
    probs = _hand_subset_predictions(model, images)
    positions = [SUBSET.index(y) for y in labels]
    top1 = sum(int(np.argmax(p) == q) for p, q in zip(probs, positions, strict=True))
    top5 = sum(int(q in np.argsort(-p)[:5]) for p, q in zip(probs, positions, strict=True))
    result = evaluate(
        model,
        list(zip(images, labels, strict=True)),
        get_protocol("center", resize=20, crop=20),
        NORM,
        num_classes=K,
        subset=LabelSubset(SUBSET, K, "model"),
    )
    assert result.counter.num_classes == len(SUBSET)
    assert (int(result.counter.hits[0]), int(result.counter.hits[1])) == (top1, top5)
    # Restricting can only help: the full 12-way argmax is right no more often.
    full = evaluate(
        model,
        list(zip(images, labels, strict=True)),
        get_protocol("center", resize=20, crop=20),
        NORM,
        num_classes=K,
    )
    assert int(full.counter.hits[0]) <= top1


def test_position_labels_index_the_subset() -> None:
    model, images = ColourNet(K, seed=4), _images(10)
    positions = [i % len(SUBSET) for i in range(len(images))]
    probs = _hand_subset_predictions(model, images)
    top1 = sum(int(np.argmax(p) == q) for p, q in zip(probs, positions, strict=True))
    result = evaluate(
        model,
        list(zip(images, positions, strict=True)),
        get_protocol("center", resize=20, crop=20),
        NORM,
        num_classes=K,
        subset=LabelSubset(SUBSET, K, "position"),
    )
    assert int(result.counter.hits[0]) == top1


def test_label_outside_subset_is_a_data_error() -> None:
    subset = LabelSubset(SUBSET, K)
    with pytest.raises(DataError, match="not in the class subset"):
        subset.map_targets(torch.tensor([7, 3]))


@pytest.mark.parametrize("indices", [[], [1, 1], [12], [-1]])
def test_bad_subsets_are_config_errors(indices: list[int]) -> None:
    with pytest.raises(ConfigError):
        LabelSubset(indices, K)


def test_subset_file_formats(tmp_path) -> None:
    text = tmp_path / "subset.txt"
    text.write_text("# the classes\n7, 2\n9 4  # more\n")
    assert read_class_subset(text) == [7, 2, 9, 4]
    js = tmp_path / "subset.json"
    js.write_text("[3, 1]")
    assert read_class_subset(js) == [3, 1]
    bad = tmp_path / "bad.txt"
    bad.write_text("1 two 3")
    with pytest.raises(ConfigError, match=r"bad\.txt"):
        read_class_subset(bad)
    with pytest.raises(ConfigError, match="missing"):
        read_class_subset(tmp_path / "missing.txt")
