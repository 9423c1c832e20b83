"""Hostile pickles, tar archives and checkpoints: refused, no code run, nothing written outside."""

from __future__ import annotations

import io
import os
import pickle
import re
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from rel_helpers import record, tiny_config, tiny_dataset

from resnext.data import CIFARDataset
from resnext.errors import CheckpointError, DataError, UnsafeFileError, WeightsError
from resnext.io import safe_extract, safe_load
from resnext.train import load_checkpoint, train
from resnext.weights import read_weights_file


class RunsCommand:
    """Pickles as a call to os.system: unpickling it would create the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class RunsEval:
    """Pickles as builtins.eval of code that would create the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (eval, (f"open({str(self.marker)!r}, 'w')",))


def hostile_pickles(marker: Path) -> dict[str, bytes]:
    """Pickles that try to run code, in the shapes a CIFAR batch or a checkpoint could take."""
    labels = [0, 1]
    data = np.zeros((2, 3072), dtype=np.uint8)
    return {
        "os.system": pickle.dumps(RunsCommand(marker), protocol=2),
        "eval": pickle.dumps(RunsEval(marker), protocol=4),
        "batch with os.system": pickle.dumps(
            {"data": data, "labels": labels, "x": RunsCommand(marker)}, protocol=2
        ),
        "object array": pickle.dumps(np.array([RunsCommand(marker)], dtype=object), protocol=2),
    }


def test_hostile_pickles_are_refused_and_run_nothing(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    cases = hostile_pickles(marker)
    for name, blob in cases.items():
        with pytest.raises(UnsafeFileError, match="refused"):
            safe_load(blob, what=f"pickle {name}")
        assert not marker.exists(), f"{name}: code ran"
    record("hostile_pickles", len(cases))


def cifar_folder(root: Path, batch: bytes) -> Path:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    names = [f"c{i}".encode() for i in range(10)]
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": names}, protocol=2))
    for name in ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5"):
        (folder / name).write_bytes(batch)
    return folder


def test_cifar_batch_calling_os_system_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    blob = hostile_pickles(marker)["batch with os.system"]
    folder = cifar_folder(tmp_path / "cifar", blob)
    with pytest.raises(UnsafeFileError) as info:
        CIFARDataset(folder, train=True)
    assert "data_batch_1" in str(info.value) and "os.system" in str(info.value).replace(
        "posix", "os"
    )
    assert not marker.exists()


def test_hostile_checkpoints_and_weights_are_refused_and_run_nothing(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    tried = 0
    for name, payload in {"pt": RunsCommand(marker), "dict": {"model": RunsEval(marker)}}.items():
        path = tmp_path / f"evil-{name}.pth"
        torch.save(payload, path)
        with pytest.raises(WeightsError) as info:
            read_weights_file(path)
        assert isinstance(info.value, UnsafeFileError) and str(path) in str(info.value)
        with pytest.raises(CheckpointError, match=re.escape(str(path))):
            load_checkpoint(path)
        tried += 2
    detectron = tmp_path / "evil.pkl"
    detectron.write_bytes(pickle.dumps({"model": RunsCommand(marker)}, protocol=2))
    with pytest.raises(UnsafeFileError):
        read_weights_file(detectron)
    assert not marker.exists()
    record("hostile_weights_files", tried + 1)


def test_resume_from_a_hostile_last_checkpoint_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    cfg = tiny_config(tmp_path / "run", train={"epochs": 1})
    last = tmp_path / "run" / "checkpoints" / "last.pt"
    last.parent.mkdir(parents=True)
    torch.save({"model": RunsCommand(marker), "format": "resnext-train-checkpoint/1"}, last)
    with pytest.raises(CheckpointError, match=re.escape("last.pt")):
        train(cfg, train_set=tiny_dataset(32), val_set=tiny_dataset(8, seed=2))
    assert not marker.exists()


def _tar(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]], mode: str = "w") -> Path:
    with tarfile.open(path, mode) as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def _file(name: str, data: bytes = b"x") -> tuple[tarfile.TarInfo, bytes]:
    return tarfile.TarInfo(name), data


def _link(name: str, target: str, kind: bytes) -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info, None


def hostile_tars(outside: Path) -> dict[str, list]:
    return {
        "dot-dot": [_file("ok.txt"), _file("../escaped.txt")],
        "deep dot-dot": [_file("a/b/../../../escaped.txt")],
        "absolute": [_file(str(outside / "escaped.txt"))],
        "symlink out": [_link("ln", str(outside), tarfile.SYMTYPE)],
        "relative symlink out": [_link("ln", "../../outside", tarfile.SYMTYPE)],
        "write through symlink": [_link("ln", ".", tarfile.SYMTYPE), _file("ln/../x.txt")],
        "hardlink out": [_link("hl", "../escaped.txt", tarfile.LNKTYPE)],
        "device": [(_special("dev", tarfile.CHRTYPE), None)],
        "fifo": [(_special("fifo", tarfile.FIFOTYPE), None)],
    }


def _special(name: str, kind: bytes) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    return info


def test_hostile_tar_members_are_refused_and_nothing_escapes(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    cases = hostile_tars(outside)
    for name, members in cases.items():
        work = tmp_path / name.replace(" ", "_")
        work.mkdir()
        archive = _tar(work / "a.tar", members)
        target = work / "deep" / "target"
        with pytest.raises(UnsafeFileError) as info:
            safe_extract(archive, target)
        assert str(archive) in str(info.value), name
        assert not target.exists(), f"{name}: a refused archive left its target"
        assert list(outside.iterdir()) == [], f"{name}: wrote outside the target"
        leftovers = [p.name for p in (work / "deep").iterdir()] if (work / "deep").exists() else []
        assert leftovers == [], f"{name}: staging left behind: {leftovers}"
        assert not (work / "escaped.txt").exists() and not (tmp_path / "escaped.txt").exists()
    record("hostile_tar_archives", len(cases))


def test_tar_bombs_are_refused(tmp_path: Path) -> None:
    many = _tar(tmp_path / "many.tar", [_file(f"f{i}") for i in range(50)])
    with pytest.raises(UnsafeFileError, match="more than 20 members"):
        safe_extract(many, tmp_path / "t1", max_members=20)
    zeros = b"\0" * (4 << 20)  # 4 MiB of zeros: a few KiB compressed
    big = _tar(tmp_path / "big.tar.gz", [_file("a.bin", zeros), _file("b.bin", zeros)], "w:gz")
    assert big.stat().st_size < 64 * 1024
    with pytest.raises(UnsafeFileError, match="exceeds"):
        safe_extract(big, tmp_path / "t2", max_total_bytes=6 << 20)
    assert not (tmp_path / "t1").exists() and not (tmp_path / "t2").exists()
    record("tar_bombs", 2)


def test_cifar_archive_with_escaping_member_is_refused(tmp_path: Path) -> None:
    archive = _tar(
        tmp_path / "cifar-10-python.tar.gz",
        [_file("cifar-10-batches-py/batches.meta"), _file("../../pwned.txt")],
        "w:gz",
    )
    with pytest.raises(UnsafeFileError, match=r"\.\./\.\./pwned\.txt"):
        CIFARDataset(archive, train=True, extract_dir=tmp_path / "x" / "extracted")
    assert not (tmp_path / "pwned.txt").exists() and not (tmp_path / "x" / "extracted").exists()
    shutil.rmtree(tmp_path / "x", ignore_errors=True)


def test_garbage_in_place_of_archive_is_a_data_error(tmp_path: Path) -> None:
    path = tmp_path / "cifar-10-python.tar.gz"
    path.write_bytes(b"\x1f\x8b" + os.urandom(500))
    with pytest.raises(DataError, match=re.escape(str(path))):
        safe_extract(path, tmp_path / "t")
    assert not (tmp_path / "t").exists()
