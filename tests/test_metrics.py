"""Tests for pipeline.metrics: hand-computed confusion cases and a real-label sanity check."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.metrics import ConfusionMatrix, compute_metrics, harmonic_iou, to_json

CAMVID_NAMES = [
    "Sky", "Building", "Pole", "Road", "Pavement", "Tree",
    "SignSymbol", "Fence", "Car", "Pedestrian", "Bicyclist",
]  # fmt: skip


def _cm(pred: list[list[int]], gt: list[list[int]], num_classes: int) -> ConfusionMatrix:
    cm = ConfusionMatrix(num_classes)
    cm.update(np.array(pred), np.array(gt))
    return cm


def test_update_counts_rows_gt_cols_pred_and_excludes_ignore() -> None:
    gt = [[0, 0, 1, 255], [1, 1, 255, 2]]
    pred = [[0, 1, 1, 2], [1, 0, 0, 2]]
    cm = _cm(pred, gt, 3)
    expected = np.array([[1, 1, 0], [1, 2, 0], [0, 0, 1]])
    np.testing.assert_array_equal(cm.matrix, expected)
    assert cm.matrix.dtype == np.int64
    assert compute_metrics(cm, ["a", "b", "c"])["num_pixels"] == 6


def test_hand_computed_iou_acc_and_miou() -> None:
    # class 0: TP 1, GT 2, PRED 2 -> IoU 1/3; class 1: TP 2, GT 3, PRED 3 -> IoU 2/4; class 2: TP 1 -> IoU 1.
    cm = _cm([[0, 1, 1, 2], [1, 0, 0, 2]], [[0, 0, 1, 255], [1, 1, 255, 2]], 3)
    m = compute_metrics(cm, ["a", "b", "c"])
    assert m["per_class_iou"]["a"] == pytest.approx(100 / 3)
    assert m["per_class_iou"]["b"] == pytest.approx(50.0)
    assert m["per_class_iou"]["c"] == pytest.approx(100.0)
    assert m["mIoU"] == pytest.approx((100 / 3 + 50 + 100) / 3)
    assert m["pAcc"] == pytest.approx(400 / 6)
    assert m["mAcc"] == pytest.approx((50 + 200 / 3 + 100) / 3)
    assert m["fwIoU"] == pytest.approx((2 * 100 / 3 + 3 * 50 + 1 * 100) / 6)


def test_class_absent_from_gt_and_pred_is_nan_and_excluded() -> None:
    cm = _cm([[0, 0], [1, 1]], [[0, 0], [1, 0]], 4)
    m = compute_metrics(cm, ["a", "b", "c", "d"])
    assert math.isnan(m["per_class_iou"]["c"]) and math.isnan(m["per_class_iou"]["d"])
    # IoU a = 2/3, b = 1/2; classes c, d do not dilute the mean.
    assert m["mIoU"] == pytest.approx((200 / 3 + 50) / 2)


def test_predicted_only_class_has_iou_zero_and_counts_in_both_denominators() -> None:
    # class 2 never appears in GT but is predicted once.
    cm = _cm([[0, 0, 2, 1]], [[0, 0, 0, 1]], 3)
    for denominator in ("mmseg", "zsseg"):
        m = compute_metrics(cm, ["a", "b", "c"], miou_denominator=denominator)
        assert m["per_class_iou"]["c"] == 0.0
        assert math.isnan(m["per_class_acc"]["c"])
        assert m["mIoU"] == pytest.approx((200 / 3 + 100 + 0) / 3)


def test_gzsl_seen_unseen_and_hiou_from_the_same_matrix() -> None:
    gt = [[0, 0, 1, 1, 2, 2, 3, 3]]
    pred = [[0, 0, 1, 0, 2, 3, 3, 3]]
    cm = _cm(pred, gt, 4)
    m = compute_metrics(cm, list("abcd"), seen_ids=[0, 1])
    iou = [200 / 3, 50.0, 50.0, 200 / 3]
    seen, unseen = (iou[0] + iou[1]) / 2, (iou[2] + iou[3]) / 2
    assert m["unseen_ids"] == [2, 3]
    assert m["mIoU(S)"] == pytest.approx(seen)
    assert m["mIoU(U)"] == pytest.approx(unseen)
    assert m["hIoU"] == pytest.approx(2 * seen * unseen / (seen + unseen))
    assert m["mIoU"] == pytest.approx(sum(iou) / 4)


def test_harmonic_iou_edge_cases() -> None:
    assert harmonic_iou(40.0, 60.0) == pytest.approx(48.0)
    assert harmonic_iou(0.0, 0.0) == 0.0
    assert harmonic_iou(0.0, 50.0) == 0.0
    assert math.isnan(harmonic_iou(math.nan, 50.0))


def test_zsseg_subset_denominator_counts_predicted_only_classes() -> None:
    # unseen = {2, 3}: class 2 has GT (IoU 1/2), class 3 is predicted only (IoU 0) -> mIoU(U) = 25.
    cm = _cm([[0, 2, 3, 3]], [[0, 2, 2, 0]], 4)
    m = compute_metrics(cm, list("abcd"), unseen_ids=[2, 3], miou_denominator="zsseg")
    assert m["mIoU(U)"] == pytest.approx(25.0)
    assert m["seen_ids"] == [0, 1]
    assert m["mIoU(S)"] == pytest.approx(50.0)


def test_pred_out_of_range_raises() -> None:
    cm = ConfusionMatrix(3)
    with pytest.raises(ValueError, match="pred contains ids outside"):
        cm.update(np.array([[0, 3]]), np.array([[0, 1]]))
    with pytest.raises(ValueError, match="gt contains ids outside"):
        cm.update(np.array([[0, 1]]), np.array([[0, 7]]))
    with pytest.raises(ValueError, match="shape"):
        cm.update(np.zeros((2, 2), int), np.zeros((2, 3), int))


def test_merge_equals_single_pass_and_dict_round_trip() -> None:
    rng = np.random.default_rng(0)
    preds = [rng.integers(0, 5, (7, 9)) for _ in range(4)]
    gts = [np.where(rng.random((7, 9)) < 0.1, 255, rng.integers(0, 5, (7, 9))) for _ in range(4)]
    single = ConfusionMatrix(5)
    for p, g in zip(preds, gts):
        single.update(p, g)
    left, right = ConfusionMatrix(5), ConfusionMatrix(5)
    for p, g in zip(preds[:2], gts[:2]):
        left.update(p, g)
    for p, g in zip(preds[2:], gts[2:]):
        right.update(p, g)
    shipped = ConfusionMatrix.from_dict(json.loads(json.dumps(right.to_dict())))
    np.testing.assert_array_equal(left.merge(shipped).matrix, single.matrix)
    with pytest.raises(ValueError, match="cannot merge"):
        single.merge(ConfusionMatrix(4))


def test_to_json_writes_null_for_nan() -> None:
    cm = _cm([[0]], [[0]], 2)
    loaded = json.loads(to_json(compute_metrics(cm, ["a", "b"], seen_ids=[0])))
    assert loaded["per_class_iou"] == {"a": 100.0, "b": None}
    assert loaded["mIoU(U)"] is None and loaded["hIoU"] is None


def test_gt_as_prediction_scores_100_on_camvid(shared_data: Path) -> None:
    files = sorted((shared_data / "camvid" / "valannot").glob("*.png"))[:20]
    assert files
    cm = ConfusionMatrix(11)
    for path in files:
        gt = np.array(Image.open(path)).astype(np.int64)
        gt[gt == 11] = 255  # CamVid "void"
        cm.update(np.where(gt == 255, 0, gt), gt)
    m = compute_metrics(cm, CAMVID_NAMES, seen_ids=range(6))
    assert m["mIoU"] == pytest.approx(100.0)
    assert m["pAcc"] == pytest.approx(100.0)
    assert m["hIoU"] == pytest.approx(100.0)
    assert m["num_pixels"] == 20 * 360 * 480 - sum(int((np.array(Image.open(p)) == 11).sum()) for p in files)
