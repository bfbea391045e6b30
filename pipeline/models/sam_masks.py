"""SAM's automatic mask generator on an image embedding computed beforehand (e.g. in a batch with other images).

For the full-image crop (``amg.crop_n_layers == 0``, the default) the loop of segment_anything's
``SamAutomaticMaskGenerator`` is written out here in batched torch on the model's device, with the mask decoder
called in two halves on the stored embedding (`pipeline.models.sam_decoder`), so the image encoder never runs twice:

1. a regular grid of ``points_per_side``² points over the image (`build_all_layer_point_grids`, XY pixels), in
   batches of ``points_per_batch``;
2. each point is one foreground prompt; the decoder's transformer half gives the 3 multimask outputs' predicted
   IoUs (`pipeline.models.sam_decoder.decode_tokens_shared`, the image side of the first block shared by the
   batch's points, with ``sam.shared_image_decoder``, else the exact `decode_tokens`);
3. keep predicted IoU > ``pred_iou_thresh`` (when > 0) **before** any mask logit exists: the IoU head does not
   depend on the mask head, so the mask head (`mask_logits`, low resolution) runs only on points with a surviving
   output and only the survivors are upsampled to the original resolution (SAM's ``postprocess_masks``, per mask);
   then stability score >= ``stability_score_thresh`` (when > 0; `calculate_stability_score` with
   ``stability_score_offset``);
4. binarise at the model's mask threshold, XYXY boxes (`batched_mask_to_box`); the bool masks stay on the device;
5. box NMS over all points at ``box_nms_thresh``, by predicted IoU (torchvision `batched_nms`; the kept masks come
   out by decreasing score);
6. COCO RLE of the kept masks only, all in one pycocotools ``encode`` call on a column-major [H, W, N] array
   (`batch_coco_rle`); areas and boxes are tensor ops. With ``min_mask_region_area > 0``, segment_anything's
   small-region removal (OpenCV) runs first on its own ``MaskData``.

segment_anything's crop-edge filter and its uncrop steps are identities for the full-image crop and are left out.
With ``sam.shared_image_decoder: false`` the records equal ``SamAutomaticMaskGenerator(model,
output_mode="coco_rle", **amg).generate(image)`` (masks, scores, boxes, order) when the embedding is the one the
generator computes itself (with the default shared-image decoder they equal it up to float rounding of the scores,
masks within ~1e-5 of a threshold aside: tests/models/test_sam_two_way.py): the same decoder calls on the
same point batches, the same per-mask upsampling, the same NMS input order (tests/models/test_sam_masks.py compares
every field as JSON).

``crop_n_layers > 0`` falls back to ``SamAutomaticMaskGenerator`` itself (it encodes the image and every crop
again); note that segment_anything's crop-NMS step raises IndexError on an image where no crop keeps any mask.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from pipeline.models.configs import AmgConfig
from pipeline.models.precision import autocast
from pipeline.models.preprocess import check_rgb_uint8

if TYPE_CHECKING:
    from segment_anything.utils.amg import MaskData

    from pipeline.models.sam import Sam, SamImageEmbeddings


@dataclass
class KeptMasks:
    """The automatic masks of one image after NMS, on the model's device, by decreasing predicted IoU.

    Attributes:
        masks: bool [N, H, W] at the original resolution.
        boxes: int64 [N, 4] XYXY pixels (segment_anything's `batched_mask_to_box`).
        iou_preds: float32 [N] SAM's predicted IoU.
        stability_score: float32 [N].
        points: float64 [N, 2] the XY prompt of each mask.
    """

    masks: torch.Tensor
    boxes: torch.Tensor
    iou_preds: torch.Tensor
    stability_score: torch.Tensor
    points: torch.Tensor


def automatic_masks(sam: Sam, image: np.ndarray, amg: AmgConfig, embeddings: SamImageEmbeddings | None = None,
                    index: int = 0) -> list[dict[str, Any]]:
    """SAM's automatic masks of one image, reusing its embedding when given (see the module docstring).

    Args:
        sam: the SAM wrapper.
        image: HxWx3 uint8 RGB.
        amg: generator knobs.
        embeddings: `Sam.embed_images` output holding `image` at position `index`; None = encode `image` here.
        index: position of `image` in `embeddings`.

    Returns:
        segment_anything's records: ``segmentation`` (COCO RLE, ``counts`` str, ``size`` [H, W]), ``area`` (pixels),
        ``bbox`` (XYWH pixels), ``predicted_iou``, ``point_coords`` ([[x, y]]), ``stability_score``, ``crop_box``
        (XYWH), by decreasing predicted IoU.
    """
    return automatic_masks_with_arrays(sam, image, amg, embeddings, index)[0]


def automatic_masks_with_arrays(sam: Sam, image: np.ndarray, amg: AmgConfig,
                                embeddings: SamImageEmbeddings | None = None,
                                index: int = 0) -> tuple[list[dict[str, Any]], np.ndarray]:
    """`automatic_masks` and the records' masks as bool [N, H, W] (no RLE decoding needed by the caller)."""
    check_rgb_uint8(image)
    if amg.min_mask_region_area > 0:
        _require_opencv()
    if amg.crop_n_layers > 0:
        return _with_decoded(_segment_anything_generator(sam, image, amg), image.shape[:2])
    if embeddings is None:
        embeddings, index = sam.embed_images([image]), 0
    if tuple(embeddings.original_sizes[index]) != tuple(image.shape[:2]):
        raise ValueError(f"embedding {index} is of a {embeddings.original_sizes[index]} image, not {image.shape[:2]}")
    kept = full_image_masks(sam, embeddings, index, amg)
    if amg.min_mask_region_area > 0:
        from segment_anything import SamAutomaticMaskGenerator

        data = SamAutomaticMaskGenerator.postprocess_small_regions(
            _mask_data(kept), amg.min_mask_region_area, max(amg.box_nms_thresh, amg.crop_nms_thresh))
        return _with_decoded(mask_records(data), image.shape[:2])
    masks = kept.masks.cpu().numpy()
    return kept_records(kept, masks), masks


@torch.no_grad()
def full_image_masks(sam: Sam, embeddings: SamImageEmbeddings, index: int, amg: AmgConfig) -> KeptMasks:
    """Steps 1-5 of the module docstring on image `index` of `embeddings` (all tensors on the model's device)."""
    from segment_anything.utils.amg import batch_iterator, build_all_layer_point_grids
    from torchvision.ops.boxes import batched_nms

    if amg.points_per_side is None:
        raise ValueError("amg.points_per_side must be set (explicit point grids are not supported)")
    height, width = embeddings.original_sizes[index]
    embedding = embeddings.features[index:index + 1].to(sam.device)
    grid = build_all_layer_point_grids(amg.points_per_side, 0, amg.crop_n_points_downscale_factor)[0]
    parts = [_point_batch(sam, embedding, points, embeddings.input_sizes[index], (height, width), amg)
             for (points,) in batch_iterator(amg.points_per_batch, grid * np.array([[width, height]]))]
    masks, boxes, iou, stability, points = (torch.cat(column) for column in zip(*parts, strict=True))
    keep = batched_nms(boxes.float(), iou, torch.zeros(len(boxes), device=boxes.device),
                       iou_threshold=amg.box_nms_thresh)
    return KeptMasks(masks[keep], boxes[keep], iou[keep], stability[keep], points[keep])


def _point_batch(sam: Sam, embedding: torch.Tensor, points: np.ndarray, input_size: tuple[int, int],
                 image_hw: tuple[int, int], amg: AmgConfig) -> tuple[torch.Tensor, ...]:
    """Steps 2-4 for one batch of float64 [B, 2] XY points: (masks, boxes, iou, stability, points) of the 3B
    multimask outputs that pass the thresholds, in prompt-major order (as segment_anything flattens them)."""
    from segment_anything.utils.amg import batched_mask_to_box, calculate_stability_score

    from pipeline.models.sam_decoder import mask_logits

    coords = torch.as_tensor(sam.transform.apply_coords(points, image_hw), device=sam.device)
    labels = torch.ones(coords.shape[0], dtype=torch.int, device=sam.device)
    with autocast(sam.device, sam.cfg.precision):
        tokens = sam.decoder_tokens(embedding, coords[:, None, :], labels[:, None])
    iou = tokens.iou[:, 1:].float()  # the 3 multimask outputs (segment_anything's mask_slice)
    keep = iou > amg.pred_iou_thresh if amg.pred_iou_thresh > 0.0 else torch.ones_like(iou, dtype=torch.bool)
    rows = keep.any(dim=1)  # exact before the mask head: the IoU head never sees the mask logits
    with autocast(sam.device, sam.cfg.precision):
        low_res = mask_logits(sam.model, tokens, rows)[:, 1:].float()[keep[rows]]
    iou = iou[keep]
    xy = torch.as_tensor(points.repeat(3, axis=0), device=sam.device)[keep.flatten()]
    logits = sam.upsample(low_res[:, None], input_size, image_hw)[:, 0]
    threshold = sam.model.mask_threshold
    stability = calculate_stability_score(logits, threshold, amg.stability_score_offset)
    if amg.stability_score_thresh > 0.0:
        keep = stability >= amg.stability_score_thresh
        logits, iou, xy, stability = logits[keep], iou[keep], xy[keep], stability[keep]
    masks = logits > threshold
    return masks, batched_mask_to_box(masks), iou, stability, xy


def batch_coco_rle(masks: np.ndarray) -> list[dict[str, Any]]:
    """COCO RLE (``{"size": [H, W], "counts": str}``) of bool [N, H, W] masks in one pycocotools call.

    Equal to segment_anything's ``coco_encode_rle(mask_to_rle_pytorch(...))`` per mask: both are pycocotools'
    compressed column-major RLE of the same bits.
    """
    from pycocotools import mask as mask_utils

    if len(masks) == 0:
        return []
    encoded = mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8)))
    return [{"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("utf-8")} for rle in encoded]


def kept_records(kept: KeptMasks, masks: np.ndarray) -> list[dict[str, Any]]:
    """segment_anything's ``coco_rle`` records of `kept` (`masks` = its masks on the CPU)."""
    height, width = masks.shape[1:]
    xywh = torch.cat([kept.boxes[:, :2], kept.boxes[:, 2:] - kept.boxes[:, :2]], 1).tolist()
    areas = kept.masks.flatten(1).sum(1).tolist()
    iou, stability, points = kept.iou_preds.tolist(), kept.stability_score.tolist(), kept.points.tolist()
    return [{"segmentation": rle, "area": areas[i], "bbox": xywh[i], "predicted_iou": iou[i],
             "point_coords": [points[i]], "stability_score": stability[i], "crop_box": [0, 0, width, height]}
            for i, rle in enumerate(batch_coco_rle(masks))]


def _mask_data(kept: KeptMasks) -> MaskData:
    """segment_anything's numpy ``MaskData`` of `kept` (for its small-region removal)."""
    from segment_anything.utils.amg import MaskData, mask_to_rle_pytorch

    height, width = kept.masks.shape[1:]
    data = MaskData(rles=mask_to_rle_pytorch(kept.masks), boxes=kept.boxes, iou_preds=kept.iou_preds,
                    stability_score=kept.stability_score, points=kept.points,
                    crop_boxes=torch.tensor([[0, 0, width, height]] * len(kept.boxes), dtype=torch.int64))
    data.to_numpy()
    return data


def _with_decoded(records: list[dict[str, Any]], image_hw: tuple[int, int]) -> tuple[list[dict[str, Any]],
                                                                                      np.ndarray]:
    from pipeline.sample_files import rle_to_mask

    masks = [rle_to_mask(r["segmentation"]) for r in records]
    return records, np.stack(masks) if masks else np.zeros((0, *image_hw), bool)


def mask_records(data: MaskData) -> list[dict[str, Any]]:
    """segment_anything's ``coco_rle`` output records of numpy ``MaskData`` (see `automatic_masks`)."""
    from segment_anything.utils.amg import area_from_rle, box_xyxy_to_xywh, coco_encode_rle

    return [{"segmentation": coco_encode_rle(rle), "area": area_from_rle(rle),
             "bbox": box_xyxy_to_xywh(data["boxes"][i]).tolist(), "predicted_iou": data["iou_preds"][i].item(),
             "point_coords": [data["points"][i].tolist()], "stability_score": data["stability_score"][i].item(),
             "crop_box": box_xyxy_to_xywh(data["crop_boxes"][i]).tolist()}
            for i, rle in enumerate(data["rles"])]


def _segment_anything_generator(sam: Sam, image: np.ndarray, amg: AmgConfig) -> list[dict[str, Any]]:
    """``crop_n_layers > 0``: segment_anything's own generator (re-encodes the image and each crop)."""
    from segment_anything import SamAutomaticMaskGenerator

    generator = SamAutomaticMaskGenerator(sam.model, output_mode="coco_rle", **asdict(amg))
    with torch.no_grad(), autocast(sam.device, sam.cfg.precision):
        return generator.generate(image)


def _require_opencv() -> None:
    try:
        import cv2  # noqa: F401 - segment_anything's small-region removal needs it
    except ImportError as error:
        raise ImportError("amg.min_mask_region_area > 0 needs opencv (cv2); set it to 0 or install "
                          "opencv-python-headless") from error
