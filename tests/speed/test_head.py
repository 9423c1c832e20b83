"""The classifier head's C kernels (`resnext.speed.head`) against torch's pooling and linear layer."""

from __future__ import annotations

import pytest
import torch
from tensor_checks import rel_err
from torch import nn

import resnext
from resnext.speed import head
from resnext.speed.head import KernelLinear, PooledMean, swap_head

pytestmark = pytest.mark.skipif(
    head.unavailable_reason() is not None, reason=f"no head kernel: {head.unavailable_reason()}"
)


@pytest.mark.parametrize("shape", [(1, 2048, 7, 7), (3, 64, 5, 3), (2, 100, 1, 1), (0, 8, 2, 2)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pooled_mean_is_torchs_mean(shape: tuple[int, ...], dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    x = torch.randn(shape).to(dtype).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        got = PooledMean(dtype)(x)
        # the mean in float64, then rounded as torch's bf16 pooling returns it
        want = x.double().mean((2, 3), keepdim=True).to(dtype).float()
    assert got.dtype == torch.float32 and got.shape == (shape[0], shape[1], 1, 1)
    if dtype == torch.float32:
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-6)
    else:  # bf16 values: at most one bf16 step (2^-8 relative) from the rounded exact mean
        assert torch.equal(got.to(torch.bfloat16).float(), got)
        assert torch.allclose(got, want, rtol=2**-7, atol=1e-6)


@pytest.mark.parametrize("n", [1, 4, 6, 0])  # 6: four at a time, then two alone
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
def test_kernel_linear_is_torchs_linear(n: int, dtype: torch.dtype, bias: bool) -> None:
    torch.manual_seed(1)
    fc = nn.Linear(300, 37, bias=bias).to(dtype)
    x = torch.randn(n, 300).to(dtype).float()  # the means a PooledMean hands it
    with torch.no_grad():
        got = KernelLinear(fc)(x)
        exact = x.double() @ fc.weight.double().t()
        if bias:
            exact = exact + fc.bias.double()
    assert got.dtype == torch.float32 and got.shape == (n, 37)
    if n == 0:
        return
    if dtype == torch.float32:
        assert rel_err(got, exact.float()) < 1e-5
    else:  # float32 sums of exact bf16 products, rounded to bf16 once
        assert torch.equal(got.to(torch.bfloat16).float(), got)
        assert torch.allclose(got, exact.float(), rtol=2**-7, atol=1e-4)


def test_inputs_the_kernels_do_not_take_run_on_torch_and_bad_ones_are_refused() -> None:
    torch.manual_seed(2)
    x = torch.randn(2, 16, 3, 3)  # NCHW: torch's mean
    with torch.no_grad():
        assert torch.allclose(PooledMean(torch.float32)(x), x.mean((2, 3), keepdim=True))
    fc = nn.Linear(16, 4)
    p = torch.randn(2, 16, requires_grad=True)  # needs a gradient: torch's linear, which has one
    out = KernelLinear(fc)(p)
    out.sum().backward()
    assert p.grad is not None
    with pytest.raises(ValueError, match=r"x: expected a 4-d torch\.float32 map"):
        PooledMean(torch.float32)(x.to(torch.bfloat16))
    with pytest.raises(ValueError, match=r"x: expected float32 \(N, 16\)"):
        KernelLinear(fc)(torch.randn(2, 15))
    with pytest.raises(ValueError, match="dtype: expected float32 or bfloat16"):
        PooledMean(torch.float16)


def test_swap_head_keeps_the_networks_function() -> None:
    torch.manual_seed(3)
    model = resnext.create_model("resnext_tiny").eval().to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        want = model(x)
        assert swap_head(model)
        got = model(x)
    assert isinstance(model.avgpool, PooledMean) and isinstance(model.fc, KernelLinear)
    assert rel_err(got, want) < 1e-5
    assert not swap_head(nn.Sequential(nn.Linear(2, 2)))  # no avgpool and fc: left alone
