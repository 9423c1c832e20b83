"""Shared pieces of the reliability suite: tiny data and configs, a seeded file mutator, counters."""

from __future__ import annotations

import atexit
import json
import os
import random
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import TensorDataset

from resnext.config import Config, make_config

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parents[1]
# Set RESNEXT_REL_COUNTS=/some/file.jsonl to collect the suite's counts for docs/reliability.md.
COUNTS_ENV = "RESNEXT_REL_COUNTS"


def record(kind: str, count: int, failures: int = 0, **extra: Any) -> None:
    """Print one count line (visible with -s) and append it to $RESNEXT_REL_COUNTS when set."""
    line = {"kind": kind, "count": count, "failures": failures, **extra}
    print(f"[reliability] {json.dumps(line, sort_keys=True)}")
    target = os.environ.get(COUNTS_ENV)
    if target:
        with open(target, "a", encoding="utf-8") as fh:
            fh.write(json.dumps({**line, "time": time.time()}) + "\n")


def tiny_dataset(n: int, classes: int = 4, seed: int = 1) -> TensorDataset:
    """n random 3x8x8 images whose mean brightness depends on the label (learnable in a few steps)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=g)
    x = torch.randn(n, 3, 8, 8, generator=g) + 0.5 * y.view(-1, 1, 1, 1).float()
    return TensorDataset(x, y)


def tiny_config_dict(out: Path | str, **sections: dict[str, Any]) -> dict[str, Any]:
    """The dict of a resnext_tiny run on 8x8 inputs, float32, one thread, one step per checkpoint."""
    data: dict[str, Any] = {
        "name": "rel",
        "output_dir": str(out),
        "model": {"name": "resnext_tiny", "spec": {"num_classes": 4}},
        "data": {"batch_size": 16, "eval_batch_size": 8},
        "optim": {"lr": 0.05},
        "schedule": {"kind": "cosine"},
        "train": {
            "epochs": 3,
            "amp": "none",
            "threads": 1,
            "log_every": 1000,
            "device": "cpu",
            "checkpoint_every": 1,
        },
    }
    for key, value in sections.items():
        data.setdefault(key, {}).update(value)
    return data


def tiny_config(out: Path | str, **sections: dict[str, Any]) -> Config:
    """A validated Config of `tiny_config_dict`."""
    return make_config(tiny_config_dict(out, **sections))


def model_state(path: Path) -> dict[str, torch.Tensor]:
    """The model weights inside a training checkpoint."""
    from resnext.train import load_checkpoint

    return load_checkpoint(path)["model"]


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def same_bits(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> list[str]:
    """Names of the tensors that differ in any bit (or exist on one side only)."""
    keys = sorted(set(a) | set(b))
    return [
        k
        for k in keys
        if k not in a
        or k not in b
        or a[k].dtype != b[k].dtype
        or a[k].shape != b[k].shape
        or not torch.equal(_bytes(a[k]), _bytes(b[k]))
    ]


class Mutator:
    """Seeded corruption of a byte string: bit flips, truncation, byte insertion, chunk duplication."""

    KINDS = ("flip", "truncate", "insert", "overwrite", "duplicate")

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)

    def mutate(self, data: bytes, protect_prefix: int = 0) -> tuple[str, bytes]:
        """One mutation of `data` (after its first `protect_prefix` bytes): (description, result)."""
        kind = self.rng.choice(self.KINDS)
        buf = bytearray(data)
        lo = min(protect_prefix, max(0, len(buf) - 1))
        pos = self.rng.randrange(lo, max(lo + 1, len(buf)))
        if kind == "flip":
            flips = self.rng.randint(1, 8)
            for _ in range(flips):
                p = self.rng.randrange(lo, max(lo + 1, len(buf)))
                if p < len(buf):
                    buf[p] ^= 1 << self.rng.randrange(8)
            return f"flip x{flips}", bytes(buf)
        if kind == "truncate":
            return f"truncate at {pos}", bytes(buf[:pos])
        if kind == "insert":
            extra = bytes(self.rng.randrange(256) for _ in range(self.rng.randint(1, 16)))
            return f"insert {len(extra)} at {pos}", bytes(buf[:pos] + extra + buf[pos:])
        if kind == "overwrite":
            n = self.rng.randint(1, 64)
            fill = bytes(self.rng.choice((0x00, 0xFF, self.rng.randrange(256))) for _ in range(n))
            buf[pos : pos + n] = fill
            return f"overwrite {n} at {pos}", bytes(buf)
        n = self.rng.randint(1, 256)
        return f"duplicate {n} at {pos}", bytes(buf[:pos] + buf[pos : pos + n] + buf[pos:])


# ---- the kill -9 server ---------------------------------------------------------------------
# `python rel_helpers.py PLAN.json` imports torch once, then forks one training process per run of
# the plan. A run's process may SIGKILL itself at a planned point (during a training step's data
# loading, during evaluation, or while writing a checkpoint); the server records how it ended and
# copies the checkpoint files as the kill left them, for the test to inspect.


class _KillSwitch:
    """Tracks the run's position through the trainer's hooks and SIGKILLs at the planned point."""

    def __init__(self, plan: dict[str, Any] | None, start_step: int) -> None:
        self.plan = plan or {}
        self.current = start_step  # global step of the last completed optimiser step
        self.items = {"step": 0, "eval": 0}  # items fetched per phase since that step
        self.armed_replace = False

    def die(self) -> None:
        os.kill(os.getpid(), 9)

    def on_step(self, epoch: int, step: int, global_step: int) -> None:
        self.current, self.items = global_step, {"step": 0, "eval": 0}

    def on_item(self, phase: str) -> None:
        self.items[phase] += 1
        p = self.plan
        if p.get("phase") != phase or self.items[phase] != p["item"]:
            return
        if phase == "step" and self.current == p["global_step"] - 1:
            self.die()
        if phase == "eval" and self.current == p["global_step"]:
            self.die()

    def wants_write_kill(self, payload: Any) -> bool:
        p = self.plan
        return (
            p.get("phase") == "write"
            and isinstance(payload, dict)
            and payload.get("global_step") == p["global_step"]
        )


class _Probe(torch.utils.data.Dataset):
    """A dataset that reports every item it hands out to the kill switch."""

    def __init__(self, inner: Any, switch: _KillSwitch, phase: str) -> None:
        self.inner, self.switch, self.phase = inner, switch, phase

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, index: int) -> Any:
        self.switch.on_item(self.phase)
        return self.inner[index]


def _install_write_kill(switch: _KillSwitch) -> None:
    import io

    real_save, real_replace = torch.save, os.replace

    def save(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        if not switch.wants_write_kill(obj) or not str(getattr(f, "name", "")).count("last.pt"):
            real_save(obj, f, *args, **kwargs)
            return
        if switch.plan["mode"] == "before_rename":
            real_save(obj, f, *args, **kwargs)
            switch.armed_replace = True
            return
        buf = io.BytesIO()
        real_save(obj, buf, *args, **kwargs)
        data = buf.getvalue()
        f.write(data[: len(data) // 2])
        f.flush()
        os.fsync(f.fileno())
        switch.die()

    def replace(src: Any, dst: Any) -> None:
        if switch.armed_replace and str(dst).endswith("last.pt"):
            switch.die()
        real_replace(src, dst)

    torch.save = save
    os.replace = replace


def _train_child(run: dict[str, Any]) -> None:
    from resnext.train import load_checkpoint, train

    cfg = make_config(run["config"])
    last = Path(cfg.output_dir) / "checkpoints" / "last.pt"
    start = int(load_checkpoint(last)["global_step"]) if last.is_file() else 0
    switch = _KillSwitch(run.get("kill"), start)
    _install_write_kill(switch)
    train_set = _Probe(tiny_dataset(run["n_train"], seed=1), switch, "step")
    val_set = _Probe(tiny_dataset(run["n_val"], seed=2), switch, "eval")
    train(cfg, train_set=train_set, val_set=val_set, on_step=switch.on_step)


def _snapshot(folder: Path, dest: Path) -> list[str]:
    import shutil

    dest.mkdir(parents=True, exist_ok=True)
    names = []
    if folder.is_dir():
        for entry in sorted(folder.iterdir()):
            shutil.copyfile(entry, dest / entry.name)
            names.append(entry.name)
    return names


def _preload() -> None:
    """Import once, before forking, what the trainer imports lazily (seconds each on 2 cores)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot
    import torch._dynamo  # noqa: F401  (torch.optim imports it on first use)

    import resnext.train  # noqa: F401


def serve(plan_path: Path) -> None:
    """Run every run of the plan in a forked process; write PLAN.results.json."""
    plan = json.loads(plan_path.read_text())
    _preload()
    results = []
    for i, run in enumerate(plan["runs"]):
        t0 = time.perf_counter()
        pid = os.fork()
        if pid == 0:  # the training process
            code = 0
            try:
                _train_child(run)
            except BaseException as exc:  # report, never fall back into the server loop
                print(f"child failed: {type(exc).__name__}: {exc}", flush=True)
                code = 3
            os._exit(code)
        _, status = os.waitpid(pid, 0)
        folder = Path(run["config"]["output_dir"]) / "checkpoints"
        files = _snapshot(folder, Path(plan["snapshots"]) / f"{i:02d}")
        print(f"run {i}: {time.perf_counter() - t0:.2f}s status {status}", flush=True)
        results.append(
            {
                "signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else 0,
                "exit": os.WEXITSTATUS(status) if os.WIFEXITED(status) else None,
                "files": files,
                "seconds": time.perf_counter() - t0,
            }
        )
    plan_path.with_suffix(".results.json").write_text(json.dumps(results, indent=2))


def ddp_worker(plan_path: Path) -> None:
    """One torchrun worker of a tiny gloo run; rank `kill_rank` SIGKILLs itself on the first try."""
    from resnext.train import train
    from resnext.train.distributed import exit_worker

    plan = json.loads(plan_path.read_text())
    rank = int(os.environ["RANK"])
    first_try = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"

    def on_step(epoch: int, step: int, global_step: int) -> None:
        if first_try and rank == plan["kill_rank"] and global_step == plan["kill_step"]:
            os.kill(os.getpid(), 9)

    cfg = make_config(plan["config"])
    train(
        cfg,
        train_set=tiny_dataset(plan["n_train"], seed=1),
        val_set=tiny_dataset(plan["n_val"], seed=2),
        on_step=on_step,
    )
    # A finished worker's interpreter finalization would leave this mark, for the test to check
    # that it was skipped.
    atexit.register(plan_path.with_name(f"finalized-rank{rank}").touch)
    exit_worker(0)  # as `resnext train` ends under torchrun


if __name__ == "__main__":
    import sys

    if sys.argv[1] == "ddp":
        ddp_worker(Path(sys.argv[2]))
    else:
        serve(Path(sys.argv[1]))
