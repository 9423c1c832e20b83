"""`train.fused_bn`, `train.grouped_kernels`, `train.gemm_weight_grad` and `train.fast_maxpool` train
the same model as torch's own ops would."""

from __future__ import annotations

import json

import pytest
import torch

from resnext.speed import (
    autotune,
    bn_kernel,
    grouped_kernel,
    grouped_wgrad,
    maxpool,
    pointwise_train,
)
from resnext.train import train

BN_REASON = bn_kernel.unavailable_reason()
GROUPED_REASON = grouped_wgrad.unavailable_reason() or grouped_kernel.unavailable_reason()

# (config key, module whose kernel calls are counted, its functions, train.amp of both runs,
# the implementation pinned in the fast run, why it cannot run here). The GEMM weight gradient
# is a bf16 path only.
CASES = [
    pytest.param(
        "fused_bn", bn_kernel, ("forward", "backward"), "none", (),
        marks=pytest.mark.skipif(BN_REASON is not None, reason=f"bn kernel: {BN_REASON}"),
        id="fused_bn",
    ),
    pytest.param(
        "grouped_kernels", grouped_wgrad, ("weight_grad",), "none", ("ours",),
        marks=pytest.mark.skipif(GROUPED_REASON is not None, reason=f"grouped: {GROUPED_REASON}"),
        id="grouped_kernels",
    ),
    pytest.param(
        "gemm_weight_grad", pointwise_train, ("gemm_weight_grad",), "bfloat16", ("gemm",),
        id="gemm_weight_grad",
    ),
    pytest.param(
        "fast_maxpool", maxpool, ("forward", "backward"), "none", (),
        marks=pytest.mark.skipif(
            maxpool.unavailable_reason() is not None,
            reason=f"max-pool kernel: {maxpool.unavailable_reason()}",
        ),
        id="fast_maxpool",
    ),
]  # fmt: skip


@pytest.mark.parametrize(("key", "module", "names", "amp", "pinned"), CASES)
def test_fast_kernel_run_follows_the_plain_run(
    key, module, names, amp, pinned, tmp_path, tiny_cfg, tiny_data, monkeypatch
) -> None:
    calls = dict.fromkeys(names, 0)
    for name in names:
        original = getattr(module, name)

        def counted(*args, _name=name, _original=original, **kwargs):
            calls[_name] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(module, name, counted)
    results = {}
    # The CIFAR-stem tiny model has no max pooling; its ImageNet-stem twin has the stem's.
    name = "resnext_tiny_in" if key == "fast_maxpool" else "resnext_tiny"
    for fast in (False, True):
        out = tmp_path / ("fast" if fast else "plain")
        cfg = tiny_cfg(
            out,
            # 4 and 8 channels per group in stages 1 and 2: the grouped kernels' shapes.
            model={"name": name, "spec": {"num_classes": 4, "cardinality": 4}},
            train={"epochs": 2, "channels_last": True, "amp": amp, key: fast},
        )
        # The kernels under test pinned: which implementation wins a shape is timing's choice
        # (tested in tests/speed), and a run must not depend on it to be compared.
        with autotune.CHOOSER.prefer(*pinned):
            results[fast] = train(cfg, train_set=tiny_data(64), val_set=tiny_data(40, seed=2))
        assert getattr(cfg.train, key) is fast
        if not fast:
            assert not any(calls.values())
    assert all(calls.values()), calls  # the fast run used the kernels
    plain, fast = results[False].final, results[True].final
    assert set(plain) == set(fast)
    for name, value in plain.items():
        if name.endswith("loss"):
            # Two epochs of float32 SGD from the same seed: rounding differences only.
            assert fast[name] == pytest.approx(value, rel=1e-3), name
    weights = {
        name: torch.load(tmp_path / name / "checkpoints" / "last.pt", weights_only=True)["model"]
        for name in ("plain", "fast")
    }
    assert list(weights["plain"]) == list(weights["fast"])
    for name, value in weights["plain"].items():
        if value.dtype.is_floating_point:
            torch.testing.assert_close(weights["fast"][name], value, rtol=1e-3, atol=1e-4)


def test_a_fast_run_records_what_the_chooser_picked(tmp_path, tiny_cfg, tiny_data, monkeypatch):
    monkeypatch.setattr(autotune, "CHOOSER", autotune.Chooser())
    cfg = tiny_cfg(
        tmp_path / "run",
        model={"name": "resnext_tiny", "spec": {"num_classes": 4, "cardinality": 4}},
        train={"epochs": 1, "channels_last": True, "amp": "bfloat16", "gemm_weight_grad": True},
    )
    result = train(cfg, train_set=tiny_data(32), val_set=tiny_data(8, seed=2))
    summary = json.loads((result.run_dir / "result.json").read_text())
    choices = summary["fast_path_choices"]
    ops = {c["op"] for c in choices}
    # The weight gradient always has two candidates (oneDNN, the GEMM); the forward and input
    # gradient have ours too where the CPU and the channel counts allow it.
    assert "conv1x1.weight_grad" in ops
    assert ops <= {"conv1x1.forward", "conv1x1.input_grad", "conv1x1.weight_grad"}
    for choice in choices:
        assert choice["winner"] in choice["ms"] and "onednn" in choice["ms"]
