"""TSupCon, the text-prototype supervised contrastive loss of Seifi et al. (paper 003, Eq. 1-4)."""

from __future__ import annotations

import torch
from torch import Tensor


def tsupcon_loss(
    z: Tensor,
    y: Tensor,
    t: Tensor,
    temperature: float = 1.0,
    include_self_positive: bool = True,
    count_absent_classes: bool = True,
) -> Tensor:
    """ℓ_TSupCon = 1 / (B·N + K) · (Σ_k ℓ_t(t_k) + Σ_i ℓ_im(z_i)), Eq. 1-4 of Seifi et al., vectorised.

    With s(a, b) = aᵀb / temperature:
      ℓ_t(t_k)  = 1/N_k Σ_{i: y_i = k} [ −s(z_i, t_k) + log( Σ_{k'} exp s(z_i, t_k') + Σ_{j≠i} exp s(z_i, z_j) ) ]
      ℓ_im(z_i) = 1/|P(i)| Σ_{l ∈ P(i)} [ −s(z_i, z_l) + log Σ_{j≠i} exp s(z_i, z_j) ]

    Choices where the paper is silent or ambiguous (documented, methods-spec §3.2 flags):
      * B·N is the number of *labelled* patches in the batch (ignored patches are dropped before the call; the
        paper assumes every patch is labelled). The K text prototypes in the ℓ_t denominator are all K rows of `t`.
      * Classes with N_k = 0 have no ℓ_t term (1/N_k · empty sum is undefined). The normaliser's K counts all K
        rows of `t` (default, `count_absent_classes=True`: the paper's "K is the number of text features"), or
        only the classes present in the batch with `count_absent_classes=False` (the loss is then the mean over
        the terms actually summed; a variant, not the paper).
      * P(i) = {l : y_l = y_i}, which includes l = i exactly as Eq. 4 is written (N_{y_i} counts i); with
        `include_self_positive=False` it is {l ≠ i : y_l = y_i} (standard SupCon) and the factor is 1/(N_{y_i} − 1).
        A patch with an empty P(i), or with no other patch in the batch (N = 1), contributes 0 to Σ ℓ_im but still
        counts in B·N.
      * No temperature in the paper, hence the default 1.0.

    Args:
        z: float [N, D] L2-normalised patch embeddings of all labelled patches of the batch.
        y: int64 [N] their class ids in [0, K).
        t: float [K, D] L2-normalised text prototypes (frozen; gradients flow only if `t` requires them).
        temperature: divides every similarity.
        include_self_positive: keep l = i in the ℓ_im positive set (Eq. 4 as written).
        count_absent_classes: normalise by N + K, all K prototypes (default, Eq. 1), else by N + (classes
            present in `y`).

    Returns:
        Scalar float32 loss (0 with a graph to `z` when N = 0).
    """
    num_patches, num_classes = y.shape[0], t.shape[0]
    if num_patches == 0:
        return z.sum() * 0.0
    if int(y.min()) < 0 or int(y.max()) >= num_classes:
        raise ValueError(f"labels must lie in [0, {num_classes}), got {int(y.min())}..{int(y.max())}")
    z, t = z.float(), t.float()
    patch_text = z @ t.T / temperature  # [N, K]
    patch_patch = z @ z.T / temperature  # [N, N]
    is_self = torch.eye(num_patches, dtype=torch.bool, device=z.device)
    others = patch_patch.masked_fill(is_self, float("-inf"))
    class_count = torch.bincount(y, minlength=num_classes)  # N_k

    log_denominator = torch.logsumexp(torch.cat([patch_text, others], dim=1), dim=1)  # [N]
    per_patch_text = log_denominator - patch_text.gather(1, y[:, None]).squeeze(1)
    text_term = (per_patch_text / class_count[y]).sum()  # Σ over present k of ℓ_t(t_k)

    image_term = z.new_zeros(())
    if num_patches > 1:
        positives = y[:, None] == y[None, :]
        if not include_self_positive:
            positives = positives & ~is_self
        num_positives = positives.sum(dim=1)
        positive_sim = (patch_patch * positives).sum(dim=1) / num_positives.clamp_min(1)
        per_patch_image = torch.logsumexp(others, dim=1) - positive_sim
        image_term = torch.where(num_positives > 0, per_patch_image, 0.0).sum()

    classes = num_classes if count_absent_classes else int((class_count > 0).sum())
    return (text_term + image_term) / (num_patches + classes)
