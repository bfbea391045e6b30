"""SAM wrapper against segment_anything's own SamPredictor on the toy model; COCO RLE round trips."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from pipeline.models.sam import AmgConfig, Sam
from pipeline.sample_files import mask_to_rle, rle_to_mask


def _image(height: int, width: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)


def test_build_and_identity(toy_sam: Sam) -> None:
    assert toy_sam.image_size == 256
    assert toy_sam.identity == "sam:toy@random-init:seed=0"


def test_embed_images_batches_like_single_images(toy_sam: Sam) -> None:
    images = [_image(120, 200, 0), _image(90, 60, 1)]
    batch = toy_sam.embed_images(images)
    assert batch.features.shape == (2, 64, 16, 16)
    assert batch.input_sizes == [(154, 256), (256, 171)]
    assert batch.original_sizes == [(120, 200), (90, 60)]
    single = toy_sam.embed_images(images[1:])
    np.testing.assert_allclose(batch.features[1].numpy(), single.features[0].numpy(), atol=1e-5)


def test_point_prompts_match_sam_predictor(toy_sam: Sam) -> None:
    """Batched decoding of several prompt sets equals SamPredictor.predict called once per set."""
    from segment_anything import SamPredictor

    image = _image(120, 200, 2)
    prompts = [np.array([[10.0, 20.0], [150.5, 40.0]]), np.array([[100.0, 60.0]]), np.array([[5.0, 5.0], [7.0, 9.0]])]
    labels = [np.array([1, 0]), np.array([1]), np.array([1, 1])]
    results = toy_sam.predict_points(image, prompts, labels)
    predictor = SamPredictor(toy_sam.model)
    predictor.set_image(image)
    assert len(results) == 3
    for (masks, scores), points, point_labels in zip(results, prompts, labels, strict=True):
        ref_masks, ref_scores, _ = predictor.predict(points, point_labels, multimask_output=True)
        assert masks.shape == (3, 120, 200) and masks.dtype == bool and scores.shape == (3,)
        np.testing.assert_allclose(scores, ref_scores, atol=1e-4)
        assert (masks != ref_masks).mean() < 1e-3  # identical up to float ties at the 0 threshold


def test_single_mask_output_and_all_foreground_default(toy_sam: Sam) -> None:
    image = _image(64, 64, 3)
    (masks, scores), = toy_sam.predict_points(image, [np.array([[32.0, 32.0]])], multimask=False)
    assert masks.shape == (1, 64, 64) and scores.shape == (1,)
    (explicit, _), = toy_sam.predict_points(image, [np.array([[32.0, 32.0]])], [np.array([1])], multimask=False)
    np.testing.assert_array_equal(masks, explicit)
    with pytest.raises(ValueError, match="one label per point"):
        toy_sam.predict_points(image, [np.array([[1.0, 2.0]])], [np.array([1, 1])])


def test_generate_returns_coco_rle_records(toy_sam: Sam) -> None:
    image = _image(80, 120, 4)
    amg = AmgConfig(points_per_side=4, pred_iou_thresh=-100.0, stability_score_thresh=0.0)
    records = toy_sam.generate(image, amg)
    assert records, "permissive thresholds must keep at least one mask"
    for record in records:
        assert isinstance(record["segmentation"]["counts"], str)
        mask = rle_to_mask(record["segmentation"])
        assert mask.shape == (80, 120)
        assert record["area"] == int(mask.sum())


@pytest.mark.skipif(importlib.util.find_spec("cv2") is not None, reason="opencv installed")
def test_min_region_area_without_opencv_fails_early(toy_sam: Sam) -> None:
    with pytest.raises(ImportError, match="cv2"):
        toy_sam.generate(_image(32, 32, 5), AmgConfig(min_mask_region_area=100))


def test_amg_defaults_are_segment_anythings() -> None:
    import inspect

    from segment_anything import SamAutomaticMaskGenerator

    defaults = {k: p.default for k, p in inspect.signature(SamAutomaticMaskGenerator).parameters.items()}
    for key, value in AmgConfig().__dict__.items():
        assert defaults[key] == value, key


def test_rle_known_value_and_round_trip() -> None:
    mask = np.array([[0, 1], [0, 1]], dtype=bool)  # column-major runs: 2 zeros, 2 ones
    rle = mask_to_rle(mask)
    assert rle == {"size": [2, 2], "counts": "22"}
    np.testing.assert_array_equal(rle_to_mask(rle), mask)
    random_mask = np.random.default_rng(0).random((37, 53)) > 0.6
    random_rle = mask_to_rle(random_mask)
    np.testing.assert_array_equal(rle_to_mask(random_rle), random_mask)
    assert mask_utils.area({"size": random_rle["size"], "counts": random_rle["counts"].encode()}) == random_mask.sum()
    uncompressed = {"size": [2, 2], "counts": [2, 2]}
    np.testing.assert_array_equal(rle_to_mask(uncompressed), mask)
