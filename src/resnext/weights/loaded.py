"""The result of reading weights from any source: our state dict plus what the model and inputs need."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from resnext.errors import WeightsError
from resnext.weights.preprocess import Preprocessing


@dataclass(frozen=True)
class LoadedWeights:
    """A state dict in our (torchvision) key names, with the spec overrides and inputs it expects.

    `spec_overrides` carries semantic differences of the source (``stride_in_1x1``, ``num_classes``);
    `spec` is the full saved spec where the source records one (our native format).
    """

    state_dict: dict[str, torch.Tensor]
    source_format: str
    source: str
    spec_overrides: dict[str, Any] = field(default_factory=dict)
    preprocessing: Preprocessing | None = None
    class_names: tuple[str, ...] | None = None
    model_name: str | None = None
    spec: dict[str, Any] | None = None
    notes: tuple[str, ...] = ()

    @property
    def num_classes(self) -> int | None:
        """Rows of the classifier weight, or None for a headless checkpoint."""
        fc = self.state_dict.get("fc.weight")
        return int(fc.shape[0]) if fc is not None else None


def check_class_names(names: Any, head: int, where: str) -> None:
    """Refuse class names that are not one string per class of a `head`-class classifier, naming
    `where` they came from: predictions index them by class, so a short list fails mid-prediction
    and a long one misnames."""
    if not isinstance(names, (list, tuple)):
        got = f"a {type(names).__name__}"
    elif not all(isinstance(n, str) for n in names):
        got = "a list with a non-string entry"
    elif len(names) != head:
        got = f"{len(names)} names"
    else:
        return
    raise WeightsError(
        f"{where}: class_names: expected a list of {head} strings (one per class of the "
        f"model's head), got {got}"
    )
