"""bf16 1×1 convolutions for inference on `pointwise_gemm`'s dot-product kernel: the epilogue
(bias, residual, ReLU, one rounding) against float64 within a bound from the arithmetic, the
in-place write, its errors, and `optimize`'s pass that swaps it in where faster."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from block_nets import Net
from tensor_checks import nhwc, rel_err
from torch import nn

import resnext
from resnext.speed import pointwise_gemm
from resnext.speed.conv_x3_swap import DotConv1x1, dot_eligible, swap_convs_dot
from resnext.speed.fastpath import optimize
from resnext.speed.prepacked import PrepackedConv

REASON = pointwise_gemm.unavailable_reason()
needs_dot = pytest.mark.skipif(REASON is not None, reason=f"bf16 dot kernel unavailable: {REASON}")


def _bf16(t: torch.Tensor) -> torch.Tensor:
    return nhwc(t.to(torch.bfloat16))


def _reference(x, w, b, r, relu, stride=1):
    """The float64 result on the bf16 operands, and each output's error bound: float32 sums of
    K products, the bias and the residual (each step at most 2^-24 of the running magnitude,
    Higham's recursive-summation bound), then one rounding to bf16 (at most 2^-8 of the value:
    8 significant bits, to nearest)."""
    w64 = w.to(torch.bfloat16).double()
    exact = F.conv2d(x.double(), w64, b.double(), stride)
    mags = F.conv2d(x.double().abs(), w64.abs(), b.double().abs(), stride)
    if r is not None:
        exact, mags = exact + r.double(), mags + r.double().abs()
    if relu:
        exact = exact.clamp(min=0)
    summed = (w.shape[1] + 3) * 2.0**-24 * mags
    return exact, summed + 2.0**-8 * (exact.abs() + summed)


CASES = [
    # n, cin, cout, h, w, relu, residual, in_place, stride
    (1, 64, 64, 1, 1, False, False, False, 1),  # one pixel: a tile of 1 row
    (2, 128, 192, 5, 7, True, False, False, 1),  # 70 pixels: a short last tile; 3 column strips
    (3, 256, 128, 7, 7, True, True, False, 1),
    (2, 64, 256, 9, 11, True, True, True, 1),  # written over the residual
    (1, 1024, 64, 3, 5, False, True, True, 1),  # a long reduction, no ReLU
    # strided (a projection shortcut's input read in place): odd maps whose last row and column
    # are dropped or kept; 2 x 14 x 14 outputs split by rows, each thread's blocks prefetching
    # the next; few rows (split by columns); one pixel
    (2, 128, 128, 9, 11, False, True, False, 2),
    (2, 256, 128, 28, 28, True, False, False, 2),
    (3, 192, 192, 10, 8, True, True, True, 3),
    (1, 512, 128, 14, 14, False, False, False, 2),
    (1, 64, 64, 1, 1, True, False, False, 2),
]


@needs_dot
@pytest.mark.parametrize("n,cin,cout,h,w,relu,residual,in_place,stride", CASES)
def test_matches_float64_within_the_bound_of_float32_sums_and_one_rounding(
    n: int,
    cin: int,
    cout: int,
    h: int,
    w: int,
    relu: bool,
    residual: bool,
    in_place: bool,
    stride: int,
) -> None:
    torch.manual_seed(cin + cout + h)
    x = _bf16(torch.randn(n, cin, h, w))
    weight = torch.randn(cout, cin, 1, 1) / cin**0.5
    bias = torch.randn(cout)
    ho, wo = (h - 1) // stride + 1, (w - 1) // stride + 1
    r = _bf16(torch.randn(n, cout, ho, wo)) if residual else None
    want, bound = _reference(x, weight, bias, r, relu, stride)
    given = None if r is None else r.clone()
    before = x.clone()
    with torch.no_grad():
        got = pointwise_gemm.conv1x1(
            x, pointwise_gemm.pack_conv(weight), bias, relu, given, in_place, stride
        )
    assert got.dtype == torch.bfloat16 and got.is_contiguous(memory_format=torch.channels_last)
    assert ((got.double() - want).abs() <= bound).all()
    assert torch.equal(x, before)
    if in_place:
        assert got.data_ptr() == given.data_ptr()
    elif r is not None:
        assert torch.equal(given, r)  # read, not written


@needs_dot
def test_the_operators_match_the_function_and_write_in_place() -> None:
    torch.manual_seed(1)
    x = _bf16(torch.randn(2, 64, 4, 6))
    packed, bias = pointwise_gemm.pack_conv(torch.randn(128, 64, 1, 1) / 8), torch.randn(128)
    r = _bf16(torch.randn(2, 128, 4, 6))
    r2 = _bf16(torch.randn(2, 128, 2, 3))
    with torch.no_grad():
        want = pointwise_gemm.conv1x1(x, packed, bias, True, r)
        assert torch.equal(torch.ops.resnext.pointwise_conv_bf16(x, packed, bias, 1, True, r), want)
        torch.ops.resnext.pointwise_conv_bf16_(x, packed, bias, 1, True, r)
        want2 = pointwise_gemm.conv1x1(x, packed, bias, False, r2, stride=2)
        got2 = torch.ops.resnext.pointwise_conv_bf16(x, packed, bias, 2, False, r2)
        assert got2.shape == (2, 128, 2, 3) and torch.equal(got2, want2)
        torch.ops.resnext.pointwise_conv_bf16_(x, packed, bias, 2, False, r2)
    assert torch.equal(r, want) and torch.equal(r2, want2)


def _args() -> dict:
    return {
        "x": _bf16(torch.randn(1, 64, 2, 2)),
        "packed": pointwise_gemm.pack_conv(torch.randn(64, 64, 1, 1)),
        "bias": torch.randn(64),
        "relu": True,
        "residual": None,
        "in_place": False,
    }


@needs_dot
@pytest.mark.parametrize(
    "change,message",
    [
        (lambda a: {**a, "x": a["x"].float()}, "x: expected a 4-D bfloat16"),
        (lambda a: {**a, "x": _bf16(torch.randn(1, 128, 2, 2))}, "packed: expected a pack_conv"),
        (lambda a: {**a, "bias": torch.randn(32)}, "bias: expected 64 float32 values"),
        (lambda a: {**a, "bias": None}, "bias: expected 64 float32 values, got None"),
        (lambda a: {**a, "residual": _bf16(torch.randn(1, 64, 3, 2))}, "residual: expected"),
        (lambda a: {**a, "residual": torch.randn(1, 64, 2, 2)}, "residual: expected a bfloat16"),
        (lambda a: {**a, "in_place": True}, "residual: writing in place needs"),
        (lambda a: {**a, "stride": 0}, "stride: expected a positive integer, got 0"),
        (lambda a: {**a, "stride": True}, "stride: expected a positive integer, got True"),
        (
            lambda a: {**a, "stride": 2, "residual": _bf16(torch.randn(1, 64, 2, 2))},
            r"residual: expected .*\(1, 64, 1, 1\)",
        ),
        (
            lambda a: {**a, "residual": a["x"], "in_place": True},
            "residual: must not share memory with x",
        ),
    ],
)
def test_bad_inputs_are_refused_by_name(change: Callable[[dict], dict], message: str) -> None:
    with pytest.raises(ValueError, match=message), torch.no_grad():
        pointwise_gemm.conv1x1(**change(_args()))


@needs_dot
def test_an_input_that_needs_a_gradient_is_refused() -> None:
    args = _args()
    args["x"].requires_grad_(True)
    with pytest.raises(ValueError, match="pointwise_conv_bf16: an inference kernel"):
        pointwise_gemm.conv1x1(**args)


def test_only_bf16_1x1s_with_channels_in_64s_are_eligible() -> None:
    assert dot_eligible(nn.Conv2d(64, 128, 1).bfloat16())
    assert dot_eligible(nn.Conv2d(64, 128, 1, stride=2).bfloat16())  # on every 2nd pixel
    assert not dot_eligible(nn.Conv2d(64, 128, 1))  # float32
    assert not dot_eligible(nn.Conv2d(64, 128, 1, padding=1).bfloat16())
    assert not dot_eligible(nn.Conv2d(64, 96, 1).bfloat16())  # outputs not in 64s
    assert not dot_eligible(nn.Conv2d(32, 128, 1).bfloat16())
    assert not dot_eligible(nn.Conv2d(64, 128, 3).bfloat16())
    assert not dot_eligible(nn.Conv2d(64, 128, 1, groups=2).bfloat16())
    with pytest.raises(ValueError, match="conv: expected a bf16 1×1 convolution"):
        DotConv1x1(nn.Conv2d(64, 128, 1))


@needs_dot
@pytest.mark.parametrize("backend", ["none", "inductor", "jit"])
def test_optimize_swaps_every_eligible_1x1_and_computes_the_same_function(
    backend: str, randomize_bn: Callable[[nn.Module], None], without_amx: None
) -> None:
    torch.manual_seed(11)
    # resnext29_4x16d with one block in stages 2-3 (three fewer to compile): every kind of 1×1
    # and each stage's projection remain
    spec = resnext.get_spec("resnext29_4x16d").replace(depths=(2, 1, 1))
    model = resnext.build_model(spec).eval()
    randomize_bn(model)
    x = torch.randn(2, 3, 32, 32)
    fast = optimize(model, "bf16", pointwise_bf16="on", backend=backend, example_input=x)
    # the reference function only: the eager fast path (a second compile took ~10 s)
    plain = optimize(model, "bf16", pointwise_bf16="off", backend="none", example_input=x)
    ones = [
        n for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1)
    ]
    dots = [
        c for c in fast.pointwise_choices if c.variant.startswith("dot") and "+sh" not in c.variant
    ]
    assert sorted(c.name for c in dots) == sorted(ones)
    assert all(c.chosen == "kernel" for c in dots)
    # then each stage's projection into its first block's last 1×1 ('on': all three)
    fused = [c.name for c in fast.pointwise_choices if c.variant == "dot+shortcut"]
    assert fused == ["layer1.0.conv3", "layer2.0.conv3", "layer3.0.conv3"]
    assert not any(c.variant.startswith("dot") for c in plain.pointwise_choices)
    in_place = [c for c in dots if c.variant.endswith("in place")]
    blocks = [c for c in dots if c.name.endswith("conv3")]
    assert len(in_place) == (0 if backend == "jit" else len(blocks))  # jit ignores in-place ops
    # a batch it was not built on, but for inductor, where that is a second compile (~6 s; new
    # shapes are test_speed_optimize's)
    fresh = torch.randn(2 if backend == "inductor" else 3, 3, 32, 32)
    mine = fresh.clone()
    with torch.no_grad():
        want, got, same = model(fresh), fast(fresh), plain(fresh)
        fast(mine)
    assert torch.equal(mine, fresh)  # the caller's tensor is never written over
    assert rel_err(got, same) < 2e-2  # only the 1×1s' float32 summation order differs
    assert rel_err(got, want) < 5e-2  # bf16 against the float32 model


@needs_dot
def test_auto_keeps_the_faster_way_of_each_layer(monkeypatch: pytest.MonkeyPatch) -> None:
    import resnext.speed.dense_swap as swap

    def ours_faster_with_a_residual(fns, x, repeats, before=None):
        fns[0](x)  # oneDNN's way runs (it would fail on a wrong shape)
        return [2.0, 1.0] if x.shape[1] == 64 and x.shape[2] == 8 else [1.0, 2.0]

    monkeypatch.setattr(swap, "time_each_ms", ours_faster_with_a_residual)
    model = Net(64).eval().bfloat16()
    x = _bf16(torch.randn(1, 3, 8, 8))
    choices = swap_convs_dot(model, x, mode="auto")
    chosen = {c.name: c.chosen for c in choices}
    # 64-channel inputs at 8²: blocks.0's conv1 and projection, each block's conv3
    assert chosen == {
        "blocks.0.downsample.0": "kernel",
        "blocks.0.conv1": "kernel",
        "blocks.0.conv3": "kernel",
        "blocks.1.conv1": "native",
        "blocks.1.conv3": "kernel",
        "blocks.2.downsample.0": "native",  # 128 channels in
        "blocks.2.conv1": "native",
        "blocks.2.conv3": "kernel",
    }
    swapped = {n for n, m in model.named_modules() if isinstance(m, DotConv1x1)}
    assert swapped == {n for n, c in chosen.items() if c == "kernel"}


@needs_dot
def test_every_backend_is_weighed_against_onednn_as_it_runs_there(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Every backend runs oneDNN's convolutions prepacked (the eager paths through
    # `prepack_convs`), so the pass times oneDNN's 1×1 prepacked for each: the runner it times
    # is the packed module, not its unpacked ops.
    import resnext.speed.dense_swap as swap

    packed = []
    runner = swap.onednn_runner

    def recording(*args, **kwargs):
        way = runner(*args, **kwargs)
        packed.append(isinstance(way, PrepackedConv) and way.packed is not None)
        return way

    monkeypatch.setattr(swap, "onednn_runner", recording)
    model = Net(64).eval().bfloat16()
    x = _bf16(torch.randn(1, 3, 8, 8))
    choices = swap_convs_dot(model, x, mode="auto")
    assert len(choices) == 8 and packed and all(packed)
    for backend in ("none", "inductor"):
        packed.clear()
        fast = optimize(Net(64).eval(), "bf16", backend=backend, example_input=x.float())
        swapped = [c for c in fast.pointwise_choices if c.variant.startswith("dot")]
        assert len([c for c in swapped if c.variant != "dot+shortcut"]) == 8
        assert packed and all(packed), backend
        if backend == "none":  # what the chooser timed is what runs: oneDNN's layers prepacked
            assert not any(isinstance(m, nn.Conv2d) and m.groups == 1 for m in fast.modules())


@needs_dot
def test_a_source_with_older_signatures_is_refused_before_any_call(tmp_path) -> None:
    # ctypes would pass this revision's arguments to its functions: a source without the
    # signature revision (what pointwise_gemm.c was before stop 39) must not load
    from resnext.native import NativeUnavailable

    text = pointwise_gemm.SOURCE.read_text()
    marker = "int pointwise_gemm_abi(void) { return 3; }"
    assert marker in text
    old = tmp_path / "pointwise_gemm.c"
    old.write_text(text.replace(marker, ""))
    with pytest.raises(NativeUnavailable, match=r"revision 1 \(no pointwise_gemm_abi\)"):
        pointwise_gemm.load(old)
    newer = tmp_path / "newer" / "pointwise_gemm.c"
    newer.parent.mkdir()
    newer.write_text(text.replace(marker, "int pointwise_gemm_abi(void) { return 4; }"))
    with pytest.raises(NativeUnavailable, match="revision 4, these bindings' 3"):
        pointwise_gemm.load(newer)
    # stop 39's revision, without the shortcut product these bindings declare
    older = tmp_path / "older" / "pointwise_gemm.c"
    older.parent.mkdir()
    older.write_text(text.replace(marker, "int pointwise_gemm_abi(void) { return 2; }"))
    with pytest.raises(NativeUnavailable, match="revision 2, these bindings' 3"):
        pointwise_gemm.load(older)
