"""The project's own exception types: every expected failure ends in one of these, with one clear message."""

from __future__ import annotations


class ResNeXtError(Exception):
    """Base class of every error this package raises on purpose."""


class SpecError(ResNeXtError, ValueError):
    """An invalid network specification (a field out of range, an unknown option)."""


class RegistryError(ResNeXtError, KeyError):
    """An unknown or duplicate model name."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class ConfigError(ResNeXtError, ValueError):
    """An invalid configuration: unknown key, wrong type, out-of-range value."""


class DataError(ResNeXtError):
    """A dataset that cannot be read: missing path, empty folder, corrupt or unsafe file."""


class UnsafeFileError(DataError):
    """A file that tries to do more than its format allows (code in a pickle, a path escaping an archive)."""


class WeightsError(ResNeXtError):
    """Weights that cannot be loaded: unknown format, mismatched keys or shapes, failed checksum."""


class DownloadError(ResNeXtError):
    """A download that failed or could not be verified."""


class CheckpointError(ResNeXtError):
    """A training checkpoint that is missing, truncated or corrupt."""


class TrainingError(ResNeXtError):
    """A training run that must stop (non-finite loss, failed rank)."""
