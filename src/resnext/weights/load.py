"""Read weights from a file of any supported format or a table tag, and apply them to a model.

Reading never executes code from the file: PyTorch pickles go through ``torch.load(weights_only=True)``,
detectron2 pickles through the project's restricted unpickler, Torch7 files through a data-only
reader, safetensors through a validated header.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import re
import struct
import warnings
from collections.abc import Container
from pathlib import Path
from typing import Any

import torch

from resnext.errors import ResNeXtError, UnsafeFileError, WeightsError
from resnext.io.zip_check import is_zip, zip_problem
from resnext.weights.download import download
from resnext.weights.errors import UnsafeWeightsError
from resnext.weights.formats import convert_checkpoint
from resnext.weights.loaded import LoadedWeights
from resnext.weights.native import FORMAT_NAME, load_native, read_safetensors, sidecar_path
from resnext.weights.t7 import load_t7
from resnext.weights.t7_mapping import map_resnext
from resnext.weights.table import WEIGHTS, WeightsEntry, default_weights, get_weights

_FILE_SUFFIXES = (".pth", ".pt", ".pyth", ".bin", ".ckpt", ".pkl", ".t7", ".safetensors", ".json")
_LIST_LIMIT = 12


def _is_native(path: Path) -> bool:
    side = path if path.suffix == ".json" else sidecar_path(path)
    if not side.is_file():
        return False
    try:
        return FORMAT_NAME in side.read_text(errors="replace")[:4096]
    except OSError:
        return False


def _looks_like_t7(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(12)
    # A Torch7 object starts with a TORCH (4) or TABLE (3) tag and a positive reference index.
    return (
        len(head) == 12
        and head[:4] in (b"\x04\0\0\0", b"\x03\0\0\0")
        and head[4:8] == b"\x01\0\0\0"
    )


def _torch_load(path: Path) -> Any:
    if path.stat().st_size == 0:
        raise WeightsError(f"{path}: empty file (0 bytes); expected a PyTorch checkpoint")
    if is_zip(path):
        problem = zip_problem(path)
        if problem is not None:
            raise WeightsError(
                f"{path}: not a readable PyTorch checkpoint: {problem}. Download or copy it again."
            )
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if not _CODE_REFUSAL.search(str(exc)):
            # A malformed pickle (garbage, a truncated legacy file) is damage, not a threat.
            raise WeightsError(
                f"{path}: not a readable PyTorch checkpoint (its pickle is malformed: "
                f"{_unpickler_detail(exc)}). Download or copy it again."
            ) from None
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))
        what = f" (it references {found.group(1)})" if found else ""
        raise UnsafeWeightsError(
            f"{path}: refused: the file's pickle asks to import or call Python code{what}, which a "
            "weights file never needs and which could run anything on this machine. It was not "
            "executed. If you trust the file, re-save only its tensors (a state dict) with the "
            "program that wrote it."
        ) from None
    except (
        RuntimeError,
        EOFError,
        ValueError,
        OSError,
        # what torch's unpicklers raise on damaged bytes (a text file, a flipped opcode)
        KeyError,
        IndexError,
        TypeError,
        AssertionError,
        struct.error,
    ) as exc:
        raise WeightsError(
            f"{path}: not a readable PyTorch checkpoint ({type(exc).__name__}: "
            f"{_first_line(exc)}); expected a file written by torch.save"
        ) from None


# What torch's weights-only unpickler says when a pickle asks for a global, a call or an object.
_CODE_REFUSAL = re.compile(r"GLOBAL|reduce for unrecognized|create new object|Can only build")


def _unpickler_detail(exc: BaseException) -> str:
    """The unpickler's own reason, without torch's advice around it."""
    found = re.search(r"WeightsUnpickler error:\s*(.+?)\s*(?:\n\n|$)", str(exc), re.S)
    return found.group(1) if found else _first_line(exc)


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def _read_pickle(path: Path) -> Any:
    from resnext.io.safe_pickle import safe_load  # the project's restricted unpickler

    try:
        with open(path, "rb") as f:
            return safe_load(f, what=f"detectron2 weights {path}")
    # safe_load's messages already name the file ("detectron2 weights PATH: refused: ...").
    except UnsafeFileError as exc:
        raise UnsafeWeightsError(str(exc)) from None
    except ResNeXtError as exc:
        raise WeightsError(str(exc)) from None
    except OSError as exc:
        raise WeightsError(f"cannot read {path}: {exc}") from None


def read_weights_file(path: str | Path, *, payload: Any = None) -> LoadedWeights:
    """Read and convert one weights file; the format is recognised from its suffix and content.
    `payload`, where not None, is what ``torch.load(path, weights_only=True)`` already returned
    for it, so that a caller that looked inside the file does not read it a second time."""
    path = Path(path)
    try:
        if payload is not None:
            return convert_checkpoint(payload, str(path))
        return _read_weights_file(path)
    except WeightsError as exc:
        if str(path) in str(exc):
            raise
        # Converters describe the content; the user also needs to know which file it was.
        raise type(exc)(f"{path}: {exc}") from None


def _read_weights_file(path: Path) -> LoadedWeights:
    if not path.is_file():
        raise WeightsError(f"weights file {path} does not exist or is not a file")
    if path.suffix in (".safetensors", ".json") and _is_native(path):
        return load_native(path)
    if path.suffix == ".safetensors":
        return convert_checkpoint(read_safetensors(path), str(path))
    if path.suffix == ".t7" or _looks_like_t7(path):
        state, overrides = map_resnext(load_t7(path))
        return LoadedWeights(
            state_dict=state,
            source_format="lua_t7",
            source=str(path),
            spec_overrides=overrides,
        )
    with open(path, "rb") as f:
        is_zip = f.read(2) == b"PK"  # torch.save's zip container, whatever the suffix
    obj = _read_pickle(path) if path.suffix == ".pkl" and not is_zip else _torch_load(path)
    return convert_checkpoint(obj, str(path))


def fetch(
    entry: WeightsEntry, cache_dir: str | Path | None = None, *, progress: bool = False
) -> Path:
    """The table entry's file in the download cache, downloaded and checked first if needed
    (`progress`: shown on stderr); an entry without a published hash warns each time that it
    cannot be checked."""
    with warnings.catch_warnings():
        if not entry.verified:
            warnings.simplefilter("always")
        return download(
            entry.url,
            expected_hash=entry.hash,
            hash_kind=entry.hash_kind,
            cache_dir=cache_dir,
            progress=progress,
        )


def weights_path(source: str | Path, tags: Container[str], what: str) -> Path | None:
    """`source` as a file where it names one, None where it can only be one of `tags`; a name
    that looks like a file and is neither is an error naming it (`what`: "weights", ...)."""
    text = str(source)
    if isinstance(source, Path) or os.path.exists(text):
        return Path(source)
    if text not in tags and (os.sep in text or text.endswith(_FILE_SUFFIXES)):
        raise WeightsError(f"{what} file {text} does not exist, nor is it one of the {what} tags")
    return None


def table_entry(source: str | Path, model_name: str | None = None) -> WeightsEntry | None:
    """The weights-table entry `source` names (a tag, or 'DEFAULT': `model_name`'s default tag),
    or None where `source` is a file; an unknown tag, an int8 tag (which a float model cannot
    take) or 'DEFAULT' without a model is a WeightsError."""
    if weights_path(source, WEIGHTS, "weights") is not None:
        return None
    text = str(source)
    if text == "DEFAULT":
        if model_name is None:
            raise WeightsError(
                "weights 'DEFAULT': each model has its own default weights; expected a model name"
            )
        text = default_weights(model_name)
    from resnext.weights.int8 import INT8_WEIGHTS  # it builds on this module

    if text in INT8_WEIGHTS:
        raise WeightsError(
            f"{text} is an int8 (quantized) checkpoint, which a float model cannot take: load it "
            "with resnext.weights.build_int8_with_weights (resnext predict and eval take it as is)"
        )
    return get_weights(text)  # an unknown tag raises, naming the closest tags


def prefetch(source: str | Path, model_name: str, *, progress: bool = False) -> None:
    """Download `source` into the weights cache where it is a weights-table tag (or 'DEFAULT',
    `model_name`'s default tag); a file, or a tag already cached, is left as it is."""
    entry = table_entry(source, model_name)
    if entry is not None:
        fetch(entry, progress=progress)


def load_weights(
    source: str | Path,
    *,
    model_name: str | None = None,
    cache_dir: str | Path | None = None,
    payload: Any = None,
) -> LoadedWeights:
    """Weights from a file path (any supported format), a weights-table tag (downloaded, cached)
    or 'DEFAULT' (`model_name`'s default tag, `default_weights`); `payload` as for
    `read_weights_file`.

    `model_name` (the model the caller means to build) resolves 'DEFAULT' and is otherwise not
    recorded: the result's `model_name` is only the architecture the weights themselves name
    (a native sidecar, a table entry), so that a mismatch message never presents the requested
    model as the one the weights were made for."""
    entry = table_entry(source, model_name)
    if entry is None:
        return read_weights_file(Path(source), payload=payload)
    loaded = read_weights_file(fetch(entry, cache_dir))
    return dataclasses.replace(
        loaded,
        source_format=entry.source_format,
        source=entry.tag,
        spec_overrides={**loaded.spec_overrides, "stride_in_1x1": entry.stride_in_1x1},
        preprocessing=entry.preprocessing,
        model_name=entry.model,
    )


@dataclasses.dataclass(frozen=True)
class LoadReport:
    """What `apply_weights` left out: keys only in the model, only in the weights, skipped heads."""

    missing: tuple[str, ...]
    unexpected: tuple[str, ...]
    skipped: tuple[str, ...]


def _shape(t: torch.Tensor) -> str:
    return "[" + ", ".join(map(str, t.shape)) + "]"


def _listing(title: str, lines: list[str]) -> str:
    shown = lines[:_LIST_LIMIT]
    more = f"\n    ... and {len(lines) - _LIST_LIMIT} more" if len(lines) > _LIST_LIMIT else ""
    return f"  {title} ({len(lines)}):\n    " + "\n    ".join(shown) + more


def _is_head(key: str) -> bool:
    return key.startswith("fc.")


def apply_weights(
    model: torch.nn.Module, loaded: LoadedWeights, *, strict: bool = True, new_head: bool = False
) -> LoadReport:
    """Copy `loaded` into `model`; any mismatch is ONE WeightsError listing keys, shapes and the fix.

    With ``new_head=True`` only the classifier (``fc.*``) may be missing, extra or of another size
    (it keeps the model's fresh one); every backbone key must still match. With ``strict=False``
    keys missing on either side and a classifier of another size are skipped; a backbone shape
    mismatch is still an error.
    """
    own = model.state_dict()
    theirs = loaded.state_dict
    missing = [k for k in own if k not in theirs]
    unexpected = [k for k in theirs if k not in own]
    mismatched = [k for k in own if k in theirs and own[k].shape != theirs[k].shape]
    head_only = all(_is_head(k) for k in mismatched + missing + unexpected)
    spec = getattr(model, "spec", None)
    want_stride = loaded.spec_overrides.get("stride_in_1x1")
    stride_differs = (
        spec is not None and want_stride is not None and spec.stride_in_1x1 != want_stride
    )
    if new_head:
        strict = False
        problems = not head_only
    else:
        problems = bool(mismatched) if not strict else bool(missing or unexpected or mismatched)
        if not strict and mismatched and head_only:
            problems = False
    if problems or (strict and stride_differs):
        # A new head is meant to differ; listing it would hide what is really wrong.
        shown = [
            [k for k in keys if not (new_head and _is_head(k))]
            for keys in (missing, unexpected, mismatched)
        ]
        raise WeightsError(_mismatch_message(loaded, *shown, own, head_only, stride_differs))
    if stride_differs:
        warnings.warn(
            f"{loaded.source}: the weights expect stride_in_1x1={want_stride}, the model has "
            f"{spec.stride_in_1x1}; outputs will differ from the original network",
            stacklevel=2,
        )
    usable = {k: v for k, v in theirs.items() if k in own and k not in mismatched}
    if not usable:
        raise WeightsError(f"{loaded.source}: no key of the weights matches the model")
    model.load_state_dict(usable, strict=False)
    return LoadReport(tuple(missing), tuple(unexpected), tuple(mismatched))


def _mismatch_message(
    loaded: LoadedWeights,
    missing: list[str],
    unexpected: list[str],
    mismatched: list[str],
    own: dict[str, torch.Tensor],
    head_only: bool,
    stride_differs: bool,
) -> str:
    theirs = loaded.state_dict
    parts = [f"weights {loaded.source} ({loaded.source_format}) do not fit the model:"]
    if mismatched:
        lines = [f"{k}: weights {_shape(theirs[k])}, model {_shape(own[k])}" for k in mismatched]
        parts.append(_listing("different shapes", lines))
    if missing:
        parts.append(
            _listing("in the model, not in the weights", [f"{k} {_shape(own[k])}" for k in missing])
        )
    if unexpected:
        parts.append(
            _listing(
                "in the weights, not in the model", [f"{k} {_shape(theirs[k])}" for k in unexpected]
            )
        )
    if stride_differs:
        want = loaded.spec_overrides["stride_in_1x1"]
        parts.append(f"  stride placement: the weights were trained with stride_in_1x1={want}")
    hints = []
    n = loaded.num_classes
    if head_only and (mismatched or missing or unexpected):
        if n is not None:
            hints.append(f"create the model with num_classes={n} to use the weights' classifier")
        hints.append("or pass strict=False to load the backbone and start a new classifier")
    elif missing and not (mismatched or unexpected):
        hint = "the file holds only part of the network (a truncated or partial checkpoint?): use a complete one"
        if loaded.source_format == "detectron2":
            # Documented as read: the bottom-up ResNet only (docs/weights.md, "Formats read").
            hint += (
                " (a detectron2 C4 model keeps res5 under roi_heads, which is not read as a "
                "backbone; use the ImageNet-pretrained backbone file it started from)"
            )
        hints.append(hint)
    elif mismatched or missing or unexpected:
        named = f" ({loaded.model_name})" if loaded.model_name else ""
        hints.append(
            f"the weights are for another architecture{named}: create that model (or the spec "
            "overrides that match the listed shapes)"
        )
    if stride_differs:
        hints.append(
            f"create the model with stride_in_1x1={loaded.spec_overrides['stride_in_1x1']}"
        )
    parts.append("What to do: " + "; ".join(hints) + ".")
    return "\n".join(parts)
