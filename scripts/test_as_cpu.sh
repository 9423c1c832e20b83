#!/usr/bin/env bash
# The test suite as it runs on another kind of CPU, on this one: /proc/cpuinfo's flags masked in a
# private mount namespace (needs root, or unprivileged user namespaces with `unshare -rm`), so that
# tests whose kernels, skips or expectations follow the CPU's flags take the other kind's branches.
#   KIND avx2:   no AVX-512, no AVX512-BF16, no AMX (machine C of benchmarks/RESULTS.md)
#   KIND no-amx: AVX-512 and AVX512-BF16 without AMX (machines A and D)
# Our code reads the masked flags; torch and oneDNN still run on the real ISA, so a test comparing
# our kernels' rate with oneDNN's (test_peak) may fail here and not on that CPU.
# Usage: bash scripts/test_as_cpu.sh KIND [pytest arguments]   (after scripts/setup.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
kind="${1:?usage: scripts/test_as_cpu.sh avx2|no-amx [pytest arguments]}"
shift
case "$kind" in
  avx2) drop=' (avx512[a-z_0-9]*|amx[a-z_0-9]*|avx_vnni)' ;;
  no-amx) drop=' amx[a-z_0-9]*' ;;
  *) echo "KIND: expected avx2 or no-amx, got $kind" >&2; exit 2 ;;
esac
masked="$(mktemp)"
trap 'rm -f "$masked"' EXIT
sed -E "s/$drop//g" /proc/cpuinfo > "$masked"
# bash -c: "$0" is the masked file, "$@" the pytest arguments
unshare -m bash -c 'mount --bind "$0" /proc/cpuinfo &&
  PYTHONPATH=scripts .venv/bin/python -m pytest -q -p cpu_mask_plugin "$@"' "$masked" "$@"
