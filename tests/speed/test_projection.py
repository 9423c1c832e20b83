"""Target 6's projection (`resnext.speed.projection`) against the hand computation in
benchmarks/RESULTS.md ("Target 6": 8 GPUs at 1,001 img/s, batch 128, 25.0 M parameters)."""

from __future__ import annotations

import pytest

from resnext.errors import ConfigError
from resnext.speed.projection import project


def test_the_projection_matches_the_hand_computation() -> None:
    p = project(
        images_per_s=1000.0,
        batch_per_device=128,
        params=25_000_000,
        devices=8,
        link_gb_per_s=15.0,
        loader_images_per_core_s=500.0,
    )
    # 90 × 1,281,167 = 115,305,030 images; ÷ 8,000 img/s = 14,413.1 s
    assert p.compute_hours == pytest.approx(14_413.128_75 / 3600)
    assert p.global_batch == 1024
    assert p.steps == 112_603  # 115,305,030 / 1,024 = 112,602.6, the last step short
    # ring allreduce: 2 × 7/8 × 25 M × 4 B = 175 MB through each link, 11.67 ms at 15 GB/s
    assert p.allreduce_mb_per_device == pytest.approx(175.0)
    assert p.allreduce_ms_per_step == pytest.approx(175 / 15)
    assert p.comm_hours_if_not_overlapped * 60 == pytest.approx(112_603 * 11.6667e-3 / 60, rel=1e-4)
    assert p.step_ms == pytest.approx(128.0)
    assert p.loader_cores_per_device == pytest.approx(2.0)


def test_one_device_has_no_allreduce_and_nonpositive_inputs_are_refused() -> None:
    one = dict(images_per_s=10.0, batch_per_device=1, params=1, link_gb_per_s=1.0,
               loader_images_per_core_s=1.0)  # fmt: skip
    assert project(devices=1, **one).allreduce_mb_per_device == 0.0
    with pytest.raises(ConfigError, match="devices: expected a value > 0, got 0"):
        project(devices=0, **one)
    with pytest.raises(ConfigError, match="images_per_s"):
        project(devices=2, **{**one, "images_per_s": float("nan")})
