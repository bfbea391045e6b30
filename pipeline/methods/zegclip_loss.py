"""ZegCLIP non-mutually-exclusive loss (NEL): per-class sigmoid focal + dice (paper Eq. 4–6).

Follows the release (`SegLossPlus` / `SegPlusCriterion`), which differs from the paper's Eq. 4 in using the
RetinaNet focal form with α-weighting and in normalising by the number of GT masks in the batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor


def nel_loss(
    logits: Tensor,
    target: Tensor,
    class_ids_in_queries: Sequence[int] | Tensor,
    ignore_index: int = 255,
    focal_weight: float = 100.0,
    dice_weight: float = 1.0,
    alpha: float = 0.25,
    gamma: float = 2.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Focal + dice loss over independent per-class sigmoids.

    Query j is the binary mask `target == class_ids_in_queries[j]`. Pixels whose label is `ignore_index`, or a
    class that is not among the queries, are negatives for every query in both terms (they are not masked out):
    in inductive training this pushes seen-class scores down on unseen-class pixels (methods-spec §4.2).

    * focal: BCE-with-logits · (1 − p_t)^γ · α_t, α_t = α on positives and 1 − α on negatives, averaged over the
      pixels of each (image, query) pair, summed over all pairs, divided by `num_masks`.
    * dice: 1 − (2 Σ p·y + 1) / (Σ p + Σ y + 1) for the (image, query) pairs whose class is present in that image,
      summed and divided by `num_masks`.
    * num_masks: number of (image, present query class) pairs in the batch (the release's count of GT masks). Under
      an initialised torch.distributed group it is summed over ranks and divided by the world size; min 1.

    Args:
        logits: float [B, M, h, w] mask logits; bilinearly resized (align_corners=False) to the target size first
            when the sizes differ, as the release does.
        target: int64 [B, H, W] labels in the same id space as `class_ids_in_queries`.
        class_ids_in_queries: M label ids, one per query channel.
        ignore_index: label of unlabeled pixels.
        focal_weight: weight of the focal term (100 in the zero-shot configs, 20 in VOC transductive).
        dice_weight: weight of the dice term.
        alpha: focal α.
        gamma: focal γ.

    Returns:
        loss: scalar, focal_weight · focal + dice_weight · dice.
        parts: detached scalars {"focal", "dice"} (unweighted) and {"num_masks"}.
    """
    if logits.shape[-2:] != target.shape[-2:]:
        logits = F.interpolate(logits, size=target.shape[-2:], mode="bilinear", align_corners=False)
    class_ids = torch.as_tensor(class_ids_in_queries, device=target.device, dtype=target.dtype)
    positives = (target.unsqueeze(1) == class_ids.view(1, -1, 1, 1)) & (target.unsqueeze(1) != ignore_index)
    positives = positives.flatten(2).to(logits.dtype)
    flat_logits = logits.flatten(2)
    present = positives.amax(dim=-1) > 0
    num_masks = _global_mask_count(present, logits.device)
    focal = _sigmoid_focal(flat_logits, positives, alpha, gamma).mean(dim=-1).sum() / num_masks
    dice = (_dice(flat_logits, positives) * present).sum() / num_masks
    loss = focal_weight * focal + dice_weight * dice
    parts = {"focal": focal.detach(), "dice": dice.detach(), "num_masks": torch.tensor(num_masks)}
    return loss, parts


def _sigmoid_focal(logits: Tensor, positives: Tensor, alpha: float, gamma: float) -> Tensor:
    """Element-wise α-balanced focal loss (RetinaNet form); same shape as `logits`."""
    bce = F.binary_cross_entropy_with_logits(logits, positives, reduction="none")
    prob = logits.sigmoid()
    p_t = prob * positives + (1 - prob) * (1 - positives)
    loss = bce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = (alpha * positives + (1 - alpha) * (1 - positives)) * loss
    return loss


def _dice(logits: Tensor, positives: Tensor) -> Tensor:
    """Smoothed dice loss per (image, query) over the last (pixel) axis: float [B, M]."""
    prob = logits.sigmoid()
    numerator = 2 * (prob * positives).sum(-1)
    denominator = prob.sum(-1) + positives.sum(-1)
    return 1 - (numerator + 1) / (denominator + 1)


def _global_mask_count(present: Tensor, device: torch.device) -> float:
    """Number of (image, class) masks, averaged over distributed ranks when a group is initialised; min 1."""
    count = present.sum().to(device=device, dtype=torch.float32)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(count)
        count = count / dist.get_world_size()
    return max(float(count.item()), 1.0)
