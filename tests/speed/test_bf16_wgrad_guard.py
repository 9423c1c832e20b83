"""The guard against torch's CPU bf16 weight gradients of convolutions over inputs narrower than
their stride: where it acts the weight gradient is float32's, elsewhere nothing changes.

The expected gradients are float64 convolutions of the same values; on torch 2.13 the plain
convolution fails these checks (values up to 1e36 or NaN, varying from call to call), which is
why each case is repeated.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import resnext
from resnext.speed import grouped_train
from resnext.speed.bf16_wgrad_guard import Bf16GuardedConv2d, guard_bf16_weight_grads

# (kernel, stride, input height, input width, groups): inputs narrower than the stride
NARROW = [
    (3, 2, 1, 1, 1),
    (3, 2, 6, 1, 8),  # grouped, 4 channels a group, as in ResNeXt-50's stage-4 3×3
    (3, 3, 5, 2, 1),
    (7, 2, 4, 1, 1),  # the stem's kernel
]


def _conv(kernel: int, stride: int, groups: int, seed: int) -> nn.Conv2d:
    torch.manual_seed(seed)
    return nn.Conv2d(32, 32, kernel, stride, kernel // 2, groups=groups, bias=True)


def _float64_grads(
    conv: nn.Conv2d, x: torch.Tensor, g: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The output and weight gradient of `conv` on `x` in float64, for output gradient `g`."""
    w = conv.weight.detach().double().requires_grad_()
    b = conv.bias.detach().double()
    out = F.conv2d(x.detach().double(), w, b, conv.stride, conv.padding, 1, conv.groups)
    out.backward(g.double())
    return out.detach(), w.grad


def _relative(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.detach().double() - want).abs().max() / want.abs().max())


@pytest.mark.parametrize(("kernel", "stride", "height", "width", "groups"), NARROW)
def test_guarded_weight_gradient_is_float32s_under_bf16_autocast(
    kernel: int, stride: int, height: int, width: int, groups: int
) -> None:
    for seed in range(4):
        conv = _conv(kernel, stride, groups, seed)
        conv.__class__ = Bf16GuardedConv2d
        x = torch.randn(3, 32, height, width).contiguous(memory_format=torch.channels_last)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = conv(x)
        assert out.dtype == torch.bfloat16  # as autocast returns a convolution
        g = torch.randn(out.shape)
        out.float().backward(g)
        want_out, want_dw = _float64_grads(conv, x, g)
        # the output rounded to bf16, and so the gradient reaching it: a right weight gradient
        # at bf16's precision (2e-3 measured), where torch's own is off by 1e10 or more, or NaN
        assert _relative(out, want_out) < 1e-2
        assert _relative(conv.weight.grad, want_dw) < 1e-2


@pytest.mark.parametrize(("kernel", "stride", "height", "width", "groups"), NARROW)
def test_guarded_weight_gradient_is_right_for_a_bf16_model(
    kernel: int, stride: int, height: int, width: int, groups: int
) -> None:
    for seed in range(4):
        conv = _conv(kernel, stride, groups, seed).to(torch.bfloat16)
        conv.__class__ = Bf16GuardedConv2d
        x = torch.randn(3, 32, height, width, dtype=torch.bfloat16)
        out = conv(x)
        assert out.dtype == torch.bfloat16
        g = torch.randn(out.shape)
        out.float().backward(g)
        _, want_dw = _float64_grads(conv, x, g)
        assert conv.weight.grad.dtype == torch.bfloat16
        assert _relative(conv.weight.grad, want_dw) < 1e-2  # bf16's rounding of a right value


@pytest.mark.parametrize(
    "case",
    ["wide enough, bf16", "narrow, float32", "narrow, bf16 without grad", "narrow, frozen weight"],
)
def test_the_guard_changes_nothing_where_it_is_not_needed(case: str) -> None:
    plain = _conv(3, 2, 1, 0)
    guarded = copy.deepcopy(plain)
    guarded.__class__ = Bf16GuardedConv2d
    width = 2 if case.startswith("wide") else 1
    x = torch.randn(2, 32, 3, width)
    if case.endswith("frozen weight"):
        plain.weight.requires_grad_(False)
        guarded.weight.requires_grad_(False)
    outs = []
    for conv in (plain, guarded):
        with (
            torch.autocast("cpu", dtype=torch.bfloat16, enabled="bf16" in case or "frozen" in case),
            torch.set_grad_enabled("without grad" not in case),
        ):
            outs.append(conv(x))
    assert outs[0].dtype == outs[1].dtype
    assert torch.equal(outs[0], outs[1])  # the very same call
    if outs[0].requires_grad:
        g = torch.randn(outs[0].shape)
        for out in outs:
            out.float().backward(g)
        for mine, theirs in zip(plain.parameters(), guarded.parameters(), strict=True):
            assert (mine.grad is None) == (theirs.grad is None)
            assert mine.grad is None or torch.equal(mine.grad, theirs.grad)


def test_the_guard_takes_only_convolutions_that_can_meet_a_narrow_input() -> None:
    model = resnext.create_model("resnext50_32x4d")
    keys = list(model.state_dict())
    # ResNeXt-50's convolutions wider than one pixel with a stride: the stem's 7×7 and the
    # stride-2 grouped 3×3 opening stages 2, 3 and 4 (the strided 1×1 shortcuts are one wide)
    assert guard_bf16_weight_grads(model) == 4
    guarded = sorted(n for n, m in model.named_modules() if type(m) is Bf16GuardedConv2d)
    assert guarded == ["conv1", "layer2.0.conv2", "layer3.0.conv2", "layer4.0.conv2"]
    assert list(model.state_dict()) == keys


def test_the_grouped_training_kernels_onednn_weight_gradient_is_right_on_narrow_inputs() -> None:
    # the training fast path's grouped 3×3 offers torch's (oneDNN's) weight gradient among its
    # candidates; in bf16 it is computed in float32 where torch's would be wrong
    for seed in range(4):
        torch.manual_seed(seed)
        x = torch.randn(3, 128, 6, 1).bfloat16().contiguous(memory_format=torch.channels_last)
        w = torch.randn(128, 4, 3, 3).bfloat16()
        out_shape = F.conv2d(x, w, None, 2, 1, 1, 32).shape
        g = torch.randn(out_shape).bfloat16().contiguous(memory_format=torch.channels_last)
        got = grouped_train.weight_grad_candidates(g, x, w, 32, 2)["onednn"]()
        wd = w.double().requires_grad_()
        F.conv2d(x.double(), wd, None, 2, 1, 1, 32).backward(g.double())
        assert got.dtype == torch.bfloat16
        assert _relative(got, wd.grad) < 1e-2
