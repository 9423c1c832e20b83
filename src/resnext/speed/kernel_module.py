"""The base class of the fast path's kernel modules, and the tracer that keeps them whole."""

from __future__ import annotations

from torch import fx, nn


class KernelModule(nn.Module):
    """A module whose forward is one call of our kernels (a convolution or a fused chain of them).

    The passes of `resnext.speed.optimize` find their sites by tracing the modules that hold them.
    Traced through, a kernel module would become its op call and its packed weights, so a later
    pass (or a reader of the optimized model) would no longer see what it is. Every such module
    derives from this class, and `KernelLeafTracer` keeps each as one call.
    """


class KernelLeafTracer(fx.Tracer):
    """An fx tracer that keeps every `KernelModule` as a single call."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, KernelModule) or super().is_leaf_module(m, module_qualified_name)
