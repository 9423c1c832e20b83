"""`resnext bench gpu`: the peers' parity check, the ratios, a CPU smoke run, and refusals.

The timed comparison itself needs a CUDA device with timm installed (benchmarks/RESULTS.md,
target 5); here the same code runs on the CPU with tiny models so that it is exercised.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

import resnext
from resnext.commands import bench_cmd
from resnext.errors import ConfigError
from resnext.speed import gpu_bench
from resnext.speed.fastpath import model_device, optimize
from resnext.speed.measure import Timing


def test_a_peer_given_our_weights_matches_and_a_different_function_is_caught() -> None:
    torch.manual_seed(0)
    ours, peer = resnext.create_model("resnext_tiny_in"), resnext.create_model("resnext_tiny_in")
    x = torch.randn(2, 3, 64, 64)
    # Different initialisations: without our weights the two disagree...
    assert not torch.allclose(ours.eval()(x), peer.eval()(x))
    # ...with them, the same function to float32 rounding.
    diff = gpu_bench.parity(ours, peer, x)
    assert diff < 1e-6
    gpu_bench.require_parity("peer", diff)
    # A peer whose batch norm divides by another epsilon computes another function.
    for m in peer.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eps = 0.5
    off = gpu_bench.parity(ours, peer, x)
    assert off > gpu_bench.PARITY_TOLERANCE
    with pytest.raises(RuntimeError, match="peer computes another function"):
        gpu_bench.require_parity("peer", off)
    with pytest.raises(RuntimeError):
        gpu_bench.require_parity("peer", float("nan"))


def test_a_peer_with_other_key_names_is_refused() -> None:
    ours = resnext.create_model("resnext_tiny_in")
    with pytest.raises(RuntimeError, match="state_dict"):
        gpu_bench.parity(ours, nn.Sequential(nn.Linear(2, 2)), torch.randn(1, 3, 32, 32))


def test_ratios_by_hand() -> None:
    def t(ms: float) -> Timing:
        return Timing(batch=10, seconds=[ms / 1e3])

    timings = {
        "x/infer-ours-optimize": t(50),  # 200 img/s
        "x/infer-ours-eager": t(100),  # 100
        "x/infer-timm-eager": t(80),  # 125
        "r/infer-ours-optimize": t(40),  # 250
        "r/infer-ours-eager": t(80),
        "r/infer-timm-eager": t(64),
    }
    out = gpu_bench.ratios(timings, ("x", "r"))
    assert out["ours_over_peer"]["x/infer-timm-eager (same way)"] == pytest.approx(100 / 125)
    assert out["ours_over_peer"]["x/infer-timm-eager (our best)"] == pytest.approx(200 / 125)
    # time per image of x over r: 50 / 40 ms
    assert out["model_time_ratio"]["infer-ours-optimize"] == pytest.approx(1.25)
    assert out["model_time_ratio"]["infer-timm-eager"] == pytest.approx(80 / 64)


def test_cpu_smoke_run_writes_results(tmp_path: Path) -> None:
    variants = "infer-ours-eager,train-ours-eager,infer-timm-eager,train-timm-eager"
    argv = ["gpu", "--device", "cpu", "--models", "resnext_tiny,resnet29_1x45d",
            "--variants", variants, "--batch", "2", "--image-size", "16", "--rounds", "2",
            "--iters", "1", "--allocator", "none", "--out", str(tmp_path)]  # fmt: skip
    assert bench_cmd.main(argv) == 0
    (path,) = tmp_path.glob("bench-gpu-*.json")
    record = json.loads(path.read_text())
    results = record["results"]
    ours = {f"{m}/{v}" for m in ("resnext_tiny", "resnet29_1x45d") for v in variants.split(",")[:2]}
    assert ours <= set(results["throughput"])
    assert set(results["model_time_ratio"]) >= {"infer-ours-eager", "train-ours-eager"}
    # bf16 autocast against the float32 model: rounded (8 mantissa bits), yet the same function
    assert 1e-5 < results["max_rel_err"]["resnext_tiny/infer-ours-eager"] < 0.05
    timm_rows = {k for k in results["throughput"] if "-timm-" in k}
    # timm runs (after its parity check) where it imports, else it is skipped with the reason
    if gpu_bench.peer_missing("timm") is None:
        assert len(timm_rows) == 4 and len(results["parity"]) == 2
    else:
        assert not timm_rows and all("timm" in why for why in results["skipped"].values())
        assert len(results["skipped"]) == 4
    assert record["config"]["device"] == "cpu"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_a_gpu_is_one_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert bench_cmd.main(["gpu", "--allocator", "none"]) == 2
    assert "device: 'cuda' asked for" in capsys.readouterr().err


@pytest.mark.parametrize("device", ["tpu", "nonsense:x"])
def test_other_devices_are_refused(device: str) -> None:
    with pytest.raises(ConfigError, match="device"):
        gpu_bench.GpuBenchConfig(device=device).validate()


def test_optimize_refuses_cpu_kernels_on_a_gpu_and_places_by_the_model() -> None:
    model = resnext.create_model("resnext_tiny")
    assert model_device(model) == torch.device("cpu")
    assert model_device(model, "cuda:1") == torch.device("cuda", 1)
    assert model_device(nn.ReLU()) == torch.device("cpu")  # no tensors: the CPU
    with pytest.raises(ConfigError, match="grouped_kernel: 'on' is a CPU kernel"):
        optimize(model, device="cuda", grouped_kernel="on")
    with pytest.raises(ConfigError, match="pointwise_fma"):
        optimize(model, device="cuda", pointwise_fma="on")


def test_our_fast_training_step_merges_what_times_fastest_and_is_ours_only(
    monkeypatch, merge_factor_wins
) -> None:
    from resnext.speed import merged_groups

    x, y = torch.randn(2, 3, 16, 16), torch.randint(0, 10, (2,))
    with pytest.raises(ConfigError, match="'fast' is ours only"):
        gpu_bench.training_step("fast", resnext.create_model("resnext_tiny"), x, y, ours=False)
    merge_factor_wins(2)
    model = resnext.create_model("resnext_tiny")
    monkeypatch.setattr(torch, "compile", lambda m: m)  # the step itself, not inductor, under test
    step = gpu_bench.training_step("fast", model, x, y, ours=True)
    names = merged_groups.grouped_convs(model)
    assert step.group_merges == dict.fromkeys(names, 2)
    assert all(isinstance(model.get_submodule(n), merged_groups.MergedGroupsConv2d) for n in names)
    before = model.get_submodule(names[0]).weight.detach().clone()
    assert torch.isfinite(step())
    assert not torch.equal(model.get_submodule(names[0]).weight, before)  # the update reached it
