"""Float32 1×1 convolutions on MKL's packed product: float32 accuracy (a bound from the
arithmetic, not the code), its errors, the module's fallback, and `optimize`'s pass."""

from __future__ import annotations

import copy
import pickle
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from tensor_checks import check_float32_conv1x1, fast_path_error, nhwc, rel_err
from torch import nn

import resnext
from resnext import native
from resnext.speed import pointwise_mkl
from resnext.speed.fastpath import optimize
from resnext.speed.pointwise_mkl import MklConv1x1

REASON = pointwise_mkl.unavailable_reason()
needs_mkl = pytest.mark.skipif(REASON is not None, reason=f"MKL kernel unavailable: {REASON}")


CASES = [
    # n, cin, cout, h, w, stride, relu, residual, in_place
    (1, 3, 5, 1, 1, 1, False, False, False),  # one pixel, odd channel counts
    (2, 7, 48, 5, 9, 1, True, False, False),
    (2, 300, 33, 13, 11, 1, False, True, False),  # a residual apart from the output
    (3, 520, 272, 7, 7, 1, True, True, True),  # written over the residual
    (1, 64, 256, 14, 14, 1, True, True, False),
    (2, 64, 32, 13, 11, 2, False, True, False),  # a projection shortcut: odd sizes, stride 2
    (1, 40, 24, 10, 9, 3, True, True, True),  # stride 3, written over the residual
]


@needs_mkl
@pytest.mark.parametrize("case", CASES)
def test_matches_float64_within_the_float32_summation_bound(case: tuple) -> None:
    def run(x, w, b, s, relu, r, ip):  # packed for the layer's output pixel count
        rows = pointwise_mkl.output_pixels(tuple(x.shape), s)
        return pointwise_mkl.run(
            x, pointwise_mkl.pack(w, rows), rows, w.shape[0], b, s, relu, r, ip
        )

    check_float32_conv1x1(run, case)


@needs_mkl
def test_a_nan_stays_nan_through_the_relu_as_in_torch() -> None:
    x = nhwc(torch.zeros(1, 4, 1, 2))
    x[0, :, 0, 1] = float("nan")
    weight, bias = torch.ones(3, 4, 1, 1), torch.full((3,), -1.0)
    got = pointwise_mkl.run(x, pointwise_mkl.pack(weight, 2), 2, 3, bias, 1, True)
    assert torch.equal(got[0, :, 0, 0], torch.zeros(3))  # -1 clipped
    assert bool(got[0, :, 0, 1].isnan().all())


@needs_mkl
def test_the_operators_compute_it_under_torch_compile() -> None:
    gen = torch.Generator().manual_seed(3)
    x = nhwc(torch.randn(2, 32, 6, 6, generator=gen))
    weight = torch.randn(64, 32, 1, 1, generator=gen)
    bias = torch.randn(64, generator=gen)
    packed = pointwise_mkl.pack(weight, 72)
    residual = nhwc(torch.randn(2, 64, 6, 6, generator=gen))

    def f(x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        return torch.ops.resnext.pointwise_mkl(x * 2, packed, 72, 64, bias, 1, True, r) + 1

    want = (F.conv2d(x.double() * 2, weight.double(), bias.double()) + residual).relu() + 1
    with torch.no_grad():
        got = torch.compile(f, backend="inductor", fullgraph=True)(x, residual)
    assert rel_err(got, want) < 1e-5


def _inside(x: torch.Tensor) -> torch.Tensor:
    """A channels-last (1, 16, 3, 3) view of the first values of `x` (1, 32, 3, 3)."""
    return x.permute(0, 2, 3, 1).reshape(-1)[:144].view(1, 3, 3, 16).permute(0, 3, 1, 2)


@needs_mkl
@pytest.mark.parametrize(
    "change,message",
    [
        (lambda a: {**a, "x": a["x"].double()}, "x: expected a 4-d float32 CPU tensor"),
        (lambda a: {**a, "x": a["x"][0]}, "x: expected a 4-d float32 CPU tensor"),
        (
            lambda a: {**a, "x": a["x"][:, :, :2]},
            r"x: packed for 9 output pixels, got \(1, 32, 2, 3\)",
        ),
        (lambda a: {**a, "stride": 2}, r"x: packed for 9 output pixels, .* at stride 2 \(4\)"),
        (lambda a: {**a, "stride": 0}, "stride: expected a positive integer, got 0"),
        (lambda a: {**a, "packed": a["packed"].float()}, "packed: expected pointwise_mkl.pack"),
        (lambda a: {**a, "bias": a["bias"][:8]}, "bias: expected 16 float32 values"),
        (lambda a: {**a, "bias": None}, "bias: expected 16 float32 values, got None"),
        (lambda a: {**a, "residual": a["residual"][:, :, :2]}, r"residual: expected shape"),
        (lambda a: {**a, "in_place": True, "residual": None}, "residual: writing in place needs"),
        (lambda a: {**a, "in_place": True, "residual": _inside(a["x"])}, "must not share memory"),
    ],
)
def test_bad_inputs_are_refused_by_name(change: Callable[[dict], dict], message: str) -> None:
    args = {
        "x": nhwc(torch.randn(1, 32, 3, 3)),
        "packed": pointwise_mkl.pack(torch.randn(16, 32, 1, 1), 9),
        "rows": 9,
        "out_channels": 16,
        "bias": torch.zeros(16),
        "stride": 1,
        "relu": False,
        "residual": nhwc(torch.randn(1, 16, 3, 3)),
        "in_place": False,
    }
    with pytest.raises(ValueError, match=message):
        pointwise_mkl.run(**change(args))


@needs_mkl
def test_pack_refuses_what_is_not_a_1x1_or_no_rows() -> None:
    for shape in ((32, 8, 3, 3), (32, 8)):
        with pytest.raises(ValueError, match=r"weight: expected a \(C, Cin, 1, 1\) weight"):
            pointwise_mkl.pack(torch.randn(shape), 4)
    with pytest.raises(ValueError, match="rows: expected a positive integer, got 0"):
        pointwise_mkl.pack(torch.randn(8, 8, 1, 1), 0)


@needs_mkl
def test_an_input_that_needs_a_gradient_is_refused() -> None:
    x = torch.randn(1, 32, 2, 2, requires_grad=True)
    packed = pointwise_mkl.pack(torch.randn(16, 32, 1, 1), 4)
    with pytest.raises(ValueError, match="pointwise_mkl: an inference kernel without a gradient"):
        pointwise_mkl.run(x, packed, 4, 16, torch.zeros(16))


def test_only_float32_1x1s_with_equal_strides_are_eligible() -> None:
    assert pointwise_mkl.eligible(nn.Conv2d(64, 32, 1))
    assert pointwise_mkl.eligible(nn.Conv2d(3, 5, 1, bias=False))  # any channel counts
    assert pointwise_mkl.eligible(nn.Conv2d(64, 32, 1, stride=2))
    assert not pointwise_mkl.eligible(nn.Conv2d(64, 32, 1, stride=(1, 2)))
    assert not pointwise_mkl.eligible(nn.Conv2d(64, 32, 1).bfloat16())
    assert not pointwise_mkl.eligible(nn.Conv2d(64, 32, 3, padding=1))
    assert not pointwise_mkl.eligible(nn.Conv2d(64, 32, 1, padding=1))
    assert not pointwise_mkl.eligible(nn.Conv2d(64, 32, 1, groups=2))
    assert not pointwise_mkl.eligible(nn.Linear(4, 4))
    with pytest.raises(ValueError, match="conv: expected a float32 1×1 convolution with equal"):
        MklConv1x1(nn.Conv2d(64, 32, 3), False, False, (1, 64, 4, 4))


def test_without_mkl_in_torch_the_reason_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.backends.mkl, "is_available", lambda: False)
    with pytest.raises(native.NativeUnavailable, match="this torch is built without MKL"):
        pointwise_mkl.torch_mkl_functions()


@needs_mkl
@pytest.mark.parametrize("stride", [1, 2])
def test_the_module_packs_for_its_pixel_count_and_leaves_others_to_torch(stride: int) -> None:
    torch.manual_seed(5)
    conv = nn.Conv2d(24, 40, 1, stride=stride).eval()
    module = MklConv1x1(conv, True, False, (2, 24, 3, 5))
    assert module.rows == (30 if stride == 1 else 2 * 2 * 3)
    for shape in ((2, 24, 3, 5), (1, 24, 3, 5), (3, 24, 4, 4)):  # packed for the first only
        x = nhwc(torch.randn(shape))
        r = nhwc(torch.randn(conv(x).shape))
        with torch.no_grad():
            want = (conv(x) + r).relu()
            assert rel_err(module(x, r), want) < 1e-5
    x = nhwc(torch.randn(2, 24, 3, 5)).requires_grad_()  # a gradient: torch's operators
    got = module(x)
    assert got.requires_grad and rel_err(got.detach(), conv(x).relu().detach()) < 1e-5
    with torch.no_grad():  # copies pack again: MKL's layout is not something to copy
        twin, thawed = copy.deepcopy(module), pickle.loads(pickle.dumps(module))
        x = nhwc(torch.randn(2, 24, 3, 5))
        assert twin.packed.data_ptr() != module.packed.data_ptr()
        assert torch.equal(twin(x), module(x))
        assert torch.equal(thawed(x), module(x))


@needs_mkl
@pytest.mark.parametrize("backend", ["none", "replay", "jit"])
def test_optimize_computes_the_same_function_with_every_eligible_1x1_on_mkl(
    backend: str, randomize_bn: Callable[[nn.Module], None], without_amx: None
) -> None:
    torch.manual_seed(11)
    model = resnext.create_model("resnext29_4x16d").eval()
    randomize_bn(model)
    x = torch.randn(2, 3, 32, 32)
    fast = optimize(
        model, "fp32", backend=backend, example_input=x, pointwise_mkl="on", pointwise_fma="off"
    )
    eager = fast.module if backend == "replay" else fast
    ones = [
        n
        for n, m in model.named_modules()
        if isinstance(m, nn.Conv2d) and pointwise_mkl.eligible(m)
    ]
    mkl = [c for c in eager.pointwise_choices if c.variant.startswith("mkl")]
    assert sorted(c.name for c in mkl) == sorted(ones)
    assert all(c.chosen == "kernel" for c in mkl)
    if backend != "jit":  # a traced graph keeps no modules
        assert sum(isinstance(m, MklConv1x1) for m in eager.modules()) == len(ones)
    assert fast_path_error(model, fast, (2, 3, 32, 32)) < 1e-4
