"""The named-model registry: required names, aliases, strictness."""

from __future__ import annotations

import pytest

import resnext
from resnext.errors import RegistryError
from resnext.models import MODELS, ModelEntry, Registry

REQUIRED = """resnet50 resnext50_2x40d resnext50_4x24d resnext50_8x14d resnext50_32x4d resnet101
resnext101_2x40d resnext101_4x24d resnext101_8x14d resnext101_32x4d resnext101_2x64d resnext101_64x4d
resnet101_1x100d resnet200 resnext101_32x8d resnext101_32x16d resnext152_32x4d resnext50d_32x4d
resnext29_8x64d resnext29_16x64d""".split()

MMPRETRAIN = {
    "resnext50-32x4d_8xb32_in1k": "resnext50_32x4d",
    "resnext101-32x4d_8xb32_in1k": "resnext101_32x4d",
    "resnext101-32x8d_8xb32_in1k": "resnext101_32x8d",
    "resnext152-32x4d_8xb32_in1k": "resnext152_32x4d",
}


@pytest.mark.parametrize("name", REQUIRED)
def test_required_models_are_registered(name: str) -> None:
    assert name in resnext.list_models()


def test_names_encode_the_template() -> None:
    # The name's CxD must be the spec's cardinality and first-stage width per group.
    for name in resnext.list_models("res*x*d"):
        tail = name.split("_")[1]
        c, d = tail.removesuffix("d").split("x")
        spec = resnext.get_spec(name)
        assert (spec.cardinality, spec.stage_bottleneck_widths[0] // spec.cardinality) == (
            int(c),
            int(d),
        ), name


@pytest.mark.parametrize(("alias", "name"), MMPRETRAIN.items())
def test_mmpretrain_names_resolve(alias: str, name: str) -> None:
    assert resnext.get_spec(alias) == resnext.get_spec(name)


def test_unknown_name_lists_closest() -> None:
    with pytest.raises(RegistryError, match=r"closest: .*resnext50_32x4d"):
        resnext.create_model("resnext50_32x5d")


def test_duplicate_registration_is_refused() -> None:
    reg = Registry()
    entry = MODELS.get("resnext_tiny")
    reg.register(entry)
    with pytest.raises(RegistryError, match="already registered"):
        reg.register(entry)
    with pytest.raises(RegistryError, match="already registered"):
        reg.register(ModelEntry("other", entry.spec, "test", aliases=("resnext_tiny",)))
    # names repeated inside one entry: its own name as an alias, or an alias twice
    for aliases in (("again",), ("twice", "twice")):
        with pytest.raises(RegistryError, match="names it twice"):
            reg.register(ModelEntry("again", entry.spec, "test", aliases=aliases))
        assert "again" not in reg and "twice" not in reg  # refused whole, nothing half-added


def test_list_models_pattern() -> None:
    names = resnext.list_models("resnext101_*")
    assert names == sorted(names)
    assert "resnext101_64x4d" in names and "resnet101" not in names


def test_small_cpu_models_exist() -> None:
    assert resnext.list_models("resnext_tiny*")
    # The CPU reference: a 3.2 M-parameter ResNeXt-29 (4x16d).
    params = sum(p.numel() for p in resnext.create_model("resnext29_4x16d").parameters())
    assert round(params / 1e6, 1) == 3.2


def test_list_models_takes_timm_style_filters() -> None:
    every = resnext.list_models()
    assert resnext.list_models("") == every and len(every) == len(resnext.models.MODELS)
    both = resnext.list_models(["resnext29_*", "resnet50"])
    assert both == sorted(set(resnext.list_models("resnext29_*")) | {"resnet50"})
    # mmpretrain's names match through their aliases; the canonical names come back
    assert resnext.list_models("resnext50-32x4d*") == ["resnext50_32x4d"]
    with pytest.raises(TypeError, match="pattern: expected a string or a list of strings"):
        resnext.list_models(None)
