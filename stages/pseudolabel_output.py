"""Sample files of schema "pseudolabel/1" and the label-quality bookkeeping of the pseudolabel stage.

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

from pipeline.metrics import ConfusionMatrix, compute_metrics, sum_matrices
from pipeline.sample_files import encode_image, encode_label_png, mask_record

if TYPE_CHECKING:
    from pipeline.data.vocab import Vocabulary

UNLABELLED = "<unlabelled>"
QUALITY_FILE = "pseudolabel_quality.json"
SAMPLE_FILES = {
    "jpg|png": "the RGB image (absent with image_format=none; json.source then references it)",
    "label.png": "uint8 train ids, 255 = unlabelled (uint16 / 65535 above 255 classes)",
    "masks.json": "list of {segmentation (COCO RLE), category_id, score, producer, area, bbox XYWH}",
    "gt.png": "ground-truth train ids in the same convention (when the input has GT and keep_ground_truth)",
    "json": "provenance: schema, key, source, orig_size, vocab, vocab_digest, models, config, present_classes",
}


def mask_records(masks: Iterable[Any]) -> list[dict[str, Any]]:
    """masks.json entries of `stages.pseudolabel.LabelledMask` items (RLE-encoded here unless already known)."""
    from pipeline.models.sam import mask_to_rle

    return [mask_record(m.rle or mask_to_rle(m.mask), m.category_id, m.score, m.producer) for m in masks]


def sample_files(image: np.ndarray | None, image_format: str, label: np.ndarray, masks: Sequence[dict[str, Any]],
                 gt: np.ndarray | None, provenance: Mapping[str, Any], jpeg_quality: int = 95) -> dict[str, bytes]:
    """The files of one "pseudolabel/1" sample (see docs/schema.md): image, label.png, masks.json, gt.png, json."""
    files = {"label.png": encode_label_png(label), "masks.json": json.dumps(list(masks)).encode(),
             "json": json.dumps(provenance, sort_keys=True).encode()}
    if image is not None and image_format != "none":
        files[image_format] = encode_image(image, image_format, jpeg_quality)
    if gt is not None:
        files["gt.png"] = encode_label_png(gt)
    return files


class QualityAccumulator:
    """Per-shard confusion matrices ([M+1] x [M+1], last column = unlabelled) of the three quality maps."""

    def __init__(self, vocab: Vocabulary) -> None:
        self.num_classes = vocab.num_classes
        self.ignore_index = vocab.ignore_index
        self.matrices: dict[str, ConfusionMatrix] = {}

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
    """Driver side: sum the shards' done-marker extras; write `QUALITY_FILE` when there was ground truth.

    Returns:
        Manifest fields: ``num_masks`` per producer and, with ground truth, ``quality`` (`summarize_quality`).
    """
    import fsspec

    from pipeline.metrics import to_json
    from pipeline.shards import join

    num_masks = {p: sum(e.get("num_masks", {}).get(p, 0) for e in extras) for p in ("stage11", "stage12")}
    matrices = merge_quality(e.get("quality") or {} for e in extras)
    if not matrices:
        return {"num_masks": num_masks}
    quality = {"vocab": vocab.name, "merge_policy": merge_policy, **summarize_quality(matrices, vocab.names)}
    fs, path = fsspec.core.url_to_fs(output_url)
    fs.pipe_file(join(path, QUALITY_FILE), to_json(quality).encode())
    return {"num_masks": num_masks, "quality": json.loads(to_json(quality, indent=None))}
