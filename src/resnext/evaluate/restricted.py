"""Restricted-label evaluation: score only a subset of the model's classes (the paper's Table 6)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch

from resnext.errors import ConfigError, DataError

LABEL_SPACES = ("model", "position")


def read_class_subset(path: str | Path) -> list[int]:
    """Class indices from a JSON list or a text file (integers separated by space/comma, # comments)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"class subset file {path}: cannot be read ({exc})") from exc
    try:
        if text.lstrip().startswith("["):
            values = json.loads(text)
        else:
            lines = [line.split("#", 1)[0] for line in text.splitlines()]
            values = [int(tok) for tok in " ".join(lines).replace(",", " ").split()]
    except (ValueError, json.JSONDecodeError) as exc:
        raise ConfigError(
            f"class subset file {path}: expected integer class indices ({exc})"
        ) from exc
    if not isinstance(values, list) or not all(
        isinstance(v, int) and not isinstance(v, bool) for v in values
    ):
        raise ConfigError(f"class subset file {path}: expected a list of integer class indices")
    return values


class LabelSubset:
    """The scored classes and how dataset labels map to positions within them.

    `label_space="model"`: dataset labels are model class indices, mapped to their subset position;
    `label_space="position"`: dataset label j already means the j-th subset class.
    """

    def __init__(
        self, indices: Sequence[int], num_model_classes: int, label_space: str = "model"
    ) -> None:
        indices = [int(i) for i in indices]
        if not indices:
            raise ConfigError("class subset: expected at least one class index, got none")
        if len(set(indices)) != len(indices):
            raise ConfigError("class subset: an index is listed twice")
        bad = [i for i in indices if not 0 <= i < num_model_classes]
        if bad:
            raise ConfigError(
                f"class subset: index {bad[0]} out of range for a {num_model_classes}-class model"
            )
        if label_space not in LABEL_SPACES:
            raise ConfigError(f"label_space: expected one of {LABEL_SPACES}, got {label_space!r}")
        self.indices = torch.tensor(indices, dtype=torch.long)
        self.label_space = label_space
        self._position = torch.full((num_model_classes,), -1, dtype=torch.long)
        self._position[self.indices] = torch.arange(len(indices))

    def __len__(self) -> int:
        return int(self.indices.numel())

    def map_targets(self, targets: torch.Tensor) -> torch.Tensor:
        """Dataset labels -> positions in the subset; a label outside it is a DataError."""
        if self.label_space == "position":
            if targets.numel() and (targets.min() < 0 or targets.max() >= len(self)):
                raise DataError(
                    f"label {int(targets.max())} is not a position in a {len(self)}-class subset"
                )
            return targets
        if targets.numel() and (targets.min() < 0 or targets.max() >= self._position.numel()):
            raise DataError(f"label {int(targets.max())} is not a model class index")
        mapped = self._position[targets]
        if (mapped < 0).any():
            raise DataError(
                f"label {int(targets[mapped < 0][0])} is not in the class subset "
                f"(use label_space='position' if labels index the subset)"
            )
        return mapped
