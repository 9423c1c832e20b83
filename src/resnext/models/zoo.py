"""The named networks of the paper's tables and of the public model zoos, as a table of specs."""

from __future__ import annotations

from resnext.models.registry import ModelEntry, Registry
from resnext.models.spec import ModelSpec, cifar_spec, imagenet_spec


def _in(depth: int, c: int, d: int, source: str, *aliases: str, **opts: object) -> tuple:
    return (imagenet_spec(depth, c, d, **opts), source, aliases)  # type: ignore[arg-type]


def _cifar(depth: int, c: int, d: int, source: str, *aliases: str, **opts: object) -> tuple:
    return (cifar_spec(depth, c, d, **opts), source, aliases)  # type: ignore[arg-type]


# name: (spec, source, aliases). Widths follow Table 2's "1x complexity" pairs (C, d).
_TABLE: dict[str, tuple] = {
    # ResNet/ResNeXt-50 at preserved complexity (Table 3 top)
    "resnet50": _in(50, 1, 64, "paper Table 1/3 (ResNet-50, 1x64d)"),
    "resnext50_2x40d": _in(50, 2, 40, "paper Table 3"),
    "resnext50_4x24d": _in(50, 4, 24, "paper Table 3"),
    "resnext50_8x14d": _in(50, 8, 14, "paper Table 3"),
    "resnext50_32x4d": _in(
        50, 32, 4, "paper Table 1/3; torchvision; timm; pycls X-50", "resnext50-32x4d_8xb32_in1k"
    ),
    # ResNet/ResNeXt-101 at preserved complexity (Table 3 bottom) and 2x complexity (Table 4)
    "resnet101": _in(101, 1, 64, "paper Table 3/4 (ResNet-101, 1x64d)"),
    "resnext101_2x40d": _in(101, 2, 40, "paper Table 3"),
    "resnext101_4x24d": _in(101, 4, 24, "paper Table 3"),
    "resnext101_8x14d": _in(101, 8, 14, "paper Table 3"),
    "resnext101_32x4d": _in(
        101, 32, 4, "paper Table 3/4; timm; pycls X-101", "resnext101-32x4d_8xb32_in1k"
    ),
    "resnext101_2x64d": _in(101, 2, 64, "paper Table 4"),
    "resnext101_64x4d": _in(101, 64, 4, "paper Table 4/5; torchvision; timm"),
    "resnet101_1x100d": _in(101, 1, 100, "paper Table 4 (wider ResNet-101)"),
    "resnet152": _in(152, 1, 64, "He et al. 2016 (ResNet-152)"),
    # Table 4's ResNet-200 is [15]'s pre-activation network "implemented in [11]"
    # (fb.resnet.torch's preresnet): 21.7 / 5.8 % top-1/top-5 error.
    "resnet200": _in(
        200, 1, 64, "paper Table 4 (pre-activation ResNet-200, He et al. ECCV 2016)", preact=True
    ),
    "resnext101_32x8d": _in(
        101, 32, 8, "torchvision; timm; mmpretrain; detectron2", "resnext101-32x8d_8xb32_in1k"
    ),
    "resnext101_32x16d": _in(101, 32, 16, "timm (Instagram/semi-weakly supervised weights)"),
    # Mahajan et al. 2018's largest Instagram-pretrained ResNeXts (torch.hub WSL-Images; timm)
    "resnext101_32x32d": _in(101, 32, 32, "timm; WSL-Images (Instagram weakly supervised)"),
    "resnext101_32x48d": _in(101, 32, 48, "timm; WSL-Images (Instagram weakly supervised)"),
    "resnext152_32x4d": _in(152, 32, 4, "mmpretrain; pycls X-152", "resnext152-32x4d_8xb32_in1k"),
    "resnext50d_32x4d": _in(
        50, 32, 4, "timm (deep stem, avg-pool shortcut)", stem="deep", stem_width=32, avg_down=True
    ),
    # Ablations of Sec. 5.1 ("w/o residual") and the Caffe/MSRA stride placement
    "resnet50_noresidual": _in(50, 1, 64, "paper Sec. 5.1 (w/o residual)", residual=False),
    "resnext50_32x4d_noresidual": _in(50, 32, 4, "paper Sec. 5.1 (w/o residual)", residual=False),
    # SE-ResNeXt (Hu et al., the ILSVRC 2017 winner built on ResNeXt), timm's names
    "seresnext50_32x4d": _in(50, 32, 4, "SENet (Hu et al. 2018); timm", se_reduction=16),
    "seresnext101_32x4d": _in(101, 32, 4, "SENet (Hu et al. 2018); timm", se_reduction=16),
    # CIFAR (Sec. 5.3, Table 7, Fig. 7)
    "resnext29_8x64d": _cifar(29, 8, 64, "paper Table 7"),
    "resnext29_16x64d": _cifar(29, 16, 64, "paper Table 7"),
    "resnet29_1x64d": _cifar(29, 1, 64, "paper Fig. 7 (CIFAR baseline template)"),
    "resnext29_8x64d_preact": _cifar(
        29, 8, 64, "arXiv v1 CIFAR results (pre-activation blocks)", preact=True
    ),
    # Small CPU-friendly CIFAR models for demos, tests and the CPU recipe
    "resnext29_4x16d": _cifar(29, 4, 16, "CPU-sized ResNeXt-29 (3.2 M params)"),
    "resnet29_1x45d": _cifar(29, 1, 45, "ResNet-29 at the complexity of resnext29_4x16d (solver)"),
    "resnext29_2x16d_w128": _cifar(
        29, 2, 16, "narrow CPU demo model (outputs 128/256/512)", out_width=128
    ),
    "resnext_tiny": (
        ModelSpec(
            depths=(1, 1, 1),
            cardinality=2,
            base_width=4,
            stem="cifar",
            stem_width=16,
            out_width=32,
            num_classes=10,
        ),
        "tiny CIFAR-layout model for tests (not a paper model)",
        (),
    ),
    "resnext_tiny_in": (
        ModelSpec(
            depths=(1, 1, 1, 1),
            cardinality=4,
            base_width=2,
            stem_width=16,
            out_width=32,
            num_classes=10,
        ),
        "tiny ImageNet-layout model for tests (not a paper model)",
        (),
    ),
}


def populate(registry: Registry) -> Registry:
    """Register every entry of the table into `registry`."""
    for name, (spec, source, aliases) in _TABLE.items():
        registry.register(ModelEntry(name=name, spec=spec, source=source, aliases=tuple(aliases)))
    return registry


MODELS: Registry = populate(Registry())
