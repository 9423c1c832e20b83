"""The `without_amx` fixture turns off every module whose kernels run on AMX tiles."""

from __future__ import annotations

import importlib
from pathlib import Path

SPEED = Path(__file__).resolve().parents[2] / "src" / "resnext" / "speed"


def test_every_module_loading_an_amx_kernel_reports_itself_unavailable(without_amx: None) -> None:
    # a module left out would keep its AMX kernel in the tests that ask for none (stop 45: the
    # quads kernel took stage 1 from the vector fusions under test)
    loaders = sorted(p.stem for p in SPEED.glob("*.py") if "load_amx(" in p.read_text())
    assert len(loaders) >= 6
    for name in loaders:
        module = importlib.import_module(f"resnext.speed.{name}")
        assert module.unavailable_reason() == "as on a CPU without AMX", name
