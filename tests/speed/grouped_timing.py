"""Stand-in timings for `swap_grouped_convs`' chooser in the tests: oneDNN against our kernels."""

from __future__ import annotations

import pytest

from resnext.speed import grouped_swap
from resnext.speed.prepacked import PrepackedConv


def time_grouped_ways(monkeypatch: pytest.MonkeyPatch, onednn_ms: float, ours_ms: float) -> None:
    """Within the test, `swap_grouped_convs` times oneDNN's prepacked convolution at `onednn_ms`
    and each of our kernel variants at `ours_ms` instead of measuring them."""
    monkeypatch.setattr(
        grouped_swap,
        "time_each_ms",
        lambda fns, x, repeats, before=None: [
            onednn_ms if isinstance(fn, PrepackedConv) else ours_ms for fn in fns
        ],
    )
