"""Our AMX grouped 3×3 kernel equals torch's convolution of the same bf16 values; packing, errors,
and its use by `optimize` and the training fast path."""

from __future__ import annotations

from types import ModuleType

import pytest
import torch
import torch.nn.functional as F
from tensor_checks import rel_err
from torch import nn

from resnext.speed import autotune, grouped_amx, grouped_quads, grouped_train
from resnext.speed.grouped_swap import FastGroupedConv3x3, runnable_variants

REASON = grouped_amx.unavailable_reason()
needs_amx = pytest.mark.skipif(REASON is not None, reason=f"AMX kernel unavailable: {REASON}")


def _inputs(n: int, c: int, cpg: int, h: int, w: int, seed: int) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    x = (
        torch.randn(n, c, h, w, generator=gen)
        .bfloat16()
        .contiguous(memory_format=torch.channels_last)
    )
    weight = torch.randn(c, cpg, 3, 3, generator=gen).bfloat16()
    bias = torch.randn(c, generator=gen)
    return x, weight, bias


@needs_amx
@pytest.mark.parametrize("cpg", [1, 2, 4, 8, 16, 32, 48, 64])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("size", [(1, 1), (5, 3), (7, 7), (14, 17), (20, 33)])
def test_amx_kernel_equals_conv2d_of_the_same_bf16_values(
    cpg: int, stride: int, size: tuple[int, int]
) -> None:
    c = 2 * max(cpg, 16)  # two blocks
    x, weight, bias = _inputs(2, c, cpg, *size, seed=cpg * 10 + stride)
    groups = c // cpg
    # the reference: float32 convolution of exactly the bf16 values the kernel reads
    want = F.relu(F.conv2d(x.float(), weight.float(), bias, stride, 1, 1, groups))
    packed = grouped_amx.pack_weights(weight, groups)
    got = grouped_amx.run_kernel(x, packed, bias, groups, stride, relu=True)
    assert got.shape == want.shape and got.dtype == torch.bfloat16
    assert got.is_contiguous(memory_format=torch.channels_last)
    # float32 accumulation, one rounding to bf16 at the end (2^-8 relative)
    assert rel_err(got, want) < 2**-7


@needs_amx
def test_resnext50_stage_shapes_at_batch_16_equal_conv2d() -> None:
    for c, h, stride in [(128, 56, 1), (256, 56, 2), (512, 14, 1), (1024, 7, 1)]:
        x, weight, _ = _inputs(16, c, c // 32, h, h, seed=c)
        want = F.conv2d(x.float(), weight.float(), None, stride, 1, 1, 32)
        got = grouped_amx.run_kernel(x, grouped_amx.pack_weights(weight, 32), None, 32, stride)
        assert rel_err(got, want) < 2**-7, (c, h, stride)


def test_packing_puts_each_weight_where_the_kernel_reads_it() -> None:
    """Hand-placed weights: block b, tile t, K step, row, output are found at their packed index."""
    c, cpg = 32, 4  # 16-channel blocks, tap pairs: 6 steps
    weight = torch.zeros(c, cpg, 3, 3)
    weight[21, 2, 1, 2] = 1.0  # output 21 (block 1, output 5), input 4*5+2 = 22 (block input 6)
    packed = grouped_amx.pack_weights(weight, c // cpg).float()
    assert packed.shape == (2, 1, 6, 16, 16, 2)
    # tap (kh=1, kw=2): kernel row 1, pair 1 (taps 2 and 3), first member: row 6 -> pair 3, member 0
    assert packed[1, 0, 1 * 2 + 1, 3, 5, 0] == 1.0
    assert packed.sum() == 1.0
    c, cpg = 64, 32  # one group per block, 32-deep steps per tap
    weight = torch.zeros(c, cpg, 3, 3)
    weight[40, 7, 2, 0] = 1.0  # group 1, output 8 (tile 0), input 7, tap 6
    packed = grouped_amx.pack_weights(weight, 2).float()
    assert packed.shape == (2, 2, 9, 16, 16, 2)
    assert packed[1, 0, 6, 3, 8, 1] == 1.0 and packed.sum() == 1.0


def test_bad_inputs_name_the_argument() -> None:
    weight = torch.randn(64, 4, 3, 3)
    with pytest.raises(ValueError, match="weight"):
        grouped_amx.pack_weights(torch.randn(64, 3, 3, 3), 21)  # 3 channels per group
    with pytest.raises(ValueError, match="x: expected a 4-d bfloat16"):
        grouped_amx.run_kernel(
            torch.randn(1, 64, 5, 5), grouped_amx.pack_weights(weight, 16), None, 16, 1
        )
    x = torch.randn(1, 64, 5, 5).bfloat16()
    with pytest.raises(ValueError, match="packed"):
        grouped_amx.run_kernel(x, torch.zeros(10, dtype=torch.bfloat16), None, 16, 1)
    with pytest.raises(ValueError, match="stride"):
        grouped_amx.run_kernel(x, grouped_amx.pack_weights(weight, 16), None, 16, 3)
    with pytest.raises(ValueError, match="bias"):
        grouped_amx.run_kernel(x, grouped_amx.pack_weights(weight, 16), torch.ones(3), 16, 1)
    assert grouped_amx.unavailable_reason(torch.float32) is not None  # bf16 only


@needs_amx
def test_inference_module_amx_variant_equals_conv2d() -> None:
    torch.manual_seed(5)
    conv = nn.Conv2d(128, 128, 3, 2, 1, groups=32, bias=True)
    assert "amx" in runnable_variants(conv, torch.bfloat16)
    assert "amx" not in runnable_variants(conv, torch.float32)
    module = FastGroupedConv3x3(conv, dtype=torch.bfloat16, variant="amx")
    x = torch.randn(2, 128, 18, 18).bfloat16().contiguous(memory_format=torch.channels_last)
    want = F.conv2d(x.float(), conv.weight.detach().bfloat16().float(), conv.bias, 2, 1, 1, 32)
    with torch.no_grad():
        assert rel_err(module(x), want) < 2**-7


@needs_amx
@pytest.mark.parametrize(
    ("module", "candidate", "groups"),
    [
        (grouped_amx, "ours-amx", 16),
        (grouped_quads, "ours-quads", 16),
        (grouped_quads, "ours-quads", 8),
    ],
)
def test_training_forward_and_input_gradient_by_an_amx_kernel(
    module: ModuleType, candidate: str, groups: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pinned to the block-diagonal or the quads AMX candidate (4 and 8 channels per group), the
    training conv's forward and stride-1 input gradient (a forward convolution with each group's
    matrix transposed, taps flipped) match oneDNN's."""
    calls = []
    real = module.run_kernel

    def counted(*args, **kwargs):  # a pass-through spy
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, "run_kernel", counted)
    torch.manual_seed(6)
    model = nn.Sequential(nn.Conv2d(64, 64, 3, 1, 1, groups=groups, bias=False))
    weight = model[0].weight.detach().clone()
    assert grouped_train.use_grouped_kernels(model) == 1
    x = torch.randn(2, 64, 20, 19).bfloat16().contiguous(memory_format=torch.channels_last)
    grad = torch.randn(2, 64, 20, 19).bfloat16().contiguous(memory_format=torch.channels_last)
    x1 = x.clone().requires_grad_()
    with autotune.CHOOSER.prefer(candidate):
        y1 = model.train()(x1)
        y1.backward(grad)
    assert len(calls) == 2  # the forward and the stride-1 input gradient
    x2 = x.clone().requires_grad_()
    y2 = F.conv2d(x2, weight.bfloat16(), None, 1, 1, 1, groups)
    y2.backward(grad)
    assert rel_err(y1, y2.float()) < 2**-6
    assert rel_err(x1.grad, x2.grad.float()) < 2**-6


@needs_amx
@pytest.mark.parametrize("channels,cpg", [(64, 1), (128, 4), (256, 8), (96, 48), (128, 64)])
def test_c_packing_equals_the_index_reference(channels: int, cpg: int) -> None:
    weight = torch.randn(channels, cpg, 3, 3)
    reference = grouped_amx.pack_reference(weight.bfloat16().reshape(-1), channels, cpg)
    assert torch.equal(grouped_amx.pack_weights(weight, channels // cpg), reference)


@pytest.mark.parametrize(
    ("rc", "error", "says"),
    [
        (-3, MemoryError, "could not allocate its scratch memory"),
        (-2, RuntimeError, "the OS refused the AMX tile state"),
        (-1, RuntimeError, r"shape refused \(code -1\)"),
    ],
)
def test_each_return_code_of_the_amx_kernels_is_its_own_error(
    rc: int, error: type[Exception], says: str
) -> None:
    grouped_amx.check_rc(0, "nothing wrong")  # 0: no error
    with pytest.raises(error, match=f"^kernel on \\(2, 3\\): {says}$"):
        grouped_amx.check_rc(rc, "kernel on (2, 3)")
