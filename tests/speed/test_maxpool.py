"""The training fast path's max pooling equals torch's: the same maxima, ties and NaNs chosen as
torch chooses them, and the same input gradient."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import resnext
from resnext.speed import maxpool
from resnext.speed.maxpool import TrainingMaxPool2d, use_fast_maxpool, use_plain_maxpool

REASON = maxpool.unavailable_reason()
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"max-pool kernel unavailable: {REASON}")

# (batch, channels, height, width, window, stride, padding): the stem's 3/2/1, odd and unequal
# sizes, channels that are not a multiple of 16, windows without padding and with stride 1.
SHAPES = [
    (2, 20, 13, 11, 3, 2, 1),
    (1, 64, 16, 16, 3, 2, 1),
    (3, 7, 9, 10, 2, 2, 0),
    (2, 33, 6, 7, 3, 1, 1),
    (1, 16, 12, 9, 5, 3, 2),
]
DTYPES = [torch.float32, torch.bfloat16]


def _cl(t: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return t.to(dtype).contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_forward_and_input_gradient_equal_torch(shape, dtype) -> None:
    n, c, h, w, k, s, p = shape
    g = torch.Generator().manual_seed(sum(shape))
    x = _cl(torch.randn(n, c, h, w, generator=g), dtype)
    y, taps = maxpool.forward(x, k, s, p)
    want = F.max_pool2d(x, k, s, p)
    assert y.dtype == dtype and taps.dtype == torch.uint8
    assert torch.equal(y, want)  # a maximum is one of the inputs: exact
    grad = _cl(torch.randn(want.shape, generator=g), dtype)
    # Reference: torch's backward in float64 on the same values routes each output's gradient to
    # the same input (the maxima are exact), and adds in float64.
    x64 = x.double().requires_grad_(True)
    F.max_pool2d(x64, k, s, p).backward(grad.double())
    got = maxpool.backward(grad, taps, (h, w), k, s, p)
    assert got.dtype == dtype and got.is_contiguous(memory_format=torch.channels_last)
    # float32 sums of at most ceil(k/s)² terms, then one rounding to the output dtype.
    tol = 1e-6 if dtype == torch.float32 else 2**-8
    torch.testing.assert_close(got.double(), x64.grad, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", DTYPES)
def test_ties_nans_and_minus_infinity_are_chosen_as_torch_chooses(dtype) -> None:
    x = torch.zeros(1, 16, 7, 7)  # all tied: torch keeps each window's first in-map tap
    x[0, 1] = -torch.inf  # nothing beats -inf: still the first tap
    x[0, 2, 2, 2] = torch.nan  # a NaN wins its windows
    x[0, 3, 1:4, 1:4] = 5.0  # a tied plateau over several windows
    x = _cl(x, dtype)
    y, taps = maxpool.forward(x, 3, 2, 1)
    torch.testing.assert_close(y, F.max_pool2d(x, 3, 2, 1), equal_nan=True, rtol=0, atol=0)
    grad = _cl(torch.arange(16 * 16, dtype=torch.float32).reshape(1, 16, 4, 4) + 1, dtype)
    xr = x.detach().clone().requires_grad_(True)
    F.max_pool2d(xr, 3, 2, 1).backward(grad)
    got = maxpool.backward(grad, taps, (7, 7), 3, 2, 1)
    torch.testing.assert_close(got, xr.grad, rtol=0, atol=0)  # the same inputs got the same sums


def test_bad_input_is_refused_by_name() -> None:
    x = _cl(torch.randn(1, 4, 8, 8))
    with pytest.raises(ValueError, match="x: expected a channels-last"):
        maxpool.forward(x.contiguous(), 3, 2, 1)
    with pytest.raises(ValueError, match="x: expected a channels-last"):
        maxpool.forward(x.double().contiguous(memory_format=torch.channels_last), 3, 2, 1)
    with pytest.raises(ValueError, match="x: a 2×2 map is smaller"):
        maxpool.forward(_cl(torch.randn(1, 4, 2, 2)), 5, 1, 0)
    with pytest.raises(ValueError, match="refused window 3, stride 2, padding 2"):
        maxpool.forward(x, 3, 2, 2)  # padding over half the window
    y, taps = maxpool.forward(x, 3, 2, 1)
    with pytest.raises(ValueError, match="taps: expected uint8"):
        maxpool.backward(y, taps.float(), (8, 8), 3, 2, 1)
    with pytest.raises(ValueError, match=r"input_size: 12×12 does not pool to the gradient's 4×4"):
        maxpool.backward(y, taps, (12, 12), 3, 2, 1)


def _run(pool: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> tuple[torch.Tensor, ...]:
    x = x.detach().clone().requires_grad_(True)
    y = pool(x)
    y.backward(grad)
    return y.detach(), x.grad


def test_module_trains_like_torch_and_swaps_only_what_it_takes(monkeypatch) -> None:
    model = resnext.create_model("resnext_tiny_in")
    keys = list(model.state_dict())
    assert use_fast_maxpool(model) == 1  # the stem's 3×3 stride-2 pooling
    assert list(model.state_dict()) == keys
    assert use_plain_maxpool(model) == 1
    odd = nn.Sequential(nn.MaxPool2d(3, 2, 1, ceil_mode=True), nn.MaxPool2d((3, 2)))
    assert use_fast_maxpool(odd) == 0
    plain = nn.MaxPool2d(3, 2, 1)
    fast = copy.deepcopy(plain)
    use_fast_maxpool(fast)
    assert isinstance(fast, TrainingMaxPool2d)
    calls = []
    original = maxpool.forward
    monkeypatch.setattr(maxpool, "forward", lambda *a: calls.append(1) or original(*a))
    x = _cl(torch.randn(2, 24, 11, 12, generator=torch.Generator().manual_seed(4)))
    grad = _cl(torch.randn(2, 24, 6, 6))
    for got, want in zip(_run(fast, x, grad), _run(plain, x, grad), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert calls == [1]


@pytest.mark.parametrize("case", ["eval", "nchw", "float64", "no_grad", "compiling"])
def test_falls_back_to_torch(case, monkeypatch) -> None:
    def refuse(*args):
        raise AssertionError("the kernel was used")

    monkeypatch.setattr(maxpool, "forward", refuse)
    pool = TrainingMaxPool2d(3, 2, 1)
    x = _cl(torch.randn(1, 8, 9, 9)).requires_grad_(True)
    if case == "eval":
        pool.eval()
    elif case == "nchw":
        x = x.detach().contiguous().requires_grad_(True)
    elif case == "float64":
        x = x.detach().double().contiguous(memory_format=torch.channels_last).requires_grad_(True)
    elif case == "compiling":
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    if case == "no_grad":
        with torch.no_grad():
            torch.testing.assert_close(pool(x), F.max_pool2d(x, 3, 2, 1))
        return
    torch.testing.assert_close(pool(x), F.max_pool2d(x, 3, 2, 1))
