"""Map a ResNeXt `nn.Sequential` read from a Torch7 file (fb.resnet.torch layout) to our state dict.

The Lua networks have no parameter names: the names come from the module tree's shape. Top level:
conv, BN, ReLU, [max-pool], one Sequential per stage, average pool, View, Linear. Each block is a
Sequential of ConcatTable(residual branch, shortcut), CAddTable, ReLU; the residual branch holds
conv/BN pairs in order and the shortcut is Identity or Sequential(conv, BN).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from resnext.errors import WeightsError
from resnext.weights.t7 import TorchObject

_CONV = {"SpatialConvolution", "SpatialConvolutionMM"}
_BN = {"SpatialBatchNormalization", "BatchNormalization"}
_PARAM_FREE = {
    "ReLU",
    "SpatialMaxPooling",
    "SpatialAveragePooling",
    "View",
    "Reshape",
    "Identity",
    "CAddTable",
    "Dropout",
    "SoftMax",
    "LogSoftMax",
}


def short_name(module: Any) -> str:
    """'SpatialConvolution' for nn.SpatialConvolution and cudnn.SpatialConvolution alike."""
    if not isinstance(module, TorchObject):
        raise WeightsError(f"expected a Torch7 module, found a {type(module).__name__}")
    return module.torch_typename.rsplit(".", 1)[-1]


def children(module: TorchObject) -> list[TorchObject]:
    """The submodules of a container, in Lua's 1-based order."""
    mods = module.get("modules")
    if mods is None:
        return []
    if not isinstance(mods, dict):
        raise WeightsError(f"{module.torch_typename}: 'modules' is not a table")
    return [mods[k] for k in sorted(mods, key=lambda k: (not isinstance(k, int), k))]


class _Mapper:
    """Collects named tensors; folds a conv bias into the BN that follows it (exact for inference)."""

    def __init__(self) -> None:
        self.state: dict[str, torch.Tensor] = {}
        self.pending_bias: np.ndarray | None = None
        self.strides_1x1: list[int] = []

    def conv(self, module: TorchObject, name: str) -> None:
        weight = _array(module, "weight")
        groups = int(module.get("groups", 1) or 1)
        n_out, n_in = int(module.get("nOutputPlane")), int(module.get("nInputPlane"))
        kh, kw = int(module.get("kH")), int(module.get("kW"))
        shape = (n_out, n_in // groups, kh, kw)
        if weight.size != int(np.prod(shape)):
            raise WeightsError(
                f"{module.torch_typename} for {name}: weight has {weight.size} values, expected "
                f"{shape} (nOutputPlane, nInputPlane/groups, kH, kW)"
            )
        self.state[f"{name}.weight"] = torch.from_numpy(weight.reshape(shape).astype(np.float32))
        bias = module.get("bias")
        self.pending_bias = bias if isinstance(bias, np.ndarray) and bias.size else None
        if kh == 1 and name.endswith("conv1") and name.startswith("layer"):
            self.strides_1x1.append(int(module.get("dH", 1)))

    def bn(self, module: TorchObject, name: str) -> None:
        mean = _array(module, "running_mean").astype(np.float64)
        if isinstance(module.get("running_var"), np.ndarray):
            var = module.get("running_var").astype(np.float64)
        elif isinstance(module.get("running_std"), np.ndarray):
            # Early nn stored 1/sqrt(var + eps) instead of the variance.
            eps = float(module.get("eps", 1e-5))
            var = 1.0 / np.square(module.get("running_std").astype(np.float64)) - eps
        else:
            raise WeightsError(f"{module.torch_typename} for {name}: no running_var/running_std")
        n = mean.size
        weight = module.get("weight")
        bias = module.get("bias")
        weight = weight if isinstance(weight, np.ndarray) and weight.size else np.ones(n)
        bias = bias if isinstance(bias, np.ndarray) and bias.size else np.zeros(n)
        if self.pending_bias is not None:
            mean = mean - self.pending_bias.reshape(-1)  # BN(conv(x) + b) == BN'(conv(x))
            self.pending_bias = None
        for key, value in (
            ("weight", weight),
            ("bias", bias),
            ("running_mean", mean),
            ("running_var", var),
        ):
            self.state[f"{name}.{key}"] = torch.from_numpy(
                np.asarray(value, dtype=np.float32).reshape(-1)
            )
        self.state[f"{name}.num_batches_tracked"] = torch.tensor(0, dtype=torch.long)

    def linear(self, module: TorchObject, name: str) -> None:
        weight = _array(module, "weight")
        self.state[f"{name}.weight"] = torch.from_numpy(weight.astype(np.float32))
        self.state[f"{name}.bias"] = torch.from_numpy(_array(module, "bias").astype(np.float32))


def _array(module: TorchObject, key: str) -> np.ndarray:
    value = module.get(key)
    if not isinstance(value, np.ndarray) or value.size == 0:
        raise WeightsError(f"{module.torch_typename}: missing tensor field {key!r}")
    return value


def _check_param_free(module: TorchObject, where: str) -> None:
    if short_name(module) not in _PARAM_FREE:
        raise WeightsError(
            f"{where}: unexpected {module.torch_typename} (expected the fb.resnet.torch ResNeXt "
            "layout of conv, BN, ReLU, pooling, stage Sequentials, View, Linear)"
        )


def _pairs(branch: list[TorchObject], where: str) -> tuple[list[TorchObject], list[TorchObject]]:
    convs = [m for m in branch if short_name(m) in _CONV]
    bns = [m for m in branch if short_name(m) in _BN]
    for m in branch:
        if short_name(m) not in _CONV | _BN:
            _check_param_free(m, where)
    if len(convs) != len(bns):
        raise WeightsError(f"{where}: {len(convs)} convolutions but {len(bns)} batch norms")
    return convs, bns


def _map_block(mapper: _Mapper, block: TorchObject, name: str) -> None:
    parts = children(block)
    concat = [m for m in parts if short_name(m) == "ConcatTable"]
    if len(concat) != 1:
        raise WeightsError(
            f"{name}: expected one ConcatTable (residual branch, shortcut) per block"
        )
    for m in parts:
        if m is not concat[0]:
            _check_param_free(m, name)
    branches = children(concat[0])
    if len(branches) != 2:
        raise WeightsError(f"{name}: ConcatTable has {len(branches)} branches, expected 2")
    residual, shortcut = branches
    convs, bns = _pairs(children(residual), f"{name} residual branch")
    if len(convs) != 3:
        raise WeightsError(f"{name}: residual branch has {len(convs)} convolutions, expected 3")
    for k, (conv, bn) in enumerate(zip(convs, bns, strict=True), start=1):
        mapper.conv(conv, f"{name}.conv{k}")
        mapper.bn(bn, f"{name}.bn{k}")
    if short_name(shortcut) == "Identity":
        return
    if short_name(shortcut) != "Sequential":
        raise WeightsError(
            f"{name}: shortcut is {shortcut.torch_typename}, expected Identity or Sequential"
        )
    convs, bns = _pairs(children(shortcut), f"{name} shortcut")
    if len(convs) != 1:
        raise WeightsError(
            f"{name}: shortcut without a projection (type A, zero padding) has no equivalent here; "
            "expected shortcut type B (1×1 conv + BN)"
        )
    mapper.conv(convs[0], f"{name}.downsample.0")
    mapper.bn(bns[0], f"{name}.downsample.1")


def map_resnext(root: Any) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Our state dict and spec overrides from a ResNeXt nn.Sequential read by `load_t7`."""
    if isinstance(root, TorchObject) and short_name(root) == "DataParallelTable":
        inner = children(root)
        root = inner[0] if inner else root
    if not isinstance(root, TorchObject) or short_name(root) != "Sequential":
        what = root.torch_typename if isinstance(root, TorchObject) else type(root).__name__
        raise WeightsError(
            f"expected an nn.Sequential network at the top of the file, found {what}"
        )
    mapper = _Mapper()
    stage, stem_convs, stem_bns, linears = 0, 0, 0, 0
    for module in children(root):
        kind = short_name(module)
        if kind == "Sequential":
            stage += 1
            for i, block in enumerate(children(module)):
                _map_block(mapper, block, f"layer{stage}.{i}")
        elif kind in _CONV and stage == 0 and stem_convs == 0:
            mapper.conv(module, "conv1")
            stem_convs += 1
        elif kind in _BN and stage == 0 and stem_bns == 0:
            mapper.bn(module, "bn1")
            stem_bns += 1
        elif kind == "Linear" and linears == 0:
            mapper.linear(module, "fc")
            linears += 1
        else:
            _check_param_free(module, "top level")
    if stage == 0 or stem_convs == 0:
        raise WeightsError(
            "no stem convolution or no stage Sequential found: not a ResNeXt network"
        )
    overrides: dict[str, Any] = {"stride_in_1x1": any(s > 1 for s in mapper.strides_1x1)}
    return mapper.state, overrides
