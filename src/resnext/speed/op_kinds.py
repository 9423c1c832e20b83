"""A step's device time by kind of work (1×1s, grouped 3×3s, batch norms, …), from torch.profiler.

Where `step_ops` times a CPU step with its own dispatch-mode timer, this reads the profiler's
self time per operator (kernel time on CUDA, CPU time on a CPU), tells the convolutions apart by
their weight shapes (kernel size; groups = input channels ÷ the weight's), and sums each kind per
step: what a GPU step's time is made of, and so where one network's extra time over another's
goes.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence

import torch
from torch.profiler import ProfilerActivity, profile

# Operators whose first two shapes are (input, weight) / (grad_output, input, weight).
_CONV_FORWARD = ("convolution", "conv2d")  # aten::cudnn_convolution, aten::mkldnn_convolution…
_CONV_BACKWARD = "convolution_backward"


def conv_kind(input_shape: Sequence[int], weight_shape: Sequence[int]) -> str:
    """'conv 1x1', 'conv 3x3 grouped', 'conv 3x3 dense', 'conv 7x7', … from the shapes."""
    kh, kw = weight_shape[2], weight_shape[3]
    groups = input_shape[1] // weight_shape[1] if weight_shape[1] else 1
    kind = f"conv {kh}x{kw}"
    if kh > 1 or kw > 1:
        kind += " grouped" if groups > 1 else " dense"
    return kind


def op_kind(name: str, shapes: Sequence[Sequence[int]]) -> str:
    """The kind of work of profiler event `name` (an aten operator) with its input `shapes`."""
    op = name.removeprefix("aten::")
    if op.endswith(_CONV_BACKWARD) and len(shapes) >= 3 and len(shapes[2]) == 4:
        return conv_kind(shapes[1], shapes[2]) + " backward"
    if any(key in op for key in _CONV_FORWARD) and len(shapes) >= 2 and len(shapes[1]) == 4:
        return conv_kind(shapes[0], shapes[1])
    if "batch_norm" in op:
        return "batch norm backward" if "backward" in op else "batch norm"
    if "max_pool" in op:
        return "max pooling"
    if op in ("addmm", "mm", "linear", "matmul") or "linear" in op:
        return "classifier"
    if "sgd" in op or "foreach" in op:
        return "optimizer"
    if op in ("relu", "relu_", "add", "add_", "threshold_backward", "clamp_min", "clamp_min_"):
        return "relu / add"
    if op in ("copy_", "to", "_to_copy", "clone", "contiguous"):
        return "copies and casts"
    return "other"


def kind_ms_per_step(
    step: Callable[[], object], device: torch.device, steps: int = 3, warmup: int = 2
) -> dict[str, float]:
    """Milliseconds per call of `step` by kind of work: self device time on CUDA (kernel time of
    the innermost operator that launched it), self CPU time on a CPU."""
    for _ in range(warmup):
        step()
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    if cuda:
        torch.cuda.synchronize(device)
    with profile(activities=activities, record_shapes=True) as prof:
        for _ in range(steps):
            step()
        if cuda:
            torch.cuda.synchronize(device)
    totals: dict[str, float] = defaultdict(float)
    for event in prof.key_averages(group_by_input_shape=True):
        us = _self_device_us(event) if cuda else event.self_cpu_time_total
        if us > 0:
            totals[op_kind(event.key, event.input_shapes or [])] += us / 1e3 / steps
    return dict(sorted(totals.items(), key=lambda kv: -kv[1]))


def _self_device_us(event: object) -> float:
    """An event's self kernel time, under either of torch's names for it."""
    for attribute in ("self_device_time_total", "self_cuda_time_total"):
        value = getattr(event, attribute, None)
        if value is not None:
            return float(value)
    return 0.0
