"""torchvision's int8 (quantized) ResNeXt checkpoints: their table, and loading them.

torchvision publishes ResNeXt-101 checkpoints quantized for its fbgemm engine: state dicts of its
quantizable ResNet after torch.ao's eager-mode conversion (int8 weights per output channel with
their scales; a scale and zero point per activation; the batch norms folded into the
convolutions). They load into `resnext.speed.int8.int8_template` of the same network, whose
module tree is torchvision's, with `torch.load(weights_only=True)`: no code from the file runs.
"""

from __future__ import annotations

import difflib
from pathlib import Path

import torch

from resnext.errors import WeightsError
from resnext.io.atomic import replacing
from resnext.weights.formats import PACKED_FC, is_int8_state
from resnext.weights.load import _listing, _torch_load, fetch, weights_path
from resnext.weights.preprocess import imagenet
from resnext.weights.table import Result, WeightsEntry

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
    or None for a file, which holds none (`resnext predict` and `eval` then use their default for
    the network's layout: ImageNet's 256/224, or CIFAR-10's statistics at 32 pixels)."""
    tagged = INT8_WEIGHTS.get(str(weights)) if not isinstance(weights, Path) else None
    if tagged is not None and tagged.model != name:  # before any download
        raise WeightsError(f"{tagged.tag}: these weights are for {tagged.model}, not {name}")
    path, entry = _resolve(weights, cache_dir)
    net = build_int8_from_state(name, _torch_load(path), entry.tag if entry else str(path), engine)
    if entry is not None:
        net.preprocessing = entry.preprocessing
    return net


def build_int8_from_state(
    name: str, state: object, source: str, engine: str = "auto"
) -> torch.nn.Module:
    """The int8 network `name` with the quantized state dict `state` (read from `source`)."""
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
    model = create_model(name, num_classes=_classes(state, source))
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


def save_int8(net: torch.nn.Module, path: str | Path) -> Path:
    """Write the int8 network's state dict to `path` as torchvision's quantized checkpoints are
    written (the state dict alone, loadable with `build_int8_with_weights`), through a temporary
    file renamed into place: a failed write leaves any file already at `path` as it was."""
    state = net.state_dict()
    if not is_int8_state(state):
        raise WeightsError(
            f"net: expected an int8 network (quantize_int8's, or one loaded with "
            f"build_int8_with_weights), got {type(net).__name__} without quantized state"
        )
    path = Path(path)
    with replacing(path) as tmp:
        torch.save(state, tmp)
    return path
