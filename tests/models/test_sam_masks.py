"""Automatic masks from a stored embedding against segment_anything's own SamAutomaticMaskGenerator."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.models.sam import AmgConfig, Sam, SamConfig
from pipeline.models.sam_masks import automatic_masks

TRAINED_SAM = Path(__file__).resolve().parents[2] / "assets" / "models" / "toy_sam.pt"


@pytest.fixture(scope="module")
def trained_sam() -> Sam:
    """The toy SAM trained on the toy world (real masks to compare), or random weights when it is absent; the exact
    decoder path (segment_anything's transformer), so records can equal the generator's bit for bit."""
    return Sam.build(SamConfig(model_type="toy", checkpoint=str(TRAINED_SAM) if TRAINED_SAM.is_file() else None,
                               shared_image_decoder=False))


def _scene(height: int, width: int, seed: int) -> np.ndarray:
    """Flat-coloured rectangles on noise: objects a trained SAM segments, with noise to break ties."""
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 40, size=(height, width, 3), dtype=np.uint8)
    for _ in range(4):
        y0, x0 = rng.integers(0, height - 8), rng.integers(0, width - 8)
        image[y0:y0 + rng.integers(6, height // 2), x0:x0 + rng.integers(6, width // 2)] = rng.integers(60, 256, 3)
    return image


def _reference(sam: Sam, image: np.ndarray, amg: AmgConfig) -> list[dict]:
    from segment_anything import SamAutomaticMaskGenerator

    generator = SamAutomaticMaskGenerator(sam.model, output_mode="coco_rle", **dataclasses.asdict(amg))
    return generator.generate(image)


def same(a: object, b: object) -> bool:
    """Equal as JSON: every float exactly, NaN equal to NaN (empty masks have a NaN stability score)."""
    return json.dumps(a) == json.dumps(b)


AMG_CASES = {
    "segment_anything_defaults_but_grid": AmgConfig(points_per_side=6),
    "permissive_uneven_batches": AmgConfig(points_per_side=5, points_per_batch=7, pred_iou_thresh=0.0,
                                           stability_score_thresh=0.0),
    "tight_nms_offset": AmgConfig(points_per_side=6, points_per_batch=16, pred_iou_thresh=0.5,
                                  stability_score_thresh=0.6, stability_score_offset=0.5, box_nms_thresh=0.3),
}


@pytest.mark.parametrize("case", sorted(AMG_CASES))
def test_records_equal_segment_anythings_generator_exactly(trained_sam: Sam, case: str) -> None:
    """Same embedding (one image) -> every field of every record equal, in the same order."""
    image, amg = _scene(72, 96, 0), AMG_CASES[case]
    ours = automatic_masks(trained_sam, image, amg)
    reference = _reference(trained_sam, image, amg)
    assert same(ours, reference)
    if case == "permissive_uneven_batches":
        assert len(ours) > 5  # the comparison covers many masks, NMS included
    assert same(trained_sam.generate(image, amg), reference)  # the per-image wrapper routes through the same code


def test_masks_from_a_batch_embedding_equal_sams_own_generator(trained_sam: Sam) -> None:
    images = [_scene(40, 30, 2), _scene(36, 52, 3)]
    amg = AMG_CASES["permissive_uneven_batches"]
    embeddings = trained_sam.embed_images(images)
    for index, image in enumerate(images):
        ours = automatic_masks(trained_sam, image, amg, embeddings, index)
        reference = _reference(trained_sam, image, amg)
        assert [r["segmentation"] for r in ours] == [r["segmentation"] for r in reference] and ours
        for a, b in zip(ours, reference, strict=True):  # the batched encoder moves scores by float noise only
            assert same(a | {"predicted_iou": 0, "stability_score": 0}, b | {"predicted_iou": 0, "stability_score": 0})
            assert a["predicted_iou"] == pytest.approx(b["predicted_iou"], abs=1e-5)


def test_an_image_with_no_kept_mask_gives_no_records(trained_sam: Sam) -> None:
    image = _scene(32, 32, 5)
    amg = AmgConfig(points_per_side=2, pred_iou_thresh=1e9)
    assert automatic_masks(trained_sam, image, amg) == _reference(trained_sam, image, amg) == []


def test_crop_layers_fall_back_to_segment_anythings_generator(trained_sam: Sam) -> None:
    image = _scene(48, 64, 6)
    amg = AmgConfig(points_per_side=3, crop_n_layers=1, pred_iou_thresh=0.0, stability_score_thresh=0.0)
    ours = automatic_masks(trained_sam, image, amg, trained_sam.embed_images([image]), 0)
    assert same(ours, _reference(trained_sam, image, amg)) and ours
    assert {tuple(r["crop_box"]) for r in ours} - {(0, 0, 64, 48)}  # masks of the smaller crops are there


def test_an_embedding_of_another_image_is_refused(trained_sam: Sam) -> None:
    embeddings = trained_sam.embed_images([_scene(40, 30, 7)])
    with pytest.raises(ValueError, match="embedding 0 is of a"):
        automatic_masks(trained_sam, _scene(30, 40, 7), AmgConfig(points_per_side=2), embeddings, 0)


def test_reduced_precision_masks_come_out_as_float32_records(trained_sam: Sam) -> None:
    """bf16 autocast around the decoder: scores leave as Python floats (segment_anything's own loop fails here)."""
    bf16 = Sam(trained_sam.model, dataclasses.replace(trained_sam.cfg, precision="bf16"), trained_sam.identity)
    image = _scene(24, 24, 8)
    embeddings = bf16.embed_images([image])
    assert embeddings.features.dtype == torch.float32
    records = automatic_masks(bf16, image, AmgConfig(points_per_side=2, pred_iou_thresh=0.0,
                                                     stability_score_thresh=0.0), embeddings, 0)
    assert records and all(isinstance(r["predicted_iou"], float) for r in records)


def test_batch_coco_rle_equals_segment_anythings_per_mask_encoding() -> None:
    from segment_anything.utils.amg import coco_encode_rle, mask_to_rle_pytorch

    from pipeline.models.sam_masks import batch_coco_rle

    rng = np.random.default_rng(9)
    masks = rng.random((6, 13, 17)) > 0.5
    masks[0], masks[1], masks[2, :, :5] = False, True, True  # empty, full, starts with a run of ones
    reference = [coco_encode_rle(rle) for rle in mask_to_rle_pytorch(torch.as_tensor(masks))]
    assert batch_coco_rle(masks) == reference
    assert batch_coco_rle(np.zeros((0, 13, 17), bool)) == []


def test_small_region_removal_equals_segment_anythings_generator(trained_sam: Sam) -> None:
    pytest.importorskip("cv2")  # segment_anything's small-region removal needs OpenCV (not in the dev extra)
    image = _scene(72, 96, 10)
    amg = dataclasses.replace(AMG_CASES["permissive_uneven_batches"], min_mask_region_area=30)
    ours = automatic_masks(trained_sam, image, amg)
    assert same(ours, _reference(trained_sam, image, amg)) and ours
