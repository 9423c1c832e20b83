"""Our native weights format: a safetensors file plus a JSON sidecar, both readable without this package.

``NAME.safetensors`` holds the state dict (torchvision key names). ``NAME.json`` holds the model
spec, preprocessing, class names, provenance, and the size and sha256 of the safetensors file, so a
truncated or altered file is detected before any tensor is read.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import itertools
import json
import math
import struct
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from resnext.errors import RegistryError, WeightsError
from resnext.io.atomic import write_bytes
from resnext.weights.loaded import LoadedWeights
from resnext.weights.preprocess import Preprocessing

FORMAT_NAME = "resnext-weights"
FORMAT_VERSION = 1
_DTYPE_BYTES = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
    "U16": 2,
    "U32": 4,
    "U64": 8,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
}


def sidecar_path(path: str | Path) -> Path:
    """The JSON sidecar beside a safetensors file (NAME.safetensors → NAME.json)."""
    return Path(path).with_suffix(".json")


def _package_version() -> str:
    from resnext import __version__

    return __version__


def save_weights(
    model: torch.nn.Module,
    path: str | Path,
    *,
    preprocessing: Preprocessing | None,
    class_names: Sequence[str] | None,
    provenance: Mapping[str, Any],
    model_name: str | None = None,
) -> Path:
    """Write `model`'s weights as PATH (.safetensors) and its JSON sidecar; returns the sidecar path."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise WeightsError(f"{path}: native weights files end in .safetensors")
    if not isinstance(provenance, Mapping) or "source" not in provenance:
        raise WeightsError("provenance: expected a mapping with at least a 'source' entry")
    spec = getattr(model, "spec", None)
    state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    num_classes = getattr(model, "num_classes", None)
    if class_names is not None and num_classes and len(class_names) != num_classes:
        raise WeightsError(
            f"class_names: {len(class_names)} names for a model with {num_classes} classes"
        )
    blob = st_save(state, metadata={"format": FORMAT_NAME})
    sidecar = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "tensors_file": path.name,
        "size": len(blob),
        "sha256": hashlib.sha256(blob).hexdigest(),
        "model_name": model_name,
        "spec": spec.to_dict() if spec is not None else None,
        "preprocessing": preprocessing.to_dict() if preprocessing is not None else None,
        "class_names": list(class_names) if class_names is not None else None,
        "provenance": {
            **dict(provenance),
            "package_version": _package_version(),
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        },
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes(path, blob, fsync=True)
    side = sidecar_path(path)
    write_bytes(side, (json.dumps(sidecar, indent=2, sort_keys=True) + "\n").encode(), fsync=True)
    return side


def check_safetensors(data: bytes, name: str) -> None:
    """Refuse a safetensors buffer whose header is malformed or lies about tensor sizes/offsets."""
    if len(data) < 8:
        raise WeightsError(f"{name}: too short for a safetensors file ({len(data)} bytes)")
    (n,) = struct.unpack("<Q", data[:8])
    if n > len(data) - 8:
        raise WeightsError(f"{name}: safetensors header claims {n} bytes, file has {len(data) - 8}")
    try:
        header = json.loads(data[8 : 8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise WeightsError(f"{name}: safetensors header is not valid JSON ({exc})") from exc
    if not isinstance(header, dict):
        raise WeightsError(f"{name}: safetensors header is not a JSON object")
    body = len(data) - 8 - n
    spans = []
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
            nbytes = _DTYPE_BYTES[dtype] * math.prod(int(s) for s in shape)
        except (KeyError, TypeError, ValueError) as exc:
            raise WeightsError(f"{name}: tensor {key!r} has a malformed header entry") from exc
        if any(int(s) < 0 for s in shape) or not 0 <= begin <= end <= body or end - begin != nbytes:
            raise WeightsError(
                f"{name}: tensor {key!r} ({dtype} {shape}) claims bytes {begin}..{end} but needs "
                f"{nbytes} within a {body}-byte data section: the header is inconsistent"
            )
        spans.append((begin, end))
    spans.sort()
    for (_, end_a), (begin_b, _) in itertools.pairwise(spans):
        if begin_b < end_a:
            raise WeightsError(f"{name}: safetensors header has overlapping tensors")


def read_safetensors(path: Path, data: bytes | None = None) -> dict[str, torch.Tensor]:
    """A validated safetensors file's tensors."""
    if data is None:
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise WeightsError(f"cannot read {path}: {exc}") from exc
    check_safetensors(data, str(path))
    try:
        return dict(st_load(data))
    except Exception as exc:  # the library's own error type varies by version
        raise WeightsError(f"{path}: not a readable safetensors file ({exc})") from exc


def _read_sidecar(side: Path) -> dict[str, Any]:
    try:
        meta = json.loads(side.read_text())
    except FileNotFoundError as exc:
        raise WeightsError(f"{side}: the JSON sidecar of the native weights is missing") from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise WeightsError(f"{side}: not a readable JSON sidecar ({exc})") from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        raise WeightsError(f"{side}: not a {FORMAT_NAME} sidecar (missing 'format')")
    for key in ("size", "sha256", "tensors_file"):
        if key not in meta:
            raise WeightsError(f"{side}: missing {key!r}")
    check_names(side, meta)
    return meta


def check_names(side: Path, meta: dict[str, Any]) -> None:
    """Refuse a sidecar's class_names other than a list of strings, and a model_name other than
    a string (either may be null)."""
    names = meta.get("class_names")
    if names is not None and (
        not isinstance(names, list) or not all(isinstance(n, str) for n in names)
    ):
        raise WeightsError(
            f"{side}: class_names: expected a list of strings or null, got {names!r}"
        )
    if not isinstance(meta.get("model_name"), (str, type(None))):
        raise WeightsError(
            f"{side}: model_name: expected a string or null, got {meta['model_name']!r}"
        )


def _tensors_name(side: Path, meta: dict[str, Any]) -> str:
    """The sidecar's tensors_file, which must name a file in the sidecar's own folder."""
    name = meta["tensors_file"]
    if not isinstance(name, str) or name in ("", ".", "..") or "/" in name or "\\" in name:
        raise WeightsError(
            f"{side}: tensors_file {name!r}: expected the plain name of a file in the same folder "
            "(no path separators or '..')"
        )
    return name


def spec_overrides(spec: Any, model_name: str | None) -> dict[str, Any]:
    """What the saved spec changes in its named model's registered spec (a training run's
    model.spec overrides: cardinality, depths, logit_scale ...), so that the same network is
    rebuilt; the classifier size follows the saved tensors instead."""
    if not isinstance(spec, dict):
        return {}
    from resnext.models import get_spec  # the models package builds on this one

    try:
        registered = get_spec(model_name).to_dict() if model_name else {}
    except RegistryError:
        registered = {}  # an unknown name fails where the model is created, naming it
    overrides = {"stride_in_1x1": spec["stride_in_1x1"]} if "stride_in_1x1" in spec else {}
    ignored = ("num_classes", "description")
    overrides.update(
        (k, v)
        for k, v in spec.items()
        if k in registered and k not in ignored and registered[k] != v
    )
    return overrides


def load_native(path: str | Path) -> LoadedWeights:
    """Read native weights (either file's path), checking size and sha256 before any tensor."""
    path = Path(path)
    side = path if path.suffix == ".json" else sidecar_path(path)
    meta = _read_sidecar(side)
    # The path asked for is the file read: a renamed pair keeps its sidecar's old tensors_file.
    tensors = path if path.suffix == ".safetensors" else side.with_name(_tensors_name(side, meta))
    try:
        data = tensors.read_bytes()
    except OSError as exc:
        raise WeightsError(f"cannot read {tensors}: {exc}") from exc
    if len(data) != meta["size"]:
        raise WeightsError(
            f"{tensors}: {len(data)} bytes, but its sidecar {side.name} records {meta['size']}: "
            "the file is truncated or was replaced"
        )
    if hashlib.sha256(data).hexdigest() != meta["sha256"]:
        raise WeightsError(
            f"{tensors}: sha256 differs from the one recorded in {side.name}: the file is corrupt"
        )
    state = read_safetensors(tensors, data)
    spec = meta.get("spec")
    overrides = spec_overrides(spec, meta.get("model_name"))
    prep = meta.get("preprocessing")
    names = meta.get("class_names")
    fc = state.get("fc.weight")
    if names is not None and fc is not None and len(names) != fc.shape[0]:
        raise WeightsError(
            f"{side}: class_names: {len(names)} names for a classifier of {fc.shape[0]} classes"
        )
    try:
        preprocessing = Preprocessing.from_dict(prep) if prep is not None else None
    except WeightsError as exc:
        raise WeightsError(f"{side}: {exc}") from None
    return LoadedWeights(
        state_dict=state,
        source_format="native",
        source=str(tensors),
        spec_overrides=overrides,
        preprocessing=preprocessing,
        class_names=tuple(names) if names is not None else None,
        model_name=meta.get("model_name"),
        spec=spec,
        notes=(f"provenance: {json.dumps(meta.get('provenance'), sort_keys=True)}",),
    )
