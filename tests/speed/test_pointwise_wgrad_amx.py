"""The AMX weight gradient of the 1×1 convolution equals torch's in float64, and the training
chooser offers it."""

from __future__ import annotations

import pytest
import torch

from resnext.speed import pointwise_train, pointwise_wgrad_amx

REASON = pointwise_wgrad_amx.unavailable_reason()
needs_amx = pytest.mark.skipif(REASON is not None, reason=f"AMX kernel unavailable: {REASON}")

# (batch, C_in, C_out, height, width, stride): both threading modes (rows split: many pixels and
# a small gradient; output columns split: few pixels, a large one), pixel counts that leave a
# partial chunk, a partial 32-row step and an odd row, one column of 16-wide tiles, stride 2,
# a chunk of rows longer than one minimum chunk, the panels over either operand, and (one thread)
# large sums over so many rows that they go in 2 MB chunks, the last one partial and odd.
SHAPES = [
    (2, 32, 48, 5, 7, 1),
    (3, 64, 16, 9, 9, 2),
    (1, 16, 16, 1, 1, 1),
    (2, 256, 128, 13, 11, 1),
    (2, 128, 512, 6, 6, 2),
    (4, 1024, 2048, 3, 3, 1),
    (4, 2048, 1024, 3, 3, 1),
    (8, 64, 32, 23, 23, 1),
    (2, 512, 1024, 14, 14, 1),
    (5, 512, 512, 27, 31, 1),
]


def _cl(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.bfloat16).contiguous(memory_format=torch.channels_last)


def _inputs(shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    n, ci, co, h, w, stride = shape
    g = torch.Generator().manual_seed(sum(shape))
    x = _cl(torch.randn(n, ci, h, w, generator=g))
    grad = _cl(torch.randn(n, co, (h - 1) // stride + 1, (w - 1) // stride + 1, generator=g))
    return x, grad


@needs_amx
@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_float64(shape: tuple[int, ...], threads: int) -> None:
    stride = shape[5]
    x, grad = _inputs(shape)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = pointwise_wgrad_amx.weight_grad(x, grad, stride)
    finally:
        torch.set_num_threads(before)
    sub = x[:, :, ::stride, ::stride].double()
    want = torch.einsum("nohw,nihw->oi", grad.double(), sub)[:, :, None, None]
    assert got.dtype == torch.float32 and got.shape == want.shape
    # bf16 products are exact in float32; only the float32 sums over the pixels round.
    assert float((got.double() - want).abs().max() / want.abs().max()) < 1e-5


@needs_amx
@pytest.mark.parametrize("rows,m,n", [(3000, 64, 32), (200, 64, 32), (2, 32, 32), (300, 512, 256)])
def test_writes_all_of_out(rows: int, m: int, n: int) -> None:
    """The kernel neither reads nor keeps what `out` held: a NaN-filled one comes back exact,
    with rows split between the threads (many) or the output columns (few), one thread or two."""
    g = torch.Generator().manual_seed(rows + m + n)
    a = torch.randn(rows, m, generator=g).to(torch.bfloat16)
    b = torch.randn(rows, n, generator=g).to(torch.bfloat16)
    want = (a.double().t() @ b.double()).float()
    for threads in (1, 2):
        out = torch.full((m, n), float("nan"))
        rc = pointwise_wgrad_amx._library().pointwise_wgrad_amx(
            a.data_ptr(), b.data_ptr(), out.data_ptr(), rows, m, n, threads
        )
        assert rc == 0
        assert torch.allclose(out, want, rtol=1e-5, atol=1e-4), threads


@needs_amx
def test_refuses_what_it_does_not_take() -> None:
    x, grad = _inputs((1, 32, 16, 4, 4, 1))
    with pytest.raises(ValueError, match="divisible by 16"):
        pointwise_wgrad_amx.weight_grad(x[:, :24], grad)
    with pytest.raises(ValueError, match="bfloat16"):
        pointwise_wgrad_amx.weight_grad(x.float(), grad.float())
    with pytest.raises(ValueError, match="stride-2"):
        pointwise_wgrad_amx.weight_grad(x, grad, 2)


@needs_amx
def test_offered_to_the_chooser() -> None:
    x, grad = _inputs((2, 64, 32, 6, 6, 1))
    weight = torch.zeros(32, 64, 1, 1, dtype=torch.bfloat16)
    candidates = pointwise_train.weight_grad_candidates(grad, x, weight, 1)
    assert "ours-amx" in candidates
    # the GEMM's bf16 result is rounded to bf16 (2⁻⁸ relative); ours stays float32
    torch.testing.assert_close(
        candidates["ours-amx"](), candidates["gemm"]().float(), rtol=8e-3, atol=1e-3
    )
