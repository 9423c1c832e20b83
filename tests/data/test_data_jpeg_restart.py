"""Restart-marker rewrite and cuts: pixels never change, cuts decode to the whole image's pixels."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import numpy as np
import pytest
import torch
from data_helpers import JPEG_KINDS, jpeg_bytes, photo
from PIL import Image

from resnext.data import jpeg_crop, jpeg_restart
from resnext.data.planned import PlannedCenterCrop, PlannedRandomResizedCrop, load_planned
from resnext.errors import ConfigError, DataError

REASON = jpeg_restart.unavailable_reason() or jpeg_crop.unavailable_reason()
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"restart cut unavailable: {REASON}")

KINDS = JPEG_KINDS


def _jpeg_bytes(kind: str, size: tuple[int, int] = (331, 217)) -> bytes:
    return jpeg_bytes(photo(*size, periods=(13.0, 19.0, 29.0, 7.0), noise=10.0), kind)


def _pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("interval", [1, 3, 4])
def test_rewrite_keeps_every_pixel_and_adds_row_aligned_markers(kind: str, interval: int) -> None:
    data = _jpeg_bytes(kind)
    rewritten = jpeg_restart.add_restarts(data, interval)
    # Pillow (its own libjpeg) decodes both: the coefficients, hence the pixels, are unchanged.
    assert np.array_equal(_pixels(rewritten), _pixels(data))
    assert jpeg_restart.is_indexed(rewritten) and not jpeg_restart.is_indexed(data)
    # Restart markers FFD0..FFD7 are present, numbered 0..7 in turn.
    found = [rewritten[i + 1] - 0xD0 for i in range(len(rewritten) - 1)
             if rewritten[i] == 0xFF and 0xD0 <= rewritten[i + 1] <= 0xD7]  # fmt: skip
    assert found and found == [k % 8 for k in range(len(found))]


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_cut_decodes_to_the_whole_images_pixels_inside_the_box(kind: str) -> None:
    data = _jpeg_bytes(kind)
    rewritten = jpeg_restart.add_restarts(data)
    whole = _pixels(data)
    height, width = whole.shape[:2]
    rng = np.random.default_rng(7)
    for _ in range(25):
        x0, y0 = int(rng.integers(0, width - 1)), int(rng.integers(0, height - 1))
        x1, y1 = int(rng.integers(x0 + 1, width + 1)), int(rng.integers(y0 + 1, height + 1))
        piece = jpeg_restart.cut(rewritten, (x0, y0, x1, y1), margin=4)
        assert piece is not None
        # The piece is a JPEG of its own (decoded by Pillow here), placed at (left, top).
        part = _pixels(piece.data)
        assert piece.left <= x0 and piece.top <= y0
        assert piece.left + part.shape[1] >= x1 and piece.top + part.shape[0] >= y1
        inside = part[y0 - piece.top : y1 - piece.top, x0 - piece.left : x1 - piece.left]
        assert np.array_equal(inside, whole[y0:y1, x0:x1])


def test_a_small_cut_is_a_small_file() -> None:
    rewritten = jpeg_restart.add_restarts(_jpeg_bytes("420", (640, 480)))
    piece = jpeg_restart.cut(rewritten, (300, 200, 340, 240), margin=4)
    assert piece is not None and len(piece.data) < len(rewritten) / 10


def test_files_without_usable_markers_are_not_cut() -> None:
    data = _jpeg_bytes("420")
    assert jpeg_restart.cut(data, (0, 0, 10, 10)) is None  # no restart markers
    rewritten = bytearray(jpeg_restart.add_restarts(data, 1))
    first = next(i for i in range(len(rewritten) - 1)
                 if rewritten[i] == 0xFF and rewritten[i + 1] == 0xD0)  # fmt: skip
    rewritten[first + 1] = 0xD3  # out of sequence: corrupt, left to the ordinary decoder
    assert jpeg_restart.cut(bytes(rewritten), (0, 100, 50, 120)) is None
    truncated = jpeg_restart.add_restarts(data)[: len(data) // 3]
    assert jpeg_restart.cut(truncated, (0, 180, 50, 200)) is None  # segments missing
    assert jpeg_restart.cut(b"not a jpeg at all", (0, 0, 1, 1)) is None
    assert jpeg_restart.cut(jpeg_restart.add_restarts(data), (0, 0, 999, 10)) is None  # outside


def test_files_with_markers_of_their_own_are_not_cut_until_rewritten() -> None:
    # the "restart" flavour: markers every 5 MCUs, which do not start MCU rows here
    data = _jpeg_bytes("restart")
    if b"\xff\xdd" not in data:
        pytest.skip("this Pillow writes no restart markers (restart_marker_blocks)")
    assert not jpeg_restart.is_indexed(data)
    assert jpeg_restart.cut(data, (0, 100, 50, 120)) is None
    rewritten = jpeg_restart.add_restarts(data)
    piece = jpeg_restart.cut(rewritten, (0, 100, 50, 120), margin=4)
    assert piece is not None and jpeg_restart.is_indexed(rewritten)


def test_rewrite_refuses_cmyk_and_garbage_with_a_reason() -> None:
    buf = io.BytesIO()
    Image.new("CMYK", (40, 30), (1, 2, 3, 4)).save(buf, "JPEG")
    with pytest.raises(jpeg_restart.RestartRewriteFailed, match="CMYK"):
        jpeg_restart.add_restarts(buf.getvalue())
    with pytest.raises(jpeg_restart.RestartRewriteFailed, match=r"\w"):
        jpeg_restart.add_restarts(b"\xff\xd8\xff\xe0 broken")
    with pytest.raises(ConfigError, match="interval"):
        jpeg_restart.add_restarts(_jpeg_bytes("420"), 0)


def test_planned_loader_gives_identical_tensors_on_rewritten_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    (src / "a").mkdir(parents=True)
    for i, kind in enumerate(sorted(KINDS)):
        (src / "a" / f"{kind}.jpg").write_bytes(_jpeg_bytes(kind, (360 + 40 * i, 250)))
    report = jpeg_restart.index_tree(src, dst)
    assert (report.rewritten, report.copied, report.refused) == (len(KINDS), 0, {})
    cuts = []
    original_cut = jpeg_restart.cut

    def spy(data, box, margin=16):  # type: ignore[no-untyped-def]
        cuts.append(original_cut(data, box, margin))
        return cuts[-1]

    monkeypatch.setattr(jpeg_restart, "cut", spy)
    for make in (
        lambda: PlannedRandomResizedCrop(64, generator=torch.Generator().manual_seed(3)),
        lambda: PlannedRandomResizedCrop(24, scale=(0.01, 0.05), generator=torch.Generator().manual_seed(4)),
        lambda: PlannedCenterCrop(96, 110),
    ):  # fmt: skip
        first, second = make(), make()
        for path in sorted((src / "a").iterdir()):
            for _ in range(4):
                want = load_planned(path, first, decoder="crop")
                got = load_planned(dst / "a" / path.name, second, decoder="crop")
                assert torch.equal(got, want), path.name
    assert any(c is not None for c in cuts)  # the rewritten files were cut, not fully decoded


def test_index_tree_copies_other_files_and_refuses_to_write_into_its_source(
    tmp_path: Path,
) -> None:
    src = tmp_path / "src"
    (src / "x").mkdir(parents=True)
    (src / "x" / "a.jpg").write_bytes(_jpeg_bytes("420"))
    (src / "x" / "notes.txt").write_text("hello")
    (src / "x" / "bad.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    before = {p: p.read_bytes() for p in src.rglob("*") if p.is_file()}
    report = jpeg_restart.index_tree(src, tmp_path / "out")
    assert report.rewritten == 1 and report.copied == 1 and list(report.refused) == ["x/bad.jpg"]
    out = tmp_path / "out" / "x"
    assert (out / "notes.txt").read_text() == "hello"
    assert (out / "bad.jpg").read_bytes() == before[src / "x" / "bad.jpg"]
    assert jpeg_restart.is_indexed((out / "a.jpg").read_bytes())
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    assert {p: p.read_bytes() for p in src.rglob("*") if p.is_file()} == before  # src untouched
    with pytest.raises(ConfigError, match="outside"):
        jpeg_restart.index_tree(src, src / "inside")
    with pytest.raises(DataError, match="not a folder"):
        jpeg_restart.index_tree(tmp_path / "missing", tmp_path / "o2")


def test_rewritten_imagenet_photos_decode_identically(imagenet_sample: Path) -> None:
    for path in sorted(imagenet_sample.glob("*.JPEG"))[:40]:
        data = path.read_bytes()
        assert np.array_equal(_pixels(jpeg_restart.add_restarts(data)), _pixels(data)), path.name


def test_index_jpegs_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from resnext import cli

    src = tmp_path / "src"
    (src / "c").mkdir(parents=True)
    (src / "c" / "a.jpg").write_bytes(_jpeg_bytes("444"))
    assert cli.main(["index-jpegs", str(src), str(tmp_path / "dst")]) == 0
    assert "1 JPEGs rewritten" in capsys.readouterr().out
    assert jpeg_restart.is_indexed((tmp_path / "dst" / "c" / "a.jpg").read_bytes())
    assert cli.main(["index-jpegs", str(src), str(src / "c" / "in")]) != 0
    assert "outside" in capsys.readouterr().err


def test_cut_survives_mutated_headers_and_data() -> None:
    # Random byte changes anywhere in an indexed file: a cut is either refused (None) or a
    # well-formed JPEG that libjpeg decodes or refuses with a message; never a crash.
    rewritten = jpeg_restart.add_restarts(_jpeg_bytes("420", (200, 120)))
    rng = np.random.default_rng(0)
    for _ in range(300):
        mutated = bytearray(rewritten)
        for pos in rng.integers(0, len(mutated), int(rng.integers(1, 4))):
            mutated[pos] = int(rng.integers(0, 256))
        piece = jpeg_restart.cut(bytes(mutated), (20, 30, 90, 70), margin=4)
        if piece is None:
            continue
        assert piece.data[:2] == b"\xff\xd8" and piece.data[-2:] == b"\xff\xd9"
        with contextlib.suppress(jpeg_crop.CropDecodeFailed):  # a refusal with a reason is fine
            jpeg_crop.decode_region(piece.data, 1, 20 - piece.left, 30 - piece.top, 70, 40)
    for end in range(0, 700, 7):  # every truncation of the header and the first segments
        assert jpeg_restart.cut(rewritten[:end], (0, 0, 10, 10)) is None


def test_index_tree_checks_interval_and_dst_before_writing(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "a").mkdir(parents=True)
    (src / "a" / "notes.txt").write_text("copied first")  # sorted before the JPEG
    (src / "b.jpg").write_bytes(_jpeg_bytes("420"))
    dst = tmp_path / "dst"
    with pytest.raises(ConfigError, match="interval: expected MCUs per restart segment >= 1"):
        jpeg_restart.index_tree(src, dst, interval=0)
    assert not dst.exists()  # nothing was copied before the refusal
    taken = tmp_path / "taken"
    taken.write_text("keep")
    with pytest.raises(ConfigError, match="exists and is not a folder"):
        jpeg_restart.index_tree(src, taken)
    assert taken.read_text() == "keep"
    blocked = tmp_path / "blocked"
    blocked.mkdir()
    (blocked / "a").write_text("a file where src has a folder")
    with pytest.raises(ConfigError, match="cannot make the folder"):
        jpeg_restart.index_tree(src, blocked)
