"""The training optimiser: torch's fused SGD step where it applies, the same update as the loop."""

from __future__ import annotations

import copy

import torch
from torch import nn

from resnext.config import OptimConfig
from resnext.train.optim import build_optimizer, fused_sgd_applies


def _tiny() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8), nn.Flatten(), nn.LazyLinear(4)
    )


def _set_grads(model: nn.Module, step: int) -> None:
    g = torch.Generator().manual_seed(100 + step)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g)


def test_cpu_float_parameters_get_the_fused_step():
    model = _tiny()
    model(torch.randn(1, 3, 6, 6))  # materialise the lazy layer
    opt = build_optimizer(model, OptimConfig(wd_exempt_norm_bias=True), lr=0.1)
    assert all(group["fused"] for group in opt.param_groups)


def test_fused_step_needs_floating_point_parameters_on_a_fused_device():
    assert fused_sgd_applies([torch.zeros(2)])
    assert not fused_sgd_applies([])
    assert not fused_sgd_applies([torch.zeros(2, dtype=torch.int64)])
    assert not fused_sgd_applies([torch.zeros(2), torch.zeros(2, device="meta")])


def test_fused_update_is_the_hand_computed_nesterov_step():
    # One parameter, two steps of SGD with momentum μ, Nesterov, weight decay λ, by hand:
    # d = g + λp; b = μb + d (b = d on the first step); p ← p − lr·(d + μb).
    p0, g1, g2 = 1.0, 0.5, -0.25
    lr, mu, wd = 0.1, 0.9, 0.01
    d1 = g1 + wd * p0
    b1 = d1
    p1 = p0 - lr * (d1 + mu * b1)
    d2 = g2 + wd * p1
    b2 = mu * b1 + d2
    p2 = p1 - lr * (d2 + mu * b2)

    model = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(p0)
    opt = build_optimizer(model, OptimConfig(momentum=mu, weight_decay=wd, nesterov=True), lr)
    assert opt.param_groups[0]["fused"]
    for g in (g1, g2):
        model.weight.grad = torch.full_like(model.weight, g)
        opt.step()
    assert abs(model.weight.item() - p2) < 1e-6


def test_fused_steps_equal_the_per_parameter_loop_to_rounding():
    model = _tiny()
    model(torch.randn(1, 3, 6, 6))
    loop_model = copy.deepcopy(model)
    cfg = OptimConfig(weight_decay=5e-4, wd_exempt_norm_bias=True, nesterov=True)
    fused = build_optimizer(model, cfg, lr=0.1)
    loop = torch.optim.SGD(
        [
            {"params": [p for p in loop_model.parameters() if p.ndim > 1], "weight_decay": 5e-4},
            {"params": [p for p in loop_model.parameters() if p.ndim <= 1], "weight_decay": 0.0},
        ],
        lr=0.1,
        momentum=0.9,
        nesterov=True,
        foreach=False,
    )
    for step in range(4):
        for m, opt in ((model, fused), (loop_model, loop)):
            _set_grads(m, step)
            for group in opt.param_groups:
                group["lr"] = 0.1 * (step + 1) / 4  # the schedule sets the LR per step
            opt.step()
    for a, b in zip(model.parameters(), loop_model.parameters(), strict=True):
        # The fused kernel may round a multiply-add differently: a few float32 ulps at most.
        torch.testing.assert_close(a, b, rtol=2e-7, atol=1e-7)


def test_adamw_update_is_the_hand_computed_decoupled_step():
    # Loshchilov & Hutter's AdamW, two steps by hand for one weight and one bias, the bias
    # exempt from decay: p <- p(1 - lr.wd); m = b1.m + (1-b1)g; v = b2.v + (1-b2)g^2;
    # p <- p - lr . (m / (1-b1^t)) / (sqrt(v / (1-b2^t)) + eps)
    lr, wd, (b1, b2), eps = 0.1, 0.05, (0.8, 0.99), 1e-3
    grads = (0.5, -0.25)

    def by_hand(p: float, decay: float) -> float:
        m = v = 0.0
        for t, g in enumerate(grads, start=1):
            p *= 1 - lr * decay
            m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
            p -= lr * (m / (1 - b1**t)) / ((v / (1 - b2**t)) ** 0.5 + eps)
        return p

    model = nn.Linear(1, 1)
    with torch.no_grad():
        model.weight.fill_(1.0)
        model.bias.fill_(-2.0)
    cfg = OptimConfig(
        name="adamw", weight_decay=wd, wd_exempt_norm_bias=True, betas=(b1, b2), eps=eps
    )
    opt = build_optimizer(model, cfg, lr)
    assert isinstance(opt, torch.optim.AdamW) and opt.param_groups[0]["fused"]
    for g in grads:
        model.weight.grad = torch.full_like(model.weight, g)
        model.bias.grad = torch.full_like(model.bias, g)
        opt.step()
    assert abs(model.weight.item() - by_hand(1.0, wd)) < 1e-6
    assert abs(model.bias.item() - by_hand(-2.0, 0.0)) < 1e-6


def test_micro_batch_seeds_differ_in_the_32_bits_a_cpu_generator_reads() -> None:
    from resnext.train.loop import micro_batch_seed

    # torch's CPU generator reads only the low 32 bits of a seed: these must not repeat over a
    # run's (step, stream) pairs, e.g. step 1000 stream 0 and step 66,535 stream 1.
    low = {
        micro_batch_seed(7, step, stream, 2) % 2**32 for step in range(60_000) for stream in (0, 1)
    }
    assert len(low) == 120_000
    assert micro_batch_seed(7, 1000, 0, 2) % 2**32 != micro_batch_seed(7, 66_535, 1, 2) % 2**32
    # and another run seed draws otherwise at the same step and stream
    assert micro_batch_seed(8, 1000, 0, 2) % 2**32 != micro_batch_seed(7, 1000, 0, 2) % 2**32
    assert 0 <= micro_batch_seed(2**40, 10**9, 3, 4) < 2**64
