"""Torch-free configs of the foundation models: what the stages' typed configs nest and the builders take.

Reading or validating a config never imports torch, so the driver checks every model knob (`pipeline.config.
build_config`) before any work; `device: auto` is resolved by the builders on the worker (`resolve_device`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

DenseBackend = Literal["maskclip", "sclip", "clearclip", "naclip", "proxyclip"]  # `pipeline.models.clip_dense`


@dataclass
class ClipConfig:
    """How to build a `Clip`.

    Attributes:
        model_name: open_clip architecture (``ViT-B-16``, ``ViT-L-14``, ``toy-vit``, ...).
        pretrained: hub tag, local path, fsspec URL, or ``None`` for random init.
        precision: ``fp32``, ``bf16`` or ``fp16`` weights (open_clip's own conversion); outputs are float32.
        device: torch device string, or ``auto`` (cuda when available, else cpu; resolved on the worker).
        force_quick_gelu: use QuickGELU (needed for OpenAI weights loaded from a file).
        init_seed: seed for random init (``pretrained=None``), so random-init builds are reproducible.
        dense_residual_mlp: MaskCLIP value path with residual + MLP (MaskCLIP code, default) or value projection
            only (Seifi et al.'s wording); see `pipeline.models.clip_dense`. Used by ``dense: maskclip`` only.
        dense: training-free dense-feature backend, i.e. how CLIP's last block is rewired for patch features:
            ``maskclip`` (value path), ``sclip`` (q-q + k-k correlative attention), ``clearclip`` (q-q attention,
            no residual, no FFN), ``naclip`` (k-k attention + Gaussian neighbourhood prior, no residual, no FFN) or
            ``proxyclip`` (attention from the `proxy` model's patch features on CLIP's values); see
            `pipeline.models.clip_dense`. The CLS embedding never changes.
        naclip_std: NACLIP's Gaussian standard deviation in patches (paper: 5).
        proxy: the vision foundation model whose patch features give ProxyCLIP's attention (a DINOv2); required by
            ``dense: proxyclip``, unused otherwise.
        proxy_beta, proxy_gamma: ProxyCLIP's similarity threshold (times the mean similarity) and sharpness
            (paper: 1.2 and 3.0).
        text_batch_size: prompts per text-encoder call (does not change results).
        image_batch_size: crops per image-encoder call in `Clip.sliding_features`, crops of several images sharing
            calls (does not change results).
        compile: `torch.compile` the image tower's transformer blocks (`pipeline.models.accel.accelerate_clip`; slow
            first calls, on CPU too; float rounding may move). Attention already runs through SDPA: open_clip calls
            ``nn.MultiheadAttention`` without weights, which torch routes to ``scaled_dot_product_attention``.
    """

    model_name: str = "ViT-B-16"
    pretrained: str | None = None
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    device: str = "auto"
    force_quick_gelu: bool = False
    init_seed: int = 0
    dense_residual_mlp: bool = True
    dense: DenseBackend = "maskclip"
    naclip_std: float = 5.0
    proxy: Dinov2Config | None = None
    proxy_beta: float = 1.2
    proxy_gamma: float = 3.0
    text_batch_size: int = 256
    image_batch_size: int = 32
    compile: bool = False

    def __post_init__(self) -> None:
        if self.dense == "proxyclip" and self.proxy is None:
            raise ValueError("dense=proxyclip needs a proxy model: set proxy (a Dinov2Config, e.g. {name: toy})")
        if self.naclip_std <= 0:
            raise ValueError(f"naclip_std must be > 0, got {self.naclip_std}")


@dataclass
class SamConfig:
    """How to build a `Sam`.

    Attributes:
        model_type: ``vit_h``, ``vit_l``, ``vit_b`` (real SAM sizes) or ``toy`` (``configs/sam-toy.json``).
        checkpoint: local path or fsspec URL of a plain state dict (SAM's released ``.pth`` layout), or ``None``
            for random init.
        device: torch device string, or ``auto`` (cuda when available, else cpu; resolved on the worker).
        precision: ``fp32``, or ``bf16``/``fp16`` autocast around the encoder and decoder (weights stay fp32).
        init_seed: seed for random init, so random-init builds are reproducible.
        encoder_batch_size: images per image-encoder call in `Sam.embed_images` when the caller batches across
            images (moves embeddings by float noise with batch composition; see `Sam.embed_images`).
        prompt_batch_size: prompt sets per mask-decoder call in `Sam.decode_points` (moves scores by float rounding,
            as CPU matmul kernels change with the row count, so it is in the fingerprint; memory grows as
            sets x K x H x W float32 for the upsampled masks).
        sdpa: image-encoder and mask-decoder attention through PyTorch's scaled_dot_product_attention (fused kernels,
            CPU too; equal to SAM's own attention up to float rounding); see `pipeline.models.accel`.
        shared_image_decoder: the mask decoder (automatic generator and `Sam.decode_points`) computes the image
            side of the two-way transformer's first block once per image instead of once per prompt set,
            attention through SDPA (`pipeline.models.sam_two_way`; ~3x faster on CPU, equal to segment_anything's
            decoder up to float rounding, ~1e-6). False = segment_anything's own decoder (automatic masks
            bit-equal to ``SamAutomaticMaskGenerator``'s).
        channels_last: the encoder's convolutions in channels-last memory format.
        compile: `torch.compile` the image encoder and mask decoder (slow first calls; on CPU too).
        pin_memory: page-locked host images for asynchronous copies to a CUDA device (no-op on CPU); changes no
            value, so it is outside the fingerprint (`pipeline.fingerprint.RESOURCE_KEYS`); every other knob here is
            in it, float rounding included.
    """

    model_type: Literal["vit_h", "vit_l", "vit_b", "toy"] = "vit_b"
    checkpoint: str | None = None
    device: str = "auto"
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    init_seed: int = 0
    encoder_batch_size: int = 4
    prompt_batch_size: int = 16
    sdpa: bool = False
    shared_image_decoder: bool = True
    channels_last: bool = False
    compile: bool = False
    pin_memory: bool = True


@dataclass
class AmgConfig:
    """``SamAutomaticMaskGenerator`` knobs, defaults = segment_anything's own defaults.

    ``min_mask_region_area > 0`` removes small holes/islands with OpenCV, which is not installed by default here;
    it is therefore 0 (also SAM's default) and a positive value fails early with an ImportError naming cv2.
    ``output_mode`` is always ``coco_rle`` (masks as COCO RLE dicts with ``counts`` as str).
    """

    points_per_side: int | None = 32
    points_per_batch: int = 64
    pred_iou_thresh: float = 0.88
    stability_score_thresh: float = 0.95
    stability_score_offset: float = 1.0
    box_nms_thresh: float = 0.7
    crop_n_layers: int = 0
    crop_nms_thresh: float = 0.7
    crop_overlap_ratio: float = 512 / 1500
    crop_n_points_downscale_factor: int = 1
    min_mask_region_area: int = 0


@dataclass
class Dinov2Config:
    """How to build a `Dinov2`.

    Attributes:
        name: preset (``dinov2-small``/``-base``/``-large``/``-giant``, or ``toy``).
        weights: transformers directory, state-dict file, fsspec URL of either, or ``None`` for random init.
        device: torch device string, or ``auto`` (cuda when available, else cpu; resolved on the worker).
        init_seed: seed for random init, so random-init builds are reproducible.
    """

    name: str = "dinov2-base"
    weights: str | None = None
    device: str = "auto"
    init_seed: int = 0


def clip_identity(cfg: ClipConfig) -> str:
    """What `Clip.build(cfg)` loads: ``open_clip:<arch>[+quickgelu]@<weights identity>[+proxy=<dinov2 identity>]``.

    The proxy part is present only for ``dense: proxyclip`` (the only backend that loads the proxy model).
    """
    proxy = f"+proxy={dinov2_identity(cfg.proxy)}" if cfg.dense == "proxyclip" and cfg.proxy is not None else ""
    return f"{clip_weights_identity(cfg)}{proxy}"


def clip_weights_identity(cfg: ClipConfig) -> str:
    """The open_clip model alone, without the proxy: ``open_clip:<arch>[+quickgelu]@<weights identity>``."""
    from pipeline.models.checkpoints import model_weights_identity

    quick = "+quickgelu" if cfg.force_quick_gelu else ""
    weights = model_weights_identity(cfg.pretrained, cfg.init_seed, "clip.pretrained")
    return f"open_clip:{cfg.model_name}{quick}@{weights}"


def sam_identity(cfg: SamConfig) -> str:
    """What `Sam.build(cfg)` loads: ``sam:<model_type>@<weights identity>``."""
    from pipeline.models.checkpoints import model_weights_identity

    weights = model_weights_identity(cfg.checkpoint, cfg.init_seed, "sam.checkpoint", allow_tags=False)
    return f"sam:{cfg.model_type}@{weights}"


def dinov2_identity(cfg: Dinov2Config) -> str:
    """What `Dinov2.build(cfg)` loads: ``dinov2:<preset>@<weights identity>``."""
    from pipeline.models.checkpoints import model_weights_identity

    weights = model_weights_identity(cfg.weights, cfg.init_seed, "dinov2.weights", allow_tags=False)
    return f"dinov2:{cfg.name}@{weights}"
