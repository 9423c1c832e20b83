"""Conversion between the three equivalent block forms of Fig. 3 (a: summed paths, b: concatenation, c: groups)."""

from __future__ import annotations

import torch

from resnext.errors import SpecError
from resnext.models.network import ResNeXt, build_model
from resnext.models.spec import BLOCK_FORMS


def convert_block_form(model: ResNeXt, form: str) -> ResNeXt:
    """A new network of the same spec in block form `form`, computing the same function as `model`.

    Weights travel through the grouped layout: splitting the grouped 3×3 into its C groups, the first
    1×1 into C slices of d output channels, and the last 1×1 into C slices of d input channels is exact
    (footnote 3 of the paper), BN statistics split per channel.
    """
    if not isinstance(model, ResNeXt):
        raise TypeError(
            "model: expected a ResNeXt (resnext.create_model(name) for a registry name), got "
            f"{type(model).__name__}"
        )
    if form not in BLOCK_FORMS:
        raise SpecError(f"block_form: expected one of {', '.join(BLOCK_FORMS)}, got {form!r}")
    if model.spec.preact:
        raise SpecError("block_form: pre-activation networks exist only in form 'c'")
    target = build_model(model.spec.replace(block_form=form, num_classes=_head_classes(model)))
    if any(isinstance(m, torch.nn.SyncBatchNorm) for m in model.modules()):
        target = torch.nn.SyncBatchNorm.convert_sync_batchnorm(target)
    param = next(model.parameters())
    target.to(device=param.device, dtype=param.dtype)
    with torch.no_grad():
        for src_stage, dst_stage in zip(model.stages(), target.stages(), strict=True):
            for src, dst in zip(src_stage, dst_stage, strict=True):
                dst.load_grouped_state(src.grouped_state())
                _copy_frozen(src, dst)
        for name in ("conv1", "bn1", "fc"):
            getattr(target, name).load_state_dict(getattr(model, name).state_dict())
            _copy_frozen(getattr(model, name), getattr(target, name))
    # the rest of what a user set on the network: train/eval mode, activation checkpointing and
    # what the weights gave it (its preprocessing and class names, read by predict and eval)
    target.train(model.training)
    target.set_grad_checkpointing(model.grad_checkpointing)
    for name in _CARRIED:
        if name in vars(model):
            setattr(target, name, getattr(model, name))
    return target


# Plain attributes that weights loading and checkpoint reading set on a network.
_CARRIED = ("preprocessing", "class_names", "resnext_name")


def _head_classes(model: ResNeXt) -> int:
    """The class count of `model`'s classifier as it is now: torchvision's fine-tuning idiom
    (`model.fc = nn.Linear(model.num_features, n)`) replaces it without telling the spec."""
    fc = model.fc
    if isinstance(fc, torch.nn.Identity):
        return 0
    if (
        isinstance(fc, torch.nn.Linear)
        and fc.in_features == model.num_features
        and fc.bias is not None
    ):
        return fc.out_features
    raise SpecError(
        f"fc: expected the network's own classifier (a Linear with bias from {model.num_features} "
        f"features, or none), got {fc!r}; a custom head cannot change block form: convert "
        "first, then replace the head"
    )


def _copy_frozen(src: torch.nn.Module, dst: torch.nn.Module) -> None:
    """Give `dst`'s parameters `src`'s requires_grad. A block's parameters are named and split
    differently in each form, so a block converts whole: all trainable or all frozen."""
    flags = {p.requires_grad for p in src.parameters()}
    if len(flags) > 1:
        raise SpecError(
            "block_form: a module with some parameters frozen and others not cannot change form "
            "(its parameters are split differently); convert first, then freeze"
        )
    trainable = flags.pop() if flags else True
    for p in dst.parameters():
        p.requires_grad_(trainable)


def grouped_state_dict(model: ResNeXt) -> dict[str, torch.Tensor]:
    """The state dict of `model` in form (c) key names, whatever its block form."""
    if model.spec.block_form == "c":
        return dict(model.state_dict())
    return dict(convert_block_form(model, "c").state_dict())
