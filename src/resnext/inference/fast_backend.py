"""Which `resnext.optimize` backend the predictor's and the commands' switches ask for."""

from __future__ import annotations

from resnext.errors import ConfigError


def fast_backend(optimize: str, *, compile: bool, replay: bool, cli: bool = False) -> str:
    """'inductor' for `compile`, 'replay' for `replay`, else 'none'; a ConfigError naming the
    switch when both are asked or one is asked without a fast path (`optimize` 'off'). `cli`
    spells the switches as the commands' options."""
    compile_, replay_ = ("--compile", "--replay") if cli else ("compile", "replay")
    need = "--optimize fp32|bf16|auto" if cli else "optimize='fp32', 'bf16' or 'auto'"
    if compile and replay:
        raise ConfigError(f"{compile_}, {replay_}: the fast path is compiled or replayed, not both")
    for switch, verb, asked in ((compile_, "compiles", compile), (replay_, "replays", replay)):
        if asked and optimize == "off":
            raise ConfigError(f"{switch}: {verb} the fast path, so it needs {need}")
    return "inductor" if compile else "replay" if replay else "none"
