"""Label quality of the pseudolabel stage against ground truth, and its masks per producer.

Quality (when the input has ground truth): for each of the label maps "stage11" (stage 1.1 alone), "stage12"
(stage 1.2 alone) and "merged", one confusion matrix with M + 1 prediction columns accumulates over the dataset;
column M counts "unlabelled" pixels (label 255/65535 in the pseudo-label map), GT-ignored pixels are left out.
From it `summarize_quality` reports, per map:

* ``coverage``: labelled valid-GT pixels / valid-GT pixels (percent);
* ``mIoU_labelled``: mIoU of the M x M sub-matrix, i.e. over labelled pixels only (what a trainer that ignores
  unlabelled pixels is taught);
* ``mIoU_unlabelled_as_wrong``: mIoU where an unlabelled pixel is a miss of its GT class (IoU_c = TP / (GT_c +
  PRED_c - TP) with GT_c including unlabelled pixels), i.e. the map scored as a full segmentation;
* ``pAcc_labelled``, per-class IoUs of both kinds, and pixel counts.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.metrics import ConfusionMatrix, compute_metrics, sum_matrices, to_json
from stages.pseudolabel.steps import LabelledMask, merge, paint

if TYPE_CHECKING:
    from pipeline.data.vocab import Vocabulary

UNLABELLED = "<unlabelled>"
QUALITY_FILE = "pseudolabel_quality.json"
PRODUCERS = ("stage11", "stage12")


class QualityAccumulator:
    """Per-shard confusion matrices ([M+1] x [M+1], last column = unlabelled) of the three quality maps."""

    def __init__(self, vocab: Vocabulary) -> None:
        self.num_classes = vocab.num_classes
        self.ignore_index = vocab.ignore_index
        self.label_dtype = vocab.label_dtype
        self.matrices: dict[str, ConfusionMatrix] = {}

    def add(self, gt: np.ndarray, stage11: Sequence[LabelledMask], stage12: Sequence[LabelledMask],
            merge_policy: str) -> None:
        """Add one image's three maps: stage 1.1 alone, stage 1.2 alone and their merge under `merge_policy`."""
        hw, ignore, dtype = gt.shape, self.ignore_index, self.label_dtype
        self.update(gt, {"stage11": paint(stage11, hw, ignore, dtype)[0],
                         "stage12": paint(stage12, hw, ignore, dtype)[0],
                         "merged": merge(stage11, stage12, hw, merge_policy, ignore, dtype)})

    def update(self, gt: np.ndarray, maps: Mapping[str, np.ndarray]) -> None:
        """Add one image: `gt` [H, W] train ids (ignore_index = ignored), `maps` name -> [H, W] pseudo-labels."""
        for name, label in maps.items():
            pred = np.where(label == self.ignore_index, self.num_classes, label).astype(np.int64)
            matrix = self.matrices.setdefault(name, ConfusionMatrix(self.num_classes + 1, self.ignore_index))
            matrix.update(pred, gt.astype(np.int64))

    def pop(self) -> dict[str, Any]:
        """JSON-safe matrices (``ConfusionMatrix.to_dict``) accumulated so far, then reset."""
        out = {name: matrix.to_dict() for name, matrix in self.matrices.items()}
        self.matrices = {}
        return out


def merge_quality(parts: Iterable[Mapping[str, Any]]) -> dict[str, ConfusionMatrix]:
    """Sum per-shard `QualityAccumulator.pop` dicts into one matrix per map name."""
    parts = list(parts)
    names = sorted({name for part in parts for name in part})
    return {name: sum_matrices(part[name] for part in parts if name in part) for name in names}


def summarize_quality(matrices: Mapping[str, ConfusionMatrix], names: Sequence[str]) -> dict[str, Any]:
    """Coverage and both mIoUs (see module docstring) per quality map, in percent."""
    num_classes = len(names)
    summary: dict[str, Any] = {}
    for name, cm in matrices.items():
        full = cm.matrix
        valid = int(full.sum())
        labelled = int(full[:, :num_classes].sum())
        with_unlabelled = compute_metrics(full, [*names, UNLABELLED])
        per_class_wrong = {c: with_unlabelled["per_class_iou"][c] for c in names}
        labelled_only = compute_metrics(full[:num_classes, :num_classes], list(names))
        wrong_values = np.array(list(per_class_wrong.values()), dtype=np.float64)
        summary[name] = {
            "coverage": 100.0 * labelled / valid if valid else float("nan"),
            "mIoU_labelled": labelled_only["mIoU"],
            "mIoU_unlabelled_as_wrong": float(np.nanmean(wrong_values)) if (~np.isnan(wrong_values)).any()
            else float("nan"),
            "pAcc_labelled": labelled_only["pAcc"],
            "per_class_iou_labelled": labelled_only["per_class_iou"],
            "per_class_iou_unlabelled_as_wrong": per_class_wrong,
            "num_valid_pixels": valid,
            "num_labelled_pixels": labelled,
        }
    return summary


def finalize_quality(extras: Sequence[Mapping[str, Any]], vocab: Vocabulary, merge_policy: str,
                     output_url: str) -> dict[str, Any]:
    """Driver side: sum the shards' done-marker extras; write `QUALITY_FILE` (atomically) when there was ground truth.

    Returns:
        Manifest fields: ``num_masks`` per producer and, with ground truth, ``quality`` (`summarize_quality`).
    """
    import fsspec

    from pipeline.shards import join, write_atomic

    num_masks = {p: sum(e.get("num_masks", {}).get(p, 0) for e in extras) for p in PRODUCERS}
    matrices = merge_quality(e.get("quality") or {} for e in extras)
    if not matrices:
        return {"num_masks": num_masks}
    quality = {"vocab": vocab.name, "merge_policy": merge_policy, **summarize_quality(matrices, vocab.names)}
    fs, path = fsspec.core.url_to_fs(output_url)
    write_atomic(fs, join(path, QUALITY_FILE), to_json(quality).encode())
    return {"num_masks": num_masks, "quality": json.loads(to_json(quality, indent=None))}
