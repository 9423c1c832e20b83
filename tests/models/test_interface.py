"""The uniform model interface and the options: features, head, classifier reset, init, ablations."""

from __future__ import annotations

import math
import re

import pytest
import torch

import resnext


def test_features_head_and_reset() -> None:
    model = resnext.create_model("resnext_tiny_in", num_classes=5).eval()
    x = torch.randn(2, 3, 64, 64)
    feats = model.forward_features(x)
    assert feats.shape == (2, model.num_features, 2, 2)
    pooled = model.forward_head(feats, pre_logits=True)
    assert torch.allclose(pooled, feats.mean((2, 3)))
    assert torch.allclose(model.forward_head(feats), model(x))
    model.reset_classifier(3)
    assert model(x).shape == (2, 3) and model.spec.num_classes == 3
    model.reset_classifier(0)
    assert model(x).shape == (2, model.num_features)
    with pytest.raises(ValueError, match="num_classes"):
        model.reset_classifier(-2)
    model.reset_classifier(4, "avg")  # timm's call shape, with its only pooling here
    assert model(x).shape == (2, 4)
    with pytest.raises(ValueError, match="global_pool"):
        model.reset_classifier(4, "max")


def test_stage_strides_imagenet() -> None:
    model = resnext.create_model("resnext_tiny_in").eval()
    maps = model.forward_stages(torch.randn(1, 3, 128, 128))
    assert [m.shape[-1] for m in maps] == [32, 16, 8, 4]  # strides 4/8/16/32


def test_stride_placement() -> None:
    default = resnext.create_model("resnext50_32x4d")
    caffe = resnext.create_model("resnext50_32x4d", stride_in_1x1=True)
    assert default.layer2[0].conv1.stride == (1, 1) and default.layer2[0].conv2.stride == (2, 2)
    assert caffe.layer2[0].conv1.stride == (2, 2) and caffe.layer2[0].conv2.stride == (1, 1)


def test_no_residual_has_no_shortcut() -> None:
    model = resnext.create_model("resnext50_32x4d_noresidual")
    assert not any("downsample" in k for k in model.state_dict())
    block = model.layer1[1].eval()
    x = torch.randn(1, 256, 8, 8)
    with torch.no_grad():
        expected = torch.relu(block.bn3(block.transform(x)))
        assert torch.allclose(block(x), expected)


def test_zero_init_last_bn_makes_blocks_identity() -> None:
    model = resnext.create_model("resnext_tiny", zero_init_last_bn=True).eval()
    block = model.layer1[0]
    assert torch.count_nonzero(block.bn3.weight) == 0
    x = torch.rand(1, block.geometry.in_ch, 8, 8)
    with torch.no_grad():
        # Zero residual branch: the block returns relu(shortcut(x)).
        assert torch.allclose(block(x), torch.relu(block.downsample(x)))


def test_he_initialisation_std() -> None:
    # He et al. 2015 with fan-out: std = sqrt(2 / (k*k*out_channels)).
    model = resnext.create_model("resnext50_32x4d")
    w = model.layer3[0].conv2.weight
    expected = math.sqrt(2.0 / (3 * 3 * w.shape[0]))
    assert abs(w.std().item() / expected - 1) < 0.02
    assert torch.all(model.layer3[0].bn2.weight == 1) and torch.all(model.layer3[0].bn2.bias == 0)


def test_preact_block_order() -> None:
    model = resnext.create_model("resnext_tiny", preact=True).eval()
    block = model.layer2[0]
    x = torch.randn(1, block.geometry.in_ch, 8, 8)
    with torch.no_grad():
        pre = torch.relu(block.bn1(x))
        out = block.conv1(pre)
        out = block.conv2(torch.relu(block.bn2(out)))
        out = block.conv3(torch.relu(block.bn3(out)))
        expected = out + block.downsample(pre)
        assert torch.allclose(block(x), expected, atol=1e-6)
    assert model.final_bn is not None
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_preact_imagenet_stem_activates_once() -> None:
    # fb.resnet.torch's pre-activation ImageNet network: conv-BN-ReLU-maxpool stem, then a first
    # block without its own BN-ReLU ('no_preact'); later stages' first blocks pre-activate both
    # paths ('both_preact'). A CIFAR stem is a bare conv, so its first block keeps its BN-ReLU.
    model = resnext.create_model("resnext_tiny_in", preact=True).eval()
    first = model.layer1[0]
    assert not any(k.startswith("layer1.0.bn1.") for k in model.state_dict())
    assert "layer2.0.bn1.weight" in model.state_dict()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        stem = model.maxpool(torch.relu(model.bn1(model.conv1(x))))
        out = first.conv1(stem)
        out = first.conv2(torch.relu(first.bn2(out)))
        out = first.conv3(torch.relu(first.bn3(out)))
        expected = out + (stem if first.downsample is None else first.downsample(stem))
        assert torch.allclose(first(model.forward_stem(x)), expected, atol=1e-5)
    cifar = resnext.create_model("resnext_tiny", preact=True)
    assert "layer1.0.bn1.weight" in cifar.state_dict()
    assert isinstance(cifar.bn1, torch.nn.Identity)


def test_in_chans_option() -> None:
    model = resnext.create_model("resnext_tiny", in_chans=1)
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 10)


def test_logit_scale_multiplies_the_classifier_output_only() -> None:
    torch.manual_seed(0)
    model = resnext.create_model("resnext_tiny", num_classes=4, logit_scale=0.125).eval()
    plain = resnext.create_model("resnext_tiny", num_classes=4).eval()
    # Same architecture and key names: a scale is not a parameter, so weights move freely.
    plain.load_state_dict(model.state_dict())
    x = torch.randn(3, 3, 32, 32)
    pooled = model.forward_features(x).mean((2, 3))
    by_hand = 0.125 * (pooled @ model.fc.weight.T + model.fc.bias)
    assert torch.allclose(model(x), by_hand, atol=1e-6)
    assert torch.allclose(plain(x), by_hand / 0.125, atol=1e-5)
    model.reset_classifier(0)
    assert torch.allclose(model(x), pooled, atol=1e-6)


def test_drop_rate_drops_pooled_features_in_training_only() -> None:
    # timm's drop_rate: dropout on the pooled features before the classifier. By hand: each
    # feature is 0 or kept and scaled by 1 / (1 - p), about p of them dropped.
    torch.manual_seed(0)
    model = resnext.create_model("resnext_tiny", drop_rate=0.5)
    plain = resnext.create_model("resnext_tiny")
    plain.load_state_dict(model.state_dict())
    feats = torch.rand(64, model.num_features, 2, 2) + 0.5
    pooled = feats.mean((2, 3))
    model.train()
    out = model.forward_head(feats, pre_logits=True)
    kept = out != 0
    torch.testing.assert_close(out[kept], 2 * pooled[kept])
    assert 0.4 < 1 - kept.float().mean().item() < 0.6
    model.eval(), plain.eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(model(x), plain(x))


def _timm_groups(model: torch.nn.Module, coarse: bool) -> dict[str, tuple]:
    """Each parameter's group as timm's group_with_matcher orders them: (matcher entry, the
    pattern's numbers or fixed ordinal); None where no pattern matches (timm's head group)."""
    groups: dict[str, tuple] = {}
    for name, _ in model.named_parameters():
        groups[name] = None
        for entry, patterns in enumerate(model.group_matcher(coarse).values()):
            pairs = [(patterns, None)] if isinstance(patterns, str) else patterns
            for pattern, ordinal in pairs:
                found = re.match(pattern, name)
                if found and groups[name] is None:
                    groups[name] = (entry, ordinal or tuple(int(g) for g in found.groups() if g))
    return groups


def test_group_matcher_groups_stem_stages_or_blocks_then_head_as_timm() -> None:
    model = resnext.create_model("resnext50_32x4d", num_classes=10)
    coarse = _timm_groups(model, coarse=True)
    assert {n for n, g in coarse.items() if g == (0, ())} == {
        "conv1.weight",
        "bn1.weight",
        "bn1.bias",
    }
    for name, group in coarse.items():
        if name.startswith("layer"):
            assert group == (1, (int(name[5]),)), name
    assert {n for n, g in coarse.items() if g is None} == {"fc.weight", "fc.bias"}
    fine = _timm_groups(model, coarse=False)
    assert len({g for g in fine.values() if g and g[0] == 1}) == 3 + 4 + 6 + 3  # one per block
    assert fine["layer3.5.conv2.weight"] == (1, (3, 5))
    preact = resnext.create_model("resnext_tiny", preact=True)
    # a pre-activation network's final BN goes with its last block, before the head
    assert _timm_groups(preact, coarse=True)["final_bn.weight"] == (1, (99999,))
