"""`train.amp: auto` picks bf16 only where the CPU runs it natively and faster than float32;
explicit choices are kept; `train.fp16_products` says why it cannot act where it cannot."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from resnext.errors import ConfigError
from resnext.speed import capability, pointwise_fp16
from resnext.train import precision
from resnext.train.precision import fp16_products_offer, fp16_products_unused, resolve_amp

CPU = torch.device("cpu")


@pytest.mark.parametrize(("faster", "expected"), [(True, torch.bfloat16), (False, None)])
def test_auto_on_cpu_is_bf16_only_where_bf16_is_faster(
    faster: bool, expected: torch.dtype | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Without AVX512-BF16 or AMX, bf16 autocast is emulated: a convolution ran 8x slower than in
    # float32 on an AVX2-only CPU (benchmarks/RESULTS.md, stop 27); on a Xeon with AVX512-BF16
    # but no AMX, native bf16 steps ran 0.8x float32's speed (stop 53). Auto means float32 there.
    monkeypatch.setattr(precision, "bf16_faster", lambda: faster)
    assert resolve_amp("auto", CPU) is expected


def test_auto_on_cpu_is_float32_where_native_bf16_is_slower(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(capability, "bf16_supported", lambda: True)
    monkeypatch.setattr(capability, "conv_speedup", lambda: 0.6)
    capability.bf16_speedup.cache_clear()
    try:
        assert resolve_amp("auto", CPU) is None
    finally:
        capability.bf16_speedup.cache_clear()


def test_explicit_choices_are_kept_whatever_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(precision, "bf16_faster", lambda: False)
    assert resolve_amp("bfloat16", CPU) is torch.bfloat16
    assert resolve_amp("none", CPU) is None
    with pytest.raises(ConfigError, match=r"train\.amp: float16 autocast is for GPUs"):
        resolve_amp("float16", CPU)


def test_float16_products_say_why_they_cannot_act(monkeypatch) -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr(pointwise_fp16, "unavailable_reason", lambda: None)
    assert fp16_products_unused(None, cpu) is None  # float32 on a CPU with the kernel: they act
    assert fp16_products_unused(torch.bfloat16, cpu) == "this run computes in torch.bfloat16"
    assert "trains on cuda" in fp16_products_unused(None, cuda)
    monkeypatch.setattr(pointwise_fp16, "unavailable_reason", lambda: "this CPU lacks X")
    assert fp16_products_unused(None, cpu) == (
        "the float16 kernel cannot run here (this CPU lacks X)"
    )


def test_float16_products_are_offered_only_where_they_would_act(monkeypatch) -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr(pointwise_fp16, "unavailable_reason", lambda: None)
    # a 1×1 of 64 outputs, bias-free as the fast path takes it
    wide = nn.Sequential(nn.Conv2d(16, 64, 3), nn.Conv2d(64, 64, 1, bias=False))
    offer = fp16_products_offer(wide, None, cpu)
    assert offer is not None and "train.fp16_products=true" in offer
    assert fp16_products_offer(wide, torch.bfloat16, cpu) is None  # bf16: they cannot act
    assert fp16_products_offer(wide, None, cuda) is None
    narrow = nn.Sequential(nn.Conv2d(16, 64, 3), nn.Conv2d(64, 48, 1, bias=False))  # 48 outputs
    assert fp16_products_offer(narrow, None, cpu) is None
    grouped = nn.Sequential(nn.Conv2d(64, 64, 1, groups=2, bias=False))
    assert fp16_products_offer(grouped, None, cpu) is None
    biased = nn.Sequential(nn.Conv2d(64, 64, 1))  # a bias: the 1×1 fast path leaves it to torch
    assert fp16_products_offer(biased, None, cpu) is None
    monkeypatch.setattr(pointwise_fp16, "unavailable_reason", lambda: "this CPU lacks X")
    assert fp16_products_offer(wide, None, cpu) is None


@pytest.mark.parametrize("fast_paths", ["true", "false"])
def test_a_bf16_cpu_run_on_images_16_pixels_wide_keeps_its_weights_finite(
    tmp_path, fast_paths: str
) -> None:
    # With the ImageNet stem, 16-pixel images reach stage 4's stride-2 3×3 one pixel wide, where
    # torch's CPU bf16 weight gradient is wrong (`resnext.speed.conv_guard`, case 1): unguarded,
    # such a run wrote NaN weights into its checkpoint with a finite loss.
    from resnext.config import load_config
    from resnext.train import train

    overrides = [
        "data.image_size=16",
        "model.spec.stem=imagenet",
        "model.spec.depths=[1,1,1,1]",
        "train.amp=bfloat16",
        "epochs=1",
        *(f"train.{name}={fast_paths}" for name in ("fused_bn", "grouped_kernels")),
        f"train.channels_last={fast_paths}",
        f"output_dir={tmp_path}",
    ]
    result = train(load_config("digits_demo", overrides))
    weights = torch.load(result.last_checkpoint, map_location="cpu", weights_only=True)["model"]
    assert all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point())
    # a weight of the layer that meets the narrow input, near its initial scale (~0.1)
    assert weights["layer4.0.conv2.weight"].abs().max() < 10
