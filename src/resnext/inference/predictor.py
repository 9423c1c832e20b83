"""Reusable inference: a Predictor built once from a model and weights, top-k predictions per image."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from resnext.devices import check_device
from resnext.errors import ConfigError
from resnext.evaluate.views import ViewTransform
from resnext.inference.fast_backend import fast_backend
from resnext.inference.inputs import ImageInput, describe, to_pil
from resnext.inference.loading import LoadedModel, load_model


@dataclass(frozen=True)
class Prediction:
    """The result for one image: the best class and the top-k lists (best first)."""

    source: str
    pred_label: int
    pred_class: str
    pred_score: float
    topk_labels: list[int]
    topk_classes: list[str]
    topk_scores: list[float]

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


@dataclass(frozen=True)
class Features:
    """Embeddings of a batch: globally pooled features and each stage's feature map."""

    pooled: torch.Tensor
    stages: list[torch.Tensor]


def _as_list(images: ImageInput | Sequence[ImageInput]) -> list[ImageInput]:
    if isinstance(images, (list, tuple)):
        return list(images)
    if isinstance(images, torch.Tensor) and images.ndim == 4:
        return list(images.unbind(0))
    return [images]  # type: ignore[list-item]


OPTIMIZE_CHOICES = ("off", "fp32", "bf16", "fp16", "auto")


class Predictor:
    """A model with its preprocessing and class names, ready to classify images in batches.

    `optimize='fp32'`, `'bf16'`, `'fp16'` (float32 with the 1×1s' products in float16, on CPUs
    with AVX512-FP16) or `'auto'` (bf16 where the device runs it faster than float32, else fp16
    where its kernel runs, else fp32: `capability.fastest_precision`) classifies with `resnext.optimize`'s fast path on the device
    (BN folded, channels-last; on CPU our kernels where faster; `compile=True` also compiles it
    with inductor for `batch_size`, worth it for many images; `replay=True` instead replays its
    recorded kernel calls from one C loop, x86-64 Linux CPUs only: no compiling, and the lowest
    latency at small batches; a shorter last batch runs on the fast path without either);
    `features()` always uses the plain model.
    `timing_cache` is `optimize`'s: True keeps its per-layer timings in ~/.cache/resnext/timings,
    so that the next Predictor on this machine skips them.
    """

    def __init__(
        self,
        model: str | None = None,
        weights: str | Path | None = None,
        *,
        loaded: LoadedModel | None = None,
        device: str | torch.device = "cpu",
        batch_size: int = 32,
        optimize: str = "off",
        compile: bool = False,
        replay: bool = False,
        timing_cache: bool | str | Path | None = None,
    ) -> None:
        if batch_size < 1:
            raise ConfigError(f"batch_size: expected >= 1, got {batch_size}")
        if optimize not in OPTIMIZE_CHOICES:
            raise ConfigError(f"optimize: expected one of {OPTIMIZE_CHOICES}, got {optimize!r}")
        backend = fast_backend(optimize, compile=compile, replay=replay)
        self.device = check_device(device)
        self.loaded = loaded or load_model(model, weights, device=self.device)
        self.loaded.model.to(self.device).eval()
        prep = self.loaded.preprocessing
        self.transform = ViewTransform.center_of("predict", prep)
        self.batch_size = batch_size
        self.fast: torch.nn.Module | None = None
        if optimize != "off":
            from resnext.speed.fastpath import optimize as make_fast  # torch.compile import is slow

            chans = getattr(getattr(self.model, "spec", None), "in_chans", 3)
            example = torch.zeros(batch_size, chans, prep.crop, prep.crop)
            self.fast = make_fast(
                self.model,
                optimize,
                backend=backend,
                example_input=example,
                device=self.device,
                timing_cache=timing_cache,
                # a last short batch runs without the graph rather than compiling one for it
                new_shapes="eager",
            )

    @property
    def model(self) -> torch.nn.Module:
        return self.loaded.model

    def _batches(self, items: list[ImageInput]) -> list[torch.Tensor]:
        out = []
        for i in range(0, len(items), self.batch_size):
            chunk = items[i : i + self.batch_size]
            out.append(torch.stack([self.transform(to_pil(x)) for x in chunk]).to(self.device))  # type: ignore[misc]
        return out

    @torch.no_grad()
    def __call__(
        self, images: ImageInput | Sequence[ImageInput], topk: int = 5
    ) -> list[Prediction]:
        """Predictions for each image, in input order."""
        items = _as_list(images)
        names = self.loaded.class_names
        k = min(topk, len(names)) if topk >= 1 else 0
        if k < 1:
            raise ConfigError(f"topk: expected >= 1, got {topk}")
        results: list[Prediction] = []
        for batch in self._batches(items):
            net = self.fast if self.fast is not None else self.model
            probs = F.softmax(net(batch).float(), dim=1)
            scores, labels = probs.topk(k, dim=1)
            for s, lab in zip(scores.tolist(), labels.tolist(), strict=True):
                idx = len(results)
                results.append(
                    Prediction(
                        source=describe(items[idx], idx),
                        pred_label=lab[0],
                        pred_class=names[lab[0]],
                        pred_score=s[0],
                        topk_labels=lab,
                        topk_classes=[names[j] for j in lab],
                        topk_scores=s,
                    )
                )
        return results

    @torch.no_grad()
    def features(self, images: ImageInput | Sequence[ImageInput]) -> Features:
        """Pooled embeddings (N, C) and the stage maps, for the images as preprocessed for prediction."""
        items = _as_list(images)
        if not items:
            raise ConfigError("images: expected at least one image to extract features from")
        pooled, stages = [], []
        for batch in self._batches(items):
            maps = self.model.forward_stages(batch)
            stages.append(maps)
            pooled.append(self.model.forward_head(maps[-1], pre_logits=True))
        return Features(
            pooled=torch.cat(pooled),
            stages=[torch.cat([s[i] for s in stages]) for i in range(len(stages[0]))],
        )


def predict(
    images: ImageInput | Sequence[ImageInput],
    model: str | None = None,
    weights: str | Path | None = None,
    topk: int = 5,
    device: str | torch.device = "cpu",
) -> list[Prediction]:
    """One-shot prediction (builds a Predictor; keep a Predictor to classify repeatedly)."""
    return Predictor(model, weights, device=device)(images, topk=topk)


def extract_features(
    images: ImageInput | Sequence[ImageInput],
    model: str | None = None,
    weights: str | Path | None = None,
    device: str | torch.device = "cpu",
) -> Features:
    """Pooled embeddings and per-stage feature maps of `images`."""
    return Predictor(model, weights, device=device).features(images)
