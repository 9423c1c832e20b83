"""ImageFolderDataset and load_rgb: every image mode to RGB, bad files skipped, clear errors."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from resnext.data.folder import ImageFolderDataset
from resnext.data.images import load_rgb
from resnext.data.transforms import Resize
from resnext.errors import DataError


def _rng_rgb(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _mixed_folder(root: Path) -> dict[str, Path]:
    (root / "b_cls").mkdir(parents=True)
    (root / "a_cls").mkdir()
    files = {}
    files["rgb_jpeg"] = root / "a_cls" / "rgb.jpg"
    Image.fromarray(_rng_rgb(20, 30)).save(files["rgb_jpeg"], quality=95)
    files["grey_jpeg"] = root / "a_cls" / "grey.JPEG"
    Image.new("L", (10, 12), 77).save(files["grey_jpeg"], quality=100)
    files["cmyk_jpeg"] = root / "a_cls" / "cmyk.jpg"
    Image.new("CMYK", (16, 16), (0, 0, 0, 0)).save(files["cmyk_jpeg"], quality=100)
    pal = Image.new("P", (4, 2), 0)
    pal.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    pal.putpixel((1, 0), 1)
    files["palette_png"] = root / "b_cls" / "palette.png"
    pal.save(files["palette_png"], transparency=0)
    files["png16"] = root / "b_cls" / "deep.png"
    Image.fromarray(np.array([[0, 32896, 65535]], dtype=np.uint16)).save(files["png16"])
    files["rgba_png"] = root / "b_cls" / "rgba.png"
    Image.new("RGBA", (3, 3), (255, 0, 0, 128)).save(files["rgba_png"])
    files["la_png"] = root / "b_cls" / "la.png"
    Image.new("LA", (3, 3), (0, 0)).save(files["la_png"])
    return files


def test_every_mode_becomes_rgb_with_expected_pixels(tmp_path: Path) -> None:
    files = _mixed_folder(tmp_path)
    images = {k: load_rgb(p) for k, p in files.items()}
    assert all(img.mode == "RGB" for img in images.values())
    assert images["rgb_jpeg"].size == (30, 20)
    assert np.abs(np.asarray(images["grey_jpeg"]).astype(int) - 77).max() <= 2
    assert np.asarray(images["cmyk_jpeg"]).min() >= 245  # CMYK (0,0,0,0) is white paper
    pal = np.asarray(images["palette_png"])
    assert list(pal[0, 0]) == [255, 255, 255]  # transparent index over the white background
    assert list(pal[0, 1]) == [0, 0, 255]
    deep = np.asarray(images["png16"])[0, :, 0]
    assert list(deep) == [0, round(32896 / 257), 255]  # 16-bit scaled, not clipped
    rgba = np.asarray(images["rgba_png"])[0, 0].astype(int)
    # Hand compositing: 255*a + 255*(1-a) for red, 0*a + 255*(1-a) for green, a = 128/255.
    assert abs(rgba[0] - 255) <= 1 and abs(rgba[1] - 255 * (1 - 128 / 255)) <= 1
    assert list(np.asarray(images["la_png"])[0, 0]) == [255, 255, 255]  # fully transparent


def test_folder_classes_and_targets(tmp_path: Path) -> None:
    _mixed_folder(tmp_path)
    (tmp_path / "a_cls" / "notes.txt").write_text("not an image extension: ignored")
    ds = ImageFolderDataset(tmp_path)
    assert ds.classes == ["a_cls", "b_cls"]
    assert sorted(ds.targets) == [0] * 3 + [1] * 4
    for i in range(len(ds)):
        x, y = ds[i]
        assert x.shape[0] == 3 and x.dtype.is_floating_point and y == ds.targets[i]
    assert ds.bad_files == {}


def _bad_folder(root: Path) -> None:
    _mixed_folder(root)
    (root / "a_cls" / "zero.jpg").write_bytes(b"")
    (root / "a_cls" / "text.png").write_text("hello, I am not a PNG")
    good = root / "b_cls" / "full.jpg"
    Image.fromarray(_rng_rgb(64, 64, 3)).save(good, quality=95)
    data = good.read_bytes()
    (root / "b_cls" / "truncated.jpg").write_bytes(data[: len(data) // 2])


def test_bad_files_skipped_counted_and_logged_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _bad_folder(tmp_path)
    with caplog.at_level(logging.WARNING, logger="resnext.data"):
        ds = ImageFolderDataset(tmp_path)
        assert len(ds) == 10  # the zero-byte file is filtered at once
        for _ in range(2):
            labels = [ds[i][1] for i in range(len(ds))]
    assert len(labels) == 10
    assert sorted(Path(p).name for p in ds.bad_files) == ["text.png", "truncated.jpg", "zero.jpg"]
    for name in ("text.png", "truncated.jpg", "zero.jpg"):
        assert sum(name in r.getMessage() for r in caplog.records) == 1
    verified = ImageFolderDataset(tmp_path, verify=True)
    assert len(verified) == 8 and len(verified.bad_files) == 3


def test_strict_mode_raises(tmp_path: Path) -> None:
    _bad_folder(tmp_path)
    with pytest.raises(DataError, match=r"zero\.jpg"):
        ImageFolderDataset(tmp_path, strict=True)
    os.remove(tmp_path / "a_cls" / "zero.jpg")
    ds = ImageFolderDataset(tmp_path, strict=True)
    index = next(i for i, (p, _) in enumerate(ds.samples) if p.endswith("truncated.jpg"))
    with pytest.raises(DataError, match=r"truncated\.jpg"):
        ds[index]


def test_decompression_bomb_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "c").mkdir()
    Image.new("RGB", (40, 40)).save(tmp_path / "c" / "big.png")
    Image.new("RGB", (10, 10)).save(tmp_path / "c" / "small.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(DataError, match="decompression"):
        load_rgb(tmp_path / "c" / "big.png")
    ds = ImageFolderDataset(tmp_path, verify=True)
    assert len(ds) == 1 and "big.png" in next(iter(ds.bad_files))


def test_empty_and_imageless_folders(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no class folders"):
        ImageFolderDataset(tmp_path)
    with pytest.raises(DataError, match="does not exist"):
        ImageFolderDataset(tmp_path / "missing")
    (tmp_path / "cat").mkdir()
    Image.new("RGB", (4, 4)).save(tmp_path / "cat" / "x.png")
    (tmp_path / "dog").mkdir()
    (tmp_path / "dog" / "readme.txt").write_text("no images here")
    with pytest.raises(DataError, match=str(tmp_path / "dog")):
        ImageFolderDataset(tmp_path)
    broken = tmp_path / "broken"
    (broken / "cls").mkdir(parents=True)
    (broken / "cls" / "x.jpg").write_bytes(b"")
    with pytest.raises(DataError, match="every image file is unreadable"):
        ImageFolderDataset(broken)


def test_symlink_loop_terminates(tmp_path: Path) -> None:
    (tmp_path / "cls" / "sub").mkdir(parents=True)
    Image.new("RGB", (4, 4)).save(tmp_path / "cls" / "sub" / "a.png")
    os.symlink(tmp_path / "cls", tmp_path / "cls" / "sub" / "loop")
    ds = ImageFolderDataset(tmp_path)
    assert len(ds) == 1


def test_jpeg_draft_keeps_needed_resolution(tmp_path: Path) -> None:
    path = tmp_path / "big.jpg"
    Image.fromarray(_rng_rgb(1600, 2000)).save(path, quality=80)
    resize = Resize(256)
    small = load_rgb(path, draft=resize.draft_size)
    assert min(small.size) >= 256 and small.size[0] < 2000
    assert resize(small).size == (320, 256)


def test_real_imagenet_jpegs(imagenet_sample: Path, tmp_path: Path) -> None:
    names = sorted(os.listdir(imagenet_sample))[:3]
    for name in names:
        if not name.endswith(".JPEG"):
            continue
        (tmp_path / name[:9]).mkdir()
        os.symlink(imagenet_sample / name, tmp_path / name[:9] / name)
    ds = ImageFolderDataset(tmp_path, transform=Resize(64))
    assert ds.classes == sorted(n[:9] for n in names if n.endswith(".JPEG"))
    img, label = ds[0]
    assert min(img.size) == 64 and label == 0
