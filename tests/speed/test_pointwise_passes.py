"""What every dense 1×1 kernel pass of `conv_x3_swap` promises, checked for each kernel: the
epilogues it fuses on a net of bottlenecks, the residuals it may overwrite, and its modes."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType

import pytest
import torch
from block_nets import Net, pointwise_choices
from tensor_checks import nhwc, rel_err
from torch import nn

from resnext.errors import ConfigError
from resnext.speed import pointwise_fma, pointwise_fp16, pointwise_gemm, pointwise_mkl
from resnext.speed.conv_x3_swap import (
    DotConv1x1,
    FmaConv1x1,
    swap_convs_dot,
    swap_convs_fma,
    swap_convs_fp16,
    swap_convs_mkl,
)
from resnext.speed.fastpath import optimize
from resnext.speed.pointwise_fp16 import Fp16Conv1x1
from resnext.speed.pointwise_mkl import MklConv1x1


@dataclass(frozen=True)
class Kernel:
    """One pass: its option's name, its variants' prefix, the module whose `unavailable_reason`
    decides where it runs, and the precision of its results against the plain net's."""

    option: str
    variant: str
    library: ModuleType
    swap: Callable[..., list]
    module: type[nn.Module]
    dtype: torch.dtype
    net_width: int  # the bottleneck width that gives the kernel the channel counts it takes
    rel_tol: float
    lacks: str  # what a CPU or torch without the kernel says


KERNELS = [
    Kernel("pointwise_fma", "fma", pointwise_fma, swap_convs_fma, FmaConv1x1, torch.float32,
           32, 1e-5, "this CPU lacks ['avx2']"),
    Kernel("pointwise_mkl", "mkl", pointwise_mkl, swap_convs_mkl, MklConv1x1, torch.float32,
           32, 1e-5, "this torch is built without MKL"),
    # float16 products: ~2^-11 of each product, summed over up to 128 inputs
    Kernel("pointwise_fp16", "fp16", pointwise_fp16, swap_convs_fp16, Fp16Conv1x1, torch.float32,
           32, 1e-2, "this CPU lacks ['avx512_fp16']"),
    # bf16 in and out: the plain net rounds to bf16 at other points than the kernel
    Kernel("pointwise_bf16", "dot", pointwise_gemm, swap_convs_dot, DotConv1x1, torch.bfloat16,
           64, 2e-2, "this CPU lacks ['avx512_bf16']"),
]  # fmt: skip


def _params() -> list:
    return [
        pytest.param(
            k,
            id=k.variant,
            marks=pytest.mark.skipif(
                k.library.unavailable_reason() is not None,
                reason=f"{k.variant} kernel unavailable: {k.library.unavailable_reason()}",
            ),
        )
        for k in KERNELS
    ]


@pytest.mark.parametrize("kernel", _params())
def test_the_pass_fuses_each_epilogue_once_and_overwrites_only_dead_residuals(
    kernel: Kernel,
) -> None:
    torch.manual_seed(10)
    model = Net(kernel.net_width).eval().to(kernel.dtype)
    x = nhwc(torch.randn(2, 3, 8, 8)).to(kernel.dtype)
    with torch.no_grad():
        want = model(x)
    choices = kernel.swap(model, x, mode="on")
    assert {c.name: c.variant for c in choices} == pointwise_choices(kernel.variant)
    assert sum(isinstance(m, kernel.module) for m in model.modules()) == 8
    assert [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)] == ["stem"]
    before = x.clone()
    with torch.no_grad():
        assert rel_err(model(x), want) < kernel.rel_tol
    assert torch.equal(x, before)  # the net's input is read, never written over


@pytest.mark.parametrize("kernel", KERNELS, ids=[k.variant for k in KERNELS])
def test_pass_modes(kernel: Kernel, monkeypatch: pytest.MonkeyPatch) -> None:
    other = torch.float32 if kernel.dtype == torch.bfloat16 else torch.bfloat16
    model = nn.Sequential(nn.Sequential(nn.Conv2d(64, 64, 1), nn.ReLU())).eval().to(kernel.dtype)
    x = nhwc(torch.randn(1, 64, 4, 4)).to(kernel.dtype)
    assert kernel.swap(model, x, mode="off") == []
    assert kernel.swap(model, x.to(other), mode="on") == []  # its own precision only
    with pytest.raises(ConfigError, match=f"{kernel.option}: expected one of"):
        kernel.swap(model, x, mode="always")
    with pytest.raises(ConfigError, match=f"{kernel.option}: expected one of"):
        optimize(model, "fp32", backend="none", **{kernel.option: "yes"})
    # where it cannot run: oneDNN's path stays, silently, unless 'on' asks for the kernel
    monkeypatch.setattr(kernel.library, "unavailable_reason", lambda: kernel.lacks)
    assert kernel.swap(model, x, mode="auto") == []
    assert isinstance(model[0][0], nn.Conv2d)
    with pytest.raises(
        ConfigError,
        match=f"{kernel.option}: 'on' but .* cannot run here: .*{re.escape(kernel.lacks)}",
    ):
        kernel.swap(model, x, mode="on")
    plain = nn.Sequential(nn.Sequential(nn.Conv2d(64, 64, 1), nn.ReLU())).eval()
    dtype = "bf16" if kernel.dtype == torch.bfloat16 else "fp32"
    fast = optimize(
        plain, dtype, backend="none", example_input=x.float(), **{kernel.option: "auto"}
    )
    assert not [c for c in fast.pointwise_choices if c.variant.startswith(kernel.variant)]
