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
        ({"drop_rate": 1.0}, "drop_rate"),
        ({"drop_rate": -0.1}, "drop_rate"),
        ({"drop_rate": "0.2"}, "drop_rate"),
        ({"drop_rate": True}, "drop_rate"),
        ({"drop_path_rate": 1.0}, "drop_path_rate"),
        ({"drop_path_rate": "0.1"}, "drop_path_rate"),
        # stochastic depth drops residual branches: without shortcuts it would drop whole blocks
        ({"drop_path_rate": 0.1, "residual": False}, "drop_path_rate"),
        # a zeroed last BN without a shortcut starts every block at 0: the network cannot train
        ({"zero_init_last_bn": True, "residual": False}, "zero_init_last_bn"),
        ({"description": 5}, "description"),
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


@pytest.mark.parametrize(
    ("data", "named"),
    [({"depths": 5}, "depths"), ({"depths": [1, 1], "bottleneck_widths": 8}, "bottleneck_widths")],
)
def test_from_dict_checks_types_before_converting(data: dict, named: str) -> None:
    with pytest.raises(SpecError, match=named):
        ModelSpec.from_dict(data)


def test_from_dict_takes_lists() -> None:
    spec = ModelSpec.from_dict({"depths": [1, 2], "cardinality": 2, "bottleneck_widths": [8, 16]})
    assert spec.depths == (1, 2) and spec.bottleneck_widths == (8, 16)


@pytest.mark.parametrize(
    ("builder", "options", "named"),
    [
        ("cifar_spec", {"stem": "imagenet"}, "stem"),
        ("cifar_spec", {"depths": (1, 1, 1)}, "depths"),
        ("imagenet_spec", {"depths": (1, 1)}, "depths"),
    ],
)
def test_layout_builders_refuse_fields_they_set(builder: str, options: dict, named: str) -> None:
    from resnext.models import spec as spec_module

    make = getattr(spec_module, builder)
    depth = 29 if builder == "cifar_spec" else 50
    with pytest.raises(SpecError, match=f"{named}: {builder} sets it"):
        make(depth, 8, 4, **options)
