"""The restricted unpickler refuses code and corrupt input, and reads real CIFAR batches."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest

from resnext.errors import DataError, UnsafeFileError
from resnext.io.safe_pickle import safe_load


class _WritesMarker:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _EvalMarker:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (eval, (f"open({str(self.marker)!r}, 'w').close()",))


@pytest.mark.parametrize(
    "payload_cls, refused", [(_WritesMarker, ".system"), (_EvalMarker, ".eval")]
)
def test_malicious_pickle_is_refused_and_not_run(
    tmp_path: Path, payload_cls: type, refused: str
) -> None:
    marker = tmp_path / "pwned"
    blob = pickle.dumps({"data": [1, 2], "x": payload_cls(marker)}, protocol=2)
    # Sanity: the standard unpickler would really run it.
    pickle.loads(blob)
    assert marker.exists()
    marker.unlink()
    with pytest.raises(UnsafeFileError) as info:
        safe_load(blob, what="evil.pkl")
    assert not marker.exists()
    message = str(info.value)
    assert "evil.pkl" in message
    assert refused in message  # names the refused global (posix.system, __builtin__.eval)


def test_numpy_subclass_and_object_arrays_refused() -> None:
    with pytest.raises(UnsafeFileError):
        safe_load(pickle.dumps(np.array([1, "a"], dtype=object), protocol=2), what="obj.pkl")
    with pytest.raises(UnsafeFileError):
        safe_load(pickle.dumps(np.ma.array([1, 2]), protocol=2), what="masked.pkl")


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
def test_plain_data_and_arrays_round_trip(protocol: int) -> None:
    value = {
        "blobs": {"w": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.float64(2.5)},
        "names": ["a", "b"],
        "t": (1, 2.0, None, True),
        "raw": b"\x00\xff",
    }
    out = safe_load(pickle.dumps(value, protocol=protocol), what="ok.pkl")
    assert out["names"] == ["a", "b"] and out["t"] == (1, 2.0, None, True)
    assert out["raw"] == b"\x00\xff"
    np.testing.assert_array_equal(out["blobs"]["w"], value["blobs"]["w"])
    assert out["blobs"]["b"] == 2.5


def test_truncated_and_garbage_pickles_are_data_errors(tmp_path: Path) -> None:
    blob = pickle.dumps({"data": np.zeros((4, 4), np.uint8)}, protocol=2)
    for bad in (blob[: len(blob) // 2], b"", b"this is not a pickle"):
        with pytest.raises(DataError) as info:
            safe_load(bad, what="broken.pkl")
        assert "broken.pkl" in str(info.value)
        assert not isinstance(info.value, UnsafeFileError)
    with pytest.raises(DataError, match=r"missing\.pkl"):
        safe_load(tmp_path / "missing.pkl", what="missing.pkl")


def test_real_cifar_batch_matches_standard_pickle(cifar10_mini: Path) -> None:
    path = cifar10_mini / "test_batch"
    with open(path, "rb") as f:
        reference = pickle.load(f, encoding="latin1")  # trusted local file: the reference reader
    ours = safe_load(path, what=str(path))
    assert sorted(ours) == sorted(reference)
    np.testing.assert_array_equal(ours["data"], reference["data"])
    assert ours["labels"] == reference["labels"]
    meta = safe_load(cifar10_mini / "batches.meta", what="meta")
    assert meta["label_names"][0] == "airplane"
