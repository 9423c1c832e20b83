"""TrivialAugment for CIFAR training and shifted test-time views."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from resnext.config import load_config
from resnext.data import default_transforms
from resnext.data.trivial_augment import WIDE_SPACE, TrivialAugment, magnitude
from resnext.errors import ConfigError
from resnext.train.evaluate import evaluate, shifted, tta_views


def _image(seed: int = 0, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    shape = (32, 32, 3) if mode == "RGB" else (32, 32)
    return Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode)


@pytest.mark.parametrize("name", sorted(set(WIDE_SPACE) - {"autocontrast", "equalize", "solarize"}))
def test_every_operation_is_the_identity_at_magnitude_bin_zero(name):
    # In the paper's space bin 0 is "no change" for every operation that has a magnitude (but
    # torchvision's solarize, which inverts pure white there: below).
    op, *_ = WIDE_SPACE[name]
    img = _image(1)
    assert np.array_equal(np.asarray(op(img, magnitude(name, 0))), np.asarray(img))


def test_posterize_and_solarize_bins_are_torchvisions():
    # torchvision's TrivialAugmentWide: posterize keeps 8 - round(bin / 5) bits, solarize inverts
    # the values >= 255 - 8.5 * bin. Worked out by hand: bits 8 for bins 0-2 (0, 0.2, 0.4 round
    # to 0), then 7 from bin 3 (0.6) to 7 (1.4), ..., 2 for bins 28-30 (5.6, 5.8, 6).
    bits = [8] * 3 + [7] * 5 + [6] * 5 + [5] * 5 + [4] * 5 + [3] * 5 + [2] * 3
    ramp = Image.fromarray(np.arange(256, dtype=np.uint8).reshape(16, 16), "L")
    posterize, *_ = WIDE_SPACE["posterize"]
    kept = [
        np.unique(np.asarray(posterize(ramp, magnitude("posterize", b)))).size for b in range(31)
    ]
    assert kept == [2**n for n in bits]
    # the smallest inverted value: 255 - 8.5 * bin rounded up (bin 1: 246.5 -> 247)
    first_inverted = {0: 255, 1: 247, 2: 238, 3: 230, 15: 128, 29: 9, 30: 0}
    solarize, *_ = WIDE_SPACE["solarize"]
    for b, first in first_inverted.items():
        out = np.asarray(solarize(ramp, magnitude("solarize", b))).ravel()
        assert out.tolist() == [v if v < first else 255 - v for v in range(256)], b


def test_translate_moves_the_content_by_whole_pixels_and_fills_grey():
    img = _image(2)
    op, *_ = WIDE_SPACE["translate_x"]
    out = np.asarray(op(img, 5.0)).astype(int)
    src = np.asarray(img).astype(int)
    # An affine offset of +5 samples the input 5 pixels to the right: content moves left.
    assert np.array_equal(out[:, :27], src[:, 5:])
    assert (out[:, 27:] == 128).all()


def test_strongest_solarize_and_posterize_by_hand():
    img = Image.fromarray(np.array([[0, 100, 200, 255]], dtype=np.uint8), "L")
    solarize, *_ = WIDE_SPACE["solarize"]
    posterize, *_ = WIDE_SPACE["posterize"]
    assert np.asarray(solarize(img, 0.0)).tolist() == [[255, 155, 55, 0]]
    # Two bits keep the top two: 100 = 0b01100100 -> 64, 200 = 0b11001000 -> 192.
    assert np.asarray(posterize(img, 2.0)).tolist() == [[0, 64, 192, 192]]


def test_trivial_augment_is_reproducible_and_uses_every_operation():
    img = _image(3)
    a = [np.asarray(TrivialAugment(torch.Generator().manual_seed(7))(img)) for _ in range(2)]
    assert np.array_equal(a[0], a[1])
    gen = torch.Generator().manual_seed(0)
    aug = TrivialAugment(gen)
    changed = 0
    for _ in range(300):
        out = aug(img)
        assert out.size == img.size and out.mode == "RGB"
        changed += not np.array_equal(np.asarray(out), np.asarray(img))
    # Identity and bin 0 leave the image alone: about 1/14 + 13/14 * 1/31 of the draws (~10 %).
    assert 220 < changed < 295
    assert aug(_image(4, "L")).mode == "L"


def test_trivial_augment_refuses_what_is_not_an_8_bit_image():
    with pytest.raises(TypeError, match="RGB or L PIL image, got Tensor"):
        TrivialAugment()(torch.zeros(3, 32, 32))
    with pytest.raises(TypeError, match="mode F"):
        TrivialAugment()(Image.new("F", (4, 4)))


def test_cifar_pipeline_with_trivial_augment_gives_normalised_tensors():
    pipe = default_transforms("cifar10", "train", trivial_augment=True, cutout=8)
    assert isinstance(pipe.transforms[0], TrivialAugment)
    out = pipe(_image(5))
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32


def test_shifted_views_by_hand():
    x = torch.arange(9.0).view(1, 1, 3, 3)
    assert shifted(x, 1, 1)[0, 0].tolist() == [[0, 0, 0], [0, 0, 1], [0, 3, 4]]
    assert shifted(x, -1, -1)[0, 0].tolist() == [[4, 5, 0], [7, 8, 0], [0, 0, 0]]
    views = tta_views(x, flip=True, shift=1)
    assert len(views) == 6 and torch.equal(views[0], x) and torch.equal(views[1], x.flip(3))
    assert len(tta_views(x, flip=False, shift=0)) == 1


class _CornerPixel(nn.Module):
    """Class 0's logit is the top-left pixel of the first channel; class 1's is 0."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        corner = x[:, 0, 0, 0]
        return torch.stack([corner, torch.zeros_like(corner)], 1)


def test_shift_evaluation_averages_the_three_views():
    x = torch.full((2, 1, 4, 4), 3.0)
    y = torch.tensor([0, 1])
    loader = DataLoader(TensorDataset(x, y), batch_size=2)
    out = evaluate(_CornerPixel(), loader, torch.device("cpu"), shift=1)
    # By hand: the views' corner pixels are 3, 0 (padding moved in) and 3, so the class-0
    # probability averages s(3), 1/2 and s(3) with s the two-class softmax of (d, 0).
    s3 = 1 / (1 + math.exp(-3))
    p0 = (2 * s3 + 0.5) / 3
    expected = -(math.log(p0) + math.log(1 - p0)) / 2
    assert out["val_loss"] == pytest.approx(expected, abs=1e-5)
    with pytest.raises(ValueError, match="shift"):
        evaluate(_CornerPixel(), loader, torch.device("cpu"), shift=-1)


def test_augment_and_shift_options_in_the_config(tmp_path):
    cfg = load_config(
        "cifar10_mini_cpu",
        [f"data.root={tmp_path}", "data.trivial_augment=true", "train.eval_shift=2"],
    )
    assert cfg.data.trivial_augment is True and cfg.train.eval_shift == 2
    with pytest.raises(ConfigError, match=r"train\.eval_shift"):
        load_config("cifar10_mini_cpu", [f"data.root={tmp_path}", "train.eval_shift=-2"])
    with pytest.raises(ConfigError, match=r"data\.trivial_augment"):
        load_config("cifar10_mini_cpu", [f"data.root={tmp_path}", "data.trivial_augment=maybe"])
    # Image folders and digits have no such step: a request for one is refused, not ignored.
    folder = [f"data.root={tmp_path}", "data.kind=imagefolder", "data.cutout=0"]
    for extra in ("data.trivial_augment=true", "data.cutout=8"):
        with pytest.raises(ConfigError, match=r"CIFAR training pipeline.*data\.kind='imagefolder'"):
            load_config("cifar10_mini_cpu", [*folder, extra])
    with pytest.raises(ConfigError, match=r"data\.cutout.*'digits'"):
        load_config("digits_demo", ["data.cutout=4"])


def test_eval_every_validates_every_nth_epoch_and_the_last(tmp_path, tiny_cfg, tiny_data):
    from resnext.train import train
    from resnext.train.logs import read_metrics

    cfg = tiny_cfg(tmp_path / "run", train={"epochs": 5, "eval_every": 2})
    result = train(cfg, train_set=tiny_data(64), val_set=tiny_data(40, seed=2))
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [("val_top1_err" in r) for r in records] == [False, True, False, True, True]
    assert result.best_epoch in (2, 4, 5) and "val_top1_err" in result.final
    assert (tmp_path / "run" / "curves.png").is_file()
    with pytest.raises(ConfigError, match=r"train\.eval_every"):
        tiny_cfg(tmp_path / "bad", train={"eval_every": 0})
