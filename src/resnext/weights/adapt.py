"""Weights fitted to a network that takes another number of input channels than they were
trained on (timm's rule for `in_chans`)."""

from __future__ import annotations

import dataclasses
import math

from resnext.weights.loaded import LoadedWeights

# The first convolution's weight: the 7×7 or 3×3 stem's, or the deep stem's first 3×3.
_FIRST_CONV = ("conv1.0.weight", "conv1.weight")


def adapt_input_channels(loaded: LoadedWeights, in_chans: int) -> LoadedWeights:
    """`loaded` with its first convolution taking `in_chans` channels where it took RGB's 3.

    One channel gets the sum of the RGB filters, so a grey image computes what the original
    network computes on that grey repeated in R, G and B. More or fewer channels get the RGB
    filters repeated over them (R, G, B, R, …) and scaled by 3 / `in_chans`, so the first layer's
    response keeps its scale. The weights' preprocessing, which normalises RGB, no longer
    describes the inputs and is dropped. Anything else (a stem of another width, a first
    convolution that did not take 3 channels) is left for `apply_weights` to name."""
    key = next((k for k in _FIRST_CONV if k in loaded.state_dict), None)
    weight = loaded.state_dict.get(key) if key is not None else None
    if weight is None or weight.ndim != 4 or weight.shape[1] != 3 or in_chans == 3:
        return loaded
    if in_chans == 1:
        fitted = weight.sum(dim=1, keepdim=True)
    else:
        repeats = math.ceil(in_chans / 3)
        fitted = weight.repeat(1, repeats, 1, 1)[:, :in_chans] * (3 / in_chans)
    return dataclasses.replace(
        loaded,
        state_dict={**loaded.state_dict, key: fitted.contiguous()},
        preprocessing=None,
        notes=(*loaded.notes, f"{key} fitted from 3 input channels to {in_chans}"),
    )
