"""ZSSeg Stage C: CLIP classification of masked crops, the λ ensemble, and per-pixel assembly (methods-spec §2.1).

1. Crop (`mask_crop`): the mask's tight bounding box (expand ratio 1.0), pixels outside the mask set to CLIP's mean
   colour, resized to CLIP's square input (bicubic), CLIP-normalised (`crop_batch`).
2. Classify (`crop_probabilities`): ``softmax(logit_scale · cos(CLIP image feature, text features))`` over the
   classes asked about (text features: hand-written templates, or Stage A's learned prompts).
3. Ensemble (`ensemble`), geometric per class with weight λ (release default 0.8): seen classes
   ``p_MF^λ · p_CLIP^(1−λ)``, unseen classes ``p_MF^(1−λ) · p_CLIP^λ``, no renormalisation (the release multiplies
   the MaskFormer softmax, its no-object column dropped without renormalising, with the CLIP softmax). p_MF is
   MaskFormer's class branch in the paper; here it is a trained model's class probabilities averaged over the mask
   (`mask_average`), and without one (or with λ <= 0) the result is p_CLIP.
4. Assemble (`assemble`): ``semseg[c] = Σ_q p_q(c) · mask_q`` (no division by Σ mask, as the release).

Importing this module does not import torch (the pseudolabel stage imports it on the driver).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

    from pipeline.models.clip import Clip


def mask_crop(image: np.ndarray, mask: np.ndarray, fill_rgb: Sequence[int]) -> np.ndarray:
    """ZSSeg's masked crop: the mask's tight bounding box, pixels outside the mask set to `fill_rgb`.

    Args:
        image: uint8 [H, W, 3] RGB.
        mask: bool [H, W] with at least one pixel.
        fill_rgb: fill colour (ZSSeg: CLIP's mean colour, 255 * (0.4815, 0.4578, 0.4082)).

    Returns:
        uint8 [h, w, 3], h x w = the box size in pixels (expand ratio 1.0).
    """
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    y0, y1, x0, x1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    crop = image[y0:y1, x0:x1].copy()
    crop[~mask[y0:y1, x0:x1]] = np.asarray(fill_rgb, dtype=np.uint8)
    return crop


def crop_batch(clip: Clip, image: np.ndarray, masks: np.ndarray) -> torch.Tensor:
    """float32 [N, 3, S, S] CLIP-normalised masked crops (S = CLIP's input side) of bool masks [N, H, W]."""
    import torch

    fill = [round(255 * m) for m in clip.mean]
    crops = [clip.preprocess(mask_crop(image, mask, fill), size=clip.image_size) for mask in masks]
    return torch.cat(crops) if crops else torch.zeros(0, 3, clip.image_size, clip.image_size)


def crop_features(clip: Clip, image: np.ndarray, masks: np.ndarray, batch_size: int = 32,
                  flip: bool = False) -> torch.Tensor:
    """float32 [N, D] unit CLIP image features of the masked crops (mirrored crops with `flip`), on CPU."""
    import torch

    chunks = []
    for start in range(0, len(masks), batch_size):
        crops = crop_batch(clip, image, masks[start:start + batch_size])
        chunks.append(clip.encode_image(crops.flip(-1) if flip else crops).cpu())
    return torch.cat(chunks) if chunks else torch.zeros(0, clip.embed_dim)


def crop_probabilities(clip: Clip, image: np.ndarray, masks: np.ndarray, text: torch.Tensor,
                       logit_scale: float = 100.0, batch_size: int = 32) -> np.ndarray:
    """float32 [N, K] p_CLIP: softmax over the K classes of ``logit_scale · cos(crop feature, text [K, D])``."""
    import torch

    features = crop_features(clip, image, masks, batch_size)
    text = torch.nn.functional.normalize(text.float().cpu(), dim=-1)
    return torch.softmax(logit_scale * features @ text.T, dim=1).numpy().astype(np.float32)


def mask_average(scores: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """float64 [N, C]: the mean of per-pixel class scores [C, H, W] over each non-empty bool mask [N, H, W]."""
    flat = masks.reshape(len(masks), -1).astype(np.float64)
    return flat @ scores.reshape(scores.shape[0], -1).T.astype(np.float64) / flat.sum(axis=1, keepdims=True)


def ensemble(p_clip: np.ndarray, p_mf: np.ndarray | None, seen: np.ndarray, weight: float) -> np.ndarray:
    """ZSSeg's geometric ensemble per class (see the module docstring).

    Args:
        p_clip: float [N, K] crop-classification probabilities.
        p_mf: float [N, K] the other classifier's probabilities (None = CLIP only).
        seen: bool [K], True for seen (trainable) classes.
        weight: λ; <= 0 means CLIP only.

    Returns:
        float64 [N, K], not renormalised.
    """
    p_clip = np.asarray(p_clip, dtype=np.float64)
    if p_mf is None or weight <= 0:
        return p_clip
    p_mf = np.asarray(p_mf, dtype=np.float64)
    mf_power = np.where(np.asarray(seen, dtype=bool), weight, 1.0 - weight)[None, :]
    return np.power(p_mf, mf_power) * np.power(p_clip, 1.0 - mf_power)


def assemble(probs: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """float32 [C, H, W] ``Σ_q probs[q, c] · masks[q]`` of probs [N, C] and bool masks [N, H, W]."""
    flat = masks.reshape(len(masks), -1).astype(np.float32)
    return (np.asarray(probs, dtype=np.float32).T @ flat).reshape(probs.shape[1], *masks.shape[1:])


def with_remainder(masks: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """bool [N(+1), H, W]: `masks` plus, when some pixel is uncovered, the uncovered remainder as one more
    proposal (MaskFormer's soft masks cover every pixel; SAM's automatic masks need not)."""
    rest = ~masks.any(axis=0) if len(masks) else np.ones(hw, dtype=bool)
    return np.concatenate([masks, rest[None]]) if rest.any() else masks
