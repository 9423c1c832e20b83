"""The generic network: stem → stages of residual blocks → global pool → classifier, built from a ModelSpec."""

from __future__ import annotations

import math

import torch
from torch import nn

from resnext.models.blocks import BLOCKS, BlockGeometry, PreActBottleneck
from resnext.models.checkpointing import checkpointed
from resnext.models.layers import conv3x3, norm_act
from resnext.models.spec import ModelSpec


def _make_stem(spec: ModelSpec) -> tuple[nn.Module, nn.Module, nn.Module]:
    """(conv1, bn1, maxpool) with torchvision/timm key names for each stem kind."""
    w, c_in = spec.stem_width, spec.in_chans
    if spec.stem == "imagenet":
        conv: nn.Module = nn.Conv2d(c_in, w, kernel_size=7, stride=2, padding=3, bias=False)
    elif spec.stem == "deep":
        # Three 3×3 convolutions replace the 7×7 (keys conv1.0/.1/.3/.4/.6, as timm's 'd' models).
        conv = nn.Sequential(
            conv3x3(c_in, w, stride=2),
            nn.BatchNorm2d(w),
            nn.ReLU(inplace=True),
            conv3x3(w, w),
            nn.BatchNorm2d(w),
            nn.ReLU(inplace=True),
            conv3x3(w, 2 * w),
        )
    else:
        conv = conv3x3(c_in, w)
    # A pre-activation CIFAR network normalises inside its first block, so its stem is a bare conv.
    bn: nn.Module = (
        nn.Identity() if spec.preact and spec.stem == "cifar" else nn.BatchNorm2d(spec.stem_out)
    )
    pool: nn.Module = (
        nn.Identity() if spec.stem == "cifar" else nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
    )
    return conv, bn, pool


def _make_stage(spec: ModelSpec, k: int, in_ch: int) -> nn.Sequential:
    width = spec.stage_bottleneck_widths[k]
    out_ch = spec.stage_out_widths[k]
    blocks: list[nn.Module] = []
    for i in range(spec.depths[k]):
        geo = BlockGeometry(
            in_ch if i == 0 else out_ch,
            width,
            out_ch,
            spec.cardinality,
            spec.stage_strides[k] if i == 0 else 1,
            spec.stride_in_1x1,
        )
        if spec.preact:
            block: nn.Module = PreActBottleneck(
                geo,
                residual=spec.residual,
                avg_down=spec.avg_down,
                se_reduction=spec.se_reduction,
                # Only a stem with its own BN-ReLU hands the first block an activated input.
                input_activated=k == 0 and i == 0 and spec.stem != "cifar",
            )
        else:
            block = BLOCKS[spec.block_form](
                geo, residual=spec.residual, avg_down=spec.avg_down, se_reduction=spec.se_reduction
            )
        blocks.append(block)
    return nn.Sequential(*blocks)


class ResNeXt(nn.Module):
    """A ResNeXt (or, with cardinality 1, ResNet) network with torchvision's module and key names."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.spec = spec
        self.conv1, self.bn1, self.maxpool = _make_stem(spec)
        self.relu = nn.ReLU(inplace=True)
        self._stem_act = not isinstance(self.bn1, nn.Identity)
        in_ch = spec.stem_out
        self.stage_names: tuple[str, ...] = tuple(f"layer{k + 1}" for k in range(spec.num_stages))
        for k, name in enumerate(self.stage_names):
            self.add_module(name, _make_stage(spec, k, in_ch))
            in_ch = spec.stage_out_widths[k]
        # Pre-activation networks end with the BN-ReLU their last block left out.
        self.final_bn = nn.BatchNorm2d(in_ch) if spec.preact else None
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.num_features = in_ch
        self.num_classes = spec.num_classes
        self.fc: nn.Module = self._make_classifier(spec.num_classes)
        self.grad_checkpointing = False
        self.reset_parameters()

    # ---- initialisation ----------------------------------------------------------------------
    def reset_parameters(self) -> None:
        """He et al. (2015) initialisation of every conv (fan-out, as fb.resnet.torch); BN γ=1, β=0."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if isinstance(self.fc, nn.Linear):
            self._init_classifier(self.fc)
        if self.spec.zero_init_last_bn:
            for stage in self.stages():
                for block in stage:
                    # Each residual branch then starts as zero, so every block starts as identity.
                    target = block.conv3.weight if self.spec.preact else block.bn3.weight
                    nn.init.zeros_(target)

    @staticmethod
    def _init_classifier(fc: nn.Linear) -> None:
        bound = 1.0 / math.sqrt(fc.in_features)
        nn.init.uniform_(fc.weight, -bound, bound)
        nn.init.zeros_(fc.bias)

    def _make_classifier(self, num_classes: int) -> nn.Module:
        if num_classes == 0:
            return nn.Identity()
        return nn.Linear(self.num_features, num_classes)

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the classifier by a freshly initialised one (0 removes it: pooled features out).

        `global_pool` is timm's argument, so timm-style calls work: None or 'avg' (the only pooling
        this network has)."""
        if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 0:
            raise ValueError(f"num_classes: expected an int >= 0, got {num_classes!r}")
        if global_pool not in (None, "avg"):
            raise ValueError(f"global_pool: expected None or 'avg', got {global_pool!r}")
        param = next(self.parameters())
        self.fc = self._make_classifier(num_classes).to(device=param.device, dtype=param.dtype)
        if isinstance(self.fc, nn.Linear):
            self._init_classifier(self.fc)
        self.num_classes = num_classes
        self.spec = self.spec.replace(num_classes=num_classes)

    def get_classifier(self) -> nn.Module:
        return self.fc

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in backward instead of keeping them (timm's name):
        training memory falls to about the block outputs plus one block's activations, for one
        more forward pass per step. Values, gradients and batch-norm statistics are unchanged."""
        self.grad_checkpointing = bool(enable)

    def _stage(self, stage: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
        if not (self.grad_checkpointing and torch.is_grad_enabled()):
            return stage(x)
        # Block by block rather than the stage at once: a bottleneck keeps ~8 maps for its
        # backward, so only its output is kept between blocks (a stage would keep all of them
        # while it is recomputed, and a 3-stage CIFAR network has one stage of half its maps).
        for block in stage:
            x = checkpointed(block, x)
        return x

    # ---- structure ---------------------------------------------------------------------------
    def stages(self) -> list[nn.Sequential]:
        return [getattr(self, name) for name in self.stage_names]

    @property
    def feature_info(self) -> list[dict[str, object]]:
        """Channels, stride and module name of each stage output (for detection/segmentation necks)."""
        stem_reduction = 1 if self.spec.stem == "cifar" else 4
        info, reduction = [], stem_reduction
        for k, name in enumerate(self.stage_names):
            reduction *= self.spec.stage_strides[k]
            info.append(
                {"module": name, "num_chs": self.spec.stage_out_widths[k], "reduction": reduction}
            )
        return info

    # ---- forward -----------------------------------------------------------------------------
    def forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        x = norm_act(self.bn1, self.relu, x) if self._stem_act else self.bn1(x)
        return self.maxpool(x)

    def forward_stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The output of every stage (strides 4/8/16/32 for ImageNet layouts, 1/2/4 for CIFAR)."""
        x = self.forward_stem(x)
        outs = []
        for stage in self.stages():
            x = self._stage(stage, x)
            outs.append(x)
        if self.final_bn is not None:
            outs[-1] = self.relu(self.final_bn(outs[-1]))
        return outs

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The last feature map, before pooling."""
        x = self.forward_stem(x)
        for stage in self.stages():
            x = self._stage(stage, x)
        if self.final_bn is not None:
            x = self.relu(self.final_bn(x))
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Global average pool, then the classifier unless `pre_logits`."""
        x = torch.flatten(self.avgpool(x), 1)
        if pre_logits:
            return x
        x = self.fc(x)
        # The scale belongs to the classifier; the Python check keeps default graphs multiply-free.
        scale = self.spec.logit_scale
        return x * scale if scale != 1.0 and self.num_classes > 0 else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def build_model(spec: ModelSpec) -> ResNeXt:
    """The network of `spec`: a pure function of the spec (same spec, same architecture)."""
    if not isinstance(spec, ModelSpec):
        raise TypeError(f"spec: expected a ModelSpec, got {type(spec).__name__}")
    return ResNeXt(spec)
