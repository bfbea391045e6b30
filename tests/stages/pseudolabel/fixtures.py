"""The tiny pseudolabel config shared by the stage tests (and tests/stages/test_counting.py): toy CLIP and SAM with
random weights, a 64 px feature canvas and permissive stage 1.2 thresholds, so every step produces masks."""

from __future__ import annotations

from pathlib import Path

from pipeline.stage import StageContext
from stages.pseudolabel import PseudoLabelStage

TINY = {"vocab": "toy", "clip": {"model_name": "toy-vit"}, "sam": {"model_type": "toy"}, "crop": 64, "stride": 32,
        "image_short_side": 64, "min_crops": 0, "min_mask_area": 1, "min_predicted_iou": 0.0,
        "amg": {"points_per_side": 2, "pred_iou_thresh": 0.0, "stability_score_thresh": 0.0}}


def make_stage(tmp_path: Path, num_images: int = 3, **overrides: object) -> PseudoLabelStage:
    """A stage on `num_images` toy-world images (with ground truth), TINY plus `overrides`, not yet set up."""
    config = {**TINY, "data": {"kind": "toyworld", "num_images": num_images, "size": 64}, **overrides}
    return PseudoLabelStage(StageContext(node="pl", seed=0, config=config, output_url=str(tmp_path)))
