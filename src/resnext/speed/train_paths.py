"""The CPU training fast paths, switched on together: what `resnext train` and `bench train` apply."""

from __future__ import annotations

from torch import nn

from resnext.speed.fused_bn import use_fused_batchnorm
from resnext.speed.grouped_train import use_grouped_kernels
from resnext.speed.maxpool import use_fast_maxpool
from resnext.speed.pointwise_train import use_gemm_weight_grad


def use_training_fast_paths(
    model: nn.Module,
    *,
    fused_bn: bool,
    grouped_kernels: bool,
    gemm_weight_grad: bool,
    fast_maxpool: bool = False,
    fp16_products: bool = False,
) -> None:
    """Give `model`'s layers the chosen fast-path classes in place (`train.<name>` in a config);
    `fp16_products` lets the float32 1×1 products of `gemm_weight_grad` run in float16."""
    if fp16_products and not gemm_weight_grad:
        raise ValueError(
            "fp16_products: the float16 products are gemm_weight_grad's; enable it too"
        )
    if fused_bn:
        use_fused_batchnorm(model)
    if grouped_kernels:
        use_grouped_kernels(model)
    if gemm_weight_grad:
        use_gemm_weight_grad(model, fp16_products)
    if fast_maxpool:
        use_fast_maxpool(model)
