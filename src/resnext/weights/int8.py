"""torchvision's int8 (quantized) ResNeXt checkpoints: their table, and loading them.

torchvision publishes ResNeXt-101 checkpoints quantized for its fbgemm engine: state dicts of its
quantizable ResNet after torch.ao's eager-mode conversion (int8 weights per output channel with
their scales; a scale and zero point per activation; the batch norms folded into the
convolutions). They load into `resnext.speed.int8.int8_template` of the same network, whose
module tree is torchvision's, with `torch.load(weights_only=True)`: no code from the file runs.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from resnext.errors import WeightsError
from resnext.io.atomic import replacing, write_text
from resnext.weights.formats import PACKED_FC, is_int8_state
from resnext.weights.load import _listing, _torch_load, fetch, weights_path
from resnext.weights.native import check_names, spec_overrides
from resnext.weights.preprocess import Preprocessing, imagenet
from resnext.weights.table import Result, WeightsEntry

if TYPE_CHECKING:
    from resnext.models import ModelSpec

_Q = "https://download.pytorch.org/models/quantized/"


def _entry(
    tag: str, model: str, file: str, hash_: str, result: Result, resize: int, mb: float, notes: str
) -> WeightsEntry:
    return WeightsEntry(
        tag,
        model,
        _Q + file,
        hash_,
        "prefix" if hash_ else "none",
        "torchvision",
        "bsd-3-clause",
        1000,
        imagenet(resize, 224),
        False,
        (result,),
        mb,
        notes,
    )


_ENTRIES = (
    _entry(
        "resnext101_32x8d.tv_in1k_fbgemm",
        "resnext101_32x8d",
        "resnext101_32x8_fbgemm_09835ccf.pth",
        # the name puts '_' before its 8 hex digits, outside torch.hub's '-<sha256>' convention,
        # so torchvision does not check them and neither can we: no hash to verify
        "",
        Result(224, 78.986, 94.480),
        256,
        86.034,
        "torchvision ResNeXt101_32X8D_QuantizedWeights.IMAGENET1K_FBGEMM_V1 (of IMAGENET1K_V1)",
    ),
    _entry(
        "resnext101_32x8d.tv2_in1k_fbgemm",
        "resnext101_32x8d",
        "resnext101_32x8_fbgemm-ee16d00c.pth",
        "ee16d00c",
        Result(224, 82.574, 96.132),
        232,
        86.645,
        "torchvision ResNeXt101_32X8D_QuantizedWeights.IMAGENET1K_FBGEMM_V2 (of IMAGENET1K_V2)",
    ),
    _entry(
        "resnext101_64x4d.tv_in1k_fbgemm",
        "resnext101_64x4d",
        "resnext101_64x4d_fbgemm-605a1cb3.pth",
        "605a1cb3",
        Result(224, 82.898, 96.326),
        232,
        81.556,
        "torchvision ResNeXt101_64X4D_QuantizedWeights.IMAGENET1K_FBGEMM_V1",
    ),
)
INT8_WEIGHTS: dict[str, WeightsEntry] = {e.tag: e for e in _ENTRIES}


def list_int8_weights(model: str | None = None) -> list[str]:
    """The int8 checkpoints' tags, or those of `model`, sorted."""
    return sorted(t for t, e in INT8_WEIGHTS.items() if model is None or e.model == model)


def _resolve(source: str | Path, cache_dir: str | Path | None) -> tuple[Path, WeightsEntry | None]:
    path = weights_path(source, INT8_WEIGHTS, "int8 weights")
    if path is not None:
        if not path.is_file():
            raise WeightsError(f"int8 weights file {path} does not exist")
        return path, None
    text = str(source)
    if text not in INT8_WEIGHTS:
        close = difflib.get_close_matches(text, list(INT8_WEIGHTS), n=3, cutoff=0.5)
        hint = f"closest: {', '.join(close)}" if close else f"known: {', '.join(INT8_WEIGHTS)}"
        raise WeightsError(f"{text!r} is neither an int8 weights file nor an int8 tag; {hint}")
    entry = INT8_WEIGHTS[text]
    return fetch(entry, cache_dir), entry


def _classes(state: dict, source: str) -> int:
    packed = state[PACKED_FC]
    weight = packed[0] if isinstance(packed, (tuple, list)) and packed else None
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise WeightsError(
            f"{source}: {PACKED_FC} should hold the classifier's (classes, features) int8 weight "
            f"and its bias, got {type(packed).__name__}"
        )
    return int(weight.shape[0])


def _shapes(value: object) -> str:
    """A state-dict value's shape(s): a tensor's, each of a tuple's (the packed fc), else its type."""
    if isinstance(value, torch.Tensor):
        return str(list(value.shape))
    if isinstance(value, (tuple, list)):
        return "(" + ", ".join(_shapes(v) for v in value) + ")"
    return type(value).__name__


def build_int8_with_weights(
    name: str, weights: str | Path, *, engine: str = "auto", cache_dir: str | Path | None = None
) -> torch.nn.Module:
    """The int8 network `name` (a registry name, e.g. "resnext101_32x8d") with torchvision's
    quantized weights `weights`: an int8 tag (`list_int8_weights()`, downloaded and checked) or
    a file. The result takes float images preprocessed as its ``preprocessing`` says: the tag's,
    a `save_int8` sidecar's, or None for a file without one (`resnext predict` and `eval` then
    use their default for the network's layout: ImageNet's 256/224, or CIFAR-10's statistics at
    32 pixels). A sidecar also gives the float network's spec and ``class_names``."""
    tagged = INT8_WEIGHTS.get(str(weights)) if not isinstance(weights, Path) else None
    if tagged is not None and tagged.model != name:  # before any download
        raise WeightsError(f"{tagged.tag}: these weights are for {tagged.model}, not {name}")
    path, entry = _resolve(weights, cache_dir)
    meta = read_int8_sidecar(path) if entry is None else None
    source = entry.tag if entry else str(path)
    overrides = meta.overrides(name) if meta is not None else None
    net = build_int8_from_state(name, _torch_load(path), source, engine, overrides)
    if entry is not None:
        net.preprocessing = entry.preprocessing
    elif meta is not None:
        net.preprocessing, net.class_names = meta.preprocessing, meta.class_names
    return net


def build_int8_from_state(
    name: str,
    state: object,
    source: str,
    engine: str = "auto",
    overrides: Mapping[str, Any] | None = None,
) -> torch.nn.Module:
    """The int8 network `name` (with spec `overrides`, e.g. a training run's) with the quantized
    state dict `state` (read from `source`)."""
    from resnext.models import create_model
    from resnext.speed.int8 import int8_template, quantized_engine

    if not is_int8_state(state):
        what = f"keys such as {', '.join(list(state)[:3])}" if isinstance(state, dict) else ""
        raise WeightsError(
            f"{source}: not an int8 (quantized) checkpoint: it lacks {PACKED_FC} and quant.scale "
            f"({type(state).__name__} {what}); float checkpoints load with build_with_weights"
        )
    # `state` itself is loaded, not a copy: its `_metadata` holds the modules' state versions,
    # without which torch.ao's quantized Linear reads the older layout (fc.weight)
    model = create_model(name, num_classes=_classes(state, source), **dict(overrides or {}))
    net = int8_template(model, engine=engine)
    own = net.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [
        f"{k}: weights {_shapes(state[k])}, model {_shapes(own[k])}"
        for k in own
        if k in state and _shapes(state[k]) != _shapes(own[k])
    ]
    if missing or unexpected or mismatched:
        parts = [f"{source} does not fit the int8 {name}:"]
        if mismatched:
            parts.append(_listing("different shapes", mismatched))
        if missing:
            parts.append(_listing("in the model, not in the weights", missing))
        if unexpected:
            parts.append(_listing("in the weights, not in the model", unexpected))
        raise WeightsError("\n".join(parts))
    with quantized_engine(engine):
        try:
            net.load_state_dict(state)
        except (RuntimeError, TypeError, ValueError, AttributeError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise WeightsError(f"{source} does not fit the int8 {name}: {first}") from None
    net.preprocessing = None  # a state dict alone does not say; the caller's default applies
    return net


def save_int8(
    net: torch.nn.Module,
    path: str | Path,
    *,
    model_name: str | None = None,
    spec: ModelSpec | None = None,
    preprocessing: Preprocessing | None = None,
    class_names: Sequence[str] | None = None,
) -> Path:
    """Write the int8 network's state dict to `path` as torchvision's quantized checkpoints are
    written (the state dict alone, loadable with `build_int8_with_weights`), through a temporary
    file renamed into place: a failed write leaves any file already at `path` as it was.

    What a state dict cannot say (the float network's name and spec, the preprocessing and class
    names of its weights) goes into a JSON sidecar beside it (PATH with .json), which loading
    reads when it is there."""
    state = net.state_dict()
    if not is_int8_state(state):
        raise WeightsError(
            f"net: expected an int8 network (quantize_int8's, or one loaded with "
            f"build_int8_with_weights), got {type(net).__name__} without quantized state"
        )
    path = Path(path)
    side = check_int8_sidecar_free(path)
    with replacing(path) as tmp:
        torch.save(state, tmp)
    sidecar = {
        "format": INT8_SIDECAR,
        "model_name": model_name,
        "spec": spec.to_dict() if spec is not None else None,
        "preprocessing": preprocessing.to_dict() if preprocessing is not None else None,
        "class_names": list(class_names) if class_names is not None else None,
    }
    write_text(side, json.dumps(sidecar, indent=2, sort_keys=True) + "\n")
    return path


def int8_sidecar_path(path: str | Path) -> Path:
    """FILE.json beside int8 file FILE (the whole name: m.pt and m.pth get sidecars of their own)."""
    path = Path(path)
    return path.with_name(path.name + ".json")


def check_int8_sidecar_free(path: str | Path) -> Path:
    """The sidecar path of int8 file `path`, refused (WeightsError) where another kind of file
    is there: it is someone else's, never replaced (an earlier int8 sidecar is, with its file)."""
    side = int8_sidecar_path(path)
    if side.exists() and _sidecar_format(side) != INT8_SIDECAR:
        raise WeightsError(
            f"{path}: its sidecar {side} exists and is not an int8 sidecar; choose another path"
        )
    return side


def _sidecar_format(side: Path) -> object:
    try:
        meta = json.loads(side.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return meta.get("format") if isinstance(meta, dict) else None


INT8_SIDECAR = "resnext-int8"


@dataclass(frozen=True)
class Int8Meta:
    """What `save_int8`'s sidecar records of the float network an int8 file came from."""

    model_name: str | None
    spec: dict[str, Any] | None
    preprocessing: Preprocessing | None
    class_names: tuple[str, ...] | None

    def overrides(self, name: str) -> dict[str, Any]:
        """The saved spec's changes to model `name`'s registered spec (the classes excepted)."""
        return spec_overrides(self.spec, name)


def read_int8_sidecar(path: str | Path) -> Int8Meta | None:
    """The sidecar `save_int8` wrote beside the int8 file `path`, or None where there is none
    (torchvision's own files); a damaged one is a WeightsError naming it."""
    side = int8_sidecar_path(path)
    if not side.is_file():
        return None
    try:
        meta = json.loads(side.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise WeightsError(f"{side}: not a readable JSON sidecar ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != INT8_SIDECAR:
        return None  # another program's JSON that happens to share the name: not ours to read
    check_names(side, meta)
    names, name, spec = meta.get("class_names"), meta.get("model_name"), meta.get("spec")
    if not isinstance(spec, (dict, type(None))):
        raise WeightsError(f"{side}: spec: expected a table or null, got {spec!r}")
    prep = meta.get("preprocessing")
    try:
        preprocessing = Preprocessing.from_dict(prep) if prep is not None else None
    except WeightsError as exc:
        raise WeightsError(f"{side}: {exc}") from None
    return Int8Meta(name, spec, preprocessing, tuple(names) if names is not None else None)
