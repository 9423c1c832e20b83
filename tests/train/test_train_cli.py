"""`resnext train` and `resnext demo` as commands: recipe plus overrides in, a run folder out."""

from __future__ import annotations

import argparse
import json

import pytest

from resnext.commands import demo_cmd, train_cmd
from resnext.errors import ConfigError


def _parse(module, argv):
    parser = argparse.ArgumentParser(prog="resnext")
    module.add_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(argv)


def test_train_command_runs_the_digits_recipe_with_overrides(tmp_path, capsys):
    out = tmp_path / "run"
    args = _parse(
        train_cmd,
        [
            "train",
            "--config",
            "digits_demo",
            f"output_dir={out}",
            "epochs=1",
            "data.image_size=8",
            "data.batch_size=128",
            "train.threads=1",
        ],
    )
    assert train_cmd.run(args) == 0
    saved = json.loads((out / "config.json").read_text())
    assert saved["train"]["epochs"] == 1 and saved["data"]["image_size"] == 8
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 1
    # Real digits, 10 classes: one epoch of a tiny network already beats chance (90 % error).
    assert records[0]["val_top1_err"] < 90.0
    assert "val top-1 error" in capsys.readouterr().out


def test_train_command_bad_override_is_a_config_error():
    args = _parse(train_cmd, ["train", "--config", "digits_demo", "optim.learning_rate=0.1"])
    with pytest.raises(ConfigError, match=r"unknown config key optim\.learning_rate"):
        train_cmd.run(args)


def test_demo_parser_defaults():
    args = _parse(demo_cmd, ["demo", "--epochs", "2"])
    assert args.epochs == 2 and args.output_dir == "runs/digits_demo"


def test_demo_run_twice_starts_over_in_its_folder(tmp_path, capsys):
    # The main job (scripts/run.sh) may run again: the demo replaces its earlier run rather than
    # being refused (train.resume=never where checkpoints are) or mixing with it.
    out = tmp_path / "demo"
    args = _parse(demo_cmd, ["demo", "--epochs", "1", "--output-dir", str(out)])
    assert demo_cmd.run(args) == 0
    (out / "provenance-resume-7.json").write_text("{}")  # as if the earlier run had resumed
    first = (out / "checkpoints" / "last.pt").stat().st_mtime_ns
    events = len(list((out / "tensorboard").iterdir()))
    assert demo_cmd.run(args) == 0
    # one run's TensorBoard events, not both runs' curves overlaid
    assert len(list((out / "tensorboard").iterdir())) == events
    assert "digits test accuracy" in capsys.readouterr().out
    assert (out / "checkpoints" / "last.pt").stat().st_mtime_ns > first
    assert not list(out.glob("provenance-resume-*.json"))
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1]


class _Stop(Exception):
    pass


def test_train_command_reports_a_last_epoch_that_was_not_validated(tmp_path, capsys):
    # Epoch 1 of 3 with eval_every=3 is not validated; resumed with epochs=1 there is nothing left
    # to train, and the last record has no val errors to print.
    from resnext.config import load_config
    from resnext.train import train

    out = tmp_path / "run"
    common = ["data.image_size=8", "data.batch_size=128", "train.threads=1", "train.eval_every=3"]

    def stop_in_epoch_2(epoch, step, global_step):
        if epoch == 1:
            raise _Stop

    with pytest.raises(_Stop):
        train(
            load_config("digits_demo", [*common, f"output_dir={out}", "epochs=3"]),
            on_step=stop_in_epoch_2,
        )
    capsys.readouterr()
    args = _parse(
        train_cmd, ["train", "--config", "digits_demo", f"output_dir={out}", "epochs=1", *common]
    )
    assert train_cmd.run(args) == 0
    done = capsys.readouterr().out.strip().splitlines()[-1]
    assert done == (
        f"done: 1 epochs, last epoch not validated (val top-1 error: none validated yet); "
        f"run folder {out}"
    )


def test_demo_reports_a_last_epoch_that_was_not_validated(monkeypatch, tmp_path, capsys):
    from resnext.train import TrainResult

    record = {"epoch": 1, "global_step": 3, "train_loss": 2.0}
    result = TrainResult(
        run_dir=tmp_path,
        epochs_completed=1,
        global_step=3,
        final=record,
        best_val_top1_err=float("inf"),
        best_epoch=0,
        history=(record,),
        last_checkpoint=tmp_path / "last.pt",
        best_checkpoint=None,
        wall_time_s=1.0,
    )
    monkeypatch.setattr(demo_cmd, "run_demo", lambda output_dir, epochs: result)
    monkeypatch.setattr(demo_cmd, "_weights", lambda result: {})
    assert demo_cmd.run(_parse(demo_cmd, ["demo"])) == 0
    assert capsys.readouterr().out.startswith("digits test accuracy: not validated after 1 epochs")


def test_demo_leaves_another_runs_folder_alone(tmp_path, capsys):
    # --output-dir pointing at a real run's folder: the demo must not delete that run's files.
    from resnext.config import load_config
    from resnext.train import train

    out = tmp_path / "mine"
    cfg = load_config("digits_demo", [f"output_dir={out}", "name=my_run", "train.epochs=1"])
    train(cfg)
    last = out / "checkpoints" / "last.pt"
    before = last.read_bytes()
    args = _parse(demo_cmd, ["demo", "--epochs", "1", "--output-dir", str(out)])
    with pytest.raises(ConfigError, match="already holds a run's checkpoints"):
        demo_cmd.run(args)
    assert last.read_bytes() == before


@pytest.mark.parametrize(("rank", "lines"), [("0", 1), ("1", 0)])
def test_train_command_prints_done_on_rank_0_only(tmp_path, capsys, monkeypatch, rank, lines):
    # Every torchrun rank returns from train(): one "done:" line per job, not one per process.
    from types import SimpleNamespace

    import resnext.train

    result = SimpleNamespace(
        final={"val_top1_err": 12.5, "val_top5_err": 1.0},
        epochs_completed=1,
        best_val_top1_err=12.5,
        best_epoch=1,
        run_dir=tmp_path,
    )
    monkeypatch.setattr(resnext.train, "train", lambda cfg: result)
    monkeypatch.setenv("RANK", rank)
    args = _parse(train_cmd, ["train", "--config", "digits_demo", f"output_dir={tmp_path}"])
    assert train_cmd.run(args) == 0
    assert capsys.readouterr().out.count("done:") == lines
