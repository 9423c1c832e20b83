"""The planned uint8 path: same crops as the standard transforms, reduced-scale decode, batch colour ops."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, JpegImagePlugin

from resnext.data import (
    ColorJitter,
    ImageFolderDataset,
    RandomHorizontalFlip,
    RandomResizedCrop,
    jpeg_crop,
)
from resnext.data import functional as TF
from resnext.data.batch_ops import BatchPipeline
from resnext.data.planned import PlannedCenterCrop, PlannedRandomResizedCrop, load_planned
from resnext.data.transforms import IMAGENET_EIGVAL, IMAGENET_EIGVEC
from resnext.errors import ConfigError, DataError


def _photo(width: int, height: int, seed: int = 0) -> Image.Image:
    """A smooth colour image with some texture (JPEG-friendly, so reduced decodes stay close)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    r = 127 + 100 * np.sin(xx / 37.0) * np.cos(yy / 53.0)
    g = 127 + 100 * np.cos((xx + yy) / 71.0)
    b = 127 + 60 * np.sin(yy / 29.0) + rng.normal(0, 3, (height, width))
    return Image.fromarray(np.clip(np.stack([r, g, b], -1), 0, 255).astype(np.uint8))


def _as_uint8(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(img, dtype=np.uint8))


def test_planned_crop_matches_the_standard_crop_and_flip() -> None:
    img = _photo(300, 200)
    planned = PlannedRandomResizedCrop(64, generator=torch.Generator().manual_seed(7))
    crop = RandomResizedCrop(
        64, aspect_sampling="uniform-swap", generator=torch.Generator().manual_seed(7)
    )
    flip = RandomHorizontalFlip(0.5, generator=crop.generator)  # same stream, same draw order
    for _ in range(20):
        ours = planned(img).float()
        standard = _as_uint8(flip(crop(img))).float()
        assert ours.shape == (64, 64, 3)
        # One-pass resampling from the uncropped image only differs at the crop's border.
        assert (ours - standard)[4:-4, 4:-4].abs().mean() < 1.0


def test_planned_crop_flips_like_the_standard_pipeline() -> None:
    gen_a, gen_b = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    planned = PlannedRandomResizedCrop(48, generator=gen_a)
    plans = [planned.plan(160, 120) for _ in range(200)]
    crop = RandomResizedCrop(48, aspect_sampling="uniform-swap", generator=gen_b)
    for plan in plans:
        left, top, w, h = crop.get_params(160, 120)
        flip = float(torch.rand((), generator=gen_b, dtype=torch.float64)) < 0.5
        assert plan.box == (left, top, left + w, top + h) and plan.flip == flip
    assert 60 < sum(p.flip for p in plans) < 140


needs_simplejpeg = pytest.mark.skipif(
    importlib.util.find_spec("simplejpeg") is None, reason="simplejpeg is not installed"
)
_CROP_REASON = jpeg_crop.unavailable_reason()
needs_crop = pytest.mark.skipif(
    _CROP_REASON is not None, reason=f"crop decoder unavailable: {_CROP_REASON}"
)
DECODERS = [
    "pillow",
    pytest.param("simplejpeg", marks=needs_simplejpeg),
    pytest.param("crop", marks=needs_crop),
]


def _spy_on_reduced_decodes(decoder: str, monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """Record the (w, h) each decode of `decoder` is asked to cover."""
    asked: list[tuple[int, int]] = []
    if decoder == "pillow":
        original = JpegImagePlugin.JpegImageFile.draft

        def draft(self, mode, size):  # type: ignore[no-untyped-def]
            asked.append(size)
            return original(self, mode, size)

        monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", draft)
    elif decoder == "crop":
        original_region = jpeg_crop.decode_region

        def region(data, denom, x0, y0, w, h, out=None, at=None):  # type: ignore[no-untyped-def]
            if denom > 1:
                asked.append((out.shape[1], out.shape[0]))
            return original_region(data, denom, x0, y0, w, h, out, at)

        monkeypatch.setattr(jpeg_crop, "decode_region", region)
    else:
        import simplejpeg

        original_decode = simplejpeg.decode_jpeg

        def decode(data, colorspace, **kwargs):  # type: ignore[no-untyped-def]
            if kwargs.get("min_width", 0) > 0:
                asked.append((kwargs["min_width"], kwargs["min_height"]))
            return original_decode(data, colorspace, **kwargs)

        monkeypatch.setattr(simplejpeg, "decode_jpeg", decode)
    return asked


@pytest.mark.parametrize("decoder", DECODERS)
def test_reduced_decode_is_used_and_close_to_full_decode(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, decoder: str
) -> None:
    path = tmp_path / "big.jpg"
    _photo(1600, 1200).save(path, quality=92)
    reduced = PlannedRandomResizedCrop(
        64, scale=(0.5, 1.0), generator=torch.Generator().manual_seed(1)
    )
    full = PlannedRandomResizedCrop(
        64, scale=(0.5, 1.0), generator=torch.Generator().manual_seed(1)
    )
    expected = [load_planned(path, full, use_draft=False, decoder="pillow") for _ in range(5)]
    asked = _spy_on_reduced_decodes(decoder, monkeypatch)
    for want in expected:
        got = load_planned(path, reduced, decoder=decoder)
        assert (got.float() - want.float()).abs().mean() < 3.0
    # Crops with >= 800 px sides into 64 px outputs allow 1/8-scale decodes: every call asked.
    assert len(asked) == 5 and all(w <= 1600 / 2 for w, _ in asked)


@needs_simplejpeg
def test_simplejpeg_and_pillow_decode_alike_and_fall_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _photo(200, 150).save(tmp_path / "a.jpg", quality=90)
    _photo(200, 150).convert("CMYK").save(tmp_path / "cmyk.jpg", quality=90)
    _photo(200, 150).save(tmp_path / "b.png")
    for name in ("a.jpg", "cmyk.jpg", "b.png"):
        outs = [
            load_planned(
                tmp_path / name,
                PlannedCenterCrop(96, 110),
                decoder=decoder,
            ).float()
            for decoder in ("pillow", "simplejpeg")
        ]
        assert outs[0].shape == (96, 96, 3)
        assert (outs[0] - outs[1]).abs().mean() < 1.0, name
    with pytest.raises(DataError, match="not-there"):
        load_planned(tmp_path / "not-there.jpg", PlannedCenterCrop(8, 8), decoder="simplejpeg")
    (tmp_path / "cut.jpg").write_bytes((tmp_path / "a.jpg").read_bytes()[:400])
    with pytest.raises(DataError, match=r"cut\.jpg"):
        load_planned(tmp_path / "cut.jpg", PlannedCenterCrop(8, 8), decoder="simplejpeg")


@pytest.mark.parametrize("decoder", DECODERS)
def test_images_over_the_pixel_limit_are_refused_before_decoding(
    tmp_path: Path, decoder: str
) -> None:
    _photo(200, 150).save(tmp_path / "big.jpg", quality=90)
    with pytest.raises(DataError, match=r"200x150 = 30000 pixels exceeds the decompression-bomb"):
        load_planned(
            tmp_path / "big.jpg", PlannedCenterCrop(8, 8), max_pixels=29_999, decoder=decoder
        )
    assert load_planned(tmp_path / "big.jpg", PlannedCenterCrop(8, 8), max_pixels=30_000).shape == (
        8,
        8,
        3,
    )


def test_unknown_or_missing_decoder_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(
        ConfigError, match="decoder: expected one of auto, pillow, simplejpeg, crop"
    ):
        load_planned("x.jpg", PlannedCenterCrop(8, 8), decoder="turbo")
    monkeypatch.setattr("resnext.data.planned._simplejpeg", lambda: None)
    with pytest.raises(ConfigError, match="pip install simplejpeg"):
        load_planned("x.jpg", PlannedCenterCrop(8, 8), decoder="simplejpeg")


def test_draft_never_drops_below_the_output_resolution() -> None:
    planned = PlannedRandomResizedCrop(224, generator=torch.Generator().manual_seed(0))
    for _ in range(500):
        plan = planned.plan(2000, 1500)
        if plan.draft is None:
            continue
        # Pillow decodes at the largest 1/2^k scale whose size covers the request.
        scale = max(2000 / plan.draft[0], 1500 / plan.draft[1])
        left, top, right, bottom = plan.box
        assert (right - left) / scale >= 224 - 1e-6 and (bottom - top) / scale >= 224 - 1e-6


def test_planned_center_crop_matches_resize_then_crop() -> None:
    img = _photo(333, 250)
    ours = PlannedCenterCrop(224, 256)(img).float()
    resized = TF.resize(img, TF.shorter_side_size(333, 250, 256), "bilinear")
    standard = _as_uint8(TF.center_crop(resized, (224, 224))).float()
    assert ours.shape == standard.shape == (224, 224, 3)
    assert (ours - standard)[2:-2, 2:-2].abs().mean() < 1.0


def test_folder_dataset_yields_uint8_and_still_skips_bad_files(tmp_path: Path) -> None:
    for cls in ("a", "b"):
        (tmp_path / cls).mkdir()
        _photo(120, 90, seed=1).save(tmp_path / cls / "good.jpg")
        _photo(90, 120, seed=2).convert("L").save(tmp_path / cls / "grey.png")
    (tmp_path / "b" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    ds = ImageFolderDataset(tmp_path, PlannedRandomResizedCrop(32))
    outs = [ds[i] for i in range(len(ds))]
    assert all(x.dtype == torch.uint8 and x.shape == (32, 32, 3) for x, _ in outs)
    assert list(ds.bad_files) == [str(tmp_path / "b" / "broken.jpg")]


@pytest.fixture(params=["C kernel", "torch"])
def batch_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Runs a batch-stage test through the C colour map and through the torch path."""
    from resnext.data import batch_ops, colour_affine

    if request.param == "torch":
        monkeypatch.setattr(batch_ops, "_use_kernel", lambda _batch: False)
    elif colour_affine.unavailable_reason() is not None:
        pytest.skip(f"C colour map unavailable: {colour_affine.unavailable_reason()}")
    return request.param


def test_batch_pipeline_normalises_by_hand(batch_path: str) -> None:
    batch = torch.randint(0, 256, (3, 5, 7, 3), dtype=torch.uint8)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    out = BatchPipeline(mean, std)(batch)
    expected = (batch.numpy().astype(np.float64) / 255.0 - np.array(mean)) / np.array(std)
    assert out.shape == (3, 3, 5, 7)
    assert np.allclose(out.permute(0, 2, 3, 1).numpy(), expected, atol=1e-5)


def test_batch_jitter_on_grey_images_is_brightness_only(batch_path: str) -> None:
    # For a grey image the saturation and contrast blends are identities (its grey image and its
    # mean are itself), so the output is v * alpha with alpha ~ U[0.6, 1.4] (fb.resnet.torch).
    v = 128
    batch = torch.full((4000, 2, 2, 3), v, dtype=torch.uint8)
    out = BatchPipeline((0.0, 0.0, 0.0), (1.0, 1.0, 1.0), jitter=0.4)(
        batch, generator=torch.Generator().manual_seed(0)
    )
    ratio = (out[:, 0, 0, 0] / (v / 255.0)).double()
    assert torch.allclose(out, out[:, :1, :1, :1].expand_as(out), atol=1e-6)
    assert ratio.min() >= 0.6 - 1e-6 and ratio.max() <= 1.4 + 1e-6
    assert abs(ratio.mean() - 1.0) < 0.01
    assert abs(ratio.std() - 0.8 / math.sqrt(12)) < 0.01


def test_batch_jitter_equals_the_per_image_transform_for_the_same_draws(
    monkeypatch: pytest.MonkeyPatch, batch_path: str
) -> None:
    batch = torch.randint(0, 256, (6, 9, 11, 3), dtype=torch.uint8)
    pipeline = BatchPipeline((0.0, 0.0, 0.0), (1.0, 1.0, 1.0), jitter=0.4)
    out = pipeline(batch, generator=torch.Generator().manual_seed(5))
    # Replay the pipeline's draws (alphas then orders) through the per-image ColorJitter.
    gen = torch.Generator().manual_seed(5)
    alphas = (0.6 + 0.8 * torch.rand(18, generator=gen)).view(3, 6)
    orders = torch.rand(6, 3, generator=gen).argsort(dim=1)
    for i in range(6):
        jitter = ColorJitter(0.4, 0.4, 0.4)
        draws = iter([float(alphas[int(k), i]) for k in orders[i]])
        monkeypatch.setattr(jitter, "_alpha", lambda _var, draws=draws: next(draws))
        monkeypatch.setattr(
            "resnext.data.transforms.permutation", lambda _g, _n, o=orders[i]: o.tolist()
        )
        expected = jitter(TF.to_tensor(batch[i].permute(2, 0, 1)))
        assert torch.allclose(out[i], expected, atol=1e-5)


def test_batch_lighting_has_the_pca_covariance(batch_path: str) -> None:
    n, std = 20000, 0.1
    batch = torch.zeros((n, 1, 1, 3), dtype=torch.uint8)
    out = BatchPipeline((0.0, 0.0, 0.0), (1.0, 1.0, 1.0), lighting_std=std)(
        batch, generator=torch.Generator().manual_seed(0)
    )
    shift = out[:, :, 0, 0].double()
    vec, val = torch.tensor(IMAGENET_EIGVEC).double(), torch.tensor(IMAGENET_EIGVAL).double()
    # AlexNet: shift = V (alpha * lambda), alpha ~ N(0, std^2) → covariance V diag(std λ)^2 V^T.
    expected = vec @ torch.diag((std * val) ** 2) @ vec.T
    assert torch.allclose(torch.cov(shift.T), expected, atol=2e-5)


@pytest.mark.parametrize(
    ("batch", "named"),
    [
        (torch.zeros((2, 4, 4, 3)), "uint8"),
        (torch.zeros((4, 4, 3), dtype=torch.uint8), "4-d"),
        (torch.zeros((2, 4, 4, 5), dtype=torch.uint8), "3 colour channels"),
    ],
)
def test_batch_pipeline_refuses_bad_batches(batch: torch.Tensor, named: str) -> None:
    with pytest.raises(ValueError, match=named):
        BatchPipeline((0.5,) * 3, (0.2,) * 3)(batch)
