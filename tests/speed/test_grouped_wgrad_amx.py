"""The AMX weight gradient of the grouped 3×3 convolution equals torch's in float64, and the
training chooser offers it."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from resnext.speed import autotune, grouped_train, grouped_wgrad_amx
from resnext.speed.grouped_train import use_grouped_kernels

REASON = grouped_wgrad_amx.unavailable_reason()
needs_amx = pytest.mark.skipif(REASON is not None, reason=f"AMX kernel unavailable: {REASON}")

# (batch, channels, groups, height, width, stride): every group width the kernel packs (1-8
# channels per group block-diagonally, 16 dense, 32 as 2 × 2 tiles), both strides, odd and
# unequal sizes (the zero border and the positions past each row), images of one pixel, chunks
# of 1, 3 and 4 tiles, and batches that split unevenly over threads.
SHAPES = [
    (2, 64, 16, 9, 11, 1),
    (1, 16, 1, 5, 5, 1),
    (3, 128, 32, 13, 7, 2),
    (2, 64, 4, 6, 8, 2),
    (1, 32, 16, 3, 17, 1),
    (2, 48, 6, 10, 10, 1),
    (2, 48, 24, 4, 9, 2),
    (1, 16, 4, 1, 1, 1),
    (1, 16, 4, 2, 1, 2),
    (2, 64, 2, 5, 6, 1),
    (3, 96, 3, 6, 6, 2),
]


def _cl(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.bfloat16).contiguous(memory_format=torch.channels_last)


def _reference(x: torch.Tensor, grad: torch.Tensor, groups: int, stride: int) -> torch.Tensor:
    weight = torch.zeros(x.shape[1], x.shape[1] // groups, 3, 3, dtype=torch.float64)
    return torch.ops.aten.convolution_backward(
        grad.double(), x.double(), weight, None, [stride] * 2, [1, 1], [1, 1], False, [0, 0],
        groups, [False, True, False],
    )[1]  # fmt: skip


def _inputs(shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    n, c, _, h, w, stride = shape
    g = torch.Generator().manual_seed(sum(shape))
    x = _cl(torch.randn(n, c, h, w, generator=g))
    grad = _cl(torch.randn(n, c, (h - 1) // stride + 1, (w - 1) // stride + 1, generator=g))
    return x, grad


@needs_amx
@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_float64(shape: tuple[int, ...], threads: int) -> None:
    groups, stride = shape[2], shape[5]
    x, grad = _inputs(shape)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = grouped_wgrad_amx.weight_grad(x, grad, groups, stride)
    finally:
        torch.set_num_threads(before)
    want = _reference(x, grad, groups, stride)
    assert got.dtype == torch.float32 and got.shape == want.shape
    # bf16 × bf16 products are exact in float32; only the float32 sums of up to n·h·w terms
    # round (a few units of 2⁻²⁴ each, relative to the largest sum).
    scale = want.abs().max()
    assert float((got.double() - want).abs().max() / scale) < 1e-5


@needs_amx
def test_refuses_what_it_does_not_take() -> None:
    x, grad = _inputs((1, 48, 4, 5, 5, 1))  # 12 channels per group
    with pytest.raises(ValueError, match="C/groups"):
        grouped_wgrad_amx.weight_grad(x, grad, 4, 1)
    with pytest.raises(ValueError, match="stride 1 or 2"):
        grouped_wgrad_amx.weight_grad(x, grad, 12, 3)
    with pytest.raises(ValueError, match="bfloat16"):
        grouped_wgrad_amx.weight_grad(x.float(), grad.float(), 12, 1)
    with pytest.raises(ValueError, match="grad: expected shape"):
        grouped_wgrad_amx.weight_grad(x, grad[:, :, :4], 12, 1)


@needs_amx
def test_training_module_takes_it_when_preferred(monkeypatch) -> None:
    torch.manual_seed(3)
    plain = nn.Conv2d(64, 64, 3, 2, 1, groups=16, bias=False)
    fast = copy.deepcopy(plain)
    assert use_grouped_kernels(fast) == 1
    calls = []
    fn = grouped_wgrad_amx.weight_grad
    monkeypatch.setattr(grouped_wgrad_amx, "weight_grad", lambda *a: calls.append(1) or fn(*a))
    x = torch.randn(2, 64, 9, 9).contiguous(memory_format=torch.channels_last)
    grads = []
    for module, preferred in ((plain, ()), (fast, ("ours-amx",))):
        with autotune.CHOOSER.prefer(*preferred):  # the backward's choices too
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = module(x)
            out.float().square().sum().backward()
        grads.append(module.weight.grad)
    assert calls == [1]
    torch.testing.assert_close(grads[1], grads[0], rtol=2e-2, atol=2e-2)


@needs_amx
def test_offered_to_the_chooser() -> None:
    x, grad = _inputs((2, 32, 8, 6, 6, 1))
    weight = torch.zeros(32, 4, 3, 3, dtype=torch.bfloat16)
    candidates = grouped_train.weight_grad_candidates(grad, x, weight, 8, 1)
    assert "ours-amx" in candidates
    # oneDNN's bf16 gradient is rounded to bf16 (2⁻⁸ relative); ours stays float32
    torch.testing.assert_close(
        candidates["ours-amx"](), candidates["onednn"]().float(), rtol=8e-3, atol=1e-3
    )


@needs_amx
@pytest.mark.parametrize("cpg", [16, 32])
def test_wide_groups_are_taken_in_bf16_only(cpg: int, monkeypatch) -> None:
    torch.manual_seed(cpg)
    plain = nn.Conv2d(64, 64, 3, 1, 1, groups=64 // cpg, bias=False)
    fast = copy.deepcopy(plain)
    assert use_grouped_kernels(fast) == 1  # only the AMX kernels take these groups
    x = torch.randn(2, 64, 7, 7).contiguous(memory_format=torch.channels_last)
    calls = []
    fn = grouped_wgrad_amx.weight_grad
    monkeypatch.setattr(grouped_wgrad_amx, "weight_grad", lambda *a: calls.append(1) or fn(*a))
    fast(x).square().sum().backward()  # float32: torch's convolution, not the bf16 kernels
    assert calls == []
    torch.testing.assert_close(fast.weight.grad, _float_grad(plain, x), rtol=1e-5, atol=1e-5)
    fast.weight.grad = None
    with autotune.CHOOSER.prefer("ours-amx"):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = fast(x)
        out.float().square().sum().backward()
    assert calls == [1]
    want = _float_grad(copy.deepcopy(plain).double(), x.double())
    assert float((fast.weight.grad.double() - want).abs().max() / want.abs().max()) < 3e-2


def _float_grad(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    conv.weight.grad = None
    conv(x).square().sum().backward()
    return conv.weight.grad
