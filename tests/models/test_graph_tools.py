"""The networks through torch's graph tools (fx, jit.trace, export): the same function as eager."""

from __future__ import annotations

import pytest
import torch

import resnext

VARIANTS = {
    "deep_avgdown_se": ("resnext_tiny_in", {"stem": "deep", "avg_down": True, "se_reduction": 4}),
    "preact": ("resnext_tiny", {"preact": True}),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_fx_trace_and_export_compute_the_eager_function(variant: str) -> None:
    name, spec = VARIANTS[variant]
    torch.manual_seed(0)
    model = resnext.create_model(name, **spec).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)
        graphs = {
            "fx": torch.fx.symbolic_trace(model),
            "jit.trace": torch.jit.trace(model, x),
            "export": torch.export.export(model, (x,)).module(),
        }
        for tool, graph in graphs.items():
            got = graph(x)
            assert torch.allclose(got, expected, atol=1e-5), tool
