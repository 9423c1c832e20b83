"""Class probabilities of a batch under a protocol: softmax of each view, averaged over the views."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from resnext.errors import ConfigError
from resnext.evaluate.dense import DenseScorer
from resnext.evaluate.protocols import Protocol


def check_fast_path(protocol: Protocol, option: str) -> None:
    """A ConfigError naming `option` unless `protocol` can score with `resnext.optimize`'s
    module: the crop protocols can; the dense one runs the network fully convolutionally."""
    if protocol.kind == "dense":
        raise ConfigError(
            f"{option}: the dense protocol runs the network fully convolutionally on whole "
            f"images of several sizes; use {option} off with it"
        )


class Scorer:
    """Turns collated views into (N, K) probabilities; K is the subset size when one is given."""

    def __init__(
        self,
        model: nn.Module,
        protocol: Protocol,
        subset: torch.Tensor | None = None,
        fast: nn.Module | None = None,
    ) -> None:
        if fast is not None:
            check_fast_path(protocol, "optimize")
        self.model = model
        # `resnext.optimize`'s module for the crop protocols: the same function, faster
        self.net = fast if fast is not None else model
        self.protocol = protocol
        self.subset = subset
        self.dense = (
            DenseScorer(model, protocol.flip, protocol.average)
            if protocol.kind == "dense"
            else None
        )

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.net(x).float()
        # Restricted labels: the softmax runs over the subset only (paper Table 6, 1K-way).
        return logits[:, self.subset] if self.subset is not None else logits

    @torch.no_grad()
    def __call__(
        self, views: torch.Tensor | list[tuple[torch.Tensor, ...]], device: torch.device
    ) -> torch.Tensor:
        if self.dense is not None:
            return self.dense(views, self.subset, device)  # type: ignore[arg-type]
        assert isinstance(views, torch.Tensor)
        x = views.to(device)
        if self.protocol.kind == "center":
            return F.softmax(self._logits(x), dim=1)
        n, v = x.shape[:2]
        logits = self._logits(x.flatten(0, 1)).view(n, v, -1)
        if self.protocol.average == "logits":
            return F.softmax(logits.mean(dim=1), dim=1)
        return F.softmax(logits, dim=2).mean(dim=1)
