"""The eager fast paths' stem where no fused stem kernel takes it: the convolution applies the ReLU
(`stem_fusion.fuse_stem_relu`) and the pooling runs on the max-pool kernel without indices
(`maxpool.InferenceMaxPool2d`), computing torch's values bit for bit."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import resnext
from resnext.speed import maxpool
from resnext.speed.fastpath import optimize
from resnext.speed.fold import fold_batchnorm
from resnext.speed.maxpool import InferenceMaxPool2d, use_inference_maxpool
from resnext.speed.prepacked import PrepackedConv
from resnext.speed.replay import unavailable_reason as replay_unavailable
from resnext.speed.stem_fusion import ReluApplied, fuse_stem_relu

REASON = maxpool.unavailable_reason()
needs_kernel = pytest.mark.skipif(
    REASON is not None, reason=f"max-pool kernel unavailable: {REASON}"
)
DTYPES = [torch.float32, torch.bfloat16]
# (batch, channels, height, width, window, stride, padding): the stem's 3/2/1, odd sizes,
# channels not a multiple of 16, a window without padding, stride 1
SHAPES = [
    (2, 20, 13, 11, 3, 2, 1),
    (1, 64, 16, 16, 3, 2, 1),
    (3, 7, 9, 10, 2, 2, 0),
    (2, 33, 6, 7, 3, 1, 1),
]


def _cl(t: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return t.to(dtype).contiguous(memory_format=torch.channels_last)


@needs_kernel
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_pool_without_taps_equals_torch_bit_for_bit(shape, dtype) -> None:
    n, c, h, w, k, s, p = shape
    x = torch.randn(n, c, h, w, generator=torch.Generator().manual_seed(sum(shape)))
    x[0, 0, 1, 1] = torch.nan  # a NaN wins its windows
    x[-1, -1] = -torch.inf  # nothing beats -inf
    x = _cl(x, dtype)
    got = maxpool.pool(x, k, s, p)
    assert got.dtype == dtype and got.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(got, F.max_pool2d(x, k, s, p), equal_nan=True, rtol=0, atol=0)


@needs_kernel
def test_pool_refuses_bad_input_by_name() -> None:
    with pytest.raises(ValueError, match="x: expected a channels-last"):
        maxpool.pool(torch.randn(1, 4, 8, 8), 3, 2, 1)
    with pytest.raises(ValueError, match="x: a 2×2 map is smaller"):
        maxpool.pool(_cl(torch.randn(1, 4, 2, 2)), 5, 1, 0)
    with pytest.raises(ValueError, match="refused window 3, stride 2, padding 2"):
        maxpool.pool(_cl(torch.randn(1, 4, 8, 8)), 3, 2, 2)


@needs_kernel
@pytest.mark.parametrize("case", ["no_grad", "eval_input_needs_no_grad"])
def test_inference_module_pools_with_the_kernel(case, monkeypatch) -> None:
    calls = []
    original = maxpool.pool
    monkeypatch.setattr(maxpool, "pool", lambda *a: calls.append(1) or original(*a))
    module = InferenceMaxPool2d(3, 2, 1)
    x = _cl(torch.randn(2, 24, 11, 12, generator=torch.Generator().manual_seed(3)))
    if case == "no_grad":
        with torch.no_grad():
            got = module(x.requires_grad_(True))
    else:
        got = module(x)
    assert calls == [1]
    assert torch.equal(got, F.max_pool2d(x.detach(), 3, 2, 1))


@pytest.mark.parametrize("case", ["needs_grad", "nchw", "float64", "compiling", "ceil_mode"])
def test_inference_module_falls_back_to_torch(case, monkeypatch) -> None:
    def refuse(*args):
        raise AssertionError("the kernel was used")

    monkeypatch.setattr(maxpool, "pool", refuse)
    module = InferenceMaxPool2d(3, 2, 1, ceil_mode=case == "ceil_mode")
    x = _cl(torch.randn(1, 8, 9, 9))
    if case == "needs_grad":
        x.requires_grad_(True)
    elif case == "nchw":
        x = x.contiguous()
    elif case == "float64":
        x = _cl(x, torch.float64)
    elif case == "compiling":
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    want = F.max_pool2d(x, 3, 2, 1, ceil_mode=case == "ceil_mode")
    torch.testing.assert_close(module(x), want, rtol=0, atol=0)


@needs_kernel
def test_swap_takes_only_what_the_kernel_computes_and_keeps_the_keys() -> None:
    model = resnext.create_model("resnext_tiny_in")
    keys = list(model.state_dict())
    assert use_inference_maxpool(model) == 1  # the stem's 3×3 stride-2 pooling
    assert isinstance(model.maxpool, InferenceMaxPool2d) and list(model.state_dict()) == keys
    odd = nn.Sequential(nn.MaxPool2d(3, 2, 1, ceil_mode=True), nn.MaxPool2d((3, 2)))
    assert use_inference_maxpool(odd) == 0


def _stem_as_before(fast: nn.Module) -> nn.Module:
    """A copy of an eager fast path with its stem apart as the passes left it before: the
    convolution without the ReLU, the folded BN an identity, torch's pooling."""
    before = copy.deepcopy(fast)
    before.model.conv1.relu = False
    before.model.bn1 = nn.Identity()
    before.model.maxpool.__class__ = nn.MaxPool2d
    return before


@pytest.mark.parametrize("backend", ["none", "replay"])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_optimize_gives_an_unfused_stem_its_relu_and_pooling(backend: str, dtype: str) -> None:
    if backend == "replay" and replay_unavailable() is not None:
        pytest.skip(f"replay unavailable: {replay_unavailable()}")
    model = resnext.create_model("resnext_tiny_in").eval()  # 16 stem outputs: no fused stem
    x = torch.randn(2, 3, 64, 80, generator=torch.Generator().manual_seed(5))
    eager = optimize(model, dtype, backend="none", example_input=x, fuse_stem="off")
    net = eager.model
    assert isinstance(net.conv1, PrepackedConv) and net.conv1.relu
    assert isinstance(net.bn1, ReluApplied)
    assert isinstance(net.maxpool, InferenceMaxPool2d if REASON is None else nn.MaxPool2d)
    fast = eager
    if backend == "replay":  # its own build: its choices weigh leaving the C loop
        fast = optimize(model, dtype, backend="replay", example_input=x, fuse_stem="off")
        eager = fast.module
        assert isinstance(eager.model.bn1, ReluApplied)
    with torch.no_grad():
        got = fast(x)
        # the ReLU applied in the convolution and a maximum are exact: the same bits as apart
        assert torch.equal(got, _stem_as_before(eager)(x))
        want = model(x)
        rel = ((got - want).abs().max() / want.abs().max()).item()
        assert rel < (1e-4 if dtype == "fp32" else 5e-2)


def test_fuse_stem_relu_takes_only_a_folded_stem_apart_on_onednn() -> None:
    x = torch.randn(1, 3, 32, 32)
    plain = resnext.create_model("resnext_tiny_in").eval()
    assert not fuse_stem_relu(plain)  # a plain convolution, its BN not folded
    folded = fold_batchnorm(plain)
    assert not fuse_stem_relu(folded)  # folded, but not on oneDNN's fused operator
    with torch.no_grad():
        want = folded(x)
    folded.conv1 = PrepackedConv(folded.conv1, False, False, tuple(x.shape))
    assert fuse_stem_relu(folded)
    assert folded.conv1.relu and isinstance(folded.bn1, ReluApplied)
    assert not fuse_stem_relu(folded)  # once
    with torch.no_grad():
        torch.testing.assert_close(folded(x), want, rtol=1e-5, atol=1e-5)
    # a pre-activation CIFAR network's stem has no BN or ReLU to take
    preact = fold_batchnorm(resnext.create_model("resnext_tiny", preact=True).eval())
    assert not preact._stem_act
    preact.conv1 = PrepackedConv(preact.conv1, False, False, tuple(x.shape))
    assert not fuse_stem_relu(preact) and not preact.conv1.relu
    assert not fuse_stem_relu(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU()))
