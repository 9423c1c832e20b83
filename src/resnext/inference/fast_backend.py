"""Which `resnext.optimize` backend the predictor's and the commands' switches ask for."""

from __future__ import annotations

from resnext.errors import ConfigError


def fast_backend(optimize: str, *, compile: bool, replay: bool, cli: bool = False) -> str:
    """'inductor' for `compile`, 'replay' for `replay`, else 'none'; a ConfigError naming the
    switch when both are asked or one is asked without a fast path (`optimize` 'off'). `cli`
    spells the switches as the commands' options."""
    flag = {"compile": "--compile", "replay": "--replay"} if cli else {}
    need = "--optimize fp32|bf16" if cli else "optimize='fp32' or 'bf16'"
    if compile and replay:
        raise ConfigError(
            f"{flag.get('compile', 'compile')}, {flag.get('replay', 'replay')}: the fast path "
            "is compiled or replayed, not both"
        )
    for name, verb, asked in (("compile", "compiles", compile), ("replay", "replays", replay)):
        if asked and optimize == "off":
            raise ConfigError(f"{flag.get(name, name)}: {verb} the fast path, so it needs {need}")
    return "inductor" if compile else "replay" if replay else "none"
