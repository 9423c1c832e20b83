"""torch.hub: the repository's hubconf.py offers every registered model."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

import resnext
from resnext.errors import WeightsError

REPO = Path(__file__).resolve().parents[2]


def test_every_registered_model_is_a_hub_entry_point() -> None:
    spec = importlib.util.spec_from_file_location("resnext_hubconf", REPO / "hubconf.py")
    assert spec is not None and spec.loader is not None
    hub = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hub)
    # torch.hub.list's rule: a public callable of the module is an entry point.
    entries = {n for n in dir(hub) if not n.startswith("_") and callable(getattr(hub, n))}
    assert entries == set(resnext.list_models())
    assert all(importlib.util.find_spec(d) is not None for d in hub.dependencies)


def test_hub_load_builds_through_create_model() -> None:
    model = torch.hub.load(str(REPO), "resnext_tiny", source="local", num_classes=3)
    assert isinstance(model, resnext.ResNeXt) and model.fc.out_features == 3
    with pytest.raises(WeightsError, match="no published checkpoint of 'resnext_tiny'"):
        torch.hub.load(str(REPO), "resnext_tiny", source="local", pretrained=True)
