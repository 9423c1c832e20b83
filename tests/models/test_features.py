"""timm's feature interface: `feature_info`, `forward_intermediates` and `features_only` networks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import resnext
from resnext.errors import ConfigError
from resnext.models.features import FeatureNet
from resnext.speed import stem_dot
from resnext.speed.fold import fold_conv_bn_weights
from resnext.speed.stem_fusion import FusedStem, ReluApplied


def _randomise_bn(model: nn.Module) -> nn.Module:
    gen = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.num_features, generator=gen) - 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
    return model.eval()


def _by_hand(model: resnext.ResNeXt, x: torch.Tensor) -> list[torch.Tensor]:
    """The stem's activation and every stage's output, calling the modules one by one as a
    torchvision user walks a ResNet (fb.resnet.torch's order for a pre-activation network)."""
    h = model.conv1(x)
    if not isinstance(model.bn1, nn.Identity):
        h = torch.relu(model.bn1(h))
    maps = [h]
    h = model.maxpool(h)
    for k in range(1, model.spec.num_stages + 1):
        h = getattr(model, f"layer{k}")(h)
        maps.append(h)
    if model.spec.preact:
        maps[-1] = torch.relu(model.final_bn(maps[-1]))
    return maps


def test_feature_info_is_timms_for_resnet50() -> None:
    # timm's ResNet-50 feature_info (act1, layer1-4): channels 64/256/512/1024/2048 at strides
    # 2/4/8/16/32; the module of the stem's activation is torchvision's `relu` here.
    info = resnext.create_model("resnext50_32x4d").feature_info
    assert info.channels() == [64, 256, 512, 1024, 2048]
    assert info.reduction() == [2, 4, 8, 16, 32]
    assert info.module_name() == ["relu", "layer1", "layer2", "layer3", "layer4"]
    assert info.channels(-1) == 2048 and info.reduction([0, 2]) == [2, 8]


@pytest.mark.parametrize(
    "name, size", [("resnext_tiny_in", 64), ("resnext_tiny", 32), ("resnext29_8x64d_preact", 16)]
)
def test_intermediates_are_the_stem_and_stage_maps(name: str, size: int) -> None:
    model = _randomise_bn(resnext.create_model(name))
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        want = _by_hand(model, x)
        last, maps = model.forward_intermediates(x)
        features = model.forward_features(x)
    assert len(maps) == len(want) == len(model.feature_info)
    for got, ref, info in zip(maps, want, model.feature_info, strict=True):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
        assert got.shape[1] == info["num_chs"]
        assert got.shape[-1] == -(-size // info["reduction"])
    assert torch.equal(last, features)


@pytest.mark.parametrize("name", ["resnext_tiny_in", "resnext29_8x64d_preact", "resnet200"])
def test_hooks_on_the_named_modules_see_the_maps(name: str) -> None:
    # torchvision's and timm's hook-based extractors find each map by its module's name.
    model = resnext.create_model(name, preact=True) if name == "resnext_tiny_in" else None
    model = (model or resnext.create_model(name)).eval()
    seen: dict[str, list[torch.Tensor]] = {}
    for entry in model.feature_info:
        module = model.get_submodule(entry["module"])
        module.register_forward_hook(
            lambda m, i, out, key=entry["module"]: seen.setdefault(key, []).append(out.clone())
        )
    with torch.no_grad():
        maps = model.forward_intermediates(torch.randn(1, 3, 32, 32), intermediates_only=True)
    for entry, fmap in zip(model.feature_info, maps, strict=True):
        assert len(seen[entry["module"]]) == 1, entry  # each named module runs once
        assert torch.equal(seen[entry["module"]][0], fmap), entry


def test_a_bare_conv_stem_is_map_zero() -> None:
    model = _randomise_bn(resnext.create_model("resnext29_8x64d_preact"))
    x = torch.randn(1, 3, 8, 8)
    assert model.feature_info[0]["module"] == "conv1"
    with torch.no_grad():
        torch.testing.assert_close(model.forward_intermediates(x, [0])[1][0], model.conv1(x))


def test_indices_read_as_timms() -> None:
    model = resnext.create_model("resnext_tiny_in").eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        every = model.forward_intermediates(x, intermediates_only=True)
        last_two = model.forward_intermediates(x, 2, intermediates_only=True)
        picked = model.forward_intermediates(x, [-1, 0], intermediates_only=True)
    assert [m.shape[1] for m in last_two] == [128, 256]
    assert torch.equal(last_two[0], every[3]) and torch.equal(last_two[1], every[4])
    assert torch.equal(picked[0], every[0]) and torch.equal(picked[1], every[4])  # in map order
    for bad in (0, 6, [5], [-6], []):
        with pytest.raises(ValueError, match="indices"):
            model.forward_intermediates(x, bad)
    for bad in ([1.0], [True], True, "12", 2.0):
        with pytest.raises(TypeError, match="indices"):
            model.forward_intermediates(x, bad)
    for flag in ("stop_early", "intermediates_only", "norm"):
        with pytest.raises(TypeError, match=flag):
            model.forward_intermediates(x, **{flag: "no"})
    with pytest.raises(ValueError, match="output_fmt"):
        model.forward_intermediates(x, output_fmt="NHWC")


def test_stop_early_computes_nothing_past_the_last_map() -> None:
    model = resnext.create_model("resnext_tiny_in").eval()
    ran: list[str] = []
    for name in model.stage_names:
        getattr(model, name).register_forward_hook(lambda m, i, o, name=name: ran.append(name))
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        last, maps = model.forward_intermediates(x, [1, 2], stop_early=True)
        assert ran == ["layer1", "layer2"] and torch.equal(last, maps[-1])
        ran.clear()
        model.forward_intermediates(x, [2], intermediates_only=True)
        assert ran == ["layer1", "layer2"]
        ran.clear()
        last, _ = model.forward_intermediates(x, [2])  # without stop_early: the whole trunk
        assert ran == list(model.stage_names) and last.shape[1] == model.num_features


def test_features_only_network(tmp_path: Path) -> None:
    full = _randomise_bn(resnext.create_model("resnext_tiny_in", num_classes=7))
    path = tmp_path / "weights.pth"
    torch.save(full.state_dict(), path)
    net = resnext.create_model(
        "resnext_tiny_in", weights=path, features_only=True, out_indices=(1, 2)
    ).eval()
    assert isinstance(net, FeatureNet)
    assert net.feature_info.channels() == [32, 64] and net.feature_info.reduction() == [4, 8]
    # The network's own key names, without the head and the stages past the last map taken.
    kept = {k for k in full.state_dict() if k.split(".")[0] not in ("fc", "layer3", "layer4")}
    assert set(net.state_dict()) == kept
    net.load_state_dict({k: v for k, v in full.state_dict().items() if k in kept})
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        want = _by_hand(full, x)
        got = net(x)
    assert len(got) == 2
    torch.testing.assert_close(got[0], want[1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1], want[2], rtol=1e-5, atol=1e-5)
    assert len(resnext.create_model("resnext_tiny", features_only=True)(x[:, :, :32, :32])) == 4
    with pytest.raises(ValueError, match="out_indices"):
        resnext.create_model("resnext_tiny", out_indices=(1, 2))
    with pytest.raises(ValueError, match=r"out_indices: .* got 4"):
        resnext.create_model("resnext_tiny", features_only=True, out_indices=(4,))


def test_features_only_gradients_with_and_without_checkpointing() -> None:
    torch.manual_seed(0)
    net = resnext.create_model("resnext_tiny", features_only=True, out_indices=(0, 3))
    calls = []
    net.layer1[0].register_forward_pre_hook(lambda *_: calls.append(1))
    x = torch.randn(2, 3, 16, 16)

    def grads() -> list[torch.Tensor]:
        calls.clear()
        net.zero_grad()
        sum(m.square().mean() for m in net(x)).backward()
        return [p.grad.clone() for p in net.parameters()]

    plain = grads()
    assert len(calls) == 1
    net.set_grad_checkpointing()
    again = grads()
    assert len(calls) == 2  # the block ran again in backward
    for a, b in zip(plain, again, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.skipif(
    stem_dot.unavailable_reason() is not None,
    reason=f"AVX512-BF16 stem kernel unavailable: {stem_dot.unavailable_reason()}",
)
def test_a_stem_fused_with_its_pooling_has_no_map_zero() -> None:
    model = resnext.create_model("resnext_tiny_in", stem_width=64).eval().bfloat16()
    x = torch.randn(1, 3, 64, 64).bfloat16()
    with torch.no_grad():
        want = model.forward_intermediates(x, [1], intermediates_only=True)[0]
        folded = nn.Conv2d(3, 64, 7, stride=2, padding=3).bfloat16()
        weight, bias = fold_conv_bn_weights(model.conv1, model.bn1)
        folded.weight.copy_(weight)
        folded.bias.copy_(bias)
        model.conv1 = FusedStem(folded, "dot")
        model.bn1, model.maxpool = ReluApplied(), nn.Identity()
        with pytest.raises(ValueError, match="indices: map 0"):
            model.forward_intermediates(x, [0, 1])
        with pytest.raises(ValueError, match="out_indices: map 0"):
            FeatureNet(model)
        got = model.forward_intermediates(x, [1], intermediates_only=True)[0]
    torch.testing.assert_close(got.float(), want.float(), rtol=0.05, atol=0.05)


def test_the_fast_path_refuses_a_feature_network() -> None:
    net = resnext.create_model("resnext_tiny", features_only=True)
    with pytest.raises(ConfigError, match="FeatureNet"):
        resnext.optimize(net)


def test_a_network_pickled_before_final_act_existed_still_runs(tmp_path: Path) -> None:
    model = resnext.create_model("resnext29_8x64d_preact", depths=(1, 1, 1)).eval()
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        want = model(x)
    del model.final_act  # the layout of a network saved whole before it had its own module
    torch.save(model, tmp_path / "whole.pt")
    old = torch.load(tmp_path / "whole.pt", weights_only=False)
    with torch.no_grad():
        assert torch.equal(old(x), want)
    assert old.feature_info.module_name(-1) == "final_act"
