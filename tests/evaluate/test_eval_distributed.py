"""Distributed evaluation (2 gloo processes on CPU) gives exactly the single-process counts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from eval_helpers import MEAN, STD, LeftHalfNet, random_images

from resnext.cli import main
from resnext.evaluate import Normalization, ShardSampler, evaluate, get_protocol
from resnext.evaluate.distributed import current_context

K = 8
N_IMAGES = 11  # odd, and not a multiple of world_size × batch: the tail is uneven


def _data() -> list:
    rng = np.random.default_rng(5)
    return [(img, int(rng.integers(0, K))) for img in random_images(N_IMAGES, seed=21)]


def _evaluate_counts() -> torch.Tensor:
    result = evaluate(
        LeftHalfNet(K, seed=9),
        _data(),
        get_protocol("tencrop", resize=28, crop=20),
        Normalization(MEAN.tolist(), STD.tolist()),
        num_classes=K,
        batch_size=2,
    )
    return result.counter.as_tensor()


def _worker(rank: int, world: int, tmp: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{tmp}/pg", rank=rank, world_size=world)
    try:
        assert current_context().world_size == world
        torch.save(_evaluate_counts(), Path(tmp) / f"counts{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_shard_sampler_covers_every_index_once() -> None:
    shards = [list(ShardSampler(N_IMAGES, r, 3)) for r in range(3)]
    assert sorted(i for s in shards for i in s) == list(range(N_IMAGES))
    assert [len(s) for s in shards] == [4, 4, 3]


def test_two_processes_equal_one(tmp_path: Path) -> None:
    single = _evaluate_counts()
    assert int(single[2:].sum()) == N_IMAGES
    mp.spawn(_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        merged = torch.load(tmp_path / f"counts{rank}.pt")
        assert torch.equal(merged, single)


class _Joined(Exception):
    """Stands in for joining the group: the test stops at the backend choice."""


@pytest.mark.parametrize(("device", "backend"), [("cpu", "gloo"), ("cuda", "nccl")])
def test_eval_under_torchrun_takes_the_backend_of_its_device_not_of_the_host(
    monkeypatch: pytest.MonkeyPatch, device: str, backend: str
) -> None:
    # A GPU host (CUDA present) evaluating with --device cpu must use gloo: NCCL cannot reduce
    # the CPU count tensors. A bare `cuda` is this rank's GPU, LOCAL_RANK (here 1).
    chosen: list[tuple[str, object]] = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: chosen.append(("set_device", d)))

    def join(backend: str | None = None, **_: object) -> None:
        chosen.append(("backend", backend))
        raise _Joined

    monkeypatch.setattr(dist, "init_process_group", join)
    with pytest.raises(_Joined):
        main(["eval", "--weights", "unused.pt", "--data", "unused", "--device", device])
    assert ("backend", backend) in chosen
    if device == "cuda":
        assert ("set_device", torch.device("cuda", 1)) in chosen
