"""The C colour map of the batch stage: per-image means and affine maps equal numpy's."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from resnext.data import colour_affine

REASON = colour_affine.unavailable_reason()
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"C colour map unavailable: {REASON}")


@pytest.mark.parametrize("shape", [(1, 1, 1), (3, 7, 13), (2, 64, 65), (5, 17, 4)])
@pytest.mark.parametrize("threads", [1, 2])
def test_means_and_affine_map_equal_numpy(shape: tuple[int, int, int], threads: int) -> None:
    n, h, w = shape
    rng = np.random.default_rng(n * 100 + h)
    pixels = rng.integers(0, 256, (n, h, w, 3), dtype=np.uint8)
    matrix = rng.normal(size=(n, 3, 3)).astype(np.float32)
    shift = rng.normal(size=(n, 3)).astype(np.float32)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        batch = torch.from_numpy(pixels)
        means = colour_affine.channel_means(batch)
        out = colour_affine.affine_planes(batch, torch.from_numpy(matrix), torch.from_numpy(shift))
    finally:
        torch.set_num_threads(before)
    x = pixels.astype(np.float64)
    assert np.allclose(means.numpy(), x.mean(axis=(1, 2)), rtol=1e-6)
    expected = np.einsum("nck,nhwk->nchw", matrix.astype(np.float64), x)
    expected += shift[:, :, None, None]
    assert out.shape == (n, 3, h, w) and out.is_contiguous()
    assert np.allclose(out.numpy(), expected, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize(
    ("batch", "named"),
    [
        (torch.zeros((2, 4, 4, 3)), "got torch.float32"),
        (torch.zeros((2, 3, 4, 4), dtype=torch.uint8), r"got torch.uint8 \(2, 3, 4, 4\)"),
        (torch.zeros((2, 4, 4, 3), dtype=torch.uint8).permute(0, 2, 1, 3), "got torch.uint8"),
    ],
)
def test_batches_it_cannot_read_are_refused(batch: torch.Tensor, named: str) -> None:
    assert not colour_affine.takes(batch)
    with pytest.raises(ValueError, match=named):
        colour_affine.channel_means(batch)


def test_matrix_and_shift_shapes_are_checked() -> None:
    batch = torch.zeros((2, 4, 4, 3), dtype=torch.uint8)
    with pytest.raises(ValueError, match="matrix/shift"):
        colour_affine.affine_planes(batch, torch.eye(3).expand(3, 3, 3), torch.zeros(3, 3))
