"""The training fast path's grouped 3×3 convolution equals torch's, forward and both gradients, on
every implementation the chooser can pick."""

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
    grouped_amx,
    grouped_dgrad,
    grouped_dgrad_amx,
    grouped_kernel,
    grouped_train,
    grouped_wgrad,
    grouped_wgrad_amx,
)
from resnext.speed.capability import cpu_flags
from resnext.speed.grouped_train import (
    TrainingGroupedConv2d,
    transposed_weight,
    use_grouped_kernels,
    use_plain_grouped_conv,
)

REASON = grouped_wgrad.unavailable_reason() or grouped_kernel.unavailable_reason(torch.float32)
needs_kernels = pytest.mark.skipif(REASON is not None, reason=f"kernels unavailable: {REASON}")
BF16_REASON = grouped_kernel.unavailable_reason(torch.bfloat16)
AMX = grouped_amx.unavailable_reason() is None and grouped_wgrad_amx.unavailable_reason() is None
DGRAD_AMX = grouped_dgrad_amx.unavailable_reason() is None
# Whether groups of 16 or more channels are taken in bf16 by the AVX-512 build's pair kernels.
WIDE_BF16 = REASON is None and BF16_REASON is None and grouped_wgrad.wide_takes(torch.bfloat16)
# Whether such groups are taken at all: by the AMX kernels or the pair kernels (bf16), or by the
# AVX2 build of the vector kernels (float32) where that is the build this CPU runs.
WIDE = AMX or WIDE_BF16 or (REASON is None and grouped_kernel.ISA.name == "avx2")

# (batch, channels, groups, height, width, stride): 4 and 8 channels per group, odd and unequal
# sizes so that every border case of the padding is met, batch 1 and several threads' rows.
SHAPES = [
    (2, 32, 8, 7, 5, 1),
    (3, 64, 8, 8, 6, 2),
    (1, 16, 4, 5, 5, 2),
    (2, 32, 4, 9, 9, 1),
    (2, 48, 12, 7, 7, 2),
    (1, 128, 32, 6, 11, 1),
]


def _cl(t: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return t.to(dtype).contiguous(memory_format=torch.channels_last)


def _dtypes() -> list[torch.dtype]:
    return [torch.float32] + ([torch.bfloat16] if BF16_REASON is None else [])


@needs_kernels
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", _dtypes())
def test_weight_gradient_matches_torch_in_float64(shape, dtype) -> None:
    _check_weight_gradient(shape, dtype)


@needs_kernels
@pytest.mark.skipif(BF16_REASON is not None, reason=f"no bf16 kernels: {BF16_REASON}")
@pytest.mark.parametrize("shape", [s for s in SHAPES if s[1] % 32 == 0])
def test_bf16_weight_gradient_without_the_pair_dot_product(shape, monkeypatch) -> None:
    # These shapes take the AVX512-BF16 pair kernel here; CPUs without it run the widening one.
    assert grouped_wgrad.has_avx512_bf16()
    monkeypatch.setattr(grouped_wgrad, "has_avx512_bf16", lambda: False)
    _check_weight_gradient(shape, torch.bfloat16)


def _check_weight_gradient(shape: tuple[int, ...], dtype: torch.dtype) -> None:
    n, c, groups, h, w, stride = shape
    g = torch.Generator().manual_seed(sum(shape))
    x = _cl(torch.randn(n, c, h, w, generator=g), dtype)
    weight = torch.randn(c, c // groups, 3, 3, generator=g, dtype=torch.float64)
    out = F.conv2d(x.double(), weight, None, stride, 1, 1, groups)
    grad = _cl(torch.randn(out.shape, generator=g), dtype)
    # Reference: torch's own convolution backward on the same (rounded) values, in float64.
    want = torch.ops.aten.convolution_backward(
        grad.double(), x.double(), weight, None, [stride] * 2, [1, 1], [1, 1], False, [0, 0],
        groups, [False, True, False],
    )[1]  # fmt: skip
    got = grouped_wgrad.weight_grad(x, grad, groups, stride)
    assert got.dtype == torch.float32 and got.shape == weight.shape
    assert rel_err(got, want) < 1e-5  # float32 sums of exact products


# Groups of 16, 32 and 64 channels in bf16 (the pair kernel's small matrix products).
WIDE_SHAPES_BF16 = [
    (2, 64, 4, 9, 7, 1),  # 16 per group: two groups a 64-byte line, odd width
    (3, 64, 2, 8, 6, 2),  # 32 per group, stride 2
    (1, 128, 2, 5, 5, 1),  # 64 per group: a group over two lines
    (2, 64, 4, 7, 9, 2),  # stride 2, odd sizes: a last pixel pair of one pixel
    (4, 32, 2, 16, 7, 1),  # several blocks of rows an image
    (2, 512, 32, 28, 28, 2),  # ResNeXt-50 stage 3's first block, fewer images
]


@needs_kernels
@pytest.mark.skipif(not WIDE_BF16, reason="this CPU's build takes no wide groups in bf16")
@pytest.mark.parametrize("shape", WIDE_SHAPES_BF16)
def test_bf16_weight_gradient_of_wide_groups_matches_torch(shape) -> None:
    _check_weight_gradient(shape, torch.bfloat16)


@needs_kernels
@pytest.mark.skipif(not WIDE_BF16, reason="this CPU's build takes no wide groups in bf16")
def test_wide_groups_in_bf16_have_the_pair_kernel_only() -> None:
    x = _cl(torch.randn(1, 32, 4, 4), torch.bfloat16)
    with pytest.raises(ValueError, match=r"pairs: 16 channels per group in bf16 take the pair"):
        grouped_wgrad.weight_grad(x, x, groups=2, stride=1, pairs=False)
    # float32 with wide groups: the AVX2 build's only
    with pytest.raises(ValueError, match=r"x: expected .*C/groups in \(4, 8\)"):
        grouped_wgrad.weight_grad(x.float(), x.float(), groups=2, stride=1)
    # 48 channels in groups of 16: not whole 32-channel lines
    assert not grouped_wgrad.supports(48, 3, 1, torch.bfloat16)
    x48 = _cl(torch.randn(1, 48, 4, 4), torch.bfloat16)
    with pytest.raises(ValueError, match=r"x: expected .*got \(1, 48, 4, 4\)"):
        grouped_wgrad.weight_grad(x48, x48, groups=3, stride=1)


@needs_kernels
@pytest.mark.skipif(not WIDE_BF16, reason="this CPU's build has no bf16 pair weight gradient")
@pytest.mark.parametrize("cpg", [4, 16])
def test_bf16_pair_weight_gradient_keeps_an_infinity_to_the_taps_that_read_it(cpg: int) -> None:
    # An odd width: the last pixel pair has one pixel; its partner (the infinity's column) must
    # not reach the taps whose windows never include that column.
    g = torch.Generator().manual_seed(cpg)
    x = torch.randn(1, 64, 5, 7, generator=g)
    x[0, :, 2, 6] = float("inf")
    x = _cl(x, torch.bfloat16)
    grad = _cl(torch.randn(1, 64, 5, 7, generator=g), torch.bfloat16)
    want = torch.ops.aten.convolution_backward(
        grad.double(), x.double(), torch.zeros(64, cpg, 3, 3, dtype=torch.float64), None,
        [1, 1], [1, 1], [1, 1], False, [0, 0], 64 // cpg, [False, True, False],
    )[1]  # fmt: skip
    got = grouped_wgrad.weight_grad(x, grad, 64 // cpg, 1)
    finite = torch.isfinite(want)
    assert finite.any() and not finite.all()
    assert torch.equal(torch.isfinite(got), finite)
    assert rel_err(got[finite], want[finite]) < 1e-5


def test_weight_gradient_refuses_what_it_does_not_take() -> None:
    x48 = _cl(torch.randn(1, 48, 4, 4))  # 12 channels per group: no build takes it
    with pytest.raises(ValueError, match=r"x: expected .*C/groups in \(4, 8"):
        grouped_wgrad.weight_grad(x48, torch.randn(1, 48, 4, 4), groups=4, stride=1)
    x = _cl(torch.randn(1, 32, 4, 4))
    with pytest.raises(ValueError, match=r"x: expected .*gradient of the same dtype"):
        grouped_wgrad.weight_grad(x, torch.randn(1, 32, 4, 4).double(), groups=8, stride=1)
    with pytest.raises(ValueError, match=r"grad: expected shape \(1, 32, 2, 2\)"):
        grouped_wgrad.weight_grad(x, torch.randn(1, 32, 4, 4), groups=8, stride=2)
    with pytest.raises(ValueError, match=r"x: expected float32.*got \(1, 32, 4, 4\) torch.float64"):
        grouped_wgrad.weight_grad(x.double(), torch.randn(1, 32, 4, 4).double(), 8, 1)


AVX2_MISSING = grouped_kernel.AVX2.cpu_needs - cpu_flags()


# Groups of 16, 32 and 64 channels, which only the AVX2 build takes (as small matrix products),
# at both strides; the last has more output rows than one chunk of the kernel (a partial one too).
WIDE_SHAPES = [
    (2, 64, 4, 9, 7, 1),
    (3, 64, 2, 8, 6, 2),
    (1, 128, 2, 5, 5, 1),
    (4, 32, 2, 16, 7, 1),
]


@pytest.mark.skipif(bool(AVX2_MISSING), reason=f"the AVX2 build needs {sorted(AVX2_MISSING)}")
@pytest.mark.parametrize("shape", [*SHAPES, (2, 24, 6, 5, 7, 1), (1, 40, 5, 6, 6, 2), *WIDE_SHAPES])
def test_the_avx2_build_of_the_weight_gradient(shape, monkeypatch) -> None:
    # Also on AVX-512 CPUs, which run it where made the module's build; 24 and 40 channels are
    # blocks of 8 that only this build takes.
    monkeypatch.setattr(grouped_kernel, "ISA", grouped_kernel.AVX2)
    if grouped_wgrad.unavailable_reason() is not None:
        pytest.skip(f"AVX2 weight gradient unavailable: {grouped_wgrad.unavailable_reason()}")
    _check_weight_gradient(shape, torch.float32)
    assert "float32 only" in str(grouped_wgrad.unavailable_reason(torch.bfloat16))
    x = _cl(torch.randn(1, 32, 4, 4), torch.bfloat16)
    with pytest.raises(ValueError, match=r"x: expected float32 with C % 8 == 0"):
        grouped_wgrad.weight_grad(x, x, groups=8, stride=1)


@pytest.mark.skipif(bool(AVX2_MISSING), reason=f"the AVX2 build needs {sorted(AVX2_MISSING)}")
@pytest.mark.parametrize("shape", WIDE_SHAPES[:2])
def test_wide_groups_train_on_the_avx2_build(shape, monkeypatch) -> None:
    monkeypatch.setattr(grouped_kernel, "ISA", grouped_kernel.AVX2)
    if grouped_wgrad.unavailable_reason() or grouped_kernel.unavailable_reason(torch.float32):
        pytest.skip("the AVX2 builds are unavailable here")
    n, c, groups, h, w, stride = shape
    torch.manual_seed(sum(shape))
    plain = nn.Conv2d(c, c, 3, stride, 1, groups=groups, bias=False)
    fast = copy.deepcopy(plain)
    assert use_grouped_kernels(fast) == 1  # 16 or more channels per group: taken on AVX2
    x = _cl(torch.randn(n, c, h, w))
    grad = _cl(torch.randn(n, c, (h - 1) // stride + 1, (w - 1) // stride + 1))
    ref = _step(copy.deepcopy(plain).double(), x.double(), grad.double(), amp=False)
    calls = []
    fn = grouped_wgrad.weight_grad
    monkeypatch.setattr(grouped_wgrad, "weight_grad", lambda *a: calls.append(1) or fn(*a))
    with autotune.CHOOSER.prefer("ours"):
        got = _step(fast, x, grad, amp=False)
    assert calls == [1]
    for key, want in ref.items():
        assert rel_err(got[key], want) < 2e-6, key


def test_transposed_weight_maps_the_output_gradient_to_the_input_gradient() -> None:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 24, 6, 5, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(24, 4, 3, 3, generator=g, dtype=torch.float64)
    out = F.conv2d(x, weight, None, 1, 1, 1, 6)
    grad = torch.randn(out.shape, generator=g, dtype=torch.float64)
    out.backward(grad)
    via_transpose = F.conv2d(grad, transposed_weight(weight, 6), None, 1, 1, 1, 6)
    torch.testing.assert_close(via_transpose, x.grad)


def _step(conv: nn.Conv2d, x: torch.Tensor, grad: torch.Tensor, amp: bool) -> dict:
    x = x.detach().clone().requires_grad_()
    conv.weight.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
        out = conv(x)
    out.backward(grad.to(out.dtype))
    return {"out": out.detach(), "dx": x.grad, "dweight": conv.weight.grad}


@needs_kernels
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("amp", [False, True] if BF16_REASON is None else [False])
@pytest.mark.parametrize("path", ["ours", "ours-pairs", None])
def test_module_forward_and_gradients_match_torch(shape, amp, path, monkeypatch) -> None:
    _check_module(shape, amp, path, monkeypatch)


@needs_kernels
@pytest.mark.skipif(not WIDE_BF16, reason="this CPU's build takes no wide groups in bf16")
@pytest.mark.parametrize("shape", WIDE_SHAPES_BF16[:4])
@pytest.mark.parametrize("path", ["ours-pairs", None])
def test_module_with_wide_groups_in_bf16_matches_torch(shape, path, monkeypatch) -> None:
    # 16-64 channels per group: taken in bf16 only, every product by a pair kernel or oneDNN
    _check_module(shape, True, path, monkeypatch)


def _check_module(shape: tuple[int, ...], amp: bool, path: str | None, monkeypatch) -> None:
    n, c, groups, h, w, stride = shape
    if path == "ours-pairs" and not (amp and c % 32 == 0 and grouped_wgrad.has_avx512_bf16()):
        pytest.skip("the pair kernels take bf16 with C % 32 == 0 on AVX512-BF16 CPUs")
    torch.manual_seed(sum(shape))
    plain = nn.Conv2d(c, c, 3, stride, 1, groups=groups, bias=False)
    fast = copy.deepcopy(plain)
    assert use_grouped_kernels(fast) == 1
    x = _cl(torch.randn(n, c, h, w))
    grad = _cl(torch.randn(n, c, (h - 1) // stride + 1, (w - 1) // stride + 1))
    ref = _step(copy.deepcopy(plain).double(), x.double(), grad.double(), amp=False)
    calls = []
    for module, name in (
        (grouped_kernel, "run_kernel"),
        (grouped_wgrad, "weight_grad"),
        (grouped_dgrad, "input_grad"),
    ):
        fn = getattr(module, name)
        monkeypatch.setattr(
            module, name, lambda *a, _fn=fn, _n=name, **k: calls.append(_n) or _fn(*a, **k)
        )
    if path is None:  # chosen by timing, as in training
        monkeypatch.setattr(autotune, "CHOOSER", autotune.Chooser())
        got = _step(fast, x, grad, amp)
        # each of the three products has candidates besides oneDNN (at stride 2 the phases)
        assert len(autotune.decisions()) == 3
    else:
        # at stride 2 the input gradient is the same kernels' phases
        with autotune.CHOOSER.prefer(path, f"{path}-phases"):
            got = _step(fast, x, grad, amp)
        # The forward and the weight gradient are ours, and the input gradient: a forward call at
        # stride 1, the phases at 2 (the pair forwards take 4, 8, 16, 32 and 64 channels per
        # group, the pair weight gradient 4 and 8).
        pairs = grouped_kernel.takes_pairs(c, groups, torch.bfloat16)
        ours = path == "ours" or pairs
        forwards = 1 + (stride == 1) if ours else 0
        phases = ["input_grad"] if ours and stride == 2 else []
        assert sorted(calls) == sorted(["run_kernel"] * forwards + phases + ["weight_grad"])
    assert got["dweight"].dtype == torch.float32  # the parameter's dtype, as with plain autocast
    assert got["out"].dtype == (torch.bfloat16 if amp else torch.float32)
    if not amp:
        for key, want in ref.items():
            assert rel_err(got[key], want) < 2e-6, key
        return
    # bf16: the fast path must be as close to float64 as torch's own bf16 path is.
    base = _step(plain, x, grad, amp)
    for key, want in ref.items():
        assert rel_err(got[key], want) <= 1.5 * rel_err(base[key], want) + 1e-3, key


@needs_kernels
def test_input_without_gradient_and_frozen_weight() -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(32, 32, 3, 1, 1, groups=8, bias=False)
    use_grouped_kernels(conv)
    x = _cl(torch.randn(2, 32, 5, 5))
    conv(x).sum().backward()  # x needs no gradient: only the weight's is computed
    assert conv.weight.grad is not None
    conv.weight.requires_grad_(False)
    x.requires_grad_()
    conv(x).sum().backward()
    assert x.grad is not None and conv.weight.grad is not None


def _kernels_forbidden(monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("a fast-path kernel was called")

    monkeypatch.setattr(grouped_wgrad, "weight_grad", refuse)
    monkeypatch.setattr(grouped_kernel, "run_kernel", refuse)


@pytest.mark.parametrize("case", ["eval", "nchw", "float64", "tracing", "compiling"])
def test_falls_back_to_plain_conv(case, monkeypatch) -> None:
    torch.manual_seed(1)
    plain = nn.Conv2d(32, 32, 3, 1, 1, groups=8, bias=False)
    fast = copy.deepcopy(plain)
    use_grouped_kernels(fast)
    x = _cl(torch.randn(2, 32, 6, 6))
    if case == "eval":
        plain.eval(), fast.eval()
    if case == "nchw":
        x = x.contiguous()
    if case == "float64":
        plain.double(), fast.double()
        x = x.double()
    if case == "compiling":
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    _kernels_forbidden(monkeypatch)
    if case == "tracing":
        fast = torch.jit.trace(fast, x, check_trace=False)
    torch.testing.assert_close(fast(x), plain(x))
    if case not in ("eval", "tracing"):
        fast(x).sum().backward()  # the backward is torch's too


def test_swap_takes_exactly_the_grouped_convs_it_can_run_and_keeps_keys() -> None:
    model = resnext.create_model("resnext50_32x4d")
    keys = list(model.state_dict())
    # Table 1: 32 groups of 4 channels in stage 1 (3 blocks), of 8 in stage 2 (4 blocks); stages
    # 3 and 4 (6 and 3 blocks) have 16 and 32 channels per group, which only the AMX kernels and
    # the AVX2 build take.
    stages = ("layer1.", "layer2.", "layer3.", "layer4.") if WIDE else ("layer1.", "layer2.")
    count = 3 + 4 + (6 + 3 if WIDE else 0)
    assert use_grouped_kernels(model) == count
    swapped = [n for n, m in model.named_modules() if isinstance(m, TrainingGroupedConv2d)]
    assert all(n.startswith(stages) and n.endswith("conv2") for n in swapped)
    assert {n.split(".")[0] + "." for n in swapped} == set(stages)
    assert list(model.state_dict()) == keys
    assert use_plain_grouped_conv(model) == count
    assert not any(isinstance(m, TrainingGroupedConv2d) for m in model.modules())
    dense = nn.Conv2d(32, 32, 3, 1, 1, bias=False)
    assert not grouped_train.takes_module(dense)


@needs_kernels
def test_network_training_step_matches_the_plain_step() -> None:
    torch.manual_seed(2)
    spec = resnext.create_model("resnext_tiny", cardinality=4, base_width=4, num_classes=4)
    plain = spec.to(memory_format=torch.channels_last)
    fast = copy.deepcopy(plain)
    # stages 1 and 2 (4 per group), and with AMX or on AVX2 stage 3 (16 per group; with AMX in
    # bf16 only: torch's convolution in this float32 step)
    assert use_grouped_kernels(fast) == 2 + WIDE
    x = _cl(torch.randn(4, 3, 12, 12))
    y = torch.tensor([0, 1, 2, 3])
    for model in (plain, fast):
        F.cross_entropy(model(x), y).backward()
    for (name, a), (_, b) in zip(plain.named_parameters(), fast.named_parameters(), strict=True):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-5, msg=name)


@needs_kernels
@pytest.mark.skipif(BF16_REASON is not None, reason=f"no bf16 kernels: {BF16_REASON}")
@pytest.mark.parametrize("cpg,stride", [(16, 1), (32, 2), (64, 1)])
def test_wide_group_bf16_forward_candidates_compute_the_same_convolution(
    cpg: int, stride: int
) -> None:
    # The training forward (and the stride-1 input gradient, a convolution too) is timed among
    # these; for 16-64 channels per group the pair kernel is one of them on AVX512-BF16 CPUs.
    groups = 128 // cpg
    torch.manual_seed(cpg)
    x = _cl(torch.randn(2, 128, 7, 9), torch.bfloat16)
    w = torch.randn(128, cpg, 3, 3).to(torch.bfloat16)
    candidates = grouped_train.conv_candidates(x, w, groups, stride)
    assert "ours-pairs" in candidates
    want = F.conv2d(x.double(), w.double(), None, stride, 1, 1, groups)
    for name, run in candidates.items():
        with torch.no_grad():
            assert rel_err(run(), want) < 2**-7, name
