"""Codecs of the files inside samples (`wordgrid/1`, `pseudolabel/1`, `eval/1`; docs/schema.md), shared by every
stage and reader: images, label PNGs, `.npy` arrays and `masks.json` region entries.

Decoding is by member extension (`decode_member`), the same for our readers (`StageOutput.webdataset()`,
`torch_dataset()`) and for plain webdataset (`wds.WebDataset(urls).decode(wds_decoder)`):

    jpg / jpeg / png / webp        the image: [H, W, 3] uint8 RGB (EXIF orientation applied)
    <name>.png (label.png, gt.png, <method>.png)
                                   a label map with its stored values and dtype: [H, W] uint8 (255 = ignore) or
                                   uint16 (65535 = ignore); never converted to RGB or scaled to [0, 1]
    <name>.npy (grid.npy)          the array (no pickle)
    json / <name>.json (masks.json)
                                   parsed JSON; masks.json is a list of entries whose RLE `counts` stay `str`
    anything else                  the bytes as stored
"""

from __future__ import annotations

import io
import json
import warnings
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


def mask_to_rle(mask: np.ndarray) -> dict[str, Any]:
    """COCO RLE of a bool [H, W] mask: ``{"size": [H, W], "counts": str}`` (pycocotools, column-major)."""
    from pycocotools import mask as mask_utils

    if mask.ndim != 2:
        raise ValueError(f"expected a 2-D mask, got shape {mask.shape}")
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": rle["counts"].decode("ascii")}


def rle_to_mask(rle: dict[str, Any]) -> np.ndarray:
    """Inverse of `mask_to_rle`: COCO RLE (``counts`` str, bytes or an uncompressed list) -> bool [H, W]."""
    from pycocotools import mask as mask_utils

    height, width = (int(v) for v in rle["size"])
    counts = rle["counts"]
    if isinstance(counts, list):  # uncompressed RLE
        compressed = mask_utils.frPyObjects({"size": [height, width], "counts": counts}, height, width)
    else:
        compressed = {"size": [height, width], "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
    with warnings.catch_warnings():  # pycocotools 2.0.x trips numpy 2's __array__(copy=) deprecation
        warnings.simplefilter("ignore", DeprecationWarning)
        return mask_utils.decode(compressed).astype(bool)


def mask_record(rle: Mapping[str, Any], category_id: int, score: float, producer: str) -> dict[str, Any]:
    """One masks.json entry: COCO RLE (counts str), train id, score, producer, area (pixels), bbox XYWH (pixels).

    ``bbox`` follows COCO (pycocotools ``toBbox``): the tight box with width = x_max - x_min + 1.
    """
    from pycocotools import mask as mask_utils

    compressed = {"size": list(rle["size"]), "counts": rle["counts"].encode("ascii")}
    return {"segmentation": {"size": [int(v) for v in rle["size"]], "counts": rle["counts"]},
            "category_id": int(category_id), "score": float(score), "producer": producer,
            "area": int(mask_utils.area(compressed)), "bbox": [int(v) for v in mask_utils.toBbox(compressed)]}


IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


def decode_image_rgb(data: bytes) -> np.ndarray:
    """[H, W, 3] uint8 RGB of image bytes (EXIF orientation applied; `pipeline.data.images.decode_image`)."""
    from pipeline.data.images import decode_image

    return decode_image(data)[0]


def decode_npy(data: bytes) -> np.ndarray:
    """The array of `.npy` bytes (pickled objects refused)."""
    return np.load(io.BytesIO(data), allow_pickle=False)


def _decoder_for(ext: str) -> Any:
    """The decode function for a member extension (module doc table), or None for an unknown extension."""
    from pipeline.data.images import read_label_png

    ext = ext.lower()
    if ext in IMAGE_EXTENSIONS:
        return decode_image_rgb
    if ext.endswith(".png"):
        return read_label_png
    if ext == "npy" or ext.endswith(".npy"):
        return decode_npy
    if ext == "json" or ext.endswith(".json"):
        return json.loads
    return None


def decode_member(ext: str, data: bytes) -> Any:
    """Decode one sample member by its extension (table in the module doc); unknown extensions stay bytes."""
    decoder = _decoder_for(ext)
    return data if decoder is None else decoder(data)


def decode_sample(sample: Mapping[str, Any]) -> dict[str, Any]:
    """A raw sample ``{"__key__", "__url__", ext: bytes}`` with every member decoded by `decode_member`."""
    return {k: v if k.startswith("__") or not isinstance(v, bytes) else decode_member(k, v) for k, v in sample.items()}


def wds_decoder(key: str, data: bytes) -> Any:
    """A webdataset decode handler: ``wds.WebDataset(urls).decode(wds_decoder)`` decodes like `decode_member`.

    webdataset passes the extension with a leading dot (".label.png"). Unknown extensions return None, which
    hands them on to webdataset's own handlers (txt, cls, ...).
    """
    decoder = _decoder_for(key.lstrip("."))
    return None if decoder is None else decoder(data)
