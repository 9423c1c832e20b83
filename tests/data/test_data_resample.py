"""Our box resampler does Pillow's arithmetic: equal to Image.resize for one of the two pass orders."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from resnext.data import resample

REASON = resample.unavailable_reason()
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"resampler unavailable: {REASON}")
PIL_FILTERS = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}


def _cases(n: int, seed: int):
    rng = np.random.default_rng(seed)
    for i in range(n):
        h, w = int(rng.integers(1, 260)), int(rng.integers(1, 260))
        image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        if i % 4 == 0:
            box = (0.0, 0.0, float(w), float(h))
        else:
            bw, bh = rng.uniform(0.5, w), rng.uniform(0.5, h)
            left, top = rng.uniform(0, w - bw), rng.uniform(0, h - bh)
            box = (left, top, left + bw, top + bh)
        size = (int(rng.integers(1, 200)), int(rng.integers(1, 200)))
        yield image, box, size, ("bilinear", "bicubic")[i % 2], bool(i % 3 == 0)


def _pillow(image, box, size, interpolation, flip) -> np.ndarray:  # type: ignore[no-untyped-def]
    out = Image.fromarray(image).resize(size, PIL_FILTERS[interpolation], box=box)
    if flip:
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return np.asarray(out)


def test_equal_to_pillow_for_one_of_the_two_pass_orders() -> None:
    for image, box, size, interpolation, flip in _cases(120, seed=0):
        want = _pillow(image, box, size, interpolation, flip)
        outs = {
            order: resample.resize_box(image, box, size, interpolation, flip, order)
            for order in ("horizontal-first", "vertical-first", "auto")
        }
        assert outs["horizontal-first"].shape == want.shape
        matches = [
            o for o in ("horizontal-first", "vertical-first") if np.array_equal(outs[o], want)
        ]
        assert matches, (image.shape, box, size, interpolation)
        assert any(
            np.array_equal(outs["auto"], outs[o]) for o in ("horizontal-first", "vertical-first")
        )


def test_strided_view_and_bad_arguments() -> None:
    big = np.random.default_rng(1).integers(0, 256, (50, 80, 3), dtype=np.uint8)
    view = big[5:45, 10:70]  # rows strided, pixels packed
    got = resample.resize_box(
        view, (0.0, 0.0, 60.0, 40.0), (30, 20), "bicubic", order="horizontal-first"
    )
    want = resample.resize_box(
        np.ascontiguousarray(view),
        (0.0, 0.0, 60.0, 40.0),
        (30, 20),
        "bicubic",
        order="horizontal-first",
    )
    assert np.array_equal(got, want)
    with pytest.raises(ValueError, match="interpolation"):
        resample.resize_box(view, (0, 0, 60, 40), (30, 20), "lanczos")
    with pytest.raises(ValueError, match="order"):
        resample.resize_box(view, (0, 0, 60, 40), (30, 20), "bicubic", order="diagonal")
    with pytest.raises(ValueError, match="image"):
        resample.resize_box(big[:, ::2], (0, 0, 40, 50), (30, 20), "bicubic")
    with pytest.raises(ValueError, match="image"):
        resample.resize_box(big.astype(np.float32), (0, 0, 80, 50), (30, 20), "bicubic")


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
def test_mirror_alone_is_exact_where_the_width_is_not_resampled(interpolation: str) -> None:
    # The flip rides on the horizontal pass; with nothing to resample across, that pass must
    # weigh each pixel alone (weights 0, 1, 0), whichever pass runs first.
    image = np.random.default_rng(2).integers(0, 256, (37, 50, 3), dtype=np.uint8)
    for size in ((50, 20), (50, 37), (50, 61)):
        box = (0.0, 0.0, 50.0, 37.0)
        want = _pillow(image, box, size, interpolation, flip=True)
        for order in ("horizontal-first", "vertical-first"):
            got = resample.resize_box(image, box, size, interpolation, True, order)
            assert np.array_equal(got, want), (size, order)
    same = resample.resize_box(image, (0.0, 0.0, 50.0, 37.0), (50, 37), interpolation, True)
    assert np.array_equal(same, image[:, ::-1])


def test_another_build_of_the_kernel_runs_side_by_side(tmp_path) -> None:  # type: ignore[no-untyped-def]
    # benchmarks/bench_resample.py times another revision of the kernel file this way
    copy = tmp_path / "resample_copy.c"
    copy.write_bytes(resample.SOURCE.read_bytes())
    image = np.random.default_rng(3).integers(0, 256, (90, 120, 3), dtype=np.uint8)
    box = (7.5, 3.25, 101.0, 80.5)
    want = _pillow(image, box, (64, 48), "bicubic", flip=True)
    got = {
        order: resample.resize_box(image, box, (64, 48), "bicubic", True, order, source=copy)
        for order in ("horizontal-first", "vertical-first")
    }
    assert any(np.array_equal(g, want) for g in got.values())
    for order, out in got.items():
        assert np.array_equal(
            out, resample.resize_box(image, box, (64, 48), "bicubic", True, order)
        )
