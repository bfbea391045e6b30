"""segment_anything SAM wrapper: batched image embeddings, batched point prompts, automatic masks, COCO RLE.

Automatic masks reuse an embedding computed beforehand (`pipeline.models.sam_masks`).

`Sam` composes segment_anything's ``Sam`` module (``Sam.model``). Real sizes (``vit_h``/``vit_l``/``vit_b``) are
built by ``sam_model_registry`` without a checkpoint; ``toy`` is a small model of the same architecture from
``configs/sam-toy.json`` (256 px input, 64-wide 4-block encoder) for tests and the CPU demo. Weights are then loaded
by `pipeline.models.checkpoints` (``weights_only=True``, strict keys and shapes, errors naming the architecture).

Coordinates: point prompts are (x, y) continuous pixel coordinates of the original image (SAM's convention);
masks are bool [H, W] at the original resolution.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.config import resolve_device
from pipeline.models.accel import accelerate_sam, host_to_device
from pipeline.models.checkpoints import (
    load_checked,
    resolve_weights,
    seeded_init,
)
from pipeline.models.configs import AmgConfig, SamConfig, sam_identity
from pipeline.models.precision import autocast
from pipeline.models.preprocess import check_rgb_uint8
from pipeline.models.sam_decoder import DecoderTokens, decode_tokens, decode_tokens_shared, mask_logits

TOY_CONFIG = Path(__file__).resolve().parent / "configs" / "sam-toy.json"


@dataclass
class SamImageEmbeddings:
    """Image-encoder output for a batch of images.

    Attributes:
        features: [B, C, h, w] image embeddings (C = 256 and h = w = 64 for real SAM; 64 and 16 for ``toy``).
        input_sizes: per image, (height, width) after ResizeLongestSide, before padding.
        original_sizes: per image, (H, W) of the original image.
    """

    features: torch.Tensor
    input_sizes: list[tuple[int, int]] = field(default_factory=list)
    original_sizes: list[tuple[int, int]] = field(default_factory=list)


def build_toy_sam(config_path: Path = TOY_CONFIG) -> torch.nn.Module:
    """Small SAM of the real architecture from a JSON config (keys as in ``configs/sam-toy.json``)."""
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, TwoWayTransformer
    from segment_anything.modeling import Sam as SamModule

    cfg = json.loads(Path(config_path).read_text())
    grid = cfg["img_size"] // cfg["patch_size"]
    encoder = ImageEncoderViT(
        depth=cfg["encoder_depth"], embed_dim=cfg["encoder_embed_dim"], img_size=cfg["img_size"], mlp_ratio=4,
        norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), num_heads=cfg["encoder_num_heads"],
        patch_size=cfg["patch_size"], qkv_bias=True, use_rel_pos=True,
        global_attn_indexes=tuple(cfg["encoder_global_attn_indexes"]), window_size=cfg["window_size"],
        out_chans=cfg["prompt_embed_dim"],
    )
    prompt_encoder = PromptEncoder(
        embed_dim=cfg["prompt_embed_dim"], image_embedding_size=(grid, grid),
        input_image_size=(cfg["img_size"], cfg["img_size"]), mask_in_chans=cfg["mask_in_chans"],
    )
    decoder = MaskDecoder(
        num_multimask_outputs=3,
        transformer=TwoWayTransformer(depth=cfg["decoder_depth"], embedding_dim=cfg["prompt_embed_dim"],
                                      mlp_dim=cfg["decoder_mlp_dim"], num_heads=cfg["decoder_num_heads"]),
        transformer_dim=cfg["prompt_embed_dim"], iou_head_depth=cfg["iou_head_depth"],
        iou_head_hidden_dim=cfg["iou_head_hidden_dim"],
    )
    return SamModule(image_encoder=encoder, prompt_encoder=prompt_encoder, mask_decoder=decoder,
                     pixel_mean=[123.675, 116.28, 103.53], pixel_std=[58.395, 57.12, 57.375])


def build_sam_architecture(model_type: str) -> torch.nn.Module:
    """Randomly initialised SAM of `model_type` (``toy`` or a ``sam_model_registry`` key), in eval mode."""
    if model_type == "toy":
        return build_toy_sam().eval()
    from segment_anything import sam_model_registry

    if model_type not in ("vit_h", "vit_l", "vit_b"):
        raise ValueError(f"sam.model_type must be one of vit_h, vit_l, vit_b, toy; got {model_type!r}")
    return sam_model_registry[model_type](checkpoint=None).eval()


class Sam:
    """A frozen SAM with numpy-facing methods over batched torch cores (all under ``torch.no_grad``)."""

    def __init__(self, model: torch.nn.Module, cfg: SamConfig, identity: str) -> None:
        """Wrap a built segment_anything ``Sam``; use `Sam.build` to construct one from a `SamConfig`."""
        from segment_anything.utils.transforms import ResizeLongestSide

        self.model = model.eval()
        self.cfg = cfg
        self.identity = identity
        self.transform = ResizeLongestSide(model.image_encoder.img_size)

    @classmethod
    def build(cls, cfg: SamConfig) -> Sam:
        """Build the architecture and load ``cfg.checkpoint`` (strict).

        Raises:
            FileNotFoundError: the checkpoint path/URL does not exist (message names ``sam.checkpoint``).
            CheckpointMismatchError: the checkpoint does not fit ``cfg.model_type``.
        """
        local = resolve_weights(cfg.checkpoint, key="sam.checkpoint", allow_tags=False)
        with seeded_init(cfg.init_seed):
            model = build_sam_architecture(cfg.model_type)
        if local is not None:
            load_checked(model, local, arch=f"sam {cfg.model_type}", source="sam.checkpoint")
        model.to(resolve_device(cfg.device))
        accelerate_sam(model, cfg.sdpa, cfg.channels_last, cfg.compile)
        return cls(model, cfg, identity=sam_identity(cfg))

    @property
    def device(self) -> torch.device:
        """Device of the model's parameters."""
        return self.model.device

    @property
    def image_size(self) -> int:
        """Square encoder input side in pixels (1024 for real SAM, 256 for ``toy``)."""
        return int(self.model.image_encoder.img_size)

    @torch.no_grad()
    def embed_images(self, images: Sequence[np.ndarray], batch_size: int | None = None) -> SamImageEmbeddings:
        """Run the image encoder on a batch of images (ResizeLongestSide, normalise, pad, encode).

        Args:
            images: HxWx3 uint8 RGB arrays, any sizes.
            batch_size: images per encoder call (None = ``cfg.encoder_batch_size``). With 1 every embedding is
                independent of the other images; with more, batched matmuls move it by float noise (~1e-6) with
                the batch's composition.

        Returns:
            `SamImageEmbeddings` with ``features`` [len(images), C, h, w] float32.
        """
        inputs, input_sizes, original_sizes = [], [], []
        for image in images:
            check_rgb_uint8(image)
            resized = host_to_device(self.transform.apply_image(image), self.device, self.cfg.pin_memory)
            resized = resized.permute(2, 0, 1).contiguous()[None].float()
            input_sizes.append((int(resized.shape[-2]), int(resized.shape[-1])))
            original_sizes.append((int(image.shape[0]), int(image.shape[1])))
            inputs.append(self.model.preprocess(resized))
        step = batch_size or self.cfg.encoder_batch_size
        feats = []
        with autocast(self.device, self.cfg.precision):
            for start in range(0, len(inputs), step):
                feats.append(self.model.image_encoder(torch.cat(inputs[start:start + step])).float())
        return SamImageEmbeddings(torch.cat(feats), input_sizes, original_sizes)

    @torch.no_grad()
    def decode_points(
        self,
        embeddings: SamImageEmbeddings,
        index: int,
        prompts: Sequence[np.ndarray],
        labels: Sequence[np.ndarray] | None = None,
        multimask: bool = True,
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        """Masks for several point-prompt sets on one already-embedded image, batched through the decoder.

        Sets with the same number of points share decoder calls (up to ``prompt_batch_size`` sets each). Sets are
        never padded to a common size: SAM's padding token takes part in the decoder's attention, so padding would
        change the masks relative to prompting each set alone.

        Args:
            embeddings: output of `embed_images`.
            index: which image of `embeddings`.
            prompts: Q arrays [P_q, 2] (P_q >= 1) of (x, y) original-image pixel coordinates; the points of a set
                are given to SAM together.
            labels: Q arrays [P_q] (1 foreground, 0 background); ``None`` means all foreground.
            multimask: return SAM's 3 multimask outputs (True) or its single output (False).

        Returns:
            Q tuples (masks bool [K, H, W], scores float32 [K]) in prompt order, K = 3 or 1; scores are SAM's
            predicted IoU.
        """
        points = [np.asarray(p, dtype=np.float64).reshape(-1, 2) for p in prompts]
        point_labels = [np.ones(len(p), np.int64) if labels is None else np.asarray(labels[q], np.int64).reshape(-1)
                        for q, p in enumerate(points)]
        if any(len(p) == 0 or len(p) != len(lab) for p, lab in zip(points, point_labels, strict=True)):
            raise ValueError("every point-prompt set needs >= 1 point and one label per point")
        image_embedding = embeddings.features[index:index + 1].to(self.device)
        sizes = (embeddings.input_sizes[index], embeddings.original_sizes[index])
        results: list[tuple[np.ndarray, np.ndarray]] = [(np.empty(0), np.empty(0))] * len(points)
        for count in sorted({len(p) for p in points}):
            members = [q for q, p in enumerate(points) if len(p) == count]
            for start in range(0, len(members), self.cfg.prompt_batch_size):
                chunk = members[start:start + self.cfg.prompt_batch_size]
                coords = self.transform.apply_coords(np.stack([points[q] for q in chunk]), sizes[1])
                coords_t = torch.as_tensor(coords, dtype=torch.float32, device=self.device)
                labels_t = torch.as_tensor(np.stack([point_labels[q] for q in chunk]), device=self.device)
                masks, scores = self._decode(image_embedding, coords_t, labels_t, multimask, *sizes)
                for q, mask, score in zip(chunk, masks, scores, strict=True):
                    results[q] = (mask, score)
        return results

    def _decode(self, image_embedding: torch.Tensor, coords: torch.Tensor, labels: torch.Tensor, multimask: bool,
                input_size: tuple[int, int], original_size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        logits, iou = self.decode_torch(image_embedding, coords, labels, multimask, input_size, original_size)
        return (logits > self.model.mask_threshold).cpu().numpy(), iou.cpu().numpy()

    @torch.no_grad()
    def decode_torch(self, image_embedding: torch.Tensor, coords: torch.Tensor, labels: torch.Tensor,
                     multimask: bool, input_size: tuple[int, int],
                     original_size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """The batched torch core of the decoders: B point-prompt sets on one image embedding (SAM's predict_torch).

        Args:
            image_embedding: [1, C, h, w] one image's embedding, on the model's device.
            coords: [B, P, 2] (x, y) points already in the encoder's input frame (``transform.apply_coords``).
            labels: [B, P] 1 foreground, 0 background.
            multimask: K = 3 multimask outputs (True) or K = 1.
            input_size: (h, w) after ResizeLongestSide, before padding.
            original_size: (H, W) of the original image.

        Returns:
            (mask logits float32 [B, K, H, W] at the original resolution, predicted IoU float32 [B, K]), on the
            model's device; a mask is ``logits > model.mask_threshold``.
        """
        low_res, iou = self.decode_low_res(image_embedding, coords, labels, multimask)
        return self.upsample(low_res, input_size, original_size), iou

    @torch.no_grad()
    def decode_low_res(self, image_embedding: torch.Tensor, coords: torch.Tensor, labels: torch.Tensor,
                       multimask: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompt encoder + mask decoder only: (low-resolution mask logits float32 [B, K, 4h, 4w], predicted IoU
        float32 [B, K]); arguments as in `decode_torch`. Filters on the IoU can run before `upsample`. The decoder
        is `decoder_tokens`' and the mask head (bit-equal to ``MaskDecoder`` on the exact path)."""
        outputs = slice(1, None) if multimask else slice(0, 1)  # segment_anything's mask_slice
        with autocast(self.device, self.cfg.precision):
            tokens = self.decoder_tokens(image_embedding, coords, labels)
            low_res = mask_logits(self.model, tokens)
        return low_res[:, outputs].float(), tokens.iou[:, outputs].float()

    def decoder_tokens(self, image_embedding: torch.Tensor, coords: torch.Tensor,
                       labels: torch.Tensor) -> DecoderTokens:
        """The mask decoder's transformer half (`DecoderTokens`) for B prompt sets on one embedding [1, C, h, w]:
        the shared-image path with ``cfg.shared_image_decoder`` (float rounding only), else segment_anything's exact
        one. Callers apply autocast."""
        decode = decode_tokens_shared if self.cfg.shared_image_decoder else decode_tokens
        return decode(self.model, image_embedding, coords, labels)

    def upsample(self, low_res: torch.Tensor, input_size: tuple[int, int],
                 original_size: tuple[int, int]) -> torch.Tensor:
        """SAM's own ``postprocess_masks``: low-resolution logits [B, K, 4h, 4w] -> float32 [B, K, H, W] logits at
        the original resolution (each mask independently of the others in the batch)."""
        return self.model.postprocess_masks(low_res, input_size, original_size)

    def predict_points(
        self,
        image: np.ndarray,
        prompts: Sequence[np.ndarray],
        labels: Sequence[np.ndarray] | None = None,
        multimask: bool = True,
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        """One image-encoder pass, then all prompt sets through the decoder (see `decode_points`).

        Args:
            image: HxWx3 uint8 RGB.
            prompts: Q arrays [P_q, 2] of (x, y) pixel coordinates.
            labels: Q arrays [P_q] of 1/0 labels, or ``None`` for all foreground.
            multimask: 3 outputs per set (True) or 1.

        Returns:
            Q tuples (masks bool [K, H, W], scores float32 [K]).
        """
        return self.decode_points(self.embed_images([image]), 0, prompts, labels, multimask)

    def generate(self, image: np.ndarray, amg: AmgConfig | None = None, embeddings: SamImageEmbeddings | None = None,
                 index: int = 0) -> list[dict[str, Any]]:
        """SAM's automatic mask generator on one image (`pipeline.models.sam_masks.automatic_masks`).

        Args:
            image: HxWx3 uint8 RGB.
            amg: generator knobs (segment_anything defaults when ``None``).
            embeddings: `embed_images` output holding `image` at `index` (so the encoder does not run again);
                None = encode `image` here.
            index: position of `image` in `embeddings`.

        Returns:
            segment_anything's records: ``segmentation`` (COCO RLE dict, ``counts`` str, ``size`` [H, W]), ``area``
            (pixels), ``bbox`` (XYWH pixels), ``predicted_iou``, ``point_coords`` ([[x, y]]), ``stability_score``,
            ``crop_box`` (XYWH), by decreasing predicted IoU.
        """
        from pipeline.models.sam_masks import automatic_masks

        return automatic_masks(self, image, amg or AmgConfig(), embeddings, index)
