"""The AMX bf16×3 float32 convolution keeps float32 accuracy (a bound derived from the split, not
from the code), its errors, and `optimize`'s pass that swaps it in."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager

import pytest
import torch
import torch.nn.functional as F
from block_nets import Bottleneck, Net, pointwise_choices
from tensor_checks import fast_path_error, nhwc, rel_err
from torch import nn

import resnext
from resnext.errors import ConfigError
from resnext.speed import conv_x3, dense_swap
from resnext.speed.conv_x3_swap import ConvX3, eligible, swap_convs_x3
from resnext.speed.dense_swap import DenseOptions
from resnext.speed.fastpath import optimize
from resnext.speed.shortcut_fusion import ShortcutConvX3, fuse_x3_shortcuts

REASON = conv_x3.unavailable_reason()
needs_amx = pytest.mark.skipif(REASON is not None, reason=f"AMX kernel unavailable: {REASON}")


def test_split_keeps_16_bits_of_each_value() -> None:
    # bf16 keeps 8 significant bits; rounding to nearest twice leaves |t - hi - lo| <= 2^-8 |t - hi|
    # <= 2^-16 |t|, over values spanning float32's normal range
    gen = torch.Generator().manual_seed(0)
    t = torch.randn(100_000, generator=gen) * torch.exp2(torch.randint(-100, 100, (100_000,)))
    hi, lo = conv_x3.split_bf16(t)
    assert torch.equal(hi, t.to(torch.bfloat16))  # hi is torch's own bf16 rounding
    rest = (t.double() - hi.double() - lo.double()).abs()
    assert bool((rest <= 2.0**-16 * t.double().abs()).all())
    assert rest.max() > 0  # the low part does not hold everything: the bound is not vacuous


def _case(
    n: int, k: int, c: int, h: int, w: int, stride: int, seed: int, kernel: int = 1, pad: int = 0
) -> tuple:
    gen = torch.Generator().manual_seed(seed)
    x = nhwc(torch.randn(n, k, h, w, generator=gen))
    weight = torch.randn(c, k, kernel, kernel, generator=gen) / (k * kernel * kernel) ** 0.5
    bias = torch.randn(c, generator=gen)
    ho, wo = ((d + 2 * pad - kernel) // stride + 1 for d in (h, w))
    residual = nhwc(torch.randn(n, c, ho, wo, generator=gen))
    return x, weight, bias, residual


def _bound(x: torch.Tensor, weight: torch.Tensor, stride: int, pad: int = 0) -> torch.Tensor:
    """Each output's error bound: the three kept products err by at most 3·2^-16 of |x w| (the
    dropped lo·lo and the two splits' remainders), plus float32 accumulation of K terms."""
    depth = weight[0].numel()
    size = F.conv2d(x.double().abs(), weight.double().abs(), stride=stride, padding=pad)
    return (3 * 2.0**-16 + depth * 2.0**-23) * size + 1e-6


@needs_amx
@pytest.mark.parametrize(
    "n,k,c,h,w,stride,kernel,pad",
    [
        (1, 32, 16, 1, 1, 1, 1, 0),  # one pixel, one K step, one output tile
        (2, 64, 48, 9, 7, 1, 1, 0),  # pixels not a multiple of 32, an odd number of output tiles
        (3, 96, 80, 11, 13, 2, 1, 0),  # stride 2 on odd sizes
        (1, 2048, 1024, 3, 5, 1, 1, 0),  # 8 output chunks: pixels split once, shared
        (1, 1024, 512, 3, 5, 1, 1, 0),  # 2 output chunks: pixels split per item
        (2, 1024, 2048, 6, 6, 2, 1, 0),  # ResNeXt-50's stage-4 projection shortcut, chunked
        (4, 256, 128, 8, 8, 1, 1, 0),  # ResNeXt-50's stage-1 first 1×1 shape
        (2, 3, 64, 23, 19, 2, 7, 3),  # the 7×7 stem: 147-deep patches padded to 160
        (2, 64, 64, 9, 10, 1, 3, 1),  # a dense 3×3 (ResNet), patches past every border
        (1, 512, 160, 5, 6, 1, 3, 1),  # a wide 3×3: 4 chunks, patches gathered once, shared
        (1, 48, 32, 7, 8, 2, 3, 1),  # stride 2, inputs not a multiple of 32
        (1, 5, 16, 4, 3, 1, 3, 0),  # no padding, output smaller than the input
        (1, 8, 16, 2, 9, 3, 5, 4),  # padding wider than the image: whole patch rows zero
    ],
)
@pytest.mark.parametrize("epilogue", ["none", "relu", "add+relu"])
def test_kernel_keeps_float32_accuracy(
    n: int, k: int, c: int, h: int, w: int, stride: int, kernel: int, pad: int, epilogue: str
) -> None:
    x, weight, bias, residual = _case(n, k, c, h, w, stride, k + c + h, kernel, pad)
    relu = epilogue != "none"
    res = residual if epilogue == "add+relu" else None
    got = conv_x3.run(x, conv_x3.pack(weight), bias, kernel, stride, pad, relu, res)
    exact = F.conv2d(x.double(), weight.double(), bias.double(), stride, pad)
    if res is not None:
        exact = exact + res.double()
    if relu:
        exact = F.relu(exact)
    assert got.dtype == torch.float32 and got.shape == exact.shape
    assert got.is_contiguous(memory_format=torch.channels_last)
    bound = _bound(x, weight, stride, pad)
    assert bool(((got.double() - exact).abs() <= bound).all())
    # and it is float32-class: a single bf16 product would be ~2^-8 off, 2^8 times the bound
    xb, wb = x.bfloat16().double(), weight.bfloat16().double()
    one_pass = F.conv2d(xb, wb, bias.double(), stride, pad)
    if res is None and not relu:
        assert (one_pass - exact).abs().max() > 20 * (got.double() - exact).abs().max()


@needs_amx
@pytest.mark.parametrize(
    "n,c,k,cout,h,w,stride",
    [
        (2, 32, 64, 48, 5, 7, 1),  # stage 1's shape in small: a stride-1 projection
        (3, 64, 32, 16, 9, 11, 2),  # stride 2 from odd sizes
        (1, 512, 512, 1024, 14, 14, 2),  # ResNeXt-50 stage 3: 2 output chunks
        (1, 1024, 1024, 2048, 14, 14, 2),  # stage 4: 8 chunks, pixels split once, shared
    ],
)
def test_a_last_1x1_and_its_projection_shortcut_as_one_product(
    n: int, c: int, k: int, cout: int, h: int, w: int, stride: int
) -> None:
    gen = torch.Generator().manual_seed(n + c + k + stride)
    x = nhwc(torch.randn(n, k, h, w, generator=gen))  # the block's input
    ho, wo = (h - 1) // stride + 1, (w - 1) // stride + 1
    g = nhwc(torch.relu(torch.randn(n, c, ho, wo, generator=gen)))  # the grouped output
    w3 = torch.randn(cout, c, 1, 1, generator=gen) / c**0.5
    wsc = torch.randn(cout, k, 1, 1, generator=gen) / k**0.5
    b3, bsc = torch.randn(cout, generator=gen), torch.randn(cout, generator=gen)
    packed = conv_x3.pack(torch.cat([w3, wsc], dim=1))
    got = conv_x3.run_with_shortcut(g, packed, b3 + bsc, x, stride)
    assert got.shape == (n, cout, ho, wo) and got.is_contiguous(memory_format=torch.channels_last)
    exact = F.relu(
        F.conv2d(g.double(), w3.double(), b3.double())
        + F.conv2d(x.double(), wsc.double(), bsc.double(), stride)
    )
    bound = _bound(g, w3, 1) + _bound(x, wsc, stride)
    assert bool(((got.double() - exact).abs() <= bound).all())
    with pytest.raises(ValueError, match="shortcut: expected"):
        conv_x3.run_with_shortcut(g, packed, b3 + bsc, x[:, :, :-2], stride + 1)
    with pytest.raises(ValueError, match="packed"):
        conv_x3.run_with_shortcut(g, conv_x3.pack(w3), b3 + bsc, x, stride)
    with pytest.raises(ValueError, match="bias"):
        conv_x3.run_with_shortcut(g, packed, b3[:-1], x, stride)


@needs_amx
@pytest.mark.parametrize("k,c", [(512, 1024), (2048, 512)])  # 2 chunks; 4 (pixels split shared)
def test_each_thread_count_gives_the_same_bits(
    k: int, c: int, on_threads: Callable[[int], AbstractContextManager[None]]
) -> None:
    # every output is one thread's, in one order: splitting the items differently changes nothing
    x, weight, bias, residual = _case(3, k, c, 7, 9, 1, seed=5)
    packed = conv_x3.pack(weight)
    outs = []
    for threads in (1, 2, 3):
        with on_threads(threads):
            outs.append(conv_x3.run(x, packed, bias, 1, 1, 0, True, residual))
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


@needs_amx
def test_in_place_writes_the_same_values_over_the_residual() -> None:
    x, weight, bias, residual = _case(2, 128, 64, 5, 6, 1, seed=6)
    packed = conv_x3.pack(weight)
    want = conv_x3.run(x, packed, bias, 1, 1, 0, True, residual)
    target = residual.clone()
    torch.ops.resnext.conv_x3_(x, packed, bias, 1, 1, 0, True, target)
    assert torch.equal(target, want)
    assert torch.equal(torch.ops.resnext.conv_x3(x, packed, bias, 1, 1, 0, True, residual), want)


@needs_amx
def test_buffers_kept_across_calls_leave_no_trace() -> None:
    # a call on NaNs with more channels fills every thread's buffers with NaN first
    nan = nhwc(torch.full((2, 512, 9, 9), float("nan")))
    wide = conv_x3.pack(torch.randn(64, 512, 1, 1))
    assert torch.isnan(conv_x3.run(nan, wide, torch.zeros(64))).all()
    x, weight, bias, _ = _case(1, 64, 32, 3, 3, 1, seed=7)  # 9 pixels: most rows of a tile unused
    got = conv_x3.run(x, conv_x3.pack(weight), bias)
    exact = F.conv2d(x.double(), weight.double(), bias.double())
    assert bool(((got.double() - exact).abs() <= _bound(x, weight, 1)).all())
    # a 3×3 on 3 channels: 27-value patches padded to 32 in a buffer the NaN call filled
    nan3 = nhwc(torch.full((2, 64, 9, 9), float("nan")))
    wide3 = conv_x3.pack(torch.randn(64, 64, 3, 3))
    assert torch.isnan(conv_x3.run(nan3, wide3, torch.zeros(64), 3, 1, 0)).all()  # no padding
    x, weight, bias, _ = _case(1, 3, 16, 5, 5, 1, seed=8, kernel=3, pad=1)
    got = conv_x3.run(x, conv_x3.pack(weight), bias, 3, 1, 1)
    exact = F.conv2d(x.double(), weight.double(), bias.double(), 1, 1)
    assert bool(((got.double() - exact).abs() <= _bound(x, weight, 1, 1)).all())


@needs_amx
def test_bad_inputs_name_the_argument() -> None:
    x, weight, bias, residual = _case(1, 64, 32, 4, 4, 1, seed=8)
    packed = conv_x3.pack(weight)
    with pytest.raises(ValueError, match="x: expected a 4-d float32"):
        conv_x3.run(x.bfloat16(), packed, bias)
    with pytest.raises(ValueError, match=r"packed: expected .* 128 input channels"):
        conv_x3.run(nhwc(torch.randn(1, 128, 4, 4)), packed, bias)
    with pytest.raises(ValueError, match="bias: expected 32 float32"):
        conv_x3.run(x, packed, bias[:16])
    with pytest.raises(ValueError, match=r"packed: expected .* a 3×3 kernel"):
        conv_x3.run(x, packed, bias, 3)
    with pytest.raises(ValueError, match="kernel, stride, padding: expected a supported"):
        conv_x3.run(x, packed, bias, 1, 1, 1)  # a padded 1×1
    with pytest.raises(ValueError, match="x: 4×4 is smaller than the 7×7 kernel"):
        conv_x3.run(x, conv_x3.pack(torch.randn(16, 64, 7, 7)), torch.zeros(16), 7)
    with pytest.raises(ValueError, match="residual: expected shape"):
        conv_x3.run(x, packed, bias, 1, 2, 0, True, residual)
    with pytest.raises(ValueError, match="residual: writing in place needs a channels_last"):
        conv_x3.run(x, packed, bias, 1, 1, 0, True, residual.contiguous(), in_place=True)
    shared = nhwc(torch.randn(1, 64, 4, 4))
    square = conv_x3.pack(torch.randn(64, 64, 1, 1))
    with pytest.raises(ValueError, match="must not share memory with x"):
        conv_x3.run(shared, square, torch.zeros(64), 1, 1, 0, True, shared, in_place=True)
    with pytest.raises(ValueError, match="weight: expected a \\(C, Cin, k, k\\)"):
        conv_x3.pack(torch.randn(32, 64, 3, 1))
    with pytest.raises(ValueError, match="weight: expected"):
        conv_x3.pack(torch.randn(24, 64, 1, 1))  # outputs not a multiple of 16
    with pytest.raises(ValueError, match="weight: expected"):
        conv_x3.pack(torch.randn(32, 48, 1, 1))  # a 1×1 reads whole 32-channel steps
    needs_grad = x.clone().requires_grad_()
    with pytest.raises(ValueError, match="conv_x3: an inference kernel"):
        torch.ops.resnext.conv_x3(needs_grad, packed, bias, 1, 1, 0, False, None)


def test_only_float32_convs_the_kernel_takes_are_eligible() -> None:
    assert eligible(nn.Conv2d(64, 32, 1))
    assert eligible(nn.Conv2d(64, 32, 1, stride=2, bias=False))
    assert eligible(nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False))  # the stem
    assert eligible(nn.Conv2d(64, 64, 3, padding=1))  # a dense 3×3
    assert not eligible(nn.Conv2d(64, 32, 1).bfloat16())
    assert not eligible(nn.Conv2d(64, 64, 3, padding=1, groups=2))
    assert not eligible(nn.Conv2d(48, 32, 1))  # a 1×1's inputs not a multiple of 32
    assert not eligible(nn.Conv2d(64, 24, 1))  # outputs not a multiple of 16
    assert not eligible(nn.Conv2d(64, 32, 1, padding=1))
    assert not eligible(nn.Conv2d(64, 32, (3, 1), padding=1))
    assert not eligible(nn.Conv2d(64, 32, 3, padding=1, dilation=2))
    assert not eligible(nn.Conv2d(64, 32, 3, padding="same"))
    assert not eligible(nn.Conv2d(64, 32, 3, padding=1, padding_mode="reflect"))
    with pytest.raises(ValueError, match="conv: expected a float32 convolution"):
        ConvX3(nn.Conv2d(64, 32, 3, groups=2))


@needs_amx
def test_the_pass_fuses_each_epilogue_once_and_overwrites_only_dead_residuals() -> None:
    torch.manual_seed(10)
    model = Net().eval()
    x = nhwc(torch.randn(2, 3, 8, 8))
    with torch.no_grad():
        want = model(x)
    choices = swap_convs_x3(model, x, mode="on")
    got = {c.name: c.variant for c in choices}
    # the stem, the model's own child, swapped alone
    assert got == {"stem": "bf16x3", **pointwise_choices("bf16x3")}
    assert sum(isinstance(m, ConvX3) for m in model.modules()) == 9
    assert not any(isinstance(m, nn.Conv2d) for m in model.modules())
    before = x.clone()
    with torch.no_grad():
        assert rel_err(model(x), want) < 1e-5
    assert torch.equal(x, before)


class _ReadsShortcutAgain(Bottleneck):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.conv3(self.relu(self.conv1(x))) + x) * x


class _Wrap(nn.Module):
    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x * 1.0)  # the block's input is not the caller's tensor


@needs_amx
def test_a_residual_read_after_the_add_or_the_callers_tensor_is_not_overwritten() -> None:
    x = nhwc(torch.randn(1, 64, 5, 5))
    for model, variant in (
        (_Wrap(_ReadsShortcutAgain(64, 32, 64, 1)), "bf16x3+add+relu"),
        (_Wrap(Bottleneck(64, 32, 64, 1)), "bf16x3+add+relu, in place"),
        (nn.Sequential(Bottleneck(64, 32, 64, 1)), "bf16x3+add+relu"),  # x is the caller's
    ):
        model.eval()
        with torch.no_grad():
            want = model(x)
        choices = swap_convs_x3(model, x, mode="on")
        assert [c.variant for c in choices if c.name.endswith("conv3")] == [variant]
        before = x.clone()
        with torch.no_grad():
            assert rel_err(model(x), want) < 1e-5
        assert torch.equal(x, before)


@needs_amx
@pytest.mark.parametrize(
    "name,size",
    [("resnext50_32x4d", 64), ("resnext29_4x16d", 32), ("resnet29_1x64d", 32)],  # dense 3×3s
)
@pytest.mark.parametrize("backend", ["none", "inductor", "jit"])
def test_optimize_swaps_every_dense_conv_and_computes_the_same_function(
    name: str, size: int, backend: str, randomize_bn: Callable[[nn.Module], None]
) -> None:
    if backend != "none" and name != "resnext29_4x16d":
        pytest.skip("compiling every model takes too long for a fast test; ResNeXt-29 compiles")
    torch.manual_seed(11)
    model = resnext.create_model(name).eval()
    randomize_bn(model)
    x = torch.randn(2, 3, size, size)
    # the stem's own fusion off: it would take conv1 (tests/speed/test_stem.py)
    fast = optimize(model, "fp32", backend=backend, example_input=x, conv_x3="on", fuse_stem="off")
    dense = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.groups == 1]
    layers = [c for c in fast.conv_x3_choices if c.variant != "bf16x3+shortcut"]
    assert sorted(c.name for c in layers) == sorted(dense)  # the stem too
    in_place = [c for c in layers if c.variant.endswith("in place")]
    # every block's last 1×1 writes over its shortcut, except under jit
    blocks = [c for c in layers if c.name.endswith("conv3")]
    assert len(in_place) == (0 if backend == "jit" else len(blocks))
    # then each projection shortcut joins its block's last 1×1 in one product
    projections = [n for n in dense if n.endswith("downsample.0")]
    joined = [c for c in fast.conv_x3_choices if c.variant == "bf16x3+shortcut"]
    assert len(joined) == len(projections) > 0 and all(c.chosen == "fused" for c in joined)
    if backend != "jit":  # a traced module no longer shows its Python submodules
        assert sum(isinstance(m, ShortcutConvX3) for m in fast.modules()) == len(projections)
    assert fast_path_error(model, fast, (3, 3, size, size)) < 1e-4


def test_pass_modes() -> None:
    model = nn.Sequential(nn.Conv2d(64, 32, 1), nn.ReLU())
    x = torch.randn(1, 64, 4, 4)
    assert swap_convs_x3(model, x, mode="off") == []
    assert swap_convs_x3(model, x.bfloat16(), mode="on") == []  # float32 only
    assert fuse_x3_shortcuts(model, x, mode="off") == []
    assert fuse_x3_shortcuts(model, x, mode="on") == []  # no ConvX3 pair to join
    with pytest.raises(ConfigError, match="conv_x3"):
        fuse_x3_shortcuts(model, x, mode="always")
    with pytest.raises(ConfigError, match="conv_x3"):
        swap_convs_x3(model, x, mode="always")
    with pytest.raises(ConfigError, match="conv_x3"):
        optimize(model, "fp32", backend="none", conv_x3="yes")


@needs_amx
@pytest.mark.parametrize("mode", ["auto", "on"])
def test_a_1x1_without_bias_is_timed_and_swapped_like_any_other(mode: str) -> None:
    torch.manual_seed(12)
    model = nn.Sequential(nn.Sequential(nn.Conv2d(64, 32, 1, bias=False), nn.ReLU())).eval()
    x = nhwc(torch.randn(2, 64, 6, 6))
    with torch.no_grad():
        want = model(x)
    (choice,) = swap_convs_x3(model, x, mode=mode)
    assert choice.name == "0.0" and choice.native_ms > 0 and choice.kernel_ms > 0
    assert choice.variant == "bf16x3+relu"
    assert isinstance(model[0].get_submodule("0"), ConvX3) == (choice.chosen == "kernel")
    with torch.no_grad():
        assert rel_err(model(x), want) < 1e-5


def test_where_the_kernel_cannot_run_auto_changes_nothing_and_on_says_why(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # as on a CPU without AMX (the AMD machine): the float32 path stays oneDNN's, silently
    monkeypatch.setattr(conv_x3, "unavailable_reason", lambda: "this CPU lacks ['amx_bf16']")
    model = nn.Sequential(nn.Sequential(nn.Conv2d(64, 32, 1), nn.ReLU())).eval()
    x = nhwc(torch.randn(1, 64, 4, 4))
    assert swap_convs_x3(model, x, mode="auto") == []
    assert isinstance(model[0][0], nn.Conv2d)
    with pytest.raises(ConfigError, match=r"conv_x3: 'on' but the kernel cannot run here: .*amx"):
        swap_convs_x3(model, x, mode="on")
    fast = optimize(model, "fp32", backend="none", example_input=x)
    assert fast.conv_x3_choices == []


@needs_amx
def test_the_extra_cost_of_oneDNNs_way_moves_a_close_choice(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # oneDNN 1.0 ms against ours 1.1 ms (stubbed): native, unless oneDNN's way costs 0.2 ms more
    # (a torch operator in a replay, `replay.TORCH_STEP_MS`)
    monkeypatch.setattr(dense_swap, "time_each_ms", lambda fns, x, repeats, before=None: [1.0, 1.1])
    chosen = []
    for extra in (0.0, 0.2):
        model = nn.Sequential(nn.Sequential(nn.Conv2d(64, 32, 1), nn.ReLU())).eval()
        (choice,) = swap_convs_x3(
            model, nhwc(torch.randn(1, 64, 4, 4)), options=DenseOptions(native_extra_ms=extra)
        )
        assert (choice.native_ms, choice.kernel_ms) == (1.0, 1.1)  # the times measured, as kept
        chosen.append(choice.chosen)
    assert chosen == ["native", "kernel"]


def test_dense_options_refuse_values_out_of_range_naming_the_field() -> None:
    with pytest.raises(ValueError, match="repeats: expected >= 1, got 0"):
        DenseOptions(repeats=0)
    with pytest.raises(ValueError, match=r"native_extra_ms: expected >= 0, got -0\.1"):
        DenseOptions(native_extra_ms=-0.1)
