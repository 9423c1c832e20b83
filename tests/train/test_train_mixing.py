"""Mixup and CutMix: what is mixed with what, in which proportion, and the config checks."""

from __future__ import annotations

import pytest
import torch

from resnext.config import load_config
from resnext.errors import ConfigError
from resnext.train.mixing import BatchMixer


def _constant_images(n: int, size: int = 16) -> torch.Tensor:
    # Image i is filled with the value i, so every output pixel tells which images it came from.
    return torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 3, size, size).clone()


def test_mixup_blends_each_image_with_its_mirror_partner_in_the_target_proportion():
    torch.manual_seed(0)
    n = 6
    images, labels = _constant_images(n), torch.arange(n) % 3
    mixed, target = BatchMixer(3, mixup_alpha=0.4)(images, labels)
    # By hand: out_i = lam * i + (1 - lam) * (n - 1 - i), so lam = (out_0 - (n-1)) / (0 - (n-1)).
    lam = float((mixed[0, 0, 0, 0] - (n - 1)) / (0 - (n - 1)))
    for i in range(n):
        assert torch.allclose(
            mixed[i], torch.full_like(mixed[i], lam * i + (1 - lam) * (n - 1 - i))
        )
        expected = torch.zeros(3)
        expected[labels[i]] += lam
        expected[labels[n - 1 - i]] += 1 - lam
        assert torch.allclose(target[i], expected, atol=1e-6)


def test_cutmix_pastes_one_box_whose_area_is_the_partner_share():
    torch.manual_seed(1)
    n, size = 4, 32
    images, labels = _constant_images(n, size), torch.tensor([0, 1, 2, 3])
    for _ in range(20):
        mixed, target = BatchMixer(4, cutmix_alpha=1.0)(images, labels)
        for i in range(n):
            from_partner = mixed[i, 0] == n - 1 - i
            share = float(from_partner.float().mean())
            assert target[i, labels[n - 1 - i]] == pytest.approx(share, abs=1e-6)
            assert target[i, labels[i]] == pytest.approx(1 - share, abs=1e-6)
            if share:  # a solid rectangle
                rows = from_partner.any(1).nonzero().flatten()
                cols = from_partner.any(0).nonzero().flatten()
                area = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
                assert int(from_partner.sum()) == int(area)


def test_mixup_lambda_follows_beta_alpha_alpha():
    torch.manual_seed(2)
    mixer = BatchMixer(2, mixup_alpha=1.0)
    images, labels = _constant_images(2, 1), torch.tensor([0, 1])
    lams = torch.tensor([float(mixer(images, labels)[1][0, 0]) for _ in range(4000)])
    # Beta(1, 1) is uniform: mean 1/2, variance 1/12.
    assert abs(float(lams.mean()) - 0.5) < 0.02
    assert abs(float(lams.var()) - 1 / 12) < 0.006


def test_mixing_config_is_checked(tmp_path):
    cfg = load_config("cifar10_mini_cpu", [f"data.root={tmp_path}", "data.cutmix_alpha=1.0"])
    assert cfg.data.cutmix_alpha == 1.0
    with pytest.raises(ConfigError, match=r"data\.mixup_alpha"):
        load_config("cifar10_mini_cpu", [f"data.root={tmp_path}", "data.mixup_alpha=-0.2"])
    with pytest.raises(ConfigError, match="at least 2 classes"):
        BatchMixer(1, mixup_alpha=0.2)


class _Stop(Exception):
    pass


def test_training_with_mixing_runs_and_resumes_alike(tmp_path):
    from resnext.train import train

    def stop_in_second_epoch(epoch: int, step: int, global_step: int) -> None:
        if epoch == 1 and step == 3:
            raise _Stop

    overrides = [
        "data.image_size=8",
        "data.batch_size=128",
        "data.cutmix_alpha=1.0",
        "data.mixup_alpha=0.2",
        "train.threads=1",
        "epochs=2",
    ]
    full = train(load_config("digits_demo", [*overrides, f"output_dir={tmp_path / 'a'}"]))
    cut = load_config("digits_demo", [*overrides, f"output_dir={tmp_path / 'b'}"])
    with pytest.raises(_Stop):
        train(cut, on_step=stop_in_second_epoch)
    resumed = train(cut)  # from the end-of-epoch-1 checkpoint
    assert resumed.epochs_completed == 2
    # The mixing draws come from the checkpointed RNG: the resumed run repeats the uninterrupted one.
    assert resumed.final["train_loss"] == pytest.approx(full.final["train_loss"], rel=1e-6)
    assert resumed.final["val_top1_err"] == pytest.approx(full.final["val_top1_err"])
