"""Random draws from a torch.Generator, a numpy Generator, or torch's global RNG (None)."""

from __future__ import annotations

import numpy as np
import torch

RandomSource = torch.Generator | np.random.Generator | None


def uniform(gen: RandomSource, low: float, high: float) -> float:
    """One float drawn uniformly from [low, high)."""
    if isinstance(gen, np.random.Generator):
        return float(gen.uniform(low, high))
    return low + (high - low) * float(torch.rand((), generator=gen, dtype=torch.float64))


def randint(gen: RandomSource, low: int, high: int) -> int:
    """One integer drawn uniformly from [low, high] (both ends included)."""
    if isinstance(gen, np.random.Generator):
        return int(gen.integers(low, high + 1))
    return int(torch.randint(low, high + 1, (), generator=gen))


def normal(gen: RandomSource, std: float, n: int) -> torch.Tensor:
    """n float32 draws from N(0, std^2)."""
    if isinstance(gen, np.random.Generator):
        return torch.from_numpy(gen.normal(0.0, std, n).astype(np.float32))
    return torch.randn(n, generator=gen) * std


def permutation(gen: RandomSource, n: int) -> list[int]:
    """A random order of range(n)."""
    if isinstance(gen, np.random.Generator):
        return [int(i) for i in gen.permutation(n)]
    return torch.randperm(n, generator=gen).tolist()
