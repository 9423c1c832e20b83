"""Failures keep what was written: a non-finite loss stops the run, a failed write keeps the old file."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils.data import Dataset

from resnext.errors import CheckpointError, TrainingError
from resnext.train import atomic_save, load_checkpoint, train
from resnext.train import checkpoint as checkpoint_mod


class _Corruptible(Dataset):
    """Wraps a dataset; once `corrupt` is set, every image it returns is all NaN."""

    def __init__(self, base: Dataset) -> None:
        self.base = base
        self.corrupt = False

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int):
        x, y = self.base[index]
        return (torch.full_like(x, float("nan")) if self.corrupt else x), y


def test_nan_loss_stops_naming_the_step_and_keeps_last_good_checkpoint(
    tmp_path, tiny_cfg, tiny_data
):
    cfg = tiny_cfg(tmp_path / "run", train={"epochs": 3, "checkpoint_every": 1})
    data = _Corruptible(tiny_data(64))
    seen = {}

    def corrupt_after_step_7(epoch: int, step: int, global_step: int) -> None:
        if global_step == 7:
            seen["good"] = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
            data.corrupt = True

    # 64 images / 16 = 4 steps per epoch: global step 8 is epoch 2, step 4.
    with pytest.raises(TrainingError, match=r"epoch 2, step 4 of the epoch \(global step 8\)"):
        train(cfg, train_set=data, val_set=tiny_data(40, seed=2), on_step=corrupt_after_step_7)
    kept = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert kept["global_step"] == 7
    assert all(torch.isfinite(v).all() for v in kept["model"].values() if v.is_floating_point())
    for key, value in seen["good"]["model"].items():
        assert torch.equal(kept["model"][key], value), key


def test_failed_write_leaves_previous_checkpoint_loadable(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    first = {"model": {"w": torch.arange(4.0)}, "epoch": 1}
    atomic_save(first, path)

    def broken_save(obj, fh):
        fh.write(b"PK\x03\x04 partial bytes")  # a zip header and then the writer dies
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint_mod.torch, "save", broken_save)
    with pytest.raises(CheckpointError, match="write failed"):
        atomic_save({"model": {"w": torch.zeros(4)}, "epoch": 2}, path)
    monkeypatch.undo()
    again = load_checkpoint(path)
    assert again["epoch"] == 1
    assert torch.equal(again["model"]["w"], torch.tensor([0.0, 1.0, 2.0, 3.0]))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]


def test_truncated_checkpoint_is_a_checkpoint_error(tmp_path):
    path = tmp_path / "last.pt"
    atomic_save({"model": {"w": torch.ones(1000)}}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="unreadable or truncated"):
        load_checkpoint(path)


def test_checkpoint_with_code_is_refused(tmp_path):
    # weights_only loading: a pickled object other than tensors and plain containers is rejected.
    path = tmp_path / "evil.pt"
    torch.save({"model": {}, "hook": math.gcd}, path)
    with pytest.raises(CheckpointError):
        load_checkpoint(path)


def _tensors(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _tensors(v)


def test_resume_on_another_device_restores_the_rng_from_cpu_tensors(
    tmp_path, monkeypatch, tiny_cfg, tiny_data
):
    # On CUDA, a checkpoint read onto the run's device would put the RNG states on the GPU, and
    # torch.set_rng_state / NumPy take CPU tensors only. 'meta' stands in for the GPU here.
    # The checkpoint must therefore be read onto the CPU whatever the run's device.
    from resnext.train import state

    train_set, val_set = tiny_data(32), tiny_data(16, seed=2)
    train(tiny_cfg(tmp_path, train={"epochs": 1}), train_set=train_set, val_set=val_set)
    real_load, real_restore_rng = state.load_checkpoint, state.restore_rng
    seen, read_onto = [], []

    def load_checkpoint(path, map_location=None):
        read_onto.append(map_location)
        return real_load(path, map_location=map_location)

    def restore_rng(rng):
        seen.extend(t.device.type for t in _tensors(rng))
        real_restore_rng(rng)

    monkeypatch.setattr(state, "load_checkpoint", load_checkpoint)
    monkeypatch.setattr(state, "restore_rng", restore_rng)
    result = train(tiny_cfg(tmp_path, train={"epochs": 2}), train_set=train_set, val_set=val_set)
    assert result.global_step == 4  # 32 images / batch 16: resumed after epoch 1's 2 steps
    assert read_onto == ["cpu"]
    assert seen and set(seen) == {"cpu"}


@pytest.mark.parametrize("key", ["rng", "epoch", "global_step"])
def test_checkpoint_missing_an_entry_is_refused_naming_it(tmp_path, tiny_cfg, tiny_data, key):
    train_set, val_set = tiny_data(32), tiny_data(16, seed=2)
    first = train(tiny_cfg(tmp_path, train={"epochs": 1}), train_set=train_set, val_set=val_set)
    ckpt = load_checkpoint(first.last_checkpoint)
    del ckpt[key]
    atomic_save(ckpt, first.last_checkpoint)
    with pytest.raises(CheckpointError, match=f"last.pt: incomplete, no '{key}' entry"):
        train(tiny_cfg(tmp_path, train={"epochs": 2}), train_set=train_set, val_set=val_set)


def test_train_threads_hold_for_the_run_only(tmp_path, tiny_cfg, tiny_data):
    # train.threads=1 (the tiny configs') must not stay set in the caller's process after train()
    # returns: later work there (another test, a compiled model) would run on one thread.
    assert tiny_cfg(tmp_path).train.threads == 1
    before = torch.get_num_threads()
    other = 2 if before == 1 else before
    torch.set_num_threads(other)
    seen = []
    train(
        tiny_cfg(tmp_path, train={"epochs": 1}),
        train_set=tiny_data(16),
        val_set=tiny_data(8, seed=2),
        on_step=lambda *_: seen.append(torch.get_num_threads()),
    )
    assert seen and set(seen) == {1}
    assert torch.get_num_threads() == other
    torch.set_num_threads(before)
