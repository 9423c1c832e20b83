"""The step breakdown: operator kinds, the ceiling arithmetic, and a real step's FLOPs by hand."""

from __future__ import annotations

import contextlib
import dataclasses

import pytest

import resnext
from resnext.models.complexity import count
from resnext.speed import autotune
from resnext.speed.op_times import OpTotals
from resnext.speed.peak import Peaks
from resnext.speed.step_ops import StepOps, by_kind, measure_step_ops, op_kind, roofline


@pytest.mark.parametrize(
    ("label", "sig", "kind"),
    [
        ("convolution", "16x256x56x56:bf16 128x256x1x1:bf16", "1x1 conv"),
        ("convolution", "16x128x56x56:bf16 128x4x3x3:bf16", "grouped 3x3 conv"),
        ("convolution", "16x64x56x56:f32 64x64x3x3:f32", "dense 3x3 conv"),
        ("convolution", "16x64x56x56:f32 128x64x3x3:f32", "dense 3x3 conv"),  # widening
        ("convolution", "16x3x224x224:bf16 64x3x7x7:bf16", "stem conv"),
        ("convolution_backward", "16x64x112x112:bf16 16x3x224x224:bf16 64x3x7x7:bf16", "stem conv"),
        (
            "convolution_backward",
            "16x1024x14x14:bf16 16x512x14x14:bf16 1024x512x1x1:bf16",
            "1x1 conv",
        ),
        ("grouped_conv3x3 (ours)", "16x128x56x56:bf16 128x4x3x3:bf16", "grouped 3x3 conv"),
        (
            "gemm_weight_grad (ours)",
            "16x512x14x14:bf16 16x1024x14x14:bf16",
            "1x1 weight grad (GEMM)",
        ),
        ("addmm", "1000:f32 16x2048:bf16 2048x1000:bf16", "fc"),
        ("mm", "16x1000:bf16 1000x2048:bf16", "fc"),
        ("bn_act_backward", "16x256x56x56:bf16", "batch norm + ReLU + add"),
        ("native_batch_norm", "16x256x56x56:bf16 256:f32", "batch norm + ReLU + add"),
        ("threshold_backward", "16x256x56x56:bf16 16x256x56x56:bf16", "batch norm + ReLU + add"),
        ("add_", "16x256x56x56:bf16 16x256x56x56:bf16", "batch norm + ReLU + add"),
        ("add", "1000:f32 1000:f32", "other"),
        ("_fused_sgd_", "", "SGD update"),
        ("max_pool2d_with_indices", "16x64x112x112:bf16", "other"),
    ],
)
def test_op_kind(label: str, sig: str, kind: str) -> None:
    assert op_kind(label, sig) == kind


def test_ceiling_is_flop_at_peak_for_compute_and_bytes_at_bandwidth_for_the_rest() -> None:
    peaks = Peaks(threads=2, fp32_gflops=500.0, bf16_gflops=1000.0, read_gbps=50.0, copy_gbps=40.0)
    totals = {
        # 2 steps: 40 GFLOP in bf16 (40 ms at the bf16 peak), measured 100 ms
        ("convolution", "16x256x56x56:bf16 128x256x1x1:bf16"): OpTotals(4, 0.100, 40 * 10**9, 1),
        # 10 GFLOP in fp32: 20 ms at the fp32 peak
        ("convolution", "16x64x56x56:f32 64x64x3x3:f32"): OpTotals(2, 0.050, 10 * 10**9, 1),
        # 800 MB at 40 GB/s: 20 ms
        ("bn_act_forward", "16x256x56x56:bf16"): OpTotals(6, 0.060, 0, 800 * 10**6),
    }
    step = StepOps("m", "cl-bf16", batch=16, steps=2, plain_ms=110.0, timed_ms=120.0, totals=totals)
    kinds = by_kind(step, peaks)
    assert kinds["1x1 conv"]["ms"] == pytest.approx(50.0)
    assert kinds["1x1 conv"]["ceiling_ms"] == pytest.approx(20.0)
    assert kinds["dense 3x3 conv"]["ceiling_ms"] == pytest.approx(10.0)
    assert kinds["batch norm + ReLU + add"]["ceiling_ms"] == pytest.approx(10.0)
    assert kinds["batch norm + ReLU + add"]["mb"] == pytest.approx(400.0)
    summary = roofline(step, kinds)
    assert summary["sum_of_ops_ms"] == pytest.approx(105.0)
    assert summary["ceiling_ms"] == pytest.approx(40.0)
    assert summary["ceiling_img_per_s"] == pytest.approx(400.0)
    # convolutions at peak (30 ms) plus the batch norm as measured (30 ms)
    assert summary["compute_at_peak_rest_as_measured_ms"] == pytest.approx(60.0)
    assert summary["plain_img_per_s"] == pytest.approx(16 / 0.110)


# Every kernel must be counted, whichever the chooser takes: pinned to oneDNN, to our AMX kernels
# where they run (else our vector kernels, else the reference), or chosen by timing; in bf16 and
# in float32 (where the 1×1 products have our FMA kernel), and with float16 products.
@pytest.mark.parametrize(
    "variant",
    ["cl-bf16-fused-grouped-gemm", "cl-fp32-fused-grouped-gemm", "cl-fp32-fused-grouped-gemm-fp16"],
)
@pytest.mark.parametrize(
    "pinned",
    [
        (),
        ("onednn",),
        ("ours-amx", "ours-amx-phases", "ours", "ours-phases", "gemm"),
        ("ours-fma", "ours-phases", "ours"),
        ("ours-fp16", "ours-phases", "ours"),
    ],
)
def test_a_real_steps_convolution_flop_is_three_forwards_less_the_stems_input_grad(
    pinned: tuple[str, ...], variant: str
) -> None:
    # 16 channels in 4 groups of 4 at stage 1: the shapes our grouped kernels take.
    spec = dataclasses.replace(
        resnext.create_model("resnext_tiny_in").spec, cardinality=4, base_width=4
    )
    batch, size = 2, 64
    with contextlib.ExitStack() as stack:
        if pinned:
            stack.enter_context(autotune.CHOOSER.prefer(*pinned))
        step = measure_step_ops(spec, variant, batch, size, steps=1, warmup=1)
    kinds = by_kind(step, Peaks(2, 500.0, 1000.0, 40.0, 40.0))
    model = resnext.create_model("resnext_tiny_in")
    fc = model.fc.in_features * model.fc.out_features + model.fc.out_features
    conv_macs = count(spec, input_size=size).macs - fc
    stem_macs = (size // 2) ** 2 * spec.stem_width * 3 * 7 * 7
    conv_flop = sum(
        kinds[k]["gflop"]
        for k in (
            "1x1 conv",
            "1x1 weight grad (GEMM)",
            "grouped 3x3 conv",
            "dense 3x3 conv",
            "stem conv",
        )
    )
    assert conv_flop * 1e9 == pytest.approx(2 * batch * (3 * conv_macs - stem_macs), rel=1e-9)
    assert kinds["batch norm + ReLU + add"]["mb"] > 0
    assert step.plain_ms > 0 and step.rows()[0]["ms_per_step"] >= step.rows()[-1]["ms_per_step"]


@pytest.mark.parametrize("variant", ["cl-fp64", "cl-bf16-compile"])
def test_measure_step_ops_rejects_variants_it_cannot_time(variant: str) -> None:
    with pytest.raises(ValueError, match="variant"):
        measure_step_ops("resnext_tiny_in", variant)
