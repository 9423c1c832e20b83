"""The template solver reproduces Table 2's d column and the official 1x-complexity table."""

from __future__ import annotations

import pytest

import resnext
from resnext import solve_width
from resnext.errors import SpecError
from resnext.models.complexity import param_count

TABLE2 = [(1, 64, 64), (2, 40, 80), (4, 24, 96), (8, 14, 112), (32, 4, 128)]


@pytest.mark.parametrize(("c", "d", "group_width"), TABLE2)
def test_table2(c: int, d: int, group_width: int) -> None:
    sol = solve_width(50, c)
    assert sol.width == d
    assert sol.group_conv_width == group_width


@pytest.mark.parametrize(("c", "d", "group_width"), TABLE2)
def test_whole_network_params_agree(c: int, d: int, group_width: int) -> None:
    # Matching whole-network parameters of ResNet-101 lands on the same widths.
    assert solve_width(101, c, measure="params").width == d


def test_cifar_equal_complexity_baseline() -> None:
    sol = solve_width(29, 1, resnext.get_spec("resnext29_4x16d"), layout="cifar", measure="params")
    assert sol.width == resnext.get_spec("resnet29_1x45d").base_width
    assert abs(sol.relative_error) < 0.01


def test_bad_measure() -> None:
    with pytest.raises(SpecError, match="measure"):
        solve_width(50, 2, measure="speed")


def test_reference_widths_are_kept() -> None:
    # A reference of another output width: the candidates must be built at that width too. The
    # expected d comes from counting each candidate network's parameters directly.
    ref = resnext.get_spec("resnext29_2x16d_w128")
    assert ref.out_width == 128
    target = param_count(ref)
    best = min(
        range(1, 80),
        key=lambda d: abs(param_count(ref.replace(cardinality=1, base_width=d)) - target),
    )
    assert solve_width(29, 1, ref, layout="cifar", measure="params").width == best


def test_bad_reference() -> None:
    with pytest.raises(SpecError, match="reference: expected a ModelSpec"):
        solve_width(50, 2, reference="resnet50")  # type: ignore[arg-type]
    with pytest.raises(SpecError, match="does not match layout"):
        solve_width(50, 2, reference=resnext.get_spec("resnext29_8x64d"))
