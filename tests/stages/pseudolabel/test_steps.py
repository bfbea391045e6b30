"""The method's steps (`stages.pseudolabel.steps`) on hand-made inputs, against the definitions in its docstring."""

from __future__ import annotations

import json

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from pipeline.models.sliding import patch_centers
from pipeline.sample_files import mask_record
from stages.pseudolabel.steps import (
    MODES,
    LabelledMask,
    best_of_multimask,
    keep_automatic_mask,
    label_map_masks,
    label_masks_by_crops,
    label_masks_by_dense_features,
    labelled_automatic_masks,
    mask_cell_weights,
    mask_crop,
    merge,
    paint,
    patch_similarity,
    point_prompts,
    present_classes,
    producers_to_run,
)


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


def test_patch_similarity_is_the_cosine_of_each_patch_to_each_class() -> None:
    features = np.zeros((2, 1, 3), dtype=np.float32)
    features[:, 0, 0], features[:, 0, 1], features[:, 0, 2] = [1, 0], [0, 1], [0.6, 0.8]
    sim = patch_similarity(np.array([[1, 0], [0, 1]], dtype=np.float32), features)
    np.testing.assert_allclose(sim, [[[1, 0, 0.6]], [[0, 1, 0.8]]], rtol=1e-6)


def test_stage11_keeps_the_best_scored_multimask_output_per_class() -> None:
    masks = np.zeros((3, 2, 2), dtype=bool)
    masks[1, 0, 0] = masks[2] = True
    empty = np.zeros((3, 2, 2), dtype=bool)
    kept = best_of_multimask(np.array([4, 9, 6]), [(masks, np.array([0.1, 0.9, 0.9], np.float32)),
                                                   (empty, np.array([0.5, 0.2, 0.1], np.float32)),
                                                   (masks, np.array([0.3, 0.2, 0.8], np.float32))])
    assert [(m.category_id, m.producer, round(m.score, 6)) for m in kept] == [(4, "stage11", 0.9), (6, "stage11", 0.8)]
    np.testing.assert_array_equal(kept[0].mask, masks[1])  # a tie goes to the first output; empty masks drop out
    np.testing.assert_array_equal(kept[1].mask, masks[2])


def test_crop_labeller_gives_each_mask_the_class_made_from_its_own_crop() -> None:
    import torch

    from pipeline.models.clip import Clip, ClipConfig

    clip = Clip.build(ClipConfig(model_name="toy-vit"))
    image = np.random.default_rng(4).integers(0, 256, size=(48, 64, 3), dtype=np.uint8)
    masks = np.zeros((3, 48, 64), dtype=bool)
    masks[0, :20, :30], masks[1, 25:, 5:60], masks[2, 10:40, 40:] = True, True, True
    fill = [round(255 * m) for m in clip.mean]
    crops = torch.cat([clip.preprocess(mask_crop(image, m, fill), size=clip.image_size) for m in masks])
    text = clip.encode_image(crops)[[2, 0, 1]]  # class k is mask (2, 0, 1)[k]'s own crop embedding
    ids, probs = label_masks_by_crops(image, masks, clip, text, np.array([10, 11, 12]), batch_size=2)
    assert ids.tolist() == [11, 12, 10]
    assert probs.shape == (3,) and (probs > 1 / 3).all()


def test_automatic_masks_are_filtered_then_labelled_with_sams_score_and_rle() -> None:
    records = [{"area": 100, "predicted_iou": 0.88, "segmentation": {"size": [2, 2], "counts": "04"}},
               {"area": 99, "predicted_iou": 0.99}, {"area": 500, "predicted_iou": 0.87}]
    assert [keep_automatic_mask(r, 100, 0.88) for r in records] == [True, False, False]
    masks = np.ones((1, 2, 2), dtype=bool)
    (item,) = labelled_automatic_masks(records[:1], masks, np.array([3]))
    assert (item.category_id, item.score, item.producer, item.rle) == (3, 0.88, "stage12", records[0]["segmentation"])


@pytest.mark.parametrize("mode", MODES)
def test_ground_truth_runs_both_producers_but_the_mode_makes_the_label_map(mode: str) -> None:
    assert producers_to_run(mode, 2, has_ground_truth=True) == (True, True)
    assert producers_to_run(mode, 2, has_ground_truth=False) == (mode != "stage12", mode != "stage11")
    assert producers_to_run(mode, 0, has_ground_truth=True) == (False, False)
    s11, s12 = [LabelledMask(np.ones((1, 1), bool), 1, 0.5, "stage11")], [LabelledMask(np.ones((1, 1), bool), 2, 0.5,
                                                                                       "stage12")]
    assert label_map_masks(mode, s11, s12) == (s11 if mode != "stage12" else [], s12 if mode != "stage11" else [])


def test_mask_record_round_trips_through_pycocotools() -> None:
    from pipeline.sample_files import mask_to_rle

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
