"""Dataset-level semantic-segmentation metrics from one confusion matrix.

Every protocol in the project (IFSeg, ZegCLIP/mmseg, ZSSeg/detectron2, TCL/FMbSeg) scores the same way:
accumulate one confusion matrix over the whole dataset, then derive per-class IoU, mIoU, pAcc, mAcc and, for
generalised zero-shot (GZSL) evaluation, mIoU over the seen and the unseen index sets of that same all-class
matrix plus their harmonic mean (hIoU). Nothing is averaged per image.

Workers build partial matrices (`ConfusionMatrix.update`), ship them as JSON (`to_dict`) and the driver sums
them (`merge`); integer addition is exact, so the split over workers never changes a number.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

MIOU_DENOMINATORS = ("mmseg", "zsseg")


class ConfusionMatrix:
    """Pixel counts `matrix[gt, pred]` accumulated over a dataset.

    Args:
        num_classes: C, the number of evaluated classes; valid ids are 0..C-1.
        ignore_index: GT value whose pixels are left out entirely (mmseg/detectron2 default 255).
    """

    def __init__(self, num_classes: int, ignore_index: int = 255) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = int(num_classes)
        self.ignore_index = int(ignore_index)
        self.matrix = np.zeros((self.num_classes, self.num_classes), dtype=np.int64)

    def update(self, pred: np.ndarray, gt: np.ndarray) -> None:
        """Add one image.

        Args:
            pred: [H, W] integer class ids in [0, C). Ids outside that range raise ValueError (a model that
                predicts a class the vocabulary lacks is a bug, not a miss).
            gt: [H, W] integer class ids in [0, C) or `ignore_index`; ignored pixels are excluded.
        """
        pred = np.asarray(pred)
        gt = np.asarray(gt)
        if pred.shape != gt.shape:
            raise ValueError(f"pred shape {pred.shape} != gt shape {gt.shape}")
        if not (np.issubdtype(pred.dtype, np.integer) and np.issubdtype(gt.dtype, np.integer)):
            raise ValueError(f"pred and gt must be integer arrays, got {pred.dtype} and {gt.dtype}")
        valid = gt != self.ignore_index
        gt_valid = gt[valid].astype(np.int64)
        pred_valid = pred[valid].astype(np.int64)
        self._check_range(pred.astype(np.int64), "pred")
        self._check_range(gt_valid, "gt")
        flat = gt_valid * self.num_classes + pred_valid
        counts = np.bincount(flat, minlength=self.num_classes**2)
        self.matrix += counts.reshape(self.num_classes, self.num_classes)

    def _check_range(self, ids: np.ndarray, what: str) -> None:
        if ids.size and (ids.min() < 0 or ids.max() >= self.num_classes):
            bad = np.unique(ids[(ids < 0) | (ids >= self.num_classes)])[:10].tolist()
            raise ValueError(f"{what} contains ids outside [0, {self.num_classes}): {bad}")

    def merge(self, other: ConfusionMatrix) -> ConfusionMatrix:
        """Add another matrix in place (same C and ignore index) and return self."""
        if (other.num_classes, other.ignore_index) != (self.num_classes, self.ignore_index):
            raise ValueError(
                f"cannot merge C={other.num_classes}/ignore={other.ignore_index} "
                f"into C={self.num_classes}/ignore={self.ignore_index}"
            )
        self.matrix += other.matrix
        return self

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe form: `{"num_classes", "ignore_index", "matrix": [[int]*C]*C}` (rows = GT)."""
        return {"num_classes": self.num_classes, "ignore_index": self.ignore_index, "matrix": self.matrix.tolist()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ConfusionMatrix:
        """Inverse of `to_dict`."""
        cm = cls(int(data["num_classes"]), int(data["ignore_index"]))
        matrix = np.asarray(data["matrix"], dtype=np.int64)
        if matrix.shape != cm.matrix.shape:
            raise ValueError(f"matrix shape {matrix.shape} does not match num_classes={cm.num_classes}")
        cm.matrix = matrix
        return cm


def sum_matrices(parts: Iterable[Mapping[str, Any]]) -> ConfusionMatrix | None:
    """The sum of per-shard partial matrices in `ConfusionMatrix.to_dict` form; None when `parts` is empty."""
    total: ConfusionMatrix | None = None
    for part in parts:
        matrix = ConfusionMatrix.from_dict(dict(part))
        total = matrix if total is None else total.merge(matrix)
    return total


def _safe_ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """Elementwise num/den as float64 with NaN where den == 0."""
    out = np.full(num.shape, np.nan, dtype=np.float64)
    np.divide(num, den, out=out, where=den > 0)
    return out


def _nanmean(values: np.ndarray) -> float:
    """Mean over non-NaN entries; NaN when there are none (no RuntimeWarning)."""
    kept = values[~np.isnan(values)]
    return float(kept.mean()) if kept.size else math.nan


def _subset_miou(iou: np.ndarray, present: np.ndarray, ids: np.ndarray, denominator: str) -> float:
    """mIoU over class ids `ids`; see `compute_metrics` for the two denominators."""
    if denominator == "mmseg":
        return _nanmean(iou[ids])
    gt_present = present[ids]
    counted = int((~np.isnan(iou[ids])).sum())
    return float(np.nansum(iou[ids][gt_present]) / counted) if counted else math.nan


def harmonic_iou(seen: float, unseen: float) -> float:
    """hIoU = 2·S·U / (S + U) (ZegCLIP Eq. 9); 0 when S + U == 0, NaN when either is NaN."""
    if math.isnan(seen) or math.isnan(unseen):
        return math.nan
    return 0.0 if seen + unseen == 0 else 2.0 * seen * unseen / (seen + unseen)


def compute_metrics(
    cm: ConfusionMatrix | np.ndarray,
    names: Sequence[str],
    seen_ids: Sequence[int] | None = None,
    unseen_ids: Sequence[int] | None = None,
    miou_denominator: str = "mmseg",
) -> dict[str, Any]:
    """Metrics of a dataset-level confusion matrix, all in percent (0..100, unrounded floats).

    Per class c with TP = m[c,c], GT = Σ_row, PRED = Σ_col:
    IoU = TP / (GT + PRED − TP): NaN when the class is absent from both GT and prediction, 0 when it is only
    predicted. Acc = TP / GT, NaN when absent from GT.

    mIoU:
      - "mmseg" (IFSeg, ZegCLIP, TCL): nanmean of per-class IoU.
      - "zsseg" (detectron2 `GeneralizedSemSegEvaluator`): Σ IoU over classes with GT / #classes with GT or
        prediction. Predicted-only classes contribute 0 to the numerator and 1 to the denominator, so the value
        equals the mmseg one; both are kept so that the recorded protocol names its own formula.

    pAcc = Σ TP / Σ GT; mAcc = nanmean(Acc); fwIoU = Σ_c (GT_c / Σ GT) · IoU_c over classes with GT.
    mIoU(S), mIoU(U) use the same formula restricted to `seen_ids` / `unseen_ids` of the SAME all-class matrix
    (GZSL); hIoU = 2SU/(S+U). When only one of the two sets is given, the other is its complement.

    Args:
        cm: a ConfusionMatrix or an int [C, C] array (rows = GT, cols = prediction).
        names: C class names, in id order.
        seen_ids: ids of the seen (base) classes, or None for non-GZSL evaluation.
        unseen_ids: ids of the unseen (novel) classes, or None.
        miou_denominator: "mmseg" or "zsseg" (see above).

    Returns:
        Dict with "mIoU", "pAcc", "mAcc", "fwIoU", "per_class_iou" {name: float}, "per_class_acc" {name: float},
        "miou_denominator", "num_classes", "num_pixels" and, for GZSL, "mIoU(S)", "mIoU(U)", "hIoU",
        "seen_ids", "unseen_ids". NaN marks an undefined value; use `to_json` to serialise (NaN -> null).
    """
    matrix = np.asarray(cm.matrix if isinstance(cm, ConfusionMatrix) else cm, dtype=np.int64)
    num_classes = matrix.shape[0]
    if matrix.shape != (num_classes, num_classes) or len(names) != num_classes:
        raise ValueError(f"need a square matrix with one name per class; got {matrix.shape} and {len(names)} names")
    if len(set(names)) != len(names):
        raise ValueError("class names must be unique (per-class results are keyed by name)")
    if miou_denominator not in MIOU_DENOMINATORS:
        raise ValueError(f"miou_denominator must be one of {MIOU_DENOMINATORS}, got {miou_denominator!r}")
    tp = np.diag(matrix).astype(np.float64)
    gt_area = matrix.sum(axis=1).astype(np.float64)
    pred_area = matrix.sum(axis=0).astype(np.float64)
    iou = _safe_ratio(tp, gt_area + pred_area - tp) * 100.0
    acc = _safe_ratio(tp, gt_area) * 100.0
    present = gt_area > 0
    total = gt_area.sum()
    result: dict[str, Any] = {
        "mIoU": _subset_miou(iou, present, np.arange(num_classes), miou_denominator),
        "pAcc": float(tp.sum() / total * 100.0) if total else math.nan,
        "mAcc": _nanmean(acc),
        "fwIoU": float((gt_area[present] / total * iou[present]).sum()) if total else math.nan,
        "per_class_iou": {name: float(v) for name, v in zip(names, iou)},
        "per_class_acc": {name: float(v) for name, v in zip(names, acc)},
        "miou_denominator": miou_denominator,
        "num_classes": num_classes,
        "num_pixels": int(total),
    }
    if seen_ids is not None or unseen_ids is not None:
        seen, unseen = _split_ids(num_classes, seen_ids, unseen_ids)
        result["mIoU(S)"] = _subset_miou(iou, present, seen, miou_denominator)
        result["mIoU(U)"] = _subset_miou(iou, present, unseen, miou_denominator)
        result["hIoU"] = harmonic_iou(result["mIoU(S)"], result["mIoU(U)"])
        result["seen_ids"], result["unseen_ids"] = seen.tolist(), unseen.tolist()
    return result


def _split_ids(
    num_classes: int, seen_ids: Sequence[int] | None, unseen_ids: Sequence[int] | None
) -> tuple[np.ndarray, np.ndarray]:
    """Seen and unseen id arrays; a missing one is the complement of the other. Validates range."""
    all_ids = np.arange(num_classes)
    seen = np.setdiff1d(all_ids, unseen_ids) if seen_ids is None else np.asarray(seen_ids, dtype=np.int64)
    unseen = np.setdiff1d(all_ids, seen) if unseen_ids is None else np.asarray(unseen_ids, dtype=np.int64)
    for ids, what in ((seen, "seen_ids"), (unseen, "unseen_ids")):
        if ids.size and (ids.min() < 0 or ids.max() >= num_classes):
            raise ValueError(f"{what} must lie in [0, {num_classes}), got {ids.tolist()}")
    return seen.astype(np.int64), unseen.astype(np.int64)


def _nan_to_none(value: Any) -> Any:
    """Recursively replace float NaN/inf with None and numpy scalars with Python ones."""
    if isinstance(value, dict):
        return {str(k): _nan_to_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_nan_to_none(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def to_json(metrics: dict[str, Any], indent: int | None = 2) -> str:
    """Strict JSON text of a metrics dict (NaN -> null), loadable by any JSON parser."""
    return json.dumps(_nan_to_none(metrics), indent=indent, allow_nan=False)
