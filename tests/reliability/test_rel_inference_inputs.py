"""The same bad image files given to inference: a picture equal to the training loader's, or DataError."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from rel_helpers import record
from test_rel_images import make_folder

from resnext.data import load_rgb
from resnext.errors import DataError
from resnext.inference.inputs import open_image

REFUSED = ("zero.jpg", "truncated.jpg", "text.png")
SAME_AS_TRAINING = ("png_named.jpg", "cmyk.jpg", "one_pixel.png")


def test_unreadable_files_are_data_errors_naming_the_file(tmp_path: Path) -> None:
    paths = make_folder(tmp_path)
    for name in REFUSED:
        with pytest.raises(DataError) as info:
            open_image(paths[name])
        assert str(paths[name]) in str(info.value)
    for name in SAME_AS_TRAINING:
        assert np.array_equal(
            np.asarray(open_image(paths[name])), np.asarray(load_rgb(paths[name]))
        )
    with pytest.raises(DataError, match="no such file"):
        open_image(tmp_path / "missing.png")
    record("bad_images_inference", len(REFUSED) + len(SAME_AS_TRAINING) + 1)


def test_decompression_bombs_are_refused(tmp_path: Path) -> None:
    paths = make_folder(tmp_path)
    for name in ("bomb.png", "bomb_warn.png"):
        with pytest.raises(DataError, match="decompression"):
            open_image(paths[name])


def test_sixteen_bit_and_palette_images_match_the_training_loader(tmp_path: Path) -> None:
    paths = make_folder(tmp_path)
    for name in ("sixteen.png", "palette.png"):
        assert np.array_equal(
            np.asarray(open_image(paths[name])), np.asarray(load_rgb(paths[name]))
        )
