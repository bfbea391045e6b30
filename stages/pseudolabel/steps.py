"""Pseudo-labels from CLIP and SAM without human labels (Seifi et al. "FMbSeg" Stage 1; ZSSeg's crop labeller).

For each image and a vocabulary of M classes (text features T [M, D], one template "a photo of a {}." by default):

1. **High-resolution CLIP features.** The image (short side resized to `image_short_side`) is cut into `crop` x
   `crop` windows every `stride` pixels; each window yields MaskCLIP patch features (assembled into one map
   [D, Hp, Wp] over the image) and its CLS embedding (`pipeline.models.clip.Clip.sliding_features`).
2. **Class presence** (`present_classes`). Each crop votes for the class whose text feature is most similar to its
   CLS embedding; a class is present when it gets more than `min_crops` votes.
3. **Stage 1.1** (`patch_similarity`, `point_prompts`). For each present class the `top_k` patches most similar
   to its text feature give their centres (XY pixels) as point prompts to SAM, passed together; of SAM's 3
   multimask outputs the one with the highest predicted IoU is kept and gets the class (`best_of_multimask`).
4. **Stage 1.2.** SAM's automatic masks (`pipeline.models.sam_masks`), kept when area >= `min_mask_area` and
   predicted IoU >= `min_predicted_iou` (`keep_automatic_mask`), are labelled among the present classes either by
   the mean dense CLIP feature inside the mask (`label_masks_by_dense_features`, Seifi et al.) or, with
   ``labeler=crop``, ZSSeg's way (`label_masks_by_crops`: bounding-box crop, outside filled with CLIP's mean
   colour, square bicubic resize to CLIP's input side, CLIP image encoder). The crop labeller reads ZSSeg's
   learned prompts from input port `prompts` (a zsseg train node) instead of the templates, and with input port
   `model` (any train node) ensembles per class with that model's mask-averaged probabilities (ZSSeg's λ
   ensemble, `ensemble_weight`, in place of MaskFormer's class branch).
5. **Merge** (`merge`). ``stage11_first``: stage 1.1 labels win where masks overlap and stage 1.2 fills pixels
   1.1 left uncovered (methods-spec §6.2's reading); ``highest_score``: every pixel takes the mask with the highest
   SAM predicted IoU. Inside one producer, overlapping masks also resolve by highest score (first mask on ties).
   Uncovered pixels are ignore (255, or 65535 for > 255 classes).

Choices where the paper is silent (its appendix is unavailable; see methods-spec §3.1): `crop` = CLIP's native
input side and `stride` = half of it, `image_short_side` = 448, `min_crops` = 1 (a class needs >= 2 crops),
`min_mask_area` = 100 pixels, `min_predicted_iou` = 0.88 (SAM's own default), and the mask score stored with every
mask is SAM's predicted IoU for both producers (so ``highest_score`` compares like with like). An image where no
class is present gets an all-ignore label map. When the input has ground truth, both producers always run, so the
quality report can compare 1.1, 1.2 and the merge in one run (`producers_to_run`, `stages.pseudolabel.quality`).
"""

from __future__ import annotations

import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from pipeline.methods.zsseg_crops import crop_probabilities, ensemble
from pipeline.methods.zsseg_crops import mask_crop as mask_crop  # ZSSeg's masked crop, used by label_masks_by_crops

if TYPE_CHECKING:
    import torch

    from pipeline.models.clip import Clip

Mode = Literal["stage11", "stage12", "both"]
Policy = Literal["stage11_first", "highest_score"]
MODES: tuple[str, ...] = typing.get_args(Mode)
POLICIES: tuple[str, ...] = typing.get_args(Policy)


@dataclass
class LabelledMask:
    """One class-labelled binary mask.

    Attributes:
        mask: bool [H, W] at the original image resolution.
        category_id: train id of the class.
        score: SAM's predicted IoU of the mask.
        producer: "stage11" or "stage12".
        rle: COCO RLE of `mask` (counts str) when already known (automatic masks), else None.
    """

    mask: np.ndarray
    category_id: int
    score: float
    producer: str
    rle: dict[str, Any] | None = field(default=None, repr=False)


def present_classes(crop_cls: np.ndarray, text: np.ndarray, min_crops: int) -> np.ndarray:
    """Classes present in an image by per-crop CLS voting.

    Args:
        crop_cls: float [C, D] L2-normalised CLS embeddings of the C sliding-window crops.
        text: float [M, D] L2-normalised class text features.
        min_crops: a class is present when it wins strictly more than this many crops.

    Returns:
        int64 [K] sorted train ids of the present classes (K may be 0).
    """
    votes = np.argmax(np.asarray(crop_cls) @ np.asarray(text).T, axis=1)
    counts = np.bincount(votes, minlength=text.shape[0])
    return np.flatnonzero(counts > min_crops).astype(np.int64)


def patch_similarity(text: np.ndarray, features: np.ndarray) -> np.ndarray:
    """Cosine similarity of every patch to each class: text float [K, D] and features float [D, Hp, Wp], both
    L2-normalised, -> float [K, Hp, Wp]."""
    return np.einsum("kd,dhw->khw", text, features)


def point_prompts(patch_sim: np.ndarray, top_k: int, patch_centers: np.ndarray,
                  image_hw: tuple[int, int] | None = None) -> np.ndarray:
    """SAM point prompts: the centres of the `top_k` patches most similar to each class.

    Args:
        patch_sim: float [K, Hp, Wp] similarity of each patch feature to each of K classes' text features.
        top_k: points per class (5 in Seifi et al.).
        patch_centers: float [Hp, Wp, 2] patch centres as (x, y) continuous pixel coordinates of the original image
            (pixel (r, c) spans [c, c+1) x [r, r+1)).
        image_hw: (H, W); when given, patches whose centre lies outside the image (the padded border of the last
            row/column) are never chosen.

    Returns:
        float32 [K, P, 2] (x, y) points, most similar first, P = min(top_k, number of eligible patches); ties go to
        the patch that comes first in row-major order.
    """
    centers = np.asarray(patch_centers, dtype=np.float32).reshape(-1, 2)
    sim = np.asarray(patch_sim, dtype=np.float64).reshape(patch_sim.shape[0], -1)
    if image_hw is not None:
        inside = (centers[:, 0] < image_hw[1]) & (centers[:, 1] < image_hw[0])
        sim = np.where(inside[None, :], sim, -np.inf)
        count = min(top_k, int(inside.sum()))
    else:
        count = min(top_k, sim.shape[1])
    order = np.argsort(-sim, axis=1, kind="stable")[:, :count]
    return centers[order]


def best_of_multimask(class_ids: np.ndarray, results: Sequence[tuple[np.ndarray, np.ndarray]]) -> list[LabelledMask]:
    """Stage 1.1's masks: for each class, SAM's multimask output with the highest predicted IoU (the first on ties).

    Args:
        class_ids: int [K] train ids of the prompted classes.
        results: K tuples (masks bool [3, H, W], predicted IoU float [3]) from SAM, one per class's prompt set.

    Returns:
        One "stage11" mask per class, in class order; a class whose chosen mask is empty gets none.
    """
    kept = []
    for class_id, (masks, scores) in zip(class_ids, results, strict=True):
        best = int(np.argmax(scores))
        if masks[best].any():
            kept.append(LabelledMask(masks[best], int(class_id), float(scores[best]), "stage11"))
    return kept


def mask_cell_weights(masks: np.ndarray, grid_hw: tuple[int, int], patch_stride_px: float) -> np.ndarray:
    """Pixel counts of each mask in each patch cell.

    A pixel (r, c) belongs to the cell containing its centre: row floor((r + 0.5) / s), column floor((c + 0.5) / s),
    with s = `patch_stride_px`, clipped to the grid.

    Args:
        masks: bool [N, H, W].
        grid_hw: (Hp, Wp) patch grid.
        patch_stride_px: cell side in original-image pixels.

    Returns:
        float64 [N, Hp * Wp] row-major cell counts.
    """
    height, width = masks.shape[1:]
    rows = np.minimum(((np.arange(height) + 0.5) / patch_stride_px).astype(np.int64), grid_hw[0] - 1)
    cols = np.minimum(((np.arange(width) + 0.5) / patch_stride_px).astype(np.int64), grid_hw[1] - 1)
    cell = (rows[:, None] * grid_hw[1] + cols[None, :]).ravel()
    cells = grid_hw[0] * grid_hw[1]
    return np.stack([np.bincount(cell[m.ravel()], minlength=cells) for m in masks]).astype(np.float64)


def label_masks_by_dense_features(masks: np.ndarray, features: np.ndarray, patch_stride_px: float,
                                  text: np.ndarray, class_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Seifi et al. stage 1.2 labelling: mean dense CLIP feature inside each mask vs the present classes.

    The mean is over the mask's pixels, each taking the feature of its patch cell (`mask_cell_weights`), i.e. the
    nearest-neighbour upsampled feature map averaged over the mask; it is L2-normalised before the cosine.

    Args:
        masks: bool [N, H, W], each with at least one pixel.
        features: float [D, Hp, Wp] dense CLIP features.
        patch_stride_px: patch cell side in original-image pixels.
        text: float [K, D] L2-normalised text features of the K present classes.
        class_ids: int [K] train ids of those classes.

    Returns:
        (int64 [N] train ids, float32 [N] cosine similarity to the chosen class).
    """
    dim, grid_h, grid_w = features.shape
    weights = mask_cell_weights(masks, (grid_h, grid_w), patch_stride_px)
    mean = weights @ features.reshape(dim, -1).T.astype(np.float64) / weights.sum(axis=1, keepdims=True)
    mean /= np.maximum(np.linalg.norm(mean, axis=1, keepdims=True), 1e-12)
    sim = mean @ np.asarray(text, dtype=np.float64).T
    best = np.argmax(sim, axis=1)
    return np.asarray(class_ids, dtype=np.int64)[best], sim[np.arange(len(best)), best].astype(np.float32)


def label_masks_by_crops(image: np.ndarray, masks: np.ndarray, clip: Clip, text: torch.Tensor,
                         class_ids: np.ndarray, batch_size: int = 32, p_mf: np.ndarray | None = None,
                         seen: np.ndarray | None = None, weight: float = 0.8) -> tuple[np.ndarray, np.ndarray]:
    """ZSSeg stage C labelling: CLIP image embedding of each masked crop vs the present classes, optionally
    ensembled with another classifier's probabilities (`pipeline.methods.zsseg_crops`).

    Each `mask_crop` (fill = CLIP's mean colour) is resized to CLIP's square input side (bicubic; 224 for
    ViT-B/16), normalised, encoded; p_CLIP = softmax over the K classes of 100 * cos against the text features
    (hand-written templates, or ZSSeg's learned prompts). With `p_mf`, the λ ensemble: seen classes
    p_MF^λ · p_CLIP^(1-λ), unseen p_MF^(1-λ) · p_CLIP^λ (λ = `weight`; <= 0 = CLIP only).

    Args:
        image: uint8 [H, W, 3] RGB.
        masks: bool [N, H, W], each non-empty.
        clip: the CLIP wrapper.
        text: float [K, D] text features of the present classes.
        class_ids: int [K] their train ids.
        batch_size: crops per image-encoder call (does not change results).
        p_mf: float [N, K] the trained model's mask-averaged probabilities of those classes, or None.
        seen: bool [K] seen flags of those classes (needed with `p_mf`).
        weight: λ.

    Returns:
        (int64 [N] train ids, float32 [N] the chosen class's (ensembled) probability).
    """
    prob = crop_probabilities(clip, image, masks, text, 100.0, batch_size)
    if p_mf is not None:
        prob = ensemble(prob, p_mf, np.asarray(seen, dtype=bool), weight)
    best = np.argmax(prob, axis=1)
    return np.asarray(class_ids, dtype=np.int64)[best], prob[np.arange(len(best)), best].astype(np.float32)


def keep_automatic_mask(record: dict[str, Any], min_area: int, min_predicted_iou: float) -> bool:
    """Seifi et al.'s stage 1.2 filter on one SAM automatic-mask record (``area`` pixels, ``predicted_iou``)."""
    return record["area"] >= min_area and record["predicted_iou"] >= min_predicted_iou


def labelled_automatic_masks(records: Sequence[dict[str, Any]], masks: np.ndarray,
                             class_ids: np.ndarray) -> list[LabelledMask]:
    """Stage 1.2's masks: each kept automatic mask with its class; its score is SAM's predicted IoU, its RLE SAM's.

    Args:
        records: SAM automatic-mask records (``segmentation`` COCO RLE, ``predicted_iou``).
        masks: bool [N, H, W], the records' masks decoded.
        class_ids: int [N] the class each mask was labelled with.
    """
    return [LabelledMask(mask, int(class_id), float(record["predicted_iou"]), "stage12", record["segmentation"])
            for mask, class_id, record in zip(masks, class_ids, records, strict=True)]


def producers_to_run(mode: str, num_present: int, has_ground_truth: bool) -> tuple[bool, bool]:
    """Whether stage 1.1 and stage 1.2 run on an image: when a class is present and `mode` uses them, and both
    whenever the image has ground truth (so the quality report compares 1.1, 1.2 and the merge)."""
    run11 = num_present > 0 and (mode != "stage12" or has_ground_truth)
    run12 = num_present > 0 and (mode != "stage11" or has_ground_truth)
    return run11, run12


def label_map_masks(mode: str, stage11: list[LabelledMask],
                    stage12: list[LabelledMask]) -> tuple[list[LabelledMask], list[LabelledMask]]:
    """The (stage 1.1, stage 1.2) masks that make the label map under `mode` (the other producer's are dropped)."""
    return {"stage11": (stage11, []), "stage12": ([], stage12), "both": (stage11, stage12)}[mode]


def paint(masks: Sequence[LabelledMask], hw: tuple[int, int], ignore_index: int,
          dtype: type[np.unsignedinteger] = np.uint8) -> tuple[np.ndarray, np.ndarray]:
    """Label map of overlapping masks where each pixel takes the highest-scoring mask (the first on ties).

    Returns:
        (label [H, W] `dtype`, ignore_index where no mask; score float64 [H, W], -inf where no mask).
    """
    label = np.full(hw, ignore_index, dtype=dtype)
    best = np.full(hw, -np.inf)
    for item in masks:
        wins = item.mask & (item.score > best)
        label[wins] = item.category_id
        best[wins] = item.score
    return label, best


def merge(stage11: Sequence[LabelledMask], stage12: Sequence[LabelledMask], hw: tuple[int, int], policy: str,
          ignore_index: int = 255, dtype: type[np.unsignedinteger] = np.uint8) -> np.ndarray:
    """Combine stage 1.1 and stage 1.2 masks into one label map.

    Args:
        stage11: point-prompted masks.
        stage12: labelled automatic masks.
        hw: (H, W) of the image.
        policy: ``stage11_first`` (1.1 wherever it labels, 1.2 on the rest) or ``highest_score`` (per pixel, the
            mask with the highest score of either producer; 1.1 first on ties).
        ignore_index: value of unlabelled pixels.
        dtype: label dtype (``vocab.label_dtype``).

    Returns:
        `dtype` [H, W] train ids, `ignore_index` where no mask covers the pixel.
    """
    if policy == "highest_score":
        return paint([*stage11, *stage12], hw, ignore_index, dtype)[0]
    if policy != "stage11_first":
        raise ValueError(f"merge policy must be one of {POLICIES}, got {policy!r}")
    first = paint(stage11, hw, ignore_index, dtype)[0]
    rest = paint(stage12, hw, ignore_index, dtype)[0]
    return np.where(first != ignore_index, first, rest).astype(dtype)


@dataclass
class PseudoLabels:
    """One image's result: present class ids, both producers' masks, the output label map, the masks it uses."""

    present: np.ndarray
    stage11: list[LabelledMask]
    stage12: list[LabelledMask]
    label: np.ndarray
    kept: list[LabelledMask]


