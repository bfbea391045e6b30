"""Pseudo-label policies of self-training, as named modes (methods-spec §6.2 item 4), on numpy arrays.

Every policy turns a model's per-class scores of one image into a label map of train ids. They differ in which
pixels receive a pseudo-label, which classes compete there, and whether ground truth is read:

    ===============  ==========================================  ====================  ==========
    policy           pseudo-labelled pixels                      competing classes     reads GT
    ===============  ==========================================  ====================  ==========
    maskclip_plus    GT is an unseen class                       unseen                yes
    zsseg_st         GT is not a seen class (unseen GT and 255)  unseen                yes
    all_pixels       every pixel                                 all                   no
    ===============  ==========================================  ====================  ==========

In the GT-reading policies, pixels whose GT is a seen class keep their GT. Mixing the first two silently moves
hIoU by points (ZegCLIP COCO: "+ST" 46.6 vs "†ST" 48.4), hence the names.

Confidence threshold (all policies): a pixel whose winning score is below `threshold` becomes ignore. The
winning score is the candidate class's score exactly as given, NOT renormalised over the candidate classes:
with softmax scores this is ZSSeg's ``max(softmax(s) · (1 − seen_flag)) < PSEUDO_REJECT_THRESHOLD``
(`GeneralizedPseudoSemSegEvaluator`); with sigmoid scores it is ZegCLIP's per-class sigmoid. MaskCLIP+ and
ZegCLIP use no threshold; the default 0.0 rejects nothing, which reproduces them and ZSSeg's default.

Ties between candidate classes go to the lowest train id (numpy argmax over candidates in id order).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Literal, get_args

import numpy as np

Policy = Literal["maskclip_plus", "zsseg_st", "all_pixels"]
POLICIES: tuple[str, ...] = get_args(Policy)
GT_POLICIES = ("maskclip_plus", "zsseg_st")
DEFAULT_EVAL_SPLITS = ("val", "validation", "test")


def restricted_argmax(scores: np.ndarray, candidate_ids: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Best class among `candidate_ids` per pixel, and its score.

    A running maximum over the candidates' [H, W] planes in id order (strict `>`, so ties keep the lower id):
    the same result as `argmax` over the candidate sub-array, without copying it and without numpy's slow
    strided reduction over the leading axis.

    Args:
        scores: [C, H, W] float per-class scores (probabilities for a meaningful threshold).
        candidate_ids: train ids allowed to win (non-empty, each in [0, C)).

    Returns:
        ([H, W] int64 winning train ids, [H, W] float winning scores, not renormalised).
    """
    ids = sorted({int(i) for i in candidate_ids})
    if not ids:
        raise ValueError("restricted_argmax needs at least one candidate class")
    if ids[0] < 0 or ids[-1] >= scores.shape[0]:
        raise ValueError(f"candidate ids {ids} outside [0, {scores.shape[0]})")
    best = scores[ids[0]].copy()
    winner = np.full(best.shape, ids[0], dtype=np.int64)
    for class_id in ids[1:]:
        better = scores[class_id] > best
        np.copyto(best, scores[class_id], where=better)
        winner[better] = class_id
    return winner, best


def _check(scores: np.ndarray, gt: np.ndarray) -> None:
    if scores.ndim != 3 or gt.ndim != 2 or scores.shape[1:] != gt.shape:
        raise ValueError(f"need scores [C, H, W] and gt [H, W] of the same H, W; got {scores.shape} and {gt.shape}")


def _keep_seen_gt(gt: np.ndarray, seen_ids: Sequence[int], ignore_index: int) -> np.ndarray:
    """A label map holding the GT on seen-class pixels and `ignore_index` elsewhere."""
    seen_mask = np.isin(gt, np.asarray(seen_ids, dtype=np.int64))
    label = np.full(gt.shape, ignore_index, dtype=gt.dtype)
    label[seen_mask] = gt[seen_mask]
    return label


def targets_maskclip_plus(gt: np.ndarray, unseen_ids: Sequence[int]) -> np.ndarray:
    """[H, W] bool: the pixels `maskclip_plus` pseudo-labels, those whose GT is an unseen class."""
    return np.isin(gt, np.asarray(unseen_ids, dtype=np.int64))


def targets_zsseg_st(gt: np.ndarray, seen_ids: Sequence[int]) -> np.ndarray:
    """[H, W] bool: the pixels `zsseg_st` pseudo-labels, those whose GT is not a seen class (unseen and 255)."""
    return ~np.isin(gt, np.asarray(seen_ids, dtype=np.int64))


def _fill(label: np.ndarray, target: np.ndarray, scores: np.ndarray, candidate_ids: Sequence[int],
          threshold: float) -> np.ndarray:
    """Write the restricted argmax into the `target` pixels of `label` whose winning score >= `threshold`."""
    winner, confidence = restricted_argmax(scores, candidate_ids)
    accept = target & (confidence >= threshold)
    label[accept] = winner[accept].astype(label.dtype)
    return label


def policy_maskclip_plus(scores: np.ndarray, gt: np.ndarray, seen_ids: Sequence[int], unseen_ids: Sequence[int],
                         ignore_index: int = 255, threshold: float = 0.0) -> np.ndarray:
    """MaskCLIP+ / ZegCLIP "†ST" transductive labels: pseudo-labels only where the GT is an unseen class.

    Sources: MaskCLIP+ `maskclip_plus_head.py::assign_label` (unseen GT suppressed to −1 by
    `LoadAnnotations(suppress_labels=…)`, then argmax over the unseen text embeddings, conf_thresh 0); ZegCLIP
    `…_st.py` configs (seen scores set to −1, argmax written only into unseen-GT pixels; paper Table 2 "†").
    IFSeg+ (IFSeg Table 9) follows this recipe. Methods-spec §1.7, §4.3, §6.2.

    Args:
        scores: [C, H, W] float per-class scores at the GT's resolution.
        gt: [H, W] integer train ids, `ignore_index` = unlabelled.
        seen_ids: train ids of the seen classes (their GT is kept).
        unseen_ids: train ids of the unseen classes (the only candidates; non-empty).
        ignore_index: label value of ignored pixels (255 for uint8 maps, 65535 for uint16).
        threshold: unseen-GT pixels whose winning score is below it stay ignore (see the module docstring).

    Returns:
        [H, W] label map, gt's dtype: seen GT kept, unseen-GT pixels pseudo-labelled, everything else
        (GT ignore included) `ignore_index`.
    """
    _check(scores, gt)
    label = _keep_seen_gt(gt, seen_ids, ignore_index)
    return _fill(label, targets_maskclip_plus(gt, unseen_ids), scores, unseen_ids, threshold)


def policy_zsseg_st(scores: np.ndarray, gt: np.ndarray, seen_ids: Sequence[int], unseen_ids: Sequence[int],
                    ignore_index: int = 255, threshold: float = 0.0) -> np.ndarray:
    """ZSSeg+ST labels: every pixel not covered by seen GT (unseen GT and unlabelled) gets an unseen label.

    Source: ZSSeg `mask_former/evaluation/pseudo_sem_seg_evaluation.py::GeneralizedPseudoSemSegEvaluator`
    (`PSEUDO=True`, `PSEUDO_WITH_PRIOR=True`): ``p = softmax(scores) · (1 − trainable_flag)``, argmax, pixels with
    ``max p < PSEUDO_REJECT_THRESHOLD`` (default 0.0) → ignore, then seen-GT pixels overwritten with GT
    (maintainer's answer in ZSSeg issue #18). Methods-spec §2.2, §6.2.

    Args:
        scores: [C, H, W] float per-class scores (softmax probabilities in ZSSeg) at the GT's resolution.
        gt: [H, W] integer train ids, `ignore_index` = unlabelled.
        seen_ids: train ids of the seen classes (their GT is kept).
        unseen_ids: train ids of the unseen classes (the only candidates; non-empty).
        ignore_index: label value of ignored pixels.
        threshold: pixels whose winning unseen score is below it become ignore.

    Returns:
        [H, W] label map, gt's dtype.
    """
    _check(scores, gt)
    label = _keep_seen_gt(gt, seen_ids, ignore_index)
    return _fill(label, targets_zsseg_st(gt, seen_ids), scores, unseen_ids, threshold)


def policy_all_pixels(scores: np.ndarray, threshold: float = 0.0, ignore_index: int = 255,
                      dtype: type[np.integer] = np.uint8) -> np.ndarray:
    """Image-only pseudo-labels (IFSeg Table 4 "pseudo-labels only", Table 7): argmax over all classes everywhere.

    No ground truth is read. The threshold is not given by IFSeg ("unknown" in methods-spec §6.2); 0.0 keeps
    every pixel.

    Args:
        scores: [C, H, W] float per-class scores.
        threshold: pixels whose winning score is below it become `ignore_index`.
        ignore_index: label value of ignored pixels.
        dtype: label dtype (uint8, or uint16 for vocabularies of more than 255 classes).

    Returns:
        [H, W] label map of `dtype`.
    """
    if scores.ndim != 3:
        raise ValueError(f"need scores [C, H, W], got {scores.shape}")
    label = np.full(scores.shape[1:], ignore_index, dtype=dtype)
    return _fill(label, np.ones(label.shape, dtype=bool), scores, range(scores.shape[0]), threshold)


def pseudo_label(policy: Policy, scores: np.ndarray, gt: np.ndarray | None, seen_ids: Sequence[int],
                 unseen_ids: Sequence[int], ignore_index: int, threshold: float, dtype: type[np.integer]
                 ) -> tuple[np.ndarray, np.ndarray]:
    """One image's labels under the named policy, and the pixels the policy asked the model to label.

    Args:
        policy: one of POLICIES.
        scores: [C, H, W] float per-class scores.
        gt: [H, W] integer train ids (read by GT_POLICIES only; None allowed for `all_pixels`).
        seen_ids, unseen_ids: the vocabulary's split.
        ignore_index: label value of ignored pixels.
        threshold: see the module docstring.
        dtype: label dtype (uint8, or uint16 for vocabularies of more than 255 classes).

    Returns:
        ([H, W] label map of `dtype`, [H, W] bool target pixels, before the threshold).
    """
    if policy == "all_pixels":
        return policy_all_pixels(scores, threshold, ignore_index, dtype), np.ones(scores.shape[1:], dtype=bool)
    gt = gt.astype(dtype, copy=False)
    if policy == "maskclip_plus":
        label = policy_maskclip_plus(scores, gt, seen_ids, unseen_ids, ignore_index, threshold)
        return label, targets_maskclip_plus(gt, unseen_ids)
    label = policy_zsseg_st(scores, gt, seen_ids, unseen_ids, ignore_index, threshold)
    return label, targets_zsseg_st(gt, seen_ids)


def is_eval_split(split: str | None, eval_splits: Sequence[str] = DEFAULT_EVAL_SPLITS) -> bool:
    """Whether `split` names an evaluation split: case-insensitive, ignoring a trailing year ("val2017" → "val").

    None (an adapter without a split, e.g. a plain image folder) is not an evaluation split.
    """
    if split is None:
        return False
    name = str(split).strip().lower()
    names = {s.strip().lower() for s in eval_splits}
    return name in names or re.sub(r"[-_]?\d+$", "", name) in names
