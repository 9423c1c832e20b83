"""The public weights table: facts against the zoo-facts reference, lookup and its errors."""

from __future__ import annotations

import pytest
import torch

import resnext
from resnext.errors import WeightsError
from resnext.weights import WEIGHTS, default_weights, get_weights, list_weights


def test_torchvision_entries_match_published_meta() -> None:
    # torchvision's meta (zoo-facts: URL, sha256 prefix, acc@1/acc@5, resize).
    expected = {
        "resnext50_32x4d.tv_in1k": (
            "resnext50_32x4d-7cdf4587.pth",
            "7cdf4587",
            77.618,
            93.698,
            256,
        ),
        "resnext50_32x4d.tv2_in1k": (
            "resnext50_32x4d-1a0047aa.pth",
            "1a0047aa",
            81.198,
            95.340,
            232,
        ),
        "resnext101_32x8d.tv_in1k": (
            "resnext101_32x8d-8ba56ff5.pth",
            "8ba56ff5",
            79.312,
            94.526,
            256,
        ),
        "resnext101_32x8d.tv2_in1k": (
            "resnext101_32x8d-110c445d.pth",
            "110c445d",
            82.834,
            96.228,
            232,
        ),
        "resnext101_64x4d.tv_in1k": (
            "resnext101_64x4d-173b62eb.pth",
            "173b62eb",
            83.246,
            96.454,
            232,
        ),
    }
    for tag, (file, prefix, top1, top5, resize) in expected.items():
        e = get_weights(tag)
        assert e.url == "https://download.pytorch.org/models/" + file
        assert (e.hash, e.hash_kind) == (prefix, "prefix")
        assert (e.top1, e.top5) == (top1, top5)
        assert (e.preprocessing.resize, e.preprocessing.crop) == (resize, 224)
        assert e.source_format == "torchvision" and not e.stride_in_1x1


def test_required_tags_are_present_with_registered_models() -> None:
    required = [
        *(f"resnext50_32x4d.{t}_in1k" for t in ("a1h", "a1", "a2", "a3", "ra", "gluon")),
        "resnext50_32x4d.fb_ssl_yfcc100m_ft_in1k",
        "resnext50_32x4d.fb_swsl_ig1b_ft_in1k",
        "resnext50d_32x4d.bt_in1k",
        "resnext101_32x4d.gluon_in1k",
        "resnext101_32x8d.fb_wsl_ig1b_ft_in1k",
        "resnext101_32x16d.fb_swsl_ig1b_ft_in1k",
        "resnext101_64x4d.c1_in1k",
        "resnext101_64x4d.gluon_in1k",
    ]
    for tag in required:
        assert tag in WEIGHTS, tag
    registered = set(resnext.list_models())
    for entry in WEIGHTS.values():
        assert entry.model in registered, entry.tag
        assert entry.num_classes == 1000


def test_timm_hash_is_the_filename_suffix() -> None:
    e = get_weights("resnext50_32x4d.a1h_in1k")
    assert e.url.endswith("resnext50_32x4d_a1h-0146ab0a.pth") and e.hash == "0146ab0a"
    assert (e.top1, e.top5) == (82.016, 95.934)  # results-imagenet.csv at 288
    assert e.results[1].eval_size == 224 and e.results[1].top1 == 81.140
    assert e.preprocessing.interpolation == "bicubic"


def test_mmpretrain_entries_use_0_255_inputs() -> None:
    tags = list_weights()
    mm = [get_weights(t) for t in tags if t.endswith(".mmpretrain_in1k")]
    assert {e.model for e in mm} == {
        "resnext50_32x4d",
        "resnext101_32x4d",
        "resnext101_32x8d",
        "resnext152_32x4d",
    }
    e = get_weights("resnext50_32x4d.mmpretrain_in1k")
    assert e.hash == "56066e27" and e.top1 == 77.90
    assert e.preprocessing.value_range == 255.0 and e.preprocessing.mean == (
        123.675,
        116.28,
        103.53,
    )


def test_pycls_and_lua_have_no_published_hash() -> None:
    py = get_weights("resnext50_32x4d.pycls_in1k")
    assert py.hash_kind == "none" and not py.verified
    assert py.top1 == pytest.approx(100 - 21.884) and py.top5 == pytest.approx(100 - 6.062)
    assert py.url.endswith("161167411/X-50-32x4d_dds_8gpu.pyth")
    lua = [get_weights(t) for t in list_weights() if t.endswith(".fb_t7_in1k")]
    assert len(lua) == 3 and all(e.hash_kind == "none" and e.license == "cc-by-nc-4.0" for e in lua)
    assert get_weights("resnext101_64x4d.fb_t7_in1k").top1 == pytest.approx(100 - 20.4)


def test_list_weights_filters_by_model() -> None:
    tags = list_weights("resnext101_64x4d")
    assert tags == sorted(tags) and len(tags) == 4
    assert all(get_weights(t).model == "resnext101_64x4d" for t in tags)
    assert list_weights("no_such_model") == []


def test_unknown_tag_names_the_closest() -> None:
    with pytest.raises(WeightsError) as info:
        get_weights("resnext50_32x4d.tv_in1")
    assert "resnext50_32x4d.tv_in1k" in str(info.value)


def test_default_weights_are_torchvisions_default_else_the_best_verified_permissive() -> None:
    # torchvision's DEFAULT members (zoo-facts TV/r): V2 for ResNeXt-50 and 101 32x8d (hashes
    # 1a0047aa, 110c445d), V1 for 101 64x4d (173b62eb).
    assert get_weights(default_weights("resnext50_32x4d")).url.endswith("-1a0047aa.pth")
    assert get_weights(default_weights("resnext101_32x8d")).url.endswith("-110c445d.pth")
    assert get_weights(default_weights("resnext101_64x4d")).url.endswith("-173b62eb.pth")
    # Without torchvision weights: gluon's 80.336 is the best hashed, permissive-licence
    # ResNeXt-101 32x4d (fb's semi-supervised ones are CC-BY-NC, pycls's are unhashed).
    assert default_weights("resnext101_32x4d") == "resnext101_32x4d.gluon_in1k"
    assert default_weights("resnext50-32x4d_8xb32_in1k") == "resnext50_32x4d.tv2_in1k"  # alias
    with pytest.raises(WeightsError, match="no published checkpoint of 'resnext29_8x64d'"):
        default_weights("resnext29_8x64d")
    assert resnext.list_models("resnext50*", pretrained=True) == [
        "resnext50_32x4d",
        "resnext50d_32x4d",
    ]
    assert resnext.list_pretrained("resnext101_64x4d.*") == list_weights("resnext101_64x4d")
    assert resnext.is_model("resnext50_32x4d") and not resnext.is_model("resnext50_32x5d")


def _by_hand(image, resize: int, crop: int, scale: float, mean, std, bgr: bool = False):
    # torchvision's eval recipe written out: short side to `resize` (bilinear), centre `crop`.
    import numpy as np
    from PIL import Image

    w, h = image.size
    size = (resize, round(h * resize / w)) if w < h else (round(w * resize / h), resize)
    big = np.asarray(image.resize(size, Image.BILINEAR), dtype=np.float64)
    top, left = (big.shape[0] - crop) // 2, (big.shape[1] - crop) // 2
    x = big[top : top + crop, left : left + crop] / (255.0 / scale)
    if bgr:
        x = x[..., ::-1]
    return torch.from_numpy(((x - np.array(mean)) / np.array(std)).transpose(2, 0, 1).copy())


def test_weights_transforms_are_their_evaluation_recipe() -> None:
    import numpy as np
    from PIL import Image

    from resnext.weights.preprocess import DETECTRON2_CAFFE2

    pixels = np.random.default_rng(0).integers(0, 256, (200, 300, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    tv2 = get_weights("resnext50_32x4d.tv2_in1k")  # resize 232, crop 224 (zoo-facts)
    want = _by_hand(image, 232, 224, 1.0, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    torch.testing.assert_close(tv2.transforms()(image).double(), want, atol=2e-5, rtol=0)
    mm = get_weights("resnext50_32x4d.mmpretrain_in1k").preprocessing  # 0-255 scale
    want = _by_hand(image, 256, 224, 255.0, (123.675, 116.28, 103.53), (58.395, 57.12, 57.375))
    torch.testing.assert_close(mm.transforms()(image).double(), want, atol=2e-4, rtol=0)
    bgr = _by_hand(image, 256, 224, 255.0, (103.53, 116.28, 123.675), (57.375, 57.12, 58.395), True)
    torch.testing.assert_close(
        DETECTRON2_CAFFE2.transforms()(image).double(), bgr, atol=2e-4, rtol=0
    )
    assert tv2.preprocessing.transforms(crop=112)(image).shape == (3, 112, 112)
    model = resnext.create_model("resnext_tiny")  # no weights: its layout's default
    assert resnext.preprocessing_of(model).crop == 32
    with pytest.raises(WeightsError, match="crop"):
        tv2.preprocessing.transforms(crop=0)
