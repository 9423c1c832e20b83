"""Bad configs and command lines: one clear message naming the key, exit code 2, nothing written."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
from rel_helpers import record, tiny_config, tiny_config_dict, tiny_dataset

from resnext import cli
from resnext.config import load_config, make_config
from resnext.errors import CheckpointError, ConfigError, ResNeXtError
from resnext.train import train

BAD_OVERRIDES = {  # override -> text the message must contain (the key, and what was expected)
    "foo=1": "unknown config key foo",
    "train.foo=1": "unknown config key train.foo",
    "optim.lrr=0.1": "unknown config key optim.lrr",
    "data.batch_size=abc": "data.batch_size: expected int",
    "train.epochs=1.5": "train.epochs: expected int",
    "optim.nesterov=maybe": "optim.nesterov: expected bool",
    "data.batch_size=0": "data.batch_size: expected a value > 0",
    "data.batch_size=-16": "data.batch_size: expected a value > 0",
    "train.epochs=0": "train.epochs: expected a value > 0",
    "data.image_size=-3": "data.image_size: expected a value > 0",
    "optim.accum_steps=0": "optim.accum_steps: expected a value > 0",
    "train.checkpoint_every=-1": "train.checkpoint_every: expected a value >= 0",
    "optim.lr=nan": "optim.lr: expected a finite float",
    "optim.lr=inf": "optim.lr: expected a finite float",
    "optim.lr=-0.1": "optim.lr: expected a value > 0",
    "optim.momentum=1.5": "optim.momentum",
    "optim.name=adam": "optim.name: expected one of sgd, adamw",
    "optim.betas=[0.9]": "optim.betas: expected two numbers",
    "optim.betas=[0.9,1.0]": "optim.betas",
    "optim.eps=0": "optim.eps: expected a number > 0",
    "schedule.milestones=[3,2]": "schedule.milestones",
    "train.amp=fp8": "train.amp: expected one of",
    "train.resume=weights.bin": "train.resume",
    "model.spec.cardinality=0": "cardinality",
    "model.spec.depths=[0,1,1]": "depths",
    "model.name=resnext_nonexistent": "resnext_nonexistent",
    "data.kind=cifar10": "data.root",
    "name=../escape": "name:",
    "train=3": "train: is a section",
    "no_equals_sign": "expected dotted.key=value",
}


@pytest.mark.parametrize("override", list(BAD_OVERRIDES))
def test_bad_override_is_one_config_error_naming_the_key(tmp_path: Path, override: str) -> None:
    with pytest.raises(ConfigError) as info:
        make_config(tiny_config_dict(tmp_path / "run"), [override])
    assert BAD_OVERRIDES[override] in str(info.value)
    assert not (tmp_path / "run").exists()


def test_bad_values_in_a_file_are_config_errors(tmp_path: Path) -> None:
    cases = {
        "unknown.toml": ("[train]\nepochs = 1\nbogus = 2\n", "train.bogus"),
        "type.toml": ('[data]\nbatch_size = "sixteen"\n', "data.batch_size"),
        "nan.toml": ("[optim]\nlr = nan\n", "optim.lr"),
        "broken.toml": ("[train\nepochs = 1\n", "not valid TOML"),
        "section.toml": ("train = 5\n", "train"),
    }
    for name, (text, expected) in cases.items():
        path = tmp_path / name
        path.write_text(text)
        with pytest.raises(ConfigError, match=expected.replace(".", r"\.")):
            load_config(path)
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "missing.toml")
    record("bad_config_files", len(cases) + 1)
    record("bad_config_overrides", len(BAD_OVERRIDES))


def test_nan_learning_rate_given_as_a_float_is_refused(tmp_path: Path) -> None:
    for value in (math.nan, math.inf, -math.inf):
        with pytest.raises(ConfigError, match=re.escape("optim.lr")):
            make_config(tiny_config_dict(tmp_path, optim={"lr": value}))


def _cli(argv: list[str], monkeypatch: pytest.MonkeyPatch) -> int:
    """The real `resnext` dispatcher, with the train command registered if it is not yet."""
    if "train" not in cli.COMMANDS:
        monkeypatch.setattr(cli, "COMMANDS", (*cli.COMMANDS, "train"))
    try:
        return cli.main(argv)
    except SystemExit as exc:  # argparse's own usage errors
        return int(exc.code)


@pytest.fixture
def recipe(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.toml"
    path.write_text(
        '[model]\nname = "resnext_tiny"\n[data]\nkind = "digits"\nbatch_size = 16\nimage_size = 8\n'
        '[train]\nepochs = 1\namp = "none"\nthreads = 1\n'
    )
    return path


CLI_CASES = {
    "unknown key": (["foo.bar=1"], "unknown config key foo.bar"),
    "wrong type": (["data.batch_size=abc"], "data.batch_size"),
    "zero size": (["data.batch_size=0"], "data.batch_size"),
    "negative epochs": (["train.epochs=-1"], "train.epochs"),
    "nan lr": (["optim.lr=nan"], "optim.lr"),
    "missing resume file": (["train.resume=/nonexistent/last.pt"], "/nonexistent/last.pt"),
}


def test_cli_usage_errors_exit_2_with_one_line_and_write_nothing(
    tmp_path: Path, recipe: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    for name, (extra, expected) in CLI_CASES.items():
        out = tmp_path / name.replace(" ", "_")
        code = _cli(["train", "--config", str(recipe), f"output_dir={out}", *extra], monkeypatch)
        err = capsys.readouterr().err
        assert code == 2, f"{name}: exit {code}, stderr {err}"
        assert err.startswith("resnext train: error:") and expected in err, f"{name}: {err}"
        assert "Traceback" not in err
        if name != "missing resume file":  # see test_failed_start_writes_nothing
            assert not out.exists(), f"{name}: wrote {list(out.rglob('*'))}"
    code = _cli(["train", "--config", str(tmp_path / "nope.toml")], monkeypatch)
    assert code == 2 and "nope.toml" in capsys.readouterr().err
    assert _cli(["train"], monkeypatch) == 2  # argparse: --config is required
    assert "--config" in capsys.readouterr().err
    assert _cli(["info", "resnext_nonexistent"], monkeypatch) == 2
    assert "resnext_nonexistent" in capsys.readouterr().err
    record("bad_cli_invocations", len(CLI_CASES) + 3)


def test_batch_larger_than_dataset_and_missing_paths_are_clear(tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path / "a", data={"batch_size": 64})
    with pytest.raises(
        ConfigError, match=re.escape("data.batch_size: 64 is larger than the training set")
    ):
        train(cfg, train_set=tiny_dataset(32), val_set=tiny_dataset(8, seed=2))
    missing = tmp_path / "no_such_root"
    cfg = tiny_config(tmp_path / "b", data={"kind": "cifar10", "root": str(missing)})
    with pytest.raises(ResNeXtError, match=re.escape(str(missing))):
        train(cfg)
    cfg = tiny_config(tmp_path / "c", train={"resume": str(tmp_path / "none.pt")})
    with pytest.raises(CheckpointError, match=re.escape("none.pt: no such file")):
        train(cfg, train_set=tiny_dataset(32), val_set=tiny_dataset(8, seed=2))


def test_failed_start_writes_nothing(tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path / "a", data={"batch_size": 64})
    with pytest.raises(ConfigError):
        train(cfg, train_set=tiny_dataset(32), val_set=tiny_dataset(8, seed=2))
    assert not (tmp_path / "a").exists()


def test_output_dir_that_cannot_be_created_is_a_config_error(tmp_path: Path) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    cfg = tiny_config(blocker / "sub")
    with pytest.raises(ConfigError, match="output_dir"):
        train(cfg, train_set=tiny_dataset(32), val_set=tiny_dataset(8, seed=2))
