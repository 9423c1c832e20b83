"""The command-line options the benchmark scripts share, each defined once."""

from __future__ import annotations

import argparse
import ctypes
from collections.abc import Callable
from pathlib import Path

import resnext

RESULTS = Path(__file__).resolve().parent / "results"  # where every script writes its JSON


def int_list(text: str) -> list[int]:
    """An option's comma-separated integers (`--batches 1,16`); otherwise argparse's error naming
    the option, before the script does anything."""
    try:
        return [int(value) for value in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None


def parser(
    doc: str | None,
    *,
    models: str | None = None,
    batch: int | None = None,
    image_size: int | None = None,
    rounds: int | None = None,
    dtypes: str | None = None,
) -> argparse.ArgumentParser:
    """A parser described by the first line of the script's docstring `doc`, with `--out` and
    each shared option whose default is given here (None leaves the option out)."""
    out = argparse.ArgumentParser(description=doc.splitlines()[0] if doc else None)
    if models is not None:
        out.add_argument(
            "--models", type=registry_names, default=models, help="registry names, comma-separated"
        )
    if batch is not None:
        out.add_argument("--batch", type=int, default=batch)
    if image_size is not None:
        out.add_argument("--image-size", type=int, default=image_size)
    if rounds is not None:
        out.add_argument("--rounds", type=int, default=rounds, help="interleaved timing rounds")
    if dtypes is not None:
        out.add_argument("--dtypes", default=dtypes, help="fp32 and/or bf16, comma-separated")
    out.add_argument("--out", type=Path, default=RESULTS, help="folder for the results JSON")
    return out


def registry_names(models: str) -> str:
    """`models` as given when the registry has each of its comma-separated names; otherwise
    argparse's error naming the ones it lacks, so a script stops before it does anything."""
    unknown = sorted(set(models.split(",")) - set(resnext.list_models()))
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown {unknown} (`resnext list` shows them all)")
    return models


def pointwise_against(path: Path | None) -> tuple[ctypes.CDLL | None, str | None]:
    """(`kernels/pointwise_gemm.c` built from another source `path`, None), (None, None) without
    one, or (None, the message refusing it: no such file, or its build failed)."""
    from resnext.speed import pointwise_gemm

    return kernel_against(path, pointwise_gemm.load, "pointwise_gemm.c")


def kernel_against(
    path: Path | None, load: Callable[..., ctypes.CDLL], name: str
) -> tuple[ctypes.CDLL | None, str | None]:
    """(the kernel `name` built by `load(source=...)` from another source `path`, None), (None,
    None) without one, or (None, the message refusing it: no such file, or its build failed)."""
    from resnext.native import NativeUnavailable

    if path is None:
        return None, None
    if not path.is_file():
        return None, f"--against {path}: no such file (expected a {name} source)"
    try:
        return load(source=path.resolve()), None
    except NativeUnavailable as exc:  # e.g. a source that does not compile
        return None, f"--against {path}: {exc}"


def kernel_or_refusal(
    path: Path | None,
    load: Callable[..., ctypes.CDLL],
    name: str,
    unavailable_reason: Callable[[], str | None],
) -> tuple[ctypes.CDLL | None, str | None]:
    """For a layer bench of one kernel: (`path`'s build of it or None, None) where the kernel runs
    here, else (None, the message refusing the run): `kernel_against`'s first, so that a missing
    or broken other source is named before anything runs, then why the kernel cannot run."""
    against, refused = kernel_against(path, load, name)
    if refused:
        return None, refused
    reason = unavailable_reason()
    if reason is not None:
        return None, f"the kernel cannot run here: {reason}"
    return against, None
