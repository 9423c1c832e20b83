"""The weights package's refusal of files that carry code: both a WeightsError and an UnsafeFileError."""

from __future__ import annotations

from resnext.errors import UnsafeFileError, WeightsError


class UnsafeWeightsError(WeightsError, UnsafeFileError):
    """A weights file that asks to run code (a pickle importing callables, a Lua function)."""
