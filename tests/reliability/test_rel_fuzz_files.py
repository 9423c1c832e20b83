"""Seeded mutation fuzzing of real files: every outcome is a result or one of the project's errors."""

from __future__ import annotations

import io
import random
import re
import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch
from rel_helpers import Mutator, record

from resnext import create_model
from resnext.data import CIFARDataset, load_rgb
from resnext.errors import ResNeXtError, WeightsError
from resnext.io import safe_load
from resnext.train import load_checkpoint
from resnext.weights import read_weights_file, save_weights
from resnext.weights.t7 import load_t7

SEED = 1234


def splice(mutator: Mutator, rng: random.Random, data: bytes) -> tuple[str, bytes]:
    """Mutate the head, the tail or anywhere (headers and trailers are where parsers break)."""
    region = rng.choice(("head", "tail", "any"))
    cut = min(len(data), 4096)
    if region == "head":
        what, head = mutator.mutate(data[:cut])
        return f"head {what}", head + data[cut:]
    if region == "tail":
        what, tail = mutator.mutate(data[-cut:])
        return f"tail {what}", data[:-cut] + tail
    return mutator.mutate(data)


def fuzz(
    name: str,
    original: bytes,
    target: Path,
    read,
    cases: int,
    seed: int = SEED,
) -> Counter:
    """Write `cases` mutations of `original` to `target`, call read(target) on each, tally outcomes."""
    rng, mutator = random.Random(seed), Mutator(seed)
    outcomes: Counter = Counter()
    for i in range(cases):
        what, data = splice(mutator, rng, original)
        target.write_bytes(data)
        try:
            read(target)
        except ResNeXtError as exc:
            assert str(exc), f"{name} case {i} ({what}): empty message"
            outcomes[type(exc).__name__] += 1
        except Exception as exc:  # anything else is a failure of the reader: report the case
            pytest.fail(f"{name} case {i} ({what}): {type(exc).__name__}: {exc}")
        else:
            outcomes["result"] += 1
    record(f"fuzz_{name}", cases, **outcomes)
    return outcomes


def test_fuzz_image_loader_with_real_jpegs(tmp_path: Path, imagenet_sample: Path) -> None:
    files = sorted(imagenet_sample.glob("*.JPEG"))
    rng = random.Random(SEED)
    total: Counter = Counter()
    for k, path in enumerate(rng.sample(files, 4)):
        total += fuzz(f"jpeg_{k}", path.read_bytes(), tmp_path / "x.JPEG", load_rgb, 10, SEED + k)
    assert total["DataError"] > 0 and total["result"] > 0  # both outcomes were reached


def test_fuzz_cifar_reader_with_real_batches(tmp_path: Path, cifar10_mini: Path) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    shutil.copyfile(cifar10_mini / "batches.meta", folder / "batches.meta")
    test_batch = (cifar10_mini / "test_batch").read_bytes()

    def read_dataset(_: Path) -> None:
        ds = CIFARDataset(folder, train=False)
        assert len(ds) == len(ds.targets) and ds.data.shape[1:] == (32, 32, 3)

    batch = fuzz("cifar_batch", test_batch, folder / "test_batch", read_dataset, 12)
    (folder / "test_batch").write_bytes(test_batch)
    meta = fuzz(
        "cifar_meta",
        (cifar10_mini / "batches.meta").read_bytes(),
        folder / "batches.meta",
        read_dataset,
        12,
    )
    pickles = fuzz(
        "cifar_pickle",
        test_batch[:8192],
        tmp_path / "partial",
        lambda p: safe_load(p, what=str(p)),
        12,
    )
    assert sum((batch + meta + pickles).values()) == 36


def test_fuzz_t7_reader_with_the_real_torch7_file(tmp_path: Path, t7_sample: Path) -> None:
    original = (t7_sample / "linear_2x10.t7").read_bytes()
    outcomes = fuzz("t7", original, tmp_path / "net.t7", load_t7, 40)
    assert outcomes["WeightsError"] > 0 and outcomes["result"] > 0


def test_t7_file_of_another_network_is_refused_by_name(t7_sample: Path) -> None:
    path = t7_sample / "linear_2x10.t7"
    with pytest.raises(WeightsError, match=re.escape("linear_2x10.t7")):
        read_weights_file(path)


def test_t7_table_keyed_by_a_tensor_is_a_weights_error(tmp_path: Path, t7_sample: Path) -> None:
    # The first mutation of the fuzz run above (seed 1234) gives such a file.
    rng, mutator = random.Random(SEED), Mutator(SEED)
    _, data = splice(mutator, rng, (t7_sample / "linear_2x10.t7").read_bytes())
    path = tmp_path / "net.t7"
    path.write_bytes(data)
    with pytest.raises(WeightsError, match=re.escape("net.t7")):
        load_t7(path)


def test_fuzz_checkpoint_and_native_weights_readers(tmp_path: Path) -> None:
    model = create_model("resnext_tiny", num_classes=4)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "global_step": 1}, buf)
    fuzz("checkpoint", buf.getvalue(), tmp_path / "last.pt", load_checkpoint, 20)
    path = tmp_path / "w.safetensors"
    save_weights(model, path, preprocessing=None, class_names=None, provenance={"source": "t"})
    outcomes = fuzz("native_weights", path.read_bytes(), path, read_weights_file, 15)
    assert outcomes["result"] == 0  # the sidecar's sha256 catches every change
