"""Recipe options beyond the paper: cutout, test-time flip, typed spec overrides, kept memory."""

from __future__ import annotations

import math
import sys

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from resnext.config import load_config
from resnext.data.transforms import Cutout
from resnext.errors import ConfigError
from resnext.speed.allocator import keep_freed_memory
from resnext.train.evaluate import evaluate


def test_cutout_zeroes_one_square_of_the_given_side_at_most():
    gen = torch.Generator().manual_seed(0)
    cut = Cutout(8, generator=gen)
    full_squares = 0
    for _ in range(200):
        out = cut(torch.ones(3, 32, 32))
        zero = out[0] == 0
        assert torch.equal(zero, out[1] == 0) and torch.equal(zero, out[2] == 0)
        rows, cols = zero.any(1).nonzero().flatten(), zero.any(0).nonzero().flatten()
        # The zeros form one solid axis-aligned rectangle no larger than 8 x 8.
        h, w = int(rows.max() - rows.min() + 1), int(cols.max() - cols.min() + 1)
        assert h <= 8 and w <= 8 and int(zero.sum()) == h * w
        assert (out[:, ~zero] == 1).all()
        full_squares += h * w == 64
    assert full_squares > 100  # centres away from the border cut the whole square


def test_cutout_in_the_cifar_recipe_and_its_validation(tmp_path):
    cfg = load_config("cifar10_mini_cpu", [f"data.root={tmp_path}", "data.cutout=12"])
    assert cfg.data.cutout == 12
    with pytest.raises(ConfigError, match=r"data\.cutout"):
        load_config("cifar10_mini_cpu", [f"data.root={tmp_path}", "data.cutout=-1"])


class _LeftHeavy(nn.Module):
    """Scores that change under a horizontal flip: class 0 likes a bright left half."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = x.shape[-1]
        left, right = x[..., : w // 2].mean((1, 2, 3)), x[..., w // 2 :].mean((1, 2, 3))
        return torch.stack([4 * (left - right), torch.zeros_like(left)], 1)


def test_flip_evaluation_averages_the_softmax_of_image_and_mirror():
    x = torch.rand(6, 3, 4, 4)
    y = torch.tensor([0, 1, 0, 1, 0, 1])
    loader = DataLoader(TensorDataset(x, y), batch_size=4)
    model = _LeftHeavy()
    plain = evaluate(model, loader, torch.device("cpu"))
    flipped = evaluate(model, loader, torch.device("cpu"), flip=True)
    # By hand: the mirror negates the class-0 logit d, so the averaged class-0 probability is
    # (sigmoid(d) + sigmoid(-d)) / 2 = 0.5 for every image, and the loss is log 2.
    d = 4 * (x[..., :2].mean((1, 2, 3)) - x[..., 2:].mean((1, 2, 3)))
    expected_loss = math.log(2)
    assert flipped["val_loss"] == pytest.approx(expected_loss, abs=1e-5)
    assert not torch.allclose(d, torch.zeros_like(d))
    assert plain["val_loss"] != pytest.approx(expected_loss, abs=1e-3)


def test_model_spec_overrides_are_typed_by_the_spec_fields(tmp_path):
    cfg = load_config(
        "cifar10_mini_cpu",
        [f"data.root={tmp_path}", "model.spec.depths=2,2,2", "model.spec.stride_in_1x1=true"],
    )
    assert cfg.model.spec["depths"] == (2, 2, 2)
    assert cfg.model.spec["stride_in_1x1"] is True


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt is Linux-only")
def test_keep_freed_memory_is_accepted_by_glibc():
    assert keep_freed_memory() is True


@pytest.mark.parametrize(
    ("argv", "kept_by_cli"),
    [
        (["train", "--config", "digits_demo", "train.keep_memory=false"], False),
        (["demo"], False),
        (["bench", "infer", "--allocator", "none"], False),
        (["eval", "--data", "digits"], True),
    ],
)
def test_console_commands_leave_the_allocator_to_their_own_setting(monkeypatch, argv, kept_by_cli):
    # train/demo follow train.keep_memory and bench its --allocator: the console entry point must
    # not switch glibc to kept memory behind their back; eval and predict have no setting.
    import importlib

    from resnext import cli
    from resnext.speed import allocator

    calls: list[str] = []
    monkeypatch.setattr(allocator, "keep_freed_memory", lambda: calls.append("kept") or True)
    monkeypatch.setattr(
        importlib.import_module(f"resnext.commands.{argv[0]}_cmd"), "run", lambda args: 0
    )
    monkeypatch.setattr(sys, "argv", ["resnext", *argv])
    assert cli.main() == 0
    assert calls == (["kept"] if kept_by_cli else [])


def _colour_folder(root, n):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for name, channel in (("blue", 2), ("red", 0)):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 90, (48, 64, 3), dtype=np.uint8)
                pixels[..., channel] = rng.integers(160, 255, (48, 64), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.jpg", quality=90)


def test_planned_pipeline_trains_from_uint8_batches(tmp_path):
    from resnext.train import train

    _colour_folder(tmp_path / "data", 16)
    cfg = load_config(
        "digits_demo",
        [
            "data.kind=imagefolder",
            f"data.root={tmp_path / 'data'}",
            "data.val_split=val",
            "data.planned=true",
            "data.image_size=32",
            "data.batch_size=8",
            "epochs=6",
            "train.threads=1",
            f"output_dir={tmp_path / 'run'}",
        ],
    )
    result = train(cfg)
    # 24 steps let BN's running statistics (momentum 0.1) settle for evaluation.
    # Red against blue survives crops, flips and colour jitter: well under chance (50 %) error.
    assert result.final["val_top1_err"] < 25.0


def test_planned_pipeline_needs_an_image_folder(tmp_path):
    with pytest.raises(ConfigError, match=r"data\.planned.*imagefolder"):
        load_config("cifar10_mini_cpu", [f"data.root={tmp_path}", "data.planned=true"])


def test_cudnn_benchmark_is_a_typed_train_option(tmp_path):
    assert load_config("digits_demo").train.cudnn_benchmark is True  # as timm and torchvision
    cfg = load_config("digits_demo", ["train.cudnn_benchmark=false"])
    assert cfg.train.cudnn_benchmark is False
    with pytest.raises(ConfigError, match=r"train\.cudnn_benchmark"):
        load_config("digits_demo", ["train.cudnn_benchmark=sometimes"])


def test_grad_checkpointing_trains_the_same_weights(tmp_path, tiny_cfg, tiny_data, monkeypatch):
    from resnext.models import network
    from resnext.train import train

    calls = []
    original = network.checkpointed
    monkeypatch.setattr(
        network, "checkpointed", lambda part, x: calls.append(1) or original(part, x)
    )
    weights = {}
    for enabled in (False, True):
        out = tmp_path / str(enabled)
        cfg = tiny_cfg(out, train={"epochs": 2, "grad_checkpointing": enabled})
        assert cfg.train.grad_checkpointing is enabled
        train(cfg, train_set=tiny_data(64), val_set=tiny_data(40, seed=2))
        assert bool(calls) is enabled  # the stages ran checkpointed in the second run only
        last = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
        weights[enabled] = last["model"]
    assert list(weights[False]) == list(weights[True])
    for name, value in weights[False].items():
        # recomputation changes no value: float32 rounding at most; BN statistics counted once
        torch.testing.assert_close(weights[True][name], value, rtol=1e-4, atol=1e-5)
