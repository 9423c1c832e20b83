"""Pytest plugin for scripts/test_as_cpu.sh: native bf16 and AMX as the (masked) flags say.

torch asks the CPU itself whether oneDNN runs bf16 natively, which a masked /proc/cpuinfo does
not change; on the CPU kind being imitated the answer follows the flags, so here it does too.
"""

from __future__ import annotations

import dataclasses

from resnext.speed import capability

_measured = capability.cpu_capability


def _as_the_flags_say() -> capability.CpuCapability:
    flags = capability.cpu_flags()
    found = _measured()
    return dataclasses.replace(
        found, native_bf16=bool({"avx512_bf16", "amx_bf16"} & flags), amx="amx_bf16" in flags
    )


capability.cpu_capability = _as_the_flags_say
