"""Two gloo processes on CPU reach the same weights as one process with the same global batch."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from resnext.train import load_checkpoint, read_metrics, train

SCRIPT = textwrap.dedent(
    """
    import importlib.util, json, os, pathlib, shutil, sys
    spec = importlib.util.spec_from_file_location("tiny_support", sys.argv[1])
    support = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(support)
    from resnext.train import train
    from resnext.train.distributed import exit_worker

    class Stop(Exception):
        pass

    extra = json.loads(sys.argv[3]) if len(sys.argv) > 3 else {}
    stop_at = extra.pop("stop_at", 0)
    block_at = extra.pop("block_at", 0)
    own = {r: extra.pop(r, {}) for r in ("rank0", "rank1")}["rank" + os.environ["RANK"]]
    extra.update(own)  # this rank's own overrides
    n_train = extra.pop("n_train", 64)
    model = {"spec": extra.pop("model_spec")} if "model_spec" in extra else {}

    def on_step(epoch, step, global_step):
        if global_step == stop_at:
            raise Stop  # both ranks stop after the same step, as a job stopped mid-epoch
        if global_step == block_at and os.environ["RANK"] == "0":
            # the checkpoint folder becomes a file: rank 0's next save fails
            folder = pathlib.Path(sys.argv[2]) / "checkpoints"
            shutil.rmtree(folder, ignore_errors=True)
            folder.write_text("")

    cfg = support.tiny_config(sys.argv[2], train={"epochs": 2, **extra}, model=model)
    try:
        train(
            cfg,
            train_set=support.tiny_dataset(n_train),
            val_set=support.tiny_dataset(40, seed=2),
            on_step=on_step,
        )
    except Stop:
        print("stopped", flush=True)
    print("train() returned", flush=True)  # tells a crash at exit from one in training
    exit_worker(0)  # gloo's threads outlive DDP and could abort the interpreter's shutdown
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_ranks(
    script: Path, support_file: Path, run_dir: Path, *, ok: bool = True, **train: object
) -> list[tuple[int, str, str]]:
    """Run SCRIPT as 2 gloo ranks (as torchrun would start them) with `train` overrides; each
    rank's (exit code, stdout, stderr). `ok`: every rank must exit 0."""
    port = str(_free_port())
    procs = []
    for rank in range(2):
        env = dict(
            os.environ,
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE="2",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=port,
        )
        procs.append(
            subprocess.Popen(
                [sys.executable, str(script), str(support_file), str(run_dir), json.dumps(train)],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    outputs = [p.communicate(timeout=180) for p in procs]
    for rank, (p, (out, err)) in enumerate(zip(procs, outputs, strict=True)):
        assert p.returncode == 0 or not ok, (
            f"rank {rank} exit {p.returncode}\n{out[-2000:]}\n{err[-3000:]}"
        )
    return [(p.returncode, out, err) for p, (out, err) in zip(procs, outputs, strict=True)]


def test_two_gloo_ranks_match_one_process_accumulating_two_micro_batches(
    tmp_path, tiny_cfg, tiny_data, support_file
):
    # BatchNorm normalises each rank's 8 images with their own statistics, so the single-process
    # reference must see the same 8-image micro-batches: it accumulates 2 of them per step
    # (optim.accum_steps=2). The mean of the two gradients is what DDP's all-reduce computes.
    # With dropout and stochastic depth the ranks must drop other images than each other, as
    # the single process does from one micro-batch to the next.
    script = tmp_path / "ddp.py"
    script.write_text(SCRIPT)
    ddp_dir = tmp_path / "ddp"
    drops = {"num_classes": 4, "drop_path_rate": 0.5, "drop_rate": 0.3}
    _two_ranks(script, support_file, ddp_dir, model_spec=drops)

    single = train(
        tiny_cfg(
            tmp_path / "single",
            train={"epochs": 2},
            optim={"accum_steps": 2},
            model={"spec": drops},
        ),
        train_set=tiny_data(64),
        val_set=tiny_data(40, seed=2),
    )
    a = load_checkpoint(ddp_dir / "checkpoints" / "last.pt")["model"]
    b = load_checkpoint(single.last_checkpoint)["model"]
    init = tiny_cfg(tmp_path / "unused")  # same model, untrained, to show the weights moved
    from resnext.train.model_setup import build_network

    torch.manual_seed(init.train.seed)
    start = build_network(init, None).state_dict()
    params = [
        k for k in b if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))
    ]
    for key in params:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)
    assert not torch.allclose(b["fc.weight"], start["fc.weight"])
    # The train loss was all-reduced over both ranks: it equals the single process's mean loss.
    ddp_log = read_metrics(ddp_dir / "metrics.jsonl")
    for ra, rb in zip(ddp_log, single.history, strict=True):
        assert abs(ra["train_loss"] - rb["train_loss"]) < 1e-5
        assert ra["train_top1_err"] == rb["train_top1_err"]


def test_two_ranks_stopped_mid_epoch_and_resumed_log_the_uninterrupted_metrics(
    tmp_path, tiny_cfg, tiny_data, support_file
):
    # 64 images in global batches of 16: 4 steps an epoch. The job stops after global step 6
    # (mid epoch 2) and resumes from the step-6 checkpoint. Each rank saw its own half of
    # those 2 steps; the resumed epoch's metrics must count both halves once, as one process
    # accumulating the same two micro-batches per step does without stopping.
    script = tmp_path / "ddp.py"
    script.write_text(SCRIPT)
    ddp_dir = tmp_path / "ddp"
    _two_ranks(script, support_file, ddp_dir, checkpoint_every=2, stop_at=6)
    assert load_checkpoint(ddp_dir / "checkpoints" / "last.pt")["global_step"] == 6
    _two_ranks(script, support_file, ddp_dir, checkpoint_every=2)

    single = train(
        tiny_cfg(tmp_path / "single", train={"epochs": 2}, optim={"accum_steps": 2}),
        train_set=tiny_data(64),
        val_set=tiny_data(40, seed=2),
    )
    resumed = read_metrics(ddp_dir / "metrics.jsonl")
    assert [r["epoch"] for r in resumed] == [1, 2]
    for ra, rb in zip(resumed, single.history, strict=True):
        assert abs(ra["train_loss"] - rb["train_loss"]) < 1e-5
        assert ra["train_top1_err"] == rb["train_top1_err"]
        assert ra["train_top5_err"] == rb["train_top5_err"]


def test_output_dir_refused_on_rank_0_stops_every_rank_with_its_message(tmp_path, support_file):
    # Rank 0 alone checks the run folder; rank 1 must end with the same ConfigError, not with a
    # collective broken by rank 0's exit.
    script = tmp_path / "ddp.py"
    script.write_text(SCRIPT)
    (tmp_path / "afile").write_text("")
    results = _two_ranks(script, support_file, tmp_path / "afile" / "run", ok=False)
    for rank, (code, _out, err) in enumerate(results):
        assert code != 0, f"rank {rank} exited 0"
        last = err.strip().splitlines()[-1]
        # torch prefixes a rank's uncaught-exception lines with "[rankN]: "
        assert "resnext.errors.ConfigError: output_dir:" in last, f"rank {rank}: {err}"
        assert "RuntimeError" not in err
        assert "exists and is not a folder" in last


@pytest.mark.parametrize(
    "rank1, what, differs",
    [
        # a node with another config file: it would wait on rank 0's collectives until gloo's
        # 30-minute timeout
        ({"epochs": 3}, "config", "train.epochs=3 against rank 0's 2"),
        # another copy of the dataset: the ranks' shards would overlap or miss images
        ({"n_train": 48}, "data", "train images=48 against rank 0's 64"),
        # a key one rank's config has and the other's lacks
        (
            {"model_spec": {"num_classes": 4, "logit_scale": 2.0}},
            "config",
            "model.spec.logit_scale=2.0 against rank 0's '<unset>'",
        ),
    ],
    ids=["config", "data", "config-key"],
)
def test_ranks_given_different_inputs_stop_with_one_config_error(
    tmp_path, support_file, rank1: dict, what: str, differs: str
):
    script = tmp_path / "ddp.py"
    script.write_text(SCRIPT)
    results = _two_ranks(script, support_file, tmp_path / "run", ok=False, rank1=rank1)
    for rank, (code, _out, err) in enumerate(results):
        assert code != 0, f"rank {rank} exited 0"
        last = err.strip().splitlines()[-1]
        assert f"ConfigError: {what}: rank 1 was given another {what} than rank 0" in last, err
        assert differs in last and "RuntimeError" not in err
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_a_failed_write_on_rank_0_stops_every_rank_with_its_message(tmp_path, support_file):
    script = tmp_path / "ddp.py"
    script.write_text(SCRIPT)
    run = tmp_path / "run"
    results = _two_ranks(script, support_file, run, ok=False, block_at=2)
    (c0, _, e0), (c1, _, e1) = results
    assert c0 != 0 and c1 != 0
    assert "CheckpointError: checkpoint" in e0.strip().splitlines()[-1], e0
    last = e1.strip().splitlines()[-1]
    assert "TrainingError: rank 0 stopped the run: CheckpointError: checkpoint" in last, e1
    assert "RuntimeError" not in e1  # no broken collective
