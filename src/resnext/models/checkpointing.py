"""Activation checkpointing of a network part (a block): its activations recomputed in backward."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


@contextlib.contextmanager
def buffers_restored(module: nn.Module) -> Iterator[None]:
    """Inside the block `module`'s buffers may change; on leaving they hold what they held on
    entering. Around a recomputed forward this keeps batch norm from counting the batch twice
    (its running statistics and batch count are updated by the first forward only)."""
    saved = [(buffer, buffer.clone()) for buffer in module.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in saved:
                buffer.copy_(value)


def checkpointed(part: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`part(x)`, keeping only `x` for backward, where the part runs again to rebuild what its
    gradients need: memory for one extra forward of the part. The same values and gradients as
    `part(x)`, the same buffer updates, and random draws replayed as they were."""
    if torch.compiler.is_compiling():
        # A compiled graph's recomputation reruns only what the gradients need (AOT autograd
        # applies buffer updates once, after the forward), and dynamo takes no context_fn.
        return checkpoint(part, x, use_reentrant=False)

    def contexts() -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
        return contextlib.nullcontext(), buffers_restored(part)

    return checkpoint(part, x, use_reentrant=False, context_fn=contexts)
