"""A strict registry of named networks: each name maps to one ModelSpec; duplicates are refused."""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Iterator
from dataclasses import dataclass

from resnext.errors import RegistryError
from resnext.models.spec import ModelSpec


@dataclass(frozen=True)
class ModelEntry:
    """A named network: its spec, where it comes from, and other names it is known by."""

    name: str
    spec: ModelSpec
    source: str
    aliases: tuple[str, ...] = ()


class Registry:
    """Name → ModelEntry, with aliases; registering a name or alias twice is an error."""

    def __init__(self) -> None:
        self._entries: dict[str, ModelEntry] = {}
        self._aliases: dict[str, str] = {}

    def register(self, entry: ModelEntry) -> None:
        names = (entry.name, *entry.aliases)
        for i, name in enumerate(names):
            if name in self._entries or name in self._aliases:
                raise RegistryError(f"model name {name!r} is already registered")
            if name in names[:i]:
                raise RegistryError(
                    f"model name {name!r}: entry {entry.name!r} names it twice (as its name or "
                    "among its aliases); expected distinct names"
                )
        self._entries[entry.name] = entry
        for alias in entry.aliases:
            self._aliases[alias] = entry.name

    def get(self, name: str) -> ModelEntry:
        if not isinstance(name, str):
            raise RegistryError(f"model name: expected a string, got {type(name).__name__}")
        canonical = self._aliases.get(name, name)
        if canonical in self._entries:
            return self._entries[canonical]
        known = [*self._entries, *self._aliases]
        close = difflib.get_close_matches(name, known, n=5, cutoff=0.5)
        hint = f"; closest: {', '.join(close)}" if close else ""
        raise RegistryError(
            f"unknown model {name!r}{hint} (`resnext list` shows all {len(self._entries)})"
        )

    def names(self, pattern: str = "*") -> list[str]:
        """Canonical names matching `pattern`, directly or through one of their aliases."""
        hits = {n for n in self._entries if fnmatch.fnmatchcase(n, pattern)}
        hits |= {n for a, n in self._aliases.items() if fnmatch.fnmatchcase(a, pattern)}
        return sorted(hits)

    def __contains__(self, name: object) -> bool:
        return name in self._entries or name in self._aliases

    def __iter__(self) -> Iterator[ModelEntry]:
        return iter(self._entries[n] for n in sorted(self._entries))

    def __len__(self) -> int:
        return len(self._entries)
