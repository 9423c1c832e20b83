"""optimize(): the fast path computes the same function as the plain eval-mode model."""

from __future__ import annotations

import io

import pytest
import torch
from registry_models import (
    FULL_WIDTH,
    MAX_PARAMS,
    OPTION_VARIANTS,
    param_count,
    randomize_bn,
    registry_model_and_input,
    small_input,
)
from tensor_checks import rel_err
from torch import nn

import resnext
from resnext.errors import ConfigError
from resnext.speed import fastpath as optimize_module
from resnext.speed import pointwise_fp16, pointwise_gemm, pointwise_mkl, replay
from resnext.speed.capability import bf16_supported, cpu_capability
from resnext.speed.conv_x3 import unavailable_reason as x3_unavailable_reason
from resnext.speed.fastpath import optimize
from resnext.speed.grouped_kernel import unavailable_reason

# Where our grouped kernel can run, every grouped conv it takes is swapped in, so the same-function
# tests cover it too; elsewhere they test oneDNN's path alone.
KERNEL = "on" if unavailable_reason() is None else "off"
# Likewise our AMX bf16×3 convolution kernel, on CPUs with AMX.
X3 = "on" if x3_unavailable_reason() is None else "off"
# And our bf16 1×1 kernel, on CPUs with AVX512-BF16.
DOT = "on" if pointwise_gemm.unavailable_reason() is None else "off"


@pytest.mark.parametrize("name", resnext.list_models())
def test_fp32_same_function_every_registry_model(name: str) -> None:
    model, x = registry_model_and_input(name)
    with torch.no_grad():
        expected = model(x)
    fast = optimize(model, torch.float32, backend="none", grouped_kernel=KERNEL, conv_x3=X3)
    with torch.no_grad():
        got = fast(torch.randn_like(x).copy_(x))
    assert got.dtype == torch.float32
    assert rel_err(got, expected) < 1e-4


@pytest.mark.skipif(not bf16_supported(), reason="this CPU has no native bf16")
@pytest.mark.parametrize("name", resnext.list_models())
def test_bf16_same_function_every_registry_model(name: str) -> None:
    torch.manual_seed(3)
    model, x = registry_model_and_input(name)
    with torch.no_grad():
        expected = model(x)
    # every bf16 kernel that runs here swapped in wherever it takes a layer, as in the fp32 test
    kernels = {"grouped_kernel": KERNEL, "pointwise_bf16": DOT}
    fast = optimize(model, torch.bfloat16, backend="none", **kernels)
    with torch.no_grad():
        got = fast(x.clone())
    assert got.dtype == torch.float32
    # bf16's 8 significant bits through the network: measured 0.4-0.8 % of the output range
    assert rel_err(got, expected) < 3e-2


@pytest.mark.skipif(
    pointwise_fp16.unavailable_reason() is not None,
    reason=f"fp16 kernel unavailable: {pointwise_fp16.unavailable_reason()}",
)
@pytest.mark.parametrize("name", resnext.list_models())
def test_fp16_products_same_function_every_registry_model(name: str) -> None:
    torch.manual_seed(4)
    model, x = registry_model_and_input(name)
    with torch.no_grad():
        expected = model(x)
    # float16 products in every 1×1 the kernel takes, the grouped kernel as in the fp32 test
    fast = optimize(model, "fp16", backend="none", grouped_kernel=KERNEL, pointwise_fp16="on")
    takes = sum(isinstance(m, nn.Conv2d) and pointwise_fp16.eligible(m) for m in model.modules())
    swapped = sum(isinstance(m, pointwise_fp16.Fp16Conv1x1) for m in fast.modules())
    assert swapped > 0 or takes == 0
    with torch.no_grad():
        got = fast(x.clone())
    assert got.dtype == torch.float32
    # float16 keeps 3 more significant bits than bf16 (2^-11 against 2^-8 per rounding): an
    # eighth of the bf16 test's bound; ResNeXt-50's whole output measured 5e-4 (RESULTS.md, stop 56)
    assert rel_err(got, expected) < 3e-2 / 8


def test_the_full_width_models_are_large_registry_models() -> None:
    # a renamed or removed model would otherwise drop out of the tests above unnoticed
    for name in FULL_WIDTH:
        assert name in resnext.list_models()
        assert param_count(name) > MAX_PARAMS


# The other large zoo models above are skipped; their blocks are covered here at tiny width.
@pytest.mark.parametrize("option", sorted(OPTION_VARIANTS))
def test_fp32_same_function_every_spec_option(option: str) -> None:
    spec = resnext.ModelSpec(
        depths=(1, 2),
        cardinality=4,
        base_width=2,
        stem_width=8,
        out_width=16,
        num_classes=5,
        **OPTION_VARIANTS[option],
    )
    model = resnext.build_model(spec).eval()
    randomize_bn(model)
    x = small_input(model)
    with torch.no_grad():
        expected = model(x)
        got = optimize(model, torch.float32, backend="none", grouped_kernel=KERNEL)(x.clone())
    assert rel_err(got, expected) < 1e-4


@pytest.mark.parametrize("backend", ["jit", "inductor", "inductor-py"])
def test_compiled_backends_same_function(backend: str) -> None:
    model = resnext.create_model("resnext_tiny").eval()
    randomize_bn(model)
    x = torch.randn(3, 3, 32, 32)
    cpp = backend != "inductor-py"  # inductor calling its kernels from generated C++ or Python
    fast = optimize(model, "fp32", backend=backend.split("-")[0], example_input=x, cpp_wrapper=cpp)
    if backend != "jit":
        assert fast.cpp_wrapper is cpp
    fresh = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert rel_err(fast(fresh), model(fresh)) < 1e-4


@pytest.mark.skipif(not bf16_supported(), reason="this CPU has no native bf16")
def test_bf16_agrees_with_fp32() -> None:
    model = resnext.create_model("resnext_tiny_in").eval()
    randomize_bn(model)
    x = torch.randn(8, 3, 64, 64)
    fast = optimize(model, torch.bfloat16, backend="jit", example_input=x)
    with torch.no_grad():
        expected, got = model(x), fast(x)
    # bf16 keeps 8 mantissa bits: a few per cent of the output range, far from fp32's 1e-6.
    assert 0 < rel_err(got, expected) < 0.05


def test_original_model_untouched_and_bad_arguments() -> None:
    model = resnext.create_model("resnext_tiny").train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimize(model, backend="none")
    assert model.training
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    with pytest.raises(ConfigError, match="dtype"):
        optimize(model, torch.float16)
    with pytest.raises(ConfigError, match="backend"):
        optimize(model, backend="tensorrt")


@pytest.mark.parametrize("new_shapes", ["compile", "eager"])
def test_jit_runs_other_batch_and_image_sizes(new_shapes: str) -> None:
    # A trace keeps our 1×1 kernel's weights packed for the example's pixel count: any input of
    # another pixel count failed in MKL's product. It now gets its own trace, or runs eager.
    if pointwise_mkl.unavailable_reason() is not None:
        pytest.skip(f"no MKL 1×1 kernel here: {pointwise_mkl.unavailable_reason()}")
    model = resnext.create_model("resnext_tiny").eval()
    randomize_bn(model)
    example = torch.randn(1, 3, 32, 32)
    fast = optimize(
        model, "fp32", backend="jit", example_input=example, pointwise_mkl="on",
        new_shapes=new_shapes,
    )  # fmt: skip
    assert any(c.chosen != "native" for c in fast.pointwise_choices)
    for shape in [(3, 3, 32, 32), (1, 3, 64, 64), (2, 3, 48, 40), (1, 3, 32, 32)]:
        x = torch.randn(shape)
        with torch.no_grad():
            assert rel_err(fast(x), model(x)) < 1e-4, shape
    assert len(fast.traces) == (4 if new_shapes == "compile" else 1)


BAD_ARGUMENTS = {
    "a name for a model": (
        dict(model="resnext50"),
        r"^model: expected a torch nn\.Module, got str",
    ),
    "no model": (dict(model=None), r"^model: expected a torch nn\.Module, got NoneType"),
    "not an image network": (dict(model=nn.Linear(3, 4)), r"^model: expected an image network"),
    "device gpu": (dict(device="gpu"), r"^device: expected 'cpu', 'cuda' or 'cuda:N', got 'gpu'"),
    "device 5": (dict(device=5), r"^device: expected 'cpu', 'cuda' or 'cuda:N', got 5"),
    "device cuda": (dict(device="cuda"), r"^device: 'cuda' asked for, but torch sees no CUDA"),
    "device mps": (dict(device="mps"), r"^device: the fast path runs on 'cpu' or 'cuda'"),
    "example of 1 channel": (
        dict(example_input=torch.randn(1, 1, 32, 32)),
        r"^example_input: expected 3 channels",
    ),
    "example of 3 dims": (
        dict(example_input=torch.randn(3, 32, 32)),
        r"^example_input: expected an image batch \(N, C, H, W\)",
    ),
    "example a list": (dict(example_input=[1, 2]), r"^example_input: expected a torch\.Tensor"),
    "warm-up shape of 3 dims": (
        dict(warmup_shapes=[(2, 3, 32)]),
        r"^warmup_shapes: expected \(N, 3, H, W\) tuples",
    ),
    "warm-up shapes an int": (dict(warmup_shapes=5), r"^warmup_shapes: expected"),
}


@pytest.mark.parametrize("case", list(BAD_ARGUMENTS))
def test_bad_arguments_are_named_before_the_model_is_copied(
    case: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # they failed as raw AttributeErrors, RuntimeErrors from torch.device or a convolution, or
    # CUDA's AssertionError, most after the model had been copied and folded
    def copied(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model was copied before the arguments were checked")

    monkeypatch.setattr(optimize_module, "fold_batchnorm", copied)
    monkeypatch.setattr(optimize_module.copy, "deepcopy", copied)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the same on a GPU machine
    arguments, message = BAD_ARGUMENTS[case]
    arguments = {"model": resnext.create_model("resnext_tiny"), "backend": "none", **arguments}
    with pytest.raises(ConfigError, match=message):
        optimize(**arguments)


def test_the_input_channels_come_from_the_spec_or_the_first_convolution() -> None:
    grey = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
    fast = optimize(grey, backend="none")  # its default example has 1 channel, not 3
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        assert rel_err(fast(x), grey.eval()(x)) < 1e-5
    with pytest.raises(ConfigError, match=r"^example_input: expected 1 channels"):
        optimize(grey, backend="none", example_input=torch.randn(1, 3, 16, 16))


def test_compile_failure_falls_back_with_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken_compiler(module: nn.Module, example: torch.Tensor, **options: object) -> nn.Module:
        raise RuntimeError("compiler broke")

    # A compiler failure is simulated: the point is that optimize() still returns a working model.
    monkeypatch.setattr(optimize_module, "TracedModule", broken_compiler)
    model = resnext.create_model("resnext_tiny").eval()
    x = torch.randn(1, 3, 32, 32)
    with pytest.warns(RuntimeWarning, match="compiler broke"):
        fast = optimize(model, backend="jit", example_input=x)
    with torch.no_grad():
        assert rel_err(fast(x), model(x)) < 1e-4


def test_capability_reports_threads() -> None:
    cap = cpu_capability()
    assert cap.threads == torch.get_num_threads()
    assert set(cap.as_dict()) == {"mkldnn", "isa", "native_bf16", "amx", "threads"}


@pytest.mark.parametrize("stride", [1, 2])
def test_grouped_alternatives_equal_conv2d(stride: int) -> None:
    from resnext.speed import grouped

    x = torch.randn(2, 16, 9, 9)
    w = torch.randn(16, 2, 3, 3)  # 8 groups of 2 channels
    expected = torch.nn.functional.conv2d(x, w, stride=stride, padding=1, groups=8)
    got = grouped.grouped_bmm(x, w, stride, 8)
    assert torch.allclose(got, expected, atol=1e-4)
    packed = grouped.block_diagonal_weight(w, 8, 4)
    assert packed.shape == (16, 8, 3, 3)
    assert torch.allclose(grouped.grouped_packed(x, packed, stride, 8, 4), expected, atol=1e-4)
    orders, weights = grouped.rotations(w, 8)
    assert torch.allclose(
        grouped.grouped_depthwise_sum(x, orders, weights, stride), expected, atol=1e-4
    )
    assert torch.allclose(
        grouped.grouped_shifted_sum(x, orders, weights, stride), expected, atol=1e-4
    )
    # Hand count: 2 images × 16 outputs × 2 inputs × 9 taps × output pixels × 2.
    side = 9 if stride == 1 else 5
    assert grouped.conv_flops(tuple(x.shape), w, stride) == 2 * 2 * 16 * 2 * 9 * side * side


def test_many_optimized_models_in_one_process_all_compile(monkeypatch: pytest.MonkeyPatch) -> None:
    # dynamo allows a fixed number of compiled versions per code object and silently runs
    # eager beyond it; every optimize() compiles the same forward again.
    import torch._dynamo
    from torch._dynamo.utils import counters

    monkeypatch.setattr(torch._dynamo.config, "recompile_limit", 1)
    model = resnext.create_model("resnext_tiny").eval()
    x = torch.randn(2, 3, 32, 32)
    for _ in range(2):
        before = counters["stats"]["unique_graphs"]
        optimize(model, "fp32", backend="inductor", example_input=x, grouped_kernel="off")
        assert counters["stats"]["unique_graphs"] == before + 1


@pytest.mark.parametrize("new_shapes", ["compile", "eager"])
def test_an_input_of_a_new_shape_compiles_or_runs_eager_as_asked(
    new_shapes: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from torch._dynamo.utils import counters

    model = resnext.create_model("resnext_tiny").eval()
    randomize_bn(model)
    x = torch.randn(2, 3, 32, 32)
    fast = optimize(model, "fp32", example_input=x, grouped_kernel="off", new_shapes=new_shapes)
    graph_calls: list[int] = []
    to_graph = fast._compiled
    monkeypatch.setattr(fast, "_compiled", lambda t: graph_calls.append(len(t)) or to_graph(t))
    short = torch.randn(1, 3, 32, 32)  # e.g. a last short batch
    before = counters["stats"]["unique_graphs"]
    with torch.no_grad():
        got, expected = fast(short), model(short)
        again = fast(x)
        assert rel_err(again, model(x)) < 1e-4
    assert rel_err(got, expected) < 1e-4
    # 'eager' neither compiles for the short batch nor sends it to the graph; the built shape
    # goes to its graph either way
    assert counters["stats"]["unique_graphs"] == before + (new_shapes == "compile")
    assert graph_calls == ([1, 2] if new_shapes == "compile" else [2])
    with pytest.raises(ConfigError, match="new_shapes: expected one of"):
        optimize(model, backend="none", new_shapes="never")


BAD_INPUTS = {
    "four channels": (torch.randn(2, 4, 32, 32), "expected 3 channels"),
    "no batch dimension": (torch.randn(3, 32, 32), r"expected an image batch \(N, C, H, W\)"),
    "integers": (torch.zeros(2, 3, 32, 32, dtype=torch.int64), "floating-point"),
    "a list": ([[0.0]], "expected a torch.Tensor"),
}


@pytest.mark.parametrize("backend", ["none", "replay", "jit", "inductor"])
def test_a_bad_input_is_named_by_every_backend(backend: str) -> None:
    # Without the check our kernels failed on such inputs with messages about their own operands
    # (a stem kernel: "packed: expected ... weight for 4 input channels") and a replay on the
    # random input of its first recording ("normal_kernel_cpu not implemented for 'Long'").
    if backend == "replay" and replay.unavailable_reason() is not None:
        pytest.skip(f"no replay here: {replay.unavailable_reason()}")
    model = resnext.create_model("resnext_tiny").eval()
    x = torch.randn(2, 3, 32, 32)
    fast = optimize(model, "fp32", backend=backend, example_input=x)
    for bad, message in BAD_INPUTS.values():
        with pytest.raises(ValueError, match=f"^input: .*{message}"):
            fast(bad)
    with torch.no_grad():  # and a good one still runs, its shape (the built one) unchanged
        assert rel_err(fast(x), model(x)) < 1e-4


def test_optimize_is_one_call_away_from_the_package() -> None:
    # The interface: `resnext.optimize(model, dtype=...)`, without importing resnext.speed.
    assert resnext.optimize is optimize
    assert "optimize" in resnext.__all__
    with pytest.raises(AttributeError, match="no attribute 'optimise'"):
        _ = resnext.optimise


@pytest.mark.parametrize("backend", ["none", "replay"])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_an_optimized_model_saves_and_loads_whole(backend: str, dtype: str) -> None:
    # torch.save pickles with protocol 2: a torch.memory_format attribute, or an fx graph holding
    # a string annotation as a global, had made it fail
    if dtype == "bf16" and not bf16_supported():
        pytest.skip("this CPU has no native bf16")
    torch.manual_seed(5)
    model = resnext.create_model("resnext_tiny").eval()
    x = torch.randn(2, 3, 32, 32)
    fast = optimize(model, dtype, backend=backend, example_input=x)
    buffer = io.BytesIO()
    torch.save(fast, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    fresh = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(fresh), fast(fresh))
