"""The training fast path's grouped 3×3 convolution: each product by the fastest of oneDNN and ours.

`use_grouped_kernels(model)` turns each grouped 3×3 `nn.Conv2d` the kernels take (padding 1,
no bias, 4 or 8 channels per group, stride 1 or 2; with the AVX2 build also 16, 32 or 64 in
float32; with AVX512-BF16 or AMX also 16 or more channels per group, for bf16 only) into a
`TrainingGroupedConv2d` in place (same
parameters and state-dict keys). In training mode on channels-last float32/bfloat16 CPU tensors
(bf16 from autocast included), each of its three products has these implementations:

- the forward: oneDNN, or `kernels/grouped3x3.c` (the diagonal kernel widening bf16 to float32
  FMAs; for bf16 also the AVX512-BF16 pair dot-product kernels, `grouped_kernel.takes_pairs`), or for
  bf16 on a CPU with AMX `kernels/grouped3x3_amx.c` (block-diagonal tile products) and, with 4
  or 8 channels per group at stride 1, `kernels/grouped3x3_quads_amx.c`
  (`resnext.speed.grouped_quads`: 4 or 2 pixels × a group's outputs a tile row, half the tile
  products);
- the input gradient at stride 1: oneDNN, or the same kernels applied to the output gradient
  with each group's weight matrix transposed and its taps flipped; at stride 2 oneDNN, or four
  such convolutions, one per pixel parity, on the same kernels (`resnext.speed.grouped_dgrad`)
  or for bf16 on a CPU with AMX on its tiles (`resnext.speed.grouped_dgrad_amx`);
- the weight gradient: oneDNN, or `kernels/grouped3x3_wgrad.c` (widening, or pair dot products
  for bf16 with a multiple of 32 channels, the only form for 16–64 channels per group), or for
  bf16 on a CPU with AMX
  `kernels/grouped3x3_wgrad_amx.c` (`resnext.speed.grouped_wgrad_amx`: tile products over the
  positions, block-diagonal); its float32 gradient is not rounded to bf16 first.

Which wins depends on the CPU and the shape (on an AMD EPYC the pair kernels won stage 1 by
2–5×; on an Intel Xeon, whose pair dot product runs at half its FMA rate, the widening kernels
win there and oneDNN from 28² on: benchmarks/RESULTS.md), so each product is chosen per shape by
timing the candidates on the first call (`resnext.speed.autotune`). Everywhere else (eval mode,
other devices, layouts or dtypes, tracing, torch.compile, no kernel) it is the plain
`nn.Conv2d`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from resnext.speed import (
    autotune,
    grouped_amx,
    grouped_dgrad,
    grouped_dgrad_amx,
    grouped_kernel,
    grouped_quads,
    grouped_swap,
    grouped_wgrad,
    grouped_wgrad_amx,
)
from resnext.speed.capability import has_avx512_bf16
from resnext.speed.conv_guard import onednn_gradient
from resnext.speed.swap import TrainingFastConv2d, swap_class, training_input_dtype


def transposed_weight(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """The weight whose stride-1, padding-1 grouped convolution maps an output gradient to the
    input gradient: each group's (out, in) matrix transposed, the 3×3 taps flipped."""
    return grouped_dgrad.group_transposed(weight, groups).flip(-1, -2)


def our_kernel(
    x: torch.Tensor, weight: torch.Tensor, groups: int, stride: int, pairs: bool = False
) -> torch.Tensor:
    """conv2d(x, weight, stride, padding=1, groups) by `kernels/grouped3x3.c`, weights packed now;
    `pairs` picks the AVX512-BF16 pair kernels (bf16; `grouped_kernel.takes_pairs`)."""
    packed = grouped_kernel.pack_weights(weight, groups, pairs=pairs)
    return grouped_kernel.run_kernel(x, packed, None, groups, stride)


def amx_kernel(x: torch.Tensor, weight: torch.Tensor, groups: int, stride: int) -> torch.Tensor:
    """conv2d(x, weight, stride, padding=1, groups) in bf16 by `kernels/grouped3x3_amx.c`, weights
    packed now."""
    return grouped_amx.run_kernel(x, grouped_amx.pack_weights(weight, groups), None, groups, stride)


def quads_kernel(x: torch.Tensor, weight: torch.Tensor, groups: int) -> torch.Tensor:
    """conv2d(x, weight, padding=1, groups) of 4- or 8-channel groups in bf16 by
    `kernels/grouped3x3_quads_amx.c`, weights packed now."""
    packed = grouped_quads.pack_weights(weight, groups)
    return grouped_quads.run_kernel(x, packed, None, groups, 1)


def _pairs_apply(x: torch.Tensor, groups: int) -> bool:
    return has_avx512_bf16() and grouped_kernel.takes_pairs(x.shape[1], groups, x.dtype)


def _key(x: torch.Tensor, groups: int, stride: int) -> tuple:
    return (tuple(x.shape), groups, stride, x.dtype)


def conv_candidates(
    x: torch.Tensor, w: torch.Tensor, groups: int, stride: int
) -> dict[str, Callable[[], torch.Tensor]]:
    """Implementations of conv2d(x, w, stride, padding=1, groups), oneDNN's first."""
    candidates = {
        "onednn": lambda: F.conv2d(x, w, None, stride, 1, 1, groups).contiguous(
            memory_format=torch.channels_last
        )
    }
    if grouped_kernel.unavailable_reason(x.dtype) is None and grouped_kernel.supports(
        x.shape[1], groups, stride
    ):
        candidates["ours"] = lambda: our_kernel(x, w, groups, stride)
        if _pairs_apply(x, groups):
            candidates["ours-pairs"] = lambda: our_kernel(x, w, groups, stride, pairs=True)
    if grouped_amx.unavailable_reason(x.dtype) is None and grouped_amx.supports(
        x.shape[1], groups, stride
    ):
        candidates["ours-amx"] = lambda: amx_kernel(x, w, groups, stride)
    if grouped_quads.unavailable_reason(x.dtype) is None and grouped_quads.supports(
        x.shape[1], groups, stride
    ):
        candidates["ours-quads"] = lambda: quads_kernel(x, w, groups)
    return candidates


def input_grad_candidates(
    grad: torch.Tensor, x: torch.Tensor, w: torch.Tensor, groups: int, stride: int
) -> dict[str, Callable[[], torch.Tensor]]:
    """Implementations of the input gradient, oneDNN's first."""
    candidates = {"onednn": lambda: _onednn_backward(grad, x, w, groups, stride, 0)}
    if stride == 1:
        # The stride-1 input gradient is a forward convolution of the output gradient.
        for name, fn in conv_candidates(grad, transposed_weight(w, groups), groups, 1).items():
            if name != "onednn":
                candidates[name] = fn
        return candidates
    # Stride 2: four stride-1 convolutions of the output gradient, one per pixel parity.
    size = (x.shape[2], x.shape[3])
    if grouped_kernel.unavailable_reason(grad.dtype) is None and grouped_kernel.supports(
        x.shape[1], groups, stride
    ):
        candidates["ours-phases"] = lambda: grouped_dgrad.input_grad(grad, w, groups, size)
        if _pairs_apply(grad, groups):
            candidates["ours-pairs-phases"] = lambda: grouped_dgrad.input_grad(
                grad, w, groups, size, pairs=True
            )
    if (
        grad.dtype == torch.bfloat16
        and grouped_dgrad_amx.unavailable_reason() is None
        and grouped_dgrad_amx.supports(x.shape[1], groups)
    ):
        candidates["ours-amx-phases"] = lambda: grouped_dgrad_amx.input_grad(grad, w, groups, size)
    return candidates


def weight_grad_candidates(
    grad: torch.Tensor, x: torch.Tensor, w: torch.Tensor, groups: int, stride: int
) -> dict[str, Callable[[], torch.Tensor]]:
    """Implementations of the weight gradient, oneDNN's first."""
    candidates = {"onednn": lambda: _onednn_backward(grad, x, w, groups, stride, 1)}
    if grouped_wgrad.unavailable_reason(x.dtype) is None and grouped_wgrad.supports(
        x.shape[1], groups, stride, x.dtype
    ):
        if x.dtype == torch.float32 or grouped_wgrad.widening_takes(x.shape[1], groups):
            candidates["ours"] = lambda: grouped_wgrad.weight_grad(x, grad, groups, stride, False)
        if grouped_wgrad.pairs_apply(x):
            candidates["ours-pairs"] = lambda: grouped_wgrad.weight_grad(
                x, grad, groups, stride, True
            )
    if (
        x.dtype == torch.bfloat16
        and grouped_wgrad_amx.unavailable_reason() is None
        and grouped_wgrad_amx.supports(x.shape[1], groups, stride)
    ):
        candidates["ours-amx"] = lambda: grouped_wgrad_amx.weight_grad(x, grad, groups, stride)
    return candidates


def _onednn_backward(
    grad: torch.Tensor, x: torch.Tensor, w: torch.Tensor, groups: int, stride: int, which: int
) -> torch.Tensor:
    """oneDNN's input (which=0) or weight (which=1) gradient of the grouped convolution."""
    return onednn_gradient(grad, x, w, stride, 1, groups, which)


class _GroupedConv3x3(torch.autograd.Function):
    """conv2d(x, weight, stride, padding=1, groups) in x's dtype; each product by the
    implementation that `autotune` found fastest for this shape."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        x: torch.Tensor,
        weight: torch.Tensor,
        groups: int,
        stride: int,
    ) -> torch.Tensor:
        w = weight.to(x.dtype)
        ctx.groups, ctx.stride, ctx.weight_dtype = groups, stride, weight.dtype
        ctx.save_for_backward(x, w)
        key = _key(x, groups, stride)
        return autotune.run("grouped3x3.forward", key, conv_candidates(x, w, groups, stride))

    @staticmethod
    @once_differentiable
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor
    ) -> tuple[torch.Tensor | None, ...]:
        x, w = ctx.saved_tensors
        groups, stride = ctx.groups, ctx.stride
        grad = grad.contiguous(memory_format=torch.channels_last)
        want_x, want_w = ctx.needs_input_grad[:2]
        key = _key(x, groups, stride)
        dx = dw = None
        if want_x:
            candidates = input_grad_candidates(grad, x, w, groups, stride)
            dx = autotune.run("grouped3x3.input_grad", key, candidates)
        if want_w:
            candidates = weight_grad_candidates(grad, x, w, groups, stride)
            dw = autotune.run("grouped3x3.weight_grad", key, candidates).to(ctx.weight_dtype)
        return dx, dw, None, None


class TrainingGroupedConv2d(TrainingFastConv2d):
    """A grouped 3×3 Conv2d whose training products each run the fastest implementation for its shape."""

    def _fast_forward(self, x: torch.Tensor) -> torch.Tensor:
        return _GroupedConv3x3.apply(x, self.weight, self.groups, self.stride[0])

    def _fast_dtype(self, x: torch.Tensor) -> torch.dtype | None:
        """The dtype the kernels compute `x` in (autocast's, else x's), or None for torch's path."""
        dtype = training_input_dtype(self, x)
        if dtype is None or not takes_module(self):
            return None
        if dtype not in grouped_wgrad.DTYPES or x.dtype not in grouped_wgrad.DTYPES:
            return None
        if (
            grouped_wgrad.unavailable_reason(dtype) is not None
            or grouped_kernel.unavailable_reason(dtype) is not None
        ):
            return None
        if not (_vector_takes(self, dtype) or (dtype == torch.bfloat16 and _amx_takes(self))):
            return None  # no kernel of ours for its groups in this dtype: torch's convolution
        return dtype


def _vector_takes(conv: nn.Conv2d, dtype: torch.dtype) -> bool:
    """Whether the vector kernels (AVX-512, or their AVX2 builds) take every product of `conv`
    in `dtype`."""
    return grouped_wgrad.supports(conv.in_channels, conv.groups, conv.stride[0], dtype)


def _amx_takes(conv: nn.Conv2d) -> bool:
    """Whether the AMX kernels take every product of `conv` (bf16 only; the weight gradient's
    kernel takes the forward's shapes)."""
    return (
        grouped_amx.unavailable_reason() is None
        and grouped_wgrad_amx.unavailable_reason() is None
        and grouped_amx.supports(conv.in_channels, conv.groups, conv.stride[0])
    )


def takes_module(conv: nn.Module) -> bool:
    """Whether `conv` is a grouped 3×3 convolution the training kernels take in some dtype: 4 or
    8 channels per group (the AVX-512 kernels, or their AVX2 builds in float32), or wider groups
    (16–64 per group: the AVX2 builds in float32, the AVX512-BF16 pair kernels or, on a CPU with
    AMX, the AMX kernels in bf16)."""
    return (
        grouped_swap.eligible(conv)  # the forward kernel's shapes: 3×3, padding 1, in = out, ...
        and conv.bias is None
        and (any(_vector_takes(conv, dtype) for dtype in grouped_wgrad.DTYPES) or _amx_takes(conv))
    )


def use_grouped_kernels(model: nn.Module) -> int:
    """Make every grouped 3×3 `nn.Conv2d` the kernels take a `TrainingGroupedConv2d`; how many."""
    return swap_class(model, nn.Conv2d, TrainingGroupedConv2d, takes_module)


def use_plain_grouped_conv(model: nn.Module) -> int:
    """Undo `use_grouped_kernels`: every `TrainingGroupedConv2d` becomes an `nn.Conv2d` again."""
    return swap_class(model, TrainingGroupedConv2d, nn.Conv2d)
