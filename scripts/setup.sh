#!/usr/bin/env bash
# Creates or reuses .venv and installs the package; installs the CPU torch wheel only when no torch is importable.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    # System site packages let an already-installed torch (e.g. a GPU machine's) be reused as is.
    "$PY" -m venv --system-site-packages .venv
fi
VPY=.venv/bin/python
if ! "$VPY" -c "import torch" >/dev/null 2>&1; then
    # A bare 'torch' requirement would pull several GB of CUDA wheels: pin the CPU build first.
    "$VPY" -m pip install -q "torch==2.13.0"
fi
stamp=.venv/.resnext-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    "$VPY" -m pip install -q -e ".[dev]"
    touch "$stamp"
fi
