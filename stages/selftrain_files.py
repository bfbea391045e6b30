"""File encoders of "pseudolabel/1" samples written by the selftrain stage: images, label maps, class regions."""

from __future__ import annotations

import io
from typing import Any

import numpy as np

PRODUCER = "selftrain"


def encode_image(image: np.ndarray, fmt: str, quality: int = 95) -> bytes:
    """[H, W, 3] uint8 RGB as JPEG (quality `quality`, 4:4:4 chroma) or PNG bytes (PIL, no metadata)."""
    from PIL import Image

    buffer = io.BytesIO()
    if fmt == "jpg":
        Image.fromarray(image).save(buffer, format="JPEG", quality=quality, subsampling=0)
    else:
        Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def encode_label_png(label: np.ndarray) -> bytes:
    """PNG bytes of an [H, W] uint8 (mode L) or uint16 (mode I;16) label map; values are kept exactly."""
    from PIL import Image

    if label.dtype not in (np.uint8, np.uint16):
        raise ValueError(f"label maps are uint8 or uint16, got {label.dtype}")
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(label)).save(buffer, format="PNG")
    return buffer.getvalue()


def class_regions(label: np.ndarray, scores: np.ndarray, ignore_index: int) -> list[dict[str, Any]]:
    """One `masks.json` entry per class present in `label`, in id order.

    Args:
        label: [H, W] train ids, `ignore_index` = unlabelled.
        scores: [C, H, W] float model scores; an entry's score is the mean of its class's scores over its pixels.
        ignore_index: label value skipped.

    Returns:
        [{"segmentation": COCO RLE (counts str), "category_id", "score", "producer", "area" (pixels),
        "bbox": [x, y, w, h] (pixels, inclusive extent)}].
    """
    from pipeline.models.sam import mask_to_rle

    regions = []
    for class_id in np.unique(label):
        if int(class_id) == ignore_index:
            continue
        mask = label == class_id
        ys, xs = np.nonzero(mask)
        regions.append({
            "segmentation": mask_to_rle(mask), "category_id": int(class_id),
            "score": round(float(scores[int(class_id)][mask].mean()), 6), "producer": PRODUCER,
            "area": int(mask.sum()),
            "bbox": [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)],
        })
    return regions
