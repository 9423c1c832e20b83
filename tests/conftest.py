"""Shared pytest fixtures: the location of the real data in ../shared, skipped with a reason when absent."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DIR = REPO_ROOT.parent / "shared"


def _shared_path(*parts: str) -> Path:
    path = SHARED_DIR.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"real data not available: {path} is absent (it ships beside the repo in CI)")
    return path


@pytest.fixture
def cifar10_mini() -> Path:
    """The extracted folder of ../shared/data/cifar10-mini (official CIFAR-10 python format)."""
    return _shared_path("data", "cifar10-mini", "cifar-10-batches-py")


@pytest.fixture
def imagenet_sample() -> Path:
    """The folder of ../shared/data/imagenet-sample (1,000 JPEGs, one per ImageNet class)."""
    return _shared_path("data", "imagenet-sample")


@pytest.fixture
def t7_sample() -> Path:
    """The folder of ../shared/data/t7-sample (a real Lua Torch7 file)."""
    return _shared_path("data", "t7-sample")


@pytest.fixture(autouse=True)
def _deterministic_seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _private_timing_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch) -> None:
    """CLI commands keep optimize's timings in $RESNEXT_TIMING_CACHE: a test's own folder, never
    the user's ~/.cache."""
    monkeypatch.setenv("RESNEXT_TIMING_CACHE", str(tmp_path_factory.mktemp("timings")))


@pytest.fixture
def merge_factor_wins(monkeypatch) -> Callable[[int], None]:
    """`win(m)`: every grouped layer's timing in `resnext.speed.merged_groups` then finds m groups
    merged into one fastest, whatever this CPU would measure."""
    from resnext.speed import merged_groups

    real_call = merged_groups.layer_call

    def tagged(layer, factor, device, dtype, train):
        fn = real_call(layer, factor, device, dtype, train)
        fn.factor = factor
        return fn

    def win(factor: int) -> None:
        monkeypatch.setattr(merged_groups, "layer_call", tagged)
        monkeypatch.setattr(
            merged_groups, "time_ms", lambda fn, device, iters: 0.0 if fn.factor == factor else 1.0
        )

    return win


@pytest.fixture(autouse=True)
def _small_cache_eviction(request: pytest.FixtureRequest, monkeypatch) -> None:
    """`optimize` empties the caches before each layer it times by writing a 64 MB buffer (about
    a third of a registry model's optimize in the tests). Tests check which function the fast path
    computes, not how fast, so a small buffer does: the same calls, less writing. A test marked
    `real_eviction` keeps the real size."""
    from resnext.speed import measure

    if request.node.get_closest_marker("real_eviction") is None:
        monkeypatch.setattr(measure, "EVICT_BYTES", 2**16)
