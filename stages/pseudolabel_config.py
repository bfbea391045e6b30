"""Configuration of the pseudolabel stage: its knobs, and the checks that fail before any compute.

Model configs (`clip`, `sam`, `amg`) are plain dicts here so that reading a config never imports torch; their keys
are checked against the field names below, which a test keeps equal to the real dataclasses'.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pipeline.config import ConfigError, resolve_device
from pipeline.stage import Resources

SCHEMA = "pseudolabel/1"
MODES = ("stage11", "stage12", "both")
LABELERS = ("dense", "crop")
IMAGE_FORMATS = ("jpg", "png", "none")
METHOD_KNOBS = ("vocab", "prompt_templates", "name_variant", "crop", "stride", "image_short_side", "min_crops",
                "top_k", "mode", "merge_policy", "amg", "min_mask_area", "min_predicted_iou", "labeler")


@dataclass
class PseudoLabelConfig:
    """Knobs of the pseudolabel stage (mirrored by conf/stage/pseudolabel.yaml); see the module docstring.

    Attributes:
        vocab: vocabulary name or YAML path (the classes to label with; GT of the input must use it).
        prompt_templates: template set of `pipeline.models.prompts` ("single" = "a photo of a {}.", as Seifi et al.).
        name_variant: vocabulary name variant used in prompts (None = official names).
        data: input adapter config (``kind`` + its fields, `pipeline.data.registry.build_adapter`); its ``vocab``
            defaults to `vocab`.
        samples_per_shard: images per output shard.
        clip: `pipeline.models.clip.ClipConfig` fields; ``device: auto`` = cuda when available, else cpu.
        sam: `pipeline.models.sam.SamConfig` fields; ``device: auto`` as for clip.
        crop: presence/feature window side in resized pixels (None = CLIP's native input side).
        stride: window step in resized pixels (None = crop // 2, rounded down to the patch size).
        image_short_side: resize the short side to this before CLIP (None keeps the image size).
        min_crops: a class is present when more than this many crops vote for it.
        top_k: point prompts per present class (stage 1.1).
        mode: which producers make the label map: "stage11", "stage12" or "both".
        merge_policy: "stage11_first" or "highest_score" (used when mode = both).
        amg: `pipeline.models.sam.AmgConfig` fields (SAM's automatic mask generator, stage 1.2).
        min_mask_area: smallest kept automatic mask, pixels of the original image.
        min_predicted_iou: smallest kept SAM predicted IoU of an automatic mask.
        labeler: stage 1.2 labeller, "dense" (Seifi et al.) or "crop" (ZSSeg).
        image_format: "jpg", "png" or "none" (only a reference in json.source).
        jpeg_quality: JPEG quality (4:4:4 chroma) when image_format = "jpg".
        keep_ground_truth: write gt.png when the input has ground truth.
        resources: workers; batch_size = images per model call.
    """

    vocab: str = "coco_stuff_171"
    prompt_templates: str = "single"
    name_variant: str | None = None
    data: dict[str, Any] = field(default_factory=dict)
    samples_per_shard: int = 256
    clip: dict[str, Any] = field(default_factory=lambda: {"model_name": "ViT-B-16", "pretrained": None,
                                                          "device": "auto"})
    sam: dict[str, Any] = field(default_factory=lambda: {"model_type": "vit_h", "checkpoint": None, "device": "auto"})
    crop: int | None = None
    stride: int | None = None
    image_short_side: int | None = 448
    min_crops: int = 1
    top_k: int = 5
    mode: str = "both"
    merge_policy: str = "stage11_first"
    amg: dict[str, Any] = field(default_factory=dict)
    min_mask_area: int = 100
    min_predicted_iou: float = 0.88
    labeler: str = "dense"
    image_format: str = "jpg"
    jpeg_quality: int = 95
    keep_ground_truth: bool = True
    resources: Resources = field(default_factory=lambda: Resources(num_cpus=1.0, batch_size=16))


CLIP_KEYS = frozenset({"model_name", "pretrained", "precision", "device", "force_quick_gelu", "init_seed",
                       "dense_residual_mlp", "text_batch_size", "image_batch_size"})
SAM_KEYS = frozenset({"model_type", "checkpoint", "device", "precision", "init_seed", "encoder_batch_size",
                      "prompt_batch_size"})
AMG_KEYS = frozenset({"points_per_side", "points_per_batch", "pred_iou_thresh", "stability_score_thresh",
                      "stability_score_offset", "box_nms_thresh", "crop_n_layers", "crop_nms_thresh",
                      "crop_overlap_ratio", "crop_n_points_downscale_factor", "min_mask_region_area"})


def _choice(node: str, key: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{node}.{key}={value!r}: choose one of {list(allowed)}")


def _positive(node: str, key: str, value: int | None, minimum: int = 1) -> None:
    if value is not None and value < minimum:
        raise ConfigError(f"{node}.{key}={value}: must be >= {minimum}")


def check_config(cfg: PseudoLabelConfig, node: str) -> None:
    """Raise ConfigError naming the key and the fix for bad choices, numbers or model-config keys."""
    _choice(node, "mode", cfg.mode, MODES)
    _choice(node, "merge_policy", cfg.merge_policy, ("stage11_first", "highest_score"))
    _choice(node, "labeler", cfg.labeler, LABELERS)
    _choice(node, "image_format", cfg.image_format, IMAGE_FORMATS)
    for key in ("samples_per_shard", "top_k", "crop", "stride", "image_short_side"):
        _positive(node, key, getattr(cfg, key))
    _positive(node, "jpeg_quality", cfg.jpeg_quality)
    for key in ("min_crops", "min_mask_area"):
        _positive(node, key, getattr(cfg, key), 0)
    for key, known in (("clip", CLIP_KEYS), ("sam", SAM_KEYS), ("amg", AMG_KEYS)):
        unknown = sorted(set(getattr(cfg, key)) - known)
        if unknown:
            raise ConfigError(f"{node}.{key} has unknown key(s) {unknown}; valid keys: {sorted(known)}")


def model_config(values: dict[str, Any]) -> dict[str, Any]:
    """A model config dict with ``device: auto`` resolved (`pipeline.config.resolve_device`); worker side."""
    return {**values, "device": resolve_device(values["device"])} if "device" in values else dict(values)


def _weights(ref: str | None, seed: int, key: str, allow_tags: bool = True) -> str:
    from pipeline.models.checkpoints import model_weights_identity

    try:
        return model_weights_identity(ref, seed, key, allow_tags)
    except FileNotFoundError as error:
        raise ConfigError(str(error)) from None


def clip_identity(clip: dict[str, Any]) -> str:
    """The identity `Clip.build` gives this config (architecture @ weights)."""
    quick = "+quickgelu" if clip.get("force_quick_gelu") else ""
    weights = _weights(clip.get("pretrained"), int(clip.get("init_seed", 0)), "clip.pretrained")
    return f"open_clip:{clip.get('model_name', 'ViT-B-16')}{quick}@{weights}"


def sam_identity(sam: dict[str, Any]) -> str:
    """The identity `Sam.build` gives this config (architecture @ weights)."""
    weights = _weights(sam.get("checkpoint"), int(sam.get("init_seed", 0)), "sam.checkpoint", allow_tags=False)
    return f"sam:{sam.get('model_type', 'vit_b')}@{weights}"
