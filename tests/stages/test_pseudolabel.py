"""Pseudolabel stage: each step on hand-made inputs, the model plumbing against the per-image wrappers, bad
images, checkpoints, and the stage end to end on real CamVid images with tiny random-weight models."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from pipeline.config import ConfigError
from pipeline.models.sliding import patch_centers
from pipeline.sample_files import mask_record
from pipeline.stage import StageContext
from stages.pseudolabel import (
    LabelledMask,
    PseudoLabelStage,
    label_masks_by_dense_features,
    mask_cell_weights,
    mask_crop,
    merge,
    paint,
    point_prompts,
    present_classes,
)
from stages.pseudolabel_config import AMG_KEYS, CLIP_KEYS, SAM_KEYS
from stages.pseudolabel_output import QualityAccumulator, merge_quality, summarize_quality

os.environ.setdefault("HF_HUB_OFFLINE", "1")
TINY = {"vocab": "toy", "clip": {"model_name": "toy-vit"}, "sam": {"model_type": "toy"}, "crop": 64, "stride": 32,
        "image_short_side": 64, "min_crops": 0, "min_mask_area": 1, "min_predicted_iou": 0.0,
        "amg": {"points_per_side": 2, "pred_iou_thresh": 0.0, "stability_score_thresh": 0.0}}


def make_stage(tmp_path: Path, **overrides: object) -> PseudoLabelStage:
    config = {**TINY, "data": {"kind": "toyworld", "num_images": 2, "size": 64}, **overrides}
    return PseudoLabelStage(StageContext(node="pl", seed=0, config=config, output_url=str(tmp_path)))


# ------------------------------------------------------------------------------------------ the method's steps

def test_present_classes_counts_crop_votes_strictly_above_threshold() -> None:
    text = np.eye(3, dtype=np.float32)
    crop_cls = np.array([[1, 0, 0], [0.9, 0.1, 0], [0, 1, 0], [0, 0.2, 0.9], [0.8, 0, 0.6]], dtype=np.float32)
    # votes: 0, 0, 1, 2, 0 -> counts [3, 1, 1]
    assert present_classes(crop_cls, text, 1).tolist() == [0]
    assert present_classes(crop_cls, text, 0).tolist() == [0, 1, 2]
    assert present_classes(crop_cls, text, 3).tolist() == []


def test_point_prompts_are_top_k_patch_centres_in_image_pixels() -> None:
    sim = np.array([[[0, 5, 1], [2, 0, 9]], [[7, 0, 0], [0, 0, 0]]], dtype=np.float32)
    # patch side 8 px at scale 0.5 -> 16 original pixels per cell
    centres = patch_centers((2, 3), 16.0)
    points = point_prompts(sim, 2, centres)
    assert points.dtype == np.float32 and points.shape == (2, 2, 2)
    np.testing.assert_array_equal(points[0], [[40, 24], [24, 8]])  # cell (1, 2) then (0, 1), as (x, y)
    np.testing.assert_array_equal(points[1, 0], [8, 8])
    # a 32 x 40 image: the last column's centre x = 40 lies on the padded border and is never chosen
    inside = point_prompts(sim, 2, centres, image_hw=(32, 40))
    np.testing.assert_array_equal(inside[0], [[24, 8], [8, 24]])
    assert point_prompts(sim, 10, centres, image_hw=(32, 40)).shape == (2, 4, 2)


def test_mask_cells_use_the_pixel_centre() -> None:
    masks = np.zeros((1, 3, 3), dtype=bool)
    masks[0, :, 1] = True  # column 1: centre x = 1.5 -> cell 1 with a 1.5 px stride, rows 0.5, 1.5, 2.5 -> 0, 1, 1
    weights = mask_cell_weights(masks, (2, 2), 1.5)
    assert weights.tolist() == [[0, 1, 0, 2]]


def test_dense_labelling_averages_features_inside_the_mask() -> None:
    features = np.zeros((2, 2, 2), dtype=np.float32)
    features[:, :, 0] = [[1], [0]]  # left cells point to e0, right cells to e1
    features[:, :, 1] = [[0], [1]]
    text, class_ids = np.eye(2, dtype=np.float32), np.array([4, 7])
    masks = np.zeros((3, 4, 4), dtype=bool)
    masks[0, :, :2] = True  # left half
    masks[1, :, 2:] = True  # right half
    masks[2, 0, :3] = True  # 2 pixels in cell (0, 0) + 1 in cell (0, 1)
    masks[2, 1, :1] = True  # one more in cell (0, 0): mean (3, 1) / 4
    ids, sims = label_masks_by_dense_features(masks, features, 2.0, text, class_ids)
    assert ids.tolist() == [4, 7, 4]
    np.testing.assert_allclose(sims, [1.0, 1.0, 3 / np.sqrt(10)], rtol=1e-6)


def test_mask_crop_is_the_tight_box_with_the_outside_filled() -> None:
    image = np.arange(6 * 8 * 3, dtype=np.uint8).reshape(6, 8, 3)
    mask = np.zeros((6, 8), dtype=bool)
    mask[1:4, 2] = True
    mask[3, 2:6] = True
    crop = mask_crop(image, mask, (122, 116, 104))
    assert crop.shape == (3, 4, 3)
    np.testing.assert_array_equal(crop[mask[1:4, 2:6]], image[1:4, 2:6][mask[1:4, 2:6]])
    assert (crop[~mask[1:4, 2:6]] == [122, 116, 104]).all()


def _square(y0: int, x0: int, side: int) -> np.ndarray:
    mask = np.zeros((4, 4), dtype=bool)
    mask[y0:y0 + side, x0:x0 + side] = True
    return mask


def test_merge_policies() -> None:
    s11 = [LabelledMask(_square(0, 0, 2), 1, 0.5, "stage11"), LabelledMask(_square(1, 1, 2), 2, 0.7, "stage11")]
    s12 = [LabelledMask(_square(0, 0, 4), 3, 0.9, "stage12"), LabelledMask(_square(2, 2, 2), 4, 0.95, "stage12")]
    first = merge(s11, s12, (4, 4), "stage11_first")
    np.testing.assert_array_equal(first, [[1, 1, 3, 3], [1, 2, 2, 3], [3, 2, 2, 4], [3, 3, 4, 4]])
    best = merge(s11, s12, (4, 4), "highest_score")
    np.testing.assert_array_equal(best, [[3, 3, 3, 3], [3, 3, 3, 3], [3, 3, 4, 4], [3, 3, 4, 4]])
    only11 = merge(s11, [], (4, 4), "highest_score")
    np.testing.assert_array_equal(only11, [[1, 1, 255, 255], [1, 2, 2, 255], [255, 2, 2, 255], [255] * 4])
    label, score = paint([], (2, 3), 65535, np.uint16)
    assert label.dtype == np.uint16 and (label == 65535).all() and np.isneginf(score).all()
    with pytest.raises(ValueError, match="merge policy"):
        merge(s11, s12, (4, 4), "union")


def test_mask_record_round_trips_through_pycocotools() -> None:
    from pipeline.models.sam import mask_to_rle

    mask = np.zeros((5, 7), dtype=bool)
    mask[1:4, 2:6] = True
    mask[2, 2] = False
    record = mask_record(mask_to_rle(mask), 3, np.float32(0.25), "stage11")
    text = json.loads(json.dumps(record))
    assert isinstance(text["segmentation"]["counts"], str)
    rle = {"size": text["segmentation"]["size"], "counts": text["segmentation"]["counts"].encode()}
    np.testing.assert_array_equal(mask_utils.decode(rle).astype(bool), mask)
    assert text | {"segmentation": None} == {"segmentation": None, "category_id": 3, "score": 0.25,
                                              "producer": "stage11", "area": 11, "bbox": [2, 1, 4, 3]}


def test_quality_reports_coverage_and_both_mious() -> None:
    from pipeline.data.vocab import load_vocab

    vocab = load_vocab("toy")
    quality = QualityAccumulator(vocab)
    gt = np.array([[0, 0, 255], [1, 1, 1]], dtype=np.uint8)
    pred = np.array([[0, 255, 5], [1, 0, 1]], dtype=np.uint8)
    quality.update(gt[:, :2], {"merged": pred[:, :2]})
    quality.update(gt[:, 2:], {"merged": pred[:, 2:]})
    summary = summarize_quality(merge_quality([quality.pop()]), vocab.names)["merged"]
    # labelled only: IoU0 = 1 / (1 + 2 - 1), IoU1 = 2 / (3 + 2 - 2); unlabelled as wrong: IoU0 = 1 / (2 + 2 - 1)
    assert summary["coverage"] == pytest.approx(100 * 4 / 5)
    assert summary["mIoU_labelled"] == pytest.approx(100 * (1 / 2 + 2 / 3) / 2)
    assert summary["mIoU_unlabelled_as_wrong"] == pytest.approx(100 * (1 / 3 + 2 / 3) / 2)
    assert summary["num_valid_pixels"] == 5 and quality.pop() == {}


# ------------------------------------------------------------------------------------------ config checks

def test_model_key_lists_match_the_model_dataclasses() -> None:
    from pipeline.models.clip import ClipConfig
    from pipeline.models.sam import AmgConfig, SamConfig

    for keys, cls in ((CLIP_KEYS, ClipConfig), (SAM_KEYS, SamConfig), (AMG_KEYS, AmgConfig)):
        assert keys == {f.name for f in dataclasses.fields(cls)}


@pytest.mark.parametrize(("override", "message"), [
    ({"mode": "stage13"}, "pl.mode"), ({"clip": {"modelname": "x"}}, "pl.clip has unknown"),
    ({"labeler": "knn"}, "pl.labeler"), ({"top_k": 0}, "pl.top_k"), ({"data": {}}, "pl.data.kind"),
    ({"prompt_templates": "nope"}, "pl.prompt_templates"),
    ({"data": {"kind": "toyworld", "vocab": "camvid_11"}}, "pl.data"),
])
def test_bad_config_fails_before_compute_naming_the_key(tmp_path: Path, override: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        make_stage(tmp_path, **override)


def test_vocabulary_mismatch_between_stage_and_data_is_refused(tmp_path: Path, shared_data: Path) -> None:
    with pytest.raises(ConfigError, match="differs from pl.vocab"):
        make_stage(tmp_path, data={"kind": "camvid", "root": str(shared_data / "camvid"), "vocab": "camvid_11"})


def test_missing_checkpoint_fails_in_identities_naming_the_key(tmp_path: Path) -> None:
    stage = make_stage(tmp_path, sam={"model_type": "toy", "checkpoint": str(tmp_path / "missing.pth")})
    with pytest.raises(ConfigError, match="sam.checkpoint"):
        stage.identities()


def test_stage_yaml_mirrors_the_config_fields() -> None:
    import yaml

    from stages.pseudolabel_config import PseudoLabelConfig

    path = Path(__file__).resolve().parents[2] / "conf" / "stage" / "pseudolabel.yaml"
    values = yaml.safe_load(path.read_text())
    fields = {f.name: f for f in dataclasses.fields(PseudoLabelConfig)}
    assert set(values) - {"stage", "inputs"} == set(fields)
    defaults = PseudoLabelConfig()
    for name in set(fields) - {"vocab", "resources", "clip", "sam", "amg"}:
        assert values[name] == getattr(defaults, name), name
    from pipeline.models.clip import ClipConfig
    from pipeline.models.sam import AmgConfig, SamConfig

    for name, cls in (("clip", ClipConfig), ("sam", SamConfig), ("amg", AmgConfig)):
        model_defaults = {**dataclasses.asdict(cls()), **getattr(defaults, name)}
        assert values[name] == pytest.approx(model_defaults), name  # every model knob listed, defaults unchanged
