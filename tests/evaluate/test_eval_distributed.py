"""Distributed evaluation (2 gloo processes on CPU) gives exactly the single-process counts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from eval_helpers import MEAN, STD, LeftHalfNet, random_images

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
