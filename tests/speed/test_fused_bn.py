"""The training fast path's fused batch norm (+ ReLU, + residual) equals torch's ops, forward and backward."""

from __future__ import annotations

import copy

import pytest
import torch
from builds import use_build
from tensor_checks import rel_err
from torch import nn

import resnext
from resnext.config import load_config
from resnext.errors import ConfigError
from resnext.models.layers import norm_act
from resnext.speed import bn_kernel
from resnext.speed.fused_bn import FusedBatchNorm2d, use_fused_batchnorm, use_plain_batchnorm

REASON = bn_kernel.unavailable_reason()
needs_kernel = pytest.mark.skipif(REASON is not None, reason=f"bn kernel unavailable: {REASON}")

# channel counts that take every chunk of the sums (128 + 64 + 16 + a tail), rows past a block
# Rows and channels chosen to reach both ways of summing, several blocks of rows each, and
# channel counts that leave a partial 8- and 16-channel block.
SHAPES = [
    (4, 64, 8, 8), (2, 40, 5, 7), (3, 1000, 1, 2), (1, 17, 3, 3), (2, 216, 9, 11), (2, 300, 5, 7),
]  # fmt: skip
MODES = [(False, True), (True, True), (False, False), (True, False)]  # (residual, relu)


def _cl(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t.to(dtype).contiguous(memory_format=torch.channels_last)


def _results(
    out: torch.Tensor, x: torch.Tensor, residual: torch.Tensor | None, bn: nn.BatchNorm2d
) -> dict[str, torch.Tensor]:
    """The output, every gradient and the running statistics after one forward and backward."""
    result = {
        "out": out.detach(),
        "dx": x.grad,
        "dweight": bn.weight.grad,
        "dbias": bn.bias.grad,
        "running_mean": bn.running_mean,
        "running_var": bn.running_var,
    }
    if residual is not None:
        result["dresidual"] = residual.grad
    return result


def _reference(
    bn: nn.BatchNorm2d,
    x: torch.Tensor,
    residual: torch.Tensor | None,
    relu: bool,
    grad: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """torch's own BN (+ add, ReLU) in float64 on the same values: output and every gradient."""
    ref = copy.deepcopy(bn).double().train()
    x64 = x.detach().double().requires_grad_()
    r64 = None if residual is None else residual.detach().double().requires_grad_()
    out = ref(x64)
    if r64 is not None:
        out = out + r64
    if relu:
        out = torch.relu(out)
    out.backward(grad.double())
    return _results(out, x64, r64, ref)


def _fused(
    bn: nn.BatchNorm2d,
    x: torch.Tensor,
    residual: torch.Tensor | None,
    relu: bool,
    grad: torch.Tensor,
) -> dict[str, torch.Tensor]:
    fused = copy.deepcopy(bn).train()
    assert use_fused_batchnorm(fused) == 1
    xg = x.detach().clone().requires_grad_()
    rg = None if residual is None else residual.detach().clone().requires_grad_()
    out = fused.forward_act(xg, rg, relu)
    assert out.dtype == x.dtype and out.is_contiguous(memory_format=torch.channels_last)
    out.backward(grad)
    return _results(out, xg, rg, fused)


def _bn(channels: int, seed: int) -> nn.BatchNorm2d:
    torch.manual_seed(seed)
    bn = nn.BatchNorm2d(channels)
    bn.weight.data.uniform_(0.5, 1.5)
    bn.bias.data.uniform_(-1.0, 1.0)
    return bn


@pytest.fixture(params=list(bn_kernel.BUILDS.values()), ids=list(bn_kernel.BUILDS))
def build(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> bn_kernel.Build:
    """Each build this CPU runs, made the module's (an AVX-512 CPU also runs the AVX2 build)."""
    chosen: bn_kernel.Build = request.param
    use_build(monkeypatch, bn_kernel, "BUILD", chosen, "bn kernel")
    return chosen


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize(("with_residual", "relu"), MODES)
def test_fused_equals_float64_torch(
    build: bn_kernel.Build,
    dtype: torch.dtype,
    shape: tuple[int, ...],
    with_residual: bool,
    relu: bool,
) -> None:
    if dtype not in build.dtypes:
        pytest.skip(f"the {build.name} build takes {build.dtypes}")
    bn = _bn(shape[1], seed=shape[1])
    x = _cl(torch.randn(shape) * 3 + 2, dtype)
    residual = _cl(torch.randn(shape), dtype) if with_residual else None
    grad = _cl(torch.randn(shape), dtype)
    expected = _reference(bn, x, residual, relu, grad)
    got = _fused(bn, x, residual, relu, grad)
    assert set(got) == set(expected)
    # bf16 tensors hold 8 significant bits: each output and input gradient is one rounding away.
    tol = 1e-5 if dtype == torch.float32 else 8e-3
    for key in ("out", "dx", "dresidual"):
        if key in expected:
            assert rel_err(got[key], expected[key]) < tol, key
    # Parameter gradients and statistics are float32 sums over the batch in either dtype.
    for key in ("dweight", "dbias", "running_mean", "running_var"):
        assert rel_err(got[key], expected[key]) < 1e-5, key
    assert got["dweight"].dtype == torch.float32


@needs_kernel
@pytest.mark.skipif(
    torch.bfloat16 not in bn_kernel.BUILD.dtypes, reason="this CPU's build takes float32 only"
)
def test_bf16_output_rounds_like_torch() -> None:
    """The bf16 output is the float32 result rounded to nearest even, as torch's .to() rounds it."""
    shape = (2, 32, 6, 6)
    bn = _bn(32, seed=3)
    x = _cl(torch.randn(shape), torch.bfloat16)
    fused = copy.deepcopy(bn)
    use_fused_batchnorm(fused)
    got = fused.forward_act(x, None, relu=False)
    mean = x.float().mean((0, 2, 3), keepdim=True)
    var = x.float().var((0, 2, 3), unbiased=False, keepdim=True)
    w, b = bn.weight.view(1, -1, 1, 1), bn.bias.view(1, -1, 1, 1)
    expected = ((x.float() - mean) * torch.rsqrt(var + bn.eps) * w + b).detach()
    mismatched = (got.float() != expected.to(torch.bfloat16).float()).float().mean().item()
    # A value within float32 rounding of a bf16 tie may round either way; nearly all must match.
    assert mismatched < 0.01


@needs_kernel
def test_variance_of_large_offset_channels() -> None:
    """A channel at 1000 ± 0.01 keeps its variance (no cancellation of large squared sums)."""
    x = _cl(1000.0 + 0.01 * torch.randn(8, 16, 12, 12), torch.float32)
    bn = nn.BatchNorm2d(16, momentum=1.0)
    use_fused_batchnorm(bn)
    bn.forward_act(x, None, relu=False)
    expected = x.double().var((0, 2, 3), unbiased=True)
    assert rel_err(bn.running_var, expected) < 1e-3
    assert rel_err(bn.running_mean, x.double().mean((0, 2, 3))) < 1e-6


@needs_kernel
@pytest.mark.parametrize("momentum", [0.1, None])
def test_running_statistics_follow_torch_over_steps(momentum: float | None) -> None:
    plain = _bn(24, seed=5)
    plain.momentum = momentum
    fused = copy.deepcopy(plain)
    use_fused_batchnorm(fused)
    for step in range(3):
        x = _cl(torch.randn(4, 24, 5, 5) * (step + 1) + step, torch.float32)
        plain(x)
        fused(x)
    assert int(fused.num_batches_tracked) == int(plain.num_batches_tracked) == 3
    assert rel_err(fused.running_mean, plain.running_mean) < 1e-5
    assert rel_err(fused.running_var, plain.running_var) < 1e-5


def _kernel_forbidden(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("the kernel must not run on this input")

    monkeypatch.setattr(bn_kernel, "forward", fail)


@pytest.mark.parametrize(
    "case", ["eval", "nchw", "float64", "residual-dtype", "kernel-unavailable"]
)
def test_falls_back_to_torch_where_the_kernel_does_not_apply(
    case: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    bn = _bn(16, seed=7)
    bn.running_mean.uniform_(-1, 1)
    bn.running_var.uniform_(0.5, 2)
    x = _cl(torch.randn(2, 16, 4, 4), torch.float32)
    residual = None
    if case == "eval":
        bn.eval()
    elif case == "nchw":
        x = x.contiguous()
    elif case == "float64":
        x = x.double()
        bn = bn.double()
    elif case == "residual-dtype":
        residual = _cl(torch.randn(2, 16, 4, 4), torch.bfloat16)
    else:
        monkeypatch.setattr(bn_kernel, "unavailable_reason", lambda: "disabled for this test")
    fused = copy.deepcopy(bn)
    use_fused_batchnorm(fused)
    _kernel_forbidden(monkeypatch)
    got = fused.forward_act(x, residual)
    expected = bn(x)
    if residual is not None:
        expected = expected + residual
    torch.testing.assert_close(got, torch.relu(expected))
    torch.testing.assert_close(fused.running_mean, bn.running_mean)


@needs_kernel
def test_second_derivatives_are_refused_clearly() -> None:
    bn = _bn(8, seed=13)
    use_fused_batchnorm(bn)
    x = _cl(torch.randn(2, 8, 4, 4), torch.float32).requires_grad_()
    out = bn.forward_act(x)
    (grad,) = torch.autograd.grad(out.square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiable"):
        grad.sum().backward()


def test_norm_act_with_plain_modules_is_act_of_bn() -> None:
    bn = _bn(8, seed=11).eval()
    x = torch.randn(2, 8, 3, 3)
    r = torch.randn(2, 8, 3, 3)
    torch.testing.assert_close(norm_act(bn, nn.ReLU(), x), torch.relu(bn(x)))
    torch.testing.assert_close(norm_act(bn, nn.ReLU(), x, r), torch.relu(bn(x) + r))
    # A non-ReLU activation is never handed to a fused norm.
    fused = copy.deepcopy(bn)
    use_fused_batchnorm(fused)
    torch.testing.assert_close(norm_act(fused, nn.Tanh(), x), torch.tanh(bn(x)))


def test_swap_keeps_state_dict_and_parameters() -> None:
    model = resnext.create_model("resnext29_8x64d", num_classes=10)
    keys = list(model.state_dict())
    params = [id(p) for p in model.parameters()]
    count = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert use_fused_batchnorm(model) == count > 0
    assert all(type(m) is not nn.BatchNorm2d for m in model.modules())
    assert list(model.state_dict()) == keys
    assert [id(p) for p in model.parameters()] == params
    assert use_plain_batchnorm(model) == count
    assert not any(isinstance(m, FusedBatchNorm2d) for m in model.modules())


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return nn.functional.cosine_similarity(a.double().flatten(), b.double().flatten(), dim=0).item()


# 16² (maps of 16, 8 and 4; 128 values a channel at the last) costs a quarter of 32²'s float64 step
STEP_SIZE = 16


def _step_errors(name: str, dtype: torch.dtype, seed: int) -> dict[str, dict[str, float]]:
    """Errors of the plain and the fused training step of `name` against the float64 step."""
    torch.manual_seed(seed)
    plain = resnext.create_model(name, num_classes=10).train()
    plain = plain.to(memory_format=torch.channels_last)
    fused = copy.deepcopy(plain)
    use_fused_batchnorm(fused)
    reference = copy.deepcopy(plain).double()
    x = _cl(torch.randn(8, 3, STEP_SIZE, STEP_SIZE), torch.float32)
    y = torch.randint(0, 10, (8,))
    runs = {}
    for key, model in (("reference", reference), ("plain", plain), ("fused", fused)):
        xg = (x.double() if key == "reference" else x.clone()).requires_grad_()
        bf16 = dtype == torch.bfloat16 and key != "reference"
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = nn.functional.cross_entropy(model(xg), y)
        loss.backward()
        grads = torch.cat([p.grad.flatten().double() for p in model.parameters()])
        stats = torch.cat(
            [b.flatten().double() for b in model.buffers() if b.dtype.is_floating_point]
        )
        runs[key] = (loss.detach(), xg.grad, grads, stats)
    ref = runs["reference"]
    return {
        key: {
            "loss": rel_err(runs[key][0], ref[0]),
            "dx": rel_err(runs[key][1], ref[1]),
            "grads": rel_err(runs[key][2], ref[2]),
            "grads_cosine": _cosine(runs[key][2], ref[2]),
            "stats": rel_err(runs[key][3], ref[3]),
        }
        for key in ("plain", "fused")
    }


@needs_kernel
@pytest.mark.parametrize("name", ["resnext29_4x16d", "resnet29_1x64d"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_training_step_of_registry_models_as_accurate_as_plain(
    name: str, dtype: torch.dtype
) -> None:
    """A whole network in train mode, measured against the same network in float64.

    At initialisation batch norm's backward amplifies rounding (torch's own float32 step is
    1-9 % off float64 in the input gradient here), so the fused step must be as close to the
    float64 step as the plain step is, averaged over seeds, not equal to the plain step.
    """
    if name not in resnext.list_models():
        pytest.skip(f"{name} is not in the registry")
    if dtype not in bn_kernel.BUILD.dtypes:  # both sides would be torch's batch norm
        pytest.skip(f"the {bn_kernel.BUILD.name} build takes {bn_kernel.BUILD.dtypes}")
    seeds = [_step_errors(name, dtype, seed) for seed in range(3)]

    def mean(key: str, what: str) -> float:
        return sum(s[key][what] for s in seeds) / len(seeds)

    floor = 1e-6 if dtype == torch.float32 else 1e-3
    checked = ("loss", "dx", "grads", "stats") if dtype == torch.float32 else ("loss", "stats")
    for what in checked:
        assert mean("fused", what) <= 2 * mean("plain", what) + floor, what
    # In bf16 single gradient entries are noise-dominated; their direction must hold up.
    assert mean("fused", "grads_cosine") >= mean("plain", "grads_cosine") - 0.02
    assert mean("fused", "grads_cosine") > 0.5


def test_config_rejects_fused_bn_with_compile_or_without_channels_last() -> None:
    on = ["train.fused_bn=true", "train.channels_last=true"]
    with pytest.raises(ConfigError, match=r"train\.fused_bn.*torch\.compile"):
        load_config("digits_demo", [*on, "train.compile=true"])
    with pytest.raises(ConfigError, match="channels_last"):
        load_config("digits_demo", ["train.fused_bn=true", "train.channels_last=false"])
    assert load_config("digits_demo", on).train.fused_bn is True


def test_mask_bits_are_the_positive_outputs_and_a_wrong_mask_is_refused(
    build: bn_kernel.Build,
) -> None:
    torch.manual_seed(5)
    x = _cl(torch.randn(2, 40, 3, 5), torch.float32)
    res = _cl(torch.randn(2, 40, 3, 5), torch.float32)
    out, *_, bits = bn_kernel.forward(x, None, None, 1e-5, res, True, want_bits=True)
    assert bits is not None and bits.shape == (30, bn_kernel.mask_words(40)) == (30, 3)
    # Word w of row r holds channels 16w..16w+15 of that pixel, bit i for channel 16w + i.
    words = bits.to(torch.int64) & 0xFFFF
    unpacked = (words[:, :, None] >> torch.arange(16)) & 1
    rows = out.permute(0, 2, 3, 1).reshape(30, 40)
    assert torch.equal(unpacked.reshape(30, 48)[:, :40].bool(), rows > 0)
    mean, invstd = torch.zeros(40), torch.ones(40)
    for wrong in (None, bits[:, :2].contiguous()):
        with pytest.raises(ValueError, match=r"bits: expected the \(30, 3\) mask of forward"):
            bn_kernel.backward(
                x, x, wrong, None, None, mean, invstd, bn_kernel.MASK_FROM_BITS, True
            )


def test_the_avx2_build_refuses_bf16_clearly(build: bn_kernel.Build) -> None:
    if torch.bfloat16 in build.dtypes:
        pytest.skip("the AVX-512 build takes bf16")
    x = _cl(torch.randn(2, 8, 3, 3), torch.bfloat16)
    assert not bn_kernel.takes(x)  # FusedBatchNorm2d leaves bf16 to torch here
    with pytest.raises(ValueError, match="avx2 build takes"):
        bn_kernel.forward(x, None, None, 1e-5, None, True)


@needs_kernel
def test_update_running_follows_batchnorms_formula_and_refuses_other_dtypes() -> None:
    g = torch.Generator().manual_seed(5)
    mean, var = torch.randn(48, generator=g), torch.rand(48, generator=g) + 0.1
    rm, rv = torch.randn(48, generator=g), torch.rand(48, generator=g) + 0.5
    # nn.BatchNorm2d's update, by hand in float64: 0.9·old + 0.1·batch, variance × n/(n − 1)
    want_m = 0.9 * rm.double() + 0.1 * mean.double()
    want_v = 0.9 * rv.double() + 0.1 * var.double() * 200 / 199
    got_m, got_v = rm.clone(), rv.clone()
    assert bn_kernel.update_running(got_m, got_v, mean, var, 0.1, 200)
    assert rel_err(got_m, want_m) < 1e-6 and rel_err(got_v, want_v) < 1e-6
    # float64 buffers (or a length mismatch) are left to torch's ops: nothing written
    m64, v64 = rm.double(), rv.double()
    assert not bn_kernel.update_running(m64, v64, mean, var, 0.1, 200)
    assert torch.equal(m64, rm.double()) and torch.equal(v64, rv.double())
    assert not bn_kernel.update_running(rm.clone(), rv.clone(), mean[:47], var[:47], 0.1, 200)


def test_bf16_rounding_gives_torchs_bits_for_special_values(build: bn_kernel.Build) -> None:
    """With a zero weight the output is the bias, rounded once to bf16: torch's bits for ties,
    overflow, infinities and denormals (which AVX512-BF16's conversion instruction would flush to
    zero), and a NaN for a NaN; on every build that takes bf16."""
    if torch.bfloat16 not in build.dtypes:
        pytest.skip(f"the {build.name} build takes float32 only")
    normal = [1.0 + 2.0**-8, 1.0 + 3 * 2.0**-8, 1.0000001, -2.5, 3.3895314e38, -3.4e38, 65504.0,
              0.5, 0.0, float("inf"), float("-inf"), 1.1754944e-38, -1e-3, 7.0, 1e30, -1e-30]  # fmt: skip
    special = [1e-39, -3e-39, 1e-45, float("nan"), -float("nan"), 2.0**-130, 5.0, -5.0,
               1.0 + 2.0**-8, 0.1, -1.5, 3.0, 1e-40, float("nan"), 2.0, -1.0]  # fmt: skip
    bias = torch.tensor(normal + special, dtype=torch.float32)
    x = _cl(torch.randn(2, 32, 3, 3), torch.bfloat16)
    y = bn_kernel.forward(x, torch.zeros(32), bias, 1e-5, None, relu=False)[0]
    got = y.permute(1, 0, 2, 3).reshape(32, -1)
    nan = bias.isnan()
    assert got[nan].isnan().all()
    want = bias[~nan].to(torch.bfloat16).view(torch.int16)
    assert (got[~nan].view(torch.int16) == want[:, None]).all()
