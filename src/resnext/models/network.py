"""The generic network: stem → stages of residual blocks → global pool → classifier, built from a ModelSpec."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
from torch import nn

from resnext.models.blocks import BLOCKS, BlockGeometry, PreActBottleneck
from resnext.models.checkpointing import checkpointed
from resnext.models.features import FeatureInfo, FeatureNet, refuse_pooled_stem_map, take_indices
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
    drop_rates = spec.block_drop_path_rates[sum(spec.depths[:k]) :]
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
        if drop_rates[i]:
            block.drop_path_rate = drop_rates[i]
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
        # Its own module, so that the stem's `relu` runs once and a hook on either sees one map.
        self.final_act = nn.ReLU(inplace=True) if spec.preact else None
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.num_features = in_ch
        self.num_classes = spec.num_classes
        self.fc: nn.Module = self._make_classifier(spec.num_classes)
        self.grad_checkpointing = False
        self.reset_parameters()

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        if "final_act" not in self.__dict__ and "final_act" not in self._modules:
            # pickled whole before the final ReLU had its own module
            self.final_act = nn.ReLU(inplace=True) if self.final_bn is not None else None

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

    def group_matcher(self, coarse: bool = False) -> dict[str, object]:
        """timm's parameter grouping (for layer-wise learning-rate decay): the stem, then one group
        per stage (`coarse`) or per block, a pre-activation network's final BN with the last
        block; the classifier, matched by neither, is the head group."""
        blocks = r"^layer(\d+)" if coarse else r"^layer(\d+)\.(\d+)"
        matcher: dict[str, object] = {"stem": r"^(?:conv1|bn1|maxpool)\b", "blocks": blocks}
        if self.final_bn is not None:
            matcher["blocks"] = [(blocks, None), (r"^final_bn\.", (99999,))]
        return matcher

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in backward instead of keeping them (timm's name):
        training memory falls to about the block outputs plus one block's activations, for one
        more forward pass per step. Values, gradients and batch-norm statistics are unchanged."""
        self.grad_checkpointing = bool(enable)

    # ---- structure ---------------------------------------------------------------------------
    def stages(self) -> list[nn.Sequential]:
        return [getattr(self, name) for name in self.stage_names]

    @property
    def feature_info(self) -> FeatureInfo:
        """Channels, stride and module name of each map `forward_intermediates` returns (timm's
        layout, for detection/segmentation necks): the stem's activation before its pooling (a
        pre-activation CIFAR network's bare `conv1`), then every stage's output (a pre-activation
        network's last after its final BN-ReLU, `final_act`). Each names the module whose output
        the map is, so forward hooks on those modules see the same maps."""
        stem_reduction = 1 if self.spec.stem == "cifar" else 2
        stem = "relu" if self._stem_act else "conv1"
        info = FeatureInfo(
            [{"module": stem, "num_chs": self.spec.stem_out, "reduction": stem_reduction}]
        )
        reduction = 1 if self.spec.stem == "cifar" else 4
        for k, name in enumerate(self.stage_names):
            reduction *= self.spec.stage_strides[k]
            info.append(
                {"module": name, "num_chs": self.spec.stage_out_widths[k], "reduction": reduction}
            )
        if self.final_act is not None:  # the last map is the one after the final BN-ReLU
            info[-1]["module"] = "final_act"
        return info

    # ---- forward -----------------------------------------------------------------------------
    def forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.maxpool(stem_activation(self, x))

    def forward_stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The output of every stage (strides 4/8/16/32 for ImageNet layouts, 1/2/4 for CIFAR):
        `feature_info[1:]`'s maps."""
        return trunk_maps(self, x, range(1, len(self.stage_names) + 1), stop_early=True)[1]

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | Sequence[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """timm's feature interface: the maps at `indices` into `feature_info` (None: all, n: the
        last n, a sequence: those, negative from the end), and unless `intermediates_only` also
        the last map computed: `forward_features`'s, or with `stop_early` the last one taken.

        `norm` is accepted for timm's callers and changes nothing: the network has no final norm
        of its own (a pre-activation network's last BN-ReLU belongs to its last stage's map)."""
        if output_fmt != "NCHW":
            raise ValueError(f"output_fmt: expected 'NCHW' (the only layout), got {output_fmt!r}")
        for flag, value in (
            ("norm", norm),
            ("stop_early", stop_early),
            ("intermediates_only", intermediates_only),
        ):
            if not isinstance(value, bool):
                raise TypeError(f"{flag}: expected a bool, got {type(value).__name__}")
        take = take_indices(len(self.feature_info), indices)
        last, maps = trunk_maps(self, x, take, stop_early=stop_early or intermediates_only)
        return maps if intermediates_only else (last, maps)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The last feature map, before pooling."""
        x = self.forward_stem(x)
        for stage in self.stages():
            x = run_stage(stage, x, self.grad_checkpointing)
        if self.final_bn is not None:
            x = self.final_act(self.final_bn(x))
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Global average pool, then (training, `spec.drop_rate`) dropout, then the classifier
        unless `pre_logits`."""
        x = torch.flatten(self.avgpool(x), 1)
        if self.spec.drop_rate and self.training:  # a Python check: inference graphs keep none
            x = nn.functional.dropout(x, self.spec.drop_rate, training=True)
        if pre_logits:
            return x
        x = self.fc(x)
        # The scale belongs to the classifier; the Python check keeps default graphs multiply-free.
        scale = self.spec.logit_scale
        return x * scale if scale != 1.0 and self.num_classes > 0 else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def run_stage(stage: nn.Sequential, x: torch.Tensor, grad_checkpointing: bool) -> torch.Tensor:
    """`stage(x)`, block by block checkpointed when asked and gradients are being recorded."""
    if not (grad_checkpointing and torch.is_grad_enabled()):
        return stage(x)
    # Block by block rather than the stage at once: a bottleneck keeps ~8 maps for its
    # backward, so only its output is kept between blocks (a stage would keep all of them
    # while it is recomputed, and a 3-stage CIFAR network has one stage of half its maps).
    for block in stage:
        x = checkpointed(block, x)
    return x


def stem_activation(net: ResNeXt | FeatureNet, x: torch.Tensor) -> torch.Tensor:
    """The stem's map before its pooling: feature map 0."""
    x = net.conv1(x)
    return norm_act(net.bn1, net.relu, x) if net._stem_act else net.bn1(x)


def trunk_maps(
    net: ResNeXt | FeatureNet, x: torch.Tensor, take: Iterable[int], stop_early: bool
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(the last map computed, the maps at absolute `take` indices) of `net`'s stem and stages;
    with `stop_early` nothing past the last map taken is computed."""
    take = frozenset(take)
    refuse_pooled_stem_map(net.conv1, take, "indices")
    x = stem_activation(net, x)
    maps = [x] if 0 in take else []
    stop = max(take) if stop_early else len(net.stage_names)
    if stop == 0:
        return x, maps
    x = net.maxpool(x)
    for k, name in enumerate(net.stage_names[:stop], start=1):
        x = run_stage(getattr(net, name), x, net.grad_checkpointing)
        if k == len(net.stage_names) and net.final_bn is not None:
            x = net.final_act(net.final_bn(x))
        if k in take:
            maps.append(x)
    return x, maps


def build_model(spec: ModelSpec) -> ResNeXt:
    """The network of `spec`: a pure function of the spec (same spec, same architecture)."""
    if not isinstance(spec, ModelSpec):
        raise TypeError(f"spec: expected a ModelSpec, got {type(spec).__name__}")
    return ResNeXt(spec)
