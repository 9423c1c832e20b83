"""The stride-2 grouped 3×3 input gradient by the AMX kernel in four phases equals torch's in
float64 (to bf16's rounding), and the training chooser offers it."""

from __future__ import annotations

import pytest
import torch

from resnext.speed import grouped_dgrad_amx, grouped_train

REASON = grouped_dgrad_amx.unavailable_reason()
needs_amx = pytest.mark.skipif(REASON is not None, reason=f"AMX kernel unavailable: {REASON}")

# (batch, channels, groups, height, width): the group widths the AMX kernel packs (4 and 8 per
# group block-diagonally, 16 dense, 32 as two 16-wide tiles), even and odd sizes (the last row
# and column of odd parity exist or not), 1×1 and 1×2 inputs, several items per thread.
SHAPES = [
    (2, 64, 16, 9, 11),
    (1, 16, 4, 5, 5),
    (3, 128, 32, 8, 6),
    (2, 48, 12, 7, 7),
    (1, 64, 2, 6, 9),
    (2, 32, 2, 1, 1),
    (1, 16, 1, 2, 3),
    (4, 32, 4, 10, 10),
]


def _inputs(shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    n, c, groups, h, w = shape
    g = torch.Generator().manual_seed(sum(shape))
    grad = torch.randn(n, c, (h - 1) // 2 + 1, (w - 1) // 2 + 1, generator=g)
    weight = torch.randn(c, c // groups, 3, 3, generator=g) * 0.3
    return (
        grad.to(torch.bfloat16).contiguous(memory_format=torch.channels_last),
        weight.to(torch.bfloat16),
    )


def _reference(grad: torch.Tensor, weight: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    n, c, groups, h, w = shape
    x = torch.zeros(n, c, h, w, dtype=torch.float64)
    return torch.ops.aten.convolution_backward(
        grad.double(), x, weight.double(), None, [2, 2], [1, 1], [1, 1], False, [0, 0], groups,
        [True, False, False],
    )[0]  # fmt: skip


@needs_amx
@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_float64(shape: tuple[int, ...], threads: int) -> None:
    grad, weight = _inputs(shape)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = grouped_dgrad_amx.input_grad(grad, weight, shape[2], shape[3:])
    finally:
        torch.set_num_threads(before)
    want = _reference(grad, weight, shape)
    assert got.dtype == torch.bfloat16 and got.shape == want.shape
    assert got.is_contiguous(memory_format=torch.channels_last)
    # float32 sums of exact bf16 products, one rounding to bf16: half a unit in the last place
    err = (got.double() - want).abs()
    assert bool((err <= want.abs() * 2.0**-8 + 1e-6 * want.abs().max()).all())


@needs_amx
def test_every_phase_and_tap_is_placed() -> None:
    # one nonzero tap at a time: each lands on the pixels the stride-2 transposed convolution puts
    # it, whichever phase carries it
    grad = torch.ones(1, 16, 3, 3).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    for tap in range(9):
        weight = torch.zeros(16, 4, 3, 3)
        weight.view(16, 4, 9)[:, :, tap] = 1.0
        weight = weight.to(torch.bfloat16)
        got = grouped_dgrad_amx.input_grad(grad, weight, 4, (6, 5))
        torch.testing.assert_close(got.double(), _reference(grad, weight, (1, 16, 4, 6, 5)))


@needs_amx
def test_refuses_what_it_does_not_take() -> None:
    grad, weight = _inputs((1, 16, 4, 5, 5))
    with pytest.raises(ValueError, match="grad: expected a 4-d bf16"):
        grouped_dgrad_amx.input_grad(grad.float(), weight, 4, (5, 5))
    with pytest.raises(ValueError, match="weight: expected shape"):
        grouped_dgrad_amx.input_grad(grad, weight[:, :2], 4, (5, 5))
    with pytest.raises(ValueError, match="not the stride-2 output"):
        grouped_dgrad_amx.input_grad(grad, weight, 4, (7, 5))


@needs_amx
def test_offered_to_the_chooser_at_stride_2_in_bf16() -> None:
    grad, weight = _inputs((2, 32, 8, 6, 6))
    x = torch.zeros(2, 32, 6, 6, dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
    candidates = grouped_train.input_grad_candidates(grad, x, weight, 8, 2)
    assert "ours-amx-phases" in candidates
    torch.testing.assert_close(
        candidates["ours-amx-phases"](), candidates["onednn"](), rtol=1e-2, atol=1e-2
    )
    # AMX has no float32 phases; float32 gets the vector kernels' phases beside oneDNN.
    fp32 = grouped_train.input_grad_candidates(grad.float(), x.float(), weight.float(), 8, 2)
    assert list(fp32) == ["onednn", "ours-phases"]
