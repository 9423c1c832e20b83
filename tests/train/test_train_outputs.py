"""What a run leaves in its folder: JSON-lines metrics, TensorBoard events, the curve PNG, provenance."""

from __future__ import annotations

import json

import pytest
import torch

from resnext.config import load_config
from resnext.train import read_metrics, train
from resnext.train.optim import LRFactor


def test_run_folder_has_metrics_events_png_and_provenance(tmp_path, tiny_cfg, tiny_data, capsys):
    cfg = tiny_cfg(tmp_path / "run", train={"epochs": 3, "log_every": 2, "amp": "auto"})
    result = train(cfg, train_set=tiny_data(64), val_set=tiny_data(40, seed=2))
    run = tmp_path / "run"

    records = read_metrics(run / "metrics.jsonl")
    assert [r["epoch"] for r in records] == [1, 2, 3]
    keys = {"train_loss", "train_top1_err", "train_top5_err", "val_top1_err", "val_top5_err", "lr"}
    assert keys | {"images_per_s", "epoch_time_s"} <= set(records[0])
    for r in records:
        assert 0.0 <= r["val_top5_err"] <= r["val_top1_err"] <= 100.0
        assert r["images_per_s"] > 0
    # The tiny data is learnable: the error falls below chance (75 % for 4 classes).
    assert records[-1]["train_top1_err"] < 75.0

    png = (run / "curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    val_err = events.Scalars("val/top1_err")
    assert [e.step for e in val_err] == [1, 2, 3]
    assert [e.value for e in val_err] == pytest.approx([r["val_top1_err"] for r in records])

    prov = json.loads((run / "provenance.json").read_text())
    assert prov["torch"] == torch.__version__
    assert "commit" in prov["git"]
    # the precision `auto` chose, and the measurement it chose by
    assert prov["amp_dtype"] == ("bfloat16" if prov["bf16_speedup"] >= 1.2 else "float32")
    assert load_config(run / "config.toml") == cfg
    summary = json.loads((run / "result.json").read_text())
    assert summary["final"]["val_top1_err"] == result.final["val_top1_err"]
    # Not a terminal: plain progress lines with a rate and an ETA.
    err = capsys.readouterr().err
    assert "img/s eta" in err and "\r" not in err


def test_lr_schedule_matches_hand_computed_values():
    cfg = load_config("digits_demo", ["schedule.kind=step", "schedule.milestones=2,4", "epochs=6"])
    step = LRFactor(cfg.schedule.__class__(kind="step", milestones=(2, 4)), 10, 6, 0.1)
    assert [step(s) for s in (0, 19, 20, 39, 40, 59)] == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01])
    cos = LRFactor(
        cfg.schedule.__class__(kind="cosine", warmup_epochs=1, warmup_start=0.1), 10, 5, 0.1
    )
    # Warmup 0.1 -> 1 over 10 steps, then half a cosine over the remaining 40.
    assert cos(0) == pytest.approx(0.1)
    assert cos(5) == pytest.approx(0.55)
    assert cos(10) == pytest.approx(1.0)
    assert cos(30) == pytest.approx(0.5)
    assert cos(50) == pytest.approx(0.0, abs=1e-12)


def test_progress_bar_on_a_terminal_redraws_one_line_with_rate_and_eta():
    import io

    from resnext.train.progress import Progress

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    screen = Terminal()
    bar = Progress(4, "epoch 1/1", stream=screen)
    for _ in range(4):
        bar.update(32, "loss 1.0")
    text = screen.getvalue()
    assert text.count("\r") == 4 and text.endswith("\n")
    assert "[########################] 4/4" in text
    assert "img/s eta 00:00" in text
    # Of a job's processes, rank 0 shows the job's rate: each took the same share of a step.
    lines = io.StringIO()
    job = Progress(2, "epoch", stream=lines, every=1, processes=4)
    job.t0 -= 1.0  # one second in, after two steps of 32 images on each of 4 processes
    job.update(32)
    job.update(32)
    rate = float(lines.getvalue().splitlines()[-1].split()[2])
    assert 200 < rate <= 256  # 256 images in a little over a second


class _Named(torch.utils.data.Dataset):
    """A dataset that names its classes, as ImageFolder and CIFAR do."""

    def __init__(self, data, classes):
        self.data, self.classes = data, classes

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        return self.data[i]


def test_a_run_keeps_its_class_names_for_prediction_and_conversion(tmp_path, tiny_cfg, tiny_data):
    from resnext.commands.convert_cmd import convert_weights
    from resnext.errors import WeightsError
    from resnext.inference.loading import load_model
    from resnext.train.checkpoint import atomic_save, load_checkpoint

    names = ["cat", "dog", "fox", "owl"]
    cfg = tiny_cfg(tmp_path / "run", train={"epochs": 1})
    result = train(cfg, train_set=_Named(tiny_data(32), names), val_set=tiny_data(16, seed=2))
    assert load_model(None, result.last_checkpoint).class_names == tuple(names)
    out = convert_weights(str(result.last_checkpoint), "resnext_tiny", tmp_path / "t.safetensors")
    assert load_model(None, out).class_names == tuple(names)

    # A set without names leaves the indices. (This config names its class count in
    # model.spec.num_classes, which load_model once passed to the builder twice.)
    other = train(
        tiny_cfg(tmp_path / "other", train={"epochs": 1}),
        train_set=tiny_data(32),
        val_set=tiny_data(16, seed=2),
    )
    assert load_model(None, other.last_checkpoint).class_names == ("0", "1", "2", "3")
    # A damaged list is refused by name, not used to misname predictions.
    ckpt = load_checkpoint(result.last_checkpoint)
    ckpt["class_names"] = ["cat", "dog"]
    atomic_save(ckpt, result.last_checkpoint)
    with pytest.raises(WeightsError, match="class_names: expected a list of 4 strings"):
        load_model(None, result.last_checkpoint)


def test_create_model_reads_a_run_checkpoint_as_load_model_does(tmp_path, tiny_cfg, tiny_data):
    # The run's spec overrides (a logit scale, another cardinality) and inputs must come with its
    # weights whichever way they are loaded; ImageNet preprocessing or a scale of 1 would be
    # silently wrong, a cardinality of 2 would not fit.
    import resnext
    from resnext.inference.loading import load_model

    spec = {"num_classes": 4, "logit_scale": 0.25, "cardinality": 2}
    cfg = tiny_cfg(
        tmp_path / "run",
        model={"name": "resnext_tiny", "spec": spec},
        data={"kind": "digits", "image_size": 8},
        train={"epochs": 1},
    )
    ckpt = train(cfg, train_set=tiny_data(32), val_set=tiny_data(16, seed=2)).last_checkpoint
    built = resnext.create_model("resnext_tiny", weights=ckpt).eval()
    loaded = load_model(None, ckpt)
    assert built.spec.logit_scale == 0.25 and built.spec.cardinality == 2
    assert built.preprocessing == loaded.preprocessing and built.preprocessing.crop == 8
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(built(x), loaded.model(x))
