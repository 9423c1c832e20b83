#!/usr/bin/env bash
# Main job: set up, then train a ResNeXt on the embedded default dataset and print its test accuracy.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/resnext demo "$@"
