"""The guards against torch's CPU convolution-backward bugs (`resnext.speed.conv_guard`): where
they act the weight gradient is right and memory stays whole, elsewhere nothing changes.

Case 1 (bf16 weight gradients over inputs narrower than the stride): the expected gradients are
float64 convolutions of the same values; on torch 2.13 the plain convolution fails these checks
(values up to 1e36 or NaN, varying from call to call), which is why each case is repeated. Case 2
(channels-last float32 weight gradients of strided 1×1s with few inputs, which write past their
buffers): a fresh process runs the guarded ways many times and must exit cleanly; unguarded, it
aborts or crashes within those calls.
"""

from __future__ import annotations

import copy
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from tensor_checks import float64_conv_grads, rel_err
from torch import nn

import resnext
from resnext.speed import grouped_train
from resnext.speed.conv_guard import GuardedConv2d, guard_conv_backward, may_meet_a_case

# (kernel, stride, input height, input width, groups): inputs narrower than the stride
NARROW = [
    (3, 2, 1, 1, 1),
    (3, 2, 6, 1, 8),  # grouped, 4 channels a group, as in ResNeXt-50's stage-4 3×3
    (3, 3, 5, 2, 1),
    (7, 2, 4, 1, 1),  # the stem's kernel
    (1, 3, 2, 1, 1),  # a strided 1×1 (wrong with few inputs)
]


def _conv(kernel: int, stride: int, groups: int, seed: int) -> nn.Conv2d:
    torch.manual_seed(seed)
    return nn.Conv2d(32, 32, kernel, stride, kernel // 2, groups=groups, bias=True)


def _float64_grads(
    conv: nn.Conv2d, x: torch.Tensor, g: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The output and weight gradient of `conv` on `x` in float64, for output gradient `g`."""
    out, _, dw = float64_conv_grads(
        x, conv.weight, g, conv.stride, conv.padding, conv.groups, conv.bias
    )
    return out, dw


@pytest.mark.parametrize(("kernel", "stride", "height", "width", "groups"), NARROW)
def test_guarded_weight_gradient_is_float32s_under_bf16_autocast(
    kernel: int, stride: int, height: int, width: int, groups: int
) -> None:
    for seed in range(4):
        conv = _conv(kernel, stride, groups, seed)
        conv.__class__ = GuardedConv2d
        x = torch.randn(3, 32, height, width).contiguous(memory_format=torch.channels_last)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = conv(x)
        assert out.dtype == torch.bfloat16  # as autocast returns a convolution
        g = torch.randn(out.shape)
        out.float().backward(g)
        want_out, want_dw = _float64_grads(conv, x, g)
        # the output rounded to bf16, and so the gradient reaching it: a right weight gradient
        # at bf16's precision (2e-3 measured), where torch's own is off by 1e10 or more, or NaN
        assert rel_err(out, want_out) < 1e-2
        assert rel_err(conv.weight.grad, want_dw) < 1e-2


@pytest.mark.parametrize(("kernel", "stride", "height", "width", "groups"), NARROW)
def test_guarded_weight_gradient_is_right_for_a_bf16_model(
    kernel: int, stride: int, height: int, width: int, groups: int
) -> None:
    for seed in range(4):
        conv = _conv(kernel, stride, groups, seed).to(torch.bfloat16)
        conv.__class__ = GuardedConv2d
        x = torch.randn(3, 32, height, width, dtype=torch.bfloat16)
        out = conv(x)
        assert out.dtype == torch.bfloat16
        g = torch.randn(out.shape)
        out.float().backward(g)
        _, want_dw = _float64_grads(conv, x, g)
        assert conv.weight.grad.dtype == torch.bfloat16
        assert rel_err(conv.weight.grad, want_dw) < 1e-2  # bf16's rounding of a right value


@pytest.mark.parametrize(
    "case",
    ["wide enough, bf16", "narrow, float32", "narrow, bf16 without grad", "narrow, frozen weight"],
)
def test_the_guard_changes_nothing_where_it_is_not_needed(case: str) -> None:
    plain = _conv(3, 2, 1, 0)
    guarded = copy.deepcopy(plain)
    guarded.__class__ = GuardedConv2d
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


def test_the_guard_takes_only_convolutions_that_can_meet_a_case() -> None:
    model = resnext.create_model("resnext50_32x4d")
    keys = list(model.state_dict())
    # ResNeXt-50's strided convolutions: the stem's 7×7, and the stride-2 grouped 3×3 and the
    # projection shortcut's 1×1 opening stages 2, 3 and 4
    assert guard_conv_backward(model) == 7
    guarded = sorted(n for n, m in model.named_modules() if type(m) is GuardedConv2d)
    stages = [f"layer{s}.0.{name}" for s in (2, 3, 4) for name in ("conv2", "downsample.0")]
    assert guarded == sorted(["conv1", *stages])
    assert list(model.state_dict()) == keys
    # (in, out, kernel, stride): both cases need a stride
    takes = {(8, 16, 1, 2): True, (256, 512, 1, 2): True, (8, 16, 1, 1): False}
    takes |= {(64, 64, 3, 2): True, (64, 64, 3, 1): False, (3, 64, 7, 2): True}
    for (cin, cout, kernel, stride), expected in takes.items():
        assert may_meet_a_case(nn.Conv2d(cin, cout, kernel, stride)) is expected


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
        _, _, want = float64_conv_grads(x, w, g, 2, 1, 32)
        assert got.dtype == torch.bfloat16
        assert rel_err(got, want) < 1e-2


# A fresh process: the guarded module and the 1×1 training path's oneDNN weight-gradient candidate,
# each on channels-last float32 and bf16 inputs of shapes where torch's own weight gradient writes
# past its buffers (3-12 inputs, 8-16 outputs, stride 2, even sizes), many times, with
# allocations between so that a write astray meets malloc's checks. Each result is checked against
# float64.
FEW_INPUTS_SCRIPT = textwrap.dedent(
    """
    import torch, torch.nn.functional as F
    from resnext.speed import pointwise_train
    from resnext.speed.conv_guard import GuardedConv2d
    torch.manual_seed(0)
    for cin, cout, size in [(4, 16, 14), (8, 8, 14), (12, 16, 56)]:
        conv = torch.nn.Conv2d(cin, cout, 1, 2)
        conv.__class__ = GuardedConv2d
        for i in range(60):
            x = torch.randn(3, cin, size, size).contiguous(memory_format=torch.channels_last)
            conv.weight.grad = None
            out = conv(x)
            g = torch.randn(out.shape).contiguous(memory_format=torch.channels_last)
            out.backward(g)
            wd = conv.weight.detach().double().requires_grad_()
            F.conv2d(x.double(), wd, conv.bias.detach().double(), 2).backward(g.double())
            err = (conv.weight.grad.double() - wd.grad).abs().max() / wd.grad.abs().max()
            assert err < 1e-5, (cin, cout, size, float(err))
            w = conv.weight.detach()
            dw = pointwise_train.weight_grad_candidates(g, x, w, 2)["onednn"]()
            assert (dw.double() - wd.grad).abs().max() / wd.grad.abs().max() < 1e-5
            junk = [torch.empty(k) for k in (7, 33, 100, 1000)]
            del junk
    # bf16 under autocast, and the candidate on bf16 tensors, from one image on
    for cin, cout, size in [(3, 8, 12), (8, 16, 12)]:
        conv = torch.nn.Conv2d(cin, cout, 1, 2)
        conv.__class__ = GuardedConv2d
        for i in range(60):
            x = torch.randn(1, cin, size, size - 4).contiguous(memory_format=torch.channels_last)
            conv.weight.grad = None
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = conv(x)
            g = torch.randn(out.shape).contiguous(memory_format=torch.channels_last)
            out.float().backward(g)
            xb, gb = x.bfloat16(), g.bfloat16()
            wd = conv.weight.detach().bfloat16().double().requires_grad_()
            F.conv2d(xb.double(), wd, None, 2).backward(gb.double())
            err = (conv.weight.grad.double() - wd.grad).abs().max() / wd.grad.abs().max()
            assert err < 3e-2, (cin, cout, size, float(err))
            w = conv.weight.detach().bfloat16()
            dw = pointwise_train.weight_grad_candidates(gb, xb, w, 2)["onednn"]()
            assert (dw.double() - wd.grad).abs().max() / wd.grad.abs().max() < 3e-2
            junk = [torch.empty(k) for k in (7, 33, 100, 1000)]
            del junk
    print("clean")
    """
)


def test_strided_1x1s_with_few_inputs_train_right_and_leave_memory_whole() -> None:
    done = subprocess.run(
        [sys.executable, "-c", FEW_INPUTS_SCRIPT], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().endswith("clean")
