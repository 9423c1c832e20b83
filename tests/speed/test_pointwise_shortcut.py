"""A bottleneck's last bf16 1×1 and its projection shortcut as one pair-dot product
(`pointwise_gemm.conv1x1_shortcut`): against float64 within the bound of float32 sums and one
rounding, its refusals, and `fuse_dot_shortcuts`, the pass that puts it in `optimize`'s model."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from block_nets import Bottleneck
from tensor_checks import nhwc, rel_err
from torch import nn

from resnext.errors import ConfigError
from resnext.speed import pointwise_gemm, shortcut_fusion
from resnext.speed.conv_x3_swap import DotConv1x1, swap_convs_dot
from resnext.speed.shortcut_fusion import (
    ShortcutDotConv1x1,
    dot_shortcut_fusable,
    fuse_dot_shortcuts,
)

REASON = pointwise_gemm.unavailable_reason()
needs_dot = pytest.mark.skipif(REASON is not None, reason=f"bf16 dot kernel unavailable: {REASON}")


def _bf16(t: torch.Tensor) -> torch.Tensor:
    return nhwc(t.to(torch.bfloat16))


def _reference(g, x, w1, w2, bias, stride, relu):
    """The float64 result on the bf16 operands, and each output's error bound: float32 sums of
    K1 + K2 products and the bias (each step at most 2^-24 of the running magnitude), then one
    rounding to bf16 (at most 2^-8 of the value)."""
    w1, w2 = w1.to(torch.bfloat16).double(), w2.to(torch.bfloat16).double()
    exact = F.conv2d(g.double(), w1, bias.double()) + F.conv2d(x.double(), w2, stride=stride)
    mags = F.conv2d(g.double().abs(), w1.abs(), bias.double().abs())
    mags = mags + F.conv2d(x.double().abs(), w2.abs(), stride=stride)
    if relu:
        exact = exact.clamp(min=0)
    summed = (w1.shape[1] + w2.shape[1] + 2) * 2.0**-24 * mags
    return exact, summed + 2.0**-8 * (exact.abs() + summed)


CASES = [
    # n, k1 (last 1×1's inputs), k2 (projection's), outputs, input height, width, stride, relu
    (1, 64, 64, 64, 1, 1, 1, False),  # one pixel
    (3, 64, 256, 256, 8, 6, 1, True),  # a stride-1 projection (ResNeXt-50's first block)
    (2, 128, 64, 192, 9, 11, 2, True),  # odd maps: last row and column dropped; 3 strips
    (2, 256, 128, 128, 28, 28, 2, True),  # 392 rows split by rows, each block prefetching both
    (1, 512, 1024, 128, 14, 14, 2, False),  # 49 rows: split by column strips
    (2, 128, 192, 64, 10, 8, 3, True),
]


@needs_dot
@pytest.mark.parametrize("n,k1,k2,c,h,w,stride,relu", CASES)
def test_matches_float64_within_the_bound_of_float32_sums_and_one_rounding(
    n: int, k1: int, k2: int, c: int, h: int, w: int, stride: int, relu: bool
) -> None:
    torch.manual_seed(k1 + k2 + c + h)
    ho, wo = (h - 1) // stride + 1, (w - 1) // stride + 1
    g, x = _bf16(torch.randn(n, k1, ho, wo)), _bf16(torch.randn(n, k2, h, w))
    w1, w2 = torch.randn(c, k1, 1, 1) / k1**0.5, torch.randn(c, k2, 1, 1) / k2**0.5
    bias = torch.randn(c)
    want, bound = _reference(g, x, w1, w2, bias, stride, relu)
    before = (g.clone(), x.clone())
    packed = pointwise_gemm.pack_conv_shortcut(w1, w2)
    with torch.no_grad():
        got = pointwise_gemm.conv1x1_shortcut(g, x, packed, bias, stride, relu)
        op = torch.ops.resnext.pointwise_conv_bf16_shortcut(g, x, packed, bias, stride, relu)
    assert got.dtype == torch.bfloat16 and got.is_contiguous(memory_format=torch.channels_last)
    assert got.shape == (n, c, ho, wo)
    assert ((got.double() - want).abs() <= bound).all()
    assert torch.equal(op, got)
    assert torch.equal(g, before[0]) and torch.equal(x, before[1])  # read, not written


def _args() -> dict:
    return {
        "g": _bf16(torch.randn(1, 64, 2, 2)),
        "x": _bf16(torch.randn(1, 128, 4, 4)),
        "packed": pointwise_gemm.pack_conv_shortcut(
            torch.randn(64, 64, 1, 1), torch.randn(64, 128, 1, 1)
        ),
        "bias": torch.randn(64),
        "stride": 2,
        "relu": True,
    }


@needs_dot
@pytest.mark.parametrize(
    "change,message",
    [
        (lambda a: {**a, "g": a["g"].float()}, "g: expected a 4-D bfloat16"),
        (lambda a: {**a, "x": a["x"][0]}, "x: expected a 4-D bfloat16"),
        (lambda a: {**a, "stride": 1}, r"x: expected 1 images whose 1-strided pixels are g's 2x2"),
        (lambda a: {**a, "x": _bf16(torch.randn(2, 128, 4, 4))}, "x: expected 1 images"),
        (lambda a: {**a, "x": _bf16(torch.randn(1, 64, 4, 4))}, "packed: expected a pack_conv_sh"),
        (lambda a: {**a, "bias": torch.randn(32)}, "bias: expected 64 float32 values"),
        (lambda a: {**a, "stride": 0}, "stride: expected a positive integer, got 0"),
        (lambda a: {**a, "stride": True}, "stride: expected a positive integer, got True"),
    ],
)
def test_bad_inputs_are_refused_by_name(change: Callable[[dict], dict], message: str) -> None:
    with pytest.raises(ValueError, match=message), torch.no_grad():
        pointwise_gemm.conv1x1_shortcut(**change(_args()))


@needs_dot
def test_an_input_that_needs_a_gradient_is_refused() -> None:
    args = _args()
    args["x"].requires_grad_(True)
    with pytest.raises(ValueError, match="pointwise_conv_bf16_shortcut: an inference kernel"):
        pointwise_gemm.conv1x1_shortcut(**args)


def test_the_two_weights_must_have_the_same_outputs() -> None:
    with pytest.raises(ValueError, match=r"shortcut: expected 64 outputs .* \(128, 32, 1, 1\)"):
        pointwise_gemm.pack_conv_shortcut(torch.randn(64, 64, 1, 1), torch.randn(128, 32, 1, 1))


class _Block(nn.Module):
    """1×1 → ReLU → 3×3 (the stride) → ReLU → 1×1 → + shortcut → ReLU, as ResNeXt's bottleneck
    (its BNs folded away), the shortcut a projection where the shape changes, else x."""

    def __init__(self, cin: int, width: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, width, 1)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1)
        self.conv3 = nn.Conv2d(width, cout, 1)
        self.relu = nn.ReLU()
        project = stride != 1 or cin != cout
        self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride)) if project else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        y = self.relu(self.conv2(self.relu(self.conv1(x))))
        return self.relu(self.conv3(y) + shortcut)


class _Net(nn.Module):
    """A 3×3 stem, then bottlenecks with channels in 64s: a stride-1 projection, an identity
    shortcut, a stride-2 projection, and one whose last 1×1 has the stride (not fusable)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 64, 3, padding=1)
        self.blocks = nn.Sequential(
            _Block(64, 64, 128, 1),
            _Block(128, 64, 128, 1),
            _Block(128, 64, 256, 2),
            Bottleneck(256, 64, 256, 2),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.stem(x))


def _swapped(seed: int) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """_Net in bf16 with every 1×1 on our kernel, an input, and the unfused model's output."""
    torch.manual_seed(seed)
    model = _Net().eval().bfloat16()
    x = _bf16(torch.randn(2, 3, 9, 8))
    swap_convs_dot(model, x, mode="on")
    with torch.no_grad():
        want = model(x)
    return model, x, want


@needs_dot
def test_the_pass_fuses_each_projection_into_its_blocks_last_1x1() -> None:
    model, x, want = _swapped(20)
    choices = fuse_dot_shortcuts(model, x, mode="on")
    assert [(c.name, c.variant, c.chosen) for c in choices] == [
        ("blocks.0.conv3", "dot+shortcut", "fused"),  # stride 1
        ("blocks.2.conv3", "dot+shortcut", "fused"),  # stride 2
    ]
    assert isinstance(model.blocks[0].conv3, ShortcutDotConv1x1)
    assert isinstance(model.blocks[1].conv3, DotConv1x1)  # an identity shortcut: unchanged
    assert model.blocks[2].conv3.stride == 2  # the projection's, 9x8 read as 5x4
    assert isinstance(model.blocks[3].conv3, DotConv1x1)  # strided itself: left as it was
    before = x.clone()
    with torch.no_grad():
        got = model(x)
    assert rel_err(got, want) < 2e-2  # one rounding fewer: the projection is not stored in bf16
    assert torch.equal(x, before)
    # the fused blocks' projections are gone from the model, the unfusable one's kept
    projections = {n for n, m in model.named_modules() if isinstance(m, DotConv1x1)}
    assert {n for n in projections if "downsample" in n} == {"blocks.3.downsample.0"}


@needs_dot
def test_auto_fuses_only_where_one_call_is_faster(monkeypatch: pytest.MonkeyPatch) -> None:
    model, x, _ = _swapped(21)

    def fused_faster_at_stride_1(fns, x, repeats, before=None):
        fns[0](x), fns[1](x)  # both ways run (a wrong shape would fail)
        return [2.0, 1.0] if x.shape[2] == 9 else [1.0, 2.0]

    monkeypatch.setattr(shortcut_fusion, "time_each_ms", fused_faster_at_stride_1)
    choices = fuse_dot_shortcuts(model, x, mode="auto")
    assert {c.name: c.chosen for c in choices} == {
        "blocks.0.conv3": "fused",
        "blocks.2.conv3": "separate",
    }
    assert isinstance(model.blocks[0].conv3, ShortcutDotConv1x1)
    assert isinstance(model.blocks[2].conv3, DotConv1x1)


def test_pass_modes() -> None:
    model = _Net().eval().bfloat16()
    x = _bf16(torch.randn(1, 3, 8, 8))
    assert fuse_dot_shortcuts(model, x, mode="off") == []
    assert fuse_dot_shortcuts(model, x.float(), mode="on") == []  # bf16 only
    with pytest.raises(ConfigError, match="pointwise_bf16: expected one of"):
        fuse_dot_shortcuts(model, x, mode="always")


@needs_dot  # the modules below are built on the kernel (on an AVX2-only CPU it refuses)
def test_what_is_fusable() -> None:
    last = DotConv1x1(nn.Conv2d(64, 128, 1).bfloat16(), relu=True, in_place=True)
    projection = DotConv1x1(nn.Conv2d(64, 128, 1, stride=2).bfloat16())
    assert dot_shortcut_fusable(last, projection)
    assert not dot_shortcut_fusable(projection, last)  # the last 1×1 must be stride 1
    assert not dot_shortcut_fusable(last, DotConv1x1(nn.Conv2d(64, 128, 1).bfloat16(), relu=True))
    assert not dot_shortcut_fusable(last, DotConv1x1(nn.Conv2d(64, 64, 1).bfloat16()))
    assert not dot_shortcut_fusable(last, nn.Conv2d(64, 128, 1).bfloat16())
    with pytest.raises(ValueError, match="shortcut: expected a 1×1 DotConv1x1 without ReLU"):
        ShortcutDotConv1x1(last, last)
