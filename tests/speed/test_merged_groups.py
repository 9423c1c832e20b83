"""Grouped convolutions as fewer, wider groups (`resnext.speed.merged_groups`): the same function,
parameters and gradients; the fastest factor kept; `optimize` and `resnext train` use it."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from registry_models import (
    registry_model_and_input,
)
from tensor_checks import rel_err
from torch import nn

import resnext
from resnext.config import load_config
from resnext.errors import ConfigError
from resnext.speed import merged_groups
from resnext.speed.merged_groups import (
    MergedGroupsConv2d,
    choose_factors,
    grouped_layers,
    merge_groups,
    merged_weight,
    widen_groups,
    widen_where_faster,
)


def block_diagonal_by_hand(weight: torch.Tensor, groups: int, factor: int) -> torch.Tensor:
    """The wide weight built element by element: group g's block at rows and columns of g."""
    out_ch, in_per = weight.shape[:2]
    out_per = out_ch // groups
    wide = torch.zeros(out_ch, in_per * factor, *weight.shape[2:], dtype=weight.dtype)
    for g in range(groups):
        col = (g % factor) * in_per  # its place among the `factor` groups merged with it
        wide[g * out_per : (g + 1) * out_per, col : col + in_per] = weight[
            g * out_per : (g + 1) * out_per
        ]
    return wide


@pytest.mark.parametrize("factor", [1, 2, 4, 8])
def test_the_wide_weight_is_block_diagonal_and_computes_the_grouped_convolution(factor):
    gen = torch.Generator().manual_seed(factor)
    weight = torch.randn(32, 4, 3, 3, generator=gen, dtype=torch.float64)
    x = torch.randn(2, 32, 7, 9, generator=gen, dtype=torch.float64)
    wide = merged_weight(weight, 8, factor)
    assert torch.equal(wide, block_diagonal_by_hand(weight, 8, factor))
    torch.testing.assert_close(
        F.conv2d(x, wide, padding=1, groups=8 // factor),
        F.conv2d(x, weight, padding=1, groups=8),
        rtol=1e-12,
        atol=1e-12,
    )


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("stride", [1, 2])
def test_a_merged_convolution_has_the_grouped_ones_outputs_gradients_and_keys(bias, stride):
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 24, 3, stride=stride, padding=1, groups=4, bias=bias).double()
    merged = MergedGroupsConv2d.from_conv(conv, 2)
    assert merged.weight is conv.weight and merged.bias is conv.bias
    assert list(merged.state_dict()) == list(conv.state_dict())
    x = torch.randn(2, 16, 9, 9, dtype=torch.float64, requires_grad=True)
    params = [x, *conv.parameters()]
    out = merged(x)
    grad = torch.randn_like(out)
    ours = torch.autograd.grad(out, params, grad)
    theirs = torch.autograd.grad(conv(x), params, grad)
    torch.testing.assert_close(out, conv(x), rtol=1e-12, atol=1e-12)
    for a, b in zip(ours, theirs, strict=True):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_factors_that_do_not_divide_the_groups_and_other_padding_are_refused():
    conv = nn.Conv2d(24, 24, 3, padding=1, groups=6)
    with pytest.raises(ConfigError, match="factor: expected a divisor of the 6 groups, got 4"):
        MergedGroupsConv2d.from_conv(conv, 4)
    with pytest.raises(ConfigError, match="factor"):
        merged_weight(conv.weight, 6, 0)
    reflect = nn.Conv2d(8, 8, 3, padding=1, groups=4, padding_mode="reflect")
    with pytest.raises(ConfigError, match="padding_mode: merging groups needs 'zeros'"):
        merge_groups(nn.Sequential(reflect), {"0": 2})


def _tiny() -> nn.Module:
    torch.manual_seed(0)
    model = resnext.create_model("resnext_tiny", num_classes=5, cardinality=4).eval()
    for m in model.modules():  # non-trivial statistics: a wrong block would show
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
    return model


def test_widened_and_merged_networks_compute_the_plain_networks_function():
    plain = _tiny()
    names = merged_groups.grouped_convs(plain)
    assert names, "resnext_tiny has grouped convolutions"
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        reference = plain(x)
    factors = {name: 2 for name in names}
    merged = merge_groups(_tiny(), factors)
    assert list(merged.state_dict()) == list(plain.state_dict())
    assert sum(isinstance(m, MergedGroupsConv2d) for m in merged.modules()) == len(names)
    wide = widen_groups(_tiny(), factors)
    for name in names:
        assert wide.get_submodule(name).groups == plain.get_submodule(name).groups // 2
    with torch.no_grad():
        torch.testing.assert_close(merged(x), reference, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(wide(x), reference, rtol=1e-5, atol=1e-5)


def test_probing_the_layers_leaves_training_mode_and_batch_norm_statistics_alone():
    model = _tiny().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    layers = grouped_layers(model, torch.randn(2, 3, 16, 16))
    assert model.training
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert set(layers) == set(merged_groups.grouped_convs(model))
    for name, layer in layers.items():
        conv = model.get_submodule(name)
        assert (layer.in_channels, layer.groups) == (conv.in_channels, conv.groups)
        assert layer.input_shape[:2] == (2, conv.in_channels)


def test_the_fastest_factor_of_each_layer_is_kept_and_alike_layers_are_timed_once(monkeypatch):
    model = _tiny()
    layers = grouped_layers(model, torch.randn(2, 3, 16, 16))
    timed = []

    # Each layer's fake time is least at factor 2 for 4-channel groups and 1 for wider ones.
    def fake_time(fn, device, iters, rounds=3):
        layer, factor = timed[-1]
        best = 2 if layer.in_channels // layer.groups == 4 else 1
        return 1.0 + abs(factor - best)

    real_call = merged_groups.layer_call

    def recording_call(layer, factor, device, dtype, train):
        timed.append((layer, factor))
        return real_call(layer, factor, device, dtype, train)

    monkeypatch.setattr(merged_groups, "time_ms", fake_time)
    monkeypatch.setattr(merged_groups, "layer_call", recording_call)
    chosen, times = choose_factors(layers, torch.device("cpu"), train=True, dtype=torch.float32)
    labels = {layer.label for layer in layers.values()}
    assert len(timed) == sum(len(row) for row in times.values())
    assert set(times) == labels  # alike layers once
    for name, layer in layers.items():
        assert chosen[name] == (2 if layer.in_channels // layer.groups == 4 else 1)
        assert set(times[layer.label]) == {
            f for f in merged_groups.FACTORS if layer.groups % f == 0
        }


def test_widening_where_faster_keeps_the_function(merge_factor_wins):
    plain = _tiny()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        reference = plain(x)
    merge_factor_wins(4)  # every group in one: a dense convolution
    model = _tiny()
    factors = widen_where_faster(model, x, candidates=(1, 2, 4))
    assert set(factors.values()) == {4}
    assert all(model.get_submodule(name).groups == 1 for name in factors)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference, rtol=1e-5, atol=1e-5)


def test_optimize_takes_merge_groups_auto_or_off_and_merges_nothing_on_a_cpu():
    model = _tiny()
    with pytest.raises(ConfigError, match="merge_groups: expected one of"):
        resnext.optimize(model, merge_groups="on", backend="none")
    fast = resnext.optimize(model, backend="none", example_input=torch.randn(1, 3, 16, 16))
    assert fast.group_merges == {}


def test_merge_groups_refuses_the_cpu_grouped_kernels_beside_it():
    ok = load_config("digits_demo", ["train.merge_groups=true"])
    assert ok.train.merge_groups is True
    with pytest.raises(ConfigError, match=r"train\.merge_groups: .*not both"):
        load_config(
            "digits_demo",
            ["train.merge_groups=true", "train.grouped_kernels=true", "train.channels_last=true"],
        )


@pytest.mark.parametrize("name", resnext.list_models())
def test_merged_and_widened_groups_same_function_every_registry_model(name: str) -> None:
    model, x = registry_model_and_input(name)
    names = merged_groups.grouped_convs(model)
    if not names:
        pytest.skip(f"{name} has no grouped convolution")
    with torch.no_grad():
        expected = model(x)
    # each layer's largest factor up to 8 (all its groups in one where it has at most 8)
    factors = {
        n: max(f for f in (1, 2, 4, 8) if model.get_submodule(n).groups % f == 0) for n in names
    }
    merged = merge_groups(copy.deepcopy(model), factors)
    wide = widen_groups(copy.deepcopy(model), factors)
    assert list(merged.state_dict()) == list(model.state_dict())
    with torch.no_grad():
        assert rel_err(merged(x), expected) < 1e-5
        assert rel_err(wide(x), expected) < 1e-5
