"""Augmentation and normalisation of whole uint8 batches, after collation (and on the GPU when there is one).

`BatchPipeline` turns the (N, H, W, 3) uint8 batches of the planned loaders into normalised float
(N, 3, H, W) tensors, applying fb.resnet.torch's colour jitter (brightness,
contrast, saturation in a random order per image) and AlexNet PCA lighting per image on the way.
Each image gets the same operations with the same distributions as the per-image `ColorJitter` and
`Lighting` transforms. Since every one of them (and normalisation) is affine in the pixel colour,
the chain is composed into one 3×3 matrix and shift per image and applied in a single pass.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.nn import functional as F

from resnext.data.transforms import IMAGENET_EIGVAL, IMAGENET_EIGVEC
from resnext.errors import ConfigError

_LUMA = (0.299, 0.587, 0.114)


def _as_nhwc(batch: torch.Tensor) -> torch.Tensor:
    """A uint8 (N, H, W, 3) view of an (N, H, W, 3) or (N, 3, H, W) uint8 batch."""
    if batch.dim() != 4:
        raise ValueError(f"batch: expected a 4-d uint8 image batch, got shape {tuple(batch.shape)}")
    if batch.shape[-1] != 3 and batch.shape[1] == 3:
        batch = batch.permute(0, 2, 3, 1)
    if batch.shape[-1] != 3:
        raise ValueError(f"batch: expected 3 colour channels, got shape {tuple(batch.shape)}")
    if batch.dtype != torch.uint8:
        raise ValueError(f"batch: expected dtype uint8, got {batch.dtype}")
    return batch


def _use_kernel(nhwc: torch.Tensor) -> bool:
    """Whether the C colour map (`colour_affine`) takes this batch and builds on this machine."""
    from resnext.data import colour_affine

    return colour_affine.takes(nhwc) and colour_affine.unavailable_reason() is None


def _uniform(n: int, low: float, high: float, gen: torch.Generator | None, device) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=gen, device=device)


class BatchPipeline:
    """uint8 batch → colour jitter (optional) → PCA lighting (optional) → normalise, float NCHW.

    `generator` None draws from torch's global RNG (saved in training checkpoints, so resumed runs
    repeat the same augmentations); a torch.Generator on the batch's device may be passed instead.
    """

    def __init__(
        self,
        mean: Sequence[float],
        std: Sequence[float],
        *,
        jitter: float = 0.0,
        lighting_std: float = 0.0,
        eigval: Sequence[float] = IMAGENET_EIGVAL,
        eigvec: Sequence[Sequence[float]] = IMAGENET_EIGVEC,
    ) -> None:
        if len(mean) != 3 or len(std) != 3 or any(s <= 0 for s in std):
            raise ConfigError(f"mean/std: expected 3 values each, std > 0; got {mean}, {std}")
        if not 0.0 <= jitter < 1.0:
            raise ConfigError(f"jitter: expected a strength in [0, 1), got {jitter!r}")
        if lighting_std < 0:
            raise ConfigError(f"lighting_std: expected >= 0, got {lighting_std!r}")
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        self.jitter, self.lighting_std = float(jitter), float(lighting_std)
        self.eigval = torch.tensor(eigval, dtype=torch.float32)
        self.eigvec = torch.tensor(eigvec, dtype=torch.float32)

    def _jitter(
        self, matrix: torch.Tensor, shift: torch.Tensor, mean: torch.Tensor, gen
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Compose the three blends, in each image's random order, into (matrix, shift)."""
        n, var, device = matrix.shape[0], self.jitter, matrix.device
        # One strength per image and operation, and a random order of the three per image.
        alphas = _uniform(3 * n, 1.0 - var, 1.0 + var, gen, device).view(3, n)
        order = torch.rand(n, 3, generator=gen, device=device).argsort(dim=1)
        luma = torch.tensor(_LUMA, device=device)
        for position in range(3):
            op = order[:, position]
            a = alphas.gather(0, op.view(1, n)).view(n, 1)
            # Each blend alpha * x + (1 - alpha) * target is affine in x, target being black
            # (brightness, op 0), the image's mean luma (contrast, 1) or its grey image (saturation, 2).
            grey_matrix = luma @ matrix  # (n, 3): the grey image is grey_matrix @ x + luma @ shift
            grey_shift = shift @ luma
            mean_grey = (grey_matrix * mean).sum(1) + grey_shift
            sat = (op == 2).view(n, 1)
            target_matrix = grey_matrix.unsqueeze(1) * sat.unsqueeze(2)
            target_shift = torch.where(
                sat, grey_shift.view(n, 1), mean_grey.view(n, 1) * (op == 1).view(n, 1)
            )
            matrix = a.unsqueeze(2) * matrix + (1 - a).unsqueeze(2) * target_matrix.expand(n, 3, 3)
            shift = a * shift + (1 - a) * target_shift.expand(n, 3)
        return matrix, shift

    def colour_maps(
        self, mean: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-image (N, 3, 3) matrix and (N, 3) shift so that output pixel = matrix @ x + shift, for
        x in [0, 1]; `mean` (N, 3) is each image's mean colour (the contrast blend needs it)."""
        n, device = mean.shape[0], mean.device
        matrix = torch.eye(3, device=device).expand(n, 3, 3).clone()
        shift = torch.zeros(n, 3, device=device)
        if self.jitter:
            matrix, shift = self._jitter(matrix, shift, mean, generator)
        if self.lighting_std:
            alpha = torch.randn(n, 3, generator=generator, device=device) * self.lighting_std
            shift = shift + (alpha * self.eigval.to(device)) @ self.eigvec.to(device).T
        inv_std = 1.0 / torch.tensor(self.std, device=device)
        matrix = matrix * inv_std.view(1, 3, 1)
        shift = (shift - torch.tensor(self.mean, device=device)) * inv_std
        return matrix, shift

    def __call__(
        self, batch: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Normalised float (N, 3, H, W), contiguous: every image's colour map in one pass."""
        nhwc = _as_nhwc(batch)
        if _use_kernel(nhwc):
            from resnext.data import colour_affine

            # The same map in one pass over the uint8 pixels (no float copy of the batch first).
            n = nhwc.shape[0]
            mean = colour_affine.channel_means(nhwc) / 255.0 if self.jitter else torch.zeros(n, 3)
            matrix, shift = self.colour_maps(mean, generator)
            return colour_affine.affine_planes(nhwc, matrix / 255.0, shift)
        n, h, w, _ = nhwc.shape
        x = nhwc.permute(0, 3, 1, 2).contiguous().to(torch.float32)
        mean = x.mean((2, 3)) / 255.0 if self.jitter else x.new_zeros(n, 3)
        matrix, shift = self.colour_maps(mean, generator)
        # All colour operations are affine in the pixel: applied at once as a 1x1 convolution with
        # one group per image (faster here than a batched matmul over the pixels).
        out = F.conv2d(
            x.view(1, 3 * n, h, w),
            (matrix / 255.0).reshape(3 * n, 3, 1, 1),
            shift.reshape(3 * n),
            groups=n,
        )
        return out.view(n, 3, h, w)

    def __repr__(self) -> str:
        return (
            f"BatchPipeline(mean={self.mean}, std={self.std}, jitter={self.jitter}, "
            f"lighting_std={self.lighting_std})"
        )
