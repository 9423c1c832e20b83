"""`train.merge_groups`: a run whose grouped convolutions are merged trains the plain run's model."""

from __future__ import annotations

import json

import pytest
import torch

from resnext.train import train


def test_a_merged_run_trains_the_plain_runs_model(tmp_path, merge_factor_wins, tiny_cfg, tiny_data):
    merge_factor_wins(2)  # every grouped layer two groups at a time, whatever this CPU measures
    finals, weights = {}, {}
    for merged in (False, True):
        name = "merged" if merged else "plain"
        cfg = tiny_cfg(
            tmp_path / name,
            model={"name": "resnext_tiny", "spec": {"num_classes": 4, "cardinality": 4}},
            train={"epochs": 2, "merge_groups": merged},
        )
        result = train(cfg, train_set=tiny_data(64), val_set=tiny_data(40, seed=2))
        finals[name] = result.final
        weights[name] = torch.load(result.run_dir / "checkpoints" / "last.pt", weights_only=True)[
            "model"
        ]
        record = json.loads((result.run_dir / "provenance.json").read_text())
        assert bool(record["group_merges"]) == merged
        if merged:
            assert set(record["group_merges"].values()) == {2}
    assert list(weights["merged"]) == list(weights["plain"])
    for key, value in weights["plain"].items():
        if value.dtype.is_floating_point:
            torch.testing.assert_close(weights["merged"][key], value, rtol=1e-3, atol=1e-4)
    for key, value in finals["plain"].items():
        if key.endswith("loss"):
            assert finals["merged"][key] == pytest.approx(value, rel=1e-3), key
