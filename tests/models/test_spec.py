"""Spec validation: invalid specs fail when made, with a SpecError naming the field."""

from __future__ import annotations

import dataclasses

import pytest

from resnext import ModelSpec, create_model, get_spec
from resnext.errors import SpecError


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"cardinality": 0}, "cardinality"),
        ({"cardinality": -3}, "cardinality"),
        ({"base_width": 0}, "base_width"),
        ({"depths": (3, 0, 6, 3)}, "depths"),
        ({"depths": ()}, "depths"),
        ({"stem": "huge"}, "stem"),
        ({"block_form": "d"}, "block_form"),
        ({"num_classes": -1}, "num_classes"),
        ({"in_chans": 0}, "in_chans"),
        ({"cardinality": 32, "bottleneck_widths": (100, 256, 512, 1024)}, "bottleneck_widths"),
        ({"bottleneck_widths": (64, 128)}, "bottleneck_widths"),
        ({"preact": True, "block_form": "a"}, "block_form"),
        ({"residual": "yes"}, "residual"),
        ({"cardinality": 2.5}, "cardinality"),
        ({"se_reduction": 10_000}, "se_reduction"),
        ({"logit_scale": 0.0}, "logit_scale"),
        ({"logit_scale": -0.5}, "logit_scale"),
        ({"logit_scale": float("nan")}, "logit_scale"),
        ({"logit_scale": "0.1"}, "logit_scale"),
        ({"logit_scale": True}, "logit_scale"),
    ],
)
def test_invalid_spec_names_field(fields: dict, named: str) -> None:
    base = {"depths": (3, 4, 6, 3), "cardinality": 32, "base_width": 4}
    with pytest.raises(SpecError, match=named):
        ModelSpec(**{**base, **fields})


def test_spec_error_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        ModelSpec(depths=(1,), cardinality=0)


def test_unknown_override_lists_allowed_fields() -> None:
    with pytest.raises(SpecError, match=r"unknown option\(s\) cardinalty.*allowed:.*cardinality"):
        create_model("resnext_tiny", cardinalty=4)


def test_spec_is_frozen_and_roundtrips() -> None:
    spec = get_spec("resnext50d_32x4d")
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.cardinality = 2  # type: ignore[misc]
    again = ModelSpec.from_dict(spec.to_dict())
    assert again == spec
    with pytest.raises(SpecError, match="unknown option"):
        ModelSpec.from_dict({**spec.to_dict(), "colour": "blue"})


def test_geometry_follows_the_template() -> None:
    # Table 1 (right): grouped widths 128/256/512/1024 and outputs 256/512/1024/2048 for 32x4d.
    spec = get_spec("resnext50_32x4d")
    assert spec.stage_bottleneck_widths == (128, 256, 512, 1024)
    assert spec.stage_out_widths == (256, 512, 1024, 2048)
    assert spec.depth == 50
    assert get_spec("resnext29_8x64d").depth == 29
    assert get_spec("resnet101").depth == 101
