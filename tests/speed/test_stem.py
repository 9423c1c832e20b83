"""The fused stem kernel (conv, bias, ReLU, 3×3/2 max pooling) against float64 convolution and
pooling, its errors, and `optimize`'s pass that puts it in a ResNeXt's stem."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager

import pytest
import torch
import torch.nn.functional as F
from tensor_checks import nhwc
from torch import nn

import resnext
from resnext.errors import ConfigError
from resnext.speed import stem, stem_dot
from resnext.speed.fastpath import optimize
from resnext.speed.fold import fold_batchnorm
from resnext.speed.prepacked import PrepackedConv
from resnext.speed.stem_fusion import (
    FusedStem,
    ReluApplied,
    backend_for,
    eligible,
    fuse_stem,
    stem_fusable,
)

REASON = stem.unavailable_reason()
needs_amx = pytest.mark.skipif(REASON is not None, reason=f"AMX kernel unavailable: {REASON}")
DOT_REASON = stem_dot.unavailable_reason()
needs_dot = pytest.mark.skipif(
    DOT_REASON is not None, reason=f"AVX512-BF16 stem kernel unavailable: {DOT_REASON}"
)
DTYPES = [torch.bfloat16, torch.float32]


def _case(
    n: int, cin: int, c: int, h: int, w: int, k: int, dtype: torch.dtype, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = nhwc(torch.randn(n, cin, h, w, generator=gen).to(dtype))
    weight = (torch.randn(c, cin, k, k, generator=gen) / (cin * k * k) ** 0.5).to(dtype)
    return x, weight, torch.randn(c, generator=gen)


def _small_model() -> nn.Module:
    """A small ImageNet-layout network whose stem the kernel takes (32 outputs)."""
    return resnext.create_model("resnext_tiny_in", stem_width=32).eval()


def _exact(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, s: int, p: int):
    conv = F.conv2d(x.double(), weight.double(), bias.double(), s, p)
    return F.max_pool2d(F.relu(conv), 3, 2, 1)


def _bound(x: torch.Tensor, weight: torch.Tensor, exact: torch.Tensor, s: int, p: int):
    """Each output's error bound. bf16 (inputs exact in float32): float32 accumulation of K
    terms, then rounding the output to bf16 (2^-9 of it). float32: the three kept bf16 products
    err by at most 3·2^-16 of |x w| each, plus float32 accumulation. The pooled |x|·|w| bounds
    the window's (each window's max is within the window's largest |x|·|w|)."""
    depth = weight[0].numel()
    size = F.max_pool2d(F.conv2d(x.double().abs(), weight.double().abs(), None, s, p), 3, 2, 1)
    if x.dtype == torch.bfloat16:
        return 2.0**-8 * exact.abs() + depth * 2.0**-23 * size + 1e-6
    return (3 * 2.0**-16 + depth * 2.0**-23) * size + 1e-6


@needs_amx
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "n,cin,c,h,w,k,s,p",
    [
        (2, 3, 64, 224, 224, 7, 2, 3),  # torchvision's stem at its natural size, whole images
        (9, 3, 64, 33, 30, 7, 2, 3),  # batch >= 4 per thread: one band per image
        (1, 3, 64, 37, 50, 7, 2, 3),  # batch 1: bands of rows, odd sizes, a half-filled last item
        (3, 5, 32, 20, 17, 3, 1, 1),  # a 3×3 on 5 channels, stride 1
        (1, 3, 96, 9, 9, 7, 2, 3),  # 6 output tiles; windows clipped at every border
        (2, 3, 64, 5, 4, 7, 2, 3),  # images smaller than the kernel's reach: 2×2 output
        (1, 16, 32, 12, 11, 5, 2, 0),  # no padding; 80 values per kernel row: 3 K steps
    ],
)
def test_kernel_matches_convolution_relu_and_pooling(
    dtype: torch.dtype, n: int, cin: int, c: int, h: int, w: int, k: int, s: int, p: int
) -> None:
    x, weight, bias = _case(n, cin, c, h, w, k, dtype, seed=h * w + c)
    got = stem.run(x, stem.pack(weight), bias, k, s, p)
    exact = _exact(x, weight, bias, s, p)
    assert got.dtype == dtype and got.shape == exact.shape
    assert got.is_contiguous(memory_format=torch.channels_last)
    assert tuple(got.shape) == stem.output_shape(tuple(x.shape), c, k, s, p)
    err = (got.double() - exact).abs()
    assert bool((err <= _bound(x, weight, exact, s, p)).all()), err.max().item()
    assert (got > 0).any() and (got == 0).any()  # the ReLU cut some windows, not all


@needs_amx
@pytest.mark.parametrize("dtype", DTYPES)
def test_each_thread_count_gives_the_same_bits(
    dtype: torch.dtype, on_threads: Callable[[int], AbstractContextManager[None]]
) -> None:
    # bands differ with the thread count; a band's edge row is recomputed in the same order
    x, weight, bias = _case(2, 3, 64, 61, 47, 7, dtype, seed=3)
    packed = stem.pack(weight)
    outs = []
    for threads in (1, 2, 3, 5):
        with on_threads(threads):
            outs.append(stem.run(x, packed, bias, 7, 2, 3))
    assert all(torch.equal(outs[0], o) for o in outs[1:])


@needs_amx
@pytest.mark.parametrize("dtype", DTYPES)
def test_buffers_kept_across_calls_leave_no_trace(dtype: torch.dtype) -> None:
    # a wider call on NaNs fills every thread's padded rows and ring with NaN first
    nan = nhwc(torch.full((4, 3, 96, 96), float("nan"), dtype=dtype))
    packed = stem.pack(torch.randn(64, 3, 7, 7))
    assert torch.isnan(stem.run(nan, packed, torch.zeros(64), 7, 2, 3)).all()
    x, weight, bias = _case(1, 3, 64, 13, 10, 7, dtype, seed=4)
    got = stem.run(x, stem.pack(weight), bias, 7, 2, 3)
    exact = _exact(x, weight, bias, 2, 3)
    assert bool(((got.double() - exact).abs() <= _bound(x, weight, exact, 2, 3)).all())


@needs_amx
@pytest.mark.parametrize("bf16", [True, False])
@pytest.mark.parametrize(
    "cin,w",
    [(3, 50), (3, 13), (5, 21)],  # RGB with 16-pixel runs and a tail; RGB under 16; 5 planes
)
def test_every_input_dtype_and_layout_gives_the_same_bits(bf16: bool, cin: int, w: int) -> None:
    # the kernel converts each value as it reads it, rounding as torch's own cast does: an
    # image handed over as it is gives exactly the output of the image cast first
    gen = torch.Generator().manual_seed(cin * w)
    image = torch.randn(2, cin, 19, w, generator=gen)
    weight = torch.randn(32, cin, 7, 7, generator=gen)
    dtype = torch.bfloat16 if bf16 else torch.float32
    packed, bias = stem.pack(weight.to(dtype)), torch.randn(32, generator=gen)
    want = stem.run(nhwc(image.to(dtype)), packed, bias, 7, 2, 3)
    assert want.dtype == dtype
    strided = image.transpose(2, 3).contiguous().transpose(2, 3)  # neither layout: copied first
    for form in (image, nhwc(image), strided):
        assert torch.equal(stem.run(form, packed, bias, 7, 2, 3, bf16), want)
    # a bf16 image: for bf16 products the same bits; for float32 ones, its exact float32 values
    rounded = image.bfloat16()
    want = stem.run(nhwc(rounded.to(dtype)), packed, bias, 7, 2, 3)
    for form in (rounded, nhwc(rounded)):
        assert torch.equal(stem.run(form, packed, bias, 7, 2, 3, bf16), want)


def test_pack_lays_out_each_kernel_row_in_whole_k_steps() -> None:
    # 7 columns × 3 channels = 21 values per kernel row, zero-filled to one 32-deep step
    weight = torch.arange(64 * 3 * 7 * 7, dtype=torch.float32).reshape(64, 3, 7, 7)
    packed = stem.pack(weight)
    assert packed.shape == (4, 7, 2, 16, 16, 2) and packed.dtype == torch.bfloat16
    # output o = 16 t + j, kernel row i, step value v = 2 q + m: packed[t, i, 0, q, j, m]
    o, i, kw, ci = 17, 4, 5, 2
    v = kw * 3 + ci
    got = (
        packed[o // 16, i, 0, v // 2, o % 16, v % 2].float()
        + packed[o // 16, i, 1, v // 2, o % 16, v % 2].float()
    )
    assert got == pytest.approx(weight[o, ci, i, kw].item(), rel=2**-16)
    assert (packed[:, :, :, 21 // 2 + 1 :] == 0).all()  # values 22.. of each row's step
    assert (packed[:, :, :, 10, :, 1] == 0).all()  # value 21


@needs_amx
def test_bad_inputs_name_the_argument() -> None:
    x, weight, bias = _case(1, 3, 64, 16, 16, 7, torch.float32, seed=5)
    packed = stem.pack(weight)
    with pytest.raises(ValueError, match="x: expected a 4-d bf16 or float32"):
        stem.run(x.half(), packed, bias, 7, 2, 3)
    with pytest.raises(ValueError, match=r"packed: expected .* 12 input channels"):
        stem.run(nhwc(torch.randn(1, 12, 16, 16)), packed, bias, 7, 2, 3)  # 3 K steps a row
    with pytest.raises(ValueError, match=r"packed: expected .* a 5×5 kernel"):
        stem.run(x, packed, bias, 5, 2, 2)
    with pytest.raises(ValueError, match="bias: expected 64 float32"):
        stem.run(x, packed, bias[:32], 7, 2, 3)
    with pytest.raises(ValueError, match="kernel, stride, padding: expected a stem"):
        stem.run(x, packed, bias, 7, 2, 7)
    with pytest.raises(ValueError, match="x: 2×2 is smaller than the 7×7 kernel"):
        stem.run(nhwc(torch.randn(1, 3, 2, 2)), packed, bias, 7, 2, 2)
    with pytest.raises(ValueError, match="weight: expected a \\(C, Cin, k, k\\)"):
        stem.pack(torch.randn(48, 3, 7, 7))  # outputs not a multiple of 32
    with pytest.raises(ValueError, match="stem: an inference kernel"):
        torch.ops.resnext.stem(x.clone().requires_grad_(), packed, bias, 7, 2, 3, False)


def test_only_convolutions_the_kernel_takes_are_eligible() -> None:
    assert eligible(nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False))
    assert eligible(nn.Conv2d(3, 64, 7, stride=2, padding=3).to(torch.bfloat16))
    assert not eligible(nn.Conv2d(3, 48, 7, stride=2, padding=3))  # outputs
    assert not eligible(nn.Conv2d(3, 64, 7, stride=2, padding=3, groups=1).half())
    assert not eligible(nn.Conv2d(3, 64, (7, 5), stride=2, padding=3))
    assert not eligible(nn.Conv2d(3, 64, 7, stride=2, padding=3, dilation=2))
    assert not eligible(nn.Conv2d(3, 64, 7, stride=2, padding=3, padding_mode="reflect"))
    assert not eligible(nn.Linear(3, 64))


def test_only_a_folded_imagenet_stem_with_its_pooling_qualifies() -> None:
    model = _small_model()
    assert not stem_fusable(model)  # its BN is not folded yet
    assert stem_fusable(fold_batchnorm(model))
    assert not stem_fusable(fold_batchnorm(resnext.create_model("resnext_tiny_in")))  # 16 outputs
    assert not stem_fusable(fold_batchnorm(resnext.create_model("resnext_tiny")))  # CIFAR
    changed = fold_batchnorm(model)
    changed.maxpool = nn.MaxPool2d(3, 2, 1, ceil_mode=True)
    assert not stem_fusable(changed)
    changed.maxpool = nn.MaxPool2d(2, 2)
    assert not stem_fusable(changed)
    assert not stem_fusable(nn.Sequential(nn.Conv2d(3, 64, 7, 2, 3), nn.ReLU()))


def test_relu_applied_stands_in_for_the_stems_bn_and_relu() -> None:
    x = torch.randn(2, 3)
    done = ReluApplied()
    assert done(x) is x and done.forward_act(x) is x
    with pytest.raises(ValueError, match="residual: the stem has none"):
        done.forward_act(x, x)


@needs_amx
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_optimize_fuses_the_stem_and_computes_the_same_function(dtype: str) -> None:
    model = _small_model()
    x = torch.randn(2, 3, 64, 80)
    # conv_x3 off: in float32 it could take the unfused stem's convolution, by timing
    apart = optimize(model, dtype, backend="none", example_input=x, fuse_stem="off", conv_x3="off")
    fast = optimize(model, dtype, backend="none", example_input=x, fuse_stem="on")
    # left to oneDNN, which the eager fast path runs prepacked
    assert apart.stem_choices == [] and isinstance(apart.model.conv1, PrepackedConv)
    (choice,) = fast.stem_choices
    assert (choice.name, choice.chosen, choice.variant) == ("conv1", "fused", "stem")
    assert choice.input_shape == (2, 3, 64, 80) and choice.native_ms > 0 and choice.kernel_ms > 0
    assert isinstance(fast.model.conv1, FusedStem)
    assert isinstance(fast.model.bn1, ReluApplied) and isinstance(fast.model.maxpool, nn.Identity)
    with torch.no_grad():
        want, got = model(x), fast(x)
        rel = ((got - want).abs().max() / want.abs().max()).item()
        assert rel < (1e-4 if dtype == "fp32" else 5e-2)
        # the image goes to the fused stem as it is, in any float dtype and layout
        mine = x.clone()
        assert torch.equal(fast(nhwc(x)), got) and torch.equal(fast(x.double()), got)
        fast(mine)
        assert torch.equal(mine, x)


@needs_amx
def test_auto_records_both_timings_and_strict_float32_keeps_the_stem() -> None:
    model = _small_model()
    x = torch.randn(1, 3, 64, 64)
    fast = optimize(model, "fp32", backend="none", example_input=x)
    (choice,) = fast.stem_choices
    assert choice.chosen in ("fused", "separate")
    assert isinstance(fast.model.conv1, FusedStem) == (choice.chosen == "fused")
    assert (choice.chosen == "fused") == (choice.kernel_ms < choice.native_ms)
    # conv_x3='off' promises float32 FMAs throughout; the fused stem's float32 is bf16×3
    strict = optimize(model, "fp32", backend="none", example_input=x, conv_x3="off")
    assert strict.stem_choices == [] and not isinstance(strict.model.conv1, FusedStem)


def test_pass_modes(monkeypatch: pytest.MonkeyPatch) -> None:
    model = fold_batchnorm(_small_model())
    x = nhwc(torch.randn(1, 3, 32, 32))
    with pytest.raises(ConfigError, match="fuse_stem: expected one of"):
        fuse_stem(model, x, mode="yes")
    with pytest.raises(ConfigError, match="fuse_stem: expected one of"):
        optimize(model, backend="none", fuse_stem="always")
    assert fuse_stem(model, x, mode="off") == [] and isinstance(model.conv1, nn.Conv2d)
    # as on a CPU without AMX: 'auto' leaves the stem, 'on' says why it cannot
    monkeypatch.setattr(stem, "unavailable_reason", lambda: "this CPU lacks ['amx_bf16']")
    assert fuse_stem(model, x, mode="auto") == [] and isinstance(model.conv1, nn.Conv2d)
    with pytest.raises(ConfigError, match=r"fuse_stem: 'on' but the kernel cannot run here"):
        fuse_stem(model, x, mode="on")


@needs_amx
@pytest.mark.parametrize("backend,dtype", [("inductor", "bf16"), ("jit", "fp32")])
def test_the_fused_stem_compiles_and_traces(backend: str, dtype: str) -> None:
    # the operator's fake (shape-only) kernel under inductor, and the traced call under jit
    model = _small_model()
    x = torch.randn(2, 3, 48, 40)
    fast = optimize(model, dtype, backend=backend, example_input=x, fuse_stem="on")
    assert [c.chosen for c in fast.stem_choices] == ["fused"]
    eager = optimize(model, dtype, backend="none", example_input=x, fuse_stem="on")
    with torch.no_grad():
        want, got = model(x), fast(x)
        assert ((got - want).abs().max() / want.abs().max()).item() < (
            1e-4 if dtype == "fp32" else 5e-2
        )
        # the same kernels: the compiled module agrees with the eager fast path closely
        assert ((got - eager(x)).abs().max() / want.abs().max()).item() < (
            1e-5 if dtype == "fp32" else 2e-2
        )


# The AVX512-BF16 kernel (`stem_dot`): bf16 products of 64-output strips.


@needs_dot
@pytest.mark.parametrize(
    "n,cin,c,h,w,k,s,p",
    [
        (2, 3, 64, 224, 224, 7, 2, 3),  # torchvision's stem at its natural size, whole images
        (9, 3, 64, 33, 30, 7, 2, 3),  # batch >= 4 per thread: one band per image
        (1, 3, 64, 37, 50, 7, 2, 3),  # batch 1: bands of rows, odd sizes, a partial 6-pixel tile
        (3, 5, 64, 20, 17, 3, 1, 1),  # a 3×3 on 5 channels (15 values: odd), stride 1
        (1, 3, 128, 9, 9, 7, 2, 3),  # 2 strips; windows clipped at every border
        (2, 3, 64, 5, 4, 7, 2, 3),  # images smaller than the kernel's reach: 2×2 output
        (1, 16, 64, 12, 11, 5, 2, 0),  # no padding; 80 values per kernel row: 40 pairs
    ],
)
def test_dot_kernel_matches_convolution_relu_and_pooling(
    n: int, cin: int, c: int, h: int, w: int, k: int, s: int, p: int
) -> None:
    x, weight, bias = _case(n, cin, c, h, w, k, torch.bfloat16, seed=h * w + c)
    got = stem_dot.run(x, stem_dot.pack(weight), bias, k, s, p)
    exact = _exact(x, weight, bias, s, p)
    assert got.dtype == torch.bfloat16 and got.shape == exact.shape
    assert got.is_contiguous(memory_format=torch.channels_last)
    err = (got.double() - exact).abs()
    assert bool((err <= _bound(x, weight, exact, s, p)).all()), err.max().item()
    assert (got > 0).any() and (got == 0).any()  # the ReLU cut some windows, not all


@needs_dot
def test_dot_kernel_gives_the_same_bits_on_any_thread_count_and_input_form(
    on_threads: Callable[[int], AbstractContextManager[None]],
) -> None:
    gen = torch.Generator().manual_seed(7)
    image = torch.randn(2, 3, 61, 47, generator=gen)
    packed = stem_dot.pack(torch.randn(64, 3, 7, 7, generator=gen).bfloat16())
    bias = torch.randn(64, generator=gen)
    want = stem_dot.run(nhwc(image.bfloat16()), packed, bias, 7, 2, 3)
    for threads in (1, 3, 5):  # bands differ; a band's edge row is recomputed the same way
        with on_threads(threads):
            assert torch.equal(stem_dot.run(nhwc(image.bfloat16()), packed, bias, 7, 2, 3), want)
    # float32 or bf16, NCHW, channels_last or neither: each value rounded as a cast rounds it
    strided = image.transpose(2, 3).contiguous().transpose(2, 3)
    for form in (image, nhwc(image), strided, image.bfloat16()):
        assert torch.equal(stem_dot.run(form, packed, bias, 7, 2, 3), want)


@needs_dot
def test_dot_buffers_kept_across_calls_leave_no_trace() -> None:
    nan = nhwc(torch.full((4, 3, 96, 96), float("nan"), dtype=torch.bfloat16))
    packed = stem_dot.pack(torch.randn(64, 3, 7, 7))
    assert torch.isnan(stem_dot.run(nan, packed, torch.zeros(64), 7, 2, 3)).all()
    x, weight, bias = _case(1, 3, 64, 13, 10, 7, torch.bfloat16, seed=4)
    got = stem_dot.run(x, stem_dot.pack(weight), bias, 7, 2, 3)
    exact = _exact(x, weight, bias, 2, 3)
    assert bool(((got.double() - exact).abs() <= _bound(x, weight, exact, 2, 3)).all())


def test_dot_pack_lays_out_each_kernel_row_in_pairs() -> None:
    # 7 columns × 3 channels = 21 values per kernel row: 11 pairs, the last value zero
    weight = torch.arange(128 * 3 * 7 * 7, dtype=torch.float32).reshape(128, 3, 7, 7) / 1024
    packed = stem_dot.pack(weight)
    assert packed.shape == (2, 7, 11, 64, 2) and packed.dtype == torch.bfloat16
    # output o = 64 t + j, kernel row i, value v = kw·3 + ci = 2 q + m: packed[t, i, q, j, m]
    for o, i, kw, ci in ((0, 0, 0, 0), (70, 4, 5, 2), (127, 6, 6, 1), (5, 2, 3, 0)):
        v = kw * 3 + ci
        want = weight[o, ci, i, kw].to(torch.bfloat16)
        assert packed[o // 64, i, v // 2, o % 64, v % 2] == want
    assert (packed[:, :, 10, :, 1] == 0).all()  # value 21 of every row


@needs_dot
def test_dot_bad_inputs_name_the_argument() -> None:
    x, weight, bias = _case(1, 3, 64, 16, 16, 7, torch.bfloat16, seed=5)
    packed = stem_dot.pack(weight)
    with pytest.raises(ValueError, match="x: expected a 4-d bf16 or float32"):
        stem_dot.run(x.half(), packed, bias, 7, 2, 3)
    with pytest.raises(ValueError, match=r"packed: expected .* 12 input channels"):
        stem_dot.run(nhwc(torch.randn(1, 12, 16, 16)), packed, bias, 7, 2, 3)
    with pytest.raises(ValueError, match=r"packed: expected .* a 5×5 kernel"):
        stem_dot.run(x, packed, bias, 5, 2, 2)
    with pytest.raises(ValueError, match=r"packed: expected a contiguous bf16 stem_dot.pack"):
        stem_dot.run(x, stem.pack(weight), bias, 7, 2, 3)  # the AMX kernel's packing
    with pytest.raises(ValueError, match="bias: expected 64 float32"):
        stem_dot.run(x, packed, bias[:32], 7, 2, 3)
    with pytest.raises(ValueError, match="kernel, stride, padding: expected a stem"):
        stem_dot.run(x, packed, bias, 7, 2, 7)
    with pytest.raises(ValueError, match="x: 2×2 is smaller than the 7×7 kernel"):
        stem_dot.run(nhwc(torch.randn(1, 3, 2, 2)), packed, bias, 7, 2, 2)
    with pytest.raises(
        ValueError, match="weight: expected a \\(C, Cin, k, k\\) weight with C a multiple of 64"
    ):
        stem_dot.pack(torch.randn(96, 3, 7, 7))
    with pytest.raises(ValueError, match="stem_dot: an inference kernel"):
        torch.ops.resnext.stem_dot(x.float().requires_grad_(), packed, bias, 7, 2, 3)


def test_eligibility_follows_the_backend() -> None:
    bf16 = nn.Conv2d(3, 64, 7, stride=2, padding=3).to(torch.bfloat16)
    assert eligible(bf16, "dot") and eligible(bf16, "amx")
    assert not eligible(nn.Conv2d(3, 64, 7, stride=2, padding=3), "dot")  # float32
    assert not eligible(nn.Conv2d(3, 96, 7, stride=2, padding=3).to(torch.bfloat16), "dot")
    assert eligible(nn.Conv2d(3, 96, 7, stride=2, padding=3).to(torch.bfloat16), "amx")
    with pytest.raises(ValueError, match="backend: expected one of"):
        FusedStem(bf16, "avx")
    with pytest.raises(ValueError, match="conv: expected a bf16 square convolution"):
        FusedStem(nn.Conv2d(3, 64, 7, stride=2, padding=3), "dot")


def test_the_backend_is_amx_where_it_runs_else_dot_for_bf16(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(stem, "unavailable_reason", lambda: None)
    assert backend_for(torch.float32) == ("amx", None)
    monkeypatch.setattr(stem, "unavailable_reason", lambda: "no AMX")
    monkeypatch.setattr(stem_dot, "unavailable_reason", lambda: None)
    assert backend_for(torch.bfloat16) == ("dot", None)
    assert backend_for(torch.float32) == (None, "float32 needs the AMX kernel: no AMX")
    monkeypatch.setattr(stem_dot, "unavailable_reason", lambda: "no AVX512-BF16")
    assert backend_for(torch.bfloat16) == (
        None,
        "AMX kernel: no AMX; AVX512-BF16 kernel: no AVX512-BF16",
    )


needs_dot_only = pytest.mark.skipif(
    DOT_REASON is not None or REASON is None,
    reason="the AVX512-BF16 stem runs where AMX is absent and AVX512-BF16 present",
)


@needs_dot_only
@pytest.mark.parametrize("backend", ["none", "inductor"])
def test_optimize_fuses_the_stem_with_the_dot_kernel(backend: str) -> None:
    model = resnext.create_model("resnext_tiny_in", stem_width=64).eval()
    x = torch.randn(2, 3, 64, 80)
    fast = optimize(model, "bf16", backend=backend, example_input=x, fuse_stem="on")
    (choice,) = fast.stem_choices
    assert (choice.name, choice.chosen) == ("conv1", "fused")
    eager = optimize(model, "bf16", backend="none", example_input=x, fuse_stem="on")
    assert isinstance(eager.model.conv1, FusedStem) and eager.model.conv1.backend == "dot"
    # float32 has no fused stem without AMX: 'auto' leaves it, 'on' says why
    assert optimize(model, "fp32", backend="none", example_input=x).stem_choices == []
    with pytest.raises(
        ConfigError, match="fuse_stem: 'on' but the kernel cannot run here: float32"
    ):
        optimize(model, "fp32", backend="none", example_input=x, fuse_stem="on")
    with torch.no_grad():
        want, got = model(x), fast(x)
        assert ((got - want).abs().max() / want.abs().max()).item() < 5e-2
        # any layout, handed to the kernel as it is (on the eager path: inductor would compile
        # a second graph for the other layout, ~3 s)
        assert torch.equal(eager(nhwc(x)), eager(x))
        # the same kernels compiled or not: the two agree closely
        assert ((got - eager(x)).abs().max() / want.abs().max()).item() < 2e-2
