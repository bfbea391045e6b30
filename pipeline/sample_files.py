"""Codecs of the files inside samples (`wordgrid/1`, `pseudolabel/1`, `eval/1`; docs/schema.md), shared by every
stage and reader: images, label PNGs, `.npy` arrays and `masks.json` region entries."""

from __future__ import annotations

import io
from collections.abc import Mapping
from typing import Any

import numpy as np
from PIL import Image


def encode_label_png(label: np.ndarray) -> bytes:
    """PNG bytes of an [H, W] uint8 (mode L) or uint16 (mode I;16) label map; values are kept exactly."""
    if label.dtype not in (np.uint8, np.uint16):
        raise ValueError(f"label maps are uint8 or uint16, got {label.dtype}")
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(label)).save(buffer, format="PNG")
    return buffer.getvalue()


def encode_image(image: np.ndarray, image_format: str, jpeg_quality: int = 95) -> bytes:
    """JPEG (quality `jpeg_quality`, 4:4:4 chroma) or PNG bytes of an [H, W, 3] uint8 RGB image (no metadata)."""
    buffer = io.BytesIO()
    if image_format == "jpg":
        Image.fromarray(image).save(buffer, format="JPEG", quality=jpeg_quality, subsampling=0)
    else:
        Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def encode_npy(array: np.ndarray) -> bytes:
    """`.npy` bytes of an array (no pickle), deterministic for equal arrays."""
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def decode_label_png(data: bytes) -> np.ndarray:
    """[H, W] uint8 or uint16 train ids from `encode_label_png` bytes (grey "L" / 16-bit "I;16", kept as stored)."""
    from pipeline.data.images import read_label_png

    array = read_label_png(data)
    if array.ndim != 2:
        raise ValueError(f"label map must be single-channel, got shape {array.shape}")
    return array


def mask_record(rle: Mapping[str, Any], category_id: int, score: float, producer: str) -> dict[str, Any]:
    """One masks.json entry: COCO RLE (counts str), train id, score, producer, area (pixels), bbox XYWH (pixels).

    ``bbox`` follows COCO (pycocotools ``toBbox``): the tight box with width = x_max - x_min + 1.
    """
    from pycocotools import mask as mask_utils

    compressed = {"size": list(rle["size"]), "counts": rle["counts"].encode("ascii")}
    return {"segmentation": {"size": [int(v) for v in rle["size"]], "counts": rle["counts"]},
            "category_id": int(category_id), "score": float(score), "producer": producer,
            "area": int(mask_utils.area(compressed)), "bbox": [int(v) for v in mask_utils.toBbox(compressed)]}
