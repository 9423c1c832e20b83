"""The fast paths' max pooling, `kernels/maxpool.c` via ctypes: in training with one-byte argmax
indices, in inference with none.

`use_fast_maxpool(model)` turns each `nn.MaxPool2d` the kernel takes (square window of at most
15, padding at most half the window, no dilation, floor sizes) into a `TrainingMaxPool2d` in
place. In training mode on channels-last float32/bfloat16 CPU tensors it pools with the kernel,
saving the winning tap of each window in one byte instead of torch's int64 index; its backward
has each input value gather the gradients of the windows that chose it, and writes it once.
Everywhere else (eval mode, other devices, layouts or dtypes, tracing, torch.compile) it is the
plain `nn.MaxPool2d`.

`use_inference_maxpool(model)` does the same with `InferenceMaxPool2d`, which pools tensors that
need no gradient (torch's pooling writes an int64 index per value there too, and the eager fast
paths' replay copied both into its memory). Max pooling is exact, so both compute torch's values
bit for bit, NaNs included.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from resnext import native
from resnext.speed.swap import capturing_graph, swap_class

SOURCE = Path(__file__).with_name("kernels") / "maxpool.c"
FLAGS = ("-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-fopenmp")
REQUIRED_FLAGS = frozenset({"avx512f", "avx512bw", "avx512vl"})
DTYPES = {torch.float32: 0, torch.bfloat16: 1}


@functools.lru_cache(maxsize=1)
def _library() -> ctypes.CDLL:
    lib = native.load(SOURCE, FLAGS, cpu_needs=REQUIRED_FLAGS)
    for fn in (lib.maxpool_forward, lib.maxpool_backward):
        fn.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int] * 9
        fn.restype = ctypes.c_int
    return lib


@functools.lru_cache(maxsize=1)
def unavailable_reason() -> str | None:
    """None if the kernel can run here, else why not (one line; decided once per process)."""
    return native.problem(_library)


def _single(v: int | tuple[int, ...]) -> int | None:
    """The one value of a square pooling parameter, or None where it differs by axis."""
    if isinstance(v, int):
        return v
    return v[0] if len(set(v)) == 1 else None


def window(pool: nn.MaxPool2d) -> tuple[int, int, int] | None:
    """(window, stride, padding) of a pooling layer the kernel computes, else None."""
    k, p = _single(pool.kernel_size), _single(pool.padding)
    s = _single(pool.stride if pool.stride is not None else pool.kernel_size)
    if k is None or s is None or p is None or _single(pool.dilation) != 1:
        return None
    if pool.ceil_mode or pool.return_indices or not (1 <= k <= 15 and s >= 1 and 0 <= 2 * p <= k):
        return None
    return k, s, p


def _check(x: torch.Tensor) -> None:
    if (
        x.dim() != 4
        or x.dtype not in DTYPES
        or x.device.type != "cpu"
        or not x.is_contiguous(memory_format=torch.channels_last)
    ):
        raise ValueError(
            f"x: expected a channels-last 4-D float32 or bfloat16 CPU tensor, got "
            f"{tuple(x.shape)} {x.dtype} on {x.device}"
        )


def output_size(size: int, k: int, s: int, p: int) -> int:
    """The pooled size of one axis (floor mode)."""
    return (size + 2 * p - k) // s + 1


def _run(
    name: str,
    tensors: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None],
    dtype: torch.dtype,
    dims: tuple[int, int, int, int],
    window: tuple[int, int, int],
) -> None:
    """Call the C function `name` on three tensors (the last may be None: no taps), (N, H, W, C)
    of the input map and (k, s, p)."""
    pointers = [None if t is None else t.data_ptr() for t in tensors]
    rc = getattr(_library(), name)(
        *pointers, DTYPES[dtype], *dims, *window, torch.get_num_threads()
    )
    if rc != 0:
        k, s, p = window
        raise ValueError(f"{name} refused window {k}, stride {s}, padding {p}")


def _output(x: torch.Tensor, k: int, s: int, p: int) -> torch.Tensor:
    """An empty channels-last tensor of the pooled shape, after checking `x` and that it is."""
    _check(x)
    n, c, h, w = x.shape
    ho, wo = output_size(h, k, s, p), output_size(w, k, s, p)
    if ho < 1 or wo < 1:
        raise ValueError(f"x: a {h}×{w} map is smaller than the {k}×{k} window with padding {p}")
    return torch.empty(n, c, ho, wo, dtype=x.dtype, memory_format=torch.channels_last)


def forward(x: torch.Tensor, k: int, s: int, p: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(max_pool2d(x, k, s, p), the winning tap kh·k + kw of each output value as uint8)."""
    y = _output(x, k, s, p)
    taps = torch.empty_like(y, dtype=torch.uint8)
    n, c, h, w = x.shape
    _run("maxpool_forward", (x, y, taps), x.dtype, (n, h, w, c), (k, s, p))
    return y, taps


def pool(x: torch.Tensor, k: int, s: int, p: int) -> torch.Tensor:
    """max_pool2d(x, k, s, p), without the taps."""
    y = _output(x, k, s, p)
    n, c, h, w = x.shape
    _run("maxpool_forward", (x, y, None), x.dtype, (n, h, w, c), (k, s, p))
    return y


def backward(
    grad: torch.Tensor, taps: torch.Tensor, input_size: tuple[int, int], k: int, s: int, p: int
) -> torch.Tensor:
    """The input gradient of `forward` given its output's gradient and the taps it saved."""
    _check(grad)
    n, c, ho, wo = grad.shape
    h, w = input_size
    if tuple(taps.shape) != tuple(grad.shape) or taps.dtype != torch.uint8:
        raise ValueError(
            f"taps: expected uint8 of shape {tuple(grad.shape)}, got {taps.dtype} "
            f"{tuple(taps.shape)}"
        )
    if (output_size(h, k, s, p), output_size(w, k, s, p)) != (ho, wo):
        raise ValueError(f"input_size: {h}×{w} does not pool to the gradient's {ho}×{wo}")
    taps = taps.contiguous(memory_format=torch.channels_last)
    dx = torch.empty(n, c, h, w, dtype=grad.dtype, memory_format=torch.channels_last)
    _run("maxpool_backward", (grad, taps, dx), grad.dtype, (n, h, w, c), (k, s, p))
    return dx


class _MaxPool(torch.autograd.Function):
    """max_pool2d(x, k, s, p) whose backward reads one-byte taps instead of int64 indices."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor, k: int, s: int, p: int
    ) -> torch.Tensor:
        y, taps = forward(x, k, s, p)
        ctx.save_for_backward(taps)
        ctx.geometry = (tuple(x.shape[2:]), k, s, p)
        return y

    @staticmethod
    @once_differentiable
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor
    ) -> tuple[torch.Tensor | None, ...]:
        (taps,) = ctx.saved_tensors
        size, k, s, p = ctx.geometry
        grad = grad.contiguous(memory_format=torch.channels_last)
        return backward(grad, taps, size, k, s, p), None, None, None


def _kernel_window(pool: nn.MaxPool2d, x: torch.Tensor) -> tuple[int, int, int] | None:
    """(k, s, p) where the kernel pools `x` for `pool` (a channels-last 4-D float32 or bf16 CPU
    tensor, outside a graph capture, a window it computes and that fits the map), else None."""
    geometry = window(pool)
    if (
        geometry is None
        or capturing_graph()
        or x.dim() != 4
        or x.dtype not in DTYPES
        or x.device.type != "cpu"
        or not x.is_contiguous(memory_format=torch.channels_last)
        or unavailable_reason() is not None
    ):
        return None
    k, s, p = geometry
    if output_size(x.shape[2], k, s, p) < 1 or output_size(x.shape[3], k, s, p) < 1:
        return None  # torch's own error message for a too-small map
    return geometry


class TrainingMaxPool2d(nn.MaxPool2d):
    """A MaxPool2d that pools channels-last training tensors with `kernels/maxpool.c`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        training = self.training and torch.is_grad_enabled() and x.requires_grad
        geometry = _kernel_window(self, x) if training else None
        if geometry is None:
            return super().forward(x)
        return _MaxPool.apply(x, *geometry)


class InferenceMaxPool2d(nn.MaxPool2d):
    """A MaxPool2d that pools channels-last tensors needing no gradient with `kernels/maxpool.c`,
    writing no indices."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        needs_grad = torch.is_grad_enabled() and x.requires_grad
        geometry = None if needs_grad else _kernel_window(self, x)
        if geometry is None:
            return super().forward(x)
        return pool(x, *geometry)


def use_inference_maxpool(model: nn.Module) -> int:
    """Make every `nn.MaxPool2d` the kernel takes an `InferenceMaxPool2d`, in place, where the
    kernel runs on this CPU; how many."""
    if unavailable_reason() is not None:
        return 0
    return swap_class(model, nn.MaxPool2d, InferenceMaxPool2d, lambda m: window(m) is not None)


def use_fast_maxpool(model: nn.Module) -> int:
    """Make every `nn.MaxPool2d` the kernel takes a `TrainingMaxPool2d`, in place; how many."""
    return swap_class(model, nn.MaxPool2d, TrainingMaxPool2d, lambda m: window(m) is not None)


def use_plain_maxpool(model: nn.Module) -> int:
    """Undo `use_fast_maxpool`: every `TrainingMaxPool2d` becomes an `nn.MaxPool2d` again."""
    return swap_class(model, TrainingMaxPool2d, nn.MaxPool2d)
