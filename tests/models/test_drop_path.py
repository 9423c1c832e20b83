"""Stochastic depth (timm's drop_path_rate): rates per block, what a block computes, where it is off."""

from __future__ import annotations

import copy

import pytest
import torch

import resnext
from resnext.models.layers import drop_path
from resnext.speed.train_paths import use_training_fast_paths

# Two stages, the second of two blocks, so that the last block has an identity shortcut.
SMALL = dict(depths=(1, 2), cardinality=2, base_width=4, stem="cifar", stem_width=16, out_width=16)


def _blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [block for stage in model.stages() for block in stage]


def test_drop_path_keeps_or_zeroes_each_image_whole() -> None:
    torch.manual_seed(0)
    out = drop_path(torch.full((2000, 2, 3, 3), 3.0), 0.25)
    per_image = out.flatten(1)
    # By hand: a kept image is 3 / (1 - 0.25) = 4 everywhere, a dropped one 0 everywhere.
    kept = (per_image == 4.0).all(dim=1)
    assert (kept | (per_image == 0.0).all(dim=1)).all()
    # 1500 kept expected; the binomial's standard deviation is sqrt(2000 * 0.75 * 0.25) = 19.4
    assert abs(int(kept.sum()) - 1500) < 4 * 19.4


def test_block_rates_rise_linearly_from_zero_as_timms() -> None:
    model = resnext.create_model("resnext50_32x4d", drop_path_rate=0.1, num_classes=10)
    # timm's ResNet: block j of the network's 16 gets 0.1 * j / 15
    want = [0.1 * j / 15 for j in range(16)]
    assert [b.drop_path_rate for b in _blocks(model)] == pytest.approx(want, abs=1e-12)


@pytest.mark.parametrize(
    "layout",
    [{"block_form": "a"}, {"block_form": "b"}, {"block_form": "c"}, {"preact": True}],
    ids=["form-a", "form-b", "form-c", "preact"],
)
def test_a_block_in_training_drops_its_residual_branch_per_image(layout: dict) -> None:
    torch.manual_seed(1)
    model = resnext.build_model(resnext.ModelSpec(**SMALL, **layout, drop_path_rate=0.5)).train()
    block = _blocks(model)[-1]
    assert block.drop_path_rate == 0.5 and block.downsample is None
    x = torch.randn(16, 32, 8, 8)
    with torch.no_grad():
        out = block(x)
        if layout.get("preact"):
            # the branch alone: the block without its shortcut (which returns before any drop)
            block.residual = False
            branch, whole = block(x), lambda b: b / 0.5 + x
            dropped = x
        else:
            # batch norm in training normalises by the whole batch's statistics either way
            branch = block.bn3(block.transform(x))
            whole, dropped = (lambda b: torch.relu(b / 0.5 + x)), torch.relu(x)
    kept = [torch.allclose(out[n], whole(branch)[n], atol=1e-5) for n in range(16)]
    zeroed = [torch.allclose(out[n], dropped[n], atol=1e-6) for n in range(16)]
    assert all(k or z for k, z in zip(kept, zeroed, strict=True))
    assert any(kept) and any(zeroed)


def test_evaluation_is_the_network_without_stochastic_depth() -> None:
    torch.manual_seed(2)
    dropping = resnext.create_model("resnext_tiny_in", drop_path_rate=0.3).eval()
    plain = resnext.create_model("resnext_tiny_in").eval()
    # no module of its own: the state-dict keys (a public API) stay torchvision's
    assert list(dropping.state_dict()) == list(plain.state_dict())
    plain.load_state_dict(dropping.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(dropping(x), plain(x))


def _step(model: torch.nn.Module, x: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    out = model(x)
    out.square().sum().backward()
    return out.detach(), model.conv1.weight.grad.clone()


def test_fast_paths_and_activation_checkpointing_drop_the_same_images() -> None:
    torch.manual_seed(3)
    spec = resnext.ModelSpec(**SMALL, drop_path_rate=0.5)
    base = resnext.build_model(spec).train().to(memory_format=torch.channels_last)
    fused = copy.deepcopy(base)
    # the fused kernels compute BN, residual add and ReLU in one pass: a dropped branch must not
    use_training_fast_paths(fused, fused_bn=True, grouped_kernels=True, gemm_weight_grad=True)
    rebuilt = copy.deepcopy(base)
    rebuilt.set_grad_checkpointing(True)  # the recomputed forward must draw the same masks
    x = torch.randn(8, 3, 16, 16).contiguous(memory_format=torch.channels_last)
    want_out, want_grad = _step(base, x, seed=4)
    other_seed, _ = _step(copy.deepcopy(base), x, seed=5)
    assert not torch.allclose(want_out, other_seed)  # the draws matter
    for model in (fused, rebuilt):
        out, grad = _step(model, x, seed=4)
        torch.testing.assert_close(out, want_out, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(grad, want_grad, rtol=1e-3, atol=1e-3)
