"""Where a training step's time goes, operator by operator, against this machine's measured ceilings.

`measure_step_ops` runs real training steps (`resnext bench train`'s variants) under an
`OpTimer`, with the project's C kernels timed as spans; `by_kind` sums the operators into kinds
(1×1 convolutions, grouped 3×3, batch norm, ...); `roofline` puts each kind next to what it would
take at this machine's arithmetic peak or memory bandwidth, whichever binds, and so gives the
fastest step this machine could run with the same operators.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

import resnext
from resnext.models.network import build_model
from resnext.models.spec import ModelSpec
from resnext.speed import (
    bn_kernel,
    grouped_dgrad,
    grouped_dgrad_amx,
    grouped_train,
    grouped_wgrad,
    grouped_wgrad_amx,
    maxpool,
    pointwise_fma,
    pointwise_fp16,
    pointwise_gemm,
    pointwise_train,
    pointwise_wgrad_amx,
)
from resnext.speed.measure import Timing, time_call
from resnext.speed.op_times import Instrumented, OpTimer, OpTotals, instrument
from resnext.speed.peak import Peaks
from resnext.speed.train_bench import VARIANTS, make_step

Shape = tuple[int, ...]


# As in op_times.conv_backward_flop: each output value meets weight[0], C_in/groups × 3 × 3.
def _grouped_forward_flop(args: tuple, out: torch.Tensor) -> int:
    return 2 * out.numel() * args[1][0].numel()  # args: (x, weight, groups, stride)


def _grouped_dgrad_flop(args: tuple, out: torch.Tensor) -> int:
    return 2 * args[0].numel() * args[1][0].numel()  # args: (grad, weight, groups, input size)


def _grouped_wgrad_flop(args: tuple, out: torch.Tensor) -> int:
    return 2 * args[1].numel() * out[0].numel()  # args: (x, grad, ...); out: dw


def _gemm_wgrad_flop(args: tuple, out: torch.Tensor) -> int:
    x, grad = args[0], args[1]
    rows = grad.numel() // grad.shape[1]  # output pixels: the stride-2 case reads fewer of x
    return 2 * rows * x.shape[1] * grad.shape[1]


def _gemm_product_flop(args: tuple, out: torch.Tensor) -> int:
    return 2 * out.numel() * args[1].shape[0 if out.shape[1] == args[1].shape[1] else 1]


def _pointwise_product_flop(args: tuple, out: torch.Tensor) -> int:
    x = args[0]  # args: (x, packed, ...); out: (N, C, H', W')
    return 2 * out.numel() * x.shape[1]


KERNEL_SPANS = (
    Instrumented(bn_kernel, "forward", "bn_act_forward"),
    Instrumented(bn_kernel, "backward", "bn_act_backward"),
    Instrumented(grouped_train, "our_kernel", "grouped_conv3x3 (ours)", _grouped_forward_flop),
    Instrumented(grouped_train, "amx_kernel", "grouped_conv3x3 (ours, AMX)", _grouped_forward_flop),
    Instrumented(grouped_wgrad, "weight_grad", "grouped_conv3x3_wgrad (ours)", _grouped_wgrad_flop),
    Instrumented(pointwise_train, "gemm_weight_grad", "gemm_weight_grad (ours)", _gemm_wgrad_flop),
    Instrumented(pointwise_train, "gemm_forward", "pointwise_gemm mm", _gemm_product_flop),
    Instrumented(pointwise_train, "gemm_input_grad", "pointwise_gemm mm", _gemm_product_flop),
    Instrumented(maxpool, "forward", "maxpool (ours)"),
    Instrumented(maxpool, "backward", "maxpool_backward (ours)"),
    Instrumented(
        pointwise_gemm, "matmul_channels", "pointwise_gemm (ours)", _pointwise_product_flop
    ),
    # the fork's input gradient with the shortcut's added in the store (the inference product)
    Instrumented(pointwise_gemm, "conv1x1", "pointwise_gemm conv (ours)", _pointwise_product_flop),
    Instrumented(pointwise_gemm, "pack_forward", "pointwise_gemm pack (ours)"),
    # float32: the FMA product (forward, stride-1 input gradients) and its packing, per call
    Instrumented(pointwise_fma, "run", "pointwise_fma (ours)", _pointwise_product_flop),
    Instrumented(pointwise_fma, "pack", "pointwise_fma pack (ours)"),
    Instrumented(pointwise_gemm, "pack_input_grad", "pointwise_gemm pack (ours)"),
    # float16 products (`train.fp16_products`): forward and input gradients, packed per call
    Instrumented(pointwise_fp16, "run", "pointwise_fp16 (ours)", _pointwise_product_flop),
    Instrumented(pointwise_fp16, "pack", "pointwise_fp16 pack (ours)"),
    Instrumented(pointwise_fp16, "weight_grad", "pointwise_wgrad fp16 (ours)", _gemm_wgrad_flop),
    Instrumented(pointwise_gemm, "weight_grad", "pointwise_wgrad (ours)", _gemm_wgrad_flop),
    Instrumented(
        grouped_wgrad_amx, "weight_grad", "grouped_conv3x3_wgrad (ours, AMX)", _grouped_wgrad_flop
    ),
    Instrumented(grouped_dgrad, "input_grad", "grouped_conv3x3_dgrad (ours)", _grouped_dgrad_flop),
    Instrumented(
        grouped_dgrad_amx, "input_grad", "grouped_conv3x3_dgrad (ours, AMX)", _grouped_dgrad_flop
    ),
    Instrumented(
        pointwise_wgrad_amx, "weight_grad", "pointwise_wgrad (ours, AMX)", _gemm_wgrad_flop
    ),
)

KINDS = (
    "1x1 conv",
    "1x1 weight grad (GEMM)",
    "grouped 3x3 conv",
    "dense 3x3 conv",
    "stem conv",
    "fc",
    "batch norm + ReLU + add",
    "SGD update",
    "other",
)
COMPUTE_KINDS = KINDS[:6]  # bound by arithmetic; the rest by memory


# PyTorch's own batch norm and ReLU, forward and backward: what a step runs where our kernel
# (`bn_kernel`) does not, e.g. on CPUs without AVX-512.
_TORCH_BN_ACT = frozenset(
    {
        "native_batch_norm",
        "native_batch_norm_backward",
        "_native_batch_norm_legit",
        "_native_batch_norm_legit_no_training",
        "_native_batch_norm_legit_functional",
        "batch_norm_backward",
        "relu",
        "relu_",
        "threshold_backward",
    }
)


def _shapes(sig: str) -> list[Shape]:
    return [tuple(int(d) for d in part.split(":")[0].split("x") if d) for part in sig.split()]


def _conv_kind(x: Shape, weight: Shape) -> str:
    if len(x) != 4 or len(weight) != 4:
        return "other"
    if weight[2:] == (1, 1):
        return "1x1 conv"
    if x[1] == 3:  # the image's three channels: the stem
        return "stem conv"
    return "grouped 3x3 conv" if x[1] != weight[1] else "dense 3x3 conv"


def op_kind(label: str, sig: str) -> str:
    """The kind of work one recorded operator is (one of KINDS), from its name and signature."""
    shapes = _shapes(sig)
    if label == "convolution" and len(shapes) >= 2:
        return _conv_kind(shapes[0], shapes[1])
    if label == "convolution_backward" and len(shapes) >= 3:
        return _conv_kind(shapes[1], shapes[2])
    if label.startswith("grouped_conv3x3"):
        return "grouped 3x3 conv"
    # our 1×1 products and their packings
    if label.startswith(("pointwise_gemm", "pointwise_fma", "pointwise_fp16")):
        return "1x1 conv"
    if label.startswith(("gemm_weight_grad", "pointwise_wgrad")):
        return "1x1 weight grad (GEMM)"
    if label in ("mm", "addmm"):  # the GEMM weight gradients are spans: these are the classifier
        return "fc"
    if label.startswith("bn_act") or label in _TORCH_BN_ACT:
        return "batch norm + ReLU + add"
    if label in ("add", "add_") and shapes and len(shapes[0]) == 4:  # the residual add
        return "batch norm + ReLU + add"
    if "sgd" in label:
        return "SGD update"
    return "other"


@dataclass(frozen=True)
class StepOps:
    """One model's step under the timer: plain step time, timed step time, per-operator totals."""

    model: str
    variant: str
    batch: int
    steps: int
    plain_ms: float  # median step without the timer
    timed_ms: float  # mean step with the timer (its overhead included)
    totals: dict[tuple[str, str], OpTotals]

    def rows(self) -> list[dict[str, object]]:
        """Every (operator, signature) with its kind and per-step ms, GFLOP and MB, slowest first."""
        out = [
            {
                "op": label,
                "signature": sig,
                "kind": op_kind(label, sig),
                "calls_per_step": t.calls / self.steps,
                "ms_per_step": 1e3 * t.seconds / self.steps,
                "gflop_per_step": t.flop / self.steps / 1e9,
                "mb_per_step": t.nbytes / self.steps / 1e6,
            }
            for (label, sig), t in self.totals.items()
        ]
        return sorted(out, key=lambda r: -float(r["ms_per_step"]))


def measure_step_ops(
    model: str | ModelSpec,
    variant: str = "cl-bf16-fused-grouped-gemm-pool",
    batch: int = 16,
    image_size: int = 224,
    steps: int = 3,
    warmup: int = 4,
    seed: int = 0,
) -> StepOps:
    """Time `steps` training steps of `model` (a registry name or a spec) done the `variant` way."""
    if variant not in VARIANTS:
        raise ValueError(f"variant: expected one of {VARIANTS}, got {variant!r}")
    if variant.endswith("-compile"):
        raise ValueError(
            f"variant: {variant!r} runs inductor's generated kernels, which the operator timer "
            "cannot see; choose an eager variant"
        )
    if steps < 1 or warmup < 0 or batch < 1:
        raise ValueError(
            f"steps, warmup, batch: expected >= 1, >= 0, >= 1; got {steps, warmup, batch}"
        )
    torch.manual_seed(seed)
    net = (resnext.create_model(model) if isinstance(model, str) else build_model(model)).train()
    x = torch.randn(batch, 3, image_size, image_size)
    y = torch.randint(0, net.num_classes, (batch,))
    step: Callable[[], float] = make_step(net, variant, x, y)
    for _ in range(warmup):
        step()
    plain = Timing(batch, [time_call(step, 1) for _ in range(steps)])
    timer = OpTimer()
    with instrument(timer, KERNEL_SPANS), timer:
        timed = time_call(step, steps)
    name = model if isinstance(model, str) else "spec"
    return StepOps(name, variant, batch, steps, 1e3 * plain.median_s, 1e3 * timed, timer.totals)


def _dtype(sig: str) -> torch.dtype:
    return torch.bfloat16 if ":bf16" in sig else torch.float32


def by_kind(result: StepOps, peaks: Peaks) -> dict[str, dict[str, float]]:
    """Per kind: ms, GFLOP and MB per step, and the ms it would take at the machine's ceiling.

    The ceiling of one operator is its FLOP at the arithmetic peak of its dtype for the compute
    kinds, its bytes at the measured copy bandwidth for the rest.
    """
    kinds = {k: {"ms": 0.0, "gflop": 0.0, "mb": 0.0, "ceiling_ms": 0.0} for k in KINDS}
    for (label, sig), t in result.totals.items():
        kind = op_kind(label, sig)
        row = kinds[kind]
        row["ms"] += 1e3 * t.seconds / result.steps
        row["gflop"] += t.flop / result.steps / 1e9
        row["mb"] += t.nbytes / result.steps / 1e6
        if kind in COMPUTE_KINDS:
            bound = t.flop / (peaks.gflops(_dtype(sig)) * 1e9)
        else:
            bound = t.nbytes / (peaks.copy_gbps * 1e9)
        row["ceiling_ms"] += 1e3 * bound / result.steps
    return kinds


def roofline(result: StepOps, kinds: dict[str, dict[str, float]]) -> dict[str, float]:
    """The step now and at the ceiling (`kinds` from `by_kind`): measured ms, ceiling img/s."""
    summed = sum(k["ms"] for k in kinds.values())
    ceiling = sum(k["ceiling_ms"] for k in kinds.values())
    compute_at_peak = sum(
        kinds[k]["ceiling_ms"] if k in COMPUTE_KINDS else kinds[k]["ms"] for k in KINDS
    )
    return {
        "plain_step_ms": result.plain_ms,
        "plain_img_per_s": 1e3 * result.batch / result.plain_ms,
        "timed_step_ms": result.timed_ms,
        "sum_of_ops_ms": summed,
        "compute_at_peak_rest_as_measured_ms": compute_at_peak,
        "compute_at_peak_rest_as_measured_img_per_s": 1e3 * result.batch / compute_at_peak,
        "ceiling_ms": ceiling,
        "ceiling_img_per_s": 1e3 * result.batch / ceiling,
    }
