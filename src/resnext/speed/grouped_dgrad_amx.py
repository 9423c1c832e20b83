"""The input gradient of a stride-2 grouped 3×3 convolution on AMX tiles, in four phases.

The input gradient's pixels of one row and column parity are a stride-1 convolution of the
output gradient with 1, 2 or 4 of the weight's taps (each group's matrix transposed). The AMX
kernel of `resnext.speed.grouped_amx` (`grouped3x3_amx_dgrad_s2` in its C source) fills the output
gradient's grids once and runs the four phases, skipping the K steps that hold no tap, and writes
each phase's pixels straight into the gradient. bf16 only; `resnext.speed.grouped_train` offers it
to the training chooser, where oneDNN was the only candidate at stride 2.
"""

from __future__ import annotations

import ctypes
import functools

import torch

from resnext import native
from resnext.speed import grouped_amx
from resnext.speed.grouped_dgrad import PHASE_TAPS, check_stride2_grad, group_transposed


@functools.lru_cache(maxsize=1)
def _library() -> ctypes.CDLL:
    lib = grouped_amx.load_amx(grouped_amx.SOURCE, "grouped3x3_amx_allowed")
    lib.grouped3x3_amx_dgrad_s2.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int] * 6
    lib.grouped3x3_amx_dgrad_s2.restype = ctypes.c_int
    return lib


@functools.lru_cache(maxsize=1)
def unavailable_reason() -> str | None:
    """None if the kernel can run here, else why not (one line; decided once per process)."""
    return native.problem(_library)


def supports(channels: int, groups: int) -> bool:
    """Whether the kernel takes a stride-2 grouped 3×3 conv with this many channels and groups."""
    return grouped_amx.supports(channels, groups, 1)


def phase_weights(weight: torch.Tensor, groups: int) -> list[torch.Tensor]:
    """The four stride-1 weights (phase 2·ph + pw), each (C, C/groups, 3, 3), whose convolutions
    of the output gradient give the input gradient's pixels (2a + ph, 2b + pw)."""
    transposed = group_transposed(weight, groups)
    phases = []
    for ph in (0, 1):
        for pw in (0, 1):
            w = torch.zeros_like(transposed)
            for new_h, kh in PHASE_TAPS[ph]:
                for new_w, kw in PHASE_TAPS[pw]:
                    w[:, :, new_h, new_w] = transposed[:, :, kh, kw]
            phases.append(w)
    return phases


@functools.lru_cache(maxsize=16)
def live_steps(channels: int, groups: int) -> torch.Tensor:
    """(4, steps) uint8: which K steps of each phase's packed weight hold any of its taps."""
    taps, _ = grouped_amx.step_rows(grouped_amx.block_channels(channels // groups))
    live = []
    for ph in (0, 1):
        for pw in (0, 1):
            used = torch.tensor([3 * h + w for h, _ in PHASE_TAPS[ph] for w, _ in PHASE_TAPS[pw]])
            live.append(torch.isin(taps, used).any(dim=1))
    return torch.stack(live).to(torch.uint8).contiguous()


@functools.lru_cache(maxsize=16)
def _phase_index(channels: int, groups: int) -> torch.Tensor:
    """For each value of `pack_phases`' output, its index in the flattened weight, or C·cpg·9 (a
    zero appended) where it is zero. Built by packing the phase weights of a weight whose values
    are their own indices (+ 1, so that 0 stays the packing's zero): one gather per call after."""
    cpg = channels // groups
    n = channels * cpg * 9
    ids = torch.arange(1, n + 1, dtype=torch.float64).reshape(channels, cpg, 3, 3)
    live = live_steps(channels, groups).bool()
    parts = []
    for q, w in enumerate(phase_weights(ids, groups)):
        flat = torch.cat([w.reshape(-1), w.new_zeros(1)])
        packed = flat[grouped_amx.pack_index(channels, cpg)]  # (blocks, tiles, steps, 16, 16, 2)
        parts.append(packed[:, :, live[q]].reshape(-1))
    index = torch.cat(parts).long() - 1
    return torch.where(index < 0, n, index)


def pack_phases(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """The four phases' weights as the kernel reads them, bf16: phase after phase, each
    [C/kc][kc/16][its live steps][16][16][2] (`grouped_amx.pack_weights`' layout without the
    steps that hold no tap)."""
    flat = weight.detach().to(torch.bfloat16).reshape(-1)
    return torch.cat([flat, flat.new_zeros(1)])[_phase_index(weight.shape[0], groups)]


def input_grad(
    grad: torch.Tensor, weight: torch.Tensor, groups: int, input_size: tuple[int, int]
) -> torch.Tensor:
    """The input gradient (bf16, channels-last) of ``conv2d(x, weight, stride=2, padding=1,
    groups=groups)`` for an input of `input_size` (H, W), given the output gradient `grad`."""
    n, c = grad.shape[:2]
    h, w = input_size
    if grad.dtype != torch.bfloat16 or grad.dim() != 4 or not supports(c, groups):
        raise ValueError(
            f"grad: expected a 4-d bf16 tensor whose {c} channels in {groups} groups the AMX kernel "
            f"takes, got {tuple(grad.shape)} {grad.dtype}"
        )
    if weight.shape != (c, c // groups, 3, 3):
        raise ValueError(
            f"weight: expected shape {(c, c // groups, 3, 3)}, got {tuple(weight.shape)}"
        )
    check_stride2_grad(grad, input_size)
    packed = pack_phases(weight, groups)
    live = live_steps(c, groups)
    grad = grad.contiguous(memory_format=torch.channels_last)
    dx = torch.empty(n, c, h, w, dtype=torch.bfloat16, memory_format=torch.channels_last)
    if dx.numel():
        rc = _library().grouped3x3_amx_dgrad_s2(
            grad.data_ptr(), packed.data_ptr(), live.data_ptr(), dx.data_ptr(),
            n, h, w, c, c // groups, torch.get_num_threads(),
        )  # fmt: skip
        grouped_amx.check_rc(rc, f"grouped3x3_amx_dgrad_s2 on {tuple(grad.shape)}")
    return dx
