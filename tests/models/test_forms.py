"""Fig. 3: forms (a), (b) and (c) of a block are the same function (the paper's central equivalence)."""

from __future__ import annotations

import pytest
import torch

import resnext
from resnext import convert_block_form
from resnext.errors import SpecError


def _randomise_bn(model: torch.nn.Module, gen: torch.Generator) -> None:
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.weight.data = torch.rand(m.num_features, generator=gen) + 0.5
            m.bias.data = torch.randn(m.num_features, generator=gen) * 0.2
            m.running_mean = torch.randn(m.num_features, generator=gen) * 0.2
            m.running_var = torch.rand(m.num_features, generator=gen) + 0.5


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"stride_in_1x1": True},
        {"se_reduction": 4},
        {"avg_down": True},
        {"residual": False},
    ],
)
@pytest.mark.parametrize("form", ["a", "b"])
def test_forms_compute_the_same_function(form: str, overrides: dict) -> None:
    gen = torch.Generator().manual_seed(1)
    model = resnext.create_model(
        "resnext_tiny_in", cardinality=4, base_width=3, depths=(2, 1, 1, 1), **overrides
    )
    _randomise_bn(model, gen)
    model.eval()
    other = convert_block_form(model, form).eval()
    assert other.spec.block_form == form
    assert type(other.layer1[0]).__name__ != type(model.layer1[0]).__name__
    x = torch.randn(3, 3, 48, 48, generator=gen)
    with torch.no_grad():
        diff = (model(x) - other(x)).abs().max().item()
        fdiff = (model.forward_features(x) - other.forward_features(x)).abs().max().item()
    assert diff < 1e-4 and fdiff < 1e-4
    # Same parameter count in every form (Fig. 3 forms are reformulations, not new models).
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in other.parameters())
    # And back to (c) gives the original weights exactly.
    back = convert_block_form(other, "c")
    for (k, v), (k2, v2) in zip(model.state_dict().items(), back.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(v, v2), k


def test_form_a_really_has_separate_paths() -> None:
    model = resnext.create_model("resnext_tiny", block_form="a")
    block = model.layer1[0]
    assert len(block.paths) == model.spec.cardinality
    assert all(p.conv2.groups == 1 for p in block.paths)
    grouped = resnext.create_model("resnext_tiny")
    assert grouped.layer1[0].conv2.groups == grouped.spec.cardinality


def test_preact_cannot_change_form() -> None:
    with pytest.raises(SpecError, match="block_form"):
        convert_block_form(resnext.create_model("resnext_tiny", preact=True), "a")


def test_convert_refuses_a_name() -> None:
    with pytest.raises(TypeError, match="model: expected a ResNeXt"):
        convert_block_form("resnext_tiny", "a")  # type: ignore[arg-type]


@pytest.mark.parametrize("form", ["a", "b"])
def test_convert_keeps_frozen_layers_and_checkpointing(form: str) -> None:
    # a fine-tuning set-up (stem and first stage frozen, checkpointing on) survives the conversion
    model = resnext.create_model("resnext_tiny")
    for module in (model.conv1, model.bn1, model.layer1):
        module.requires_grad_(False)
    model.set_grad_checkpointing()
    out = convert_block_form(model, form)
    assert out.grad_checkpointing
    for name, module in out.named_children():
        expected = name not in ("conv1", "bn1", "layer1")
        assert all(p.requires_grad == expected for p in module.parameters()), name
    back = convert_block_form(out, "c")
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert {n for n, p in back.named_parameters() if not p.requires_grad} == frozen


def test_convert_refuses_a_partly_frozen_block() -> None:
    model = resnext.create_model("resnext_tiny")
    model.layer1[0].bn1.requires_grad_(False)
    with pytest.raises(SpecError, match="convert first, then freeze"):
        convert_block_form(model, "a")


def test_convert_keeps_what_weights_set_and_a_head_replaced_by_hand() -> None:
    torch.manual_seed(0)
    model = resnext.create_model("resnext_tiny").eval()
    # what loading weights or a training checkpoint puts on a network, read by predict and eval
    model.preprocessing, model.class_names = object(), ("a", "b", "c")
    # torchvision's fine-tuning idiom: a new head, the spec left saying 10 classes
    model.fc = torch.nn.Linear(model.num_features, 3)
    converted = convert_block_form(model, "b").eval()
    assert converted.preprocessing is model.preprocessing
    assert converted.class_names == ("a", "b", "c")
    assert converted.spec.num_classes == 3 and converted.num_classes == 3
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(converted(x), model(x), atol=1e-5)


def test_convert_refuses_a_custom_head_by_name() -> None:
    model = resnext.create_model("resnext_tiny")
    model.fc = torch.nn.Sequential(torch.nn.Dropout(), torch.nn.Linear(model.num_features, 3))
    with pytest.raises(SpecError, match="fc: expected the network's own classifier"):
        convert_block_form(model, "a")


def test_convert_keeps_synchronised_batch_norm() -> None:
    model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(resnext.create_model("resnext_tiny"))
    converted = convert_block_form(model, "a")
    kinds = {
        type(m) for m in converted.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
    }
    assert kinds == {torch.nn.SyncBatchNorm}
