"""Checkpoint and weights files under faults: failed writes, truncation, bit flips."""

from __future__ import annotations

import errno
import io
import os
import random
import re
import resource
import signal
from pathlib import Path

import pytest
import torch
from rel_helpers import record, tiny_config, tiny_dataset

from resnext import create_model
from resnext.errors import CheckpointError, ConfigError, WeightsError
from resnext.train import atomic_save, load_checkpoint, train
from resnext.weights import load_native, read_weights_file, save_weights


def _fail_save_at(monkeypatch: pytest.MonkeyPatch, global_step: int) -> list[str]:
    """Make torch.save write half the bytes of the checkpoint at `global_step`, then hit ENOSPC."""
    real_save = torch.save
    hits: list[str] = []

    def save(obj, f, *args, **kwargs):
        if isinstance(obj, dict) and obj.get("global_step") == global_step:
            hits.append(str(getattr(f, "name", f)))
            buf = io.BytesIO()
            real_save(obj, buf)
            f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    return hits


def test_disk_full_during_checkpoint_write_stops_run_and_keeps_previous(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = tiny_config(tmp_path / "run", train={"epochs": 1})
    hits = _fail_save_at(monkeypatch, 3)
    with pytest.raises(CheckpointError) as info:
        train(cfg, train_set=tiny_dataset(64), val_set=tiny_dataset(16, seed=2))
    assert hits, "the injected fault was never reached"
    message = str(info.value)
    assert "last.pt" in message and "write failed" in message and "No space left" in message
    folder = tmp_path / "run" / "checkpoints"
    assert load_checkpoint(folder / "last.pt")["global_step"] == 2  # the previous one, intact
    assert [p.name for p in folder.iterdir()] == ["last.pt"]  # no half-written file left


def test_a_checkpoint_folder_that_is_a_file_is_named(tmp_path: Path) -> None:
    # Refused before the run starts, and by a save that meets it later, by name.
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoints").write_text("")
    cfg = tiny_config(run, train={"epochs": 1})
    with pytest.raises(ConfigError, match=r"checkpoints exists and is not a folder"):
        train(cfg, train_set=tiny_dataset(32), val_set=tiny_dataset(16, seed=2))
    with pytest.raises(CheckpointError, match=r"checkpoint .*last\.pt: write failed"):
        atomic_save({"global_step": 1}, run / "checkpoints" / "last.pt")
    assert (run / "checkpoints").read_text() == ""


def test_file_size_limit_in_a_process_keeps_previous_checkpoint(tmp_path: Path) -> None:
    """RLIMIT_FSIZE (the kernel's own 'file too large') in a forked writer: old file survives."""
    path = tmp_path / "last.pt"
    small = {"model": {"w": torch.zeros(4)}, "global_step": 1}
    atomic_save(small, path)
    before = path.read_bytes()
    big = {"model": {"w": torch.ones(200_000)}, "global_step": 2}
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the writer, limited to 64 KiB per file
        code = 1
        try:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get EFBIG instead of being killed
            resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))
            atomic_save(big, path)
        except CheckpointError as exc:
            os.write(write_end, str(exc).encode()[:2000])
            code = 2
        finally:
            os._exit(code)
    os.close(write_end)
    _, status = os.waitpid(pid, 0)
    message = os.read(read_end, 4096).decode()
    os.close(read_end)
    assert os.WEXITSTATUS(status) == 2, message
    assert str(path) in message and "previous file kept" in message
    assert path.read_bytes() == before
    assert load_checkpoint(path)["global_step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]


@pytest.fixture(scope="module")
def checkpoint_bytes(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """A real training checkpoint of resnext_tiny (one epoch of 2 steps)."""
    out = tmp_path_factory.mktemp("ckpt")
    cfg = tiny_config(out / "run", train={"epochs": 1, "checkpoint_every": 0})
    result = train(cfg, train_set=tiny_dataset(32), val_set=tiny_dataset(8, seed=2))
    return result.last_checkpoint.read_bytes()


def test_truncated_checkpoint_is_refused_by_name(tmp_path: Path, checkpoint_bytes: bytes) -> None:
    rng = random.Random(7)
    cuts = [0, 1, 100, len(checkpoint_bytes) - 1, *rng.sample(range(len(checkpoint_bytes)), 16)]
    for cut in cuts:
        path = tmp_path / f"cut-{cut}.pt"
        path.write_bytes(checkpoint_bytes[:cut])
        with pytest.raises(CheckpointError) as info:
            load_checkpoint(path)
        assert str(path) in str(info.value).splitlines()[0]
    record("truncated_checkpoints", len(cuts))


def test_resume_from_truncated_last_checkpoint_refuses_and_keeps_it(
    tmp_path: Path, checkpoint_bytes: bytes
) -> None:
    cfg = tiny_config(tmp_path / "run", train={"epochs": 2})
    last = tmp_path / "run" / "checkpoints" / "last.pt"
    last.parent.mkdir(parents=True)
    last.write_bytes(checkpoint_bytes[: len(checkpoint_bytes) // 3])
    with pytest.raises(CheckpointError, match=re.escape("last.pt")):
        train(cfg, train_set=tiny_dataset(32), val_set=tiny_dataset(8, seed=2))
    assert last.read_bytes() == checkpoint_bytes[: len(checkpoint_bytes) // 3]


def test_bit_flipped_checkpoint_is_detected(tmp_path: Path, checkpoint_bytes: bytes) -> None:
    rng = random.Random(11)
    undetected = []
    for i in range(10):
        data = bytearray(checkpoint_bytes)
        pos = rng.randrange(len(data) // 4, len(data) * 3 // 4)  # inside the tensor records
        data[pos] ^= 1 << rng.randrange(8)
        path = tmp_path / f"flip-{i}.pt"
        path.write_bytes(bytes(data))
        try:
            load_checkpoint(path)
        except CheckpointError as exc:
            assert str(path) in str(exc)
        else:
            undetected.append(pos)
    assert undetected == [], f"bit flips at {undetected} were loaded without an error"


@pytest.fixture
def native_weights(tmp_path: Path) -> Path:
    model = create_model("resnext_tiny", num_classes=4)
    path = tmp_path / "tiny.safetensors"
    save_weights(model, path, preprocessing=None, class_names=None, provenance={"source": "test"})
    return path


def test_native_weights_truncated_or_bit_flipped_are_refused_by_name(native_weights: Path) -> None:
    original = native_weights.read_bytes()
    rng = random.Random(3)
    tried = 0
    for _ in range(6):
        native_weights.write_bytes(original[: rng.randrange(len(original))])
        with pytest.raises(WeightsError, match="truncated"):
            load_native(native_weights)
        tried += 1
    for _ in range(6):
        data = bytearray(original)
        data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        native_weights.write_bytes(bytes(data))
        with pytest.raises(WeightsError) as info:
            read_weights_file(native_weights)
        assert str(native_weights) in str(info.value) and "sha256" in str(info.value)
        tried += 1
    native_weights.write_bytes(original)
    assert load_native(native_weights).state_dict  # the intact file still loads
    record("corrupt_native_weights", tried)


def test_truncated_pth_and_t7_weights_are_refused_by_name(tmp_path: Path, t7_sample: Path) -> None:
    model = create_model("resnext_tiny", num_classes=4)
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    sources = {"tiny.pth": buf.getvalue(), "net.t7": (t7_sample / "linear_2x10.t7").read_bytes()}
    tried = 0
    rng = random.Random(5)
    for name, data in sources.items():
        for cut in [1, 10, *rng.sample(range(11, len(data)), 5)]:
            path = tmp_path / f"{cut}-{name}"
            path.write_bytes(data[:cut])
            with pytest.raises(WeightsError) as info:
                read_weights_file(path)
            assert str(path) in str(info.value), str(info.value)
            tried += 1
    record("truncated_weights_files", tried)


def test_zero_byte_pth_weights_file_is_refused_by_name(tmp_path: Path) -> None:
    path = tmp_path / "empty.pth"
    path.write_bytes(b"")
    with pytest.raises(WeightsError, match=re.escape("empty.pth")):
        read_weights_file(path)
