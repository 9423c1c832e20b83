"""Every C kernel compiles with the flags its module asks for, on any x86 CPU with a compiler.

The AVX-512 and AMX kernels only run (and so are only tested) on CPUs that have them; this
builds them anywhere, so that a change to a shared header or a Python declaration cannot break
them unnoticed on a machine without those instructions.
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from resnext import native

PACKAGE = Path(__file__).resolve().parents[2] / "src" / "resnext"
SCRIPT = Path(__file__).with_name("declared_builds.py")


def _kernel_modules() -> list[str]:
    """The package's modules that load a C library (they call native.load, describe a
    native.Build, or call the AMX loader)."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        text = path.read_text()
        if path.name != "native.py" and any(
            call in text for call in ("native.load(", "native.Build", "load_amx(")
        ):
            parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
            found.append(".".join(parts))
    return found


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86 kernels only")
def test_every_kernel_builds_and_has_what_python_declares() -> None:
    if native.problem(native.compiler) is not None:
        pytest.skip(f"no C compiler: {native.problem(native.compiler)}")
    modules = _kernel_modules()
    assert len(modules) >= 15
    done = subprocess.run(
        [sys.executable, str(SCRIPT), *modules], capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.splitlines()[-1])
    assert report["failures"] == {}
    for what, why in report["skipped"].items():
        print(f"not built, the compiler lacks an option: {what}: {why}")
    # every kernel source in the package was asked for by some module (none is orphaned)
    sources = {p.name for p in PACKAGE.rglob("kernels/*.c")}
    asked = {source for _, source in report["built"]}
    asked |= {what.split(": ")[1].split()[0] for what in report["skipped"]}
    assert sources == asked
