"""Our kernels as torch operators (namespace ``resnext``), registered with the least overhead.

Why not ``torch.library.custom_op``: its Python-level autograd and in-place wrappers run on
every call, measured on the Intel machine at 32 vs 22 µs a call for a functional operator and
70 vs 23 µs for one that writes in place (`benchmarks/RESULTS.md`, stop 22), which is most of a
small block's time at batch 1. These operators are inference kernels: each gets only a CPU
implementation and a fake (shape-only) one for torch.compile; none has a gradient, so each
refuses (`check_no_grad`) an input that would need one rather than leave it silently without.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

NAMESPACE = "resnext"
_LIBRARY = torch.library.Library(NAMESPACE, "DEF")


def define(schema: str, impl: Callable[..., object], fake: Callable[..., object]) -> None:
    """Define ``resnext::<schema>``, computed by `impl` on CPU tensors and shaped by `fake`.

    `schema` is the operator's signature in torch's schema language, its name first, e.g.
    ``"grouped(Tensor x, int groups) -> Tensor"``; arguments an operator writes are marked
    ``Tensor(a!)`` so that torch.compile keeps the write.
    """
    name = schema.split("(", 1)[0]
    _LIBRARY.define(schema)
    _LIBRARY.impl(name, impl, "CPU")
    torch.library.register_fake(f"{NAMESPACE}::{name}", fake, lib=_LIBRARY)


def define_over_residual(
    name: str,
    args: str,
    run: Callable[..., torch.Tensor],
    output_shape: Callable[..., tuple[int, ...]],
) -> None:
    """Define a kernel's two operators: ``resnext::<name>(<args>, Tensor? residual) -> Tensor``
    and ``<name>_(<args>, Tensor(a!) residual) -> ()``, which writes its result over the residual.

    Both call ``run(*arguments, residual, in_place=...)``; the fakes make a channels-last output
    of ``output_shape(*arguments)`` like x (the first argument).
    """

    def functional(*arguments: object) -> torch.Tensor:
        return run(*arguments)

    def in_place(*arguments: object) -> None:
        run(*arguments, in_place=True)

    def fake(*arguments: object) -> torch.Tensor:
        x = arguments[0]
        assert isinstance(x, torch.Tensor)
        shape = output_shape(*arguments[:-1])
        return torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=torch.channels_last)

    def fake_in_place(*arguments: object) -> None:
        return None

    define(f"{name}({args}, Tensor? residual) -> Tensor", functional, fake)
    define(f"{name}_({args}, Tensor(a!) residual) -> ()", in_place, fake_in_place)


def pointwise_output_shape(
    x_shape: tuple[int, ...], out_channels: int, stride: int
) -> tuple[int, ...]:
    """A 1×1 convolution's output shape (N, C, Ho, Wo) for an input of `x_shape` at `stride`."""
    n, _, h, w = x_shape
    return (n, out_channels, (h - 1) // stride + 1, (w - 1) // stride + 1)


def pointwise_operands(
    x: torch.Tensor,
    out_channels: int,
    stride: int,
    bias: torch.Tensor | None,
    residual: torch.Tensor | None,
    in_place: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(x channels-last, output, residual) for a float32 1×1 kernel of `out_channels` outputs at
    `stride`, after refusing by name a bias that is missing or not `out_channels` float32 values
    (and the residual as `float32_output` does)."""
    if bias is None:
        raise ValueError(f"bias: expected {out_channels} float32 values, got None")
    check_bias(bias, out_channels)
    shape = pointwise_output_shape(tuple(x.shape), out_channels, stride)
    y, residual = float32_output(x, shape, residual, in_place)
    return x.contiguous(memory_format=torch.channels_last), y, residual


def call_over_residual(
    functional: Callable[..., torch.Tensor],
    over_residual: Callable[..., object],
    args: tuple[object, ...],
    residual: torch.Tensor | None,
    in_place: bool,
) -> torch.Tensor:
    """A kernel module's call of its pair of operators (`define_over_residual`): written over
    `residual`, which it returns, where `in_place` and there is one; else into a new output."""
    if in_place and residual is not None:
        over_residual(*args, residual)
        return residual
    return functional(*args, residual)


def check_no_grad(name: str, *tensors: torch.Tensor | None) -> None:
    """A ValueError naming the operator if grad mode is on and an input requires a gradient."""
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        raise ValueError(
            f"{name}: an inference kernel without a gradient got an input that requires one; "
            "call it under torch.no_grad() or torch.inference_mode()"
        )


def check_bf16_input(kernel: str, x: torch.Tensor, *more: torch.Tensor | None) -> None:
    """A ValueError naming `x` unless it is a 4-d bf16 CPU tensor, or naming `kernel` if it or
    one of `more` needs a gradient (`check_no_grad`)."""
    if x.dim() != 4 or x.dtype != torch.bfloat16 or x.device.type != "cpu":
        raise ValueError(
            f"x: expected a 4-d bfloat16 CPU tensor, got {tuple(x.shape)} {x.dtype} on {x.device}"
        )
    check_no_grad(kernel, x, *more)


def check_float32_4d(name: str, t: torch.Tensor, shape: tuple[int, ...] | None = None) -> None:
    """A ValueError naming `name` unless `t` is a 4-d float32 CPU tensor (of `shape`, if given)."""
    if t.dtype != torch.float32 or t.dim() != 4 or t.device.type != "cpu":
        raise ValueError(
            f"{name}: expected a 4-d float32 CPU tensor, got {t.dtype} {tuple(t.shape)} on "
            f"{t.device}"
        )
    if shape is not None and tuple(t.shape) != shape:
        raise ValueError(f"{name}: expected shape {shape}, got {tuple(t.shape)}")


def check_bias(bias: torch.Tensor | None, channels: int) -> None:
    """A ValueError naming `bias` unless it is None or `channels` float32 values."""
    if bias is not None and (bias.dtype != torch.float32 or bias.numel() != channels):
        raise ValueError(
            f"bias: expected {channels} float32 values, got {bias.dtype} with {bias.numel()}"
        )


def overlap(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether the memory spans of two tensors intersect."""
    if a.numel() == 0 or b.numel() == 0:
        return False
    a0, b0 = a.data_ptr(), b.data_ptr()
    a1 = (
        a0 + sum((s - 1) * st for s, st in zip(a.shape, a.stride(), strict=True)) * a.element_size()
    )
    b1 = (
        b0 + sum((s - 1) * st for s, st in zip(b.shape, b.stride(), strict=True)) * b.element_size()
    )
    return a0 <= b1 and b0 <= a1


def float32_output(
    x: torch.Tensor, shape: tuple[int, ...], residual: torch.Tensor | None, in_place: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(output, residual) for a float32 kernel whose output has `shape` and may add `residual`:
    with `in_place` the residual itself (refused, by name, unless it is channels_last and
    apart from `x`), else a new channels-last tensor and the residual made channels-last."""
    if residual is not None:
        check_float32_4d("residual", residual, shape)
    if in_place:
        if residual is None or not residual.is_contiguous(memory_format=torch.channels_last):
            raise ValueError("residual: writing in place needs a channels_last residual")
        if overlap(x, residual):
            raise ValueError("residual: must not share memory with x when written in place")
        return residual, residual
    if residual is not None:
        residual = residual.contiguous(memory_format=torch.channels_last)
    return torch.empty(shape, dtype=torch.float32, memory_format=torch.channels_last), residual
