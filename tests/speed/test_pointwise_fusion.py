"""The fused 1×1 + AMX grouped 3×3 kernel equals torch's two convolutions of the same bf16 values;
its packing, errors, and `optimize`'s fusion pass."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from tensor_checks import rel_err
from torch import nn

import resnext
from resnext.errors import ConfigError
from resnext.speed import grouped_amx
from resnext.speed.fastpath import optimize
from resnext.speed.grouped_swap import FastGroupedConv3x3
from resnext.speed.pointwise_fusion import (
    FusedPointwiseGrouped,
    fusable,
    fuse_pointwise_convs,
)

REASON = grouped_amx.unavailable_reason()
needs_amx = pytest.mark.skipif(REASON is not None, reason=f"AMX kernel unavailable: {REASON}")


def _chain(n: int, cin: int, c: int, cpg: int, size: tuple[int, int], seed: int):
    gen = torch.Generator().manual_seed(seed)
    x = (
        torch.randn(n, cin, *size, generator=gen)
        .bfloat16()
        .contiguous(memory_format=torch.channels_last)
    )
    w1 = (torch.randn(c, cin, 1, 1, generator=gen) / cin**0.5).bfloat16()
    b1 = torch.randn(c, generator=gen) * 0.1
    w2 = torch.randn(c, cpg, 3, 3, generator=gen).bfloat16()
    b2 = torch.randn(c, generator=gen)
    return x, w1, b1, w2, b2


def _reference(x, w1, b1, w2, b2, groups: int, stride: int) -> torch.Tensor:
    """float32 convolutions of exactly the bf16 values, the 1×1's output rounded to bf16 (as the
    unfused bf16 model stores it)."""
    mid = F.relu(F.conv2d(x.float(), w1.float(), b1)).bfloat16()
    return F.relu(F.conv2d(mid.float(), w2.float(), b2, stride, 1, 1, groups))


@needs_amx
@pytest.mark.parametrize("cpg", [1, 4, 8, 16, 32, 64])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("size", [(1, 1), (5, 3), (7, 7), (14, 17)])
def test_fused_kernel_equals_the_two_convolutions(
    cpg: int, stride: int, size: tuple[int, int]
) -> None:
    c = 2 * max(cpg, 16)
    for cin in (32, 96):  # one and three 32-deep K steps
        x, w1, b1, w2, b2 = _chain(2, cin, c, cpg, size, seed=cpg + stride + cin)
        groups = c // cpg
        want = _reference(x, w1, b1, w2, b2, groups, stride)
        got = grouped_amx.run_pointwise_kernel(
            x,
            grouped_amx.pack_pointwise(w1),
            b1,
            grouped_amx.pack_weights(w2, groups),
            b2,
            groups,
            stride,
            relu=True,
        )
        assert got.shape == want.shape and got.dtype == torch.bfloat16
        assert got.is_contiguous(memory_format=torch.channels_last)
        assert rel_err(got, want) < 2**-7, (cin, c)


@needs_amx
def test_resnext50_block_shapes_at_batch_16() -> None:
    """Pixels outer (stages 1-2) and outputs outer (stages 3-4), tails of 4 pixels (14²) and
    1 (7²), more items than threads, and the stride-2 first blocks."""
    shapes = [(256, 128, 56, 1), (256, 256, 56, 2), (1024, 512, 14, 1), (2048, 1024, 7, 1)]
    for cin, c, h, stride in shapes:
        x, w1, b1, w2, b2 = _chain(16, cin, c, c // 32, (h, h), seed=c)
        want = _reference(x, w1, b1, w2, b2, 32, stride)
        got = grouped_amx.run_pointwise_kernel(
            x,
            grouped_amx.pack_pointwise(w1),
            b1,
            grouped_amx.pack_weights(w2, 32),
            b2,
            32,
            stride,
            relu=True,
        )
        assert rel_err(got, want) < 2**-7, (cin, c, h, stride)


def test_pointwise_packing_puts_each_weight_where_the_kernel_reads_it() -> None:
    weight = torch.zeros(32, 64, 1, 1)
    weight[21, 45] = 1.0  # output tile 1 column 5; K step 1, row 13: pair 6, member 1
    packed = grouped_amx.pack_pointwise(weight).float()
    assert packed.shape == (2, 2, 16, 16, 2)
    assert packed[1, 1, 6, 5, 1] == 1.0 and packed.sum() == 1.0


def test_bad_inputs_name_the_argument() -> None:
    with pytest.raises(ValueError, match="pointwise weight"):
        grouped_amx.pack_pointwise(torch.randn(32, 48, 1, 1))  # 48 inputs: not a multiple of 32
    with pytest.raises(ValueError, match="pointwise weight"):
        grouped_amx.pack_pointwise(torch.randn(32, 64, 3, 3))
    x = torch.randn(1, 64, 5, 5).bfloat16()
    w1 = grouped_amx.pack_pointwise(torch.randn(32, 64, 1, 1))
    packed = grouped_amx.pack_weights(torch.randn(32, 4, 3, 3), 8)
    with pytest.raises(ValueError, match="x: expected a 4-d bfloat16"):
        grouped_amx.run_pointwise_kernel(x.float(), w1, torch.zeros(32), packed, None, 8, 1)
    with pytest.raises(ValueError, match="pointwise: expected"):
        grouped_amx.run_pointwise_kernel(x[:, :32], w1, torch.zeros(32), packed, None, 8, 1)
    with pytest.raises(ValueError, match="pointwise_bias"):
        grouped_amx.run_pointwise_kernel(x, w1, torch.zeros(31), packed, None, 8, 1)
    with pytest.raises(ValueError, match="packed"):
        grouped_amx.run_pointwise_kernel(x, w1, torch.zeros(32), packed[:1], None, 8, 1)
    with pytest.raises(ValueError, match="stride"):
        grouped_amx.run_pointwise_kernel(x, w1, torch.zeros(32), packed, None, 8, 3)


@needs_amx
def test_only_a_bias_carrying_stride_1_pointwise_before_an_amx_conv_is_fusable() -> None:
    grouped = FastGroupedConv3x3(
        nn.Conv2d(64, 64, 3, 1, 1, groups=16), dtype=torch.bfloat16, variant="amx"
    )
    assert fusable(nn.Conv2d(64, 64, 1), grouped)
    assert not fusable(nn.Conv2d(64, 64, 1, bias=False), grouped)  # a BN not folded into it
    assert not fusable(nn.Conv2d(64, 64, 1, stride=2), grouped)
    assert not fusable(nn.Conv2d(48, 64, 1), grouped)
    widening = FastGroupedConv3x3(
        nn.Conv2d(64, 64, 3, 1, 1, groups=16), dtype=torch.bfloat16, variant="widening"
    )
    assert not fusable(nn.Conv2d(64, 64, 1), widening)
    with pytest.raises(ValueError, match="pointwise"):
        FusedPointwiseGrouped(nn.Conv2d(48, 64, 1), grouped)


@needs_amx
def test_a_chain_in_the_root_module_is_left_as_it_is() -> None:
    """Fusing rewrites a chain's parent module; the root has none, so its chain stays unfused."""
    conv = nn.Conv2d(64, 64, 3, 1, 1, groups=16)
    grouped = FastGroupedConv3x3(conv, dtype=torch.bfloat16, variant="amx")
    model = nn.Sequential(nn.Conv2d(64, 64, 1), nn.ReLU(), grouped).bfloat16()
    x = torch.randn(1, 64, 6, 6).bfloat16().contiguous(memory_format=torch.channels_last)
    assert fuse_pointwise_convs(model, x, mode="on") == []
    assert model[2] is grouped


@needs_amx
@pytest.mark.parametrize("name,size", [("resnext50_32x4d", 64), ("resnext29_4x16d", 32)])
def test_optimize_fuses_every_block_and_computes_the_same_function(
    name: str, size: int, randomize_bn: Callable[[nn.Module], None]
) -> None:
    torch.manual_seed(8)
    model = resnext.create_model(name).eval()
    randomize_bn(model)
    x = torch.randn(2, 3, size, size)
    # block fusion off: it would replace the fused modules this test counts
    unfused = optimize(
        model, "bf16", backend="none", example_input=x, fuse_pointwise="off", fuse_block="off"
    )
    fused = optimize(
        model, "bf16", backend="none", example_input=x, fuse_pointwise="on", fuse_block="off"
    )
    # every grouped layer of these models has an AMX form (chosen, kept beside the winning
    # variant, or beside oneDNN's conv where that won alone)
    amx_layers = fused.grouped_choices
    assert unfused.fusion_choices == []
    assert len(fused.fusion_choices) == len(amx_layers) > 0
    assert all(c.chosen == "fused" for c in fused.fusion_choices)
    n_fused = sum(isinstance(m, FusedPointwiseGrouped) for m in fused.modules())
    assert n_fused == len(amx_layers)
    fresh = torch.randn(4, 3, size, size)
    with torch.no_grad():
        want, plain, got = model(fresh), unfused(fresh), fused(fresh)
    # the same bf16 roundings in a different order: as close to the unfused path as that is to fp32
    assert rel_err(got, plain) < 0.02
    assert rel_err(got, want) < 0.05
    assert (got.argmax(1) == want.argmax(1)).float().mean() >= 0.75


@needs_amx
def test_fused_model_compiles_with_inductor(randomize_bn: Callable[[nn.Module], None]) -> None:
    torch.manual_seed(9)
    model = resnext.create_model("resnext29_4x16d").eval()
    randomize_bn(model)
    x = torch.randn(2, 3, 32, 32)
    fast = optimize(model, "bf16", example_input=x, fuse_pointwise="on")
    assert fast.fusion_choices and all(c.chosen == "fused" for c in fast.fusion_choices)
    fresh = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert rel_err(fast(fresh), model(fresh)) < 0.05


def test_fusion_modes() -> None:
    model = nn.Sequential(nn.Conv2d(64, 64, 1), nn.ReLU())
    x = torch.randn(1, 64, 4, 4).bfloat16()
    assert fuse_pointwise_convs(model, x, mode="off") == []
    assert fuse_pointwise_convs(model, x, mode="auto") == []  # no AMX grouped conv to fuse into
    with pytest.raises(ConfigError, match="fuse_pointwise"):
        fuse_pointwise_convs(model, x, mode="always")
    with pytest.raises(ConfigError, match="fuse_pointwise"):
        optimize(model, "bf16", backend="none", fuse_pointwise="yes")
