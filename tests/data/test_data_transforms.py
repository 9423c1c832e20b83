"""Transforms: crop/flip statistics, hand-computed eval crops, lighting, jitter, ten-crop."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
from PIL import Image

from resnext.data.presets import cifar_train, imagenet_eval, imagenet_train
from resnext.data.transforms import (
    CenterCrop,
    ColorJitter,
    Lighting,
    RandomCrop,
    RandomHorizontalFlip,
    RandomResizedCrop,
    Resize,
    TenCrop,
)
from resnext.errors import ConfigError

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _image(h: int, w: int, seed: int = 0) -> tuple[Image.Image, np.ndarray]:
    arr = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    return Image.fromarray(arr), arr


def test_random_resized_crop_statistics() -> None:
    rrc = RandomResizedCrop(224, generator=torch.Generator().manual_seed(1))
    width, height = 400, 400  # square: rejections of too-big crops do not bias the aspect
    areas, log_aspects = [], []
    for _ in range(3000):
        left, top, w, h = rrc.get_params(width, height)
        assert left >= 0 and left + w <= width and top >= 0 and top + h <= height
        areas.append(w * h / (width * height))
        log_aspects.append(math.log(w / h))
    areas, log_aspects = np.array(areas), np.array(log_aspects)
    # Rounding w and h to pixels moves the area by < 1 %; bounds 8-100 % and 3/4-4/3.
    assert areas.min() >= 0.08 * 0.98 and areas.max() <= 1.0
    assert areas.min() < 0.1 and areas.max() > 0.9
    assert np.abs(log_aspects).max() <= math.log(4 / 3) + 0.02
    # log-uniform aspect: symmetric in log space, and spread like U(-0.288, 0.288) (sd 0.166).
    assert abs(log_aspects.mean()) < 0.02
    assert 0.12 < log_aspects.std() < 0.18


def test_random_resized_crop_fallback_is_centre_square() -> None:
    rrc = RandomResizedCrop(8, generator=torch.Generator().manual_seed(0))
    # A 1000x10 strip: even 8 % of its area at aspect 4/3 is 24 px tall, so all 10 tries fail.
    assert rrc.get_params(1000, 10) == (495, 0, 10, 10)
    img, arr = _image(10, 1000)
    out = np.asarray(RandomResizedCrop(10, interpolation="nearest")(img))
    np.testing.assert_array_equal(out, arr[:, 495:505])


def test_flip_probability() -> None:
    flip = RandomHorizontalFlip(0.5, generator=torch.Generator().manual_seed(3))
    x = torch.arange(4.0).view(1, 1, 4)
    flips = sum(bool(flip(x)[0, 0, 0] == 3) for _ in range(4000))
    assert abs(flips - 2000) < 5 * math.sqrt(4000 * 0.25)  # binomial, 5 standard deviations
    never = RandomHorizontalFlip(0.0)
    assert all(torch.equal(never(x), x) for _ in range(50))


def test_eval_is_hand_computed_centre_crop() -> None:
    img, arr = _image(256, 300)  # shorter side already 256: resize is the identity
    out = imagenet_eval(224, 256)(img)
    # Centre crop: (300-224)/2 = 38 columns, (256-224)/2 = 16 rows on each side.
    crop = arr[16:240, 38:262].astype(np.float64) / 255
    expected = (crop - np.array(MEAN)) / np.array(STD)
    assert out.shape == (3, 224, 224)
    np.testing.assert_allclose(out.permute(1, 2, 0).numpy(), expected, atol=1e-5)


def test_resize_shorter_side_and_options() -> None:
    img, _ = _image(512, 600)
    assert Resize(256)(img).size == (300, 256)  # 600 * 256 / 512 = 300
    assert Resize(256, "bicubic")(img.rotate(90, expand=True)).size == (256, 300)
    raw = Resize(256, "bilinear", antialias=False)(img)
    assert isinstance(raw, torch.Tensor) and raw.shape == (3, 256, 300)
    ten = imagenet_eval(224, 256, interpolation="nearest", antialias=False)(img)
    assert ten.shape == (3, 224, 224)
    with pytest.raises(ConfigError, match="interpolation"):
        Resize(256, "lanczos-ish")


def test_lighting_uses_the_eigen_decomposition() -> None:
    # fb.resnet.torch datasets/imagenet.lua PCA values, written out here independently.
    eigval = [0.2175, 0.0188, 0.0045]
    eigvec = [[-0.5675, 0.7192, 0.4009], [-0.5808, -0.0045, -0.8140], [-0.5836, -0.6948, 0.4203]]
    out = Lighting(0.1, generator=torch.Generator().manual_seed(7))(torch.zeros(3, 2, 2))
    alpha = (torch.randn(3, generator=torch.Generator().manual_seed(7)) * 0.1).tolist()
    for c in range(3):
        shift = sum(eigvec[c][j] * alpha[j] * eigval[j] for j in range(3))
        assert torch.allclose(out[c], torch.full((2, 2), shift), atol=1e-6)
    custom = Lighting(1.0, eigval=[1, 0, 0], eigvec=[[1, 0, 0], [0, 1, 0], [0, 0, 1]])
    shifted = custom(torch.zeros(3, 1, 1)).flatten()
    assert shifted[1] == 0 and shifted[2] == 0 and shifted[0] != 0


@pytest.mark.parametrize("strength", [1.0, 1.5, -0.1])
def test_color_jitter_strengths_are_those_batch_pipeline_takes(strength: float) -> None:
    # at strength 1 the blend weight 1 + U(-1, 1) reaches 0 (a black image), beyond it goes
    # negative (an inverted one): both paths refuse what the batch pipeline refused
    from resnext.data.batch_ops import BatchPipeline

    for position in range(3):
        strengths = [0.4, 0.4, 0.4]
        strengths[position] = strength
        with pytest.raises(ConfigError, match=r"expected a strength in \[0, 1\)"):
            ColorJitter(*strengths)
    with pytest.raises(ConfigError, match=r"expected a strength in \[0, 1\)"):
        BatchPipeline(MEAN, STD, jitter=strength)
    ColorJitter(0.0, 0.99, 0.4)  # the ends it takes


def test_color_jitter_blends() -> None:
    gen = torch.Generator().manual_seed(0)
    grey = torch.full((3, 4, 4), 0.5)
    bright = ColorJitter(0.4, 0, 0, generator=gen)
    scales = [float(bright(grey)[0, 0, 0] / 0.5) for _ in range(500)]
    assert 0.6 <= min(scales) < 0.65 and 1.35 < max(scales) <= 1.4
    assert torch.allclose(ColorJitter(0, 0, 0.4, generator=gen)(grey), grey)  # grey stays grey
    x = torch.rand(3, 5, 5, generator=gen)
    luma_mean = float((0.299 * x[0] + 0.587 * x[1] + 0.114 * x[2]).mean())
    out = ColorJitter(0, 0.4, 0, generator=gen)(x)
    ratio = (out - luma_mean) / (x - luma_mean)  # one contrast factor for every pixel
    assert torch.allclose(ratio, ratio.flatten()[0].expand_as(ratio), atol=1e-4)


def test_ten_crop_order_and_content() -> None:
    x = torch.arange(3 * 4 * 5, dtype=torch.float32).view(3, 4, 5)
    crops = TenCrop(3)(x)
    assert crops.shape == (10, 3, 3, 3)
    a = x.numpy()
    m = a[:, :, ::-1]
    expected = [
        a[:, 1:4, 1:4], a[:, :3, :3], a[:, :3, 2:], a[:, 1:, :3], a[:, 1:, 2:],
        m[:, 1:4, 1:4], m[:, :3, :3], m[:, :3, 2:], m[:, 1:, :3], m[:, 1:, 2:],
    ]  # fmt: skip
    for got, want in zip(crops.numpy(), expected, strict=True):
        np.testing.assert_array_equal(got, want)
    img, _ = _image(300, 260)
    assert imagenet_eval(224, 256, ten_crop=True)(img).shape == (10, 3, 224, 224)


def test_random_crop_padding_and_offsets() -> None:
    crop = RandomCrop(32, padding=4, generator=torch.Generator().manual_seed(0))
    x = torch.ones(3, 32, 32)
    zero_cols = set()
    for _ in range(400):
        out = crop(x)
        assert out.shape == (3, 32, 32)
        zero_cols.add(int((out[0, 16] == 0).sum()))
    assert zero_cols == set(range(5))  # 0..4 zero columns: offsets cover the full padding


def test_pipelines_are_deterministic_given_a_generator() -> None:
    img, _ = _image(120, 160)
    outs = [imagenet_train(64, generator=torch.Generator().manual_seed(9))(img) for _ in range(2)]
    assert outs[0].shape == (3, 64, 64) and torch.equal(outs[0], outs[1])
    np_outs = [imagenet_train(64, generator=np.random.default_rng(4))(img) for _ in range(2)]
    assert torch.equal(np_outs[0], np_outs[1]) and not torch.equal(np_outs[0], outs[0])
    small, _ = _image(32, 32)
    c = cifar_train(MEAN, STD, generator=torch.Generator().manual_seed(1))(small)
    assert c.shape == (3, 32, 32)


def test_draft_size_keeps_the_smallest_crop_resolution() -> None:
    rrc = RandomResizedCrop(224, generator=torch.Generator().manual_seed(2))
    assert rrc.draft_size(500, 375) is None  # a typical ImageNet image: no reduction allowed
    w, h = rrc.draft_size(4000, 3000)
    assert w < 4000 and h < 3000
    sides = [min(rrc.get_params(w, h)[2:]) for _ in range(3000)]
    assert min(sides) >= 223  # even the smallest possible crop still has ~224 source pixels


@pytest.mark.parametrize("ratio", [(0.25, 1.0), (1.0, 4.0)])
def test_draft_size_with_a_ratio_range_not_symmetric_about_1(ratio: tuple[float, float]) -> None:
    # The smallest side is that of the smallest area at the most extreme aspect, 1/4 either way:
    # sqrt(0.08 * 4000 * 3000 / 4) = sqrt(240000) = 489.9 px, so the draft may shrink the image
    # by 224 / 489.9 = 0.4572 at most: 4000 x 3000 -> 1828.95 x 1371.71, rounded up. (Only the
    # ratio's top was used: for (0.25, 1) that allowed 0.2286, a quarter of the crops < 224 px.)
    rrc = RandomResizedCrop(224, ratio=ratio, generator=torch.Generator().manual_seed(3))
    assert rrc.draft_size(4000, 3000) == (1829, 1372)
    sides = [min(rrc.get_params(1829, 1372)[2:]) for _ in range(3000)]
    assert min(sides) >= 223


@pytest.mark.parametrize(
    "make, expected",
    [
        (lambda: imagenet_eval(size=0), "CenterCrop size: expected an int >= 1"),
        (lambda: imagenet_eval(size=224, ten_crop=True, resize=0), "Resize size"),
        (lambda: imagenet_eval(size=-3, ten_crop=True), "TenCrop size"),
        (lambda: imagenet_train(size=-1), "RandomResizedCrop size: expected an int >= 1"),
        (lambda: CenterCrop(0), "CenterCrop size"),
        (lambda: CenterCrop((32, 0)), "CenterCrop size"),
        (lambda: CenterCrop(2.5), "CenterCrop size"),
        (lambda: Resize(0), "Resize size: expected an int >= 1"),
        (lambda: RandomCrop(0), "RandomCrop size"),
        (lambda: RandomCrop(32, padding=-1), "RandomCrop padding: expected an int >= 0, got -1"),
        (lambda: imagenet_train(interpolation="foo"), "interpolation 'foo' is not one of"),
    ],
)
def test_bad_sizes_padding_and_filters_are_config_errors_when_made(make, expected: str) -> None:
    # A size of 0 gave an empty image with no error; -1 PIL's ValueError at the first image.
    with pytest.raises(ConfigError, match=re.escape(expected)):
        make()


def test_sizes_from_1_and_padding_from_0_are_taken() -> None:
    img, _ = _image(40, 50)
    assert CenterCrop(1)(img).size == (1, 1) and CenterCrop((3, 2))(img).size == (3, 2)
    assert CenterCrop(np.int64(4))(img).size == (4, 4)
    assert RandomCrop(8, padding=0)(img).size == (8, 8)


def test_imagenet_train_draws_crops_as_fb_resnet_torch() -> None:
    # fb.resnet.torch's RandomSizedCrop, in its own draw order: area = uniform(0.08, 1) * image
    # area; aspect = uniform(3/4, 4/3); w, h = round(sqrt(area * aspect)), round(sqrt(area /
    # aspect)); swapped if uniform() < 0.5; then the corner. The paper: "implemented by [11]".
    import math

    preset = imagenet_train(64, generator=torch.Generator().manual_seed(11))
    crop = preset.transforms[0]
    lua = torch.Generator().manual_seed(11)

    def draw(lo: float, hi: float) -> float:
        return lo + (hi - lo) * float(torch.rand((), generator=lua, dtype=torch.float64))

    width, height = 500, 375
    for _ in range(200):
        found = False
        for _try in range(10):  # fb tries 10 times, then takes the centred square
            area = draw(0.08, 1.0) * width * height
            aspect = draw(3 / 4, 4 / 3)
            w, h = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
            if draw(0.0, 1.0) < 0.5:
                w, h = h, w
            found = w <= width and h <= height
            if found:
                break
        if not found:
            w = h = height
        assert crop.get_params(width, height)[2:] == (w, h)
        if found:  # the corner takes two more draws from the same stream
            torch.randint(0, width - w + 1, (), generator=lua)
            torch.randint(0, height - h + 1, (), generator=lua)


def test_swapped_aspect_draws_stay_inside_a_range_not_closed_under_inversion() -> None:
    # ratio (1, 2): a swap would give crops of 1/2..1 (taller than wide), outside what was asked
    crop = RandomResizedCrop(
        32,
        ratio=(1.0, 2.0),
        aspect_sampling="uniform-swap",
        generator=torch.Generator().manual_seed(1),
    )
    for _ in range(300):
        _, _, w, h = crop.get_params(4000, 4000)  # large enough that rounding stays small
        assert 1.0 - 0.01 <= w / h <= 2.0 + 0.01
