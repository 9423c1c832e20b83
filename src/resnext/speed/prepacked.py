"""A convolution as the frozen compiled graph runs it: oneDNN's fused operator, weight prepacked.

Without a compiled graph (`optimize(..., backend="none")`, `"replay"`) a convolution left to
oneDNN ran as `F.conv2d`, which has oneDNN reorder its weight on every call (measured at 4× the
compiled graph's time for a 7² bf16 1×1 at batch 1), with its ReLU, or its residual add and
ReLU, as operators of their own. `PrepackedConv` runs it, with that epilogue, on oneDNN's fused
operator and a weight packed once for the layer's input size, as inductor's freezing packs it:
`dense_swap.prepack_convs` puts one in place of each convolution the eager paths leave to
oneDNN (grouped ones too), and the choosers time oneDNN through one.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from resnext.speed.kernel_module import KernelModule

DTYPES = (torch.float32, torch.bfloat16)


def onednn_weights(
    conv: nn.Conv2d,
    dtype: torch.dtype = torch.bfloat16,
    input_size: Sequence[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """A convolution's weight (`dtype`, channels_last) and bias (`dtype`; zeros where it has
    none), and the weight as the frozen compiled graph hands it to oneDNN's fused ops (prepacked
    for its padding, stride, groups and inputs of `input_size`, as inductor packs it), or None
    where torch lacks the prepacking op. Without the input size oneDNN may pick another
    algorithm: measured, float32 1024→512 at 14² and batch 1 took 14–19 ms instead of 0.8–1.0."""
    weight = conv.weight.detach().to(dtype).contiguous(memory_format=torch.channels_last)
    bias = conv.bias.detach() if conv.bias is not None else torch.zeros(conv.out_channels)
    packed = prepack_weight(weight, list(conv.padding), list(conv.stride), input_size, conv.groups)
    return weight, bias.to(dtype), packed


def prepack_weight(
    weight: torch.Tensor,
    padding: list[int],
    stride: list[int],
    input_size: Sequence[int] | None = None,
    groups: int = 1,
) -> torch.Tensor | None:
    """A convolution's weight packed for oneDNN's fused ops (for inputs of `input_size`), or
    None where torch lacks the packing op."""
    size = None if input_size is None else list(input_size)
    try:
        return torch._C._nn.mkldnn_reorder_conv2d_weight(
            weight.to_mkldnn(), padding, stride, [1, 1], groups, size
        )
    except (AttributeError, RuntimeError, NotImplementedError):
        return None


def eligible(module: nn.Module) -> bool:
    """A CPU convolution in float32 or bf16, without dilation: what the pass packs."""
    return (
        isinstance(module, nn.Conv2d)
        and module.dilation == (1, 1)
        and module.padding_mode == "zeros"
        and isinstance(module.padding, tuple)
        and module.weight.dtype in DTYPES
        and module.weight.device.type == "cpu"
    )


class PrepackedConv(KernelModule):
    """A convolution, then its ReLU or its residual add and ReLU if asked, on oneDNN's fused
    operator with the weight packed for inputs of `input_size`. With `in_place` the result is
    written over the residual (which the pass allows only where it is dead after). Inputs the
    packed weight was not made for (another dtype, layout or device, or one needing a
    gradient), and every input where this torch's fused operator is missing or refuses a probe
    (`_probe`), take `F.conv2d` and separate operators: the same function."""

    def __init__(
        self, conv: nn.Conv2d, relu: bool, in_place: bool, input_size: tuple[int, ...]
    ) -> None:
        super().__init__()
        if not eligible(conv):
            raise ValueError(
                f"conv: expected a float32 or bf16 CPU convolution without dilation, got {conv}"
            )
        self.dtype = conv.weight.dtype
        self.weight, self.bias, self.packed = onednn_weights(conv, self.dtype, input_size)
        self.stride, self.padding = list(conv.stride), list(conv.padding)
        self.groups = conv.groups
        self.input_size = tuple(input_size)
        self.relu, self.in_place = relu, in_place
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self._probe(self.packed)

    def _probe(self, packed: torch.Tensor | None) -> None:
        """Keep `packed` where the fused operator takes it on a small input of the kind it was
        packed for, and note whether the add-and-ReLU one does too (`adds`: for bf16 grouped
        convolutions this torch's falls back to an add_relu without bf16)."""
        self.packed, self.adds = packed, False
        if packed is None:
            return
        _, c, h, w = self.input_size
        x = torch.zeros(1, c, min(h, 4), min(w, 4), dtype=self.dtype)
        x = x.contiguous(memory_format=torch.channels_last)
        with torch.no_grad():
            try:
                y = self(x)
            except (AttributeError, RuntimeError, NotImplementedError):
                self.packed = None
                return
            if self.relu:
                self.adds = True
                try:
                    self(x, y.clone())
                except (AttributeError, RuntimeError, NotImplementedError):
                    self.adds = False

    def __getstate__(self) -> dict[str, object]:
        # oneDNN's packed weight cannot be copied (copy.deepcopy, pickle): a copy packs again
        state = self.__dict__.copy()
        state["packed"] = None
        return state

    def __setstate__(self, state: dict[str, object]) -> None:
        super().__setstate__(state)
        packed = prepack_weight(
            self.weight, self.padding, self.stride, self.input_size, self.groups
        )
        self._probe(packed)

    def _packed_runs(self, x: torch.Tensor, residual: torch.Tensor | None) -> bool:
        tensors = [x] if residual is None else [x, residual]
        return (
            self.packed is not None
            and (residual is None or self.adds)
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
        weight, bias = self.weight.to(x.dtype), self.bias.to(x.dtype)
        y = F.conv2d(x, weight, bias, self.stride, self.padding, 1, self.groups)
        if residual is not None:
            y = y + residual
        return F.relu(y) if self.relu else y

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        geometry = (self.padding, self.stride, [1, 1], self.groups)
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
            f"padding={self.padding}, groups={self.groups}, {self.dtype}, prepacked"
            + (", relu" if self.relu else "")
            + (", in place" if self.in_place else "")
        )
