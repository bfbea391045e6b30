"""Per-class regions of a self-training label map: the `masks.json` entries of its "pseudolabel/1" samples."""

from __future__ import annotations

from typing import Any

import numpy as np

from pipeline.sample_files import mask_record

PRODUCER = "selftrain"


def class_scores(label: np.ndarray, scores: np.ndarray, ignore_index: int) -> np.ndarray:
    """[C] float64: per class c, the mean of scores[c] over the pixels labelled c (NaN where none is)."""
    labelled = label != ignore_index
    ids = label[labelled].astype(np.int64)
    own = np.take_along_axis(scores, np.where(labelled, label, 0).astype(np.int64)[None], axis=0)[0][labelled]
    num_classes = scores.shape[0]
    counts = np.bincount(ids, minlength=num_classes)
    sums = np.bincount(ids, weights=own.astype(np.float64), minlength=num_classes)
    with np.errstate(invalid="ignore", divide="ignore"):
        return sums / counts


def class_regions(label: np.ndarray, scores: np.ndarray, ignore_index: int) -> list[dict[str, Any]]:
    """One `masks.json` entry (`pipeline.sample_files.mask_record`) per class present in `label`, in id order.

    Args:
        label: [H, W] train ids, `ignore_index` = unlabelled.
        scores: [C, H, W] float model scores; an entry's score is the mean of its class's scores over its pixels.
        ignore_index: label value skipped.

    Returns:
        [{"segmentation": COCO RLE (counts str), "category_id", "score", "producer": "selftrain", "area"
        (pixels), "bbox": [x, y, w, h] (pixels; COCO `toBbox`, width = x_max - x_min + 1)}].
    """
    from pipeline.sample_files import mask_to_rle

    means = class_scores(label, scores, ignore_index)
    regions = []
    for class_id in np.unique(label):
        if int(class_id) == ignore_index:
            continue
        score = round(float(means[int(class_id)]), 6)
        regions.append(mask_record(mask_to_rle(label == class_id), int(class_id), score, PRODUCER))
    return regions
