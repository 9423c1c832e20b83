"""NaN/Inf in the loss or the weights: the run stops at that step, names it, keeps the last good checkpoint."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from rel_helpers import record, tiny_config, tiny_dataset

import resnext.train.runner as runner
from resnext.errors import TrainingError
from resnext.train import load_checkpoint, train

STEPS_PER_EPOCH = 4  # 64 images, batch 16


class PoisonAtStep(torch.utils.data.Dataset):
    """Images become `value` while the trainer runs global step `bad_step` (1-based)."""

    def __init__(self, inner, bad_step: int, value: float) -> None:
        self.inner, self.bad_step, self.value = inner, bad_step, value
        self.done = 0  # global steps completed, kept by the trainer's hook

    def on_step(self, epoch: int, step: int, global_step: int) -> None:
        self.done = global_step

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, index: int):
        x, y = self.inner[index]
        if self.done + 1 == self.bad_step:
            x = torch.full_like(x, self.value)
        return x, y


def _expected_words(global_step: int) -> str:
    epoch, step = divmod(global_step - 1, STEPS_PER_EPOCH)
    return f"epoch {epoch + 1}, step {step + 1} of the epoch (global step {global_step})"


@pytest.mark.parametrize(("bad_step", "value"), [(3, math.nan), (6, math.inf), (7, -math.inf)])
def test_non_finite_loss_stops_at_that_step_and_keeps_last_good_checkpoint(
    tmp_path: Path, bad_step: int, value: float
) -> None:
    data = PoisonAtStep(tiny_dataset(64), bad_step, value)
    cfg = tiny_config(tmp_path / "run")
    with pytest.raises(TrainingError) as info:
        train(cfg, train_set=data, val_set=tiny_dataset(16, seed=2), on_step=data.on_step)
    assert _expected_words(bad_step) in str(info.value)
    last = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert last["global_step"] == bad_step - 1
    assert all(torch.isfinite(t).all() for t in last["model"].values() if t.is_floating_point())
    record("nonfinite_loss", 1, value=str(value), step=bad_step)


def test_nan_in_weights_is_caught_at_the_next_step(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    built = []
    real_build = runner.build_network

    def build_and_keep(cfg, classes):
        model = real_build(cfg, classes)
        built.append(model)
        return model

    monkeypatch.setattr(runner, "build_network", build_and_keep)
    poisoned_after = 5

    def poison(epoch: int, step: int, global_step: int) -> None:
        if global_step == poisoned_after:
            with torch.no_grad():
                built[0].conv1.weight[0, 0, 0, 0] = math.nan

    cfg = tiny_config(tmp_path / "run")
    with pytest.raises(TrainingError) as info:
        train(cfg, train_set=tiny_dataset(64), val_set=tiny_dataset(16, seed=2), on_step=poison)
    assert _expected_words(poisoned_after + 1) in str(info.value)
    last = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    # The checkpoint of step 5 was written before the hook poisoned the weights.
    assert last["global_step"] == poisoned_after
    assert torch.isfinite(last["model"]["conv1.weight"]).all()
    best = load_checkpoint(tmp_path / "run" / "checkpoints" / "best.pt")
    assert best["global_step"] == STEPS_PER_EPOCH
    record("nonfinite_weights", 1, step=poisoned_after + 1)
