"""A whole stride-1 identity bottleneck in one kernel call (`dot_block`): written over its input,
equal bit for bit to the calls apart and close to float64, on every grouped form and thread
split (whole images per thread, and the calls apart where the images do not divide); its
refusals; and `fuse_dot_blocks`, the pass that puts it in `optimize`'s model."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from dot_modules import bf16, pair
from tensor_checks import rel_err
from torch import nn

import resnext
from resnext.errors import ConfigError
from resnext.speed import (
    chain_fusion,
    dot_block,
    dot_grouped,
    grouped_kernel,
    grouped_split,
    pointwise_gemm,
    replay,
)
from resnext.speed.conv_x3_swap import DotConv1x1
from resnext.speed.dot_block import DotBottleneck, block_fusable, fuse_dot_blocks
from resnext.speed.dot_grouped import DotPointwiseGrouped
from resnext.speed.fastpath import optimize
from resnext.speed.grouped_split import output_order
from resnext.speed.timing_cache import TimingCache

REASON = pointwise_gemm.unavailable_reason() or grouped_split.unavailable_reason()
needs_kernels = pytest.mark.skipif(REASON is not None, reason=f"bf16 kernels unavailable: {REASON}")


def _block(
    cin: int, width: int, groups: int, variant: str, seed: int
) -> tuple[DotPointwiseGrouped, DotConv1x1, nn.Conv2d, nn.Conv2d, nn.Conv2d]:
    """The fused first 1×1 + grouped 3×3, the last 1×1 (ReLU, in place over its residual) back
    to `cin` channels, and the three bf16 convolutions (the last one reading the grouped output's
    channels in natural order)."""
    pointwise, grouped, conv1, conv2 = pair(cin, width, groups, 1, variant, seed)
    conv3 = nn.Conv2d(width, cin, 1).bfloat16()
    with torch.no_grad():
        conv3.weight.div_(width**0.5)
    last_conv = conv3
    if variant == "split":  # the last 1×1 reads the split output order, as group_order makes it
        last_conv = nn.Conv2d(width, cin, 1).bfloat16()
        with torch.no_grad():
            last_conv.weight.copy_(conv3.weight[:, output_order(width, groups)])
            last_conv.bias.copy_(conv3.bias)
    last = DotConv1x1(last_conv, relu=True, in_place=True)
    return DotPointwiseGrouped(pointwise, grouped), last, conv1, conv2, conv3


CASES = [
    # n, channels, width, groups, height, width of the map, grouped variant, threads
    (2, 128, 128, 32, 9, 11, "split", 2),  # 4 per group; odd map, 6-pixel tiles
    (4, 256, 256, 32, 7, 7, "split", 2),  # 8 per group, two images a thread
    (2, 64, 256, 16, 6, 8, "pairs", 2),  # 16 per group: the wide kernel; fewer channels out
    (2, 128, 128, 32, 8, 8, "widening", 1),  # one thread
    (1, 128, 256, 32, 14, 14, "split", 2),  # one image on two threads: the calls apart
    (3, 64, 128, 32, 5, 5, "pairs", 2),  # images that do not divide: the calls apart
]


@needs_kernels
@pytest.mark.parametrize("n,cin,width,groups,h,w,variant,threads", CASES)
def test_equals_the_calls_apart_written_over_its_input_and_float64(
    n: int, cin: int, width: int, groups: int, h: int, w: int, variant: str, threads: int
) -> None:
    fused, last, conv1, conv2, conv3 = _block(cin, width, groups, variant, seed=h + w + cin)
    block = DotBottleneck(fused, last)
    x = bf16(torch.randn(n, cin, h, w))
    original = x.clone()
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.no_grad():
            apart = original.clone()
            last(fused(apart), apart)
            got = block(x)
    finally:
        torch.set_num_threads(previous)
    assert got.data_ptr() == x.data_ptr()  # written over its input
    assert torch.equal(got, apart)  # the same sums as the calls apart
    mid = F.conv2d(original.double(), conv1.weight.double(), conv1.bias.double()).relu()
    mid = F.conv2d(mid, conv2.weight.double(), conv2.bias.double(), 1, 1, 1, groups).relu()
    want = (F.conv2d(mid, conv3.weight.double(), conv3.bias.double()) + original.double()).relu()
    assert rel_err(got, want) < 2e-2  # three roundings to bf16 on the way


def _args() -> dict:
    fused, last, _, _, _ = _block(64, 128, 32, "pairs", seed=0)
    return {
        "x": bf16(torch.randn(2, 64, 4, 4)),
        "pointwise": fused.pointwise_packed,
        "pointwise_bias": fused.pointwise_bias,
        "packed": fused.packed,
        "bias": fused.bias,
        "groups": 32,
        "split": False,
        "last": last.packed,
        "last_bias": last.bias,
    }


@needs_kernels
@pytest.mark.parametrize(
    "change,message",
    [
        (lambda a: {**a, "x": a["x"].float()}, "x: expected a 4-d bfloat16"),
        (lambda a: {**a, "x": a["x"].contiguous()}, "x: writing in place needs a channels_last"),
        (lambda a: {**a, "pointwise_bias": None}, "pointwise_bias: expected 128 float32 values"),
        (lambda a: {**a, "last": a["pointwise"]}, r"last: expected a pack_conv weight \(1, 64,"),
        (lambda a: {**a, "last_bias": None}, "last_bias: expected 64 float32 values, got None"),
        (lambda a: {**a, "last_bias": torch.randn(128)}, "bias: expected 64 float32 values"),
    ],
)
def test_bad_inputs_are_refused_by_name_and_leave_x_as_it_was(
    change: Callable[[dict], dict], message: str
) -> None:
    args = change(_args())
    before = args["x"].clone()
    with pytest.raises(ValueError, match=message), torch.no_grad():
        dot_block.run_block_(**args)
    assert torch.equal(args["x"], before)


@needs_kernels
def test_the_operator_refuses_a_batch_its_kernel_does_not_take_and_leaves_x_as_it_was() -> None:
    # (DotBottleneck takes the calls apart for such batches, where a replay sees their tensors)
    args = {**_args(), "x": bf16(torch.randn(3, 64, 4, 4))}
    before = args["x"].clone()
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        refused = pytest.raises(ValueError, match="x: 3 images do not divide between 2 threads")
        with refused, torch.no_grad():
            dot_block.run_block_(**args)
    finally:
        torch.set_num_threads(previous)
    assert torch.equal(args["x"], before)


@needs_kernels
def test_an_input_that_needs_a_gradient_is_refused() -> None:
    args = _args()
    args["x"].requires_grad_(True)
    with pytest.raises(ValueError, match="bottleneck_dot_bf16_: an inference kernel"):
        dot_block.run_block_(**args)


class _KernelBlock(nn.Module):
    """A bottleneck as `optimize` leaves it before this pass: the fused first 1×1 + grouped 3×3,
    an identity (a folded BN), then the last 1×1 on it with `residual` (the block's input, or
    another tensor) as its residual."""

    def __init__(self, fused: DotPointwiseGrouped, last: DotConv1x1, own_input: bool) -> None:
        super().__init__()
        self.conv2, self.bn2, self.conv3 = fused, nn.Identity(), last
        self.own_input = own_input

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = x if self.own_input else x * 2
        return self.conv3(self.bn2(self.conv2(x)), residual)


def _model(seed: int) -> tuple[nn.Module, torch.Tensor]:
    """Blocks on 64 channels: split order and pairs (fusable), one whose residual is not the
    block's input, one whose last 1×1 does not write in place."""
    made = [_block(64, 128, 32, v, seed + i) for i, v in enumerate(["split", "pairs", "pairs"])]
    fused = _block(64, 128, 32, "pairs", seed + 3)[0]
    kept = DotConv1x1(nn.Conv2d(128, 64, 1).bfloat16(), relu=True)  # not in place
    model = nn.Sequential(
        _KernelBlock(made[0][0], made[0][1], True),
        _KernelBlock(made[1][0], made[1][1], True),
        _KernelBlock(made[2][0], made[2][1], False),
        _KernelBlock(fused, kept, True),
    ).eval()
    return model, bf16(torch.randn(2, 64, 8, 8))


@needs_kernels
def test_the_pass_fuses_each_identity_block_and_keeps_the_function() -> None:
    model, x = _model(40)
    with torch.no_grad():
        want = model(x.clone())
    choices = fuse_dot_blocks(model, x.clone(), mode="on")  # its shape run writes in place
    assert [(c.name, c.variant, c.chosen) for c in choices] == [
        ("0.conv3", "dot+block", "fused"),
        ("1.conv3", "dot+block", "fused"),
    ]
    kinds = [type(b.conv2).__name__ for b in model]
    assert kinds == ["DotBottleneck", "DotBottleneck", "DotPointwiseGrouped", "DotPointwiseGrouped"]
    assert not hasattr(model[0], "conv3") and isinstance(model[3].conv3, DotConv1x1)
    with torch.no_grad():
        got = model(x.clone())
    assert torch.equal(got, want)


@needs_kernels
def test_the_block_kernel_takes_what_its_python_rule_says() -> None:
    # `grouped_kernel.block_kernel_takes` mirrors the C entry's rule, which DotBottleneck asks
    # before calling it: the C entry itself answers here
    a = _args()
    packing = dot_grouped.checked_packing(
        a["x"], a["pointwise"], a["pointwise_bias"], a["packed"], a["bias"], 32, 1, False
    )
    previous = torch.get_num_threads()
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            for n in range(1, 5):
                x = bf16(torch.randn(n, 64, 4, 4))
                taken = grouped_kernel.call_block_kernel(
                    x, a["pointwise"], a["pointwise_bias"], a["packed"], a["bias"], a["last"],
                    a["last_bias"], 32, packing, dot_grouped.AHEAD_PIXELS,
                )  # fmt: skip
                assert taken == grouped_kernel.block_kernel_takes(n, threads), (n, threads)
    finally:
        torch.set_num_threads(previous)


class _OnACopy(nn.Module):
    """`model` on a copy of its input (its blocks write over what they read)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.clone())


@needs_kernels
@pytest.mark.parametrize("n", [1, 2, 3])
def test_a_replay_records_the_blocks_on_any_batch(n: int) -> None:
    # On two threads the block kernel gives each whole images: batches of 1 and 3 take the calls
    # apart, whose middle output the recording must see (it refused those batches while the
    # operator made that output itself, unseen: the replay then ran eager with a warning).
    model, x = _model(43)
    fuse_dot_blocks(model, x.clone(), mode="on")
    assert isinstance(model[0].conv2, DotBottleneck)
    wrapped = _OnACopy(model)
    y = bf16(torch.randn(n, 64, 8, 8))
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        recorded = replay.Recorded(wrapped, y)  # checks itself on a fresh input, bit for bit
        got = recorded(y)
        with torch.no_grad():
            want = wrapped(y)
    finally:
        torch.set_num_threads(previous)
    assert torch.equal(got, want)


@needs_kernels
def test_auto_fuses_only_where_one_call_is_faster(monkeypatch: pytest.MonkeyPatch) -> None:
    model, x = _model(41)
    seen = []

    def second_block_faster(fns, shape, dtype, repeats, before=None):
        probe = bf16(torch.randn(tuple(shape)))
        with torch.no_grad():
            assert torch.equal(fns[0](probe), fns[1](probe))  # both ways run on copies, agree
        seen.append(1)
        return [2.0, 1.0] if len(seen) == 2 else [1.0, 2.0]

    monkeypatch.setattr(chain_fusion, "time_on_random", second_block_faster)
    choices = fuse_dot_blocks(model, x, mode="auto")
    assert {c.name: c.chosen for c in choices} == {"0.conv3": "separate", "1.conv3": "fused"}
    assert isinstance(model[0].conv2, DotPointwiseGrouped)
    assert isinstance(model[1].conv2, DotBottleneck)


def test_pass_modes() -> None:
    model = nn.Sequential(nn.Conv2d(64, 128, 1)).eval().bfloat16()
    x = bf16(torch.randn(1, 64, 8, 8))
    assert fuse_dot_blocks(model, x, mode="off") == []
    assert fuse_dot_blocks(model, x.float(), mode="on") == []  # bf16 only
    assert fuse_dot_blocks(model, x, mode="on") == []  # no fused first 1×1s: no site
    with pytest.raises(ConfigError, match="fuse_block: expected one of"):
        fuse_dot_blocks(model, x, mode="always")


@needs_kernels  # the modules below are built on the kernels (on an AVX2-only CPU they refuse)
def test_what_is_fusable() -> None:
    fused, last, _, _, _ = _block(64, 128, 32, "pairs", seed=1)
    assert block_fusable(fused, last)
    assert not block_fusable(fused, DotConv1x1(nn.Conv2d(128, 64, 1).bfloat16(), relu=True))
    wrong_width = DotConv1x1(nn.Conv2d(128, 128, 1).bfloat16(), relu=True, in_place=True)
    assert not block_fusable(fused, wrong_width)
    strided, _, _, _, _ = _block(64, 128, 32, "pairs", seed=2)
    strided.stride = 2
    assert not block_fusable(strided, last)
    assert not block_fusable(last, fused)
    with pytest.raises(ValueError, match="fused, last: expected a stride-1 DotPointwiseGrouped"):
        DotBottleneck(strided, last)


@needs_kernels
def test_optimize_fuses_resnext50s_blocks_and_keeps_its_function_bit_for_bit(
    without_amx: None,
) -> None:
    torch.manual_seed(42)
    model = resnext.create_model("resnext50_32x4d").eval()
    x = torch.randn(2, 3, 64, 64)
    cache = TimingCache.in_memory()  # the same choices for the other passes both ways

    def build(fusions: str) -> nn.Module:
        # every 1×1 and grouped 3×3 on our kernels: where oneDNN's run on AMX they can win the
        # timing (a CI run left one grouped 3×3 to oneDNN), and a layer left to oneDNN is no site
        # for these fusions
        return optimize(
            model,
            "bf16",
            backend="none",
            example_input=x,
            pointwise_bf16="on",
            split_groups="on",
            grouped_kernel="on",
            fuse_pointwise=fusions,
            fuse_block=fusions,
            timing_cache=cache,
        )

    apart, fused = build("off"), build("on")
    kinds = Counter(type(m).__name__ for m in fused.modules())
    # every block's first 1×1 in the grouped call; the 12 identity blocks whole
    assert kinds["DotBottleneck"] == 12 and kinds["DotPointwiseGrouped"] == 16
    assert not any(isinstance(m, (DotBottleneck, DotPointwiseGrouped)) for m in apart.modules())
    assert {c.variant for c in fused.block_choices} >= {"dot+block"}
    with torch.no_grad():
        assert torch.equal(fused(x), apart(x))
