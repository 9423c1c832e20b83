"""The AMX quads kernel (4 or 8 channels per group) equals torch's convolution of the same bf16
values; its packing by hand; what it refuses; its place among the grouped swap's variants (its
training candidate: test_grouped_amx.py)."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from tensor_checks import rel_err
from torch import nn

from resnext.speed import grouped_quads
from resnext.speed.grouped_swap import FastGroupedConv3x3, runnable_variants, variant_names

REASON = grouped_quads.unavailable_reason()
needs_amx = pytest.mark.skipif(REASON is not None, reason=f"quads kernel unavailable: {REASON}")


def _inputs(n: int, c: int, h: int, w: int, seed: int, cpg: int = 4) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, w, generator=gen).bfloat16()
    weight = torch.randn(c, cpg, 3, 3, generator=gen).bfloat16()
    bias = torch.randn(c, generator=gen)
    return x.contiguous(memory_format=torch.channels_last), weight, bias


@needs_amx
# 1, 3, 8 (2 items of 4) and 16 sets of 4 groups of 4 channels; 1, 3 and 8 (4 items of 2) of 8
@pytest.mark.parametrize(
    ("cpg", "channels"), [(4, 16), (4, 48), (4, 128), (4, 256), (8, 32), (8, 96), (8, 256)]
)
@pytest.mark.parametrize("size", [(1, 1), (2, 5), (5, 3), (7, 8), (14, 13), (9, 57)])
@pytest.mark.parametrize("bias_relu", [(True, True), (False, False)])
def test_equals_conv2d_of_the_same_bf16_values(
    cpg: int, channels: int, size: tuple[int, int], bias_relu: tuple[bool, bool]
) -> None:
    """Widths that fill quads and that leave pixels of a last quad, rows of one quad and of many,
    1–16 sets of 4 groups."""
    with_bias, relu = bias_relu
    seed = channels + size[0] * 7 + size[1]
    x, weight, bias = _inputs(3, channels, *size, seed=seed, cpg=cpg)
    bias = bias if with_bias else None
    groups = channels // cpg
    # the reference: float32 convolution of exactly the bf16 values the kernel reads
    want = F.conv2d(x.float(), weight.float(), bias, 1, 1, 1, groups)
    want = F.relu(want) if relu else want
    packed = grouped_quads.pack_weights(weight, groups)
    got = grouped_quads.run_kernel(x, packed, bias, groups, 1, relu)
    assert got.shape == want.shape and got.dtype == torch.bfloat16
    assert got.is_contiguous(memory_format=torch.channels_last)
    # float32 accumulation, one rounding to bf16 at the end (2^-8 relative)
    assert rel_err(got, want) < 2**-7


@needs_amx
def test_resnext50_first_stages_at_batch_16_and_batch_1() -> None:
    for n in (16, 1):
        for c, h in [(128, 56), (256, 28)]:
            x, weight, bias = _inputs(n, c, h, h, seed=n + c, cpg=c // 32)
            want = F.conv2d(x.float(), weight.float(), bias, 1, 1, 1, 32)
            packed = grouped_quads.pack_weights(weight, 32)
            got = grouped_quads.run_kernel(x, packed, bias, 32, 1)
            assert rel_err(got, want) < 2**-7, (n, c)


@pytest.mark.parametrize("cpg", [4, 8])
def test_packing_is_the_toeplitz_form_by_hand(cpg: int) -> None:
    """Every entry (set, group, kh, K pair, column, member) of the pack, from its definition: K
    index cpg·j + c (input pixel j of the quad's row, channel c), column cpg·d + o (output pixel
    d, output o); w[o][c][kh][j − d] where 0 ≤ j − d ≤ 2, else 0."""
    channels = 8 * cpg  # two sets of 4 groups
    # integers below 256: exact in bf16
    weight = (torch.arange(channels * cpg * 9) % 251).float().reshape(channels, cpg, 3, 3)
    packed = grouped_quads.pack_weights(weight, channels // cpg).float()
    assert packed.shape == (2, 4, 3, 16, 16, 2)
    want = torch.zeros(2, 4, 3, 16, 16, 2)
    for s, g, kh, k, n in itertools.product(range(2), range(4), range(3), range(32), range(16)):
        j, c, d, o = k // cpg, k % cpg, n // cpg, n % cpg
        if 0 <= j - d <= 2:
            want[s, g, kh, k // 2, n, k % 2] = weight[(s * 4 + g) * cpg + o, c, kh, j - d]
    assert torch.equal(packed, want)


def test_refuses_what_it_does_not_take() -> None:
    x, weight, _ = _inputs(1, 32, 4, 4, seed=1)
    packed = grouped_quads.pack_weights(weight, 8)
    with pytest.raises(ValueError, match="4 or 8 channels per group"):
        grouped_quads.run_kernel(x, packed, None, 8, 2)
    with pytest.raises(ValueError, match="4 or 8 channels per group"):
        grouped_quads.run_kernel(x, packed, None, 2, 1)  # 16 per group
    with pytest.raises(ValueError, match="packed"):  # a pack for 4 per group, 8 per group asked
        grouped_quads.run_kernel(x, packed, None, 4, 1)
    with pytest.raises(ValueError, match="packed"):
        grouped_quads.run_kernel(x, packed[:1].contiguous(), None, 8, 1)
    with pytest.raises(ValueError, match="weight"):
        grouped_quads.pack_weights(torch.zeros(32, 16, 3, 3), 2)  # 16 per group
    with pytest.raises(ValueError, match="weight"):
        grouped_quads.pack_weights(torch.zeros(8, 4, 3, 3), 2)  # 8 channels: no set of 4 groups
    with pytest.raises(ValueError, match="weight"):
        grouped_quads.pack_weights(torch.zeros(16, 8, 3, 3), 2)  # 16 channels: half a set
    with pytest.raises(ValueError, match="weight"):
        grouped_quads.pack_weights(torch.zeros(32, 8, 3, 3), 8)  # 8 inputs a filter, 4 a group
    assert grouped_quads.unavailable_reason(torch.float32) is not None  # bf16 only


def test_offered_for_four_and_eight_channels_per_group_at_stride_1_in_bf16() -> None:
    four, eight = nn.Conv2d(128, 128, 3, 1, 1, groups=32), nn.Conv2d(256, 256, 3, 1, 1, groups=32)
    assert "quads" in variant_names(four, torch.bfloat16)
    assert "quads" in variant_names(eight, torch.bfloat16)
    assert "quads" not in variant_names(four, torch.float32)
    assert "quads" not in variant_names(nn.Conv2d(128, 128, 3, 2, 1, groups=32), torch.bfloat16)
    assert "quads" not in variant_names(nn.Conv2d(512, 512, 3, 1, 1, groups=32), torch.bfloat16)
    if REASON is None:
        assert "quads" in runnable_variants(four, torch.bfloat16)
        assert "quads" in runnable_variants(eight, torch.bfloat16)


@needs_amx
def test_inference_module_quads_variant_equals_conv2d() -> None:
    torch.manual_seed(5)
    conv = nn.Conv2d(64, 64, 3, 1, 1, groups=16, bias=True)
    module = FastGroupedConv3x3(conv, dtype=torch.bfloat16, variant="quads")
    x = torch.randn(2, 64, 18, 11).bfloat16().contiguous(memory_format=torch.channels_last)
    want = F.conv2d(x.float(), conv.weight.detach().bfloat16().float(), conv.bias, 1, 1, 1, 16)
    with torch.no_grad():
        got = module(x)
        compiled = torch.compile(module, backend="eager", fullgraph=True)(x)
    assert rel_err(got, want) < 2**-7
    assert torch.equal(compiled, got)  # the operator's fake lets a graph hold it
