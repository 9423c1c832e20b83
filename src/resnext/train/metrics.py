"""Running sums of loss and top-k hits, reducible across processes into error rates."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from resnext.train.distributed import all_reduce_sum


def topk_hits(
    logits: torch.Tensor, target: torch.Tensor, ks: tuple[int, ...] = (1, 5)
) -> list[int]:
    """How many rows have the target among the k highest logits, for each k (k capped at #classes)."""
    kmax = min(max(ks), logits.shape[1])
    top = logits.topk(kmax, dim=1).indices
    match = top.eq(target.view(-1, 1))
    return [int(match[:, : min(k, kmax)].any(dim=1).sum()) for k in ks]


@dataclass
class Meter:
    """Sums over the samples seen so far: loss·n, top-1 hits, top-5 hits, n."""

    loss_sum: float = 0.0
    top1: int = 0
    top5: int = 0
    count: int = 0

    def add(self, loss: float, logits: torch.Tensor, target: torch.Tensor) -> None:
        n = target.shape[0]
        hit1, hit5 = topk_hits(logits.detach().float(), target)
        self.loss_sum += loss * n
        self.top1 += hit1
        self.top5 += hit5
        self.count += n

    def reduced(self, device: torch.device) -> Meter:
        """The sums over all processes."""
        t = torch.tensor(
            [self.loss_sum, self.top1, self.top5, self.count], dtype=torch.float64, device=device
        )
        t = all_reduce_sum(t).cpu()
        return Meter(float(t[0]), int(t[1]), int(t[2]), int(t[3]))

    def summary(self, prefix: str) -> dict[str, float]:
        """Mean loss and top-1/top-5 error in percent, keyed `<prefix>_loss` etc."""
        n = max(1, self.count)
        return {
            f"{prefix}_loss": self.loss_sum / n,
            f"{prefix}_top1_err": 100.0 * (1 - self.top1 / n),
            f"{prefix}_top5_err": 100.0 * (1 - self.top5 / n),
        }

    def state_dict(self) -> dict[str, float]:
        return {
            "loss_sum": self.loss_sum,
            "top1": self.top1,
            "top5": self.top5,
            "count": self.count,
        }

    @classmethod
    def from_state(cls, state: dict[str, float] | None) -> Meter:
        if not state:
            return cls()
        return cls(
            float(state["loss_sum"]), int(state["top1"]), int(state["top5"]), int(state["count"])
        )
