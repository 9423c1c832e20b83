"""Where bf16 is the `auto` choice: native bf16 that measures faster than float32, not native
bf16 alone (on a Xeon with AVX512-BF16 but no AMX it ran at 0.6× float32's speed)."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from types import SimpleNamespace

import pytest
import torch

import resnext
from resnext.speed import capability, fastpath, pointwise_fp16
from resnext.speed.capability import bf16_supported


@pytest.fixture(autouse=True)
def fresh_measurement() -> Iterator[None]:
    """`bf16_speedup` measures once per process: each test starts and leaves it unmeasured."""
    capability.bf16_speedup.cache_clear()
    yield
    capability.bf16_speedup.cache_clear()


def test_the_speedup_is_float32_time_over_bf16_time(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [0.0]

    def conv(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        clock[0] += 3.0 if x.dtype == torch.float32 else 1.5  # by hand: 3.0 / 1.5 = 2
        return x

    monkeypatch.setattr(torch.nn.functional, "conv2d", conv)
    monkeypatch.setattr(capability, "time", SimpleNamespace(perf_counter=lambda: clock[0]))
    assert capability.conv_speedup() == 2.0


def test_without_native_bf16_it_is_never_faster_nor_measured(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def unmeasurable() -> float:
        raise AssertionError("measured emulated bf16")

    monkeypatch.setattr(capability, "bf16_supported", lambda: False)
    monkeypatch.setattr(capability, "conv_speedup", unmeasurable)
    assert capability.bf16_speedup() == 0.0
    assert not capability.bf16_faster()


def test_a_failing_measurement_means_float32(monkeypatch: pytest.MonkeyPatch) -> None:
    def refused() -> float:
        raise RuntimeError("could not create a primitive")

    monkeypatch.setattr(capability, "bf16_supported", lambda: True)
    monkeypatch.setattr(capability, "conv_speedup", refused)
    assert capability.bf16_speedup() == 0.0
    assert capability.fastest_dtype(torch.device("cpu")) is torch.float32


@pytest.mark.parametrize(
    ("speedup", "faster"), [(0.6, False), (1.0, False), (1.19, False), (1.2, True), (2.0, True)]
)
def test_native_bf16_counts_as_faster_from_1_2_times(
    speedup: float, faster: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []
    monkeypatch.setattr(capability, "bf16_supported", lambda: True)
    monkeypatch.setattr(capability, "conv_speedup", lambda: calls.append(1) or speedup)
    assert capability.bf16_faster() is faster
    assert capability.bf16_faster() is faster
    assert len(calls) == 1  # measured once per process


@pytest.mark.skipif(
    "amx_bf16" not in capability.cpu_flags(), reason="needs a CPU with AMX (cpuinfo amx_bf16)"
)
def test_with_amx_bf16_measures_faster() -> None:
    # AMX's tile products ran 2-5× float32's FMA rate on every phase of machine B
    # (benchmarks/RESULTS.md, stops 44-50): the measurement must see it
    assert capability.bf16_speedup() >= capability.BF16_MIN_SPEEDUP
    assert capability.bf16_faster()


@pytest.mark.skipif(not bf16_supported(), reason="this CPU has no native bf16")
@pytest.mark.parametrize("faster", [True, False])
def test_optimize_keeps_bf16_but_warns_where_it_is_slower(
    faster: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fastpath, "bf16_faster", lambda: faster)
    monkeypatch.setattr(fastpath, "bf16_speedup", lambda: 0.6)
    torch.manual_seed(0)
    model = resnext.create_model("resnext_tiny").eval()
    x = torch.randn(2, 3, 32, 32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fast = resnext.optimize(model, "bf16", backend="none", example_input=x)
    said = [str(w.message) for w in caught if "bf16 convolutions at 0.60×" in str(w.message)]
    assert len(said) == (0 if faster else 1)
    assert "dtype='fp32' is faster here" in "".join(said) or faster
    # asked for, so kept: the fast path still runs in bf16 (bf16 rounding, not float32's)
    with torch.no_grad():
        err = (fast(x) - model(x)).abs().max() / model(x).abs().max()
    assert 1e-4 < err < 5e-2


@pytest.mark.parametrize("faster", [True, False])
def test_auto_is_bf16_on_a_cpu_only_where_bf16_is_faster(
    faster: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    if faster and not bf16_supported():
        pytest.skip("this CPU has no native bf16")
    monkeypatch.setattr(capability, "bf16_faster", lambda: faster)
    want = torch.bfloat16 if faster else torch.float32
    assert capability.fastest_dtype(torch.device("cpu")) is want
    assert fastpath.resolve_dtype("auto", torch.device("cpu")) is want


@pytest.mark.parametrize("fp16", [True, False])
@pytest.mark.parametrize("faster", [True, False])
def test_the_auto_precision_is_bf16_where_faster_else_fp16_products_where_they_run(
    faster: bool, fp16: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    if faster and not bf16_supported():
        pytest.skip("this CPU has no native bf16")
    monkeypatch.setattr(capability, "bf16_faster", lambda: faster)
    monkeypatch.setattr(pointwise_fp16, "unavailable_reason", lambda: None if fp16 else "no")
    want = "bf16" if faster else "fp16" if fp16 else "fp32"
    assert capability.fastest_precision(torch.device("cpu")) == want


def test_auto_needs_the_device_it_is_for() -> None:
    with pytest.raises(resnext.errors.ConfigError, match=r"dtype: expected one of \[.*'bf16'"):
        fastpath.resolve_dtype("auto")


@pytest.mark.parametrize("faster", [True, False])
def test_optimize_auto_builds_in_the_faster_precision(
    faster: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    if faster and not bf16_supported():
        pytest.skip("this CPU has no native bf16 to build in")
    monkeypatch.setattr(capability, "bf16_faster", lambda: faster)
    monkeypatch.setattr(fastpath, "bf16_faster", lambda: faster)  # its warning's check
    # where bf16 is not faster, 'auto' would take float16 products where they run: not here
    monkeypatch.setattr(pointwise_fp16, "unavailable_reason", lambda: "not in this test")
    torch.manual_seed(0)
    model = resnext.create_model("resnext_tiny").eval()
    x = torch.randn(2, 3, 32, 32)
    fast = resnext.optimize(model, "auto", backend="none", example_input=x)
    with torch.no_grad():
        err = ((fast(x) - model(x)).abs().max() / model(x).abs().max()).item()
    # float32: our kernels' bf16×3 products or oneDNN's, ~1e-6; bf16: 8 significant bits
    assert (err > 1e-4) is faster and err < 5e-2


@pytest.mark.skipif(
    pointwise_fp16.unavailable_reason() is not None,
    reason=f"fp16 kernel unavailable: {pointwise_fp16.unavailable_reason()}",
)
def test_optimize_auto_takes_float16_products_where_bf16_is_not_faster(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(capability, "bf16_faster", lambda: False)
    torch.manual_seed(0)
    model = resnext.create_model("resnext_tiny").eval()
    x = torch.randn(2, 3, 32, 32)
    fast = resnext.optimize(model, "auto", backend="none", example_input=x)
    assert any(c.variant.startswith("fp16") for c in fast.pointwise_choices)
    assert next(fast.parameters()).dtype == torch.float32
