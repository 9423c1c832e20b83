"""In-place class swaps that give existing modules a fast-path subclass (and take it back)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from resnext.speed.conv_guard import GuardedConv2d, compute_dtype


def capturing_graph() -> bool:
    """Whether torch is tracing, scripting or compiling, where fast-path subclasses must act as
    their plain class (their kernels are opaque ctypes calls that a captured graph cannot hold)."""
    return torch.jit.is_tracing() or torch.jit.is_scripting() or torch.compiler.is_compiling()


def training_input_dtype(conv: nn.Conv2d, x: torch.Tensor) -> torch.dtype | None:
    """The dtype a CPU training fast path computes `conv(x)` in (autocast's, else x's), or None
    where the fast path must not run: eval mode, a captured graph, or `x` not a 4-D channels-last
    CPU tensor with `conv`'s input channels."""
    if (
        not conv.training
        or capturing_graph()
        or x.dim() != 4
        or x.device.type != "cpu"
        or x.shape[1] != conv.in_channels
        or not x.is_contiguous(memory_format=torch.channels_last)
    ):
        return None
    return compute_dtype(x)


class TrainingFastConv2d(GuardedConv2d):
    """A Conv2d that runs its subclass's fast autograd path in training where `_fast_dtype`
    allows it, and is the plain `nn.Conv2d` everywhere else (guarded against torch's wrong CPU
    weight gradients, `conv_guard`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self._fast_dtype(x)
        if dtype is None:
            return super().forward(x)
        # The fast path casts x and the weight itself; autocast must not cast them again.
        with torch.autocast("cpu", enabled=False):
            return self._fast_forward(x.to(dtype))

    def _fast_dtype(self, x: torch.Tensor) -> torch.dtype | None:
        """The dtype the fast path computes `x` in, or None for the plain convolution."""
        raise NotImplementedError

    def _fast_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The convolution of `x` (already in the compute dtype) by the fast path."""
        raise NotImplementedError


def swap_class(
    model: nn.Module,
    old: type[nn.Module],
    new: type[nn.Module],
    where: Callable[[nn.Module], bool] | None = None,
) -> int:
    """Give every module of exactly class `old` (for which `where` holds) the class `new`; how many.

    Only the class changes: parameters, buffers, state-dict keys and optimizer references stay.
    """
    count = 0
    for module in model.modules():
        if type(module) is old and (where is None or where(module)):
            module.__class__ = new
            count += 1
    return count
