"""Float32 1×1 convolutions with float16 products: bit for bit the arithmetic the kernel documents
(a numpy reimplementation), within a bound from that arithmetic on inputs of any range,
non-finite inputs as torch's, its errors, the module, and `optimize`'s pass."""

from __future__ import annotations

import copy
import math
import pickle
from collections.abc import Callable
from contextlib import AbstractContextManager

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tensor_checks import fast_path_error, float16_products_conv1x1_bound, nhwc, rel_err
from torch import nn

import resnext
from resnext import native
from resnext.errors import ConfigError
from resnext.speed import capability, pointwise_fp16
from resnext.speed.fastpath import optimize
from resnext.speed.pointwise_fp16 import Fp16Conv1x1

REASON = pointwise_fp16.unavailable_reason()
needs_fp16 = pytest.mark.skipif(REASON is not None, reason=f"fp16 kernel unavailable: {REASON}")


def emulated(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    stride: int,
    relu: bool,
    residual: torch.Tensor | None,
) -> torch.Tensor:
    """What the kernel's header says it computes, in numpy, for an input whose every pixel row
    has the same largest magnitude (so that every block of rows gets the same scale): the
    weight scaled so that its largest magnitude lies in [0.5, 1) and the input into [128, 256),
    both rounded to float16; each product added to a float16 sum with one rounding (float64 holds
    the exact sum, numpy rounds it to float16 directly), runs of 64 channels; the runs summed in
    float32; scaled back; the bias, then the residual, added in float32; the ReLU."""
    n, cin, _, _ = x.shape
    cout = weight.shape[0]
    pixels = x[:, :, ::stride, ::stride]
    _, _, ho, wo = pixels.shape
    rows = pixels.permute(0, 2, 3, 1).reshape(-1, cin).numpy()
    w = weight.reshape(cout, cin).numpy()
    a = 8 - math.frexp(float(np.abs(rows).max()))[1]  # frexp: m·2^e with m in [0.5, 1)
    b = -math.frexp(float(np.abs(w).max()))[1]
    xh = (rows * np.float32(2.0**a)).astype(np.float16).astype(np.float64)
    wh = (w * np.float32(2.0**b)).astype(np.float16).astype(np.float64)
    sums = None
    for c0 in range(0, cin, 64):
        run = np.zeros((rows.shape[0], cout), np.float16)
        for c in range(c0, min(c0 + 64, cin)):
            run = (run.astype(np.float64) + xh[:, c, None] * wh[None, :, c]).astype(np.float16)
        sums = run.astype(np.float32) if sums is None else sums + run.astype(np.float32)
    assert sums is not None
    v = sums * np.float32(2.0**-a) * np.float32(2.0**-b) + bias.numpy()[None, :]
    if residual is not None:
        v = v + residual.permute(0, 2, 3, 1).reshape(-1, cout).numpy()
    if relu:
        v = np.where(v < 0, np.float32(0), v)
    return torch.from_numpy(v).view(n, ho, wo, cout).permute(0, 3, 1, 2)


def rows_of_equal_range(gen: torch.Generator, shape: tuple[int, ...], top: float) -> torch.Tensor:
    """A channels-last input whose every pixel has largest magnitude `top`, at a random channel
    and sign, its other values below it."""
    x = (torch.rand(shape, generator=gen) * 2 - 1) * (top * 0.99)
    n, c, h, w = shape
    channel = torch.randint(0, c, (n, 1, h, w), generator=gen)
    sign = torch.where(torch.rand(n, 1, h, w, generator=gen) < 0.5, -1.0, 1.0)
    x.scatter_(1, channel, sign * top)
    return nhwc(x)


CASES = [
    # n, cin, cout, h, w, stride, relu, residual, in_place
    (1, 3, 32, 1, 1, 1, False, False, False),  # one pixel, three channels
    (2, 64, 64, 5, 5, 1, True, False, False),  # one whole run; few rows: the panels split
    (2, 100, 96, 5, 9, 1, False, True, False),  # a part run, tiles of 12 and a part tile
    (3, 300, 64, 7, 7, 1, True, True, True),  # two input chunks, written over the residual
    (2, 72, 32, 16, 16, 1, True, True, False),  # 512 rows: the threads split the rows
    (2, 64, 32, 13, 11, 2, False, True, False),  # a projection shortcut: odd sizes, stride 2
    (1, 40, 64, 10, 9, 3, True, True, True),  # stride 3, written over the residual
]


@needs_fp16
@pytest.mark.parametrize("n,cin,cout,h,w,stride,relu,residual,in_place", CASES)
def test_computes_the_documented_arithmetic_bit_for_bit(
    n: int,
    cin: int,
    cout: int,
    h: int,
    w: int,
    stride: int,
    relu: bool,
    residual: bool,
    in_place: bool,
) -> None:
    gen = torch.Generator().manual_seed(cin * cout + h)
    x = rows_of_equal_range(gen, (n, cin, h, w), 3.0)
    weight = torch.randn(cout, cin, 1, 1, generator=gen) * 0.1
    bias = torch.randn(cout, generator=gen)
    ho, wo = (h - 1) // stride + 1, (w - 1) // stride + 1
    res = nhwc(torch.randn(n, cout, ho, wo, generator=gen)) if residual else None
    want = emulated(x, weight, bias, stride, relu, res)
    given = None if res is None else res.clone()
    packed, exponent = pointwise_fp16.pack(weight)
    got = pointwise_fp16.run(x, packed, exponent, cout, bias, stride, relu, given, in_place)
    assert got.shape == want.shape
    assert got.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(got, want)
    if in_place:
        assert got.data_ptr() == given.data_ptr()  # written over the residual it was given
    elif res is not None:
        assert torch.equal(given, res)  # the residual left as it was


@needs_fp16
@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("h", [4, 20])  # few rows (the panels split), many (the rows split)
def test_the_same_bits_on_any_number_of_threads(
    threads: int, h: int, on_threads: Callable[[int], AbstractContextManager[None]]
) -> None:
    gen = torch.Generator().manual_seed(h)
    x = rows_of_equal_range(gen, (1, 96, h, h), 5.0)
    weight = torch.randn(128, 96, 1, 1, generator=gen)
    bias = torch.randn(128, generator=gen)
    packed, exponent = pointwise_fp16.pack(weight)
    with on_threads(threads):
        got = pointwise_fp16.run(x, packed, exponent, 128, bias, 1, True)
    assert torch.equal(got, emulated(x, weight, bias, 1, True, None))


@needs_fp16
@pytest.mark.parametrize("scale", [1e-30, 1e-3, 1.0, 1e6, 1e30])
@pytest.mark.parametrize("cin,h,stride", [(200, 9, 1), (64, 30, 1), (96, 11, 2)])
def test_inputs_of_any_range_stay_within_the_float16_products_bound(
    scale: float, cin: int, h: int, stride: int
) -> None:
    """Magnitudes differing by 10^6 between pixels, and overall far beyond float16's range
    either way: the scaling keeps every partial sum representable."""
    gen = torch.Generator().manual_seed(cin + h)
    spread = torch.exp(torch.empty(2, 1, h, h).uniform_(-7, 7, generator=gen))
    x = nhwc(torch.randn(2, cin, h, h, generator=gen) * spread * scale)
    weight = torch.randn(64, cin, 1, 1, generator=gen) * 300
    bias = torch.randn(64, generator=gen)
    res = nhwc(torch.randn(2, 64, (h - 1) // stride + 1, (h - 1) // stride + 1, generator=gen))
    want = F.conv2d(x.double(), weight.double(), bias.double(), stride=stride) + res.double()
    packed, exponent = pointwise_fp16.pack(weight)
    got = pointwise_fp16.run(x, packed, exponent, 64, bias, stride, False, res)
    bound = float16_products_conv1x1_bound(x, weight, bias, res, stride)
    assert bool(torch.isfinite(got).all())
    assert bool(((got.double() - want).abs() <= bound).all())


@needs_fp16
def test_sums_at_the_top_of_the_range_do_not_overflow() -> None:
    """Every product positive and near its operands' largest magnitude: a run's float16 sum
    reaches 64 × ~256 × ~1 after scaling, a quarter of float16's largest value."""
    gen = torch.Generator().manual_seed(8)
    x = nhwc(torch.empty(1, 512, 4, 4).uniform_(0.97, 1, generator=gen) * 1e5)
    weight = torch.empty(32, 512, 1, 1).uniform_(0.97, 1, generator=gen) * 1e3
    bias = torch.zeros(32)
    packed, exponent = pointwise_fp16.pack(weight)
    got = pointwise_fp16.run(x, packed, exponent, 32, bias)
    want = F.conv2d(x.double(), weight.double())  # ~5e10 each
    bound = float16_products_conv1x1_bound(x, weight, bias, None, 1)
    assert bool(((got.double() - want).abs() <= bound).all())


@needs_fp16
def test_the_bound_is_tight_enough_to_catch_a_lost_product() -> None:
    """The bound above would let through an error of a few per cent of the magnitudes; the
    typical error is far smaller, and a single product dropped from each output shows."""
    gen = torch.Generator().manual_seed(4)
    x = nhwc(torch.randn(2, 128, 8, 8, generator=gen))
    weight = torch.randn(64, 128, 1, 1, generator=gen)
    bias = torch.zeros(64)
    packed, exponent = pointwise_fp16.pack(weight)
    got = pointwise_fp16.run(x, packed, exponent, 64, bias).double()
    want = F.conv2d(x.double(), weight.double())
    dropped = want - F.conv2d(x[:, :1].double(), weight[:, :1].double())
    mags = F.conv2d(x.double().abs(), weight.double().abs())
    typical = ((got - want).abs() / mags).median().item()
    assert typical < 2.0**-9  # bf16's one rounding, for scale
    assert ((dropped - want).abs() / mags).median().item() > 10 * typical


@needs_fp16
def test_non_finite_inputs_come_out_where_torchs_do() -> None:
    gen = torch.Generator().manual_seed(6)
    x = nhwc(torch.randn(1, 64, 4, 6, generator=gen))
    x[0, 3, 1, 2] = float("inf")
    x[0, 7, 2, 4] = float("nan")
    x[0, 9, 3, 0] = -float("inf")
    weight = torch.randn(64, 64, 1, 1, generator=gen)
    bias = torch.randn(64, generator=gen)
    packed, exponent = pointwise_fp16.pack(weight)
    for relu in (False, True):
        want = F.conv2d(x, weight, bias)
        want = want.relu() if relu else want
        got = pointwise_fp16.run(x, packed, exponent, 64, bias, 1, relu)
        assert torch.equal(got.isnan(), want.isnan())
        assert torch.equal(got.isinf(), want.isinf())
        assert torch.equal(got[got.isinf()], want[want.isinf()])  # the signs too
        finite = want.isfinite()
        bound = float16_products_conv1x1_bound(x.nan_to_num(0, 0, 0), weight, bias, None, 1)
        assert bool(((got - want).abs().double()[finite] <= bound[finite]).all())


@needs_fp16
def test_the_operators_compute_it_under_torch_compile() -> None:
    gen = torch.Generator().manual_seed(3)
    x = rows_of_equal_range(gen, (2, 32, 6, 6), 1.5)
    weight = torch.randn(64, 32, 1, 1, generator=gen)
    bias = torch.randn(64, generator=gen)
    packed, exponent = pointwise_fp16.pack(weight)
    residual = nhwc(torch.randn(2, 64, 6, 6, generator=gen))

    def f(x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        return torch.ops.resnext.pointwise_fp16(x * 2, packed, exponent, 64, bias, 1, True, r) + 1

    want = emulated(x * 2, weight, bias, 1, True, residual) + 1
    with torch.no_grad():
        got = torch.compile(f, backend="inductor", fullgraph=True)(x, residual)
    assert torch.equal(got, want)


def _inside(x: torch.Tensor) -> torch.Tensor:
    """A channels-last (1, 32, 3, 3) view of the first values of `x` (1, 64, 3, 3)."""
    return x.permute(0, 2, 3, 1).reshape(-1)[:288].view(1, 3, 3, 32).permute(0, 3, 1, 2)


@needs_fp16
@pytest.mark.parametrize(
    "change,message",
    [
        (lambda a: {**a, "x": a["x"].double()}, "x: expected a 4-d float32 CPU tensor"),
        (lambda a: {**a, "x": a["x"][0]}, "x: expected a 4-d float32 CPU tensor"),
        (lambda a: {**a, "x": a["x"][:, :32]}, r"packed: expected 32×32 weights"),
        (lambda a: {**a, "stride": 0}, "stride: expected a positive integer, got 0"),
        (lambda a: {**a, "packed": a["packed"].float()}, "packed: expected pointwise_fp16.pack"),
        (lambda a: {**a, "packed": a["packed"][:-1]}, r"packed: expected 32×64 weights"),
        (lambda a: {**a, "out_channels": 16, "bias": torch.zeros(16)}, "a multiple of 32"),
        (lambda a: {**a, "exponent": 127}, r"exponent: expected .* \[-126, 126\], got 127"),
        (lambda a: {**a, "bias": a["bias"][:8]}, "bias: expected 32 float32 values"),
        (lambda a: {**a, "bias": None}, "bias: expected 32 float32 values, got None"),
        (lambda a: {**a, "residual": a["residual"][:, :, :2]}, r"residual: expected shape"),
        (lambda a: {**a, "in_place": True, "residual": None}, "residual: writing in place needs"),
        (lambda a: {**a, "in_place": True, "residual": _inside(a["x"])}, "must not share memory"),
    ],
)
def test_bad_inputs_are_refused_by_name(change: Callable[[dict], dict], message: str) -> None:
    packed, exponent = pointwise_fp16.pack(torch.randn(32, 64, 1, 1))
    args = {
        "x": nhwc(torch.randn(1, 64, 3, 3)),
        "packed": packed,
        "exponent": exponent,
        "out_channels": 32,
        "bias": torch.zeros(32),
        "stride": 1,
        "relu": False,
        "residual": nhwc(torch.randn(1, 32, 3, 3)),
        "in_place": False,
    }
    with pytest.raises(ValueError, match=message):
        pointwise_fp16.run(**change(args))


@needs_fp16
def test_pack_refuses_what_it_cannot_pack() -> None:
    for shape in ((32, 8, 3, 3), (32, 8)):
        with pytest.raises(ValueError, match=r"weight: expected a \(C, Cin, 1, 1\) weight"):
            pointwise_fp16.pack(torch.randn(shape))
    with pytest.raises(ValueError, match="weight: expected a multiple of 32 output channels"):
        pointwise_fp16.pack(torch.randn(48, 8, 1, 1))
    weight = torch.randn(32, 8, 1, 1)
    weight[3, 2] = float("nan")
    with pytest.raises(ValueError, match="weight: expected finite values"):
        pointwise_fp16.pack(weight)


@needs_fp16
def test_an_input_that_needs_a_gradient_is_refused() -> None:
    x = torch.randn(1, 32, 2, 2, requires_grad=True)
    packed, exponent = pointwise_fp16.pack(torch.randn(32, 32, 1, 1))
    with pytest.raises(ValueError, match="pointwise_fp16: an inference kernel without a gradient"):
        pointwise_fp16.run(x, packed, exponent, 32, torch.zeros(32))


def test_only_float32_1x1s_of_32_output_multiples_with_finite_weights_are_eligible() -> None:
    assert pointwise_fp16.eligible(nn.Conv2d(64, 32, 1))
    assert pointwise_fp16.eligible(nn.Conv2d(3, 64, 1, bias=False))  # any input channels
    assert pointwise_fp16.eligible(nn.Conv2d(64, 96, 1, stride=2))
    assert not pointwise_fp16.eligible(nn.Conv2d(64, 48, 1))
    assert not pointwise_fp16.eligible(nn.Conv2d(64, 32, 1, stride=(1, 2)))
    assert not pointwise_fp16.eligible(nn.Conv2d(64, 32, 1).bfloat16())
    assert not pointwise_fp16.eligible(nn.Conv2d(64, 32, 3, padding=1))
    assert not pointwise_fp16.eligible(nn.Conv2d(64, 32, 1, padding=1))
    assert not pointwise_fp16.eligible(nn.Conv2d(64, 32, 1, groups=2))
    assert not pointwise_fp16.eligible(nn.Linear(4, 4))
    broken = nn.Conv2d(64, 32, 1)
    with torch.no_grad():
        broken.weight[0, 0] = float("inf")
    assert not pointwise_fp16.eligible(broken)
    with pytest.raises(ValueError, match="conv: expected a float32 1×1 convolution with equal"):
        Fp16Conv1x1(nn.Conv2d(64, 32, 3), False, False)


def test_a_cpu_without_avx512_fp16_has_no_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(capability, "cpu_flags", lambda: frozenset({"avx2", "fma", "avx512f"}))
    with pytest.raises(native.NativeUnavailable, match=r"this CPU lacks .*'avx512_fp16'"):
        pointwise_fp16.load()


@needs_fp16
def test_the_module_runs_the_kernel_and_leaves_gradients_and_other_dtypes_to_torch() -> None:
    torch.manual_seed(5)
    conv = nn.Conv2d(24, 64, 1, stride=2).eval()
    module = Fp16Conv1x1(conv, True, False)
    gen = torch.Generator().manual_seed(5)
    x = rows_of_equal_range(gen, (2, 24, 5, 7), 2.0)
    r = nhwc(torch.randn(2, 64, 3, 4))
    with torch.no_grad():
        assert torch.equal(module(x, r), emulated(x, conv.weight, conv.bias, 2, True, r))
        exact = module(x.double(), r.double())  # float64: torch's convolution
        assert exact.dtype == torch.float64
        assert (
            rel_err(
                exact,
                (
                    F.conv2d(x.double(), conv.weight.double(), conv.bias.double(), 2) + r.double()
                ).relu(),
            )
            < 1e-12
        )
    grad_x = x.clone().requires_grad_()
    got = module(grad_x)
    assert got.requires_grad and rel_err(got.detach(), conv(x).relu().detach()) < 1e-5
    with torch.no_grad():  # copies and pickles carry the packed weight as it is
        twin, thawed = copy.deepcopy(module), pickle.loads(pickle.dumps(module))
        assert torch.equal(twin(x), module(x))
        assert torch.equal(thawed(x), module(x))


@needs_fp16
@pytest.mark.parametrize("backend", ["none", "replay", "jit"])
def test_optimize_takes_float16_products_only_where_asked(
    backend: str, randomize_bn: Callable[[nn.Module], None], without_amx: None
) -> None:
    torch.manual_seed(11)
    model = resnext.create_model("resnext29_4x16d").eval()
    randomize_bn(model)
    x = torch.randn(2, 3, 32, 32)
    fast = optimize(model, "fp32", backend=backend, example_input=x, pointwise_fp16="on")
    eager = fast.module if backend == "replay" else fast
    ones = [
        n
        for n, m in model.named_modules()
        if isinstance(m, nn.Conv2d) and pointwise_fp16.eligible(m)
    ]
    assert len(ones) > 10
    fp16 = [c for c in eager.pointwise_choices if c.variant.startswith("fp16")]
    assert sorted(c.name for c in fp16) == sorted(ones)
    assert all(c.chosen == "kernel" for c in fp16)
    if backend != "jit":  # a traced graph keeps no modules
        assert sum(isinstance(m, Fp16Conv1x1) for m in eager.modules()) == len(ones)
    # float16's precision, compounded over the network's 1×1s (each ~1e-3 typically)
    assert fast_path_error(model, fast, (2, 3, 32, 32)) < 1e-2
    exact = optimize(model, "fp32", backend="none", example_input=x)  # the default: off
    assert not any(c.variant.startswith("fp16") for c in exact.pointwise_choices)
    assert fast_path_error(model, exact, (2, 3, 32, 32)) < 1e-4


def _weighed(fast: nn.Module) -> list[str]:
    return [c.name for c in fast.pointwise_choices if c.variant.startswith("fp16")]


@needs_fp16
def test_dtype_fp16_is_float32_with_the_float16_pass_unless_told_otherwise() -> None:
    torch.manual_seed(12)
    model = resnext.create_model("resnext_tiny").eval()
    x = torch.randn(2, 3, 32, 32)
    fast = optimize(model, "fp16", backend="none", example_input=x)
    assert _weighed(fast)  # 'auto': weighed, kept where faster
    assert next(fast.parameters()).dtype == torch.float32
    assert fast_path_error(model, fast, (2, 3, 32, 32)) < 1e-2
    told = optimize(model, "fp16", backend="none", example_input=x, pointwise_fp16="off")
    assert not _weighed(told)


def test_dtype_fp16_without_the_kernel_is_float32_with_a_warning(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from resnext.speed import fastpath

    monkeypatch.setattr(fastpath, "pointwise_fp16_unavailable", lambda: "this CPU lacks it")
    monkeypatch.setattr(pointwise_fp16, "unavailable_reason", lambda: "this CPU lacks it")
    model = resnext.create_model("resnext_tiny").eval()
    x = torch.randn(1, 3, 32, 32)
    with pytest.warns(RuntimeWarning, match=r"fp16 requested but .* \(this CPU lacks it\); using"):
        fast = optimize(model, "fp16", backend="none", example_input=x)
    assert not _weighed(fast)
    assert fast_path_error(model, fast, (1, 3, 32, 32)) < 1e-4


def test_dtype_fp16_on_a_gpu_is_refused_by_name() -> None:
    model = resnext.create_model("resnext_tiny").eval()
    with pytest.raises(ConfigError, match=r"dtype: 'fp16' .* is a CPU kernel's"):
        optimize(model, "fp16", backend="none", device="cuda")
