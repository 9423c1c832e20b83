"""Bad image files in a dataset folder: each converted, skipped with its path, or refused; runs go on."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from rel_helpers import record, tiny_config

from resnext.data import ImageFolderDataset, load_rgb
from resnext.data.presets import imagenet_eval
from resnext.errors import DataError
from resnext.train import train


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def bomb_png(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height 8-bit grey pixels (one compressed row)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\0" * (width + 1))
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", idat)
        + _png_chunk(b"IEND", b"")
    )


def encoded(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def good_image(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (12, 10, 3), dtype=np.uint8))


def sixteen_bit_png() -> bytes:
    # Grey levels 0, 257*100 and 65535: scaled to 8 bits they are 0, 100 and 255.
    arr = np.array([[0, 257 * 100, 65535]], dtype=np.uint16).repeat(2, axis=0)
    return encoded(Image.fromarray(arr), "PNG")


def palette_png() -> bytes:
    img = Image.new("P", (4, 2))
    img.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    img.putdata([0, 0, 1, 1, 0, 0, 1, 1])
    img.info["transparency"] = 1  # palette entry 1 (blue) is fully transparent
    return encoded(img, "PNG")


BAD = {  # file name -> (bytes maker, expected outcome)
    "zero.jpg": (lambda: b"", "skipped"),
    "truncated.jpg": (lambda: encoded(good_image(9), "JPEG")[:300], "skipped"),
    "text.png": (lambda: b"this is not an image, just some bytes\n" * 20, "skipped"),
    "bomb.png": (lambda: bomb_png(20_000, 20_000), "skipped"),
    "bomb_warn.png": (lambda: bomb_png(10_000, 10_000), "skipped"),
    "png_named.jpg": (lambda: encoded(good_image(5), "PNG"), "converted"),
    "sixteen.png": (sixteen_bit_png, "converted"),
    "cmyk.jpg": (lambda: encoded(Image.new("CMYK", (6, 6), (0, 255, 255, 0)), "JPEG"), "converted"),
    "palette.png": (palette_png, "converted"),
    "one_pixel.png": (lambda: encoded(Image.new("RGB", (1, 1), (10, 20, 30)), "PNG"), "converted"),
}


def make_folder(root: Path, goods_per_class: int = 6) -> dict[str, Path]:
    """root/<cat|dog>/ with good PNGs, every bad case in 'cat', and a symlink loop in 'dog'."""
    paths = {}
    for c, name in enumerate(("cat", "dog")):
        folder = root / name
        folder.mkdir(parents=True)
        for i in range(goods_per_class):
            good_image(10 * c + i).save(folder / f"good{i}.png")
    for name, (make, _) in BAD.items():
        paths[name] = root / "cat" / name
        paths[name].write_bytes(make())
    (root / "dog" / "loop").symlink_to(root / "dog", target_is_directory=True)
    (root / "dog" / "self.png").symlink_to(root / "dog" / "self.png")  # a link to itself
    return paths


def test_each_bad_image_is_converted_or_refused_with_its_path(tmp_path: Path) -> None:
    paths = make_folder(tmp_path)
    outcomes = {}
    for name, path in paths.items():
        try:
            img = load_rgb(path)
        except DataError as exc:
            assert str(path) in str(exc)
            outcomes[name] = "skipped"
        else:
            assert img.mode == "RGB"
            outcomes[name] = "converted"
    assert outcomes == {name: expected for name, (_, expected) in BAD.items()}
    record("bad_images_direct", len(paths))


def test_converted_images_have_the_hand_computed_pixels(tmp_path: Path) -> None:
    paths = make_folder(tmp_path)
    grey = np.asarray(load_rgb(paths["sixteen.png"]))
    assert grey[0, :, 0].tolist() == [0, 100, 255] and (grey == grey[..., :1]).all()
    pal = np.asarray(load_rgb(paths["palette.png"]))
    assert pal[0, :2].tolist() == [[255, 0, 0]] * 2  # opaque red stays red
    assert pal[0, 2:].tolist() == [[255, 255, 255]] * 2  # transparent over the white background
    cmyk = np.asarray(load_rgb(paths["cmyk.jpg"])).astype(int)
    # CMYK (0, 255, 255, 0) = no cyan, full magenta and yellow = red; JPEG is lossy.
    assert np.abs(cmyk - np.array([255, 0, 0])).max() <= 8
    renamed = np.asarray(load_rgb(paths["png_named.jpg"]))
    assert np.array_equal(renamed, np.asarray(good_image(5)))
    one = imagenet_eval(16, 18)(load_rgb(paths["one_pixel.png"]))
    assert one.shape == (3, 16, 16) and torch.isfinite(one).all()


def test_dataset_skips_bad_files_with_count_and_path(tmp_path: Path) -> None:
    make_folder(tmp_path)
    ds = ImageFolderDataset(tmp_path, transform=imagenet_eval(8, 9))
    loader = torch.utils.data.DataLoader(ds, batch_size=5)
    seen = sum(x.shape[0] for x, _ in loader)  # every item is served, bad ones replaced
    assert seen == len(ds)
    skipped = {Path(p).name for p in ds.bad_files}
    expected = {name for name, (_, outcome) in BAD.items() if outcome == "skipped"}
    expected.add("self.png")  # the link to itself: a loop, skipped
    assert skipped == expected, ds.bad_files
    assert all(Path(p).is_absolute() or Path(p).exists() for p in ds.bad_files)
    dog = [p for p, t in ds.samples if t == ds.class_to_idx["dog"]]
    assert len(dog) == 6  # the loop was visited once and the self-link never read
    record("bad_images_dataset", len(BAD) + 2, skipped=len(skipped))


def test_strict_dataset_refuses_with_a_message_naming_the_file(tmp_path: Path) -> None:
    paths = make_folder(tmp_path)
    with pytest.raises(DataError) as info:
        ImageFolderDataset(tmp_path, strict=True, verify=True)
    assert any(str(p) in str(info.value) for p in paths.values())


def test_a_training_run_does_not_die_on_bad_files(tmp_path: Path) -> None:
    data = tmp_path / "data"
    make_folder(data / "train")
    make_folder(data / "test", goods_per_class=2)
    cfg = tiny_config(
        tmp_path / "run",
        model={"spec": {"num_classes": 2}},
        data={"kind": "imagefolder", "root": str(data), "image_size": 8, "batch_size": 4},
        train={"epochs": 1, "checkpoint_every": 0},
    )
    result = train(cfg)
    # 12 good + 10 odd files listed, minus the zero-byte one and the self-link: 21 samples, 5 steps.
    assert result.epochs_completed == 1 and result.global_step == 5
    assert (result.run_dir / "checkpoints" / "last.pt").is_file()
