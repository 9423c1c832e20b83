"""Where a training step's time goes: ResNeXt-50 vs ResNet-50, by phase and by convolution kind.

Usage: .venv/bin/python benchmarks/bench_train_breakdown.py [--batch 16] [--rounds 5]

The step is the `cl-bf16` training variant (channels_last, bf16 autocast, SGD). It is timed whole
and split into forward, backward and optimizer (medians over interleaved rounds). Then every
convolution of each network is collected with its input shape and timed alone, forward and
forward + backward (input and weight gradients; the stem needs no input gradient), in bf16
channels_last; summed per kind (stem, 1x1, grouped 3x3, dense 3x3) with their counts, this says
how much of each step is convolution of which kind, and the rest (batch norm, ReLU, residual adds,
pooling, loss, optimizer) is the step minus the convolutions.
"""

from __future__ import annotations

import time
from collections import Counter

import torch
import torch.nn.functional as F
from torch import nn

import bench_args
import resnext
from resnext.speed.allocator import keep_freed_memory
from resnext.speed.measure import time_call
from resnext.speed.provenance import write_results

MODELS = ("resnext50_32x4d", "resnet50")
PHASES = ("forward", "backward", "optimizer")
ConvKey = tuple[
    tuple[int, ...], tuple[int, ...], int, int, int
]  # x shape, w shape, stride, pad, groups


def conv_kind(w_shape: tuple[int, ...], groups: int, first: bool) -> str:
    if first:
        return "stem"
    if w_shape[2:] == (1, 1):
        return "1x1"
    return "grouped 3x3" if groups > 1 else "dense 3x3"


def collect_convs(model: nn.Module, batch: int) -> tuple[Counter[ConvKey], dict[ConvKey, str]]:
    """Each distinct convolution call of one forward (input shape, weight, stride...) and its count."""
    counts: Counter[ConvKey] = Counter()
    kinds: dict[ConvKey, str] = {}
    hooks = []
    for m in model.modules():
        if isinstance(m, nn.Conv2d):

            def hook(mod: nn.Conv2d, inp: tuple[torch.Tensor, ...]) -> None:
                key = (
                    tuple(inp[0].shape),
                    tuple(mod.weight.shape),
                    mod.stride[0],
                    mod.padding[0],
                    mod.groups,
                )
                counts[key] += 1
                first_call = sum(counts.values()) == 1  # the stem is the first convolution
                kinds.setdefault(key, conv_kind(key[1], key[4], first=first_call))

            hooks.append(m.register_forward_pre_hook(hook))
    with torch.no_grad():
        model(torch.randn(batch, 3, 224, 224))
    for h in hooks:
        h.remove()
    return counts, kinds


def best_ms(fn, rounds: int) -> float:  # type: ignore[no-untyped-def]
    fn()  # warm-up: oneDNN primitive creation, allocator
    return 1e3 * min(time_call(fn, 1) for _ in range(rounds))


def time_conv(key: ConvKey, kind: str, rounds: int) -> tuple[float, float]:
    """(forward ms, forward + backward ms) of one bf16 channels_last convolution."""
    x_shape, w_shape, stride, pad, groups = key
    cl = torch.channels_last
    x = torch.randn(x_shape).to(torch.bfloat16).contiguous(memory_format=cl)
    x.requires_grad_(kind != "stem")
    w = torch.randn(w_shape).to(torch.bfloat16).contiguous(memory_format=cl).requires_grad_()
    with torch.no_grad():
        grad = torch.randn_like(F.conv2d(x, w, None, stride, pad, 1, groups))
    inputs = (x, w) if kind != "stem" else (w,)

    def forward() -> None:
        with torch.no_grad():
            F.conv2d(x, w, None, stride, pad, 1, groups)

    def forward_backward() -> None:
        y = F.conv2d(x, w, None, stride, pad, 1, groups)
        torch.autograd.grad(y, inputs, grad)

    return best_ms(forward, rounds), best_ms(forward_backward, rounds)


def phase_split(models: dict[str, nn.Module], batch: int, rounds: int) -> dict[str, dict]:
    """Median ms per step of forward (with loss), backward and SGD update, rounds interleaved."""
    torch.manual_seed(0)
    x = torch.randn(batch, 3, 224, 224).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (batch,))
    state = {}
    for name, model in models.items():
        model = model.to(memory_format=torch.channels_last).train()
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
        state[name] = (model, opt, {"forward": [], "backward": [], "optimizer": []})

    def step(model: nn.Module, opt: torch.optim.Optimizer) -> tuple[float, float, float]:
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = F.cross_entropy(model(x), y)
        t1 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        t2 = time.perf_counter()
        opt.step()
        return t1 - t0, t2 - t1, time.perf_counter() - t2

    for model, opt, _ in state.values():
        for _ in range(2):  # warm-up: allocator, oneDNN primitive caches
            step(model, opt)
    for _ in range(rounds):
        for model, opt, times in state.values():
            for phase, seconds in zip(PHASES, step(model, opt), strict=True):
                times[phase].append(seconds)
    out = {}
    for name, (_, _, times) in state.items():
        med = {k: 1e3 * sorted(v)[len(v) // 2] for k, v in times.items()}
        med["step"] = sum(med.values())
        med["img_per_s"] = batch / med["step"] * 1e3
        out[name] = med
    return out


def main() -> int:
    parser = bench_args.parser(__doc__, batch=16, rounds=5)
    args = parser.parse_args()
    print(f"allocator: glibc with freed memory kept: {keep_freed_memory()}")
    models = {name: resnext.create_model(name) for name in MODELS}
    phases = phase_split(models, args.batch, args.rounds)
    results: dict[str, object] = {"phases_ms": phases, "convs": {}, "by_kind_ms": {}}
    for name, model in models.items():
        p = phases[name]
        print(
            f"{name}: step {p['step']:.1f} ms ({p['img_per_s']:.1f} img/s) = forward "
            f"{p['forward']:.1f} + backward {p['backward']:.1f} + optimizer {p['optimizer']:.1f}"
        )
        counts, kinds = collect_convs(model.eval(), args.batch)
        totals: dict[str, list[float]] = {}
        rows = []
        for key, count in counts.items():
            fwd, fwd_bwd = time_conv(key, kinds[key], args.rounds)
            kind = kinds[key]
            acc = totals.setdefault(kind, [0.0, 0.0])
            acc[0] += count * fwd
            acc[1] += count * fwd_bwd
            rows.append({"x": key[0], "w": key[1], "stride": key[2], "groups": key[4],
                         "kind": kind, "count": count, "fwd_ms": fwd, "fwd_bwd_ms": fwd_bwd})  # fmt: skip
        conv_total = sum(v[1] for v in totals.values())
        by_kind = {k: {"fwd_ms": v[0], "fwd_bwd_ms": v[1]} for k, v in sorted(totals.items())}
        by_kind["all convolutions"] = {"fwd_ms": sum(v[0] for v in totals.values()),
                                       "fwd_bwd_ms": conv_total}  # fmt: skip
        by_kind["rest of the step"] = {"fwd_bwd_ms": p["step"] - conv_total}
        results["convs"][name] = rows
        results["by_kind_ms"][name] = by_kind
        for k, v in by_kind.items():
            fwd = f"forward {v['fwd_ms']:6.1f}, " if "fwd_ms" in v else ""
            print(f"  {k:17s} {fwd}forward+backward {v['fwd_bwd_ms']:6.1f} ms per step")
    x_step, r_step = (phases[m]["step"] for m in MODELS)
    results["step_ratio"] = x_step / r_step
    print(f"ResNeXt-50 / ResNet-50 step time: {x_step / r_step:.3f}")
    path = write_results(args.out, "bench-train-breakdown", vars(args),
                         results)  # fmt: skip
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
