"""Alignment module with TSupCon (Seifi et al., "FMbSeg" stage 2; paper 003 Eq. 1-4, methods-spec §3.2).

A small module M maps frozen self-supervised patch features (DINOv2) into the frozen CLIP text space; it is
trained with TSupCon on patch pseudo-labels voted from the stage-1 CLIP+SAM label maps. At test time a patch's
class scores are its cosine similarities with the text prototypes of any vocabulary (open vocabulary).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.methods.blocks import TransformerBlock, flatten_tokens, unflatten_tokens
from pipeline.methods.configs import AlignConfig
from pipeline.methods.tsupcon import tsupcon_loss

__all__ = ["AlignConfig", "AlignMethod", "AlignmentModule", "patch_labels", "tsupcon_loss"]

HEADS = ("transformer", "mlp", "linear")


class AlignmentModule(nn.Module):
    """Patch features [B, F, h, w] -> L2-normalised embeddings z [B, D, h, w] in the CLIP text space.

    Heads (the paper's Table 2 ablation):
      * "transformer" (paper's choice): one pre-norm block at width F (MHSA across the image's h*w patches, then an
        MLP of hidden width F*mlp_ratio) followed by Linear(F, D). No position embedding is added: the DINOv2
        patch features already carry position information and the paper mentions none [our choice].
      * "mlp": Linear(F, F*mlp_ratio) - GELU - Linear(F*mlp_ratio, D).
      * "linear": Linear(F, D).

    Args:
        in_dim: F, the backbone feature width (DINOv2 ViT-L/14: 1024).
        out_dim: D, the CLIP text embedding width (CLIP ViT-L/14: 768).
        head: "transformer", "mlp" or "linear".
        heads: attention heads of the transformer block (F must be divisible by it).
        mlp_ratio: hidden width / F of the block's MLP and of the "mlp" head.
        dropout: dropout inside the transformer block.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        head: str = "transformer",
        heads: int = 16,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if head not in HEADS:
            raise ValueError(f"align head must be one of {HEADS}, got {head!r}")
        self.head = head
        self.block = TransformerBlock(in_dim, heads, mlp_ratio, dropout) if head == "transformer" else None
        if head == "mlp":
            hidden = round(in_dim * mlp_ratio)
            self.proj: nn.Module = nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, out_dim))
        else:
            self.proj = nn.Linear(in_dim, out_dim)

    def forward(self, features: Tensor) -> Tensor:
        """Args: features: float [B, F, h, w]. Returns: float [B, D, h, w], unit norm over D."""
        _, _, height, width = features.shape
        tokens = flatten_tokens(features.float())  # [B, h*w, F]
        if self.block is not None:
            tokens = self.block(tokens)
        return unflatten_tokens(F.normalize(self.proj(tokens), dim=-1), height, width)


def patch_labels(
    label_map: np.ndarray | Tensor, grid_hw: tuple[int, int], ignore_index: int = 255, min_fraction: float = 0.5
) -> Tensor:
    """Vote one label per patch cell of an h x w grid laid over an H x W pixel label map.

    Pixel (y, x) belongs to cell (floor(y * h / H), floor(x * w / W)); when H, W are multiples of h, w (e.g.
    DINOv2 inputs of 14 px patches) these are exactly the patches. Rule [inferred, §6.2 item 3]: the winner is the
    most frequent non-ignore label in the cell (ties -> smallest id); the cell gets the winner iff
    count(winner) >= min_fraction * (all pixels of the cell, ignore pixels included), else `ignore_index`. So a
    cell that is mostly ignore, or split with no dominant class, is ignored; empty cells (H < h) are ignored.

    Args:
        label_map: integer [H, W] class ids (numpy or torch, any device), `ignore_index` = unlabeled.
        grid_hw: (h, w) patch grid.
        ignore_index: unlabeled id in the input and the output (255, or 65535 for uint16 maps).
        min_fraction: minimum share of the cell the winner must cover, in [0, 1].

    Returns:
        int64 [h, w] patch labels on the CPU.
    """
    labels = label_map.detach().cpu().numpy() if isinstance(label_map, Tensor) else np.asarray(label_map)
    labels = labels.astype(np.int64)
    height, width = labels.shape
    grid_h, grid_w = grid_hw
    cell = (np.arange(height) * grid_h // height)[:, None] * grid_w + (np.arange(width) * grid_w // width)[None, :]
    cell_pixels = np.bincount(cell.ravel(), minlength=grid_h * grid_w)
    out = np.full(grid_h * grid_w, ignore_index, dtype=np.int64)
    valid = labels != ignore_index
    if valid.any():
        stride = int(labels[valid].max()) + 1
        pairs, counts = np.unique(cell[valid] * stride + labels[valid], return_counts=True)
        cells, classes = pairs // stride, pairs % stride
        order = np.lexsort((classes, -counts, cells))  # by cell, then count descending, then id ascending
        first = order[np.unique(cells[order], return_index=True)[1]]
        keep = counts[first] >= min_fraction * cell_pixels[cells[first]]
        out[cells[first][keep]] = classes[first][keep]
    return torch.from_numpy(out.reshape(grid_h, grid_w))


class AlignMethod:
    """Trainer-facing alignment module + TSupCon.

    Args:
        cfg: the knobs.
        text_embeddings: float [K, D] text prototypes of the K training classes (single template "a photo of a
            {name}" in the paper), class id k = row k; L2-normalised here. Frozen.
        in_dim: F, the frozen backbone's patch-feature width.
        ignore_index: the unlabelled id of the label maps and of the patch labels: the vocabulary's (255 for uint8
            maps, 65535 for vocabularies of more than 255 classes).
    """

    Config = AlignConfig

    def __init__(self, cfg: AlignConfig, text_embeddings: Tensor, in_dim: int, ignore_index: int = 255) -> None:
        if text_embeddings.ndim != 2:
            raise ValueError(f"text_embeddings must be [K, D], got {tuple(text_embeddings.shape)}")
        self.cfg = cfg
        self.in_dim = in_dim
        self.ignore_index = ignore_index
        self.text_embeddings = F.normalize(text_embeddings.detach().float(), dim=-1)

    def build_model(self) -> AlignmentModule:
        """Fresh alignment module F -> D (the only trainable part)."""
        c = self.cfg
        return AlignmentModule(self.in_dim, self.text_embeddings.shape[1], c.head, c.heads, c.mlp_ratio, c.dropout)

    def param_groups(self, model: nn.Module) -> list[dict]:
        """One group with every trainable parameter of the module."""
        params = [p for p in model.parameters() if p.requires_grad]
        return [{"params": params, "lr": self.cfg.lr, "weight_decay": self.cfg.weight_decay}]

    def build_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        """SGD with the configured momentum over `param_groups(model)`."""
        return torch.optim.SGD(self.param_groups(model), momentum=self.cfg.momentum)

    def patch_targets(self, label_maps: Tensor, grid_hw: tuple[int, int]) -> Tensor:
        """Patch labels of a batch: int [B, H, W] label maps -> int64 [B, h, w] (`patch_labels` with this method's
        `min_fraction` and ignore id), on the CPU."""
        return torch.stack([patch_labels(label, grid_hw, self.ignore_index, self.cfg.min_fraction)
                            for label in label_maps])

    def loss(self, model: nn.Module, batch: dict) -> tuple[Tensor, dict[str, float]]:
        """TSupCon (or, with ``loss: text_ce``, prototype cross-entropy) over all labelled patches of the batch.

        Args:
            model: the alignment module (possibly wrapped; only called).
            batch: {"features": float [B, F, h, w] frozen backbone patch features,
                    "patch_labels": int64 [B, h, w] class ids in [0, K) or `ignore_index`}.

        Returns:
            (scalar loss, {"loss", "patch_acc" (argmax over the K prototypes), "valid_patches"}).
        """
        z = flatten_tokens(model(batch["features"])).flatten(0, 1)  # [B*h*w, D]
        labels = batch["patch_labels"].to(z.device).flatten()
        valid = labels != self.ignore_index
        z, labels = z[valid], labels[valid]
        prototypes = self.text_embeddings.to(z.device)
        similarity = z @ prototypes.T  # [N, K]
        if self.cfg.loss == "text_ce":
            loss = F.cross_entropy(similarity / self.cfg.temperature, labels) if len(labels) else z.sum() * 0.0
        else:
            loss = tsupcon_loss(z, labels, prototypes, self.cfg.temperature, self.cfg.include_self_positive,
                                self.cfg.count_absent_classes)
        accuracy = similarity.detach().argmax(dim=1).eq(labels).float().mean().item() if len(labels) else 0.0
        return loss, {"loss": loss.item(), "patch_acc": accuracy, "valid_patches": float(len(labels))}

    def predict_logits(self, model: nn.Module, features: Tensor) -> Tensor:
        """Cosine similarities with the prototypes.

        Args:
            features: float [B, F, h, w] frozen backbone patch features.

        Returns:
            float [B, K, h, w] in [-1, 1]; the eval engine interpolates them to image size and takes the argmax.
        """
        z = model(features)
        return torch.einsum("bdhw,kd->bkhw", z, self.text_embeddings.to(z.device))
