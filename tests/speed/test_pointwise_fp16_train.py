"""Float16 products in training's 1×1 convolutions: the weight-gradient kernel bit for bit against
a numpy reimplementation of its documented arithmetic and within a bound from it, the transposed
packing, and the training fast path's `fp16_products` (offered only where asked, gradients within
the kernels' bounds, refused by the config without its conditions)."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from contextlib import AbstractContextManager

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tensor_checks import (
    float16_products_conv1x1_bound,
    float16_products_weight_grad_bound,
    nhwc,
)
from torch import nn

import resnext
from resnext.config import Config, TrainConfig, validate
from resnext.errors import ConfigError
from resnext.speed import autotune, pointwise_fp16
from resnext.speed.pointwise_train import (
    Fp16TrainingPointwiseConv2d,
    TrainingPointwiseConv2d,
    fp16_product,
    use_gemm_weight_grad,
    use_plain_pointwise_conv,
)
from resnext.speed.train_bench import make_step
from resnext.speed.train_paths import use_training_fast_paths

REASON = pointwise_fp16.unavailable_reason()
needs_fp16 = pytest.mark.skipif(REASON is not None, reason=f"fp16 kernel unavailable: {REASON}")


def block_rows(cin: int, cout: int, rows: int) -> int:
    """The pixel rows of a block, as the kernel's header gives them: C_out·C_in / (C_out + C_in)
    down to a multiple of 64, within [256, 1024], at most the layer's rows."""
    return min(rows, max(256, min(1024, cout * cin // (cout + cin) // 64 * 64)))


def _exponent(values: np.ndarray, top: int) -> int:
    """2^e puts the largest magnitude in [2^(top-1), 2^top) (frexp: m·2^E, m in [0.5, 1))."""
    largest = float(np.abs(values).max())
    return 0 if largest == 0 else top - math.frexp(largest)[1]


def _block_sums(rows_x: np.ndarray, rows_g: np.ndarray) -> np.ndarray:
    """One block's products: X scaled into [16, 32) and G into [8, 16), both rounded to float16;
    each product added to a float16 sum with one rounding (float64 holds the exact sum), runs of
    64 pixels, each run scaled back (two float32 products) and returned as float32 runs."""
    ex, eg = _exponent(rows_x, 5), _exponent(rows_g, 4)
    xh = (rows_x * np.float32(2.0**ex)).astype(np.float16).astype(np.float64)
    gh = (rows_g * np.float32(2.0**eg)).astype(np.float16).astype(np.float64)
    runs = []
    for r0 in range(0, len(rows_x), 64):
        run = np.zeros((rows_g.shape[1], rows_x.shape[1]), np.float16)
        for p in range(r0, min(r0 + 64, len(rows_x))):
            run = (run.astype(np.float64) + gh[p, :, None] * xh[p, None, :]).astype(np.float16)
        runs.append(run.astype(np.float32) * np.float32(2.0**-ex) * np.float32(2.0**-eg))
    return np.stack(runs)


def emulated_weight_grad(
    x: torch.Tensor, g: torch.Tensor, stride: int, threads: int | None = None
) -> torch.Tensor:
    """What the weight-gradient kernel's header says it computes, in numpy: the blocks of pixel
    rows (`block_rows`), each block's runs (`_block_sums`) added in order to float32 sums; with at
    least two blocks a thread, each of `threads` threads (torch's count if None) sums a
    contiguous range of blocks and the sums are added in thread order, else one thread's order."""
    threads = torch.get_num_threads() if threads is None else threads
    rows_x = x[:, :, ::stride, ::stride].permute(0, 2, 3, 1).reshape(-1, x.shape[1]).numpy()
    rows_g = g.permute(0, 2, 3, 1).reshape(-1, g.shape[1]).numpy()
    block = block_rows(x.shape[1], g.shape[1], rows_x.shape[0])
    starts = list(range(0, rows_x.shape[0], block))
    if len(starts) < 2 * threads:
        threads = 1  # the threads split the input channels: every sum in one thread's order
    total = None
    for t in range(threads):
        sums = np.zeros((g.shape[1], x.shape[1]), np.float32)
        for b0 in starts[len(starts) * t // threads : len(starts) * (t + 1) // threads]:
            for run in _block_sums(rows_x[b0 : b0 + block], rows_g[b0 : b0 + block]):
                sums = sums + run
        total = sums if total is None else total + sums
    assert total is not None
    return torch.from_numpy(total)[:, :, None, None]


def _bound(x: torch.Tensor, g: torch.Tensor, stride: int) -> torch.Tensor:
    rows = g.shape[0] * g.shape[2] * g.shape[3]
    block = block_rows(x.shape[1], g.shape[1], rows)
    return float16_products_weight_grad_bound(x, g, stride, block)


def _operands(
    gen: torch.Generator, n: int, cin: int, cout: int, h: int, w: int, stride: int
) -> tuple[torch.Tensor, torch.Tensor]:
    x = nhwc(torch.randn(n, cin, h, w, generator=gen))
    ho, wo = (h - 1) // stride + 1, (w - 1) // stride + 1
    return x, nhwc(torch.randn(n, cout, ho, wo, generator=gen) * 1e-3)


WGRAD_CASES = [
    # n, cin, cout, h, w, stride
    (1, 32, 3, 1, 1, 1),  # one pixel, three output channels
    (2, 96, 100, 13, 11, 2),  # part tiles of 12 outputs, a part run, stride 2 with odd sizes
    (3, 64, 40, 16, 16, 1),  # 768 rows: three blocks of 256
    (1, 32, 70, 10, 9, 3),  # stride 3
    (1, 1024, 512, 24, 24, 1),  # 576 rows: a block of 320, then the rest
    # 2,048 outputs or more: G converted tile by tile, the last tile of 8; two blocks of 256 and 144
    (1, 64, 2060, 20, 20, 1),
    (2, 32, 2048, 9, 9, 2),
]


def _torch_weight_grad(x: torch.Tensor, g: torch.Tensor, stride: int) -> torch.Tensor:
    """Gᵀ·X in float64 from torch's convolution backward on the same values."""
    weight = torch.zeros(g.shape[1], x.shape[1], 1, 1, dtype=torch.float64)
    return torch.ops.aten.convolution_backward(
        g.double(), x.double(), weight, None, [stride] * 2, [0, 0], [1, 1], False, [0, 0], 1,
        [False, True, False],
    )[1]  # fmt: skip


@needs_fp16
@pytest.mark.parametrize("n,cin,cout,h,w,stride", WGRAD_CASES)
def test_weight_grad_computes_the_documented_arithmetic_bit_for_bit(
    n: int, cin: int, cout: int, h: int, w: int, stride: int
) -> None:
    gen = torch.Generator().manual_seed(cin + cout + h)
    x, g = _operands(gen, n, cin, cout, h, w, stride)
    got = pointwise_fp16.weight_grad(x, g, stride)
    assert got.shape == (cout, cin, 1, 1) and got.is_contiguous()
    assert torch.equal(got, emulated_weight_grad(x, g, stride))


@needs_fp16
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("side", [15, 32])  # 2 blocks: panels split; 8 blocks: blocks split
def test_weight_grad_splits_the_work_between_threads_as_documented(
    threads: int, side: int, on_threads: Callable[[int], AbstractContextManager[None]]
) -> None:
    gen = torch.Generator().manual_seed(threads + side)
    x, g = _operands(gen, 2, 128, 64, side, side, 1)
    with on_threads(threads):
        got = pointwise_fp16.weight_grad(x, g, 1)
    assert torch.equal(got, emulated_weight_grad(x, g, 1, threads))


@needs_fp16
@pytest.mark.parametrize("stride", [1, 2])
def test_weight_grad_stays_within_its_bound_on_images_of_any_range(stride: int) -> None:
    gen = torch.Generator().manual_seed(stride)
    side = 16 * stride  # 256 output pixels an image: one block each
    x, g = _operands(gen, 4, 96, 64, side, side, stride)
    # each image its own range, 1e-30 to 1e30, in both operands: blocks of very different scales
    x = nhwc(x * torch.tensor([1e-30, 1e-3, 1.0, 1e30]).view(4, 1, 1, 1))
    g = nhwc(g * torch.tensor([1e20, 1e-25, 1e3, 1e-20]).view(4, 1, 1, 1))
    got = pointwise_fp16.weight_grad(x, g, stride).double()
    want = _torch_weight_grad(x, g, stride)
    bound = _bound(x, g, stride)
    assert bool(((got - want).abs() <= bound).all())
    assert not torch.equal(got, want)  # float16's rounding shows: the kernel ran


@needs_fp16
def test_weight_grad_bound_catches_a_product_lost() -> None:
    gen = torch.Generator().manual_seed(5)
    x, g = _operands(gen, 1, 32, 64, 8, 8, 1)
    lost = x.clone()
    lost[0, :, 3, 3] = 0  # what a kernel skipping one pixel would compute
    wrong = _torch_weight_grad(lost, g, 1)
    bound = _bound(x, g, 1)
    assert bool(((wrong - _torch_weight_grad(x, g, 1)).abs() > bound).any())


@needs_fp16
def test_weight_grad_puts_infinities_and_nans_where_torch_does() -> None:
    gen = torch.Generator().manual_seed(9)
    x, g = _operands(gen, 1, 64, 32, 6, 6, 1)
    x[0, 5, 2, 2] = math.inf
    g[0, 7, 1, 1] = math.nan
    g[0, :3, 2, 2] = 0  # inf × 0: NaN in those outputs' column 5
    got = pointwise_fp16.weight_grad(x, g, 1)
    want = _torch_weight_grad(x, g, 1)
    assert torch.equal(torch.isnan(got), torch.isnan(want))
    assert torch.equal(torch.isinf(got), torch.isinf(want))
    assert bool(torch.isnan(got).any()) and bool(torch.isinf(got).any())


@needs_fp16
@pytest.mark.parametrize(
    "x_shape,g_shape,stride,match",
    [
        ((1, 32, 4, 4), (1, 8, 3, 3), 1, "grad: expected the output's shape"),
        ((1, 48, 4, 4), (1, 8, 4, 4), 1, "x: expected a multiple of 32"),
        ((1, 32, 4, 4), (1, 8, 4, 4), 0, "stride: expected a positive integer"),
        ((1, 32, 4), (1, 8, 4, 4), 1, "x: expected a 4-d float32"),
    ],
)
def test_weight_grad_refuses_bad_inputs_by_name(x_shape, g_shape, stride, match) -> None:
    with pytest.raises(ValueError, match=match):
        pointwise_fp16.weight_grad(torch.randn(x_shape), torch.randn(g_shape), stride)


@needs_fp16
def test_weight_grad_refuses_a_bf16_gradient() -> None:
    with pytest.raises(ValueError, match="grad: expected a 4-d float32"):
        pointwise_fp16.weight_grad(torch.randn(1, 32, 4, 4), torch.randn(1, 8, 4, 4).bfloat16())


@needs_fp16
def test_transposed_packing_is_the_packing_of_the_transpose() -> None:
    weight = torch.randn(96, 64, 1, 1)
    got = pointwise_fp16.pack(weight, transposed=True)
    want = pointwise_fp16.pack(weight.transpose(0, 1).contiguous())
    assert torch.equal(got[0], want[0]) and got[1] == want[1]
    with pytest.raises(ValueError, match="multiple of 32 input channels"):
        pointwise_fp16.pack(torch.randn(64, 40, 1, 1), transposed=True)


def _fp16_conv(cin: int, cout: int, stride: int, seed: int) -> tuple[nn.Conv2d, nn.Conv2d]:
    torch.manual_seed(seed)
    plain = nn.Conv2d(cin, cout, 1, stride=stride, bias=False)
    fast = copy.deepcopy(plain)
    assert use_gemm_weight_grad(fast, fp16_products=True) == 1
    assert type(fast) is Fp16TrainingPointwiseConv2d
    return plain, fast


@needs_fp16
@pytest.mark.parametrize("stride", [1, 2])
def test_float16_products_train_within_the_kernels_bounds(stride: int) -> None:
    _, fast = _fp16_conv(64, 96, stride, seed=stride)
    x = nhwc(torch.randn(2, 64, 9, 9)).requires_grad_()
    with autotune.CHOOSER.prefer("ours-fp16"):
        y = fast(x)
        g = nhwc(torch.randn(y.shape))
        y.backward(g)
    w = fast.weight.detach()
    xd = x.detach()
    want_y = F.conv2d(xd.double(), w.double(), stride=stride)
    zero = torch.zeros(96)
    assert bool(((y.detach() - want_y).abs() <= float16_products_conv1x1_bound(
        xd, w, zero, None, stride)).all())  # fmt: skip
    # the input gradient is the transposed convolution of g, at the pixels the layer read
    want_dx = torch.zeros(xd.shape, dtype=torch.float64)
    want_dx[:, :, ::stride, ::stride] = F.conv2d(g.double(), w.double().transpose(0, 1))
    dx_bound = torch.zeros(xd.shape, dtype=torch.float64)
    dx_bound[:, :, ::stride, ::stride] = float16_products_conv1x1_bound(
        g, w.transpose(0, 1), torch.zeros(64), None, 1
    )
    assert bool(((x.grad - want_dx).abs() <= dx_bound).all())
    assert not torch.equal(x.grad.double(), want_dx)  # float16 products did run
    want_dw = _torch_weight_grad(xd, g, stride)
    assert bool(((fast.weight.grad - want_dw).abs() <= _bound(
        xd, g, stride)).all())  # fmt: skip


@needs_fp16
def test_float16_products_are_offered_only_where_asked() -> None:
    plain, fast = _fp16_conv(32, 64, 1, seed=3)
    use_plain_pointwise_conv(fast)
    assert type(fast) is nn.Conv2d
    assert use_gemm_weight_grad(fast) == 1 and type(fast) is TrainingPointwiseConv2d
    x = nhwc(torch.randn(1, 32, 6, 6)).requires_grad_()
    with autotune.CHOOSER.prefer("ours-fp16"):  # not offered: the reference, oneDNN, runs
        got = fast(x)
    assert torch.equal(got, plain(x))


def test_fast_paths_refuse_float16_products_without_the_1x1_path() -> None:
    with pytest.raises(ValueError, match="fp16_products"):
        use_training_fast_paths(
            nn.Conv2d(32, 32, 1, bias=False),
            fused_bn=False,
            grouped_kernels=False,
            gemm_weight_grad=False,
            fp16_products=True,
        )


@pytest.mark.parametrize(
    "train,match",
    [
        (dict(gemm_weight_grad=False), "train.fp16_products: .*train.gemm_weight_grad"),
        (dict(gemm_weight_grad=True, amp="bfloat16"), "train.fp16_products: .*'bfloat16'"),
    ],
)
def test_config_refuses_float16_products_without_their_conditions(train, match) -> None:
    cfg = Config(train=TrainConfig(channels_last=True, fp16_products=True, **train))
    with pytest.raises(ConfigError, match=match):
        validate(cfg)


def test_the_bench_variant_trains_with_float16_products_offered() -> None:
    model = resnext.create_model("resnext_tiny").train()
    x, y = torch.randn(2, 3, 32, 32), torch.randint(0, model.num_classes, (2,))
    step = make_step(model, "cl-fp32-fused-grouped-gemm-fp16", x, y)
    classes = {type(m) for m in model.modules() if isinstance(m, nn.Conv2d)}
    assert Fp16TrainingPointwiseConv2d in classes and TrainingPointwiseConv2d not in classes
    assert math.isfinite(step())


@needs_fp16
@pytest.mark.parametrize("transposed", [False, True])
def test_a_diverged_weight_takes_torchs_convolution(transposed: bool) -> None:
    w = torch.randn(64, 64, 1, 1)
    w[3, 5] = math.nan
    x = nhwc(torch.randn(1, 64, 4, 4))
    add = nhwc(torch.randn(1, 64, 4, 4))
    got = fp16_product(x, w, 1, add, transposed=transposed)
    want = F.conv2d(x, w.transpose(0, 1) if transposed else w) + add
    assert torch.equal(torch.isnan(got), torch.isnan(want)) and bool(torch.isnan(got).any())
    assert torch.equal(got.nan_to_num(), want.nan_to_num())
