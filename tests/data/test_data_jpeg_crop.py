"""Crop-region JPEG decoding: the region equals a full decode's, and the planned path is unchanged."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from data_helpers import JPEG_KINDS, jpeg_bytes, photo
from PIL import Image

from resnext.data import jpeg_crop, resample
from resnext.data.planned import PlannedCenterCrop, PlannedRandomResizedCrop, load_planned
from resnext.errors import ConfigError, DataError

REASON = jpeg_crop.unavailable_reason()
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"crop decoder unavailable: {REASON}")


KINDS = JPEG_KINDS


def _jpeg(tmp_path: Path, kind: str, size: tuple[int, int] = (203, 157)) -> Path:
    path = tmp_path / f"{kind}.jpg"
    path.write_bytes(jpeg_bytes(photo(*size), kind))
    return path


@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("denom", [1, 2, 4])
def test_region_equals_the_full_decode_inside_its_edges(
    tmp_path: Path, kind: str, denom: int
) -> None:
    data = _jpeg(tmp_path, kind).read_bytes()
    width, height, _ = jpeg_crop.read_header(data)
    assert (width, height) == (203, 157)
    sw, sh = -(-width // denom), -(-height // denom)
    full = jpeg_crop.decode_region(data, denom, 0, 0, sw, sh)
    # Pillow decodes with the same library settings: the whole image is the same (denom 1).
    if denom == 1:
        pil = np.asarray(Image.open(tmp_path / f"{kind}.jpg").convert("RGB"))
        assert np.array_equal(full, pil)
    rng = np.random.default_rng(denom)
    for _ in range(12):
        w, h = int(rng.integers(1, sw + 1)), int(rng.integers(1, sh + 1))
        x0, y0 = int(rng.integers(0, sw - w + 1)), int(rng.integers(0, sh - h + 1))
        region = jpeg_crop.decode_region(data, denom, x0, y0, w, h)
        # Columns at a region edge that is not the image's edge may differ (chroma upsampling).
        lo = 0 if x0 == 0 else 2
        hi = w if x0 + w == sw else w - 2
        if hi > lo:
            assert np.array_equal(region[:, lo:hi], full[y0 : y0 + h, x0 + lo : x0 + hi])


def _transforms(seed: int) -> list:
    return [
        PlannedRandomResizedCrop(64, generator=torch.Generator().manual_seed(seed)),
        PlannedRandomResizedCrop(
            32, scale=(0.3, 1.0), generator=torch.Generator().manual_seed(seed)
        ),
        PlannedCenterCrop(48, 56),
    ]


def _pillow_resampling_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """Route the crop path's resampling through Pillow (as where our resampler cannot build)."""
    monkeypatch.setattr(resample, "unavailable_reason", lambda: "disabled for this test")


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_crop_decoder_with_pillow_resampling_is_bit_identical(
    tmp_path: Path, kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    _pillow_resampling_only(monkeypatch)
    path = _jpeg(tmp_path, kind, size=(420, 330))
    for crop_t, pil_t in zip(_transforms(1), _transforms(1), strict=True):
        for _ in range(8):
            got = load_planned(path, crop_t, decoder="crop")
            want = load_planned(path, pil_t, decoder="pillow")
            assert torch.equal(got, want), (kind, crop_t)


def test_bit_identical_on_real_imagenet_jpegs(
    imagenet_sample: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _pillow_resampling_only(monkeypatch)
    files = sorted(imagenet_sample.glob("*.JPEG"))[:60]
    assert files
    for crop_t, pil_t in zip(_transforms(5), _transforms(5), strict=True):
        for f in files:
            assert torch.equal(
                load_planned(f, crop_t, decoder="crop"), load_planned(f, pil_t, decoder="pillow")
            ), f.name


def test_crop_path_with_our_resampler_differs_only_by_rounding(imagenet_sample: Path) -> None:
    if resample.unavailable_reason() is not None:
        pytest.skip(f"resampler unavailable: {resample.unavailable_reason()}")
    files = sorted(imagenet_sample.glob("*.JPEG"))[:60]
    for crop_t, pil_t in zip(_transforms(5), _transforms(5), strict=True):
        identical, far, values = 0, 0, 0
        for f in files:
            got = load_planned(f, crop_t, decoder="crop").int()
            diff = (got - load_planned(f, pil_t, decoder="pillow").int()).abs()
            identical += int(diff.max() == 0)
            far += int((diff > 2).sum())
            values += diff.numel()
        # The two passes' order is the only difference (each pass rounds to uint8).
        assert identical >= len(files) // 4, crop_t
        assert far / values < 1e-3, crop_t


def test_files_it_does_not_take_go_to_pillow(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _pillow_resampling_only(monkeypatch)
    photo(200, 150).convert("CMYK").save(tmp_path / "cmyk.jpg", quality=90)
    photo(200, 150).save(tmp_path / "b.png")
    good = _jpeg(tmp_path, "420").read_bytes()
    # Two stray bytes before the end marker: libjpeg warns, Pillow decodes; same result.
    (tmp_path / "stray.jpg").write_bytes(good[:-2] + b"\x00\x00" + good[-2:])
    for name in ("cmyk.jpg", "b.png", "stray.jpg"):
        t1, t2 = PlannedCenterCrop(96, 110), PlannedCenterCrop(96, 110)
        got = load_planned(tmp_path / name, t1, decoder="crop")
        assert torch.equal(got, load_planned(tmp_path / name, t2, decoder="pillow")), name


def test_corrupt_and_missing_files_are_data_errors(tmp_path: Path) -> None:
    good = _jpeg(tmp_path, "420").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(good[:500])
    with pytest.raises(DataError, match=r"cut\.jpg"):
        load_planned(tmp_path / "cut.jpg", PlannedCenterCrop(8, 8), decoder="crop")
    (tmp_path / "header.jpg").write_bytes(good[:30])
    with pytest.raises(DataError, match=r"header\.jpg"):
        load_planned(tmp_path / "header.jpg", PlannedCenterCrop(8, 8), decoder="crop")
    with pytest.raises(DataError, match="not-there"):
        load_planned(tmp_path / "not-there.jpg", PlannedCenterCrop(8, 8), decoder="crop")


def test_bad_regions_and_arguments(tmp_path: Path) -> None:
    data = _jpeg(tmp_path, "420").read_bytes()
    with pytest.raises(jpeg_crop.CropDecodeFailed, match="outside"):
        jpeg_crop.decode_region(data, 1, 200, 0, 10, 10)
    with pytest.raises(ValueError, match="denom"):
        jpeg_crop.decode_region(data, 3, 0, 0, 10, 10)
    with pytest.raises(ValueError, match="out"):
        jpeg_crop.decode_region(data, 1, 0, 0, 10, 10, out=np.zeros((5, 5, 3), np.uint8))
    with pytest.raises(jpeg_crop.CropDecodeFailed):
        jpeg_crop.read_header(b"\xff\xd8 not a jpeg")


def test_unavailable_decoder(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(jpeg_crop, "unavailable_reason", lambda: "no C compiler")
    with pytest.raises(ConfigError, match="no C compiler"):
        load_planned("x.jpg", PlannedCenterCrop(8, 8), decoder="crop")
    path = _jpeg(tmp_path, "420")  # 'auto' quietly uses another decoder
    assert load_planned(path, PlannedCenterCrop(8, 8)).shape == (8, 8, 3)


def test_mutated_jpegs_never_crash_and_match_the_pillow_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _pillow_resampling_only(monkeypatch)  # the decoder's behaviour is under test, not rounding
    good = bytearray(_jpeg(tmp_path, "420", size=(180, 140)).read_bytes())
    rng = np.random.default_rng(11)
    outcomes = {"equal": 0, "error": 0}
    for i in range(40):
        data = bytearray(good)
        if i % 4 == 0:
            data = data[: int(rng.integers(2, len(data)))]  # truncated
        else:
            for pos in rng.integers(2, len(data), size=int(rng.integers(1, 6))):
                data[pos] = int(rng.integers(0, 256))  # flipped bytes
        path = tmp_path / f"m{i}.jpg"
        path.write_bytes(bytes(data))
        results = []
        for decoder in ("crop", "pillow"):
            t = PlannedRandomResizedCrop(48, generator=torch.Generator().manual_seed(i))
            try:
                results.append(load_planned(path, t, decoder=decoder))
            except DataError as exc:
                results.append(type(exc))
        if isinstance(results[0], torch.Tensor) and isinstance(results[1], torch.Tensor):
            assert torch.equal(results[0], results[1]), i
            outcomes["equal"] += 1
        else:
            assert results[0] == results[1] == DataError, (i, results)
            outcomes["error"] += 1
    assert outcomes["equal"] and outcomes["error"]  # both kinds of outcome were exercised


def test_damage_below_the_crop_is_not_read_and_the_crops_rows_are_intact(tmp_path: Path) -> None:
    # The documented exception to the Pillow verdicts (docs/data.md): the crop decoder stops after
    # its box's last row, so a file damaged only below it decodes, where Pillow, decoding every
    # row, refuses it. Found in a fuzz of mutated ImageNet-sample JPEGs (5 of 3,000).
    good = jpeg_bytes(photo(200, 160), "420")
    intact_top = jpeg_crop.decode_region(good, 1, 0, 0, 200, 32)
    rng = np.random.default_rng(3)
    for _ in range(400):  # one byte changed in the last rows' data, until Pillow refuses the file
        data = bytearray(good)
        data[len(data) - int(rng.integers(3, 300))] = int(rng.integers(0, 256))
        path = tmp_path / "damaged.jpg"
        path.write_bytes(bytes(data))
        try:
            load_planned(path, PlannedCenterCrop(64, 64), decoder="pillow")
        except DataError:
            break
    else:
        pytest.skip("no one-byte change near the end made Pillow refuse this file")
    with pytest.raises(jpeg_crop.CropDecodeFailed):  # a crop reaching the damage meets it
        jpeg_crop.decode_region(bytes(data), 1, 0, 0, 200, 160)
    # the last 300 bytes hold the last rows' data: the top fifth is decoded as in the intact file
    top = jpeg_crop.decode_region(bytes(data), 1, 0, 0, 200, 32)
    assert np.array_equal(top, intact_top)


def test_crop_path_breakdown_times_each_step_on_the_files_it_takes(tmp_path: Path) -> None:
    from resnext.speed.data_bench import crop_path_breakdown

    files = [_jpeg(tmp_path, kind, (320, 240)) for kind in ("420", "444", "grey")]
    cmyk = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (300, 200), (10, 200, 30, 5)).save(cmyk, quality=90)
    result = crop_path_breakdown([*files, cmyk], size=64, rounds=1)
    assert (result["images"], result["left_to_pillow"]) == (3, 1)
    ms = result["ms_per_image"]
    assert set(ms) == {
        "read_file", "read_header", "entropy_to_crop_bottom", "region_decode", "full_decode",
        "region_decode_restart_indexed", "resample_bicubic", "batch_stage",
    }  # fmt: skip
    assert all(v > 0 for v in ms.values())
    path = ms["read_file"] + ms["read_header"] + ms["region_decode"]
    path += ms["resample_bicubic"] + ms["batch_stage"]
    assert result["steps_sum_ms"] == pytest.approx(path)
    restart = path - ms["region_decode"] + ms["region_decode_restart_indexed"]
    assert result["steps_sum_restart_indexed_ms"] == pytest.approx(restart)
    assert result["ceiling_decode_only_img_per_s"] == pytest.approx(
        1e3 / ms["entropy_to_crop_bottom"]
    )


def test_decoded_crops_are_what_the_crop_path_resamples(tmp_path: Path) -> None:
    # benchmarks/bench_resample.py times resampling on these; they must be the loader's own work
    from resnext.speed.data_bench import decoded_crops

    if resample.unavailable_reason() is not None:
        pytest.skip(f"resampler unavailable: {resample.unavailable_reason()}")
    files = [_jpeg(tmp_path, kind, (320, 240)) for kind in ("420", "444")]
    cmyk = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (300, 200), (10, 200, 30, 5)).save(cmyk, quality=90)
    crops = decoded_crops([files[0], cmyk, files[1]], 64, seed=5)
    assert len(crops) == 2  # the CMYK file is Pillow's
    transform = PlannedRandomResizedCrop(64, generator=torch.Generator().manual_seed(5))
    for path, (canvas, box, flip) in zip(files, crops, strict=True):
        want = load_planned(path, transform, decoder="crop")
        got = resample.resize_box(canvas, box, (64, 64), "bicubic", flip)
        assert torch.equal(torch.from_numpy(got), want)
