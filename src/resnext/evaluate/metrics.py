"""Accuracy counts: top-1/top-5 hits, per-class totals and the confusion matrix, mergeable across ranks."""

from __future__ import annotations

import torch

from resnext.errors import DataError


class AccuracyCounter:
    """Integer counts over scored images; sums of counts are exact, so ranks can be merged losslessly."""

    def __init__(self, num_classes: int, topk: tuple[int, ...] = (1, 5)) -> None:
        if num_classes < 1:
            raise DataError(f"num_classes: expected >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.topk = tuple(k for k in topk if k >= 1)
        self.hits = torch.zeros(len(self.topk), dtype=torch.long)
        self.confusion = torch.zeros(num_classes, num_classes, dtype=torch.long)

    @property
    def total(self) -> int:
        """Images counted."""
        return int(self.confusion.sum())

    def update(self, scores: torch.Tensor, targets: torch.Tensor) -> None:
        """Count one batch of (N, K) scores against (N,) class indices in [0, K)."""
        scores, targets = scores.detach().cpu(), targets.detach().cpu().long()
        if scores.shape[1] != self.num_classes:
            raise DataError(f"scores have {scores.shape[1]} classes, expected {self.num_classes}")
        if targets.numel() and (targets.min() < 0 or targets.max() >= self.num_classes):
            raise DataError(
                f"label {int(targets.max())} out of range for {self.num_classes} scored classes"
            )
        kmax = min(max(self.topk), self.num_classes)
        ranked = scores.topk(kmax, dim=1).indices
        for j, k in enumerate(self.topk):
            self.hits[j] += int((ranked[:, : min(k, kmax)] == targets[:, None]).any(1).sum())
        flat = targets * self.num_classes + ranked[:, 0]
        self.confusion += torch.bincount(flat, minlength=self.num_classes**2).view_as(
            self.confusion
        )

    def as_tensor(self) -> torch.Tensor:
        """All counts in one flat tensor (for a single all_reduce)."""
        return torch.cat([self.hits, self.confusion.flatten()])

    def load_tensor(self, flat: torch.Tensor) -> None:
        """Replace the counts by those of `as_tensor()` output (e.g. after an all_reduce)."""
        n = len(self.topk)
        self.hits = flat[:n].clone()
        self.confusion = flat[n:].view(self.num_classes, self.num_classes).clone()

    def accuracy(self, k: int) -> float:
        """Fraction of images whose label is among the k best scores."""
        return int(self.hits[self.topk.index(k)]) / self.total if self.total else float("nan")

    def per_class(self) -> list[tuple[int, int, int]]:
        """(class, images, top-1 correct) for every class."""
        totals = self.confusion.sum(1)
        correct = self.confusion.diagonal()
        return [(c, int(totals[c]), int(correct[c])) for c in range(self.num_classes)]
