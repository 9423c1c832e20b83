"""Our float32 1×1 convolution on FMAs (each build this CPU runs): float32 accuracy (a bound from
the arithmetic, not the code), its errors, and `optimize`'s pass that swaps it in."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from block_nets import Bottleneck, Net
from tensor_checks import check_float32_conv1x1, fast_path_error, nhwc, rel_err
from torch import nn

import resnext
from resnext.speed import pointwise_fma
from resnext.speed.conv_x3_swap import FmaConv1x1, fma_eligible, swap_convs_fma
from resnext.speed.fastpath import optimize

REASON = pointwise_fma.unavailable_reason()
needs_fma = pytest.mark.skipif(REASON is not None, reason=f"FMA kernel unavailable: {REASON}")


CASES = [
    # n, cin, cout, h, w, stride, relu, residual, in_place
    (1, 3, 16, 1, 1, 1, False, False, False),  # one pixel: a tile of 1 row
    (2, 7, 48, 5, 9, 1, True, False, False),  # 90 pixels: one short block of 96
    (2, 300, 32, 13, 11, 2, False, True, False),  # 2 input slices, the last short; stride 2
    (3, 520, 272, 7, 7, 1, True, True, True),  # 3 slices; 17 panels: a short panel block
    # 2 × 13 × 11 pixels at stride 2: blocks of 96, the last short, with a short tile
    (2, 64, 32, 25, 21, 2, True, True, False),
    (1, 64, 256, 9, 10, 3, True, False, False),  # stride 3, odd sizes
    (2, 256, 128, 12, 12, 1, False, True, True),  # exactly one slice, 3 whole blocks of 96
    # the AVX-512 build's shapes: 49 pixels in 7 whole tiles of 7; 5 panels, a 4-panel tile and
    # a 1-panel one; 126 pixels, two blocks of 56 and a short one of 14; 20 panels in blocks of 8
    (1, 64, 80, 7, 7, 1, True, True, True),
    (2, 130, 320, 9, 7, 1, True, False, False),
    (1, 96, 64, 15, 13, 2, False, True, False),  # 8 × 7 pixels at stride 2: one whole block
]


@pytest.fixture(params=pointwise_fma.BUILDS, ids=lambda b: b.name)
def fma_build(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Each build of the kernel this CPU runs, put in place of the default one (a skip for each
    it cannot run, saying why)."""
    build = request.param
    reason = pointwise_fma.build_problem(build)
    if reason is not None:
        pytest.skip(f"{build.name} build unavailable: {reason}")
    lib = pointwise_fma.library(build)
    monkeypatch.setattr(pointwise_fma, "_library", lambda: lib)
    return build.name


@pytest.mark.parametrize("case", CASES)
def test_matches_float64_within_the_float32_summation_bound(case: tuple, fma_build: str) -> None:
    check_float32_conv1x1(
        lambda x, w, b, s, relu, r, ip: pointwise_fma.run(
            x, pointwise_fma.pack(w), b, s, relu, r, ip
        ),
        case,
    )


def test_the_first_build_this_cpu_runs_is_the_one_used() -> None:
    runnable = [b for b in pointwise_fma.BUILDS if pointwise_fma.build_problem(b) is None]
    if not runnable:
        pytest.skip(f"FMA kernel unavailable: {REASON}")
    assert pointwise_fma.active_build() == runnable[0]
    # the library the check loaded is the one used: no second copy loaded for the operators
    assert pointwise_fma._library() is pointwise_fma.library(runnable[0])
    # the AVX-512 build comes first, so a CPU with it uses it
    assert [b.name for b in pointwise_fma.BUILDS] == ["avx512", "avx2"]


def test_pack_puts_each_panels_16_outputs_side_by_side() -> None:
    weight = torch.arange(32 * 3, dtype=torch.float32).reshape(32, 3, 1, 1)
    packed = pointwise_fma.pack(weight)
    assert packed.shape == (2, 3, 16)
    for panel in range(2):
        for k in range(3):
            for c in range(16):
                assert packed[panel, k, c] == weight[panel * 16 + c, k, 0, 0]


@needs_fma
def test_the_operators_compute_it_under_torch_compile() -> None:
    gen = torch.Generator().manual_seed(3)
    x = nhwc(torch.randn(2, 32, 6, 6, generator=gen))
    weight = torch.randn(64, 32, 1, 1, generator=gen)
    bias = torch.randn(64, generator=gen)
    packed = pointwise_fma.pack(weight)
    residual = nhwc(torch.randn(2, 64, 6, 6, generator=gen))

    def f(x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        return torch.ops.resnext.pointwise_fma(x * 2, packed, bias, 1, True, r) + 1

    def over_residual(x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        # the in-place operator, as `optimize` puts it over a residual that is dead after it
        dead = r + 1
        torch.ops.resnext.pointwise_fma_(x * 2, packed, bias, 1, True, dead)
        return dead * 3

    want = (F.conv2d(x.double() * 2, weight.double(), bias.double()) + residual).relu() + 1
    want_over = (F.conv2d(x.double() * 2, weight.double(), bias.double()) + residual + 1).relu()
    with torch.no_grad():
        got = torch.compile(f, backend="inductor", fullgraph=True)(x, residual)
        got_over = torch.compile(over_residual, backend="inductor", fullgraph=True)(x, residual)
    assert rel_err(got, want) < 1e-5
    assert rel_err(got_over, want_over * 3) < 1e-5


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda a: {**a, "x": a["x"].double()}, "x: expected a 4-d float32 CPU tensor"),
        (lambda a: {**a, "x": a["x"][0]}, "x: expected a 4-d float32 CPU tensor"),
        (lambda a: {**a, "packed": a["packed"][:, :16]}, "packed: expected a contiguous float32"),
        (lambda a: {**a, "packed": a["packed"].double()}, "packed: expected a contiguous float32"),
        (lambda a: {**a, "bias": a["bias"][:8]}, "bias: expected 32 float32 values"),
        (lambda a: {**a, "stride": 0}, "stride: expected a positive integer"),
        (lambda a: {**a, "residual": a["residual"][:, :, :2]}, r"residual: expected shape"),
        (lambda a: {**a, "in_place": True, "residual": None}, "residual: writing in place needs"),
        (lambda a: {**a, "in_place": True, "residual": a["x"][:, :32]}, "must not share memory"),
    ],
)
def test_bad_inputs_are_refused_by_name(change: Callable[[dict], dict], message: str) -> None:
    args = {
        "x": nhwc(torch.randn(1, 32, 3, 3)),
        "packed": pointwise_fma.pack(torch.randn(32, 32, 1, 1)),
        "bias": torch.zeros(32),
        "stride": 1,
        "relu": False,
        "residual": nhwc(torch.randn(1, 32, 3, 3)),
        "in_place": False,
    }
    with pytest.raises(ValueError, match=message):
        pointwise_fma.run(**change(args))


def test_pack_refuses_what_is_not_a_1x1_with_whole_panels() -> None:
    for shape in ((24, 8, 1, 1), (32, 8, 3, 3), (32, 8)):
        with pytest.raises(ValueError, match="weight: expected a \\(C, Cin, 1, 1\\) weight"):
            pointwise_fma.pack(torch.randn(shape))


def test_an_input_that_needs_a_gradient_is_refused() -> None:
    x = torch.randn(1, 32, 2, 2, requires_grad=True)
    packed = pointwise_fma.pack(torch.randn(16, 32, 1, 1))
    with pytest.raises(ValueError, match="pointwise_fma: an inference kernel without a gradient"):
        pointwise_fma.run(x, packed, torch.zeros(16))


def test_only_float32_1x1s_with_whole_panels_are_eligible() -> None:
    assert fma_eligible(nn.Conv2d(64, 32, 1))
    assert fma_eligible(nn.Conv2d(3, 16, 1, stride=2, bias=False))  # any input count, a stride
    assert not fma_eligible(nn.Conv2d(64, 32, 1).bfloat16())
    assert not fma_eligible(nn.Conv2d(64, 24, 1))  # outputs not a multiple of 16
    assert not fma_eligible(nn.Conv2d(64, 32, 3, padding=1))
    assert not fma_eligible(nn.Conv2d(64, 32, 1, padding=1))
    assert not fma_eligible(nn.Conv2d(64, 32, 1, groups=2))
    with pytest.raises(ValueError, match="conv: expected a float32 1×1 convolution"):
        FmaConv1x1(nn.Conv2d(64, 32, 3))


@needs_fma
# inductor with these operators: test_the_operators_compute_it_under_torch_compile (a compile of
# the whole network took ~10 s)
@pytest.mark.parametrize("backend", ["none", "replay", "jit"])
def test_optimize_swaps_every_1x1_and_computes_the_same_function(
    backend: str, randomize_bn: Callable[[nn.Module], None], without_amx: None
) -> None:
    torch.manual_seed(11)
    model = resnext.create_model("resnext29_4x16d").eval()
    randomize_bn(model)
    x = torch.randn(2, 3, 32, 32)
    # MKL weighs the 1×1s first: off, so that every one reaches this pass
    fast = optimize(
        model, "fp32", backend=backend, example_input=x, pointwise_fma="on", pointwise_mkl="off"
    )
    choices = (fast.module if backend == "replay" else fast).pointwise_choices
    ones = [
        n
        for n, m in model.named_modules()
        if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) and m.groups == 1
    ]
    assert sorted(c.name for c in choices) == sorted(ones)
    assert all(c.chosen == "kernel" for c in choices)
    in_place = [c for c in choices if c.variant.endswith("in place")]
    blocks = [c for c in choices if c.name.endswith("conv3")]
    assert len(in_place) == (0 if backend == "jit" else len(blocks))
    assert fast_path_error(model, fast, (3, 3, 32, 32)) < 1e-4


@needs_fma
def test_layers_alike_are_timed_once_and_share_the_pick(monkeypatch: pytest.MonkeyPatch) -> None:
    import resnext.speed.dense_swap as dense

    calls = []

    def alternating(fns, x, repeats, before=None):  # noise that flips the winner every time
        calls.append(len(fns))
        return [1.0, 2.0] if len(calls) % 2 else [2.0, 1.0]

    monkeypatch.setattr(dense, "time_each_ms", alternating)
    torch.manual_seed(13)
    model = nn.Sequential(
        nn.Conv2d(3, 64, 3, padding=1), *(Bottleneck(64, 32, 64, 1) for _ in range(3))
    ).eval()
    x = nhwc(torch.randn(1, 3, 6, 6))
    with torch.no_grad():
        want = model(x)
    choices = swap_convs_fma(model, x, mode="auto")
    assert len(choices) == 6  # conv1 and conv3 of each block
    kinds = {(c.input_shape, c.variant) for c in choices}
    assert len(calls) == len(kinds) < len(choices)
    for kind in kinds:
        twins = [c for c in choices if (c.input_shape, c.variant) == kind]
        assert len({(c.chosen, c.native_ms, c.kernel_ms) for c in twins}) == 1, twins
    with torch.no_grad():
        assert rel_err(model(x), want) < 1e-5


@needs_fma
def test_mkl_weighs_the_1x1s_before_this_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    # MKL's picks on the Xeon without AMX predate the AVX-512 build: its pass comes first, and
    # this kernel weighs the layers it leaves to oneDNN (here every one: oneDNN always wins)
    import resnext.speed.dense_swap as dense
    from resnext.speed import pointwise_mkl

    if pointwise_mkl.unavailable_reason() is not None:
        pytest.skip(f"MKL kernel unavailable: {pointwise_mkl.unavailable_reason()}")
    monkeypatch.setattr(dense, "time_each_ms", lambda fns, x, repeats, before=None: [1.0, 2.0])
    model = Net().eval()
    x = nhwc(torch.randn(1, 3, 6, 6))
    fast = optimize(model, "fp32", backend="none", example_input=x, timing_cache=False)
    kinds = [c.variant.split("+")[0].split(",")[0] for c in fast.pointwise_choices]
    ones = sum(isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) for m in model.modules())
    assert kinds == ["mkl"] * ones + ["fma"] * ones
    assert all(c.chosen == "native" for c in fast.pointwise_choices)
