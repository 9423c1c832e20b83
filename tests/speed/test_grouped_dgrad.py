"""The stride-2 grouped 3×3 input gradient on the vector kernels, in four phases, equals torch's in
float64 (to the output dtype's rounding) on every build and packing, and refuses bad input."""

from __future__ import annotations

import pytest
import torch

from resnext.speed import grouped_dgrad, grouped_kernel
from resnext.speed.capability import cpu_flags

REASON = grouped_kernel.unavailable_reason(torch.float32)
needs_kernel = pytest.mark.skipif(REASON is not None, reason=f"kernel unavailable: {REASON}")
BF16_REASON = grouped_kernel.unavailable_reason(torch.bfloat16)

# (batch, channels, groups, height, width): every group width (4-64 per group), even and odd
# sizes (a last input row or column of odd parity or none), 1×1 and 1×2 inputs, partial tiles,
# more rows than threads.
SHAPES = [
    (2, 64, 16, 9, 11),
    (1, 32, 8, 5, 5),
    (3, 128, 8, 8, 6),
    (2, 64, 4, 7, 7),
    (1, 64, 2, 6, 9),
    (2, 64, 1, 1, 1),
    (2, 32, 4, 1, 2),
    (4, 128, 32, 10, 10),
    (2, 256, 4, 12, 13),
]
# (dtype, pairs): the widening kernels in float32 and bf16, the pair dot-product kernels in bf16
PATHS = [(torch.float32, False), (torch.bfloat16, False), (torch.bfloat16, True)]


def _reference(grad: torch.Tensor, weight: torch.Tensor, groups: int, size: tuple[int, int]):
    x = torch.zeros(grad.shape[0], grad.shape[1], *size, dtype=torch.float64)
    return torch.ops.aten.convolution_backward(
        grad.double(), x, weight.double(), None, [2, 2], [1, 1], [1, 1], False, [0, 0], groups,
        [True, False, False],
    )[0]  # fmt: skip


def _run(shape, dtype, pairs, threads=None):
    n, c, groups, h, w = shape
    g = torch.Generator().manual_seed(sum(shape))
    grad = torch.randn(n, c, (h - 1) // 2 + 1, (w - 1) // 2 + 1, generator=g)
    grad = grad.to(dtype).contiguous(memory_format=torch.channels_last)
    weight = (torch.randn(c, c // groups, 3, 3, generator=g) * 0.3).to(dtype)
    before = torch.get_num_threads()
    torch.set_num_threads(threads or before)
    try:
        got = grouped_dgrad.input_grad(grad, weight, groups, (h, w), pairs=pairs)
    finally:
        torch.set_num_threads(before)
    return got, _reference(grad, weight, groups, (h, w))


def _skip_unless_taken(shape, dtype, pairs) -> None:
    c, groups = shape[1:3]
    if dtype == torch.bfloat16 and BF16_REASON is not None:
        pytest.skip(f"bf16 kernel unavailable: {BF16_REASON}")
    if not grouped_kernel.supports(c, groups, 2):
        pytest.skip(
            f"{c} channels in {groups} groups: not a shape the {grouped_kernel.ISA.name} build takes"
        )
    if pairs and not grouped_kernel.takes_pairs(c, groups, dtype):
        pytest.skip("no pair kernel for this shape")


@needs_kernel
@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("dtype,pairs", PATHS)
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_float64(shape, dtype, pairs, threads) -> None:
    _skip_unless_taken(shape, dtype, pairs)
    got, want = _run(shape, dtype, pairs, threads)
    assert got.dtype == dtype and got.shape == want.shape
    assert got.is_contiguous(memory_format=torch.channels_last)
    # float32 sums of exact products of the inputs, one rounding to the output's dtype
    unit = 2.0**-8 if dtype == torch.bfloat16 else 2.0**-20
    err = (got.double() - want).abs()
    assert bool((err <= want.abs() * unit + 1e-5 * want.abs().max()).all())


@needs_kernel
@pytest.mark.parametrize("dtype,pairs", PATHS)
def test_every_tap_lands_where_the_transposed_convolution_puts_it(dtype, pairs) -> None:
    # one nonzero tap at a time, of a weight with a distinct value per (out, in) pair: each tap's
    # products land on the input pixels of its phase, each group's matrix transposed
    c, groups, size = 64, 4, (6, 5)
    _skip_unless_taken((1, c, groups, *size), dtype, pairs)
    grad = torch.randn(1, c, 3, 3, generator=torch.Generator().manual_seed(1))
    grad = grad.to(dtype).contiguous(memory_format=torch.channels_last)
    values = torch.arange(c * c // groups, dtype=torch.float32).reshape(c, c // groups) / 64 - 4
    for tap in range(9):
        weight = torch.zeros(c, c // groups, 3, 3)
        weight.view(c, c // groups, 9)[:, :, tap] = values
        weight = weight.to(dtype)
        got = grouped_dgrad.input_grad(grad, weight, groups, size, pairs=pairs)
        want = _reference(grad, weight, groups, size)
        torch.testing.assert_close(got.double(), want, rtol=2**-7, atol=1e-3)


def test_tap_maps_by_hand() -> None:
    # input row 2a reads output row a through kernel row 1; row 2a + 1 reads output row a + 1
    # through row 0 and row a through row 2; the phase's convolution reads output row a − 1 + new
    maps = grouped_dgrad.tap_maps().tolist()
    assert maps[0] == [-1, -1, -1, -1, 4, -1, -1, -1, -1]  # (even, even): the centre only
    assert maps[1] == [-1, -1, -1, -1, 5, 3, -1, -1, -1]  # (even, odd): (1, 2) and (1, 0)
    assert maps[2] == [-1, -1, -1, -1, 7, -1, -1, 1, -1]  # (odd, even): (2, 1) and (0, 1)
    assert maps[3] == [-1, -1, -1, -1, 8, 6, -1, 2, 0]


@needs_kernel
def test_refuses_bad_input() -> None:
    grad = torch.randn(1, 32, 3, 3).contiguous(memory_format=torch.channels_last)
    weight = torch.randn(32, 4, 3, 3)
    with pytest.raises(ValueError, match="weight: expected shape"):
        grouped_dgrad.input_grad(grad, torch.randn(32, 8, 3, 3), 8, (6, 6))
    with pytest.raises(ValueError, match="weight: expected shape"):
        grouped_dgrad.input_grad(grad, weight, 0, (6, 6))
    with pytest.raises(ValueError, match="not the stride-2 output of a 8×8 input"):
        grouped_dgrad.input_grad(grad, weight, 8, (8, 8))
    with pytest.raises(ValueError, match="grad: expected a 4-d"):
        grouped_dgrad.input_grad(grad.double(), weight.double(), 8, (6, 6))
    with pytest.raises(ValueError, match="grad: expected a 4-d"):
        grouped_dgrad.input_grad(grad[0], weight, 8, (6, 6))
    with pytest.raises(ValueError, match="grad: 36 channels in 9 groups"):
        grouped_dgrad.input_grad(torch.randn(1, 36, 3, 3), torch.randn(36, 4, 3, 3), 9, (6, 6))


AVX2_MISSING = grouped_kernel.AVX2.cpu_needs - cpu_flags()


@pytest.mark.skipif(bool(AVX2_MISSING), reason=f"the AVX2 build needs {sorted(AVX2_MISSING)}")
@pytest.mark.parametrize("shape", [*SHAPES[:5], (2, 24, 6, 5, 7), (1, 40, 5, 6, 6)])
def test_the_avx2_build(shape, monkeypatch) -> None:
    # Also on AVX-512 CPUs; 24 and 40 channels are blocks of 8 that only this build takes.
    monkeypatch.setattr(grouped_kernel, "ISA", grouped_kernel.AVX2)
    if grouped_kernel.unavailable_reason(torch.float32) is not None:
        pytest.skip(f"AVX2 build unavailable: {grouped_kernel.unavailable_reason(torch.float32)}")
    got, want = _run(shape, torch.float32, False, threads=2)
    err = (got.double() - want).abs()
    assert bool((err <= want.abs() * 2.0**-20 + 1e-5 * want.abs().max()).all())
    with pytest.raises(ValueError, match="grad: expected a 4-d float32"):
        grouped_dgrad.input_grad(
            got.new_zeros(1, 32, 2, 2).bfloat16(), torch.zeros(32, 4, 3, 3), 8, (4, 4)
        )
