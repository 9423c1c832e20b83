"""Our int8 grouped 3×3 kernel (`resnext.speed.grouped_int8`): the quantized convolution by hand
and by torch's engine, inside the int8 network, and the layers it leaves to torch."""

from __future__ import annotations

import copy
import time

import pytest
import torch
from torch import nn

import resnext
from resnext.speed import autotune, grouped_int8
from resnext.speed.capability import cpu_flags
from resnext.speed.int8 import VNNI_FLAGS, quantize_conv, quantize_int8, quantized_engine

pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
]
needs_kernel = pytest.mark.skipif(
    grouped_int8.unavailable_reason() is not None,
    reason=f"our int8 grouped kernel does not run here: {grouped_int8.unavailable_reason()}",
)


def _quantized_conv(
    channels: int,
    groups: int,
    stride: int,
    relu: bool,
    x: torch.Tensor,
    bias: bool = True,
    bits: int = 8,
) -> tuple[nn.Module, torch.Tensor]:
    """A quantized grouped 3×3 (+ ReLU) with random weights, and x quantized as its input with
    `bits`-bit codes."""
    torch.manual_seed(channels * groups + stride)  # the same weights for either bits
    conv = nn.Conv2d(channels, channels, 3, stride, 1, groups=groups, bias=bias)
    return quantize_conv(conv, x, relu=relu, activation_bits=bits)


CASES = [
    (cpg, stride, relu, size)
    for cpg in grouped_int8.SUPPORTED_CPG
    for stride in (1, 2)
    # output rows of 28 and 5 pixels at stride 1, 4 and 14 at stride 2: blocks of 14, 7 and 8
    # pixels (with a tail) at both strides
    for relu, size in (
        ((True, (5, 28)), (False, (6, 5))) if stride == 1 else ((True, (10, 7)), (False, (3, 28)))
    )
]


BUILDS = [
    pytest.param(
        build,
        id=build.name,
        marks=pytest.mark.skipif(
            grouped_int8.build_problem(build) is not None,
            reason=f"the {build.name} build does not run here: {grouped_int8.build_problem(build)}",
        ),
    )
    for build in grouped_int8.BUILDS
]


@pytest.mark.parametrize("build", BUILDS)
@pytest.mark.parametrize(
    ("cpg", "stride", "relu", "size"),
    CASES,
    ids=[f"cpg{c}-s{s}-relu{r}-{h}x{w}" for c, s, r, (h, w) in CASES],
)
def test_the_kernel_computes_the_quantized_convolution(
    cpg: int, stride: int, relu: bool, size: tuple[int, int], build: grouped_int8.Build
) -> None:
    torch.manual_seed(cpg + 10 * stride)
    channels = 32 if cpg < 32 else 2 * cpg
    x = torch.randn(3, channels, *size) * 2 + 0.7  # an input zero point far from 0
    # 8-bit codes, then 7-bit ones (the AVX2 build sums rows of those on another path)
    for bits in (8, 7):
        conv, qx = _quantized_conv(channels, channels // cpg, stride, relu, x, bits=bits)
        assert grouped_int8.supports(conv)
        codes = _kernel_codes(conv, qx, build)
        assert codes.min() >= (conv.zero_point if relu else 0)
        _assert_codes_near(codes, grouped_int8.reference(conv, qx))
        # torch's engines sum pairs of uint8 x int8 products in int16 without VNNI, which
        # saturates on codes above 127 (off by up to 92 codes here): compare with them on 7-bit
        # codes there, as `quantize_int8` makes them on such CPUs
        if bits == 7 or VNNI_FLAGS & cpu_flags():
            with quantized_engine("auto"):
                _assert_codes_near(codes, conv(qx).int_repr().double())


def _kernel_codes(
    conv: nn.Module, qx: torch.Tensor, build: grouped_int8.Build | None = None
) -> torch.Tensor:
    """The kernel's output codes for `qx` (on `build`, else the one this machine runs first),
    after checking it keeps the layer's output scale."""
    got = grouped_int8.GroupedInt8(conv, build)(qx, float(conv.scale), int(conv.zero_point))
    assert got.dtype == torch.quint8 and got.q_scale() == conv.scale
    return got.int_repr().double()


def _assert_codes_near(codes: torch.Tensor, reference: torch.Tensor) -> None:
    """Float rounding of products summed in another order can move a value across a .5
    boundary: one code, rarely."""
    assert codes.shape == reference.shape
    diff = (codes - reference).abs()
    assert diff.max() <= 1
    assert (diff > 0).double().mean() < 2e-3


@pytest.mark.skipif(
    any(grouped_int8.build_problem(b) for b in grouped_int8.BUILDS),
    reason="needs every build of the kernel: "
    + "; ".join(
        f"{b.name}: {grouped_int8.build_problem(b)}"
        for b in grouped_int8.BUILDS
        if grouped_int8.build_problem(b)
    ),
)
def test_every_build_gives_the_same_codes() -> None:
    torch.manual_seed(3)
    for cpg, stride in ((4, 1), (8, 2), (16, 1), (64, 2)):
        x = torch.randn(2, 128, 9, 14) * 2 + 0.7
        conv, qx = _quantized_conv(128, 128 // cpg, stride, True, x)
        first, *others = (_kernel_codes(conv, qx, build) for build in grouped_int8.BUILDS)
        assert all(torch.equal(first, other) for other in others)  # the same int32 sums


@pytest.mark.parametrize("build", BUILDS)
def test_outputs_beyond_uint8_saturate_at_0_and_255(build: grouped_int8.Build) -> None:
    torch.manual_seed(4)
    for cpg in (4, 16):
        conv, qx = _quantized_conv(32, 32 // cpg, 1, False, torch.randn(2, 32, 6, 7))
        tiny = copy.deepcopy(conv)
        tiny.scale, tiny.zero_point = conv.scale / 2000, 128  # requantized codes far past 0-255
        got = grouped_int8.GroupedInt8(conv, build)(qx, tiny.scale, tiny.zero_point)
        hand = grouped_int8.reference(tiny, qx)
        assert (hand == 255).double().mean() > 0.3 and (hand == 0).double().mean() > 0.3
        _assert_codes_near(got.int_repr().double(), hand)


@needs_kernel
def test_a_one_pixel_image_reads_the_zero_point_all_around() -> None:
    torch.manual_seed(0)
    x = torch.rand(2, 64, 1, 1) + 1.0  # all positive: the input's zero point is its code for 0
    conv, qx = _quantized_conv(64, 8, 1, False, x, bias=False)
    got = grouped_int8.GroupedInt8(conv)(qx, float(conv.scale), int(conv.zero_point))
    # only the centre tap sees the image
    assert (got.int_repr().double() - grouped_int8.reference(conv, qx)).abs().max() <= 1


def test_layers_it_does_not_take_are_left_to_torch() -> None:
    x = torch.randn(1, 48, 6, 6)
    dense, _ = _quantized_conv(64, 1, 1, True, torch.randn(1, 64, 6, 6))  # one group of 64
    odd, _ = _quantized_conv(48, 16, 1, True, x)  # 3 channels a group
    assert not grouped_int8.supports(dense) and not grouped_int8.supports(odd)
    assert not grouped_int8.supports(nn.Conv2d(64, 64, 3, padding=1, groups=16))  # float
    with pytest.raises(ValueError, match="conv: expected a quantized grouped 3×3"):
        grouped_int8.GroupedInt8(dense)
    grouped, qx = _quantized_conv(64, 16, 1, True, torch.randn(1, 64, 6, 6))
    with pytest.raises(
        ValueError, match=r"x: expected a per-tensor quint8 map, got torch\.float32"
    ):
        grouped_int8.GroupedInt8(grouped)(qx.dequantize(), 0.1, 0)


# 4, 8, 16 and 32 channels per group in stages 1-4, the stride-2 first blocks among them
SPEC = resnext.ModelSpec(
    depths=(1, 2, 1, 1), cardinality=4, base_width=4, stem_width=16, out_width=32, num_classes=10
)


def _quantized() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(5)
    model = resnext.build_model(SPEC).eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
    calibration = torch.randn(4, 3, 64, 64)
    return quantize_int8(model, [calibration]), torch.randn(2, 3, 64, 64)


@needs_kernel
def test_the_network_on_our_kernels_computes_what_it_computes_on_torchs_engine(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from resnext.speed import add_int8

    net, x = _quantized()
    keys = set(net.state_dict())
    adds = []
    real_add = add_int8.add_relu_if_taken
    monkeypatch.setattr(add_int8, "add_relu_if_taken", lambda *a: adds.append(1) or real_add(*a))
    with torch.no_grad(), autotune.CHOOSER.prefer("ours"):
        ours = net(x)
        blocks = [b for s in net.stage_names for b in getattr(net, s)]
        assert all(b._kernel is not None and b._kernel[1] is not None for b in blocks)
        assert len(adds) == len(blocks) or add_int8.unavailable_reason() is not None
        engine = net.use_kernels(False)(x)
    assert len(adds) in (0, len(blocks))  # none with the kernels off
    assert set(net.state_dict()) == keys  # the kernels add nothing to the state dict
    assert ((ours - engine).abs().max() / engine.abs().max()).item() < 0.02
    assert (ours.argmax(1) == engine.argmax(1)).all()


@needs_kernel
def test_weights_loaded_after_a_forward_are_the_ones_it_runs() -> None:
    net, x = _quantized()
    other, _ = _quantized()
    with torch.no_grad():
        other.layer1[0].conv2.set_weight_bias(
            torch.quantize_per_channel(
                torch.randn_like(other.layer1[0].conv2.weight().dequantize()),
                torch.full((other.layer1[0].conv2.out_channels,), 0.02),
                torch.zeros(other.layer1[0].conv2.out_channels, dtype=torch.long),
                0,
                torch.qint8,
            ),
            other.layer1[0].conv2.bias(),
        )
        net(x)  # packs net's own grouped weights
        net.load_state_dict(copy.deepcopy(other.state_dict()))
        got, want = net(x), other.use_kernels(False)(x)
    assert ((got - want).abs().max() / want.abs().max()).item() < 0.02


@needs_kernel
@pytest.mark.parametrize("slow", ["ours", "engine"])
def test_each_shape_runs_the_faster_of_torchs_engine_and_our_kernel(
    slow: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    net, x = _quantized()
    chooser = autotune.Chooser()
    monkeypatch.setattr(autotune, "CHOOSER", chooser)
    calls = {"ours": 0, "engine": 0}
    real_kernel = grouped_int8.GroupedInt8.__call__

    def ours(kernel, *args):
        calls["ours"] += 1
        time.sleep(0.02 if slow == "ours" else 0)
        return real_kernel(kernel, *args)

    monkeypatch.setattr(grouped_int8.GroupedInt8, "__call__", ours)
    grouped = [b.conv2 for s in net.stage_names for b in getattr(net, s)]
    for conv in grouped:
        real_conv = conv.forward

        def engine(x, real_conv=real_conv):
            calls["engine"] += 1
            time.sleep(0.02 if slow == "engine" else 0)
            return real_conv(x)

        monkeypatch.setattr(conv, "forward", engine)
    with torch.no_grad():
        net(x)  # times both at each new shape
        choices = [d for d in chooser.decisions() if d.op == "grouped3x3.int8"]
        assert len(choices) == len({d.key for d in choices}) >= 2
        fast = "engine" if slow == "ours" else "ours"
        assert all(d.winner == fast and d.ms[slow] > d.ms[fast] for d in choices)
        calls.update(ours=0, engine=0)
        net(x)
    assert calls == {slow: 0, fast: len(grouped)}  # the winner alone once chosen
