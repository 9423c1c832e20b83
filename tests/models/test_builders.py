"""torchvision's builder functions, one per registered model: its arguments and its refusals."""

from __future__ import annotations

import pytest
import torch

import resnext
import resnext.models


def test_builders_take_torchvisions_arguments() -> None:
    from resnext.models import resnext50_32x4d  # torchvision.models' spelling

    assert resnext50_32x4d is resnext.models.resnext50_32x4d
    assert resnext50_32x4d.__name__ == "resnext50_32x4d"
    model = resnext50_32x4d(num_classes=10, zero_init_residual=True, groups=32, width_per_group=4)
    assert model.spec == resnext.get_spec("resnext50_32x4d", num_classes=10, zero_init_last_bn=True)
    # torchvision's zero_init_residual: each residual branch's last BN starts with weight 0
    assert all(float(b.bn3.weight.abs().sum()) == 0 for s in model.stages() for b in s)
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 10)
    assert "resnext101_32x8d" in dir(resnext.models)


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"groups": 8}, "groups: expected 32 for resnext50_32x4d, got 8"),
        ({"width_per_group": 8}, "width_per_group: expected 4"),
        ({"norm_layer": torch.nn.Identity}, "norm_layer: not supported"),
        ({"replace_stride_with_dilation": [False, True, True]}, "replace_stride_with_dilation"),
        ({"cardinalty": 4}, "unknown option"),
        ({"progress": "yes"}, "progress: expected a bool"),
    ],
)
def test_builders_refuse_what_they_cannot_build_by_name(kwargs: dict, named: str) -> None:
    with pytest.raises((ValueError, TypeError), match=named):
        resnext.models.resnext50_32x4d(**kwargs)


def test_builders_pickle_and_take_torchvisions_older_pretrained_flag() -> None:
    import pickle

    from resnext.errors import WeightsError

    assert pickle.loads(pickle.dumps(resnext.models.resnext_tiny)) is resnext.models.resnext_tiny
    # pretrained=True asks for the default weights, which this test model does not have
    with pytest.raises(WeightsError, match="no published checkpoint of 'resnext_tiny'"):
        resnext.models.resnext_tiny(pretrained=True)
    with pytest.raises(ValueError, match="pretrained: expected either it or weights"):
        resnext.models.resnext_tiny(pretrained=True, weights="x.pth")


def test_only_registered_names_have_builders() -> None:
    with pytest.raises(AttributeError, match="resnext50_32x5d"):
        resnext.models.resnext50_32x5d  # noqa: B018
