"""The residual blocks: the grouped-convolution template (Fig. 3c), its two equivalent forms, pre-activation.

Every post-activation block computes ``relu(bn3(transform(x)) [* se] + shortcut(x))`` and can export and
import its weights in the grouped layout (the canonical one, with torchvision key names), which is what
makes the three forms of Fig. 3 interchangeable.
"""

from __future__ import annotations

import torch
from torch import nn

from resnext.models.layers import (
    SqueezeExcite,
    conv1x1,
    conv3x3,
    drop_path,
    make_shortcut,
    norm_act,
)


class BlockGeometry:
    """Channel and stride layout of one bottleneck block, shared by all block forms."""

    __slots__ = ("cardinality", "in_ch", "out_ch", "stride", "stride_in_1x1", "width")

    def __init__(
        self,
        in_ch: int,
        width: int,
        out_ch: int,
        cardinality: int,
        stride: int,
        stride_in_1x1: bool,
    ) -> None:
        self.in_ch, self.width, self.out_ch = in_ch, width, out_ch
        self.cardinality, self.stride, self.stride_in_1x1 = cardinality, stride, stride_in_1x1

    @property
    def strides(self) -> tuple[int, int]:
        """(stride of the first 1×1, stride of the 3×3): the original MSRA/Caffe models use the 1×1."""
        return (self.stride, 1) if self.stride_in_1x1 else (1, self.stride)

    @property
    def group_width(self) -> int:
        return self.width // self.cardinality


class _PostActBlock(nn.Module):
    """Shared tail of the post-activation forms: BN3, optional SE, shortcut, addition, ReLU."""

    # Stochastic-depth rate of the residual branch in training, which the builder sets from
    # `spec.drop_path_rate`. A class attribute, so that networks pickled before it still load.
    drop_path_rate: float = 0.0

    def __init__(
        self, geo: BlockGeometry, *, residual: bool, avg_down: bool, se_reduction: int
    ) -> None:
        super().__init__()
        self.geometry = geo
        self.residual = residual
        self._tail_options = (avg_down, se_reduction)

    def _build_tail(self) -> None:
        """Create BN3, SE and the shortcut after the subclass's convolutions (keeps torchvision's key order)."""
        geo, (avg_down, se_reduction) = self.geometry, self._tail_options
        self.bn3 = nn.BatchNorm2d(geo.out_ch)
        self.se = SqueezeExcite(geo.out_ch, se_reduction) if se_reduction else None
        self.relu = nn.ReLU(inplace=True)
        self.downsample = (
            make_shortcut(geo.in_ch, geo.out_ch, geo.stride, avg_down) if self.residual else None
        )

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = None
        if self.residual:
            shortcut = x if self.downsample is None else self.downsample(x)
        return self._finish(self.transform(x), shortcut)

    def _finish(self, y: torch.Tensor, shortcut: torch.Tensor | None) -> torch.Tensor:
        """relu(bn3(y) [* se] + shortcut), the branch dropped per image where stochastic depth is on."""
        drops = shortcut is not None and self.drop_path_rate > 0 and self.training
        if self.se is None and not drops:
            return norm_act(self.bn3, self.relu, y, shortcut)
        out = self.bn3(y)
        if self.se is not None:
            out = self.se(out)
        if shortcut is None:
            return self.relu(out)
        if drops:
            out = drop_path(out, self.drop_path_rate)
        return self.relu(out + shortcut)

    def _tail_state(self) -> dict[str, torch.Tensor]:
        state = {f"bn3.{k}": v for k, v in self.bn3.state_dict().items()}
        for name in ("se", "downsample"):
            module = getattr(self, name)
            if module is not None:
                state.update({f"{name}.{k}": v for k, v in module.state_dict().items()})
        return state

    def _load_tail(self, state: dict[str, torch.Tensor]) -> None:
        self.bn3.load_state_dict(_sub(state, "bn3"))
        for name in ("se", "downsample"):
            module = getattr(self, name)
            if module is not None:
                module.load_state_dict(_sub(state, name))


class Bottleneck(_PostActBlock):
    """Form (c): 1×1 → grouped 3×3 (C groups) → 1×1, the paper's implementation and the default."""

    def __init__(
        self, geo: BlockGeometry, *, residual: bool, avg_down: bool, se_reduction: int
    ) -> None:
        super().__init__(geo, residual=residual, avg_down=avg_down, se_reduction=se_reduction)
        s1, s3 = geo.strides
        self.conv1 = conv1x1(geo.in_ch, geo.width, s1)
        self.bn1 = nn.BatchNorm2d(geo.width)
        self.conv2 = conv3x3(geo.width, geo.width, s3, groups=geo.cardinality)
        self.bn2 = nn.BatchNorm2d(geo.width)
        self.conv3 = conv1x1(geo.width, geo.out_ch)
        self._build_tail()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fork = getattr(self.conv1, "fork", None)
        if fork is None or not self.residual or self.se is not None:
            return super().forward(x)
        # A conv1 with `fork` (the training fast path) returns conv1(x) and x for the shortcut,
        # and adds the two gradients of x itself, in one pass.
        out, x = fork(x)
        shortcut = x if self.downsample is None else self.downsample(x)
        return self._finish(self._after_conv1(out), shortcut)

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        return self._after_conv1(self.conv1(x))

    def _after_conv1(self, out: torch.Tensor) -> torch.Tensor:
        out = norm_act(self.bn1, self.relu, out)
        out = norm_act(self.bn2, self.relu, self.conv2(out))
        return self.conv3(out)

    def grouped_state(self) -> dict[str, torch.Tensor]:
        """This block's weights in the canonical grouped layout (torchvision key names)."""
        return dict(self.state_dict())

    def load_grouped_state(self, state: dict[str, torch.Tensor]) -> None:
        self.load_state_dict(state)


class _SplitPath(nn.Module):
    """One of the C low-dimensional paths: 1×1 embedding then 3×3 transformation (each with BN, ReLU)."""

    def __init__(self, geo: BlockGeometry) -> None:
        super().__init__()
        s1, s3 = geo.strides
        d = geo.group_width
        self.conv1 = conv1x1(geo.in_ch, d, s1)
        self.bn1 = nn.BatchNorm2d(d)
        self.conv2 = conv3x3(d, d, s3)
        self.bn2 = nn.BatchNorm2d(d)
        # a module, not torch.relu, so that hooks (the mmcv FLOP count) see it as in form (c)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)))


class _AggregatedPath(_SplitPath):
    """A path of form (a): the split path followed by its own 1×1 back to the block's output width."""

    def __init__(self, geo: BlockGeometry) -> None:
        super().__init__(geo)
        self.conv3 = conv1x1(geo.group_width, geo.out_ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv3(super().forward(x))


class AggregatedBottleneck(_PostActBlock):
    """Form (a): C separate paths, each 1×1 → 3×3 → 1×1, summed (Eqn. 3), then BN, shortcut, ReLU."""

    def __init__(
        self, geo: BlockGeometry, *, residual: bool, avg_down: bool, se_reduction: int
    ) -> None:
        super().__init__(geo, residual=residual, avg_down=avg_down, se_reduction=se_reduction)
        self.paths = nn.ModuleList(_AggregatedPath(geo) for _ in range(geo.cardinality))
        self._build_tail()

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        out = self.paths[0](x)
        for path in self.paths[1:]:
            out = out + path(x)
        return out

    def grouped_state(self) -> dict[str, torch.Tensor]:
        state = _merge_paths(self.paths)
        state["conv3.weight"] = torch.cat([p.conv3.weight for p in self.paths], dim=1)
        state.update(self._tail_state())
        return state

    def load_grouped_state(self, state: dict[str, torch.Tensor]) -> None:
        _split_paths(self.paths, state, self.geometry)
        conv3 = state["conv3.weight"].chunk(self.geometry.cardinality, dim=1)
        for path, weight in zip(self.paths, conv3, strict=True):
            path.conv3.weight.data.copy_(weight)
        self._load_tail(state)


class ConcatBottleneck(_PostActBlock):
    """Form (b): C split paths (1×1 → 3×3) concatenated, then one 1×1 to the output width."""

    def __init__(
        self, geo: BlockGeometry, *, residual: bool, avg_down: bool, se_reduction: int
    ) -> None:
        super().__init__(geo, residual=residual, avg_down=avg_down, se_reduction=se_reduction)
        self.paths = nn.ModuleList(_SplitPath(geo) for _ in range(geo.cardinality))
        self.conv3 = conv1x1(geo.width, geo.out_ch)
        self._build_tail()

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv3(torch.cat([path(x) for path in self.paths], dim=1))

    def grouped_state(self) -> dict[str, torch.Tensor]:
        state = _merge_paths(self.paths)
        state["conv3.weight"] = self.conv3.weight.detach().clone()
        state.update(self._tail_state())
        return state

    def load_grouped_state(self, state: dict[str, torch.Tensor]) -> None:
        _split_paths(self.paths, state, self.geometry)
        self.conv3.weight.data.copy_(state["conv3.weight"])
        self._load_tail(state)


class PreActBottleneck(nn.Module):
    """Pre-activation bottleneck (He et al., Identity Mappings): BN-ReLU before each convolution.

    The arXiv version of the paper's CIFAR results used these blocks. A projection shortcut takes the
    pre-activated input, as fb.resnet.torch's pre-activation network does.
    """

    drop_path_rate: float = 0.0  # as _PostActBlock's

    def __init__(
        self,
        geo: BlockGeometry,
        *,
        residual: bool,
        avg_down: bool,
        se_reduction: int,
        input_activated: bool = False,
    ) -> None:
        super().__init__()
        self.geometry = geo
        self.residual = residual
        # After a stem that ends in BN-ReLU (the ImageNet stem) the first block's input is already
        # activated; a second BN-ReLU would only rescale it (fb.resnet.torch's 'no_preact' block).
        self.input_activated = bool(input_activated)
        s1, s3 = geo.strides
        self.bn1: nn.Module = nn.Identity() if input_activated else nn.BatchNorm2d(geo.in_ch)
        self.conv1 = conv1x1(geo.in_ch, geo.width, s1)
        self.bn2 = nn.BatchNorm2d(geo.width)
        self.conv2 = conv3x3(geo.width, geo.width, s3, groups=geo.cardinality)
        self.bn3 = nn.BatchNorm2d(geo.width)
        self.conv3 = conv1x1(geo.width, geo.out_ch)
        self.se = SqueezeExcite(geo.out_ch, se_reduction) if se_reduction else None
        self.relu = nn.ReLU(inplace=False)
        shortcut = make_shortcut(geo.in_ch, geo.out_ch, geo.stride, avg_down) if residual else None
        # The projection's own BN is dropped: the next block's BN-ReLU normalises the sum.
        self.downsample = shortcut[:-1] if shortcut is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = x if self.input_activated else self.relu(self.bn1(x))
        out = self.conv1(pre)
        out = self.conv2(self.relu(self.bn2(out)))
        out = self.conv3(self.relu(self.bn3(out)))
        if self.se is not None:
            out = self.se(out)
        if not self.residual:
            return out
        if self.drop_path_rate > 0 and self.training:
            out = drop_path(out, self.drop_path_rate)
        return out + (x if self.downsample is None else self.downsample(pre))


def _sub(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) + 1 :]: v for k, v in state.items() if k.startswith(prefix + ".")}


def _merge_paths(paths: nn.ModuleList) -> dict[str, torch.Tensor]:
    """Concatenate the per-path 1×1/3×3 weights and BN statistics into the grouped layout."""
    state: dict[str, torch.Tensor] = {
        "conv1.weight": torch.cat([p.conv1.weight for p in paths], dim=0),
        "conv2.weight": torch.cat([p.conv2.weight for p in paths], dim=0),
    }
    for bn in ("bn1", "bn2"):
        for key in ("weight", "bias", "running_mean", "running_var"):
            state[f"{bn}.{key}"] = torch.cat([getattr(getattr(p, bn), key) for p in paths])
        state[f"{bn}.num_batches_tracked"] = getattr(paths[0], bn).num_batches_tracked.clone()
    return {k: v.detach().clone() for k, v in state.items()}


def _split_paths(paths: nn.ModuleList, state: dict[str, torch.Tensor], geo: BlockGeometry) -> None:
    """Load the grouped layout's 1×1/3×3 weights and BN statistics into the separate paths."""
    c = geo.cardinality
    conv1 = state["conv1.weight"].chunk(c, dim=0)
    conv2 = state["conv2.weight"].chunk(c, dim=0)
    for i, path in enumerate(paths):
        path.conv1.weight.data.copy_(conv1[i])
        path.conv2.weight.data.copy_(conv2[i])
        for bn in ("bn1", "bn2"):
            module = getattr(path, bn)
            for key in ("weight", "bias", "running_mean", "running_var"):
                getattr(module, key).data.copy_(state[f"{bn}.{key}"].chunk(c)[i])
            module.num_batches_tracked.copy_(state[f"{bn}.num_batches_tracked"])


BLOCKS: dict[str, type[nn.Module]] = {
    "a": AggregatedBottleneck,
    "b": ConcatBottleneck,
    "c": Bottleneck,
}
