"""State-dict keys are a public API: torchvision's ResNet names, pinned for resnext50_32x4d."""

from __future__ import annotations

import resnext

BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def _bn(prefix: str, ch: int) -> dict[str, tuple[int, ...]]:
    return {f"{prefix}.{k}": (() if k == "num_batches_tracked" else (ch,)) for k in BN}


def torchvision_resnext_keys(
    blocks: tuple[int, ...], groups: int, width_per_group: int, num_classes: int = 1000
) -> dict[str, tuple[int, ...]]:
    """Keys and shapes written from torchvision's naming rules and width formula (zoo-facts.md)."""
    keys: dict[str, tuple[int, ...]] = {"conv1.weight": (64, 3, 7, 7), **_bn("bn1", 64)}
    inplanes = 64
    for stage, n in enumerate(blocks):
        planes = 64 * 2**stage
        width = int(planes * (width_per_group / 64.0)) * groups
        for i in range(n):
            p = f"layer{stage + 1}.{i}"
            keys[f"{p}.conv1.weight"] = (width, inplanes, 1, 1)
            keys.update(_bn(f"{p}.bn1", width))
            keys[f"{p}.conv2.weight"] = (width, width // groups, 3, 3)
            keys.update(_bn(f"{p}.bn2", width))
            keys[f"{p}.conv3.weight"] = (planes * 4, width, 1, 1)
            keys.update(_bn(f"{p}.bn3", planes * 4))
            if i == 0:
                keys[f"{p}.downsample.0.weight"] = (planes * 4, inplanes, 1, 1)
                keys.update(_bn(f"{p}.downsample.1", planes * 4))
            inplanes = planes * 4
    keys["fc.weight"] = (num_classes, 2048)
    keys["fc.bias"] = (num_classes,)
    return keys


def _shapes(model) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def test_resnext50_32x4d_keys_and_shapes_are_torchvisions() -> None:
    got = _shapes(resnext.create_model("resnext50_32x4d"))
    expected = torchvision_resnext_keys((3, 4, 6, 3), 32, 4)
    assert list(got) == list(expected)  # same names in the same order
    assert got == expected
    assert len(got) == 320
    # Shapes quoted in zoo-facts.md for the grouped conv.
    assert got["layer1.0.conv2.weight"] == (128, 4, 3, 3)
    assert got["layer4.0.conv2.weight"] == (1024, 32, 3, 3)


def test_other_torchvision_resnexts_match() -> None:
    for name, blocks, g, w in [
        ("resnext101_32x8d", (3, 4, 23, 3), 32, 8),
        ("resnext101_64x4d", (3, 4, 23, 3), 64, 4),
        ("resnet50", (3, 4, 6, 3), 1, 64),
    ]:
        assert _shapes(resnext.create_model(name)) == torchvision_resnext_keys(blocks, g, w), name


def test_deep_stem_and_avg_down_keys_follow_timm() -> None:
    keys = resnext.create_model("resnext50d_32x4d").state_dict().keys()
    for k in ("conv1.0.weight", "conv1.1.weight", "conv1.3.weight", "conv1.4.weight"):
        assert k in keys
    assert "conv1.6.weight" in keys and "bn1.weight" in keys
    # avg_down: downsample.0 is the parameter-free pool, .1 the conv, .2 the BN.
    assert "layer2.0.downsample.1.weight" in keys and "layer2.0.downsample.2.running_var" in keys
    assert not any(k.startswith("layer2.0.downsample.0.") for k in keys)


def test_se_keys_follow_timm() -> None:
    keys = resnext.create_model("seresnext50_32x4d").state_dict().keys()
    assert {"layer1.0.se.fc1.weight", "layer1.0.se.fc1.bias", "layer1.0.se.fc2.weight"} <= set(keys)
