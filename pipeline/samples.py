"""Encoders of the files inside samples (`wordgrid/1`, `pseudolabel/1`, `eval/1`), shared by every stage."""

from __future__ import annotations

import io

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
