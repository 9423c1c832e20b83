"""Which devices the package's networks run on, checked before anything is loaded or moved."""

from __future__ import annotations

import torch

from resnext.errors import ConfigError


def check_device(
    device: torch.device | str | int, *, present: bool = True, runner: str = "the network"
) -> torch.device:
    """`device` as a torch.device `runner` can run on ('cpu' or 'cuda'), and with `present` one
    torch sees here; a ConfigError naming it otherwise (torch's own errors come late, from deep
    inside a move, and name neither the option nor what is accepted)."""
    try:
        target = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ConfigError(f"device: expected 'cpu', 'cuda' or 'cuda:N', got {device!r}") from None
    if target.type not in ("cpu", "cuda"):
        raise ConfigError(f"device: {runner} runs on 'cpu' or 'cuda', got {str(target)!r}")
    if present and target.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device: {str(target)!r} asked for, but torch sees no CUDA device")
        if target.index is not None and target.index >= torch.cuda.device_count():
            raise ConfigError(
                f"device: {str(target)!r} asked for, but torch sees "
                f"{torch.cuda.device_count()} CUDA device(s)"
            )
    return target
