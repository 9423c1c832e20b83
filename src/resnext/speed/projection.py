"""Issue 5's target 6: the paper's 90-epoch ImageNet run projected from a measured per-device rate.

Compute time assumes perfect data-parallel scaling of the measured rate; DDP's communication is
a ring allreduce of the float32 gradients each step (2(N−1)/N of their bytes through each
device's link), compared with the step's own time to say whether bucketing can hide it; the data
pipeline's need is the device rate over the measured per-core rate of the training transforms.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from resnext.errors import ConfigError

IMAGENET_TRAIN_IMAGES = 1_281_167  # ILSVRC-2012 training set
PAPER_EPOCHS = 90  # the paper's ImageNet schedule (lr divided by 10 at epochs 30 and 60)
GRAD_BYTES = 4  # DDP reduces float32 gradients (parameters stay float32 under autocast)


@dataclass(frozen=True)
class Projection:
    """One cluster size's projected run."""

    devices: int
    global_batch: int
    steps: int
    compute_hours: float
    allreduce_mb_per_device: float
    allreduce_ms_per_step: float
    step_ms: float
    comm_hours_if_not_overlapped: float
    loader_cores_per_device: float

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)


def project(
    *,
    images_per_s: float,
    batch_per_device: int,
    params: int,
    devices: int,
    link_gb_per_s: float,
    loader_images_per_core_s: float,
    epochs: int = PAPER_EPOCHS,
    train_images: int = IMAGENET_TRAIN_IMAGES,
) -> Projection:
    """The run on `devices` devices, each at the measured `images_per_s` with `batch_per_device`,
    a model of `params` parameters, and an allreduce over links of `link_gb_per_s` (GB/s, per
    device and direction)."""
    for name, value in (
        ("images_per_s", images_per_s),
        ("batch_per_device", batch_per_device),
        ("params", params),
        ("devices", devices),
        ("link_gb_per_s", link_gb_per_s),
        ("loader_images_per_core_s", loader_images_per_core_s),
        ("epochs", epochs),
        ("train_images", train_images),
    ):
        if not value > 0:
            raise ConfigError(f"{name}: expected a value > 0, got {value!r}")
    images = epochs * train_images
    global_batch = devices * batch_per_device
    steps = -(-images // global_batch)  # the last, short step counts
    ring = 2 * (devices - 1) / devices * params * GRAD_BYTES  # bytes through each device's link
    allreduce_s = ring / (link_gb_per_s * 1e9)
    return Projection(
        devices=devices,
        global_batch=global_batch,
        steps=steps,
        compute_hours=images / (devices * images_per_s) / 3600,
        allreduce_mb_per_device=ring / 1e6,
        allreduce_ms_per_step=1e3 * allreduce_s,
        step_ms=1e3 * batch_per_device / images_per_s,
        comm_hours_if_not_overlapped=steps * allreduce_s / 3600,
        loader_cores_per_device=images_per_s / loader_images_per_core_s,
    )
