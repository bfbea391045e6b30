"""The SAM GPU switches run on CPU and agree with the defaults: SDPA attention, channels-last, pinned copies,
torch.compile, and bf16 autocast (masks close to fp32)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.models.configs import AmgConfig, SamConfig
from pipeline.models.sam import Sam
from pipeline.models.sam_masks import automatic_masks_with_arrays

TRAINED_SAM = Path(__file__).resolve().parents[2] / "assets" / "models" / "toy_sam.pt"
AMG = AmgConfig(points_per_side=6, pred_iou_thresh=0.0, stability_score_thresh=0.0)


def build(**switches: object) -> Sam:
    checkpoint = str(TRAINED_SAM) if TRAINED_SAM.is_file() else None
    return Sam.build(SamConfig(model_type="toy", checkpoint=checkpoint, device="cpu", **switches))


def scene(seed: int) -> np.ndarray:
    """Flat-coloured rectangles on noise (objects the trained toy SAM segments)."""
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 40, size=(80, 96, 3), dtype=np.uint8)
    for _ in range(4):
        y0, x0 = rng.integers(0, 60), rng.integers(0, 70)
        image[y0:y0 + rng.integers(8, 40), x0:x0 + rng.integers(8, 48)] = rng.integers(60, 256, 3)
    return image


@pytest.fixture(scope="module")
def reference() -> tuple[Sam, list[np.ndarray], torch.Tensor]:
    sam, images = build(), [scene(0), scene(1)]
    return sam, images, sam.embed_images(images, batch_size=1).features


@pytest.mark.parametrize("switches", [{"sdpa": True}, {"channels_last": True, "pin_memory": True},
                                      {"sdpa": True, "channels_last": True}])
def test_fp32_switches_give_the_same_embeddings_up_to_rounding(reference: tuple, switches: dict) -> None:
    sam, images, features = reference
    fast = build(**switches)
    assert fast.cfg.sdpa == switches.get("sdpa", False)
    ours = fast.embed_images(images, batch_size=1).features
    assert not torch.equal(features, torch.zeros_like(features))
    assert torch.allclose(ours, features, atol=1e-4, rtol=1e-4)  # float rounding only (softmax/matmul order)


def test_sdpa_keeps_the_automatic_masks(reference: tuple) -> None:
    sam, images, _ = reference
    for image in images:
        records, masks = automatic_masks_with_arrays(sam, image, AMG)
        fast_records, fast_masks = automatic_masks_with_arrays(build(sdpa=True), image, AMG)
        assert len(records) > 3 and len(fast_records) == len(records)
        assert np.mean([iou(a, b) for a, b in zip(masks, fast_masks, strict=True)]) > 0.99


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def test_bf16_masks_are_close_to_fp32(reference: tuple) -> None:
    """Measure: each fp32 mask's best IoU among the bf16 masks (the same AMG grid), averaged over both images'
    masks, >= 0.9; bf16 moves logits near the threshold and the scores, so NMS may keep a slightly different set."""
    sam, images, _ = reference
    bf16 = Sam(sam.model, dataclasses.replace(sam.cfg, precision="bf16"), sam.identity)
    best = []
    for image in images:
        _, fp32_masks = automatic_masks_with_arrays(sam, image, AMG)
        records, bf16_masks = automatic_masks_with_arrays(bf16, image, AMG)
        assert records and all(isinstance(r["predicted_iou"], float) for r in records)
        best += [max(iou(mask, other) for other in bf16_masks) for mask in fp32_masks]
    assert len(best) > 6 and np.mean(best) >= 0.9, best
    print(f"bf16 vs fp32: {len(best)} masks, mean best IoU {np.mean(best):.4f}, min {np.min(best):.4f}")


def test_compiled_decoder_gives_the_same_masks(reference: tuple) -> None:
    """torch.compile on CPU (inductor); only the decoder is called, so only it compiles (the encoder would add
    minutes on a 2-core machine; its compiled forward is the same `torch.compile` call)."""
    pytest.importorskip("torch._inductor")
    sam, images, _ = reference
    compiled = build(compile=True)
    embeddings = sam.embed_images(images[:1])
    records, masks = automatic_masks_with_arrays(sam, images[0], AMG, embeddings)
    compiled_records, compiled_masks = automatic_masks_with_arrays(compiled, images[0], AMG, embeddings)
    assert len(compiled_records) == len(records) > 3
    assert np.mean([iou(a, b) for a, b in zip(masks, compiled_masks, strict=True)]) > 0.99


def test_compiled_clip_gives_the_same_sliding_features() -> None:
    """clip.compile: each image-tower block runs through torch.compile (inductor on CPU); features and crop CLS equal
    the eager model's up to float rounding."""
    pytest.importorskip("torch._inductor")
    from pipeline.models.clip import Clip
    from pipeline.models.configs import ClipConfig

    eager, compiled = (Clip.build(ClipConfig(model_name="toy-vit", device="cpu", compile=on)) for on in (False, True))

    def compiled_blocks(clip: Clip) -> list[bool]:
        blocks = clip.model.visual.transformer.resblocks
        return [hasattr(block.forward, "_torchdynamo_orig_callable") for block in blocks]

    assert all(compiled_blocks(compiled)) and not any(compiled_blocks(eager))
    image = scene(2)
    ours, reference = (clip.sliding_dense(image, 64, 32) for clip in (compiled, eager))
    assert torch.allclose(ours.features, reference.features, atol=1e-4)
    assert torch.allclose(ours.crop_cls, reference.crop_cls, atol=1e-4)
