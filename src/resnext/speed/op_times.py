"""Wall-clock time, FLOPs and bytes of every operator a step runs: a dispatch-mode timer, no profiler.

`torch.profiler` reported some of this project's kernels at 5–6× their unprofiled time (ad hoc,
docs/speed.md), so where a step's time goes is measured here with nothing but a clock read before
and after each ATen operator (a few microseconds each), and around the project's own C kernels,
which torch does not dispatch, through `instrument`. FLOPs come from torch's own formulas
(`torch.utils.flop_counter`), except for a convolution's backward (see
`conv_backward_flop`); bytes are the sizes of an operator's tensor inputs and outputs, the
least memory traffic it can have.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

FlopFn = Callable[[tuple[Any, ...], Any], int]


def conv_backward_flop(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    *args: Any,
    out_val: Any = None,
    **kwargs: Any,
) -> int:
    """FLOP of `aten.convolution_backward`: the forward's multiply-adds once per gradient asked for.

    torch's own formula counts the input gradient of a stride-s convolution as a transposed
    convolution over the whole input, s² times the multiply-adds a direct kernel does; a ceiling
    must count only the work that has to be done.
    """
    mask = kwargs.get("output_mask", args[-1] if args else (True, True, False))
    transposed = kwargs.get("transposed", args[4] if len(args) > 4 else False)
    # weight[0] is what one output (one input, if transposed) value meets: C_in/groups × k × k.
    forward = 2 * (x if transposed else grad_out).numel() * weight[0].numel()
    return forward * (int(bool(mask[0])) + int(bool(mask[1])))


def _flop(func: torch._ops.OpOverload, args: tuple[Any, ...], kwargs: dict, out: Any) -> int:
    packet = func._overloadpacket
    if packet is torch.ops.aten.convolution_backward:
        return conv_backward_flop(*args, out_val=out, **kwargs)
    if packet in flop_registry:
        return int(flop_registry[packet](*args, **kwargs, out_val=out))
    return 0


@dataclass
class OpTotals:
    """What all calls of one operator with one signature took: calls, seconds, FLOP and bytes."""

    calls: int = 0
    seconds: float = 0.0
    flop: int = 0
    nbytes: int = 0

    def add(self, seconds: float, flop: int, nbytes: int) -> None:
        self.calls += 1
        self.seconds += seconds
        self.flop += flop
        self.nbytes += nbytes


def _tensors(value: object) -> Iterator[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item)


def tensor_bytes(*values: object) -> int:
    """Total bytes of the tensors in `values` (nested lists and tuples included)."""
    return sum(t.numel() * t.element_size() for v in values for t in _tensors(v))


def signature(args: Sequence[object]) -> str:
    """The shapes and dtypes of the tensor arguments, e.g. '16x64x56x56:bf16 256x64x1x1:bf16'."""
    short = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}
    parts = [
        "x".join(map(str, t.shape)) + ":" + short.get(t.dtype, str(t.dtype).removeprefix("torch."))
        for t in _tensors(list(args))
    ]
    return " ".join(parts)


def _returns_view(func: torch._ops.OpOverload) -> bool:
    returns = func._schema.returns
    return bool(returns) and returns[0].alias_info is not None


class OpTimer(TorchDispatchMode):
    """Accumulates per (operator, argument signature) the calls, seconds, FLOP and bytes.

    Use as a context manager around the code to measure. Views (whose outputs alias their
    inputs) count no bytes. Work inside a `span` (a C kernel and the tensors it allocates) is
    counted once, under the span's label.
    """

    def __init__(self) -> None:
        super().__init__()
        self.totals: dict[tuple[str, str], OpTotals] = {}
        self._span_depth = 0

    def record(self, label: str, sig: str, seconds: float, flop: int, nbytes: int) -> None:
        """Add one call of `label` with signature `sig`."""
        self.totals.setdefault((label, sig), OpTotals()).add(seconds, flop, nbytes)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        if self._span_depth:
            return func(*args, **kwargs)
        start = time.perf_counter()
        out = func(*args, **kwargs)
        elapsed = time.perf_counter() - start
        nbytes = 0 if _returns_view(func) else tensor_bytes(args, out)
        flop = _flop(func, args, kwargs, out)
        self.record(func._overloadpacket.__name__, signature(args), elapsed, flop, nbytes)
        return out

    @contextmanager
    def span(self, label: str, sig: str = "") -> Iterator[list[int]]:
        """Time a block as one call of `label`; the block may set [flop, bytes] in the yielded list."""
        counts = [0, 0]
        self._span_depth += 1
        start = time.perf_counter()
        try:
            yield counts
        finally:
            elapsed = time.perf_counter() - start
            self._span_depth -= 1
        self.record(label, sig, elapsed, counts[0], counts[1])

    def timed(self, fn: Callable[..., Any], label: str, flop: FlopFn | None = None) -> Callable:
        """`fn` wrapped so that each call is a span of `label` (FLOP from `flop(args, result)`)."""

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            with self.span(label, signature(args)) as counts:
                result = fn(*args, **kwargs)
                counts[0] = flop(args, result) if flop is not None else 0
                counts[1] = tensor_bytes(args, result)
            return result

        return wrapper


@dataclass(frozen=True)
class Instrumented:
    """A module-level function to time as a span: `module.attr`, shown as `label`."""

    module: ModuleType
    attr: str
    label: str
    flop: FlopFn | None = None


@contextmanager
def instrument(timer: OpTimer, targets: Sequence[Instrumented]) -> Iterator[None]:
    """Replace each target function by its timed version for the duration of the block."""
    originals = [(t.module, t.attr, getattr(t.module, t.attr)) for t in targets]
    try:
        for target, (_, _, fn) in zip(targets, originals, strict=True):
            setattr(target.module, target.attr, timer.timed(fn, target.label, target.flop))
        yield
    finally:
        for module, attr, fn in originals:
            setattr(module, attr, fn)
