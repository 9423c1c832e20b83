"""Run a test on one build of a kernel module, made the module's for the test, or skip saying why."""

from __future__ import annotations

from types import ModuleType

import pytest

from resnext.native import Build
from resnext.speed.capability import cpu_flags


def use_build(
    monkeypatch: pytest.MonkeyPatch, module: ModuleType, attr: str, build: Build, label: str
) -> None:
    """Make `build` `module.<attr>`; skip where this CPU
    lacks its flags or `module.unavailable_reason()` says it cannot run (an AVX-512 CPU also runs
    the AVX2 build)."""
    missing = build.cpu_needs - cpu_flags()
    if missing:
        pytest.skip(f"the {build.name} build needs {sorted(missing)}")
    monkeypatch.setattr(module, attr, build)
    problem = module.unavailable_reason()
    if problem is not None:
        pytest.skip(f"{label} unavailable: {problem}")
