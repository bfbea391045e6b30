"""Every dataset's label-id convention, normalised to train ids in this one module (methods-spec §5.2).

A convention is a lookup table (LUT) from raw stored value to train id ``0..C-1`` with everything
else mapped to the vocabulary's ignore index. Tables are built once per adapter and applied with
:func:`apply_lut`. Raw values the table does not cover (e.g. a stray 200 in an ADE PNG) become ignore.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

VOC_BOUNDARY_INDEX = 255
VOC_BOUNDARY_RGB = (224, 224, 192)

# Official cityscapesScripts ``labels.py``: label id -> train id for the 19 evaluated classes
# (road, sidewalk, building, wall, fence, pole, traffic light, traffic sign, vegetation, terrain,
# sky, person, rider, car, truck, bus, train, motorcycle, bicycle); every other id is ignored.
CITYSCAPES_ID_TO_TRAIN_ID: dict[int, int] = {
    7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9,
    23: 10, 24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18,
}


def lut_from_pairs(pairs: dict[int, int], ignore_index: int, dtype: np.dtype, size: int = 256) -> np.ndarray:
    """Build a LUT of ``size`` entries: ``lut[raw] = train id`` for the given pairs, ignore elsewhere.

    Args:
        pairs: Raw value -> train id.
        ignore_index: Value for raw values not in ``pairs``.
        dtype: Output dtype (the vocabulary's ``label_dtype``).
        size: Number of raw values covered (256 for 8-bit PNGs).

    Returns:
        ``(size,)`` array of ``dtype``.
    """
    lut = np.full(size, ignore_index, dtype=dtype)
    for raw, train_id in pairs.items():
        lut[raw] = train_id
    return lut


def shifted_lut(first_raw: int, num_classes: int, ignore_index: int, dtype: np.dtype) -> np.ndarray:
    """LUT mapping raw ``first_raw + c`` -> ``c`` for ``c`` in ``0..num_classes-1``; all else ignore.

    ``first_raw=1`` is ADE20K (raw 0 = "other") and VOC with background ignored; ``first_raw=0`` is
    the identity used by CamVid (11 = void), VOC with background kept, and ``*_labelTrainIds.png``.
    """
    return lut_from_pairs({first_raw + c: c for c in range(num_classes)}, ignore_index, dtype)


def ade20k_lut(ignore_index: int, dtype: np.dtype) -> np.ndarray:
    """ADEChallenge 150: raw 0 = other -> ignore, raw 1..150 -> 0..149 (objectInfo150 order)."""
    return shifted_lut(1, 150, ignore_index, dtype)


def camvid_lut(ignore_index: int, dtype: np.dtype) -> np.ndarray:
    """SegNet CamVid: raw 0..10 are the 11 classes (Sky .. Bicyclist), 11 = void -> ignore."""
    return shifted_lut(0, 11, ignore_index, dtype)


def voc_lut(keep_background: bool, ignore_index: int, dtype: np.dtype) -> np.ndarray:
    """Pascal VOC indices: 255 = boundary -> ignore.

    Args:
        keep_background: True: 0..20 -> 0..20 (21 classes, background is class 0, Seifi PV-21).
            False: 0 -> ignore and 1..20 -> 0..19 (20 classes, the ZegCLIP/ZSSeg convention).
        ignore_index: Ignore value.
        dtype: Output dtype.
    """
    return shifted_lut(0, 21, ignore_index, dtype) if keep_background else shifted_lut(1, 20, ignore_index, dtype)


def cityscapes_lut(raw_label_ids: bool, ignore_index: int, dtype: np.dtype) -> np.ndarray:
    """Cityscapes: ``*_labelIds.png`` through the official table, or ``*_labelTrainIds.png`` as is (255 ignore)."""
    if raw_label_ids:
        return lut_from_pairs(CITYSCAPES_ID_TO_TRAIN_ID, ignore_index, dtype)
    return shifted_lut(0, 19, ignore_index, dtype)


def lut_from_source_ids(
    source_ids: Sequence[int], raw_offset: int, ignore_index: int, dtype: np.dtype, size: int = 256
) -> np.ndarray:
    """LUT from a vocabulary's ``source_ids``: raw ``source_ids[c] + raw_offset`` -> train id ``c``.

    COCO-Stuff ``stuffthingmaps`` store ``COCO id - 1`` (0..181, 255 unlabeled), so with the
    coco_stuff_171 vocabulary (source ids = COCO category ids) ``raw_offset=-1`` gives the 182 -> 171
    table that drops the 11 unused COCO thing ids.
    """
    pairs = {int(source_id) + raw_offset: c for c, source_id in enumerate(source_ids)}
    bad = [raw for raw in pairs if not 0 <= raw < size]
    if bad:
        raise ValueError(f"source ids {bad[:5]} fall outside the raw value range 0..{size - 1}")
    return lut_from_pairs(pairs, ignore_index, dtype, size)


def apply_lut(raw: np.ndarray, lut: np.ndarray, ignore_index: int) -> np.ndarray:
    """Map raw label values through ``lut``; values outside ``0..len(lut)-1`` become ``ignore_index``.

    Args:
        raw: ``HxW`` integer array (any integer dtype).
        lut: ``(N,)`` table from :func:`lut_from_pairs` and friends.
        ignore_index: Value for out-of-table raw values.

    Returns:
        ``HxW`` array of ``lut.dtype``.
    """
    if raw.ndim != 2:
        raise ValueError(f"expected a single-channel label map, got shape {raw.shape}")
    if raw.dtype == np.uint8 and lut.shape[0] >= 256:
        return lut[raw]
    values = raw.astype(np.int64)
    inside = (values >= 0) & (values < lut.shape[0])
    out = np.full(raw.shape, ignore_index, dtype=lut.dtype)
    out[inside] = lut[values[inside]]
    return out


def voc_palette(num_entries: int = 256) -> np.ndarray:
    """The Pascal VOC colour map (bit-interleaved index -> RGB); entry 255 is (224, 224, 192).

    Returns:
        ``(num_entries, 3) uint8``.
    """
    palette = np.zeros((num_entries, 3), dtype=np.uint8)
    for index in range(num_entries):
        red = green = blue = 0
        code = index
        for bit in range(8):
            red |= ((code >> 0) & 1) << (7 - bit)
            green |= ((code >> 1) & 1) << (7 - bit)
            blue |= ((code >> 2) & 1) << (7 - bit)
            code >>= 3
        palette[index] = (red, green, blue)
    return palette


def voc_color_to_index(rgb: np.ndarray, num_classes: int = 21) -> tuple[np.ndarray, list[str]]:
    """Decode a VOC colour-coded RGB target to palette indices.

    Args:
        rgb: ``HxWx3 uint8`` target in the VOC colours.
        num_classes: Palette entries that are classes (21: background + 20).

    Returns:
        ``(HxW uint8 indices, notes)``: 0..20 for class colours, 255 for the boundary colour
        (224, 224, 192) and for any colour outside the palette (counted in a note; e.g. left by
        lossy resizing).
    """
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"colour label needs HxWx3, got shape {rgb.shape}")
    palette = voc_palette()[:num_classes].astype(np.int64)
    codes = (palette[:, 0] << 16) | (palette[:, 1] << 8) | palette[:, 2]
    pixels = rgb.astype(np.int64)
    pixel_codes = (pixels[..., 0] << 16) | (pixels[..., 1] << 8) | pixels[..., 2]
    order = np.argsort(codes)
    position = np.clip(np.searchsorted(codes[order], pixel_codes), 0, len(codes) - 1)
    matched = codes[order][position] == pixel_codes
    indices = np.where(matched, order[position], VOC_BOUNDARY_INDEX).astype(np.uint8)
    boundary = (pixel_codes == ((224 << 16) | (224 << 8) | 192))
    unknown = int((~matched & ~boundary).sum())
    notes = [f"{unknown} pixels with colours outside the VOC palette set to ignore"] if unknown else []
    return indices, notes


def identity_train_ids(raw: np.ndarray, num_classes: int, ignore_index: int, dtype: np.dtype) -> np.ndarray:
    """Labels already stored as train ids (our own shards): keep ``0..num_classes-1``, everything else -> ignore.

    Args:
        raw: ``HxW`` integer array (uint8 with 255 ignore, or uint16 with 65535 ignore).
        num_classes: Number of classes C.
        ignore_index: Ignore value of the target vocabulary.
        dtype: Output dtype.

    Returns:
        ``HxW`` array of ``dtype``.
    """
    if raw.ndim != 2:
        raise ValueError(f"expected a single-channel label map, got shape {raw.shape}")
    values = raw.astype(np.int64)
    return np.where((values >= 0) & (values < num_classes), values, ignore_index).astype(dtype)
