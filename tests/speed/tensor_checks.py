"""Tensor helpers the speed tests share: channels-last copies, relative errors in float64, and
the error bounds of our float32, float16-product and bf16 kernels."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F


def nhwc(t: torch.Tensor) -> torch.Tensor:
    """`t` in channels-last memory order (the layout our kernels read and write)."""
    return t.contiguous(memory_format=torch.channels_last)


def rel_err(got: torch.Tensor, expected: torch.Tensor) -> float:
    """Largest difference relative to the largest expected magnitude, computed in float64 so
    that the measure adds no rounding of its own."""
    scale = expected.double().abs().max().clamp(min=1e-300)
    return ((got.double() - expected.double()).abs().max() / scale).item()


def float64_conv_grads(
    x: torch.Tensor,
    weight: torch.Tensor,
    grad: torch.Tensor,
    stride: int,
    padding: int,
    groups: int,
    bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``conv2d(x, weight, bias, stride, padding, groups=groups)``'s output, input gradient and
    weight gradient for output gradient `grad`, all in float64 (the references of gradients)."""
    xd = x.detach().double().requires_grad_()
    wd = weight.detach().double().requires_grad_()
    b = None if bias is None else bias.detach().double()
    out = F.conv2d(xd, wd, b, stride, padding, 1, groups)
    out.backward(grad.double())
    return out.detach(), xd.grad, wd.grad


def float32_conv1x1_bound(
    x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, r: torch.Tensor | None, stride: int
) -> torch.Tensor:
    """Each output's error bound for a float32 1×1 convolution (weight `w`, bias `b`, residual
    `r` or None): a sum of K products, the bias and the residual, each rounding step at most
    2^-24 of the running magnitude, which never exceeds the sum of the magnitudes (Higham's bound
    for recursive summation, in any order, with or without FMAs)."""
    mags = F.conv2d(x.double().abs(), w.double().abs(), b.double().abs(), stride=stride)
    if r is not None:
        mags = mags + r.double().abs()
    return (w.shape[1] + 3) * 2.0**-24 * mags


Conv1x1Run = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, int, bool, "torch.Tensor | None", bool], torch.Tensor
]


def check_float32_conv1x1(run: Conv1x1Run, case: tuple) -> None:
    """Check a float32 1×1 kernel, ``run(x, weight, bias, stride, relu, residual, in_place)``,
    on a random `case` (n, cin, cout, h, w, stride, relu, residual, in_place): within
    `float32_conv1x1_bound` of float64, channels-last out, and written over the residual it was
    given only where asked (else that residual left as it was)."""
    n, cin, cout, h, w, stride, relu, residual, in_place = case
    gen = torch.Generator().manual_seed(cin * cout + h)
    x = nhwc(torch.randn(n, cin, h, w, generator=gen))
    weight = torch.randn(cout, cin, 1, 1, generator=gen)
    bias = torch.randn(cout, generator=gen)
    want = F.conv2d(x.double(), weight.double(), bias.double(), stride=stride)
    res = nhwc(torch.randn(want.shape, generator=gen)) if residual else None
    bound = float32_conv1x1_bound(x, weight, bias, res, stride)
    if res is not None:
        want = want + res.double()
    if relu:
        want = want.relu()  # 1-Lipschitz: the bound holds after it
    given = None if res is None else res.clone()
    got = run(x, weight, bias, stride, relu, given, in_place)
    assert got.shape == want.shape
    assert got.is_contiguous(memory_format=torch.channels_last)
    assert bool(((got.double() - want).abs() <= bound).all())
    if in_place:
        assert got.data_ptr() == given.data_ptr()  # written over the residual it was given
    elif res is not None:
        assert torch.equal(given, res)  # the residual left as it was


def float16_products_conv1x1_bound(
    x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, r: torch.Tensor | None, stride: int
) -> torch.Tensor:
    """Each output's error bound for a 1×1 convolution whose operands are rounded to float16
    (after exact power-of-two scaling) and whose products are summed in float16 in runs of 64,
    the runs in float32, then the bias and residual added in float32. With u = 2^-11, each
    operand's rounding costs at most u of it, a run's recursive float16 sum γ_64 = 64u/(1 − 64u)
    of its products' magnitudes (Higham, "Accuracy and Stability of Numerical Algorithms", §4.2)
    and the float32 sums of the runs (K/64 + 1)·2^-24; float16's subnormals add at most 2^-25 of
    scaled units per operand and product: with the input scaled below 256 and the weight below 1,
    at most K·2^-23·max|x|·max|w| in all. The bias and residual additions cost 2^-24 each."""
    u = 2.0**-11
    k = w.shape[1]
    gamma = 64 * u / (1 - 64 * u)
    relative = (1 + u) ** 2 * (1 + gamma) * (1 + (k // 64 + 1) * 2.0**-24) - 1
    mags = F.conv2d(x.double().abs(), w.double().abs(), stride=stride)
    subnormal = k * 2.0**-23 * x.double().abs().max() * w.double().abs().max()
    outer = mags + b.double().abs()[None, :, None, None]
    if r is not None:
        outer = outer + r.double().abs()
    return relative * mags + subnormal + 3 * 2.0**-24 * outer


def fast_path_error(model: torch.nn.Module, fast: torch.nn.Module, shape: tuple[int, ...]) -> float:
    """`rel_err` of `fast` against `model` on a fresh input of `shape`, after asserting that
    `fast` leaves a float32 channels-last input (which it may take as it is) as it was: the
    caller's tensor is never written over."""
    fresh = torch.randn(shape)
    mine = nhwc(fresh.clone())
    with torch.no_grad():
        want, got = model(fresh), fast(fresh)
        fast(mine)
    assert torch.equal(mine, nhwc(fresh))
    return rel_err(got, want)


def within_bf16_grouped_bound(
    got: torch.Tensor,
    x: torch.Tensor,
    w: torch.Tensor,
    b: torch.Tensor,
    stride: int,
    groups: int,
    channel_order: torch.Tensor | None = None,
) -> bool:
    """Whether `got` is relu(conv2d(x, w, b, stride, padding 1, groups)) (its output channels in
    `channel_order`, if given) to the bf16 kernels' precision: float32 sums of exact bf16
    products, then one rounding to bf16 (2^-8 of the value). x and w hold bf16 values."""
    expected = F.conv2d(x.double(), w.double(), b.double(), stride, 1, 1, groups).relu()
    mags = F.conv2d(x.double().abs(), w.double().abs(), b.double().abs(), stride, 1, 1, groups)
    if channel_order is not None:
        expected, mags = expected[:, channel_order], mags[:, channel_order]
    if got.shape != expected.shape:
        return False
    summed = (9 * w.shape[1] + 2) * 2.0**-24 * mags
    bound = summed + 2.0**-8 * (expected.abs() + summed)
    return bool(((got.double() - expected).abs() <= bound).all())


def float16_products_weight_grad_bound(
    x: torch.Tensor, g: torch.Tensor, stride: int, block: int
) -> torch.Tensor:
    """Each entry's error bound for a 1×1 convolution's weight gradient Gᵀ·X whose operands are
    rounded to float16 after exact power-of-two scaling per block of `block` pixel rows (X below
    32, G below 16), products summed in float16 in runs of 64 pixels and the runs in float32.
    With u = 2^-11: each operand's rounding costs u of it, a run's float16 sum γ_64 (Higham §4.2)
    and the float32 sum of P/64 + 1 runs (P/64 + 1)·2^-24. float16's subnormals cost, per pixel
    in scaled units, at most 2^-25 of each operand times the other's bound and 2^-25 in the sum:
    below 2^-19, or 2^-26·max|X_b|·max|G_b| unscaled (2^-ex ≤ max|X_b|/16, 2^-eg ≤ max|G_b|/8)."""
    u = 2.0**-11
    rows_x = x[:, :, ::stride, ::stride].permute(0, 2, 3, 1).reshape(-1, x.shape[1]).double()
    rows_g = g.permute(0, 2, 3, 1).reshape(-1, g.shape[1]).double()
    pixels = rows_x.shape[0]
    gamma = 64 * u / (1 - 64 * u)
    relative = (1 + u) ** 2 * (1 + gamma) * (1 + (pixels // 64 + 1) * 2.0**-24) - 1
    mags = rows_g.abs().t() @ rows_x.abs()
    subnormal = sum(
        min(block, pixels - p0)
        * 2.0**-26
        * rows_x[p0 : p0 + block].abs().max()
        * rows_g[p0 : p0 + block].abs().max()
        for p0 in range(0, pixels, block)
    )
    return (relative * mags + subnormal)[:, :, None, None]
