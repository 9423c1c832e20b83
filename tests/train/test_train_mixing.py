"""Mixup and CutMix: what is mixed with what, in which proportion, and the config checks."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from resnext.config import load_config
from resnext.errors import ConfigError
from resnext.train.loop import StepContext, train_one_epoch
from resnext.train.metrics import Meter
from resnext.train.mixing import BatchMixer
from resnext.train.progress import Progress


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


class _Recorder(nn.Module):
    """A linear classifier that keeps every input it is given."""

    def __init__(self, classes: int) -> None:
        super().__init__()
        self.fc = nn.Linear(3 * 4 * 4, classes)
        self.inputs: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.inputs.append(x.detach().clone())
        return self.fc(x.flatten(1))


def _one_step_inputs(
    images: torch.Tensor, labels: torch.Tensor, accum_steps: int, alpha: dict
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The micro-batches the model saw, and the soft targets scored, in one training step."""
    torch.manual_seed(7)  # every rank's global RNG, seeded alike
    model = _Recorder(4)
    targets: list[torch.Tensor] = []

    def criterion(logits: torch.Tensor, goal: torch.Tensor) -> torch.Tensor:
        targets.append(goal.detach().clone())
        return F.cross_entropy(logits, goal)

    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    ctx = StepContext(
        model=model,
        optimizer=optimizer,
        scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0),
        scaler=None,
        criterion=criterion,  # type: ignore[arg-type]
        device=torch.device("cpu"),
        amp_dtype=None,
        channels_last=False,
        accum_steps=accum_steps,
        grad_clip=0.0,
        distributed=False,
        mixer=BatchMixer(4, **alpha),
    )
    train_one_epoch(
        ctx,
        [(images, labels)],  # type: ignore[arg-type]
        epoch=0,
        start_step=0,
        global_step=0,
        meter=Meter(),
        progress=Progress(1, "test", enabled=False),
    )
    return model.inputs, targets


@pytest.mark.parametrize("alpha", [{"mixup_alpha": 0.4}, {"cutmix_alpha": 1.0}])
def test_one_process_accumulating_two_micro_batches_mixes_as_two_processes(alpha):
    # docs/training.md: one process with accum_steps=2 sees exactly the micro-batches that 2
    # processes see. Rank r of a 2-process job takes micro-batch r alone (accum_steps=1) from the
    # same seeded RNG; mixing must pair images within each micro-batch, with the same draw.
    images, labels = _constant_images(8, 4), torch.tensor([0, 1, 2, 3, 3, 2, 1, 0])
    one_inputs, one_targets = _one_step_inputs(images, labels, 2, alpha)
    assert len(one_inputs) == 2
    for rank in range(2):
        part = slice(4 * rank, 4 * rank + 4)
        inputs, targets = _one_step_inputs(images[part], labels[part], 1, alpha)
        assert torch.equal(one_inputs[rank], inputs[0])
        assert torch.equal(one_targets[rank], targets[0])
    # mixed, with partners inside the micro-batch only (image i holds the value i)
    assert not torch.equal(one_inputs[0], images[:4])
    assert float(one_inputs[0].max()) <= 3.0 + 1e-6
    assert float(one_inputs[1].min()) >= 4.0 - 1e-6
