"""Sharded evaluation across processes: every image exactly once, counts summed with all_reduce."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.utils.data import Sampler


class ShardSampler(Sampler[int]):
    """Indices rank, rank+world, …: unlike DistributedSampler, no padding, so no image counts twice."""

    def __init__(self, length: int, rank: int, world_size: int) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank}: expected 0 <= rank < world_size={world_size}")
        self.length, self.rank, self.world_size = length, rank, world_size

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.length, self.world_size))

    def __len__(self) -> int:
        return len(range(self.rank, self.length, self.world_size))


@dataclass(frozen=True)
class DistContext:
    """This process's place in the group (rank 0 of 1 when not distributed)."""

    rank: int = 0
    world_size: int = 1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def current_context() -> DistContext:
    """The context of an initialised process group, else a single process."""
    if dist.is_available() and dist.is_initialized():
        return DistContext(dist.get_rank(), dist.get_world_size())
    return DistContext()


def local_device(device: str) -> str:
    """`device` for this process: under torchrun a bare `cuda` is the GPU of LOCAL_RANK (as in
    training), so the ranks of one host do not all share the first GPU."""
    if device == "cuda" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return device


def init_from_env(backend: str | None = None, device: str = "cpu") -> DistContext:
    """Join the group torchrun describes in the environment (WORLD_SIZE > 1); else single process.

    The backend follows `device` (NCCL for CUDA, gloo otherwise), not what the host has: a CPU
    evaluation on a GPU host must not take NCCL, which reduces CUDA tensors only."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available():
        return current_context()
    if not dist.is_initialized():
        on_cuda = str(device).startswith("cuda")
        chosen = backend or ("nccl" if on_cuda else "gloo")
        if on_cuda:
            torch.cuda.set_device(torch.device(device))
        dist.init_process_group(backend=chosen)
    return current_context()


def _collective_device() -> torch.device:
    # NCCL reduces CUDA tensors only, on this process's GPU; gloo reduces CPU tensors.
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def sum_across_ranks(values: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Element-wise sum over all ranks (int64 counts stay exact), on `values`' device."""
    if not ctx.enabled:
        return values
    out = values.to(_collective_device(), copy=True)
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out.to(values.device)


def max_across_ranks(value: float, ctx: DistContext) -> float:
    """The largest value over all ranks (wall time of the slowest rank)."""
    if not ctx.enabled:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=_collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())
