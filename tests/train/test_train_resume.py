"""A run killed with SIGKILL mid-epoch and resumed ends with bit-identical weights to an uninterrupted run."""

from __future__ import annotations

import contextlib
import json
import re
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from resnext.config import load_config
from resnext.errors import ConfigError
from resnext.train import load_checkpoint, train

SCRIPT = textwrap.dedent(
    """
    import importlib.util, os, signal, sys
    spec = importlib.util.spec_from_file_location("tiny_support", sys.argv[1])
    support = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(support)
    from resnext.train import train

    out, kill_at = sys.argv[2], int(sys.argv[3])

    def hook(epoch, step, global_step):
        if global_step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    cfg = support.tiny_config(
        out, train={"epochs": 3, "checkpoint_every": 3}, schedule={"warmup_epochs": 1}
    )
    data = support.tiny_dataset(80)
    train(cfg, train_set=data, val_set=support.tiny_dataset(40, seed=2), on_step=hook)
    """
)


def test_sigkill_mid_epoch_then_resume_is_bit_identical(
    tmp_path, tiny_cfg, tiny_data, support_file
):
    overrides = {"train": {"epochs": 3, "checkpoint_every": 3}, "schedule": {"warmup_epochs": 1}}
    train_set, val_set = tiny_data(80), tiny_data(40, seed=2)

    # 80 images / batch 16 = 5 steps per epoch; step checkpoints at global steps 3, 6, 9, 12 and
    # epoch checkpoints at 5, 10, 15. Killed at step 8, the newest checkpoint is step 6: epoch 2,
    # one step in, so the resume must restart inside an epoch and redo steps 7 and 8.
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    killed = tmp_path / "killed"
    proc = subprocess.run(
        [sys.executable, str(script), str(support_file), str(killed), "8"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    ckpt = load_checkpoint(killed / "checkpoints" / "last.pt")
    assert (ckpt["epoch"], ckpt["step_in_epoch"], ckpt["global_step"]) == (1, 1, 6)
    assert not list((killed / "checkpoints").glob(".*tmp*"))

    resumed = train(tiny_cfg(killed, **overrides), train_set=train_set, val_set=val_set)
    reference = train(
        tiny_cfg(tmp_path / "straight", **overrides), train_set=train_set, val_set=val_set
    )

    assert resumed.global_step == reference.global_step == 15
    a = load_checkpoint(resumed.last_checkpoint)
    b = load_checkpoint(reference.last_checkpoint)
    assert a["model"].keys() == b["model"].keys()
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for sa, sb in zip(
        a["optimizer"]["state"].values(), b["optimizer"]["state"].values(), strict=True
    ):
        assert torch.equal(sa["momentum_buffer"], sb["momentum_buffer"])
    # Training moved the weights (the comparison is not between two untouched initialisations).
    assert not torch.equal(a["model"]["fc.weight"], ckpt["model"]["fc.weight"])
    # The resumed epoch's metrics include the steps before the kill, as in the straight run.
    for ra, rb in zip(resumed.history, reference.history, strict=True):
        assert ra["train_loss"] == rb["train_loss"]
        assert ra["val_top1_err"] == rb["val_top1_err"]


class _Stop(Exception):
    pass


def test_mid_epoch_resume_with_mixup_and_cutmix_is_bit_identical(tmp_path, tiny_cfg, tiny_data):
    # Mixup/CutMix draw from the global torch RNG that checkpoints carry: creating the resumed
    # epoch's loader iterator must not draw from it too, or every later mix shifts by one draw.
    # Dropout and stochastic depth draw from generators of their own, seeded per step.
    overrides = {
        "train": {"epochs": 2, "checkpoint_every": 3},
        "data": {"mixup_alpha": 0.2, "cutmix_alpha": 1.0},
        "model": {"spec": {"num_classes": 4, "drop_path_rate": 0.3, "drop_rate": 0.2}},
    }
    train_set, val_set = tiny_data(80), tiny_data(40, seed=2)

    def stop_at_4(epoch, step, global_step):
        if global_step == 4:
            raise _Stop

    cut = tmp_path / "cut"
    with contextlib.suppress(_Stop):
        train(tiny_cfg(cut, **overrides), train_set=train_set, val_set=val_set, on_step=stop_at_4)
    ckpt = load_checkpoint(cut / "checkpoints" / "last.pt")
    assert (ckpt["epoch"], ckpt["step_in_epoch"]) == (0, 3)  # resumes inside the epoch

    resumed = train(tiny_cfg(cut, **overrides), train_set=train_set, val_set=val_set)
    reference = train(
        tiny_cfg(tmp_path / "straight", **overrides), train_set=train_set, val_set=val_set
    )
    a = load_checkpoint(resumed.last_checkpoint)["model"]
    b = load_checkpoint(reference.last_checkpoint)["model"]
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert [r["train_loss"] for r in resumed.history] == [
        r["train_loss"] for r in reference.history
    ]


@pytest.mark.parametrize("first_resume", ["never", "other"])
def test_saved_config_resumes_the_run_from_its_own_last_checkpoint(
    tmp_path, tiny_cfg, tiny_data, first_resume
):
    # README: `resnext train --config RUN/config.toml` resumes from RUN/checkpoints/last.pt,
    # whatever train.resume the run was started with.
    train_set, val_set = tiny_data(80), tiny_data(40, seed=2)
    resume = "never"
    if first_resume == "other":
        other = train(
            tiny_cfg(tmp_path / "other", train={"epochs": 1}), train_set=train_set, val_set=val_set
        )
        resume = str(other.last_checkpoint)
    run = tmp_path / "run"
    first = train(
        tiny_cfg(run, train={"epochs": 2, "resume": resume}), train_set=train_set, val_set=val_set
    )
    assert first.global_step == 10  # 80 images / batch 16 = 5 steps an epoch

    cfg = load_config(run / "config.toml", ["train.epochs=3"])
    again = train(cfg, train_set=train_set, val_set=val_set)
    assert again.global_step == 15
    assert [r["epoch"] for r in again.history] == [1, 2, 3]
    prov = json.loads((run / "provenance-resume-10.json").read_text())
    assert prov["resumed_from"] == str(run / "checkpoints" / "last.pt")


def test_resume_never_into_a_folder_with_checkpoints_refuses_and_changes_nothing(
    tmp_path, tiny_cfg, tiny_data
):
    train_set, val_set = tiny_data(32), tiny_data(16, seed=2)
    run = tmp_path / "run"
    train(tiny_cfg(run, train={"epochs": 1}), train_set=train_set, val_set=val_set)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    again = tiny_cfg(run, train={"epochs": 1, "resume": "never"}, optim={"lr": 0.02})
    with pytest.raises(ConfigError, match=rf"output_dir: {re.escape(str(run))} already holds"):
        train(again, train_set=train_set, val_set=val_set)
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
    # A fresh folder is fine.
    fresh = train(
        tiny_cfg(tmp_path / "new", train={"epochs": 1, "resume": "never"}),
        train_set=train_set,
        val_set=val_set,
    )
    assert fresh.global_step == 2


def test_resume_under_a_changed_recipe_is_refused_naming_the_keys(tmp_path, tiny_cfg, tiny_data):
    # The restored scheduler, sampler and step count follow the checkpoint: a changed lr or batch
    # would be recorded in config.json but not (or wrongly) used.
    train_set, val_set = tiny_data(64), tiny_data(16, seed=2)
    run = tmp_path / "run"
    train(tiny_cfg(run, train={"epochs": 1}), train_set=train_set, val_set=val_set)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    changed = tiny_cfg(run, train={"epochs": 2}, optim={"lr": 0.01}, data={"batch_size": 32})
    with pytest.raises(ConfigError) as info:
        train(changed, train_set=train_set, val_set=val_set)
    message = str(info.value)
    assert message.startswith("train.resume: checkpoint ")
    assert "data.batch_size: 16 -> 32" in message and "optim.lr: 0.05 -> 0.01" in message
    assert "train.epochs" not in message
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before

    # Length, logging, validation and checkpoint frequency, threads may change.
    allowed = tiny_cfg(
        run,
        train={"epochs": 2, "log_every": 7, "eval_every": 2, "checkpoint_every": 3, "threads": 2},
        data={"eval_batch_size": 8},
    )
    result = train(allowed, train_set=train_set, val_set=val_set)
    assert result.global_step == 8  # 64 images / batch 16: 4 steps an epoch


def test_resume_keeps_the_micro_batch_across_process_counts(tmp_path, tiny_cfg, tiny_data):
    # Batch norm normalises each micro-batch: a resume may trade processes for accumulation
    # steps (W processes -> one with accum_steps W), never change the images per micro-batch.
    train_set, val_set = tiny_data(64), tiny_data(16, seed=2)
    run = tmp_path / "run"
    train(tiny_cfg(run, train={"epochs": 1}), train_set=train_set, val_set=val_set)
    last = run / "checkpoints" / "last.pt"
    assert load_checkpoint(last)["micro_batch"] == {"world_size": 1, "accum_steps": 1, "images": 16}
    with pytest.raises(
        ConfigError, match=r"micro-batches of 16 images .*optim.accum_steps=1 keeps it"
    ):
        train(tiny_cfg(run, train={"epochs": 2}, optim={"accum_steps": 2}), train_set=train_set,
              val_set=val_set)  # fmt: skip
    # As a checkpoint of two processes (8 images each) records it, resumed on one process.
    ckpt = load_checkpoint(last)
    ckpt["micro_batch"] = {"world_size": 2, "accum_steps": 1, "images": 8}
    torch.save(ckpt, last)
    with pytest.raises(ConfigError, match=r"accum_steps=2 keeps it"):
        train(tiny_cfg(run, train={"epochs": 2}), train_set=train_set, val_set=val_set)
    resumed = tiny_cfg(run, train={"epochs": 2}, optim={"accum_steps": 2})
    assert train(resumed, train_set=train_set, val_set=val_set).global_step == 8


def test_a_run_saved_with_a_cifar_only_step_outside_cifar_resumes_with_it_off(
    tmp_path, tiny_cfg, tiny_data
):
    # Before such steps were refused outside CIFAR, a digits or image-folder run accepted
    # data.cutout and trained without it; its checkpoint still records the value.
    train_set, val_set = tiny_data(64), tiny_data(16, seed=2)
    run = tmp_path / "run"
    train(tiny_cfg(run, train={"epochs": 1}), train_set=train_set, val_set=val_set)
    last = run / "checkpoints" / "last.pt"
    ckpt = load_checkpoint(last)
    ckpt["config"]["data"]["cutout"] = 8
    torch.save(ckpt, last)
    assert (
        train(
            tiny_cfg(run, train={"epochs": 2}), train_set=train_set, val_set=val_set
        ).epochs_completed
        == 2
    )
