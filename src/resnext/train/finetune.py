"""Fine-tuning: load pretrained weights, put a new classifier on, freeze the stem and early stages."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from resnext.errors import WeightsError


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The model weights in a training checkpoint, a .safetensors file or a .pth state dict."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"finetune.source {path}: no such file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise WeightsError(f"finetune.source {path}: cannot read weights ({exc})") from exc
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    elif isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"finetune.source {path}: expected a dict of tensors")
    return {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in state.items()}


def source_num_classes(state: dict[str, torch.Tensor]) -> int:
    """The number of classes of the weights' classifier (0 when they have none)."""
    fc = state.get("fc.weight")
    return int(fc.shape[0]) if fc is not None else 0


def load_pretrained(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load `state` into `model` strictly; a mismatch names the keys or shapes that differ."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [k for k in own if k in state and own[k].shape != state[k].shape]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing {missing[:4]}")
        if unexpected:
            parts.append(f"unexpected {unexpected[:4]}")
        if shapes:
            parts.append(f"shape mismatch {shapes[:4]}")
        raise WeightsError(
            f"finetune.source {source}: weights do not fit the model: {'; '.join(parts)}"
        )
    model.load_state_dict(state)


def frozen_modules(model: nn.Module, frozen_stages: int) -> list[nn.Module]:
    """The stem and the first `frozen_stages` stages (nothing when 0)."""
    if frozen_stages <= 0:
        return []
    mods: list[nn.Module] = [model.conv1, model.bn1]
    mods.extend(model.stages()[:frozen_stages])
    return mods


def freeze(model: nn.Module, frozen_stages: int) -> None:
    """Stop gradients through the stem and the first `frozen_stages` stages."""
    for module in frozen_modules(model, frozen_stages):
        for p in module.parameters():
            p.requires_grad_(False)


def set_train_mode(model: nn.Module, frozen_stages: int) -> None:
    """model.train(), except frozen parts stay in eval mode so their BN statistics do not drift."""
    model.train()
    for module in frozen_modules(model, frozen_stages):
        module.eval()
