"""The training configuration: nested frozen dataclasses, one per concern, with the paper's defaults."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

AMP_CHOICES = ("auto", "bfloat16", "float16", "none")
SCHEDULES = ("step", "cosine")
OPTIMIZERS = ("sgd", "adamw")
# The kinds whose training pipeline has the CIFAR-only steps (data.cutout, data.trivial_augment)
CIFAR_KINDS = ("cifar10", "cifar100")
DATA_KINDS = ("cifar10", "cifar100", "imagefolder", "digits")


@dataclass(frozen=True)
class ModelConfig:
    """Which registered network to build, and which of its spec fields to replace."""

    name: str = "resnext29_4x16d"
    spec: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class DataConfig:
    """Dataset kind and location, the global batch, and the loader's settings."""

    kind: str = "digits"
    root: str = ""
    train_split: str = "train"
    val_split: str = "test"
    # Images per optimiser step over all processes; each process gets batch_size / world_size.
    batch_size: int = 128
    eval_batch_size: int = 256
    image_size: int = 32
    workers: int = 0
    pin_memory: bool = False
    # A corrupt image is skipped (counted, named once in the log) unless strict is set.
    strict: bool = False
    # CIFAR only: side of a random square zeroed in each training image (0 = off).
    cutout: int = 0
    # CIFAR only: TrivialAugment (one random operation of the wide space per training image).
    trivial_augment: bool = False
    # imagefolder only: crops drawn from the JPEG header and decoded at the reduced scale they allow,
    # uint8 batches; colour augmentation and normalisation then run on each batch, on the device.
    planned: bool = False
    # Batch mixing with soft targets (0 = off): mixup's and CutMix's Beta(α, α) parameter; with both
    # set, each batch uses one of the two with probability 1/2.
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0


@dataclass(frozen=True)
class OptimConfig:
    """SGD with momentum as in the paper (or AdamW); the LR scales linearly with the global batch
    unless set."""

    # `sgd` (the paper's; momentum and nesterov apply) or `adamw` (Loshchilov & Hutter's decoupled
    # weight decay; betas and eps apply)
    name: str = "sgd"
    lr: float | None = None
    base_lr: float = 0.1
    base_batch: int = 256
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 1e-4
    wd_exempt_norm_bias: bool = False
    betas: tuple[float, ...] = (0.9, 0.999)
    eps: float = 1e-8
    label_smoothing: float = 0.0
    grad_clip: float = 0.0
    accum_steps: int = 1


@dataclass(frozen=True)
class ScheduleConfig:
    """Per-iteration learning-rate schedule: step decay or cosine, after an optional linear warmup."""

    kind: str = "step"
    milestones: tuple[int, ...] = (30, 60, 90)
    gamma: float = 0.1
    warmup_epochs: float = 0.0
    warmup_start: float = 0.1
    min_lr: float = 0.0


@dataclass(frozen=True)
class TrainConfig:
    """Length, seed, numerics and fault-tolerance settings of the run."""

    epochs: int = 100
    seed: int = 0
    amp: str = "auto"
    channels_last: bool = False
    compile: bool = False
    # CPU training fast path: batch norm with its ReLU and residual add in our C kernels
    # (channels-last fp32/bf16 tensors; other layers and devices keep torch's ops).
    fused_bn: bool = False
    # CPU training fast path: grouped 3x3 convolutions with 4 or 8 channels per group (on AVX2
    # CPUs also 16-64 in float32; with AMX any width in bf16) use our C kernels for the forward,
    # input gradient and weight gradient where they beat oneDNN (timed per shape on this CPU).
    grouped_kernels: bool = False
    # CPU training fast path: bf16 1x1 convolutions' forward, input and weight gradients each
    # by the fastest of oneDNN, one GEMM and our AVX512-BF16 product, timed per shape; an
    # identity block's two input gradients are summed inside one GEMM.
    gemm_weight_grad: bool = False
    # With gemm_weight_grad, in float32: the 1x1 products may also run with float16 products and
    # float32 sums (CPUs with AVX512-FP16, timed per shape like the others): faster where
    # float16's FMAs do twice float32's work, float16-precise rather than float32-exact.
    fp16_products: bool = False
    # CPU training fast path: max pooling with one-byte argmax taps instead of int64 indices.
    fast_maxpool: bool = False
    # GPU training fast path: each grouped convolution computed as one of fewer, wider groups
    # (block-diagonal weights made from the grouped ones on each step; same parameters, keys and
    # gradients) where a step times faster, chosen per layer before the first step.
    merge_groups: bool = False
    # With grouped_kernels or gemm_weight_grad: keep the per-shape timings that choose between
    # their implementations in $RESNEXT_TIMING_CACHE (~/.cache/resnext/timings), so that a later
    # run on this machine skips them (~20 s of ResNeXt-50's first step on a 2-core CPU).
    timing_cache: bool = True
    zero_init_residual: bool = False
    # Recompute each block's activations in backward instead of keeping them: less memory for
    # one more forward per step (the role of the paper's Torch -shareGradInput/-optnet).
    grad_checkpointing: bool = False
    checkpoint_every: int = 0
    sync_bn: bool = False
    resume: str = "auto"
    log_every: int = 50
    device: str = "auto"
    threads: int = 0
    # CPU only: keep freed activation buffers in the process instead of returning them to the OS
    # (glibc otherwise unmaps and page-faults them on every step; 1.3-2.4x faster training here).
    keep_memory: bool = True
    # CUDA only: cuDNN times its algorithms for each new input shape once and keeps the fastest
    # (training crops have one shape; timm and torchvision's scripts do the same).
    cudnn_benchmark: bool = True
    # Validate on each image and its mirror image, scores averaged (test-time flip).
    eval_flip: bool = False
    # Validate after every N-th epoch and after the last one (the test-time views cost time).
    eval_every: int = 1
    # Also validate on copies shifted diagonally by this many pixels each way (0 = off).
    eval_shift: int = 0


@dataclass(frozen=True)
class FinetuneConfig:
    """Start from pretrained weights with a new classifier and, optionally, frozen early stages."""

    source: str = ""
    num_classes: int = 0
    frozen_stages: int = 0


@dataclass(frozen=True)
class Config:
    """One complete, validated training run description."""

    name: str = "run"
    output_dir: str = ""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)

    def resolved_output_dir(self) -> str:
        """The run folder: `output_dir` if set, else runs/<name>."""
        return self.output_dir or f"runs/{self.name}"
