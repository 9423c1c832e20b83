"""How a fast path tells inputs apart, and what it does with one unlike every one it was built for."""

from __future__ import annotations

import torch

from resnext.errors import ConfigError

# 'compile': build for it when it comes (a compiled graph, or a replay's recording);
# 'eager': run it on the eager fast path, the same function, with no wait
NEW_SHAPES = ("compile", "eager")


def check_new_shapes(new_shapes: str) -> None:
    """A ConfigError naming `new_shapes` unless it is one of NEW_SHAPES."""
    if new_shapes not in NEW_SHAPES:
        raise ConfigError(f"new_shapes: expected one of {NEW_SHAPES}, got {new_shapes!r}")


def input_key(x: torch.Tensor) -> tuple[object, ...]:
    """What a compiled graph's guards tell inputs apart by: shape, strides, dtype, device."""
    return (tuple(x.shape), x.stride(), x.dtype, x.device)
