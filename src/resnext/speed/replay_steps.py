"""The steps a replay records (`resnext.speed.replay`): C calls of our kernels, torch operators."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils._pytree import tree_flatten


@dataclass(frozen=True)
class Call:
    """One recorded C call: the function's name and address, its arguments as 64-bit integers,
    and the int it returned (None for a function that returns nothing)."""

    name: str
    address: int
    args: tuple[int, ...]
    value: int | None
    pointers: tuple[int, ...] = ()  # which arguments are addresses


@dataclass(frozen=True)
class TorchStep:
    """One recorded torch operator that computes outside our kernels (a layer left to oneDNN, a
    cast, the classifier): called again on the same tensors, its new outputs copied into the
    ones it returned when recorded, which later steps read."""

    op: torch._ops.OpOverload
    args: tuple[object, ...]
    kwargs: dict[str, object]
    outs: tuple[torch.Tensor, ...]
    writes: bool  # the operator writes into an argument (in place or out=) and returns it

    def run(self) -> None:
        result = self.op(*self.args, **self.kwargs)
        if not self.writes:
            new = [t for t in tree_flatten(result)[0] if isinstance(t, torch.Tensor)]
            for kept, value in zip(self.outs, new, strict=True):
                kept.copy_(value)
