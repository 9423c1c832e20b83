"""The training fast path's 1×1 convolution: every implementation of each product is as close
to float64 as torch's, the chooser picks among them, and the path is used only where it applies."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from tensor_checks import rel_err
from torch import nn

import resnext
from resnext.speed import (
    autotune,
    pointwise_fma,
    pointwise_gemm,
    pointwise_train,
    pointwise_wgrad_amx,
)
from resnext.speed.pointwise_train import (
    TrainingPointwiseConv2d,
    gemm_weight_grad,
    use_gemm_weight_grad,
    use_plain_pointwise_conv,
)

# (batch, in channels, out channels, height, width, stride): odd and unequal sizes, batch 1.
SHAPES = [(2, 16, 24, 7, 5, 1), (3, 8, 32, 9, 6, 2), (1, 32, 16, 5, 5, 2), (4, 24, 8, 3, 3, 1)]


def _cl(t: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return t.to(dtype).contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gemm_weight_gradient_matches_torch_in_float64(shape, dtype) -> None:
    n, cin, cout, h, w, stride = shape
    g = torch.Generator().manual_seed(sum(shape))
    x = _cl(torch.randn(n, cin, h, w, generator=g), dtype)
    weight = torch.randn(cout, cin, 1, 1, generator=g, dtype=torch.float64)
    out = F.conv2d(x.double(), weight, None, stride)
    grad = _cl(torch.randn(out.shape, generator=g), dtype)
    # Reference: torch's own convolution backward on the same (rounded) values, in float64.
    _, want, _ = torch.ops.aten.convolution_backward(
        grad.double(), x.double(), weight, None, [stride] * 2, [0, 0], [1, 1], False, [0, 0], 1,
        [False, True, False],
    )  # fmt: skip
    got = gemm_weight_grad(x, grad, stride)
    assert got.shape == (cout, cin, 1, 1) and got.dtype == dtype
    assert rel_err(got, want) < (2e-6 if dtype == torch.float32 else 8e-3)


def _pair(cin: int = 32, cout: int = 48, seed: int = 0) -> tuple[nn.Conv2d, nn.Conv2d]:
    torch.manual_seed(seed)
    plain = nn.Conv2d(cin, cout, 1, bias=False)
    fast = copy.deepcopy(plain)
    assert use_gemm_weight_grad(fast) == 1
    return plain, fast


def _grads(conv: nn.Module, x: torch.Tensor, dtype: torch.dtype | None) -> tuple[torch.Tensor, ...]:
    x = x.detach().clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        y = conv(x)
    upstream = torch.randn(y.shape, generator=torch.Generator().manual_seed(9)).to(y.dtype)
    y.backward(upstream.contiguous(memory_format=torch.channels_last))
    out = (y.detach(), x.grad, conv.weight.grad)
    conv.weight.grad = None
    return out


OUR_PRODUCT = pointwise_gemm.unavailable_reason() is None


def _assert_as_close_to_float64_as_torch(
    x: torch.Tensor, weight: torch.Tensor, stride: int, fast: tuple, plain: tuple
) -> None:
    """(output, input grad, weight grad) of the fast path within 1.5× torch's bf16 error (or 1e-3)
    of float64 on the bf16-rounded operands autocast computes with; upstream as in `_grads`."""
    xr = x.to(torch.bfloat16).double().requires_grad_(True)
    wr = weight.detach().to(torch.bfloat16).double().requires_grad_(True)
    y64 = F.conv2d(xr, wr, None, stride)
    upstream = torch.randn(y64.shape, generator=torch.Generator().manual_seed(9))
    y64.backward(upstream.to(torch.bfloat16).double())
    for got, torch_bf16, want in zip(fast, plain, (y64.detach(), xr.grad, wr.grad), strict=True):
        assert rel_err(got, want) <= max(1.5 * rel_err(torch_bf16, want), 1e-3)


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("channels", [(32, 48), (64, 128)])
@pytest.mark.parametrize("path", ["onednn", "gemm", "ours"])
def test_module_under_bf16_autocast_is_as_close_to_float64_as_torch(
    stride, channels, path, monkeypatch
) -> None:
    cin, cout = channels
    if path == "ours" and not OUR_PRODUCT:
        pytest.skip(f"our 1×1 product is unavailable here: {pointwise_gemm.unavailable_reason()}")
    plain, fast = _pair(cin, cout)
    plain.stride = fast.stride = (stride, stride)
    seen = []
    for module, name in (
        (pointwise_train, "gemm_weight_grad"),
        (pointwise_gemm, "matmul_channels"),
        (pointwise_gemm, "weight_grad"),
    ):
        fn = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _fn=fn, _n=name: seen.append(_n) or _fn(*a))
    x = _cl(torch.randn(4, cin, 9, 7, generator=torch.Generator().manual_seed(1)))
    plain.train(), fast.train()
    y_p, dx_p, dw_p = _grads(plain, x, torch.bfloat16)
    with autotune.CHOOSER.prefer(path):
        y_f, dx_f, dw_f = _grads(fast, x, torch.bfloat16)
    # Ops that do not offer the pinned path run oneDNN's: ours needs multiples of 64 channels
    # (at stride 2 its forward reads the gathered pixels and its input gradient is spread back).
    ours_product = path == "ours" and cin % 64 == 0
    want = {
        "onednn": [],
        "gemm": ["gemm_weight_grad"],
        "ours": (["matmul_channels"] * 2 if ours_product else [])
        + (["weight_grad"] if cin % 64 == 0 else []),
    }[path]
    assert sorted(seen) == sorted(want)
    assert dx_f.dtype == torch.float32 and dw_f.dtype == torch.float32
    _assert_as_close_to_float64_as_torch(
        x, plain.weight, stride, (y_f, dx_f, dw_f), (y_p, dx_p, dw_p)
    )


FMA = pointwise_fma.unavailable_reason()


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("path", ["onednn", "gemm", "ours-fma"])
def test_module_in_float32_equals_torch(stride: int, path: str, monkeypatch) -> None:
    if path == "ours-fma" and FMA is not None:
        pytest.skip(f"our FMA product is unavailable here: {FMA}")
    plain, fast = _pair(32, 48, seed=4)
    plain.stride = fast.stride = (stride, stride)
    seen, fma = [], []
    fn = pointwise_train.gemm_weight_grad
    monkeypatch.setattr(pointwise_train, "gemm_weight_grad", lambda *a: seen.append(1) or fn(*a))
    product = pointwise_train.fma_product
    monkeypatch.setattr(pointwise_train, "fma_product", lambda *a: fma.append(1) or product(*a))
    x = _cl(torch.randn(3, 32, 7, 9, generator=torch.Generator().manual_seed(2)))
    plain.train(), fast.train()
    want = _grads(plain, x, None)
    with autotune.CHOOSER.prefer(path):
        got = _grads(fast, x, None)
    assert len(seen) == (path == "gemm")  # the float32 weight gradient took the pinned path
    # ours: the forward at any stride, the input gradient (a product with wᵀ) at stride 1
    assert len(fma) == (0 if path != "ours-fma" else 2 if stride == 1 else 1)
    for g, w in zip(got, want, strict=True):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def test_the_chooser_times_every_product_once_per_shape() -> None:
    plain, fast = _pair(64, 64, seed=3)
    x = _cl(torch.randn(2, 64, 6, 5, generator=torch.Generator().manual_seed(5)))
    chooser = autotune.Chooser()
    fast.train()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(autotune, "CHOOSER", chooser)
        first = _grads(fast, x, torch.bfloat16)
        second = _grads(fast, x, torch.bfloat16)
    ops = sorted(d.op for d in chooser.decisions())
    assert ops == ["conv1x1.forward", "conv1x1.input_grad", "conv1x1.weight_grad"]
    names = {d.op: set(d.ms) for d in chooser.decisions()}
    ours = {"ours"} if OUR_PRODUCT else set()
    amx = {"ours-amx"} if pointwise_wgrad_amx.unavailable_reason() is None else set()
    for op in ("conv1x1.forward", "conv1x1.input_grad"):
        assert names[op] == {"onednn", "gemm"} | ours, op
    assert names["conv1x1.weight_grad"] == {"onednn", "gemm"} | ours | amx
    for a, b in zip(first, second, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)  # the same winner both times
    _assert_as_close_to_float64_as_torch(
        x, plain.weight, 1, first, _grads(plain, x, torch.bfloat16)
    )


@pytest.mark.parametrize("case", ["eval", "float64", "nchw", "frozen", "traced"])
def test_falls_back_to_the_plain_conv_where_the_gemm_does_not_apply(case, monkeypatch) -> None:
    def fail(*args):
        raise AssertionError("the GEMM path was taken")

    monkeypatch.setattr(pointwise_train, "gemm_weight_grad", fail)
    plain, fast = _pair()
    x = _cl(torch.randn(2, 32, 6, 6))
    dtype: torch.dtype | None = torch.bfloat16
    if case == "eval":
        plain.eval(), fast.eval()
    elif case == "float64":
        plain.double(), fast.double()
        x, dtype = x.double(), None
    elif case == "nchw":
        x = x.contiguous()
    elif case == "frozen":
        plain.weight.requires_grad_(False), fast.weight.requires_grad_(False)
    if case == "traced":
        # bf16 weights and input: outside tracing, the GEMM path would take them.
        fast.to(torch.bfloat16), plain.to(torch.bfloat16)
        xb = x.to(torch.bfloat16)
        traced = torch.jit.trace(fast, xb, check_trace=False)
        assert "PythonOp" not in str(traced.graph)  # no custom autograd function was recorded
        torch.testing.assert_close(traced(xb), plain(xb))
        return
    if case == "frozen":
        with torch.autocast("cpu", dtype=torch.bfloat16):
            torch.testing.assert_close(fast(x), plain(x))
        return
    for got, want in zip(_grads(fast, x, dtype), _grads(plain, x, dtype), strict=True):
        torch.testing.assert_close(got, want)


def test_resnext50_swaps_every_pointwise_conv_and_keeps_its_keys() -> None:
    model = resnext.create_model("resnext50_32x4d")
    keys = list(model.state_dict())
    # Table 1: 3 + 4 + 6 + 3 = 16 blocks with two 1×1 convolutions each, and one projection
    # shortcut (1×1) per stage.
    assert use_gemm_weight_grad(model) == 16 * 2 + 4
    assert list(model.state_dict()) == keys
    assert sum(isinstance(m, TrainingPointwiseConv2d) for m in model.modules()) == 36
    assert use_plain_pointwise_conv(model) == 36
    assert not any(isinstance(m, TrainingPointwiseConv2d) for m in model.modules())


def test_convs_the_gemm_does_not_take_are_left_alone() -> None:
    model = nn.Sequential(
        nn.Conv2d(8, 8, 1, bias=True),  # bias
        nn.Conv2d(8, 8, 1, groups=2, bias=False),  # grouped
        nn.Conv2d(8, 8, 3, padding=1, bias=False),  # 3×3
        nn.Conv2d(8, 8, 1, padding=1, bias=False),  # padded
    )
    assert use_gemm_weight_grad(model) == 0


def _block_grads(block: nn.Module, x: torch.Tensor, seed: int = 7) -> tuple[torch.Tensor, ...]:
    x = x.detach().clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=x.dtype == torch.bfloat16):
        y = block(x)
    upstream = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed)).to(y.dtype)
    y.backward(upstream.contiguous(memory_format=torch.channels_last))
    grads = [x.grad] + [p.grad for p in block.parameters()]
    block.zero_grad(set_to_none=True)
    return (y.detach(), *grads)


def _bottleneck(projection: bool = False) -> nn.Module:
    from resnext.models.blocks import BlockGeometry, Bottleneck

    torch.manual_seed(11)
    # identity shortcut (in = out, stride 1), or a stride-2 projection to 128 channels
    geo = (
        BlockGeometry(64, 64, 128, 4, 2, False)
        if projection
        else BlockGeometry(64, 64, 64, 4, 1, False)
    )
    block = Bottleneck(geo, residual=True, avg_down=False, se_reduction=0)
    for bn in (block.bn1, block.bn2, block.bn3):  # non-trivial affine parameters
        nn.init.uniform_(bn.weight, 0.5, 1.5), nn.init.uniform_(bn.bias, -0.2, 0.2)
    return block.to(memory_format=torch.channels_last).train()


@pytest.mark.parametrize("path", ["onednn", "gemm", "ours"])
@pytest.mark.parametrize("projection", [False, True])
def test_block_sums_both_input_gradients_in_the_fork(path, projection, monkeypatch) -> None:
    if path == "ours" and not OUR_PRODUCT:
        pytest.skip(f"our 1×1 product is unavailable here: {pointwise_gemm.unavailable_reason()}")
    plain = _bottleneck(projection)
    fast = copy.deepcopy(plain)
    use_gemm_weight_grad(fast)
    forks, residuals = [], []
    fork = pointwise_train._PointwiseConvFork.apply
    monkeypatch.setattr(
        pointwise_train._PointwiseConvFork, "apply", lambda *a: forks.append(1) or fork(*a)
    )
    conv = pointwise_gemm.conv1x1
    monkeypatch.setattr(
        pointwise_gemm,
        "conv1x1",
        lambda *a, **k: residuals.append(a[4] is not None) or conv(*a, **k),
    )
    # bf16 activations, as the block gets them from the previous block under autocast.
    x = _cl(torch.randn(2, 64, 7, 6, generator=torch.Generator().manual_seed(3)), torch.bfloat16)
    want = _block_grads(copy.deepcopy(plain).double(), x.double())
    base = _block_grads(plain, x)
    with autotune.CHOOSER.prefer(path):
        got = _block_grads(fast, x)
    assert forks == [1]
    # ours: the fork's input gradient is the one conv1x1 call, the shortcut's gradient added in
    assert residuals == ([True] if path == "ours" else [])
    # The input's gradient is the sum of the conv1 path's and the shortcut's: a fork that
    # dropped either would be off by the whole of one of them.
    for g, b, w in zip(got, base, want, strict=True):
        assert rel_err(g, w) <= max(1.5 * rel_err(b, w), 2e-3)


@pytest.mark.parametrize("case", ["eval", "stride", "float32_input", "frozen"])
def test_fork_is_plain_where_it_does_not_apply(case, monkeypatch) -> None:
    def fail(*args):
        raise AssertionError("the fork's autograd function was used")

    monkeypatch.setattr(pointwise_train._PointwiseConvFork, "apply", fail)
    _, fast = _pair(64, 64)
    x = _cl(torch.randn(2, 64, 6, 6), torch.bfloat16)
    fast.train()
    if case == "eval":
        fast.eval()
    elif case == "stride":
        fast.stride = (2, 2)
    elif case == "float32_input":
        x = x.float()  # autocast would compute in bf16: the shortcut must keep x as it is
    elif case == "frozen":
        fast.weight.requires_grad_(False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, shortcut = fast.fork(x)
        want = fast(x)
    assert shortcut is x
    torch.testing.assert_close(y, want)


@pytest.mark.skipif(FMA is not None, reason=f"our FMA product is unavailable here: {FMA}")
def test_float32_block_sums_the_shortcuts_gradient_inside_our_fma_product(monkeypatch) -> None:
    plain = _bottleneck(projection=False).double()
    fast = copy.deepcopy(plain).float()
    use_gemm_weight_grad(fast)
    adds = []
    product = pointwise_train.fma_product
    monkeypatch.setattr(
        pointwise_train,
        "fma_product",
        lambda x, w, s, add=None: adds.append(add is not None) or product(x, w, s, add),
    )
    x = torch.randn(2, 64, 7, 6, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    want = _block_grads(plain, _cl(x, torch.float64))
    with autotune.CHOOSER.prefer("ours-fma"):
        got = _block_grads(fast, _cl(x))
    # conv1 (the fork) and conv3 forward and input gradients; one input gradient adds the
    # shortcut's gradient as it writes, which a dropped term would leave off by all of it
    assert sorted(adds) == [False, False, False, True]
    for g, w in zip(got, want, strict=True):
        assert g.dtype == torch.float32
        assert rel_err(g, w) < 1e-5
