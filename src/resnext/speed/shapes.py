"""What a fast path does with an input unlike every one it was built for (`new_shapes`)."""

from __future__ import annotations

from resnext.errors import ConfigError

# 'compile': build for it when it comes (a compiled graph, or a replay's recording);
# 'eager': run it on the eager fast path, the same function, with no wait
NEW_SHAPES = ("compile", "eager")


def check_new_shapes(new_shapes: str) -> None:
    """A ConfigError naming `new_shapes` unless it is one of NEW_SHAPES."""
    if new_shapes not in NEW_SHAPES:
        raise ConfigError(f"new_shapes: expected one of {NEW_SHAPES}, got {new_shapes!r}")
