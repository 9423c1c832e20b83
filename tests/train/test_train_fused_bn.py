"""`train.fused_bn` trains the same model as torch's batch norm would (same losses, same weights)."""

from __future__ import annotations

import pytest
import torch

from resnext.speed import bn_kernel
from resnext.train import train

REASON = bn_kernel.unavailable_reason()


@pytest.mark.skipif(REASON is not None, reason=f"bn kernel unavailable: {REASON}")
def test_fused_bn_run_follows_the_plain_run(tmp_path, tiny_cfg, tiny_data, monkeypatch) -> None:
    calls = {"forward": 0, "backward": 0}
    for name in calls:
        original = getattr(bn_kernel, name)

        def counted(*args, _name=name, _original=original, **kwargs):
            calls[_name] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(bn_kernel, name, counted)
    results = {}
    for fused in (False, True):
        out = tmp_path / ("fused" if fused else "plain")
        cfg = tiny_cfg(out, train={"epochs": 2, "channels_last": True, "fused_bn": fused})
        results[fused] = train(cfg, train_set=tiny_data(64), val_set=tiny_data(40, seed=2))
        assert cfg.train.fused_bn is fused
        if not fused:
            assert calls == {"forward": 0, "backward": 0}
    assert calls["forward"] > 0 and calls["backward"] > 0  # the fused run used the kernels
    plain, fused = results[False].final, results[True].final
    assert set(plain) == set(fused)
    for key, value in plain.items():
        if key.endswith("loss"):
            # Two epochs of float32 SGD from the same seed: rounding differences only.
            assert fused[key] == pytest.approx(value, rel=1e-3), key
    weights = {
        name: torch.load(tmp_path / name / "checkpoints" / "last.pt", weights_only=True)["model"]
        for name in ("plain", "fused")
    }
    assert list(weights["plain"]) == list(weights["fused"])
    for key, value in weights["plain"].items():
        if value.dtype.is_floating_point:
            torch.testing.assert_close(weights["fused"][key], value, rtol=1e-3, atol=1e-4)
