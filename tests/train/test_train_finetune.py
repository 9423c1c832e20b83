"""Fine-tuning: a trained checkpoint gets a new classifier; frozen stages keep their weights."""

from __future__ import annotations

import json

import pytest
import torch

import resnext
from resnext.config import load_config
from resnext.errors import ConfigError, WeightsError
from resnext.train import load_checkpoint, train


def test_finetune_replaces_head_and_keeps_frozen_stages(tmp_path, tiny_cfg, tiny_data):
    source = train(
        tiny_cfg(tmp_path / "source", train={"epochs": 1}),
        train_set=tiny_data(48),
        val_set=tiny_data(32, seed=2),
    )
    before = load_checkpoint(source.last_checkpoint)["model"]
    assert before["fc.weight"].shape[0] == 4

    cfg = tiny_cfg(
        tmp_path / "ft",
        model={"name": "resnext_tiny", "spec": {}},
        train={"epochs": 1},
        finetune={"source": str(source.last_checkpoint), "num_classes": 3, "frozen_stages": 1},
    )
    tuned = train(cfg, train_set=tiny_data(48, classes=3, seed=5), val_set=tiny_data(30, classes=3))
    after = load_checkpoint(tuned.last_checkpoint)["model"]

    assert after["fc.weight"].shape == (3, before["fc.weight"].shape[1])
    assert after["fc.bias"].shape == (3,)
    # Stem and stage 1 are frozen (weights and BN statistics); stage 2 and later are trained.
    frozen = [k for k in before if k.startswith(("conv1.", "bn1.", "layer1."))]
    assert frozen
    for key in frozen:
        assert torch.equal(after[key], before[key]), key
    assert not torch.equal(after["layer2.0.conv1.weight"], before["layer2.0.conv1.weight"])


def test_finetune_source_that_does_not_fit_is_a_weights_error(tmp_path, tiny_cfg, tiny_data):
    wrong = tmp_path / "wrong.pt"
    torch.save({"conv1.weight": torch.zeros(1, 1, 1, 1)}, wrong)
    cfg = tiny_cfg(tmp_path / "ft", finetune={"source": str(wrong), "num_classes": 4})
    with pytest.raises(WeightsError, match="do not fit the model"):
        train(cfg, train_set=tiny_data(32), val_set=tiny_data(16))


def _mmpretrain_layout(state: dict[str, torch.Tensor]) -> dict[str, object]:
    # mmpretrain's layout (zoo-facts): {'meta', 'state_dict'}, `backbone.` keys, `head.fc.`.
    return {
        "meta": {"epoch": 1},
        "state_dict": {(f"head.{k}" if k.startswith("fc.") else f"backbone.{k}"): v
                       for k, v in state.items()},
    }  # fmt: skip


@pytest.mark.parametrize("layout", ["mmpretrain", "compiled_ddp"])
def test_finetune_reads_what_create_model_reads(
    tmp_path, tiny_cfg, tiny_data, monkeypatch, layout: str
):
    src = resnext.create_model("resnext_tiny", num_classes=4)
    state = src.state_dict()
    if layout == "mmpretrain":
        payload: object = _mmpretrain_layout(state)
    else:  # a torch.compile'd network under DDP saves `module._orig_mod.` keys
        payload = {f"module._orig_mod.{k}": v for k, v in state.items()}
    torch.save(payload, tmp_path / "source.pth")
    monkeypatch.chdir(tmp_path)  # a relative source, saved absolute with the run
    cfg = tiny_cfg(
        tmp_path / "ft",
        train={"epochs": 1},
        finetune={"source": "source.pth", "num_classes": 3, "frozen_stages": 1},
    )
    tuned = train(cfg, train_set=tiny_data(32, classes=3), val_set=tiny_data(16, classes=3))
    after = load_checkpoint(tuned.last_checkpoint)["model"]
    assert torch.equal(after["layer1.0.conv2.weight"], state["layer1.0.conv2.weight"])  # frozen
    assert after["fc.weight"].shape[0] == 3
    saved = json.loads((tmp_path / "ft" / "config.json").read_text())
    assert saved["finetune"]["source"] == str(tmp_path / "source.pth")
    # The run continues from its own saved config, from another directory.
    monkeypatch.chdir(tmp_path / "ft")
    again = load_config(str(tmp_path / "ft" / "config.toml"), ["train.epochs=2"])
    more = train(again, train_set=tiny_data(32, classes=3), val_set=tiny_data(16, classes=3))
    assert more.epochs_completed == 2


def test_a_source_needing_another_network_is_named_not_inherited(tmp_path, tiny_cfg, tiny_data):
    # A run trained with logit_scale 4: fine-tuned under a config that does not say so, the
    # network would silently carry the scale the run's own config.toml does not record. Its
    # stochastic depth is a training choice, which the fine-tune makes for itself.
    spec = {"num_classes": 4, "logit_scale": 4.0, "drop_path_rate": 0.2}
    source = train(
        tiny_cfg(tmp_path / "src", model={"spec": spec}),
        train_set=tiny_data(32),
        val_set=tiny_data(16, seed=2),
    )
    finetune = {"source": str(source.last_checkpoint), "num_classes": 3}
    cfg = tiny_cfg(tmp_path / "ft", train={"epochs": 1}, finetune=finetune)
    with pytest.raises(
        ConfigError, match=r"model\.spec\.logit_scale=4\.0, where this config gives 1\.0"
    ) as refused:
        train(cfg, train_set=tiny_data(32, classes=3), val_set=tiny_data(16, classes=3))
    assert "drop_path_rate" not in str(refused.value)
    said = tiny_cfg(
        tmp_path / "ft2",
        model={"spec": {"num_classes": 4, "logit_scale": 4.0}},
        train={"epochs": 1},
        finetune=finetune,
    )
    tuned = train(said, train_set=tiny_data(32, classes=3), val_set=tiny_data(16, classes=3))
    assert (
        json.loads((tmp_path / "ft2" / "config.json").read_text())["model"]["spec"]["logit_scale"]
        == 4.0
    )
    assert tuned.epochs_completed == 1


def test_a_tag_source_is_fetched_before_the_ranks_build(tmp_path, monkeypatch):
    import dataclasses
    import socket

    from resnext.errors import DownloadError
    from resnext.train.finetune import prefetch_source
    from resnext.weights import get_weights, table

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}/tiny-0123abcd.pth"
    entry = dataclasses.replace(
        get_weights("resnext50_32x4d.tv_in1k"), tag="resnext_tiny.t", model="resnext_tiny",
        url=closed, hash="0123abcd",
    )  # fmt: skip
    monkeypatch.setitem(table.WEIGHTS, entry.tag, entry)
    monkeypatch.setitem(table.DEFAULT_TAGS, "resnext_tiny", entry.tag)
    monkeypatch.setenv("RESNEXT_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    for source in ("resnext_tiny.t", "DEFAULT"):  # a tag is downloaded (here: offline, refused)
        with pytest.raises(DownloadError, match=r"finetune\.source: could not download"):
            prefetch_source("resnext_tiny", source)
    path = tmp_path / "weights.pth"
    torch.save(resnext.create_model("resnext_tiny").state_dict(), path)
    prefetch_source("resnext_tiny", str(path))  # a file: nothing to fetch
