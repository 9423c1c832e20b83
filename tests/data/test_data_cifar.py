"""CIFAR reader on the real CIFAR-10 files: folder, parent folder, archive, bad content."""

from __future__ import annotations

import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from resnext.data.cifar import CIFARDataset
from resnext.errors import DataError, UnsafeFileError


def _reference_batch(path: Path) -> dict:
    with open(path, "rb") as f:  # the standard reader on a trusted local file: the reference
        return pickle.load(f, encoding="latin1")


def test_real_cifar10_from_folder_and_parent(cifar10_mini: Path) -> None:
    train = CIFARDataset(cifar10_mini, train=True)
    test = CIFARDataset(cifar10_mini.parent, train=False)
    assert (len(train), len(test)) == (5085, 509)  # SOURCE.md: 5 x 1017 train, 509 test
    assert train.variant == "cifar10" and train.data.shape == (5085, 32, 32, 3)
    assert train.data.dtype == np.uint8
    assert train.classes[:3] == ["airplane", "automobile", "bird"]
    ref = _reference_batch(cifar10_mini / "data_batch_2")
    # Image 1017 is the first of batch 2; row layout is 1024 R, then 1024 G, then 1024 B values.
    row = ref["data"][0]
    for y, x in [(0, 0), (5, 17), (31, 31)]:
        expected = [row[c * 1024 + y * 32 + x] for c in range(3)]
        assert list(train.data[1017, y, x]) == expected
    assert train.targets[1017] == ref["labels"][0]
    ref_test = _reference_batch(cifar10_mini / "test_batch")
    assert test.targets == ref_test["labels"][:509]
    img, label = test[3]
    assert isinstance(img, torch.Tensor) and img.shape == (3, 32, 32)
    row = ref_test["data"][3]
    assert img[1, 2, 3].item() == pytest.approx(row[1024 + 2 * 32 + 3] / 255)
    assert label == ref_test["labels"][3]
    counts = np.bincount(train.targets, minlength=10)
    assert counts.sum() == 5085 and (counts > 0).all()


def test_cifar_from_archive(cifar10_mini: Path, tmp_path: Path) -> None:
    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz", compresslevel=1) as tar:
        tar.add(cifar10_mini / "batches.meta", arcname="cifar-10-batches-py/batches.meta")
        tar.add(cifar10_mini / "test_batch", arcname="cifar-10-batches-py/test_batch")
    test = CIFARDataset(archive, train=False)
    assert len(test) == 509
    assert test.folder == tmp_path / "cifar-10-python-extracted" / "cifar-10-batches-py"
    direct = CIFARDataset(cifar10_mini, train=False)
    np.testing.assert_array_equal(test.data, direct.data)
    again = CIFARDataset(tmp_path, train=False)  # a folder holding the archive: reuses the cache
    assert again.folder == test.folder
    with pytest.raises(DataError, match="data_batch_1"):  # the archive holds no training batches
        CIFARDataset(archive, train=True)


def _write(path: Path, obj: object) -> None:
    path.write_bytes(pickle.dumps(obj, protocol=2))


def _fake_cifar10(folder: Path, data: object, labels: object) -> Path:
    folder.mkdir()
    _write(folder / "batches.meta", {"label_names": [f"c{i}" for i in range(10)]})
    _write(folder / "test_batch", {"data": data, "labels": labels})
    return folder


def test_bad_content_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no CIFAR data found"):
        CIFARDataset(tmp_path, train=False)
    with pytest.raises(DataError, match="does not exist"):
        CIFARDataset(tmp_path / "nope", train=False)
    good = np.zeros((2, 3072), np.uint8)
    cases = {
        "shape": (np.zeros((2, 100), np.uint8), [0, 1]),
        "labels": (good, [0]),
        "outside 0..9": (good, [0, 10]),
    }
    for i, (match, (data, labels)) in enumerate(cases.items()):
        folder = _fake_cifar10(tmp_path / f"case{i}", data, labels)
        with pytest.raises(DataError, match=match):
            CIFARDataset(folder, train=False)
    folder = _fake_cifar10(tmp_path / "ok", good, [0, 9])
    assert len(CIFARDataset(folder, train=False)) == 2
    with pytest.raises(DataError, match="data_batch_1"):
        CIFARDataset(folder, train=True)
    (folder / "test_batch").write_bytes(b"\x80\x02}q\x00(X")  # truncated pickle
    with pytest.raises(DataError, match="test_batch"):
        CIFARDataset(folder, train=False)


def test_cifar_pickle_with_code_is_refused(tmp_path: Path) -> None:
    class Evil:
        def __reduce__(self):
            return (print, ("hi",))

    folder = _fake_cifar10(tmp_path / "evil", Evil(), [0])
    with pytest.raises(UnsafeFileError, match="print"):
        CIFARDataset(folder, train=False)


def test_cifar100_layout(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    _write(
        folder / "meta",
        {
            "fine_label_names": [f"f{i}" for i in range(100)],
            "coarse_label_names": [f"k{i}" for i in range(20)],
        },
    )
    data = np.arange(2 * 3072, dtype=np.int64).astype(np.uint8).reshape(2, 3072)
    batch = {"data": data, "fine_labels": [99, 5], "coarse_labels": [19, 3]}
    _write(folder / "train", batch)
    _write(folder / "test", batch)
    ds = CIFARDataset(tmp_path, train=True)
    assert ds.variant == "cifar100" and ds.targets == [99, 5] and len(ds.classes) == 100
    coarse = CIFARDataset(tmp_path, train=False, label_kind="coarse")
    assert coarse.targets == [19, 3] and coarse.classes[19] == "k19"
    assert ds.data[1, 0, 1, 2] == data[1, 2 * 1024 + 1]
    with pytest.raises(DataError, match="cifar-10-batches-py"):
        CIFARDataset(tmp_path, train=True, variant="cifar10")


@pytest.mark.parametrize(
    "labels", [None, [0, 3.7], [0, "3"], [True, False], 5, np.array([0.0, 3.0])]
)
def test_labels_that_are_not_integers_are_refused(tmp_path: Path, labels: object) -> None:
    # int() would have read 3.7 as 3 and "3" as 3: a label is an integer class index or an error
    folder = _fake_cifar10(tmp_path / "c", np.zeros((2, 3072), np.uint8), labels)
    with pytest.raises(DataError, match=r"test_batch: 'labels' must be a list of integer"):
        CIFARDataset(folder, train=False)


def test_numpy_integer_labels_are_read(tmp_path: Path) -> None:
    data = np.zeros((3, 3072), np.uint8)
    folder = _fake_cifar10(tmp_path / "c", data, np.array([0, 9, 4], dtype=np.int64))
    assert CIFARDataset(folder, train=False).targets == [0, 9, 4]


@pytest.mark.parametrize("names", [5, None, [f"c{i}" for i in range(9)] + [7]])
def test_class_names_that_are_not_strings_are_refused(tmp_path: Path, names: object) -> None:
    folder = _fake_cifar10(tmp_path / "c", np.zeros((2, 3072), np.uint8), [0, 1])
    _write(folder / "batches.meta", {"label_names": names})
    with pytest.raises(DataError, match=r"batches.meta: 'label_names' must be a list of class"):
        CIFARDataset(folder, train=False)
