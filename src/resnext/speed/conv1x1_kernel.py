"""The base class of the 1×1 convolution modules the fast path swaps in: one kernel each."""

from __future__ import annotations

import torch
from torch import nn

from resnext.speed import operators
from resnext.speed.kernel_module import KernelModule


def float_bias(conv: nn.Conv2d) -> torch.Tensor:
    """The convolution's bias as a contiguous float32 tensor (zeros where it has none)."""
    bias = conv.bias if conv.bias is not None else torch.zeros(conv.out_channels)
    return bias.detach().float().contiguous()


class Conv1x1Kernel(KernelModule):
    """A 1×1 convolution with its bias, then optionally a residual add and a ReLU, computed by
    one of our operators: `OP` into a new output, or `OP_IN_PLACE` written over the residual.

    With `in_place` the result is written over the residual, which must then be dead after this
    call (the pass sets it only where the graph shows that). The packed weight and bias are plain
    attributes, as in `ConvX3`, so that a later ``.to(dtype)`` leaves them packed. A subclass
    whose kernel takes only some inputs says which (`takes`) and computes the others the same
    way with torch's operators (`fallback`).
    """

    OP: object  # the torch operator of each kind, set by the subclasses
    OP_IN_PLACE: object
    KIND = ""  # what `extra_repr` calls the kernel

    def __init__(self, conv: nn.Conv2d, packed: torch.Tensor, relu: bool, in_place: bool) -> None:
        super().__init__()
        self.packed = packed
        self.bias = float_bias(conv)
        self.stride = conv.stride[0]
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.relu, self.in_place = relu, in_place

    def _args(self, x: torch.Tensor) -> tuple:
        """The operator's arguments before the residual."""
        raise NotImplementedError

    def takes(self, x: torch.Tensor) -> bool:
        """Whether the kernel computes this input (else `fallback` does)."""
        return True

    def fallback(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """The same function with torch's operators, for inputs the kernel does not take."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        if not self.takes(x):
            return self.fallback(x, residual)
        return operators.call_over_residual(
            self.OP, self.OP_IN_PLACE, self._args(x), residual, self.in_place
        )

    def kind(self) -> str:
        """What `extra_repr` calls the kernel."""
        return self.KIND

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size=(1, 1), stride={self.stride}, "
            + self.kind()
            + (", relu" if self.relu else "")
            + (", in place" if self.in_place else "")
        )


def float32_cpu_inference(x: torch.Tensor) -> bool:
    """Whether `x` is a 4-d float32 CPU tensor that needs no gradient: what the float32 1×1
    kernels take."""
    return (
        x.dim() == 4
        and x.dtype == torch.float32
        and x.device.type == "cpu"
        and not (torch.is_grad_enabled() and x.requires_grad)
    )
