"""Torch-free configs of the trainer, nested by every train node (`<node>.loop`, `<node>.resources`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Schedule = Literal["constant", "cosine", "poly"]  # learning-rate schedules of `pipeline.train.loop.lr_schedule`


@dataclass
class LoopConfig:
    """Knobs of the step loop (part of every train node's config).

    Attributes:
        steps: optimiser updates in total.
        checkpoint_every: steps between checkpoints (the last step is always checkpointed).
        keep_checkpoints: how many recent checkpoints to keep (older ones are deleted).
        log_every: steps between log lines (loss, lr, samples/s).
        grad_clip: max gradient norm; null = the method's own (`ifseg.grad_clip` 1.0, IFSeg's fairseq clip-norm;
            ZegCLIP and align clip nothing, as the ZegCLIP release's empty `optimizer_config`); 0 = off.
        precision: "fp32" | "bf16" (autocast; CPU and CUDA) | "fp16" (CUDA autocast + GradScaler).
    """

    steps: int = 2000
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    log_every: int = 20
    grad_clip: float | None = None
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"


@dataclass
class AugmentConfig:
    """Training-crop augmentation of the image methods (`pipeline.train.augment`, mmseg's transforms).

    Resize keeps the aspect ratio: ratio r ~ U[min_scale, max_scale], short side bound `image_size · r`, long side
    bound `long_side_factor · image_size · r` (mmseg img_scale (2048, 512) = factor 4; null = no bound); then a
    random `image_size` crop (redrawn up to 10 times while one class covers >= `cat_max_ratio` of its labelled
    pixels; 1.0 = off), horizontal flip with `flip_prob`, mmseg PhotoMetricDistortion when `photometric`, and
    padding to `image_size` (labels: ignore).

    Attributes:
        min_scale, max_scale: the resize ratio range.
        long_side_factor: long-side bound as a multiple of image_size (null = none).
        cat_max_ratio: largest share of one class in a crop (ignore excluded); 1.0 = plain random crop.
        flip_prob: probability of a horizontal flip.
        photometric: brightness/contrast/saturation/hue distortion (mmseg defaults: 32, 0.5-1.5, 0.5-1.5, 18).
    """

    min_scale: float = 0.75
    max_scale: float = 1.5
    long_side_factor: float | None = None
    cat_max_ratio: float = 1.0
    flip_prob: float = 0.5
    photometric: bool = False


@dataclass
class ScalingKnobs:
    """Where training runs (never part of the fingerprint).

    Attributes:
        backend: "ray" (Ray Train TorchTrainer) or "local" (this process).
        num_workers: Ray Train workers (processes; DDP across them).
        use_gpu: one GPU per worker.
        cpus_per_worker: CPUs reserved per worker.
        max_failures: worker-group restarts Ray Train attempts; each resumes from the last checkpoint.
        custom_resources: Ray custom resources per worker, e.g. {"accelerator_a100": 1}.
        torch_threads: torch intra-op threads on each worker (0: leave torch's setting).
    """

    backend: Literal["ray", "local"] = "ray"
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    max_failures: int = 1
    custom_resources: dict[str, float] = field(default_factory=dict)
    torch_threads: int = 0
