"""Process-group setup from torchrun's environment variables, and the few collectives training needs."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import NoReturn, TypeVar

import torch
import torch.distributed as dist

from resnext.errors import ResNeXtError, TrainingError

T = TypeVar("T")


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the job: rank, world size and the device it computes on."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(preference: str, local_rank: int = 0) -> torch.device:
    """`auto` is the process's GPU when CUDA is available, else the CPU."""
    if preference == "auto":
        preference = "cuda" if torch.cuda.is_available() else "cpu"
    if preference.startswith("cuda"):
        if not torch.cuda.is_available():
            raise TrainingError("train.device: cuda requested but no CUDA device is available")
        if preference == "cuda":
            return torch.device("cuda", local_rank)
    return torch.device(preference)


def _attempt_store(rank: int, world_size: int) -> dist.Store:
    """The rendezvous store of this torchrun attempt, under a prefix of its own.

    After a `--max-restarts` restart the agent's store still holds the previous attempt's keys,
    and gloo would read the dead workers' addresses from them ("connectFullMesh ... Connection
    refused"); a per-attempt prefix gives every attempt a clean namespace.
    """
    addr = os.environ.get("MASTER_ADDR", "127.0.0.1")
    port = int(os.environ.get("MASTER_PORT", "29500"))
    agent_hosts = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(
        addr,
        port,
        world_size,
        is_master=not agent_hosts and rank == 0,
        timeout=timedelta(minutes=30),
        multi_tenant=not agent_hosts,
    )
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return dist.PrefixStore(f"resnext/attempt_{attempt}", store)


def init_distributed(device_preference: str = "auto") -> DistInfo:
    """Join the process group torchrun described (NCCL on GPU, gloo on CPU), or run alone."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_preference, local_rank)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(
            backend=backend,
            store=_attempt_store(rank, world_size),
            rank=rank,
            world_size=world_size,
        )
    if dist.is_initialized():
        rank, world_size = dist.get_rank(), dist.get_world_size()
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum of `tensor` over all processes (the tensor itself when running alone)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        tensor = tensor.clone()
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def barrier() -> None:
    """Wait for every process (no-op when running alone)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def broadcast_object(obj: object) -> object:
    """Rank 0's `obj` on every process."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]
    return obj


def on_main(info: DistInfo, action: Callable[[], None]) -> None:
    """Run `action` (a write) on rank 0 alone, every rank waiting for its outcome (as
    `on_every_rank`: a failure stops every rank with a message quoting it)."""
    on_every_rank(info, lambda: action() if info.is_main else None)


def on_every_rank(info: DistInfo, action: Callable[[], T]) -> T:
    """`action()` on every rank, each waiting for all outcomes. Where it fails on any rank, every
    rank stops: a failing one with its own error, the others with a TrainingError naming the
    first failing rank and quoting it (not a lost connection in their next collective)."""
    if not info.distributed:
        return action()
    failure: Exception | None = None
    result: T | None = None
    try:
        result = action()
    except (ResNeXtError, OSError) as exc:
        failure = exc
    messages: list[object] = [None] * info.world_size
    dist.all_gather_object(
        messages, None if failure is None else f"{type(failure).__name__}: {failure}"
    )
    if failure is not None:
        raise failure
    for rank, message in enumerate(messages):
        if message is not None:
            raise TrainingError(f"rank {rank} stopped the run: {message}")
    return result  # type: ignore[return-value]


def gather_object(info: DistInfo, obj: object) -> list[object]:
    """Every rank's `obj`, in rank order (a one-item list when running alone)."""
    if not info.distributed:
        return [obj]
    out: list[object] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def launched_by_torchrun() -> bool:
    """Whether this process is one of several workers torchrun started."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def exit_worker(code: int) -> NoReturn:
    """End a torchrun worker with exit status `code`, skipping interpreter finalization.

    Training under DDP keeps gloo's worker threads alive past `destroy_process_group`. Under load
    one of them may release the last collective's tensors only once the interpreter is shutting
    down; taking the GIL then aborts the process (SIGABRT, "terminate called without an active
    exception"), so torchrun reports a failure, or restarts a run that had finished. Every file a
    run writes is closed by then, so only the standard streams need flushing.
    """
    for stream in (sys.stdout, sys.stderr):
        # a closed or broken stream has nothing left to save
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    os._exit(code)
