"""Each protocol against a hand-written crop loop on models whose logits are known in closed form."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from eval_helpers import (
    MEAN,
    STD,
    ColourNet,
    LeftHalfNet,
    fc_numpy,
    hand_array,
    hand_resize,
    random_images,
    softmax,
    topk_counts,
)

import resnext
from resnext.errors import ConfigError
from resnext.evaluate import (
    Normalization,
    Protocol,
    ViewTransform,
    dense_logits,
    evaluate,
    get_protocol,
)
from resnext.evaluate.dense import class_score_map
from resnext.evaluate.scoring import Scorer
from resnext.evaluate.views import collate_views

NORM = Normalization(MEAN.tolist(), STD.tolist())
K = 8


def _dataset(n: int = 12, seed: int = 0) -> list[tuple[object, int]]:
    rng = np.random.default_rng(seed + 100)
    return [(img, int(rng.integers(0, K))) for img in random_images(n, seed)]


def _scores(model: torch.nn.Module, data: list, protocol: Protocol) -> np.ndarray:
    """Per-image probabilities straight from the library's views and scorer."""
    views = ViewTransform(protocol, NORM)
    batch = collate_views([(views(img), y) for img, y in data])[0]
    return Scorer(model, protocol)(batch, torch.device("cpu")).double().numpy()


def _run(model: torch.nn.Module, data: list, protocol: Protocol) -> tuple[int, int, torch.Tensor]:
    result = evaluate(model, data, protocol, NORM, num_classes=K, batch_size=5)
    c = result.counter
    return int(c.hits[0]), int(c.hits[1]), c.confusion


def test_center_crop_matches_hand_loop() -> None:
    model, data = LeftHalfNet(K), _dataset()
    probs = []
    for img, _ in data:
        r = hand_resize(img, 32)
        w, h = r.size
        left, top = -(-(w - 24) // 2), -(-(h - 24) // 2)  # ceil of half the margin
        arr = hand_array(r)[top : top + 24, left : left + 24]
        probs.append(softmax(fc_numpy(model, arr[:, :12].mean(axis=(0, 1)))))
    labels = [y for _, y in data]
    protocol = get_protocol("center", resize=32, crop=24)
    np.testing.assert_allclose(_scores(model, data, protocol), np.stack(probs), atol=1e-5)
    top1, top5, confusion = _run(model, data, protocol)
    assert (top1, top5) == topk_counts(probs, labels)
    for p, y in zip(probs, labels, strict=True):
        assert confusion[y, int(np.argmax(p))] >= 1
    assert int(confusion.sum()) == len(data)


def test_tencrop_matches_hand_loop() -> None:
    model, data = LeftHalfNet(K, seed=3), _dataset(seed=1)
    probs = []
    for img, _ in data:
        arr = hand_array(hand_resize(img, 30))
        h, w = arr.shape[:2]
        s = 20
        corners = [
            (-(-(w - s) // 2), -(-(h - s) // 2)),
            (0, 0),
            (w - s, 0),
            (0, h - s),
            (w - s, h - s),
        ]
        views = []
        for left, top in corners:
            crop = arr[top : top + s, left : left + s]
            views += [crop, crop[:, ::-1]]
        assert len(views) == 10
        per_view = [softmax(fc_numpy(model, v[:, : s // 2].mean(axis=(0, 1)))) for v in views]
        probs.append(np.mean(per_view, axis=0))
    labels = [y for _, y in data]
    protocol = get_protocol("tencrop", resize=30, crop=20)
    np.testing.assert_allclose(_scores(model, data, protocol), np.stack(probs), atol=1e-5)
    top1, top5, _ = _run(model, data, protocol)
    assert (top1, top5) == topk_counts(probs, labels)
    # A position-blind mean would give another answer for some image: the views matter.
    centre_only = []
    for img, _ in data:
        arr = hand_array(hand_resize(img, 30))
        centre_only.append(softmax(fc_numpy(model, arr.mean(axis=(0, 1)))))
    assert not all(np.allclose(a, b) for a, b in zip(probs, centre_only, strict=True))


def test_dense_matches_whole_image_scores_at_each_scale() -> None:
    model, data = ColourNet(K, seed=5), _dataset(seed=2)
    scales = (24, 32, 40)
    probs = []
    for img, _ in data:
        per_scale = [
            softmax(fc_numpy(model, hand_array(hand_resize(img, s)).mean(axis=(0, 1))))
            for s in scales
        ]
        probs.append(np.mean(per_scale, axis=0))
    labels = [y for _, y in data]
    protocol = get_protocol("dense", scales=scales)
    np.testing.assert_allclose(_scores(model, data, protocol), np.stack(probs), atol=1e-5)
    top1, top5, _ = _run(model, data, protocol)
    assert (top1, top5) == topk_counts(probs, labels)


def test_dense_equals_model_on_whole_image_for_resnext() -> None:
    model = resnext.create_model("resnext_tiny_in").eval()
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        dense = dense_logits(model, x)
        direct = model(x)
        score_map = class_score_map(model, x)
    assert score_map.shape == (2, model.num_classes, 2, 3)
    torch.testing.assert_close(dense, direct, atol=1e-5, rtol=1e-5)
    # The map is the classifier at each position: its (0, 0) entry is fc of that feature vector.
    with torch.no_grad():
        feats = model.forward_features(x)
        first = model.fc(feats[:, :, 0, 0])
    torch.testing.assert_close(score_map[:, :, 0, 0], first, atol=1e-5, rtol=1e-5)


def test_dense_single_scale_on_square_equals_center_protocol() -> None:
    model = ColourNet(K, seed=7)
    data = [(img.resize((28, 28)), y) for img, y in _dataset(6, seed=3)]
    a = evaluate(model, data, get_protocol("dense", scales=(28,)), NORM, num_classes=K)
    b = evaluate(model, data, get_protocol("center", resize=28, crop=28), NORM, num_classes=K)
    assert torch.equal(a.counter.confusion, b.counter.confusion)


def test_center_on_resnext_tiny_matches_direct_forward() -> None:
    model = resnext.create_model("resnext_tiny").eval()
    data = [(img.resize((32, 32)), y) for img, y in _dataset(6, seed=4)]
    result = evaluate(model, data, get_protocol("center", resize=32, crop=32), NORM, num_classes=10)
    x = torch.stack(
        [torch.from_numpy(hand_array(img).astype(np.float32)).permute(2, 0, 1) for img, _ in data]
    )
    with torch.no_grad():
        pred = model(x).argmax(1)
    expected = sum(int(p == y) for p, (_, y) in zip(pred.tolist(), data, strict=True))
    assert int(result.counter.hits[0]) == expected


def test_named_protocols_follow_the_paper() -> None:
    assert (get_protocol("center").resize, get_protocol("center").crop) == (256, 224)
    assert (get_protocol("center320").resize, get_protocol("center320").crop) == (320, 320)
    assert get_protocol("dense").scales == (224, 256, 384, 480, 640)
    assert get_protocol("tencrop").views_per_image == 10


@pytest.mark.parametrize(
    "kwargs",
    [{"name": "nope"}, {"name": "center", "crop": 300}, {"name": "center", "interpolation": "x"}],
)
def test_bad_protocol_settings_are_config_errors(kwargs: dict) -> None:
    with pytest.raises(ConfigError):
        get_protocol(**kwargs)


def test_tencrop_logit_average_like_fb_resnet_torch() -> None:
    model, data = LeftHalfNet(K, seed=13), _dataset(5, seed=6)
    expected = []
    for img, _ in data:
        arr = hand_array(hand_resize(img, 30))
        h, w = arr.shape[:2]
        boxes = [(-(-(w - 20) // 2), -(-(h - 20) // 2)), (0, 0), (w - 20, 0), (0, h - 20)]
        boxes.append((w - 20, h - 20))
        logits = []
        for left, top in boxes:
            crop = arr[top : top + 20, left : left + 20]
            for view in (crop, crop[:, ::-1]):
                logits.append(fc_numpy(model, view[:, :10].mean(axis=(0, 1))))
        expected.append(softmax(np.mean(logits, axis=0)))  # sum of outputs, then normalised
    protocol = get_protocol("tencrop", resize=30, crop=20, average="logits")
    np.testing.assert_allclose(_scores(model, data, protocol), np.stack(expected), atol=1e-5)
    softmax_mean = _scores(model, data, get_protocol("tencrop", resize=30, crop=20))
    assert not np.allclose(softmax_mean, np.stack(expected), atol=1e-4)


def test_dense_keeps_the_logit_scale_of_the_network() -> None:
    # A scale other than 1 multiplies the classifier's output in the network's own forward:
    # dense testing at one scale on the whole image must give the very same scores.
    torch.manual_seed(0)
    model = resnext.create_model("resnext_tiny_in", num_classes=K, logit_scale=0.25).eval()
    assert model.spec.logit_scale == 0.25
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        direct = model(x)
        unscaled = model.fc(model.forward_features(x).mean(dim=(2, 3)))
        dense = dense_logits(model, x)
        probs = Scorer(model, get_protocol("dense", scales=(64,)))(
            [(x[0],), (x[1],)], torch.device("cpu")
        )
    torch.testing.assert_close(direct, unscaled * 0.25, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(dense, direct, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(probs, torch.softmax(direct, dim=1), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize(
    ("mean", "std"),
    [
        ([0.5, 0.5], [0.2, 0.2, 0.2]),
        ([0.5, 0.5, 0.5, 0.5], [0.2, 0.2, 0.2]),
        ([0.5, 0.5, 0.5], [0.2, 0.0, 0.2]),
        ([0.5, float("inf"), 0.5], [0.2, 0.2, 0.2]),
    ],
)
def test_normalization_needs_three_finite_means_and_positive_stds(mean: list, std: list) -> None:
    with pytest.raises(ConfigError, match="expected 3"):
        Normalization(mean, std)
