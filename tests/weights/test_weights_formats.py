"""Every supported checkpoint layout, written by the test from a random tiny model, loads back exactly.

The renamings below go from our (torchvision) keys to each library's keys, written from the
zoo-facts cheat-sheet independently of the package's converters (which go the other way).
"""

from __future__ import annotations

import pickle
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

import resnext
from resnext.errors import WeightsError
from resnext.weights import build_with_weights, convert_checkpoint, detect_format, load_weights

X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def random_model(name: str = "resnext_tiny_in", **overrides: object) -> torch.nn.Module:
    """A tiny model with every float tensor (BN statistics included) randomised."""
    model = resnext.create_model(name, **overrides)
    with torch.no_grad():
        for key, value in model.state_dict().items():
            if value.is_floating_point():
                value.copy_(torch.randn_like(value) * 0.5)
                if key.endswith("running_var"):
                    value.abs_().add_(0.5)
    return model.eval()


def out(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(X)


def renamed(model: torch.nn.Module, rule: Callable[[str], str | None]) -> dict[str, torch.Tensor]:
    state = {}
    for key, value in model.state_dict().items():
        new = rule(key)
        if new is not None:
            state[new] = value.clone()
    return state


_BLOCK = re.compile(r"^layer(\d)\.(\d+)\.(.+)$")


def to_pycls(key: str) -> str:
    parts = {"conv1": "f.a", "bn1": "f.a_bn", "conv2": "f.b", "bn2": "f.b_bn", "conv3": "f.c",
             "bn3": "f.c_bn", "downsample.0": "proj", "downsample.1": "bn"}  # fmt: skip
    m = _BLOCK.match(key)
    if m:
        stage, block, rest = m.groups()
        for ours, theirs in parts.items():
            if rest.startswith(ours + "."):
                return f"s{stage}.b{int(block) + 1}.{theirs}{rest[len(ours) :]}"
    for ours, theirs in (("conv1.", "stem.conv."), ("bn1.", "stem.bn."), ("fc.", "head.fc.")):
        if key.startswith(ours):
            return theirs + key[len(ours) :]
    raise AssertionError(key)


def to_d2(key: str) -> str | None:
    if key.endswith("num_batches_tracked"):
        return None  # FrozenBN has no counter
    m = _BLOCK.match(key)
    if m:
        stage, block, rest = m.groups()
        head = f"backbone.bottom_up.res{int(stage) + 1}.{block}."
        rest = re.sub(r"^bn(\d)\.", r"conv\1.norm.", rest)
        rest = rest.replace("downsample.0.", "shortcut.").replace("downsample.1.", "shortcut.norm.")
        return head + rest
    if key.startswith("conv1."):
        return "backbone.bottom_up.stem.conv1." + key[len("conv1.") :]
    if key.startswith("bn1."):
        return "backbone.bottom_up.stem.conv1.norm." + key[len("bn1.") :]
    return None  # a detection model has no ImageNet classifier


def to_prlz77(key: str) -> str:
    parts = {"conv1": "conv_reduce", "bn1": "bn_reduce", "conv2": "conv_conv", "bn2": "bn",
             "conv3": "conv_expand", "bn3": "bn_expand", "downsample.0": "shortcut.shortcut_conv",
             "downsample.1": "shortcut.shortcut_bn"}  # fmt: skip
    m = _BLOCK.match(key)
    if m:
        stage, block, rest = m.groups()
        for ours, theirs in parts.items():
            if rest.startswith(ours + "."):
                return f"module.stage_{stage}.stage_{stage}_bottleneck_{block}.{theirs}{rest[len(ours) :]}"
    for ours, theirs in (("conv1.", "conv_1_3x3."), ("bn1.", "bn_1."), ("fc.", "classifier.")):
        if key.startswith(ours):
            return "module." + theirs + key[len(ours) :]
    raise AssertionError(key)


def test_torchvision_state_dict(tmp_path: Path) -> None:
    src = random_model(depths=(2, 1, 1, 1))
    path = tmp_path / "tv.pth"
    torch.save(src.state_dict(), path)
    loaded = load_weights(path)
    assert loaded.source_format == "torchvision" and loaded.num_classes == 10
    model = build_with_weights("resnext_tiny_in", path, depths=(2, 1, 1, 1))
    assert torch.equal(out(model), out(src))


def test_timm_training_checkpoint_with_module_prefix(tmp_path: Path) -> None:
    src = random_model("resnext_tiny_in", stem="deep", stem_width=8, avg_down=True)
    state = {"module." + k: v for k, v in src.state_dict().items()}
    path = tmp_path / "timm.pth.tar"
    torch.save({"epoch": 3, "arch": "x", "state_dict": state}, path)
    loaded = load_weights(path)
    assert loaded.source_format == "timm"
    model = build_with_weights("resnext_tiny_in", loaded, stem="deep", stem_width=8, avg_down=True)
    assert torch.equal(out(model), out(src))


def test_mmpretrain_checkpoint(tmp_path: Path) -> None:
    src = random_model(depths=(2, 1, 1, 1))
    state = renamed(src, lambda k: ("head." + k) if k.startswith("fc.") else "backbone." + k)
    meta = {"epoch": 100, "CLASSES": [f"c{i}" for i in range(10)], "config": "style='pytorch'"}
    path = tmp_path / "mm.pth"
    torch.save({"meta": meta, "state_dict": state}, path)
    assert detect_format(torch.load(path, weights_only=True)) == "mmpretrain"
    loaded = load_weights(path)
    assert loaded.source_format == "mmpretrain" and loaded.spec_overrides["stride_in_1x1"] is False
    assert loaded.preprocessing.value_range == 255.0 and loaded.class_names[3] == "c3"
    model = build_with_weights("resnext_tiny_in", path, depths=(2, 1, 1, 1))
    assert torch.equal(out(model), out(src)) and model.class_names == loaded.class_names


@pytest.mark.parametrize(("cfg", "stride_in_1x1"), [("MODEL:\n  TYPE: resnet\n", True),
                                                   ("MODEL:\n  TYPE: anynet\n", False)])  # fmt: skip
def test_pycls_checkpoint(tmp_path: Path, cfg: str, stride_in_1x1: bool) -> None:
    src = random_model(depths=(2, 1, 1, 1), stride_in_1x1=stride_in_1x1)
    ckpt = {"epoch": 99, "model_state": renamed(src, to_pycls), "ema_state": None,
            "optimizer_state": {}, "cfg": cfg}  # fmt: skip
    path = tmp_path / "X.pyth"
    torch.save(ckpt, path)
    loaded = load_weights(path)
    assert loaded.source_format == "pycls"
    assert loaded.spec_overrides["stride_in_1x1"] is stride_in_1x1
    model = build_with_weights("resnext_tiny_in", path, depths=(2, 1, 1, 1))
    assert model.spec.stride_in_1x1 is stride_in_1x1
    assert torch.equal(out(model), out(src))


def test_detectron2_pickle_of_numpy_arrays(tmp_path: Path) -> None:
    pytest.importorskip(
        "resnext.io.safe_pickle", reason="the restricted unpickler is not in the tree"
    )
    src = random_model(depths=(2, 1, 1, 1))
    arrays = {k: v.numpy().copy() for k, v in renamed(src, to_d2).items()}
    arrays["proposal_generator.rpn_head.conv.weight"] = np.zeros((4, 4, 3, 3), np.float32)
    path = tmp_path / "model_final.pkl"
    with open(path, "wb") as f:
        pickle.dump({"model": arrays, "__author__": "Detectron2 Model Zoo"}, f, protocol=2)
    loaded = load_weights(path)
    assert loaded.source_format == "detectron2" and loaded.num_classes is None
    assert loaded.preprocessing.channel_order == "BGR" and loaded.preprocessing.value_range == 255.0
    # A grouped (ResNeXt) detectron2 backbone keeps the stride in the 3×3, as its X-101 configs.
    assert loaded.spec_overrides["stride_in_1x1"] is False
    model = build_with_weights("resnext_tiny_in", path, depths=(2, 1, 1, 1))
    assert torch.equal(_features(model), _features(src))


def test_detectron2_c4_model_without_res5_backbone_is_refused(tmp_path: Path) -> None:
    pytest.importorskip(
        "resnext.io.safe_pickle", reason="the restricted unpickler is not in the tree"
    )
    # A C4 detector keeps res5 under roi_heads, which is not read as the backbone's layer4.
    src = random_model(depths=(2, 1, 1, 1))
    arrays = {
        k.replace("backbone.bottom_up.res5.", "roi_heads.res5.").replace("bottom_up.", ""): (
            v.numpy().copy()
        )
        for k, v in renamed(src, to_d2).items()
    }
    path = tmp_path / "model_final_c4.pkl"
    with open(path, "wb") as f:
        pickle.dump({"model": arrays, "__author__": "Detectron2 Model Zoo"}, f, protocol=2)
    with pytest.raises(WeightsError, match=r"(?s)layer4\.0\.conv1\.weight.*roi_heads"):
        build_with_weights("resnext_tiny_in", path, depths=(2, 1, 1, 1))


def _features(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model.eval().forward_features(X)


def test_prlz77_cifar_checkpoint(tmp_path: Path) -> None:
    src = random_model("resnext_tiny", depths=(2, 1, 1))
    path = tmp_path / "model.pytorch"
    torch.save(renamed(src, to_prlz77), path)
    loaded = load_weights(path)
    assert loaded.source_format == "prlz77"
    model = build_with_weights("resnext_tiny", path, depths=(2, 1, 1))
    assert torch.equal(out(model), out(src))


def test_safetensors_state_dict_without_sidecar(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    src = random_model()
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, path)
    model = build_with_weights("resnext_tiny_in", path)
    assert torch.equal(out(model), out(src))


def test_semantic_flags_follow_the_source_conventions() -> None:
    # zoo-facts: MMP style='caffe' and MSRA detectron2 ResNets put the stride on the 1×1; files
    # converted from torchvision (matching_heuristics) expect RGB 0–255 and keep it in the 3×3.
    resnet = random_model("resnext_tiny_in", cardinality=1, base_width=8)
    mm = {"meta": {"config": "backbone=dict(type='ResNeXt', style='caffe')"},
          "state_dict": renamed(resnet, lambda k: "backbone." + k if not k.startswith("fc.") else "head." + k)}  # fmt: skip
    assert convert_checkpoint(mm, "mm").spec_overrides["stride_in_1x1"] is True
    d2 = {"model": {k: v.numpy() for k, v in renamed(resnet, to_d2).items()}}
    msra = convert_checkpoint(d2, "msra")
    assert (
        msra.spec_overrides["stride_in_1x1"] is True and msra.preprocessing.channel_order == "BGR"
    )
    converted = convert_checkpoint(
        {**d2, "matching_heuristics": True, "__author__": "torchvision"}, "tv"
    )
    assert converted.spec_overrides["stride_in_1x1"] is False
    assert (
        converted.preprocessing.channel_order == "RGB"
        and converted.preprocessing.value_range == 255.0
    )


def test_unrecognised_layout_is_one_clear_error() -> None:
    with pytest.raises(WeightsError, match="unrecognised checkpoint layout"):
        convert_checkpoint({"encoder.weight": torch.zeros(2)}, "x")
    with pytest.raises(WeightsError, match="expected a tensor"):
        convert_checkpoint({"conv1.weight": "oops"}, "x")
