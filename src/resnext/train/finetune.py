"""Fine-tuning: load pretrained weights, put a new classifier on, freeze the stem and early stages."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from typing import Any

from torch import nn

from resnext.errors import ConfigError, DownloadError, WeightsError
from resnext.models import ResNeXt, get_spec


@contextlib.contextmanager
def _named_as_source() -> Iterator[None]:
    """Weights and download errors inside, prefixed with the config key they came from."""
    try:
        yield
    except (WeightsError, DownloadError) as exc:
        raise type(exc)(f"finetune.source: {exc}") from exc


def prefetch_source(name: str, source: str) -> None:
    """Download `source` into the weights cache where it is a weights-table tag (or 'DEFAULT',
    `name`'s default tag); a file, or a tag already cached, is left as it is."""
    from resnext.weights.load import prefetch

    with _named_as_source():
        prefetch(source, name)


def pretrained_network(name: str, source: str, spec: dict[str, Any]) -> ResNeXt:
    """Network `name` (with the `spec` overrides) carrying the weights of `source`, its own
    classifier included: whatever `create_model(name, weights=...)` takes (a `resnext train`
    checkpoint, a file of any supported library, a weights-table tag or 'DEFAULT')."""
    from resnext.weights import build_with_weights  # the weights package builds on training's

    wanted = get_spec(name, **spec)
    with _named_as_source():
        # dropout and stochastic depth are the new run's own choice, never the source run's
        own = {"drop_rate": wanted.drop_rate, "drop_path_rate": wanted.drop_path_rate}
        model = build_with_weights(name, source, **{**own, **spec})
    # The weights may need a network other than the config's (a run's logit scale, Caffe's
    # stride placement): the run must record the network it trains, so the config says so.
    differ = [
        f.name
        for f in dataclasses.fields(wanted)
        if f.name != "num_classes" and getattr(model.spec, f.name) != getattr(wanted, f.name)
    ]
    if differ:
        needs = ", ".join(f"model.spec.{k}={getattr(model.spec, k)!r}" for k in differ)
        gives = ", ".join(f"{getattr(wanted, k)!r}" for k in differ)
        raise ConfigError(
            f"finetune.source {source}: its weights are for a network with {needs}, where this "
            f"config gives {gives}; set them in the config so that the run records the network "
            "it trains"
        )
    return model


def frozen_modules(model: nn.Module, frozen_stages: int) -> list[nn.Module]:
    """The stem and the first `frozen_stages` stages (nothing when 0)."""
    if frozen_stages <= 0:
        return []
    mods: list[nn.Module] = [model.conv1, model.bn1]
    mods.extend(model.stages()[:frozen_stages])
    return mods


def freeze(model: nn.Module, frozen_stages: int) -> None:
    """Stop gradients through the stem and the first `frozen_stages` stages."""
    for module in frozen_modules(model, frozen_stages):
        for p in module.parameters():
            p.requires_grad_(False)


def set_train_mode(model: nn.Module, frozen_stages: int) -> None:
    """model.train(), except frozen parts stay in eval mode so their BN statistics do not drift."""
    model.train()
    for module in frozen_modules(model, frozen_stages):
        module.eval()
