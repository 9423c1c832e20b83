"""Our int8 residual add-and-ReLU (`resnext.speed.add_int8`): its definition in float64 and torch's
quantized add, and the maps it leaves to torch."""

from __future__ import annotations

import pytest
import torch
from torch.ao.nn.quantized import QFunctional

from resnext.speed import add_int8

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
needs_kernel = pytest.mark.skipif(
    add_int8.unavailable_reason() is not None,
    reason=f"our int8 add kernel does not run here: {add_int8.unavailable_reason()}",
)


def _q(shape: tuple[int, ...], scale: float, zero_point: int, fmt: torch.memory_format):
    x = torch.randn(shape) * 2 + 0.5
    return torch.quantize_per_tensor(x, scale, zero_point, torch.quint8).contiguous(
        memory_format=fmt
    )


@needs_kernel
@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize(
    ("shape", "fmt"),
    [
        ((3, 64, 7, 9), torch.channels_last),  # 12,096 values: whole and partial 64-byte steps
        ((2, 5, 3, 3), torch.contiguous_format),  # 90: the tail in plain C
        ((1, 1, 1, 1), torch.channels_last),
    ],
    ids=["channels-last", "nchw-tail", "one-value"],
)
def test_the_kernel_computes_the_quantized_add(
    relu: bool, shape: tuple[int, ...], fmt: torch.memory_format
) -> None:
    torch.manual_seed(len(shape) + sum(shape))
    # scales as calibration gives them, not round decimals (whose ratios put many sums exactly
    # half-way between two codes, where float32 and float64 may round apart)
    a, b = _q(shape, 0.03127, 97, fmt), _q(shape, 0.04713, 151, fmt)
    scale, zero_point = 0.05171, 0 if relu else 128
    got = add_int8.add_relu(a, b, scale, zero_point, relu)
    assert got.shape == a.shape and got.q_scale() == scale and got.q_zero_point() == zero_point
    assert got.is_contiguous(memory_format=fmt)
    torch_add = QFunctional()
    torch_add.scale, torch_add.zero_point = scale, zero_point
    engine = (torch_add.add_relu if relu else torch_add.add)(a, b)
    codes = got.int_repr().double()
    for reference in (
        add_int8.reference(a, b, scale, zero_point, relu),
        engine.int_repr().double(),
    ):
        diff = (codes - reference).abs()
        assert diff.max() <= 1  # rounding ties only
        assert (diff > 0).sum() <= max(1, 2e-3 * diff.numel())
    if relu:
        assert codes.min() >= zero_point


def test_maps_it_does_not_take_are_refused_or_left_to_torch() -> None:
    a = _q((1, 16, 4, 4), 0.1, 10, torch.channels_last)
    nchw = a.contiguous()
    assert add_int8.takes(a, a) and add_int8.takes(nchw, nchw)
    assert not add_int8.takes(a, nchw)  # bytes in different orders
    assert not add_int8.takes(a, a[:, :8])
    assert not add_int8.takes(a, a.dequantize())
    qint8 = torch.quantize_per_tensor(torch.randn(1, 16, 4, 4), 0.1, 0, torch.qint8)
    assert not add_int8.takes(qint8, qint8)
    with pytest.raises(ValueError, match="a, b: expected two per-tensor quint8 maps"):
        add_int8.add_relu(a, nchw, 0.1, 0)
    assert add_int8.add_relu_if_taken(a, nchw, 0.1, 0) is None  # the network's fallback
