"""A bottleneck's first bf16 1×1 and its grouped 3×3 in one kernel call (`dot_grouped`): equal
bit for bit to the two kernels apart and close to float64 on every grouped form, thread split
and step size; its refusals; and `fuse_dot_pointwise`, the pass that puts it in `optimize`'s
model."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from dot_modules import bf16, pair
from grouped_timing import time_grouped_ways
from tensor_checks import rel_err
from torch import nn

from resnext.errors import ConfigError
from resnext.speed import chain_fusion, dot_grouped, grouped_split, pointwise_gemm
from resnext.speed.conv_x3_swap import DotConv1x1
from resnext.speed.dot_grouped import DotPointwiseGrouped, dot_fusable, fuse_dot_pointwise
from resnext.speed.grouped_split import output_order
from resnext.speed.grouped_swap import (
    FastGroupedConv3x3,
    NativeGroupedConv3x3,
    swap_grouped_convs,
)

REASON = pointwise_gemm.unavailable_reason() or grouped_split.unavailable_reason()
needs_kernels = pytest.mark.skipif(REASON is not None, reason=f"bf16 kernels unavailable: {REASON}")


def _float64(x: torch.Tensor, conv1: nn.Conv2d, conv2: nn.Conv2d) -> torch.Tensor:
    """The pair in float64 on the bf16 values (the 1×1's output not rounded)."""
    mid = F.conv2d(x.double(), conv1.weight.double(), conv1.bias.double()).relu()
    w2, b2 = conv2.weight.double(), conv2.bias.double()
    return F.conv2d(mid, w2, b2, conv2.stride, 1, 1, conv2.groups).relu()


CASES = [
    # n, inputs, width, groups, height, width of the map, stride, grouped variant, threads
    (2, 64, 128, 32, 9, 11, 1, "split", 2),  # 4 per group; odd map, 6-pixel tiles
    (1, 128, 256, 32, 14, 14, 2, "split", 2),  # 8 per group, one image split between threads
    (3, 64, 128, 32, 7, 7, 1, "pairs", 2),  # 3 images on 2 threads: a split inside an image
    (2, 128, 256, 32, 10, 9, 2, "pairs", 3),  # 8 per group, three threads, odd height
    (1, 256, 512, 32, 7, 7, 1, "pairs", 2),  # 16 per group: the wide kernel
    (2, 128, 128, 4, 5, 8, 2, "pairs", 5),  # 32 per group; more threads than output rows
    (1, 64, 128, 32, 8, 8, 1, "widening", 2),  # float32 weights on bf16 activations
    (2, 64, 128, 16, 6, 7, 1, "split", 1),  # 8 per group, one thread
    (1, 64, 64, 16, 1, 1, 2, "pairs", 2),  # one pixel
]


@needs_kernels
@pytest.mark.parametrize("ahead", [1, 56, 10_000])
@pytest.mark.parametrize("n,cin,width,groups,h,w,stride,variant,threads", CASES)
def test_equals_the_two_kernels_apart_and_float64(
    n: int,
    cin: int,
    width: int,
    groups: int,
    h: int,
    w: int,
    stride: int,
    variant: str,
    threads: int,
    ahead: int,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pointwise, grouped, conv1, conv2 = pair(cin, width, groups, stride, variant, seed=h + w + cin)
    fused = DotPointwiseGrouped(pointwise, grouped)
    x = bf16(torch.randn(n, cin, h, w))
    before = x.clone()
    monkeypatch.setattr(dot_grouped, "AHEAD_PIXELS", ahead)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.no_grad():
            apart = grouped(pointwise(x))
            got = fused(x)
    finally:
        torch.set_num_threads(previous)
    assert got.dtype == torch.bfloat16 and got.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(got, apart)  # the same sums: any row missed or raced would differ
    want = _float64(x, conv1, conv2)
    if variant == "split":
        want = want[:, output_order(width, groups)]
    assert rel_err(got, want) < 2e-2  # the 1×1's output rounded to bf16, then the 3×3's
    assert torch.equal(x, before)


def _args() -> dict:
    pointwise, grouped, _, _ = pair(64, 128, 32, 1, "pairs", seed=0)
    return {
        "x": bf16(torch.randn(1, 64, 4, 4)),
        "pointwise": pointwise.packed,
        "pointwise_bias": pointwise.bias,
        "packed": grouped.packed,
        "bias": grouped.bias,
        "groups": 32,
        "stride": 1,
        "relu": True,
        "split": False,
    }


@needs_kernels
@pytest.mark.parametrize(
    "change,message",
    [
        (lambda a: {**a, "x": a["x"].float()}, "x: expected a 4-d bfloat16"),
        (lambda a: {**a, "x": bf16(torch.randn(1, 32, 4, 4))}, "pointwise: expected a pack_conv"),
        (lambda a: {**a, "pointwise_bias": None}, "pointwise_bias: expected 128 float32 values"),
        (lambda a: {**a, "pointwise_bias": torch.randn(64)}, "bias: expected 128 float32 values"),
        (lambda a: {**a, "groups": 4}, "packed: expected a contiguous tensor of"),
        (lambda a: {**a, "stride": 3}, "x: 128 channels in 32 groups with stride 3"),
        (
            lambda a: {**a, "split": True, "packed": a["packed"].float()},
            "packed: expected a contiguous bf16 tensor",
        ),
    ],
)
def test_bad_inputs_are_refused_by_name(change: Callable[[dict], dict], message: str) -> None:
    with pytest.raises(ValueError, match=message), torch.no_grad():
        dot_grouped.run_fused(**change(_args()))


@needs_kernels
def test_an_input_that_needs_a_gradient_is_refused() -> None:
    args = _args()
    args["x"].requires_grad_(True)
    with pytest.raises(ValueError, match="pointwise_grouped_conv3x3_bf16: an inference kernel"):
        dot_grouped.run_fused(**args)


class _KernelBlock(nn.Module):
    """A bottleneck as `optimize` leaves it before this pass: our 1×1 (with its ReLU), an
    identity (a folded BN), our grouped 3×3 (with its ReLU), then a last 1×1; with `tap` the
    first 1×1's output is also added to the result (a second use: not fusable)."""

    def __init__(
        self, pointwise: nn.Module, grouped: FastGroupedConv3x3, tap: bool = False
    ) -> None:
        super().__init__()
        self.conv1, self.bn1, self.conv2 = pointwise, nn.Identity(), grouped
        width = grouped.channels
        self.conv3 = nn.Conv2d(width, width, 1).bfloat16()
        self.tap = tap

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv1(x)
        z = self.conv3(self.conv2(self.bn1(y)))
        return z + y if self.tap else z


def _model(seed: int) -> tuple[nn.Module, torch.Tensor]:
    """Blocks on 64 channels of 8×8 maps: split order and pairs (fusable), a 1×1 without its
    ReLU, a 1×1 whose output is used twice, and a stride-2 grouped 3×3 (fusable)."""
    torch.manual_seed(seed)
    split, split_grouped, _, _ = pair(64, 128, 32, 1, "split", seed)
    pairs, pairs_grouped, _, _ = pair(128, 128, 32, 1, "pairs", seed + 1)
    plain = DotConv1x1(nn.Conv2d(128, 128, 1).bfloat16())  # no ReLU
    _, plain_grouped, _, _ = pair(128, 128, 32, 1, "pairs", seed + 2)
    tapped, tapped_grouped, _, _ = pair(128, 128, 32, 1, "pairs", seed + 3)
    strided, strided_grouped, _, _ = pair(128, 128, 32, 2, "pairs", seed + 4)
    model = nn.Sequential(
        _KernelBlock(split, split_grouped),
        _KernelBlock(pairs, pairs_grouped),
        _KernelBlock(plain, plain_grouped),
        _KernelBlock(tapped, tapped_grouped, tap=True),
        _KernelBlock(strided, strided_grouped),
    ).eval()
    return model, bf16(torch.randn(2, 64, 8, 8))


@needs_kernels
def test_the_pass_fuses_each_fusable_chain_and_keeps_the_function() -> None:
    model, x = _model(30)
    with torch.no_grad():
        want = model(x)
    choices = fuse_dot_pointwise(model, x, mode="on")
    assert [(c.name, c.variant, c.chosen) for c in choices] == [
        ("0.conv2", "dot+grouped", "fused"),
        ("1.conv2", "dot+grouped", "fused"),
        ("4.conv2", "dot+grouped", "fused"),
    ]
    assert [type(b.conv2).__name__ for b in model] == [
        "DotPointwiseGrouped",
        "DotPointwiseGrouped",
        "FastGroupedConv3x3",
        "FastGroupedConv3x3",
        "DotPointwiseGrouped",
    ]
    assert model[0].conv2.split and not model[1].conv2.split
    fused_away = {n for n, m in model.named_modules() if isinstance(m, DotConv1x1)}
    assert fused_away == {"2.conv1", "3.conv1"}  # the fused blocks' 1×1s are gone
    before = x.clone()
    with torch.no_grad():
        got = model(x)
    assert torch.equal(got, want)  # the same sums as the two calls apart
    assert torch.equal(x, before)


@needs_kernels
def test_auto_fuses_only_where_one_call_is_faster(monkeypatch: pytest.MonkeyPatch) -> None:
    model, x = _model(31)

    def fused_faster_at_stride_1(fns, shape, dtype, repeats, before=None):
        probe = bf16(torch.randn(tuple(shape)))
        with torch.no_grad():
            assert torch.equal(fns[0](probe), fns[1](probe))  # both ways run, and agree
        return [2.0, 1.0] if fns[1].stride == 1 else [1.0, 2.0]

    monkeypatch.setattr(chain_fusion, "time_on_random", fused_faster_at_stride_1)
    choices = fuse_dot_pointwise(model, x, mode="auto")
    assert {c.name: c.chosen for c in choices} == {
        "0.conv2": "fused",
        "1.conv2": "fused",
        "4.conv2": "separate",
    }
    assert isinstance(model[4].conv2, FastGroupedConv3x3)
    assert isinstance(model[4].conv1, DotConv1x1)


class _OneDnnBlock(nn.Module):
    """Our 1×1 (with its ReLU), an identity (a folded BN), torch's grouped 3×3 and its ReLU:
    a block before `swap_grouped_convs`."""

    def __init__(self, pointwise: DotConv1x1, conv: nn.Conv2d) -> None:
        super().__init__()
        self.conv1, self.bn1, self.conv2, self.relu = pointwise, nn.Identity(), conv, nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.conv2(self.bn1(self.conv1(x))))


@needs_kernels
@pytest.mark.parametrize("fused_ms", [0.5, 2.0])
def test_a_grouped_layer_left_to_onednn_still_fuses_where_the_pair_is_faster_fused(
    monkeypatch: pytest.MonkeyPatch, fused_ms: float
) -> None:
    # oneDNN wins the grouped 3×3 alone (as at ResNeXt-50's stage 3 on AVX512-BF16, by 6 %); the
    # 1×1 fused into our kernel must then be timed against the 1×1 and oneDNN's prepacked conv
    pointwise, grouped, _, conv2 = pair(64, 128, 32, 1, "pairs", seed=40)
    model = nn.Sequential(_OneDnnBlock(pointwise, conv2)).eval()
    x = bf16(torch.randn(2, 64, 9, 9))
    with torch.no_grad():
        want = model(x)
        ours = grouped(pointwise(x))  # the kernel that fuses, apart
    time_grouped_ways(monkeypatch, 0.0, 1.0)
    (choice,) = swap_grouped_convs(model, x, mode="auto")
    assert choice.chosen == "native"
    kept = model[0].conv2
    assert isinstance(kept, NativeGroupedConv3x3) and kept.relu
    assert dot_fusable(model[0].conv1, kept)
    timed = []

    def times(fns, shape, dtype, repeats, before=None):  # type: ignore[no-untyped-def]
        probe = bf16(torch.randn(tuple(shape)))
        with torch.no_grad():
            separate = fns[0](probe)
            timed.append(rel_err(fns[1](probe), separate))
            assert torch.equal(separate, model[0](probe))  # what the block runs now
        return [1.0, fused_ms]

    monkeypatch.setattr(chain_fusion, "time_on_random", times)
    (fusion,) = fuse_dot_pointwise(model, x, mode="auto")
    assert timed and timed[0] < 2e-2  # the fused way computes the same pair
    with torch.no_grad():
        got = model(x)
    if fused_ms < 1.0:
        assert fusion.chosen == "fused" and isinstance(model[0].conv2, DotPointwiseGrouped)
        assert torch.equal(got, ours)  # our kernel's sums, not oneDNN's
    else:
        assert fusion.chosen == "separate" and model[0].conv2 is kept
        assert torch.equal(got, want)  # oneDNN's, as before the pass


def test_pass_modes() -> None:
    model = nn.Sequential(nn.Conv2d(64, 128, 1), nn.ReLU()).eval().bfloat16()
    x = bf16(torch.randn(1, 64, 8, 8))
    assert fuse_dot_pointwise(model, x, mode="off") == []
    assert fuse_dot_pointwise(model, x.float(), mode="on") == []  # bf16 only
    assert fuse_dot_pointwise(model, x, mode="on") == []  # no kernel modules: no site
    with pytest.raises(ConfigError, match="fuse_pointwise: expected one of"):
        fuse_dot_pointwise(model, x, mode="always")


@needs_kernels  # the modules below are built on the kernels (on an AVX2-only CPU they refuse)
def test_what_is_fusable() -> None:
    grouped_conv = nn.Conv2d(128, 128, 3, 1, 1, groups=32).bfloat16()
    grouped = FastGroupedConv3x3(grouped_conv, relu=True, dtype=torch.bfloat16)
    pointwise = DotConv1x1(nn.Conv2d(64, 128, 1).bfloat16(), relu=True)
    assert dot_fusable(pointwise, grouped)
    assert not dot_fusable(DotConv1x1(nn.Conv2d(64, 128, 1).bfloat16()), grouped)  # no ReLU
    strided = DotConv1x1(nn.Conv2d(64, 128, 1, stride=2).bfloat16(), relu=True)
    assert not dot_fusable(strided, grouped)
    assert not dot_fusable(DotConv1x1(nn.Conv2d(64, 64, 1).bfloat16(), relu=True), grouped)
    assert not dot_fusable(nn.Conv2d(64, 128, 1).bfloat16(), grouped)
    assert not dot_fusable(pointwise, grouped_conv)  # torch's grouped convolution
    with pytest.raises(ValueError, match="pointwise, grouped: expected a stride-1 DotConv1x1"):
        DotPointwiseGrouped(strided, grouped)
