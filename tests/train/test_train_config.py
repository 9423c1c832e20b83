"""Config pipeline: recipes load, overrides are typed, bad input is one ConfigError naming the key."""

from __future__ import annotations

import os
import re

import pytest
import tomllib

from resnext.config import config_from_dict, list_recipes, load_config, recipe_path, save_config
from resnext.errors import ConfigError
from resnext.train import resolve_lr


def test_shipped_recipes_load_and_accept_the_common_overrides(tmp_path):
    assert {
        "imagenet_resnext50_32x4d",
        "cifar_resnext29_8x64d",
        "cifar10_mini_cpu",
        "digits_demo",
    } <= set(list_recipes())
    for name in list_recipes():
        cfg = load_config(
            name, [f"data.root={tmp_path}", f"output_dir={tmp_path / 'o'}", "epochs=2"]
        )
        assert cfg.train.epochs == 2
        assert cfg.data.root == str(tmp_path)
        assert cfg.output_dir == str(tmp_path / "o")


def test_imagenet_recipe_is_the_papers():
    # Xie et al. 2017, Sec. 4: batch 256, lr 0.1 /10 every 30 epochs, wd 1e-4, momentum 0.9.
    cfg = load_config("imagenet_resnext50_32x4d")
    assert cfg.data.batch_size == 256
    assert resolve_lr(cfg.optim, cfg.data.batch_size) == pytest.approx(0.1)
    assert cfg.schedule.milestones[:2] == (30, 60)
    assert cfg.schedule.gamma == pytest.approx(0.1)
    assert cfg.optim.weight_decay == pytest.approx(1e-4)
    assert cfg.optim.momentum == pytest.approx(0.9)
    # Sec. 5.3 CIFAR: batch 128, wd 5e-4, lr 0.1, /10 at the 150th and 225th of 300 epochs.
    cifar = load_config("cifar_resnext29_8x64d")
    assert (cifar.data.batch_size, cifar.train.epochs) == (128, 300)
    assert cifar.optim.weight_decay == pytest.approx(5e-4)


def test_recipes_lower_the_lr_in_the_epochs_the_official_code_does():
    # fb.resnext.torch, epochs counted from 1: ImageNet decay = floor((epoch - 1) / 30); CIFAR
    # decay = epoch >= 0.75 * nEpochs and 2 or epoch >= 0.5 * nEpochs and 1 or 0 (the paper's
    # "at the 150-th and 225-th epoch" of 300).
    from resnext.train.optim import LRFactor

    lua = {
        "imagenet_resnext50_32x4d": lambda e, n: (e - 1) // 30,
        "cifar_resnext29_8x64d": lambda e, n: 2 if e >= 0.75 * n else 1 if e >= 0.5 * n else 0,
    }
    for recipe, decay in lua.items():
        cfg = load_config(recipe)
        n = cfg.train.epochs
        factor = LRFactor(cfg.schedule, steps_per_epoch=3, epochs=n, peak_lr=0.1)
        for epoch in range(1, n + 1):
            for step in range(3 * (epoch - 1), 3 * epoch):  # every step of the epoch
                assert factor(step) == pytest.approx(0.1 ** decay(epoch, n)), (recipe, epoch)


def test_linear_lr_scaling_rule():
    cfg = load_config("imagenet_resnext50_32x4d", ["data.batch_size=1024"])
    assert resolve_lr(cfg.optim, 1024) == pytest.approx(0.4)  # 0.1 x 1024 / 256
    explicit = load_config("imagenet_resnext50_32x4d", ["optim.lr=0.05"])
    assert resolve_lr(explicit.optim, 1024) == pytest.approx(0.05)


def test_overrides_are_parsed_by_field_type():
    cfg = load_config(
        "digits_demo",
        [
            "train.epochs=7",
            "optim.nesterov=false",
            "optim.weight_decay=2e-4",
            "schedule.milestones=3,5",
            "model.spec.cardinality=4",
            "optim.lr=none",
        ],
    )
    assert cfg.train.epochs == 7 and isinstance(cfg.train.epochs, int)
    assert cfg.optim.nesterov is False
    assert cfg.optim.weight_decay == pytest.approx(2e-4)
    assert cfg.schedule.milestones == (3, 5)
    assert cfg.model.spec == {"cardinality": 4}
    assert cfg.optim.lr is None


@pytest.mark.parametrize(
    ("override", "pattern"),
    [
        ("optim.lrr=0.1", r"unknown config key optim\.lrr"),
        ("bogus=1", r"unknown config key bogus"),
        ("train.epochs=ten", r"train\.epochs: expected int"),
        ("optim.lr=nan", r"optim\.lr: expected a finite float"),
        ("optim.lr=-0.1", r"optim\.lr: expected a value > 0"),
        ("data.batch_size=0", r"data\.batch_size: expected a value > 0"),
        ("data.workers=-1", r"data\.workers: expected a value >= 0"),
        ("train.channels_last=maybe", r"train\.channels_last: expected bool"),
        ("schedule.kind=linear", r"schedule\.kind: expected one of step, cosine"),
        ("model.name=resnext9000", r"model: "),
        ("schedule.milestones=30,10", r"schedule\.milestones: expected strictly increasing"),
        ("noequals", r"expected dotted\.key=value"),
        ("train.device=cpu:x", r"train\.device: expected auto, cpu, cuda or cpu:N / cuda:N"),
        ("train.device=cuda:-1", r"train\.device: expected .* got 'cuda:-1'"),
        ("train.device=cuda:", r"train\.device: expected .* got 'cuda:'"),
        ("train.device=auto:0", r"train\.device: expected .* got 'auto:0'"),
        ("train.device=cuda:0:1", r"train\.device: expected .* got 'cuda:0:1'"),
        ("name=..", r"name: expected a non-empty name without '/', other than '\.' and '\.\.'"),
        ("name=.", r"name: expected .* got '\.'"),
    ],
)
def test_bad_overrides_are_one_config_error_naming_the_key(override, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config("digits_demo", [override])


@pytest.mark.parametrize("key", ["fused_bn", "grouped_kernels", "gemm_weight_grad", "fast_maxpool"])
def test_cpu_fast_path_kernels_need_channels_last_and_refuse_compile(key):
    ok = load_config("digits_demo", [f"train.{key}=true", "train.channels_last=true"])
    assert getattr(ok.train, key) is True
    with pytest.raises(ConfigError, match=rf"train\.{key}: .*channels_last"):
        load_config("digits_demo", [f"train.{key}=true", "train.channels_last=false"])
    with pytest.raises(ConfigError, match=rf"train\.{key}: .*not both"):
        load_config(
            "digits_demo",
            [f"train.{key}=true", "train.channels_last=true", "train.compile=true"],
        )


def test_wrong_type_in_file_and_unknown_recipe(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[optim]\nmomentum = "high"\n')
    with pytest.raises(ConfigError, match=r"optim\.momentum: expected float, got str"):
        load_config(bad)
    with pytest.raises(ConfigError, match="no shipped recipe"):
        load_config("no_such_recipe")
    broken = tmp_path / "broken.toml"
    broken.write_text("[optim\nlr = 1")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(broken)


def test_saved_config_reloads_to_the_same_config(tmp_path):
    cfg = load_config("cifar10_mini_cpu", ["epochs=3", "model.spec.cardinality=4", "optim.lr=0.3"])
    json_path, toml_path = save_config(cfg, tmp_path)
    assert load_config(toml_path) == cfg
    assert load_config(json_path) == cfg
    assert config_from_dict(tomllib.loads(toml_path.read_text())) == cfg


def test_missing_recipe_path_is_not_replaced_by_the_shipped_recipe_of_that_name(tmp_path):
    missing = tmp_path / "elsewhere" / "cifar10_mini_cpu.toml"
    with pytest.raises(ConfigError, match=rf"{re.escape(str(missing))}'?: no such file"):
        recipe_path(missing)
    with pytest.raises(ConfigError, match="no such file"):
        load_config(str(missing))
    # A bare name (with or without .toml) is still a shipped recipe.
    assert recipe_path("cifar10_mini_cpu.toml").name == "cifar10_mini_cpu.toml"
    assert load_config("cifar10_mini_cpu").name == "cifar10_mini_cpu"


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cpu:0", "cuda:1", "cuda:12"])
def test_device_names_with_an_index_are_accepted(device):
    assert load_config("digits_demo", [f"train.device={device}"]).train.device == device


@pytest.mark.parametrize(
    "text",
    [
        "digits\U0001f600",  # outside the BMP: JSON would write a surrogate pair TOML refuses
        "caf\u00e9 \u2603",
        'quote " backslash \\ tab \t newline \n cr \r',
        "controls \x00\x01\x1f del \x7f",
        "C:\\runs\\x",
    ],
)
def test_saved_toml_reloads_any_string(tmp_path, text):
    cfg = load_config("digits_demo", [f"output_dir={text}"])
    _, toml_path = save_config(cfg, tmp_path)
    assert tomllib.loads(toml_path.read_text(encoding="utf-8"))["output_dir"] == text
    assert load_config(toml_path).output_dir == text


def test_a_lone_surrogate_is_a_config_error_naming_toml(tmp_path):
    cfg = load_config("digits_demo", ["output_dir=run\udcff"])
    with pytest.raises(ConfigError, match=r"cannot write .* to TOML: not valid Unicode"):
        save_config(cfg, tmp_path)


def test_a_failed_config_write_keeps_the_saved_config_whole(tmp_path, monkeypatch):
    old = load_config("digits_demo", ["epochs=3"])
    save_config(old, tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def replace_fails(src, dst):  # the disk fills up, or the process dies, before the rename
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", replace_fails)
    with pytest.raises(OSError):
        save_config(load_config("digits_demo", ["epochs=5"]), tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # no temp files left


def test_a_runs_saved_config_continues_it_from_any_directory(
    tmp_path, monkeypatch, tiny_cfg, tiny_data
):
    # docs/training.md: `--config RUN/config.toml` continues RUN. The run was started with a
    # relative output_dir; from another directory, or with the folder moved, that path would
    # name a new, empty run folder.
    import shutil
    from pathlib import Path

    from resnext.config import load_config
    from resnext.train import train

    train_set, val_set = tiny_data(32), tiny_data(16, seed=2)
    monkeypatch.chdir(tmp_path)
    train(tiny_cfg("runs/x", train={"epochs": 1}), train_set=train_set, val_set=val_set)
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    cfg = load_config("../runs/x/config.toml", ["train.epochs=2"])
    assert Path(cfg.resolved_output_dir()) == (tmp_path / "runs" / "x").resolve()
    assert train(cfg, train_set=train_set, val_set=val_set).global_step == 4  # 2 + 2 steps
    assert not (tmp_path / "elsewhere" / "runs").exists()
    shutil.move(tmp_path / "runs" / "x", tmp_path / "moved")
    moved = load_config(tmp_path / "moved" / "config.toml", ["train.epochs=3"])
    assert Path(moved.resolved_output_dir()) == (tmp_path / "moved").resolve()
    # an explicit output_dir still wins, and so does one edited into the saved file
    other = load_config(tmp_path / "moved" / "config.toml", [f"output_dir={tmp_path / 'o'}"])
    assert other.resolved_output_dir() == str(tmp_path / "o")
    saved = tmp_path / "moved" / "config.toml"
    edited, n = re.subn(
        r'(?m)^output_dir = ".*"$', f'output_dir = "{tmp_path / "e"}"', saved.read_text()
    )
    assert n == 1
    saved.write_text(edited)
    assert load_config(saved).resolved_output_dir() == str(tmp_path / "e")
