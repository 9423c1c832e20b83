"""Fully-convolutional testing: the classifier applied as a 1×1 convolution over the last feature map."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from resnext.errors import ConfigError


def fc_as_conv(fc: nn.Linear) -> nn.Conv2d:
    """A 1×1 convolution computing `fc` at every position of a feature map."""
    if not isinstance(fc, nn.Linear):
        raise ConfigError(f"dense testing needs a linear classifier, got {type(fc).__name__}")
    conv = nn.Conv2d(fc.in_features, fc.out_features, kernel_size=1, bias=fc.bias is not None)
    conv = conv.to(device=fc.weight.device, dtype=fc.weight.dtype)
    with torch.no_grad():
        conv.weight.copy_(fc.weight[:, :, None, None])
        if fc.bias is not None:
            conv.bias.copy_(fc.bias)
    return conv


def _classifier(model: nn.Module) -> nn.Linear:
    fc = model.get_classifier() if hasattr(model, "get_classifier") else getattr(model, "fc", None)
    if not hasattr(model, "forward_features") or not isinstance(fc, nn.Linear):
        raise ConfigError(
            f"dense testing needs a model with forward_features() and a linear fc; "
            f"{type(model).__name__} has neither"
        )
    return fc


def class_score_map(
    model: nn.Module, x: torch.Tensor, conv: nn.Conv2d | None = None
) -> torch.Tensor:
    """The (N, classes, h, w) map of class scores of the whole image `x`.

    Scores carry the network's `spec.logit_scale`, as its own forward does after the classifier.
    """
    conv = conv if conv is not None else fc_as_conv(_classifier(model))
    scores = conv(model.forward_features(x))
    # The scale is part of the classifier (forward_head); without it a dense softmax is sharper or
    # flatter than the network's and averages over scales weigh differently.
    scale = float(getattr(getattr(model, "spec", None), "logit_scale", 1.0))
    return scores * scale if scale != 1.0 else scores


def dense_logits(model: nn.Module, x: torch.Tensor, conv: nn.Conv2d | None = None) -> torch.Tensor:
    """Class scores of the whole image: the score map averaged over its positions."""
    return class_score_map(model, x, conv).mean(dim=(2, 3))


class DenseScorer:
    """Multi-scale dense scores of one batch: softmax per scale (and flip), averaged."""

    def __init__(self, model: nn.Module, flip: bool = False, average: str = "softmax") -> None:
        self.model = model
        self.conv = fc_as_conv(_classifier(model))
        self.flip = flip
        self.average = average

    def __call__(
        self,
        views: list[tuple[torch.Tensor, ...]],
        subset: torch.Tensor | None,
        device: torch.device,
    ) -> torch.Tensor:
        """Averaged probabilities (N, K) for images given as per-scale tensors of varying size.

        With `average="logits"` the class scores are averaged first and the softmax taken once.
        """
        n_scales = len(views[0])
        total: torch.Tensor | None = None
        for s in range(n_scales):
            # Images resized to the same shorter side share a shape only if aspect ratios agree:
            # batch those together, run the rest one by one.
            groups: dict[tuple[int, ...], list[int]] = {}
            for i, per_image in enumerate(views):
                groups.setdefault(tuple(per_image[s].shape), []).append(i)
            probs = [None] * len(views)
            for idx in groups.values():
                x = torch.stack([views[i][s] for i in idx]).to(device)
                p = self._scores(x, subset)
                if self.flip:
                    p = (p + self._scores(x.flip(3), subset)) / 2
                for j, i in enumerate(idx):
                    probs[i] = p[j]
            scale_probs = torch.stack(probs)  # type: ignore[arg-type]
            total = scale_probs if total is None else total + scale_probs
        assert total is not None
        mean = total / n_scales
        return F.softmax(mean, dim=1) if self.average == "logits" else mean

    def _scores(self, x: torch.Tensor, subset: torch.Tensor | None) -> torch.Tensor:
        logits = dense_logits(self.model, x, self.conv).float()
        if subset is not None:
            logits = logits[:, subset]
        return logits if self.average == "logits" else F.softmax(logits, dim=1)
