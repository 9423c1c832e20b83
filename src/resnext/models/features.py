"""Intermediate feature maps in timm's interface: which maps to take, what each is, and a
feature-extractor network (`features_only`) for detection and segmentation necks."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from resnext.models.network import ResNeXt


class FeatureInfo(list):
    """One dict per feature map (`module`, `num_chs`, `reduction`), with timm's accessors."""

    def _column(self, key: str, idx: int | Sequence[int] | None) -> list:
        if idx is None:
            return [entry[key] for entry in self]
        if isinstance(idx, int):
            return self[idx][key]
        return [self[i][key] for i in idx]

    def channels(self, idx: int | Sequence[int] | None = None) -> list[int] | int:
        return self._column("num_chs", idx)

    def reduction(self, idx: int | Sequence[int] | None = None) -> list[int] | int:
        return self._column("reduction", idx)

    def module_name(self, idx: int | Sequence[int] | None = None) -> list[str] | str:
        return self._column("module", idx)


def take_indices(
    num_maps: int, indices: int | Sequence[int] | None, name: str = "indices"
) -> list[int]:
    """The absolute, ascending indices of the maps `indices` asks for, as timm reads it: None
    for every map, an int n for the last n, a sequence for those (negative from the end). `name`
    is the argument's, for the messages."""
    if indices is None:
        return list(range(num_maps))
    if isinstance(indices, int) and not isinstance(indices, bool):
        if not 1 <= indices <= num_maps:
            raise ValueError(
                f"{name}: expected a count of last maps in 1..{num_maps}, got {indices}"
            )
        return list(range(num_maps - indices, num_maps))
    if isinstance(indices, (str, bytes)) or not isinstance(indices, Sequence):
        raise TypeError(
            f"{name}: expected None, an int or a sequence of ints, got {type(indices).__name__}"
        )
    if not indices:
        raise ValueError(f"{name}: expected at least one map index, got an empty sequence")
    for i in indices:
        if isinstance(i, bool) or not isinstance(i, int):
            raise TypeError(f"{name}: expected int map indices, got {i!r} in {list(indices)!r}")
        if not -num_maps <= i < num_maps:
            raise ValueError(
                f"{name}: expected map indices in {-num_maps}..{num_maps - 1} (the network has "
                f"{num_maps} feature maps), got {i} in {list(indices)!r}"
            )
    return sorted({i % num_maps for i in indices})


def refuse_pooled_stem_map(conv1: nn.Module, take: Collection[int], name: str) -> None:
    """A ValueError naming `name` where map 0 (the stem's activation before its pooling) is asked
    of a stem that runs fused with its pooling (resnext.optimize's), which never computes it."""
    if 0 in take and getattr(conv1, "pools", False):
        raise ValueError(
            f"{name}: map 0 (the stem's activation before its pooling) does not exist in this "
            "network, whose stem runs fused with its pooling (resnext.optimize); expected indices "
            "of stage outputs only (1 and up)"
        )


class FeatureNet(nn.Module):
    """A ResNeXt without its head whose forward returns the maps at `out_indices` (timm's
    `features_only` network): the stem's activation (index 0), then each stage's output.

    Its modules are the network's own, under the same names (`conv1`, `layer1`, …; no `fc`), so
    a backbone checkpoint's keys load as they are, as in torchvision's detection backbones.
    Stages past the last map taken are left out."""

    def __init__(self, model: ResNeXt, out_indices: int | Sequence[int] | None = None) -> None:
        super().__init__()
        from resnext.models.network import ResNeXt  # the network module imports this one

        if not isinstance(model, ResNeXt):
            raise TypeError(f"model: expected a resnext ResNeXt, got {type(model).__name__}")
        self.out_indices = tuple(take_indices(len(model.feature_info), out_indices, "out_indices"))
        refuse_pooled_stem_map(model.conv1, self.out_indices, "out_indices")
        self.feature_info = FeatureInfo(model.feature_info[i] for i in self.out_indices)
        last = self.out_indices[-1]  # maps past it are not computed, so their stages are not kept
        self.spec = model.spec
        self.conv1, self.bn1, self.relu, self.maxpool = (
            model.conv1,
            model.bn1,
            model.relu,
            model.maxpool,
        )
        self.stage_names = model.stage_names[:last]
        for name in self.stage_names:
            self.add_module(name, getattr(model, name))
        keeps_last = last == len(model.stage_names)
        self.final_bn = model.final_bn if keeps_last else None
        self.final_act = model.final_act if keeps_last else None
        self._stem_act = model._stem_act
        self.grad_checkpointing = model.grad_checkpointing
        for attr in ("preprocessing", "class_names", "resnext_name"):
            if hasattr(model, attr):
                setattr(self, attr, getattr(model, attr))

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in backward (as `ResNeXt.set_grad_checkpointing`)."""
        self.grad_checkpointing = bool(enable)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        from resnext.models.network import trunk_maps

        return trunk_maps(self, x, self.out_indices, stop_early=True)[1]
