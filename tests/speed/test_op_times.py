"""The dispatch-mode operator timer: FLOPs and bytes of recorded operators against hand counts."""

from __future__ import annotations

import types

import pytest
import torch
import torch.nn.functional as F

from resnext.speed.op_times import Instrumented, OpTimer, instrument, signature, tensor_bytes


def test_convolution_flop_and_bytes_match_a_hand_count() -> None:
    x = torch.randn(2, 6, 9, 7)
    w = torch.randn(4, 3, 3, 3)  # 2 groups of 3 input channels
    with OpTimer() as timer:
        y = F.conv2d(x, w, stride=2, padding=1, groups=2)
    assert tuple(y.shape) == (2, 4, 5, 4)
    (_, sig), totals = next((k, v) for k, v in timer.totals.items() if k[0] == "convolution")
    assert totals.calls == 1
    # 2 FLOP per multiply-add: each output value takes 3 channels × 3 × 3 taps.
    assert totals.flop == 2 * (2 * 4 * 5 * 4) * 3 * 3 * 3
    assert totals.nbytes == 4 * (2 * 6 * 9 * 7 + 4 * 3 * 3 * 3 + 2 * 4 * 5 * 4)
    assert sig == "2x6x9x7:f32 4x3x3x3:f32"
    assert totals.seconds > 0


def test_views_move_no_bytes_and_calls_are_counted() -> None:
    x = torch.randn(4, 8)
    with OpTimer() as timer:
        for _ in range(3):
            x.t()
        x.mul(2.0)
    by_label = {label: t for (label, _), t in timer.totals.items()}
    assert by_label["t"].calls == 3 and by_label["t"].nbytes == 0
    assert by_label["mul"].nbytes == 2 * 4 * 8 * 4


def test_a_span_is_one_call_and_hides_the_operators_inside_it() -> None:
    timer = OpTimer()
    with timer:
        with timer.span("kernel", "sig") as counts:
            torch.ones(3).add(1)
            counts[:] = [10, 20]
        torch.zeros(2)
    labels = {label for label, _ in timer.totals}
    assert "kernel" in labels and "add" not in labels and "ones" not in labels
    kernel = timer.totals[("kernel", "sig")]
    assert (kernel.calls, kernel.flop, kernel.nbytes) == (1, 10, 20)
    assert timer.totals[("zeros", "")].calls == 1


def test_instrument_times_a_module_function_and_restores_it() -> None:
    def scale(x: torch.Tensor, k: float) -> torch.Tensor:
        return x * k

    module = types.SimpleNamespace(scale=scale)
    timer = OpTimer()
    target = Instrumented(module, "scale", "scaled", flop=lambda args, out: out.numel())
    with pytest.raises(RuntimeError, match="boom"), instrument(timer, [target]):
        assert module.scale is not scale
        with timer:
            out = module.scale(torch.ones(5), 2.0)
        raise RuntimeError("boom")
    assert module.scale is scale  # restored even though the block raised
    assert torch.equal(out, torch.full((5,), 2.0))
    totals = timer.totals[("scaled", "5:f32")]
    assert (totals.calls, totals.flop, totals.nbytes) == (1, 5, 40)


def test_tensor_bytes_and_signature_walk_nested_arguments() -> None:
    a = torch.zeros(2, 3, dtype=torch.bfloat16)
    b = torch.zeros(4)
    assert tensor_bytes([a, (b, 3)], None) == 2 * 3 * 2 + 4 * 4
    assert signature((a, [b], 1.0)) == "2x3:bf16 4:f32"


def test_a_strided_convolutions_backward_counts_the_useful_multiply_adds() -> None:
    x = torch.randn(2, 8, 10, 10, requires_grad=True)
    w = torch.randn(8, 4, 3, 3, requires_grad=True)  # 2 groups
    y = F.conv2d(x, w, stride=2, padding=1, groups=2)  # 2 × 8 × 5 × 5 outputs
    with OpTimer() as timer:
        y.sum().backward()
    (totals,) = [t for (label, _), t in timer.totals.items() if label == "convolution_backward"]
    forward_macs = (2 * 8 * 5 * 5) * 4 * 3 * 3
    assert totals.flop == 2 * 2 * forward_macs  # input and weight gradients, no bias
