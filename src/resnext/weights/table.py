"""The table of public ResNeXt checkpoints (facts from the zoos' own metadata), and tag lookup."""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from resnext.errors import WeightsError
from resnext.weights.preprocess import (
    DETECTRON2_CAFFE2,
    MMPRETRAIN,
    Preprocessing,
    imagenet,
    timm_crop_pct,
)

SOURCE_FORMATS = ("torchvision", "timm", "mmpretrain", "pycls", "lua_t7", "detectron2", "prlz77")
HASH_KINDS = ("sha256", "prefix", "none")


@dataclass(frozen=True)
class Result:
    """One published ImageNet-1k validation result at one evaluation size."""

    eval_size: int
    top1: float
    top5: float | None


@dataclass(frozen=True)
class WeightsEntry:
    """One public checkpoint: where it lives, how to verify it, what it was trained for and scores."""

    tag: str
    model: str
    url: str
    hash: str
    hash_kind: str
    source_format: str
    license: str
    num_classes: int
    preprocessing: Preprocessing
    stride_in_1x1: bool
    results: tuple[Result, ...]
    file_mb: float | None = None
    notes: str = ""

    def __post_init__(self) -> None:
        if self.hash_kind not in HASH_KINDS:
            raise WeightsError(f"{self.tag}: hash_kind {self.hash_kind!r} not in {HASH_KINDS}")
        if self.source_format not in SOURCE_FORMATS:
            raise WeightsError(f"{self.tag}: source_format {self.source_format!r} unknown")
        if (self.hash_kind == "none") != (self.hash == ""):
            raise WeightsError(f"{self.tag}: a hash is given exactly when hash_kind is not 'none'")

    @property
    def top1(self) -> float | None:
        """The first published top-1 (the one measured with `preprocessing`)."""
        return self.results[0].top1 if self.results else None

    @property
    def top5(self) -> float | None:
        return self.results[0].top5 if self.results else None

    @property
    def filename(self) -> str:
        return self.url.rsplit("/", 1)[-1]

    def transforms(self) -> Callable[[Any], Any]:
        """The evaluation transform of these weights (PIL image → normalised tensor)."""
        return self.preprocessing.transforms()

    @property
    def verified(self) -> bool:
        """False where no hash was published: the download cannot be checked."""
        return self.hash_kind != "none"


def _r(*triples: tuple[int, float, float | None]) -> tuple[Result, ...]:
    return tuple(Result(*t) for t in triples)


_TV = "https://download.pytorch.org/models/"
_RSB = "https://github.com/rwightman/pytorch-image-models/releases/download/v0.1-rsb-weights/"
_RW = "https://github.com/rwightman/pytorch-image-models/releases/download/v0.1-weights/"
_GLUON = "https://github.com/rwightman/pytorch-image-models/releases/download/v0.1-pretrained-gluonresnet/"
_TPU = "https://github.com/rwightman/pytorch-image-models/releases/download/v0.1-tpu-weights/"
_SWSL = "https://dl.fbaipublicfiles.com/semiweaksupervision/model_files/"
_MM = "https://download.openmmlab.com/mmclassification/v0/resnext/"
_PYCLS = "https://dl.fbaipublicfiles.com/pycls/dds_baselines/"
_LUA = "https://dl.fbaipublicfiles.com/resnext/imagenet_models/"

_TV_V1 = imagenet(256, 224)
_TV_V2 = imagenet(232, 224)
_TIMM = timm_crop_pct(224, 0.875, "bilinear")
_TIMM_GLUON = timm_crop_pct(224, 0.875, "bicubic")
_TIMM_R288 = timm_crop_pct(288, 1.0, "bicubic")  # _rcfg / _ttcfg test size 288 at crop 1.0
_TIMM_R3 = timm_crop_pct(224, 0.95, "bicubic")  # _r3cfg: test 224 at 0.95


def _hashed(url: str) -> str:
    """The hash part of a '<name>-<sha256 prefix>.<ext>' file name (torch.hub's convention)."""
    stem = url.rsplit("/", 1)[-1].split(".", 1)[0]
    return stem.rsplit("-", 1)[-1]


def _tv(
    tag: str,
    model: str,
    file: str,
    results: tuple[Result, ...],
    prep: Preprocessing,
    mb: float,
    notes: str = "",
) -> WeightsEntry:
    url = _TV + file
    return WeightsEntry(
        tag,
        model,
        url,
        _hashed(url),
        "prefix",
        "torchvision",
        "bsd-3-clause",
        1000,
        prep,
        False,
        results,
        mb,
        notes,
    )


def _timm(
    tag: str,
    url: str,
    results: tuple[Result, ...],
    prep: Preprocessing,
    license: str = "apache-2.0",
    notes: str = "",
) -> WeightsEntry:
    model = tag.split(".", 1)[0]
    hub = f"Hugging Face repo timm/{tag} holds the same weights."
    return WeightsEntry(
        tag,
        model,
        url,
        _hashed(url),
        "prefix",
        "timm",
        license,
        1000,
        prep,
        False,
        results,
        None,
        f"{notes} {hub}".strip(),
    )


_NC = "cc-by-nc-4.0"

_ENTRIES: tuple[WeightsEntry, ...] = (
    # ---- torchvision (TV/r meta: acc@1/acc@5, file size in MB) ----
    _tv(
        "resnext50_32x4d.tv_in1k",
        "resnext50_32x4d",
        "resnext50_32x4d-7cdf4587.pth",
        _r((224, 77.618, 93.698)),
        _TV_V1,
        95.789,
        "torchvision IMAGENET1K_V1; timm's tv_in1k (same file, resize 256): 77.632/93.674",
    ),
    _tv(
        "resnext50_32x4d.tv2_in1k",
        "resnext50_32x4d",
        "resnext50_32x4d-1a0047aa.pth",
        _r((224, 81.198, 95.340)),
        _TV_V2,
        95.833,
        "torchvision IMAGENET1K_V2 (DEFAULT); timm's tv2_in1k: 81.190/95.344 (224), 79.384 (176)",
    ),
    _tv(
        "resnext101_32x8d.tv_in1k",
        "resnext101_32x8d",
        "resnext101_32x8d-8ba56ff5.pth",
        _r((224, 79.312, 94.526)),
        _TV_V1,
        339.586,
        "torchvision IMAGENET1K_V1; timm's tv_in1k: 79.308/94.530",
    ),
    _tv(
        "resnext101_32x8d.tv2_in1k",
        "resnext101_32x8d",
        "resnext101_32x8d-110c445d.pth",
        _r((224, 82.834, 96.228)),
        _TV_V2,
        339.673,
        "torchvision IMAGENET1K_V2 (DEFAULT); timm's tv2_in1k: 82.832/96.234 (224), 81.990 (176)",
    ),
    _tv(
        "resnext101_64x4d.tv_in1k",
        "resnext101_64x4d",
        "resnext101_64x4d-173b62eb.pth",
        _r((224, 83.246, 96.454)),
        _TV_V2,
        319.318,
        "torchvision IMAGENET1K_V1 (DEFAULT); timm's tv_in1k evaluates the same file at "
        "resize 256: 82.978/96.252",
    ),
    # ---- timm (results-imagenet.csv; first result is at the recorded preprocessing). timm's
    # tv_in1k/tv2_in1k tags load the torchvision files above: one entry each, timm's numbers in notes.
    _timm(
        "resnext50_32x4d.a1h_in1k",
        _RSB + "resnext50_32x4d_a1h-0146ab0a.pth",
        _r((288, 82.016, 95.934), (224, 81.140, 95.320)),
        _TIMM_R288,
    ),
    _timm(
        "resnext50_32x4d.a1_in1k",
        _RSB + "resnext50_32x4d_a1_0-b5a91a1d.pth",
        _r((288, 81.480, 95.152), (224, 80.526, 94.458)),
        _TIMM_R288,
    ),
    _timm(
        "resnext50_32x4d.a2_in1k",
        _RSB + "resnext50_32x4d_a2_0-efc76add.pth",
        _r((288, 81.304, 95.114), (224, 80.444, 94.630)),
        _TIMM_R288,
    ),
    _timm(
        "resnext50_32x4d.a3_in1k",
        _RSB + "resnext50_32x4d_a3_0-3e450271.pth",
        _r((224, 79.258, 94.308), (160, 77.732, 93.314)),
        _TIMM_R3,
    ),
    _timm(
        "resnext50_32x4d.ra_in1k",
        _RW + "resnext50_32x4d_ra-d733960d.pth",
        _r((288, 80.720, 95.344), (224, 79.800, 94.608)),
        _TIMM_R288,
    ),
    _timm(
        "resnext50_32x4d.gluon_in1k",
        _GLUON + "gluon_resnext50_32x4d-e6a097c1.pth",
        _r((224, 79.354, 94.424)),
        _TIMM_GLUON,
    ),
    _timm(
        "resnext50_32x4d.fb_ssl_yfcc100m_ft_in1k",
        _SWSL + "semi_supervised_resnext50_32x4-ddb3e555.pth",
        _r((224, 80.316, 95.386)),
        _TIMM,
        _NC,
    ),
    _timm(
        "resnext50_32x4d.fb_swsl_ig1b_ft_in1k",
        _SWSL + "semi_weakly_supervised_resnext50_32x4-72679e44.pth",
        _r((224, 82.162, 96.224)),
        _TIMM,
        _NC,
    ),
    _timm(
        "resnext50d_32x4d.bt_in1k",
        _RW + "resnext50d_32x4d-103e99f8.pth",
        _r((288, 80.676, 95.426), (224, 79.672, 94.878)),
        _TIMM_R288,
        notes="deep stem (first_conv='conv1.0') and avg-pool shortcut",
    ),
    _timm(
        "resnext101_32x4d.gluon_in1k",
        _GLUON + "gluon_resnext101_32x4d-b253c8c4.pth",
        _r((224, 80.336, 94.908)),
        _TIMM_GLUON,
    ),
    _timm(
        "resnext101_32x4d.fb_ssl_yfcc100m_ft_in1k",
        _SWSL + "semi_supervised_resnext101_32x4-dc43570a.pth",
        _r((224, 80.936, 95.732)),
        _TIMM,
        _NC,
    ),
    _timm(
        "resnext101_32x4d.fb_swsl_ig1b_ft_in1k",
        _SWSL + "semi_weakly_supervised_resnext101_32x4-3f87e46b.pth",
        _r((224, 83.268, 96.760)),
        _TIMM,
        _NC,
    ),
    _timm(
        "resnext101_32x8d.fb_wsl_ig1b_ft_in1k",
        _TV + "ig_resnext101_32x8-c38310e5.pth",
        _r((224, 82.720, 96.624)),
        _TIMM,
        _NC,
    ),
    _timm(
        "resnext101_32x8d.fb_ssl_yfcc100m_ft_in1k",
        _SWSL + "semi_supervised_resnext101_32x8-2cfe2f8b.pth",
        _r((224, 81.620, 96.036)),
        _TIMM,
        _NC,
    ),
    _timm(
        "resnext101_32x8d.fb_swsl_ig1b_ft_in1k",
        _SWSL + "semi_weakly_supervised_resnext101_32x8-b4712904.pth",
        _r((224, 84.276, 97.188)),
        _TIMM,
        _NC,
    ),
    _timm(
        "resnext101_32x16d.fb_wsl_ig1b_ft_in1k",
        _TV + "ig_resnext101_32x16-c6f796b0.pth",
        _r((224, 84.166, 97.192)),
        _TIMM,
        _NC,
    ),
    _timm(
        "resnext101_32x32d.fb_wsl_ig1b_ft_in1k",
        _TV + "ig_resnext101_32x32-e4b90b00.pth",
        _r((224, 85.090, 97.442)),
        _TIMM,
        _NC,
    ),
    _timm(
        "resnext101_32x48d.fb_wsl_ig1b_ft_in1k",
        _TV + "ig_resnext101_32x48-3e41cc8a.pth",
        _r(),  # timm's results table has no row for it
        _TIMM,
        _NC,
    ),
    _timm(
        "resnext101_32x16d.fb_ssl_yfcc100m_ft_in1k",
        _SWSL + "semi_supervised_resnext101_32x16-15fffa57.pth",
        _r((224, 81.856, 96.084)),
        _TIMM,
        _NC,
    ),
    _timm(
        "resnext101_32x16d.fb_swsl_ig1b_ft_in1k",
        _SWSL + "semi_weakly_supervised_resnext101_32x16-f3559a9c.pth",
        _r((224, 83.340, 96.844)),
        _TIMM,
        _NC,
    ),
    _timm(
        "resnext101_64x4d.c1_in1k",
        _TPU + "resnext101_64x4d_c-0d0e0cc0.pth",
        _r((288, 83.158, 96.370), (224, 82.446, 95.920)),
        _TIMM_R288,
    ),
    _timm(
        "resnext101_64x4d.gluon_in1k",
        _GLUON + "gluon_resnext101_64x4d-f9a8e184.pth",
        _r((224, 80.640, 95.000)),
        _TIMM_GLUON,
    ),
    # ---- mmpretrain (configs/resnext/README.md; style='pytorch': stride in the 3×3) ----
    *(
        WeightsEntry(
            f"{model}.mmpretrain_in1k",
            model,
            _MM + file,
            _hashed(file),
            "prefix",
            "mmpretrain",
            "apache-2.0",
            1000,
            MMPRETRAIN,
            False,
            _r((224, t1, t5)),
            None,
            f"mmpretrain {mm_name}",
        )
        for model, mm_name, file, t1, t5 in (
            (
                "resnext50_32x4d",
                "resnext50-32x4d_8xb32_in1k",
                "resnext50_32x4d_b32x8_imagenet_20210429-56066e27.pth",
                77.90,
                93.66,
            ),
            (
                "resnext101_32x4d",
                "resnext101-32x4d_8xb32_in1k",
                "resnext101_32x4d_b32x8_imagenet_20210506-e0fa3dd5.pth",
                78.61,
                94.17,
            ),
            (
                "resnext101_32x8d",
                "resnext101-32x8d_8xb32_in1k",
                "resnext101_32x8d_b32x8_imagenet_20210506-23a247d5.pth",
                79.27,
                94.58,
            ),
            (
                "resnext152_32x4d",
                "resnext152-32x4d_8xb32_in1k",
                "resnext152_32x4d_b32x8_imagenet_20210524-927787be.pth",
                78.88,
                94.33,
            ),
        )
    ),
    # ---- pycls (MODEL_ZOO.md; top-1/top-5 error → accuracy). The dds baselines are AnyNet models,
    # whose bottleneck puts the stride on the 3×3; RESNET.STRIDE_1X1 (default True) is for TYPE resnet.
    *(
        WeightsEntry(
            f"{model}.pycls_in1k",
            model,
            f"{_PYCLS}{mid}/{file}",
            "",
            "none",
            "pycls",
            "mit",
            1000,
            imagenet(256, 224),
            False,
            _r((224, round(100 - e1, 3), round(100 - e5, 3))),
            None,
            f"pycls {name} (model id {mid}, MODEL.TYPE anynet); no hash published",
        )
        for model, name, mid, file, e1, e5 in (
            ("resnext50_32x4d", "ResNeXt-50", 161167411, "X-50-32x4d_dds_8gpu.pyth", 21.884, 6.062),
            (
                "resnext101_32x4d",
                "ResNeXt-101",
                161167590,
                "X-101-32x4d_dds_8gpu.pyth",
                20.664,
                5.392,
            ),
            (
                "resnext152_32x4d",
                "ResNeXt-152",
                162471172,
                "X-152-32x4d_dds_8gpu.pyth",
                20.386,
                5.318,
            ),
        )
    ),
    # ---- official Lua Torch7 release (README: single-crop top-1 error; no hashes, no top-5) ----
    *(
        WeightsEntry(
            f"{model}.fb_t7_in1k",
            model,
            _LUA + file,
            "",
            "none",
            "lua_t7",
            _NC,
            1000,
            imagenet(256, 224, "bicubic"),
            False,
            _r((224, 100 - err, None)),
            mb,
            "facebookresearch/ResNeXt; no hash published (download unverified); "
            "size given only approximately",
        )
        for model, file, err, mb in (
            ("resnext50_32x4d", "resnext_50_32x4d.t7", 22.2, 191.0),
            ("resnext101_32x4d", "resnext_101_32x4d.t7", 21.2, 338.0),
            ("resnext101_64x4d", "resnext_101_64x4d.t7", 20.4, 638.0),
        )
    ),
)

# Kept for reference but not a classification checkpoint of the ResNeXt registry.
DETECTRON2_PREPROCESSING = DETECTRON2_CAFFE2

WEIGHTS: dict[str, WeightsEntry] = {e.tag: e for e in _ENTRIES}
if len(WEIGHTS) != len(_ENTRIES):  # pragma: no cover - guards the table itself
    raise WeightsError("duplicate tag in the weights table")


# torchvision's DEFAULT member of each ResNeXt weights enum (zoo-facts, TV/r).
_TORCHVISION_DEFAULTS = {
    "resnext50_32x4d": "resnext50_32x4d.tv2_in1k",
    "resnext101_32x8d": "resnext101_32x8d.tv2_in1k",
    "resnext101_64x4d": "resnext101_64x4d.tv_in1k",
}


def _default_tags() -> dict[str, str]:
    """Each model's default weights: torchvision's DEFAULT where torchvision publishes the model,
    else its most accurate checkpoint with a published hash, preferring those a permissive
    licence covers over the non-commercial ones."""
    defaults = dict(_TORCHVISION_DEFAULTS)
    for model in sorted({e.model for e in _ENTRIES} - set(defaults)):
        verified = [e for e in _ENTRIES if e.model == model and e.verified]
        permissive = [e for e in verified if not e.license.startswith("cc-by-nc")]
        pool = permissive or verified
        if pool:
            defaults[model] = max(pool, key=lambda e: e.top1 or 0.0).tag
    return defaults


DEFAULT_TAGS: dict[str, str] = _default_tags()
if any(WEIGHTS[t].model != m for m, t in DEFAULT_TAGS.items()):  # pragma: no cover
    raise WeightsError("a default weights tag names another model")


def default_weights(model: str) -> str:
    """The tag of `model`'s default weights (torchvision's `weights="DEFAULT"`, timm's
    `pretrained=True`); a WeightsError where no checkpoint of that model is published."""
    from resnext.models.zoo import MODELS  # the canonical name of an alias

    name = MODELS.get(model).name
    if name not in DEFAULT_TAGS:
        having = ", ".join(sorted(DEFAULT_TAGS))
        raise WeightsError(
            f"weights 'DEFAULT': no published checkpoint of {name!r} (models with weights: {having})"
        )
    return DEFAULT_TAGS[name]


def get_weights(tag: str) -> WeightsEntry:
    """The table entry of `tag`; an unknown tag is a WeightsError naming the closest tags."""
    if tag in WEIGHTS:
        return WEIGHTS[tag]
    close = difflib.get_close_matches(tag, list(WEIGHTS), n=5, cutoff=0.5)
    hint = f"closest: {', '.join(close)}" if close else "see resnext.weights.list_weights()"
    raise WeightsError(f"unknown weights tag {tag!r}; {hint}")


def list_weights(model: str | None = None) -> list[str]:
    """All tags, or the tags whose model is `model`, sorted."""
    return sorted(t for t, e in WEIGHTS.items() if model is None or e.model == model)


def list_pretrained(pattern: str = "*") -> list[str]:
    """Weights tags ('model.tag') matching a shell-style pattern, sorted (timm's `list_pretrained`;
    an empty pattern lists every tag)."""
    if not isinstance(pattern, str):
        raise TypeError(f"pattern: expected a string, got {type(pattern).__name__}")
    return sorted(fnmatch.filter(WEIGHTS, pattern or "*"))
