"""The training fast path's batch norm: BN + ReLU (+ the block's residual add) in two passes each way.

`use_fused_batchnorm(model)` turns every `nn.BatchNorm2d` of a model into a `FusedBatchNorm2d`
in place (same parameters, buffers and state-dict keys). In training mode, on channels-last
float32/bfloat16 CPU tensors, a fused BN computes its batch statistics, normalisation, the
following ReLU and a residual addition with `kernels/bn_act.c` and has a hand-written backward;
everywhere else (eval mode, other devices or layouts, tracing, torch.compile) it is the plain
`nn.BatchNorm2d` followed by the plain ops. Blocks reach the fused form through
`resnext.models.layers.norm_act`.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from resnext.speed import bn_kernel
from resnext.speed.swap import capturing_graph, swap_class


class _BatchNormAct(torch.autograd.Function):
    """relu?(BN(x) [+ residual]) with batch statistics; also returns the mean and biased variance.

    The backward is batch norm's closed form: with gm the gradient through the ReLU's mask and
    x̂ = (x − μ)·r, dβ = Σ gm, dγ = Σ gm·x̂, dx = γ·r·(gm − Σgm/N − x̂·Σ(gm·x̂)/N).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        x: torch.Tensor,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        residual: torch.Tensor | None,
        eps: float,
        relu: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # With a residual the ReLU's input is not recomputable from x alone: the forward saves
        # its mask as bits (1/16 of the bytes of rereading a bf16 output in the backward).
        with_bits = relu and residual is not None
        out, mean, invstd, var, bits = bn_kernel.forward(
            x, weight, bias, eps, residual, relu, want_bits=with_bits
        )
        if not relu:
            ctx.mask = bn_kernel.MASK_NONE
        else:
            ctx.mask = bn_kernel.MASK_FROM_BITS if with_bits else bn_kernel.MASK_FROM_X
        ctx.has_residual = residual is not None
        ctx.save_for_backward(x, bits, weight, bias, mean, invstd)
        ctx.mark_non_differentiable(mean, var)
        # mean and var get no gradient; without this autograd would make two zero tensors per call
        # to stand for them. (Backward only runs when `out` has a gradient.)
        ctx.set_materialize_grads(False)
        return out, mean, var

    @staticmethod
    @once_differentiable  # a clear error for create_graph=True instead of wrong second derivatives
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor, *_: torch.Tensor | None
    ) -> tuple[torch.Tensor | None, ...]:
        x, bits, weight, bias, mean, invstd = ctx.saved_tensors
        grad = grad.contiguous(memory_format=torch.channels_last)
        dx, dweight, dbias, d_residual = bn_kernel.backward(
            grad, x, bits, weight, bias, mean, invstd, ctx.mask, ctx.has_residual
        )
        # The kernel returns float32 parameter gradients exactly when the parameters exist.
        if weight is not None:
            dweight = dweight.to(weight.dtype)
        if bias is not None:
            dbias = dbias.to(bias.dtype)
        return dx, dweight, dbias, d_residual, None, None


class FusedBatchNorm2d(nn.BatchNorm2d):
    """A BatchNorm2d whose training forward, with its ReLU and residual add, runs `kernels/bn_act.c`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_act(x, relu=False)

    def forward_act(
        self, x: torch.Tensor, residual: torch.Tensor | None = None, relu: bool = True
    ) -> torch.Tensor:
        """relu?(self(x) [+ residual]) in one fused call when it can, else with torch's ops."""
        if not self._fusable(x, residual):
            out = super().forward(x)
            if residual is not None:
                out = out + residual
            return torch.relu(out) if relu else out
        out, mean, var = _BatchNormAct.apply(x, self.weight, self.bias, residual, self.eps, relu)
        self._update_running_stats(mean, var, x.numel() // x.shape[1])
        return out

    def _uses_batch_stats(self) -> bool:
        return self.training or self.running_mean is None

    def _fusable(self, x: torch.Tensor, residual: torch.Tensor | None) -> bool:
        if (
            not self._uses_batch_stats()
            or capturing_graph()
            or not bn_kernel.takes(x)
            or bn_kernel.unavailable_reason() is not None
        ):
            return False
        return residual is None or (
            residual.shape == x.shape and residual.dtype == x.dtype and bn_kernel.takes(residual)
        )

    @torch.no_grad()
    def _update_running_stats(self, mean: torch.Tensor, var: torch.Tensor, count: int) -> None:
        if not (self.training and self.track_running_stats) or self.running_mean is None:
            return
        # The same schedule as nn.BatchNorm2d: a fixed momentum, or a cumulative average if None.
        self.num_batches_tracked.add_(1)
        factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        if bn_kernel.update_running(self.running_mean, self.running_var, mean, var, factor, count):
            return
        unbiased = var * count / max(count - 1, 1)
        self.running_mean.mul_(1 - factor).add_(mean.to(self.running_mean.dtype), alpha=factor)
        self.running_var.mul_(1 - factor).add_(unbiased.to(self.running_var.dtype), alpha=factor)


def use_fused_batchnorm(model: nn.Module) -> int:
    """Make every plain `nn.BatchNorm2d` of `model` a `FusedBatchNorm2d`, in place; how many.

    Only the class changes: parameters, buffers, state-dict keys and optimizer references stay.
    """
    return swap_class(model, nn.BatchNorm2d, FusedBatchNorm2d)


def use_plain_batchnorm(model: nn.Module) -> int:
    """Undo `use_fused_batchnorm`: every `FusedBatchNorm2d` becomes an `nn.BatchNorm2d` again."""
    return swap_class(model, FusedBatchNorm2d, nn.BatchNorm2d)
