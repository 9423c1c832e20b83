"""Key renaming from each library's state-dict names to ours (torchvision's), one function per library."""

from __future__ import annotations

import re
from collections.abc import Callable

import torch

StateDict = dict[str, torch.Tensor]

_PYCLS_PARTS = {
    "f.a": "conv1",
    "f.a_bn": "bn1",
    "f.b": "conv2",
    "f.b_bn": "bn2",
    "f.c": "conv3",
    "f.c_bn": "bn3",
    "proj": "downsample.0",
    "bn": "downsample.1",
}
_PRLZ_PARTS = {
    "conv_reduce": "conv1",
    "bn_reduce": "bn1",
    "conv_conv": "conv2",
    "bn": "bn2",
    "conv_expand": "conv3",
    "bn_expand": "bn3",
    "shortcut.shortcut_conv": "downsample.0",
    "shortcut.shortcut_bn": "downsample.1",
}
# mmcv ConvModule deep stem (conv, bn per module) → timm's Sequential indices.
_MM_DEEP_STEM = {
    "stem.0.conv": "conv1.0",
    "stem.0.bn": "conv1.1",
    "stem.1.conv": "conv1.3",
    "stem.1.bn": "conv1.4",
    "stem.2.conv": "conv1.6",
    "stem.2.bn": "bn1",
}

_PYCLS_BLOCK = re.compile(r"^s(\d+)\.b(\d+)\.(f\.[abc](?:_bn)?|proj|bn)\.(\w+)$")
_PRLZ_BLOCK = re.compile(
    r"^stage_(\d+)\.stage_\1_bottleneck_(\d+)\.("
    r"conv_reduce|bn_reduce|conv_conv|bn|conv_expand|bn_expand|"
    r"shortcut\.shortcut_conv|shortcut\.shortcut_bn)\.(\w+)$"
)
_D2_BLOCK = re.compile(r"^res(\d+)\.(\d+)\.(conv[123]|shortcut)(\.norm)?\.(\w+)$")
_MM_STEM = re.compile(r"^(stem\.[012]\.(?:conv|bn))\.(\w+)$")


def rename(state: StateDict, rule: Callable[[str], str | None]) -> tuple[StateDict, list[str]]:
    """Apply `rule` to every key; keys it maps to None are dropped and returned as the second item."""
    out: StateDict = {}
    dropped: list[str] = []
    for key, value in state.items():
        new = rule(key)
        if new is None:
            dropped.append(key)
        else:
            out[new] = value
    return out, dropped


def strip_prefix(state: StateDict, prefix: str) -> StateDict:
    """Remove `prefix` from every key that has it (DataParallel's 'module.', for example)."""
    if not state or not all(k.startswith(prefix) for k in state):
        return state
    return {k[len(prefix) :]: v for k, v in state.items()}


# What wrapping a network adds to every key: DataParallel/DDP's `module.`, torch.compile's
# `_orig_mod.`, in either order when both wrap it.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def strip_wrappers(state: StateDict) -> StateDict:
    """`state` without the key prefixes of DDP and torch.compile wrappers."""
    stripped = None
    while stripped is not state:
        stripped = state
        for prefix in WRAPPER_PREFIXES:
            state = strip_prefix(state, prefix)
    return state


def pycls_key(key: str) -> str:
    """pycls (resnet or AnyNet) key → ours; stage/block indices are 1-based there."""
    if key.startswith("stem.conv."):
        return "conv1." + key[len("stem.conv.") :]
    if key.startswith("stem.bn."):
        return "bn1." + key[len("stem.bn.") :]
    if key.startswith("head.fc."):
        return "fc." + key[len("head.fc.") :]
    m = _PYCLS_BLOCK.match(key)
    if m:
        stage, block, part, leaf = m.groups()
        return f"layer{stage}.{int(block) - 1}.{_PYCLS_PARTS[part]}.{leaf}"
    return key


def mmpretrain_key(key: str) -> str | None:
    """mmpretrain key → ours ('backbone.' and 'head.' prefixes; mmcv deep stem); others dropped."""
    if key.startswith("head.fc."):
        return "fc." + key[len("head.fc.") :]
    if not key.startswith("backbone."):
        return None  # data_preprocessor buffers, neck without parameters, and the like
    key = key[len("backbone.") :]
    m = _MM_STEM.match(key)
    if m:
        return f"{_MM_DEEP_STEM[m.group(1)]}.{m.group(2)}"
    return key


def detectron2_key(key: str) -> str | None:
    """detectron2 key → ours; keys outside the bottom-up ResNet (FPN, heads) are dropped."""
    for prefix in ("backbone.bottom_up.", "backbone."):
        if key.startswith(prefix):
            key = key[len(prefix) :]
            break
    if key.startswith("stem.conv1.norm."):
        return "bn1." + key[len("stem.conv1.norm.") :]
    if key.startswith("stem.conv1."):
        return "conv1." + key[len("stem.conv1.") :]
    # convert-torchvision-to-d2.py gives fc a 'stem.' prefix too; detectron2's own classifier is 'linear'.
    for prefix in ("stem.fc.", "linear."):
        if key.startswith(prefix):
            return "fc." + key[len(prefix) :]
    m = _D2_BLOCK.match(key)
    if not m:
        return None
    res, block, conv, norm, leaf = m.groups()
    stage = f"layer{int(res) - 1}.{block}"
    if conv == "shortcut":
        return f"{stage}.downsample.{1 if norm else 0}.{leaf}"
    k = conv[-1]
    return f"{stage}.{'bn' if norm else 'conv'}{k}.{leaf}"


def prlz77_key(key: str) -> str:
    """prlz77/ResNeXt.pytorch (CIFAR) key → ours; its block indices are 0-based, stages 1-based."""
    if key.startswith("conv_1_3x3."):
        return "conv1." + key[len("conv_1_3x3.") :]
    if key.startswith("bn_1."):
        return "bn1." + key[len("bn_1.") :]
    if key.startswith("classifier."):
        return "fc." + key[len("classifier.") :]
    m = _PRLZ_BLOCK.match(key)
    if m:
        stage, block, part, leaf = m.groups()
        return f"layer{stage}.{block}.{_PRLZ_PARTS[part]}.{leaf}"
    return key


def add_missing_bn_counters(state: StateDict) -> StateDict:
    """Give every BN that lacks `num_batches_tracked` (Caffe2, Lua, FrozenBN) a zero counter."""
    out = dict(state)
    for key in state:
        if key.endswith(".running_mean"):
            counter = key[: -len("running_mean")] + "num_batches_tracked"
            out.setdefault(counter, torch.tensor(0, dtype=torch.long))
    return out
