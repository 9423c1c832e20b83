"""A convolution as the frozen compiled graph runs it: oneDNN's fused operator, weight prepacked.

Without a compiled graph (`optimize(..., backend="none")`, `"replay"`) a convolution left to
oneDNN ran as `F.conv2d`, which has oneDNN reorder its weight on every call (measured at 4× the
compiled graph's time for a 7² bf16 1×1 at batch 1), with its ReLU, or its residual add and
ReLU, as operators of their own. `PrepackedConv` runs it, with that epilogue, on oneDNN's fused
operator and a weight packed once for the layer's input size, as inductor's freezing packs it:
`conv_x3_swap.prepack_convs` puts one in place of each groups-1 convolution the eager paths
leave to oneDNN, and the dense-convolution choosers time oneDNN through one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from resnext.speed.kernel_module import KernelModule
from resnext.speed.pointwise_fusion import onednn_weights, prepack_weight

DTYPES = (torch.float32, torch.bfloat16)


def eligible(module: nn.Module) -> bool:
    """A CPU groups-1 convolution in float32 or bf16, without dilation: what the pass packs."""
    return (
        isinstance(module, nn.Conv2d)
        and module.groups == 1
        and module.dilation == (1, 1)
        and module.padding_mode == "zeros"
        and isinstance(module.padding, tuple)
        and module.weight.dtype in DTYPES
        and module.weight.device.type == "cpu"
    )


class PrepackedConv(KernelModule):
    """A groups-1 convolution, then its ReLU or its residual add and ReLU if asked, on oneDNN's
    fused operator with the weight packed for inputs of `input_size`. With `in_place` the
    result is written over the residual (which the pass allows only where it is dead after).
    Inputs the packed weight was not made for (another dtype, layout or device, or one needing
    a gradient) take `F.conv2d` and separate operators: the same function."""

    def __init__(
        self, conv: nn.Conv2d, relu: bool, in_place: bool, input_size: tuple[int, ...]
    ) -> None:
        super().__init__()
        if not eligible(conv):
            raise ValueError(
                f"conv: expected a float32 or bf16 groups-1 CPU convolution, got {conv}"
            )
        self.dtype = conv.weight.dtype
        self.weight, self.bias, self.packed = onednn_weights(conv, self.dtype, input_size)
        self.stride, self.padding = list(conv.stride), list(conv.padding)
        self.input_size = tuple(input_size)
        self.relu, self.in_place = relu, in_place
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels

    def __getstate__(self) -> dict[str, object]:
        # oneDNN's packed weight cannot be copied (copy.deepcopy, pickle): a copy packs again
        state = self.__dict__.copy()
        state["packed"] = None
        return state

    def __setstate__(self, state: dict[str, object]) -> None:
        super().__setstate__(state)
        self.packed = prepack_weight(self.weight, self.padding, self.stride, self.input_size)

    def _packed_runs(self, x: torch.Tensor, residual: torch.Tensor | None) -> bool:
        tensors = [x] if residual is None else [x, residual]
        return (
            self.packed is not None
            and not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))
            and all(
                t.dtype == self.dtype
                and t.device.type == "cpu"
                and t.dim() == 4
                and t.is_contiguous(memory_format=torch.channels_last)
                for t in tensors
            )
        )

    def unpacked(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """The same function with `F.conv2d` and separate operators (no packed weight)."""
        y = F.conv2d(x, self.weight.to(x.dtype), self.bias.to(x.dtype), self.stride, self.padding)
        if residual is not None:
            y = y + residual
        return F.relu(y) if self.relu else y

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        geometry = (self.padding, self.stride, [1, 1], 1)
        if not self._packed_runs(x, residual):
            return self.unpacked(x, residual)
        if residual is not None:
            if self.in_place:
                return torch.ops.mkldnn._convolution_pointwise_.binary(
                    residual, x, self.packed, self.bias, *geometry, "add", 1.0, "relu", [None], ""
                )
            return torch.ops.mkldnn._convolution_pointwise.binary(
                x, residual, self.packed, self.bias, *geometry, "add", 1.0, "relu", [None], ""
            )
        unary = "relu" if self.relu else "none"
        return torch.ops.mkldnn._convolution_pointwise(
            x, self.packed, self.bias, *geometry, unary, [None], ""
        )

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, stride={self.stride}, "
            f"padding={self.padding}, {self.dtype}, prepacked"
            + (", relu" if self.relu else "")
            + (", in place" if self.in_place else "")
        )
