"""Every implementation the training fast path's chooser may pick, on seeded random shapes, against
float64: the grouped 3×3's and the 1×1's forward, input gradient and weight gradient (and the 1×1's
input gradient summed with a shortcut's), oneDNN's and ours, in float32, bf16 and with float16
products where they run.

The registry tests meet the shapes of real networks; these meet odd ones (a channel, a pixel, a
map narrower than the stride, strides of 3), where such a fuzz found two bugs in torch's own
CPU weight gradients (`resnext.speed.conv_guard`; RESULTS.md, stop 60). A candidate that writes
past its buffers shows as a crash of the run.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from tensor_checks import float64_conv_grads, rel_err

from resnext.speed import grouped_train, pointwise_train

# relative to the reference's largest magnitude: float32's products (~1e-7 each, summed);
# bf16's 8 significant bits; float16 products' 11 bits with float16 sums of 64 products
BOUNDS = {torch.float32: 1e-5, torch.bfloat16: 3e-2}
FP16_BOUND = 1e-2
SHAPES = 100  # a seed; small maps drawn often (a third of the widths are 1-3 pixels)


def _check(
    what: str, candidates: dict[str, Callable[[], torch.Tensor]], want: torch.Tensor, bound: float
) -> int:
    """Each candidate's result has `want`'s shape and lies within `bound` of it; how many ran."""
    for name, run in candidates.items():
        got = run()
        assert tuple(got.shape) == tuple(want.shape), (what, name)
        error = rel_err(got, want)
        limit = FP16_BOUND if name.endswith("fp16") else bound
        assert math.isfinite(error) and error < limit, (what, name, error)
    return len(candidates)


def _width(rng: random.Random) -> int:
    return rng.randint(1, 3) if rng.random() < 1 / 3 else rng.randint(1, 14)


def _channels_last(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t.to(dtype).contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("seed", range(4))
def test_every_grouped_candidate_on_random_shapes(seed: int) -> None:
    rng = random.Random(seed)
    ran = 0
    for _ in range(SHAPES):
        group_width = rng.choice([1, 2, 4, 4, 8, 8, 16, 32])
        groups = rng.choice([1, 2, 4, 8, 32])
        c = group_width * groups
        n, h, w = rng.choice([1, 2, 3]), rng.randint(1, 13), _width(rng)
        stride = rng.choice([1, 1, 2])
        dtype = rng.choice([torch.float32, torch.float32, torch.bfloat16])
        x = _channels_last(torch.randn(n, c, h, w), dtype)
        weight = torch.randn(c, group_width, 3, 3).to(dtype)
        out_shape = F.conv2d(x, weight, None, stride, 1, 1, groups).shape
        grad = _channels_last(torch.randn(out_shape), dtype)
        out, dx, dw = float64_conv_grads(x, weight, grad, stride, 1, groups)
        shape = (n, c, h, w, groups, stride, dtype)
        ways = {
            "forward": (grouped_train.conv_candidates(x, weight, groups, stride), out),
            "input gradient": (
                grouped_train.input_grad_candidates(grad, x, weight, groups, stride),
                dx,
            ),
            "weight gradient": (
                grouped_train.weight_grad_candidates(grad, x, weight, groups, stride),
                dw,
            ),
        }
        for what, (candidates, want) in ways.items():
            ran += _check(f"{what} {shape}", candidates, want, BOUNDS[dtype])
    assert ran > 3 * SHAPES  # oneDNN's three and some of ours


@pytest.mark.parametrize("seed", range(4))
def test_every_pointwise_candidate_on_random_shapes(seed: int) -> None:
    rng = random.Random(seed)
    ran = 0
    for _ in range(SHAPES):
        cin = rng.choice([1, 3, 8, 12, 32, 48, 64, 96, 128, 256])
        cout = rng.choice([8, 16, 32, 64, 96, 128])
        n, h, w = rng.choice([1, 2, 3]), rng.randint(1, 14), _width(rng)
        stride = rng.choice([1, 1, 2, 3])
        dtype = rng.choice([torch.float32, torch.float32, torch.bfloat16])
        fp16 = dtype == torch.float32 and rng.random() < 0.5
        x = _channels_last(torch.randn(n, cin, h, w), dtype)
        parameter = torch.randn(cout, cin, 1, 1) * 0.1
        weight = parameter.to(dtype)
        out_shape = F.conv2d(x, weight, None, stride).shape
        grad = _channels_last(torch.randn(out_shape), dtype)
        out, dx, dw = float64_conv_grads(x, weight, grad, stride, 0, 1)
        shape = (n, cin, cout, h, w, stride, dtype, fp16)
        ways = {
            "forward": (
                pointwise_train.forward_candidates(x, parameter, weight, stride, fp16),
                out,
            ),
            "input gradient": (
                pointwise_train.input_grad_candidates(grad, x, parameter, weight, stride, fp16),
                dx,
            ),
            "weight gradient": (
                pointwise_train.weight_grad_candidates(grad, x, weight, stride, fp16),
                dw,
            ),
        }
        if stride == 1:
            shortcut = _channels_last(torch.randn(x.shape), dtype)
            ways["input gradient with a shortcut's"] = (
                pointwise_train.fork_input_grad_candidates(
                    grad, shortcut, x, parameter, weight, fp16
                ),
                dx + shortcut.double(),
            )
        for what, (candidates, want) in ways.items():
            ran += _check(f"{what} {shape}", candidates, want, BOUNDS[dtype])
    assert ran > 4 * SHAPES  # oneDNN's and the GEMM's, and some of ours
