"""Run as a script by test_every_build.py, in a fresh interpreter (its stand-in must not leak).

For each module named on the command line, records what it asks `native.load` for (source,
flags, libraries, the function names it declares) whatever this CPU is; then builds each for
real with the system compiler and looks every declared name up in the library, without running
any of its code. Prints {"built": [[module, source], ...], "failures": {what: why}} as JSON.
"""

from __future__ import annotations

import ctypes
import importlib
import json
import sys
from pathlib import Path

from resnext import native

# Modules that load one source per ISA, or take build options: how to ask for each build.
LOADERS = {
    "resnext.speed.grouped_kernel": lambda m: [m._library_for(i) for i in (m.AVX512, m.AVX2)],
    "resnext.speed.grouped_wgrad": lambda m: [
        m._library_for(i) for i in (m.grouped_kernel.AVX512, m.grouped_kernel.AVX2)
    ],
    "resnext.speed.pointwise_fma": lambda m: [m.load(build=b) for b in m.BUILDS],
    "resnext.speed.bn_kernel": lambda m: [m._library_for.__wrapped__(b) for b in m.BUILDS.values()],
    "resnext.speed.grouped_int8": lambda m: [m.load(b) for b in m.BUILDS],
    "resnext.speed.add_int8": lambda m: [m._load(b) for b in m.BUILDS],
}
# What a compiler without an instruction set's options says (then that build is not ours to fix).
UNKNOWN_OPTION = ("unrecognized command-line option", "unknown argument", "unrecognized argument")


def _answers() -> dict[str, int]:
    """What a declared function answers when its module calls it while loading: a signature
    revision the module checks (the real library's is checked by the module's own tests)."""
    from resnext.speed import pointwise_gemm

    return {"pointwise_gemm_abi": pointwise_gemm.ABI}


class Declared:
    """Stands in for a library while its module declares functions on it: notes each name."""

    def __init__(self, names: set[str]) -> None:
        self._names = names

    def __getattr__(self, name: str) -> Function:
        self._names.add(name)
        return Function(_answers().get(name, 1))


class Function:
    """A declared function: takes argtypes/restype; called (e.g. an AMX permission check), 1
    unless `_answers` says otherwise."""

    def __init__(self, answer: int = 1) -> None:
        self.argtypes: list = []
        self.restype = None
        self._answer = answer

    def __call__(self, *args: object) -> int:
        return self._answer


def main(modules: list[str]) -> dict[str, object]:
    asked: list[tuple[str, Path, list[str], list[str], set[str]]] = []
    current = [""]

    def record(source, flags, libs=(), cpu_needs=frozenset()):  # native.load's signature
        names: set[str] = set()
        asked.append((current[0], Path(source), list(flags), list(libs), names))
        return Declared(names)

    native.load = record
    failures: dict[str, str] = {}
    for name in modules:
        current[0] = name
        module = importlib.import_module(name)
        try:
            (LOADERS.get(name) or (lambda m: m._library.__wrapped__()))(module)
        except Exception as exc:
            failures[name] = f"declaring its library: {type(exc).__name__}: {exc}"
    built, skipped = [], {}
    for name, source, flags, libs, names in asked:
        what = f"{name}: {source.name} {' '.join(flags)}"
        try:
            lib = ctypes.CDLL(str(native.build(source, flags, libs)))
        except native.NativeUnavailable as exc:
            if any(text in str(exc) for text in UNKNOWN_OPTION):
                skipped[what] = str(exc).splitlines()[-1]
            else:
                failures[what] = str(exc)[-3000:]
            continue
        missing = sorted(n for n in names if not hasattr(lib, n))
        if missing:
            failures[what] = f"declared but not in the library: {missing}"
        built.append([name, source.name])
    return {"built": built, "skipped": skipped, "failures": failures}


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1:])))
