"""The shared-image two-way transformer (`pipeline.models.sam_two_way`, ``sam.shared_image_decoder``) against
segment_anything's decoder and automatic mask generator.

Tolerances: the fast path runs the same modules in the same order, but its matmuls have other shapes (B prompts
folded into one query axis, one block-diagonal score matmul) and SDPA's fused softmax accumulates in another order,
so values move by float32 rounding, amplified through two blocks and the hypernetwork product: measured max |diff|
~1e-6 in the IoUs and ~5e-6 * (1 + |logit|) in the mask logits of the trained toy SAM (logits up to ~40), 2e-7 with
random weights. Asserted: IoU |diff| <= 1e-5 and logit |diff| <= 1e-5 * (1 + |logit|).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.models.configs import AmgConfig, SamConfig
from pipeline.models.sam import Sam
from pipeline.models.sam_decoder import decode_tokens, decode_tokens_shared, mask_logits
from pipeline.models.sam_masks import automatic_masks

TRAINED_SAM = Path(__file__).resolve().parents[2] / "assets" / "models" / "toy_sam.pt"
EPSILON = 1e-4  # a mask whose IoU or stability lies this close to its threshold may fall on either side


def build(weights: str, shared: bool = True) -> Sam:
    if weights == "trained" and not TRAINED_SAM.is_file():
        pytest.skip("assets/models/toy_sam.pt is absent")
    checkpoint = str(TRAINED_SAM) if weights == "trained" else None
    return Sam.build(SamConfig(model_type="toy", checkpoint=checkpoint, device="cpu", shared_image_decoder=shared))


def toy_world(count: int) -> list[np.ndarray]:
    """The first `count` 128 px toy-world training images (what the toy SAM was trained on)."""
    from pipeline.config import checked_adapter, checked_vocab

    adapter = checked_adapter({"kind": "toyworld", "split": "train", "num_images": count, "size": 128},
                              checked_vocab("toy", "vocab"), "test")
    return [adapter.load(ref).image for ref in adapter.list_items()]


@pytest.fixture(scope="module")
def images() -> list[np.ndarray]:
    return toy_world(3)


@pytest.mark.parametrize("weights", ["random", "trained"])
@pytest.mark.parametrize(("count", "points"), [(64, 1), (64, 3), (1, 2)])
@torch.no_grad()
def test_shared_path_equals_the_exact_decoder_up_to_rounding(images: list[np.ndarray], weights: str, count: int,
                                                             points: int) -> None:
    """`count` prompts of `points` points each (the generator's 64 single points; sets; a single prompt)."""
    sam = build(weights)
    model, embedding = sam.model, sam.embed_images(images[:1]).features
    generator = torch.Generator().manual_seed(points)
    coords = torch.rand(count, points, 2, generator=generator) * 256
    labels = torch.randint(0, 2, (count, points), generator=generator)
    labels[:, 0] = 1
    exact, fast = decode_tokens(model, embedding, coords, labels), decode_tokens_shared(model, embedding, coords,
                                                                                        labels)
    sparse, dense = model.prompt_encoder(points=(coords, labels), boxes=None, masks=None)
    reference, reference_iou = model.mask_decoder.predict_masks(embedding, model.prompt_encoder.get_dense_pe(),
                                                                sparse, dense)
    logits = mask_logits(model, fast)
    assert logits.shape == reference.shape == (count, 4, 64, 64) and fast.iou.shape == (count, 4)
    assert fast.image_tokens.shape == exact.image_tokens.shape and fast.grid == exact.grid == (16, 16)
    assert reference.abs().max() > (20 if weights == "trained" else 0.1)  # real logits, not a degenerate case
    assert (fast.iou - reference_iou).abs().max() <= 1e-5
    assert ((logits - reference).abs() <= 1e-5 * (1 + reference.abs())).all()
    assert torch.equal(mask_logits(model, exact), reference)  # the exact path stays bit-equal
    assert torch.allclose(fast.hyper, exact.hyper, rtol=1e-5, atol=1e-5)


def _key(record: dict) -> tuple:
    return tuple(record["point_coords"][0]), record["segmentation"]["counts"]


def _clear_of_thresholds(records: list[dict], amg: AmgConfig) -> list[dict]:
    """The records whose predicted IoU and stability lie farther than EPSILON from the generator's thresholds."""
    return [r for r in records if abs(r["predicted_iou"] - amg.pred_iou_thresh) > EPSILON
            and abs(r["stability_score"] - amg.stability_score_thresh) > EPSILON]


AMG_CASES = [AmgConfig(points_per_side=8),  # segment_anything's thresholds (0.88, 0.95)
             AmgConfig(points_per_side=8, pred_iou_thresh=0.5, stability_score_thresh=0.8),
             AmgConfig(points_per_side=6, points_per_batch=20, pred_iou_thresh=0.0, stability_score_thresh=0.0)]


def test_automatic_masks_equal_segment_anythings_generator_off_the_thresholds(images: list[np.ndarray],
                                                                            torch_threads) -> None:
    """Trained toy SAM, toy-world images: the kept masks (RLE), their points and order equal the generator's; IoU
    and stability within 1e-5; only masks within EPSILON of a threshold may differ (none do on these images)."""
    from segment_anything import SamAutomaticMaskGenerator

    torch_threads(1)  # seconds, not a minute, on a loaded 2-core machine (two threads contend with other work)
    sam = build("trained")
    compared = 0
    for amg in AMG_CASES:
        generator = SamAutomaticMaskGenerator(sam.model, output_mode="coco_rle", **dataclasses.asdict(amg))
        for image in images:
            ours = _clear_of_thresholds(automatic_masks(sam, image, amg), amg)
            reference = _clear_of_thresholds(generator.generate(image), amg)
            assert [_key(r) for r in ours] == [_key(r) for r in reference]
            for a, b in zip(ours, reference, strict=True):
                assert a["bbox"] == b["bbox"] and a["area"] == b["area"]
                assert a["predicted_iou"] == pytest.approx(b["predicted_iou"], abs=1e-5)
                assert a["stability_score"] == pytest.approx(b["stability_score"], abs=1e-5)
            compared += len(ours)
    assert compared > 100  # permissive case: many masks through NMS


def test_the_knob_chooses_the_transformer(images: list[np.ndarray], monkeypatch: pytest.MonkeyPatch) -> None:
    """shared_image_decoder: false runs segment_anything's TwoWayTransformer.forward, true never calls it."""
    from segment_anything.modeling.transformer import TwoWayTransformer

    calls = []
    original = TwoWayTransformer.forward
    monkeypatch.setattr(TwoWayTransformer, "forward", lambda self, *a: calls.append(1) or original(self, *a))
    amg = AmgConfig(points_per_side=3)
    for shared, expected in ((False, 1), (True, 0)):
        calls.clear()
        automatic_masks(build("random", shared), images[0], amg)
        assert len(calls) == expected, shared
    assert SamConfig().shared_image_decoder  # the default (measured in BENCHMARKS.md)


@pytest.mark.parametrize("multimask", [True, False])
def test_point_prompt_sets_decode_through_the_shared_path_too(images: list[np.ndarray], multimask: bool) -> None:
    """Stage 1.1's `Sam.decode_points` (sets of several points, mixed labels): masks of the trained toy SAM equal the
    exact decoder's, scores within 1e-5."""
    fast, exact = build("trained"), build("trained", shared=False)
    embeddings = fast.embed_images(images[:1])
    rng = np.random.default_rng(1)
    prompts = [rng.random((count, 2)) * 128 for count in (5, 5, 1, 3)]
    labels = [np.r_[1, rng.integers(0, 2, len(p) - 1)] for p in prompts]
    ours = fast.decode_points(embeddings, 0, prompts, labels, multimask)
    reference = exact.decode_points(embeddings, 0, prompts, labels, multimask)
    for (masks, scores), (ref_masks, ref_scores) in zip(ours, reference, strict=True):
        assert masks.shape == ref_masks.shape == ((3 if multimask else 1), 128, 128)
        assert np.array_equal(masks, ref_masks)
        np.testing.assert_allclose(scores, ref_scores, rtol=0, atol=1e-5)
    assert sum(masks.sum() for masks, _ in ours) > 1000  # real masks compared, not empty ones
