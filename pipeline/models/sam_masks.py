"""SAM's automatic mask generator on an image embedding computed beforehand (e.g. in a batch with other images).

For the full-image crop (``amg.crop_n_layers == 0``, the default) the loop of segment_anything's
``SamAutomaticMaskGenerator`` is written out here from its public helpers (`segment_anything.utils.amg`), with the
mask decoder called on the stored embedding (`Sam.decode_torch`), so the image encoder never runs twice:

1. a regular grid of ``points_per_side``² points over the image (`build_all_layer_point_grids`, XY pixels), in
   batches of ``points_per_batch``;
2. each point is one foreground prompt; the decoder gives 3 multimask logits at the original resolution and their
   predicted IoUs;
3. keep predicted IoU > ``pred_iou_thresh`` (when > 0) and stability score >= ``stability_score_thresh`` (when > 0;
   `calculate_stability_score` with ``stability_score_offset``);
4. binarise at the model's mask threshold, XYXY boxes (`batched_mask_to_box`), uncompressed RLE on the model's
   device (`mask_to_rle_pytorch`);
5. box NMS over all points at ``box_nms_thresh``, by predicted IoU (torchvision `batched_nms`; the kept masks come
   out by decreasing score);
6. with ``min_mask_region_area > 0``, segment_anything's small-region removal (OpenCV), then COCO RLE records.

segment_anything's crop-edge filter and its uncrop steps are identities for the full-image crop and are left out.
The records equal ``SamAutomaticMaskGenerator(model, output_mode="coco_rle", **amg).generate(image)`` (masks,
scores, boxes, order) when the embedding is the one the generator computes itself; an embedding from a batch of
several images differs from it by float noise in the encoder only.

``crop_n_layers > 0`` falls back to ``SamAutomaticMaskGenerator`` itself (it encodes the image and every crop
again); note that segment_anything's crop-NMS step raises IndexError on an image where no crop keeps any mask.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from pipeline.models.configs import AmgConfig
from pipeline.models.precision import autocast
from pipeline.models.preprocess import check_rgb_uint8

if TYPE_CHECKING:
    from segment_anything.utils.amg import MaskData

    from pipeline.models.sam import Sam, SamImageEmbeddings


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
    check_rgb_uint8(image)
    if amg.min_mask_region_area > 0:
        _require_opencv()
    if amg.crop_n_layers > 0:
        return _segment_anything_generator(sam, image, amg)
    if embeddings is None:
        embeddings, index = sam.embed_images([image]), 0
    if tuple(embeddings.original_sizes[index]) != tuple(image.shape[:2]):
        raise ValueError(f"embedding {index} is of a {embeddings.original_sizes[index]} image, not {image.shape[:2]}")
    data = full_image_masks(sam, embeddings, index, amg)
    if amg.min_mask_region_area > 0:
        from segment_anything import SamAutomaticMaskGenerator

        data = SamAutomaticMaskGenerator.postprocess_small_regions(
            data, amg.min_mask_region_area, max(amg.box_nms_thresh, amg.crop_nms_thresh))
    return mask_records(data)


@torch.no_grad()
def full_image_masks(sam: Sam, embeddings: SamImageEmbeddings, index: int, amg: AmgConfig) -> MaskData:
    """Steps 1-5 of the module docstring on image `index` of `embeddings`.

    Returns:
        segment_anything ``MaskData`` (numpy): ``rles`` (uncompressed RLE dicts), ``boxes`` int64 [N, 4] XYXY,
        ``iou_preds`` float32 [N], ``stability_score`` float32 [N], ``points`` float64 [N, 2] XY, ``crop_boxes``
        int64 [N, 4] (all the full image), by decreasing predicted IoU.
    """
    from segment_anything.utils.amg import MaskData, batch_iterator, build_all_layer_point_grids
    from torchvision.ops.boxes import batched_nms

    if amg.points_per_side is None:
        raise ValueError("amg.points_per_side must be set (explicit point grids are not supported)")
    height, width = embeddings.original_sizes[index]
    embedding = embeddings.features[index:index + 1].to(sam.device)
    grid = build_all_layer_point_grids(amg.points_per_side, 0, amg.crop_n_points_downscale_factor)[0]
    data = MaskData()
    for (points,) in batch_iterator(amg.points_per_batch, grid * np.array([[width, height]])):
        data.cat(_point_batch(sam, embedding, points, embeddings.input_sizes[index], (height, width), amg))
    boxes = data["boxes"].float()
    keep = batched_nms(boxes, data["iou_preds"], torch.zeros(len(boxes), device=boxes.device),
                       iou_threshold=amg.box_nms_thresh)
    data.filter(keep)
    data["crop_boxes"] = torch.tensor([[0, 0, width, height] for _ in range(len(data["rles"]))])
    data.to_numpy()
    return data


def _point_batch(sam: Sam, embedding: torch.Tensor, points: np.ndarray, input_size: tuple[int, int],
                 image_hw: tuple[int, int], amg: AmgConfig) -> MaskData:
    """Steps 2-4 for one batch of float64 [B, 2] XY points: 3 masks per point, filtered, as RLE."""
    from segment_anything.utils.amg import (
        MaskData,
        batched_mask_to_box,
        calculate_stability_score,
        mask_to_rle_pytorch,
    )

    coords = torch.as_tensor(sam.transform.apply_coords(points, image_hw), device=sam.device)
    labels = torch.ones(coords.shape[0], dtype=torch.int, device=sam.device)
    logits, iou = sam.decode_torch(embedding, coords[:, None, :], labels[:, None], True, input_size, image_hw)
    data = MaskData(masks=logits.flatten(0, 1), iou_preds=iou.flatten(0, 1),
                    points=torch.as_tensor(points.repeat(logits.shape[1], axis=0)))
    if amg.pred_iou_thresh > 0.0:
        data.filter(data["iou_preds"] > amg.pred_iou_thresh)
    threshold = sam.model.mask_threshold
    data["stability_score"] = calculate_stability_score(data["masks"], threshold, amg.stability_score_offset)
    if amg.stability_score_thresh > 0.0:
        data.filter(data["stability_score"] >= amg.stability_score_thresh)
    data["masks"] = data["masks"] > threshold
    data["boxes"] = batched_mask_to_box(data["masks"])
    data["rles"] = mask_to_rle_pytorch(data["masks"])
    del data["masks"]
    return data


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
