"""IFSeg (image-free segmentation) ported to a dual-encoder CLIP (methods-spec §1.2-§1.5, §1.9, §6.1).

IFSeg trains a decoder on random *word grids*: each cell of a small U x V map holds a category id, the map is
nearest-upsampled to 32 x 32 tokens, each token is the category's text embedding, and the decoder must classify
every token against the same (frozen, tied) category embeddings. At test time the tokens are the image's dense
features. This port replaces OFA with CLIP [inferred, §1.9]:

* grid token = L2-normalised, prompt-ensembled CLIP text embedding of the cell's category;
* test token = CLIP dense patch feature (MaskCLIP value path), L2-normalised the same way;
* decoder = linear in-projection, learned 2-D position table, pre-norm transformer layers, each followed by a
  cross-attention to the vocabulary's category words (IFSeg's OFA decoder cross-attends to the encoder's
  contextualised image + prompt-word embeddings; the paper's ablation drops 55.6 -> 22.6 mIoU without it),
  out-projection back to the CLIP space, L2-normalisation, logits = logit_scale * cosine(out, text) against the
  frozen text embeddings.

Trainable: everything in `IFSegDecoder` except the text embeddings, which are a non-persistent buffer (the tied
classifier, never trained; checkpoints therefore hold no vocabulary and the classifier is rebuilt from it).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.methods.blocks import DropPath, TransformerBlock, drop_path_rates, flatten_tokens, unflatten_tokens
from pipeline.methods.configs import IFSegConfig


def grid_tokens(grid: Tensor, size: int = 32) -> Tensor:
    """Nearest-upsample a word grid to `size` x `size`, exactly like torchvision `Resize((size, size), NEAREST)`.

    Source index for output pixel o along an axis of input length n: min(floor(o * n / size), n - 1), which is
    what `torch.nn.functional.interpolate(mode="nearest")` (and hence torchvision on tensors) computes. Used for
    both the 32 x 32 input tokens and the 512 x 512 label map (methods-spec §1.3 items 3-4).

    Args:
        grid: integer [U, V] category ids (any integer dtype).
        size: output side length in cells.

    Returns:
        int64 [size, size] category ids on `grid`'s device.
    """
    if grid.ndim != 2:
        raise ValueError(f"grid must be 2-D [U, V], got shape {tuple(grid.shape)}")
    as_float = grid.to(torch.float64)[None, None]
    return F.interpolate(as_float, size=(size, size), mode="nearest")[0, 0].round().long()


def knn_postprocess(
    logits: Tensor, features: Tensor, k: int = 3, iterations: int = 25, temperature: float = 1.0
) -> Tensor:
    """IFSeg test-time K-NN label propagation over backbone-feature neighbours (methods-spec §1.5).

    p = softmax(logits / temperature) over classes; the K nearest tokens of each token (cosine similarity of
    L2-normalised backbone features) form N(i), **self always included** (the diagonal is forced to the top, so
    duplicate features cannot push a token out of its own neighbourhood; the official `topk` relies on the
    self-similarity of 1 and is identical except under exact ties); then `iterations` rounds of
    p_i <- mean_{j in N(i)} p_j. k = 1 or iterations = 0 returns the softmax unchanged.

    Args:
        logits: float [B, M, h, w] class logits (pre-softmax).
        features: float [B, F, h, w] backbone features on the same token grid.
        k: neighbourhood size including self (default 3 = self + 2 others).
        iterations: propagation rounds (default 25).
        temperature: softmax temperature T (default 1.0).

    Returns:
        float [B, M, h, w] propagated class probabilities (each token sums to 1). Upsample and argmax outside.
    """
    batch, classes, height, width = logits.shape
    if features.shape[0] != batch or features.shape[-2:] != logits.shape[-2:]:
        raise ValueError(f"features {tuple(features.shape)} do not match logits {tuple(logits.shape)} on B, h, w")
    with torch.no_grad():
        tokens = F.normalize(flatten_tokens(features.float()), dim=-1)  # [B, L, F]
        similarity = tokens @ tokens.transpose(1, 2)  # [B, L, L]
        similarity.diagonal(dim1=1, dim2=2).fill_(math.inf)
        neighbours = similarity.topk(min(k, height * width), dim=-1).indices  # [B, L, k]
    probs = flatten_tokens(torch.softmax(logits.float() / temperature, dim=1))  # [B, L, M]
    batch_index = torch.arange(batch, device=logits.device)[:, None, None]
    for _ in range(iterations):
        probs = probs[batch_index, neighbours].mean(dim=2)  # [B, L, k, M] -> [B, L, M]
    return unflatten_tokens(probs, height, width)


class WordCrossAttention(nn.Module):
    """Pre-norm cross-attention of the tokens to the category words: x + DropPath(Dropout(MHA(LN(x), w, w))).

    Args:
        width: token width W (words are already projected to it).
        heads: attention heads.
        dropout: dropout on the attention output.
        attn_dropout: dropout on the attention weights.
        drop_path: stochastic-depth rate of the residual branch.
    """

    def __init__(self, width: int, heads: int, dropout: float = 0.0, attn_dropout: float = 0.0,
                 drop_path: float = 0.0) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, dropout=attn_dropout, batch_first=True)
        self.drop = nn.Dropout(dropout)
        self.drop_path = DropPath(drop_path)

    def forward(self, tokens: Tensor, words: Tensor) -> Tensor:
        """Args: tokens: float [B, L, W]; words: float [B, M, W]. Returns: float [B, L, W]."""
        attended, _ = self.attn(self.norm(tokens), words, words, need_weights=False)
        return tokens + self.drop_path(self.drop(attended))


class IFSegDecoder(nn.Module):
    """Token decoder of the CLIP port of IFSeg: [B, D, h, w] tokens -> [B, M, h, w] logits.

    Pipeline: L2-normalise tokens over D (grid text tokens already are; CLIP patch features are brought to the
    same scale) -> Linear(D, width) -> + 2-D position embedding (a `pos_grid` x `pos_grid` table bilinearly
    interpolated, align_corners=False, to h x w, as IFSeg/OFA do for non-32 grids; normal init with std
    width**-0.5 like IFSeg's fresh seg-position table) -> dropout -> `depth` pre-norm transformer layers with
    drop-path rising linearly to `drop_path`, each followed (when `word_cross_attention`) by a `WordCrossAttention`
    to the M category words (the frozen text embeddings through the same in-projection, then a LayerNorm; the
    same words for every image, rebuilt for any vocabulary, so the decoder stays open-vocabulary) -> LayerNorm ->
    Linear(width, D) -> L2-normalise -> logit_scale * <out, text_m>. `logit_scale` is a fixed constant (default
    100, CLIP's trained value).

    Args:
        text_embeddings: float [M, D] L2-normalised category embeddings (frozen classifier, stored as buffer).
        width: transformer width W.
        depth: number of transformer layers.
        heads: attention heads.
        mlp_ratio: MLP hidden width / W.
        dropout: dropout on embeddings, attention output and MLP (IFSeg: 0.1).
        attn_dropout: dropout on attention weights (IFSeg: 0.0).
        drop_path: maximum stochastic-depth rate (IFSeg: 0.1).
        pos_grid: side of the learned position table (IFSeg: 32 = 512 px / 16).
        logit_scale: multiplier of the cosine logits.
        word_cross_attention: cross-attend to the category words after every layer (IFSeg's decoder context).
    """

    def __init__(
        self,
        text_embeddings: Tensor,
        width: int = 512,
        depth: int = 6,
        heads: int = 8,
        mlp_ratio: float = 4.0,
        dropout: float = 0.1,
        attn_dropout: float = 0.0,
        drop_path: float = 0.1,
        pos_grid: int = 32,
        logit_scale: float = 100.0,
        word_cross_attention: bool = True,
    ) -> None:
        super().__init__()
        embed_dim = text_embeddings.shape[1]
        self.register_buffer("text_embeddings", F.normalize(text_embeddings.detach().float(), dim=-1), persistent=False)
        self.logit_scale = logit_scale
        self.in_proj = nn.Linear(embed_dim, width)
        self.pos_embed = nn.Parameter(torch.randn(1, width, pos_grid, pos_grid) * width**-0.5)
        self.embed_drop = nn.Dropout(dropout)
        rates = drop_path_rates(drop_path, depth)
        self.layers = nn.ModuleList(TransformerBlock(width, heads, mlp_ratio, dropout, attn_dropout, rate)
                                    for rate in rates)
        self.word_attn = nn.ModuleList(WordCrossAttention(width, heads, dropout, attn_dropout, rate)
                                       for rate in rates) if word_cross_attention else None
        self.word_norm = nn.LayerNorm(width) if word_cross_attention else None
        self.norm = nn.LayerNorm(width)
        self.out_proj = nn.Linear(width, embed_dim)

    def embed(self, tokens: Tensor) -> Tensor:
        """Args: tokens: float [B, D, h, w]. Returns: float [B, D, h, w] L2-normalised decoder outputs."""
        _, _, height, width = tokens.shape
        x = self.in_proj(F.normalize(flatten_tokens(tokens.float()), dim=-1))  # [B, L, W]
        pos = F.interpolate(self.pos_embed, size=(height, width), mode="bilinear", align_corners=False)
        x = self.embed_drop(x + flatten_tokens(pos))
        words = self.words(x.shape[0])
        for index, layer in enumerate(self.layers):
            x = layer(x)
            if words is not None:
                x = self.word_attn[index](x, words)
        out = F.normalize(self.out_proj(self.norm(x)), dim=-1)  # [B, L, D]
        return unflatten_tokens(out, height, width)

    def words(self, batch_size: int) -> Tensor | None:
        """The category words the tokens attend to: float [B, M, W] (LN(in_proj(text))), or None when off."""
        if self.word_attn is None:
            return None
        return self.word_norm(self.in_proj(self.text_embeddings)).unsqueeze(0).expand(batch_size, -1, -1)

    def forward(self, tokens: Tensor) -> Tensor:
        """Args: tokens: float [B, D, h, w]. Returns: float [B, M, h, w] logits against the frozen vocabulary."""
        return self.logit_scale * torch.einsum("bdhw,md->bmhw", self.embed(tokens), self.text_embeddings)


class IFSegMethod:
    """Trainer-facing IFSeg: word-grid training of an `IFSegDecoder`, dense-feature inference.

    Args:
        cfg: the knobs.
        text_embeddings: float [M, D] L2-normalised, prompt-ensembled CLIP text embeddings of the M categories,
            in vocabulary order (grid ids index its rows). Used both as grid tokens and as frozen classifier.
    """

    Config = IFSegConfig

    def __init__(self, cfg: IFSegConfig, text_embeddings: Tensor) -> None:
        if text_embeddings.ndim != 2:
            raise ValueError(f"text_embeddings must be [M, D], got {tuple(text_embeddings.shape)}")
        self.cfg = cfg
        self.text_embeddings = F.normalize(text_embeddings.detach().float(), dim=-1)

    def build_model(self) -> IFSegDecoder:
        """Fresh decoder with the frozen classifier installed."""
        c = self.cfg
        return IFSegDecoder(
            self.text_embeddings, c.width, c.depth, c.heads, c.mlp_ratio, c.dropout,
            c.attn_dropout, c.drop_path, c.pos_grid, c.logit_scale, c.word_cross_attention,
        )  # fmt: skip

    def param_groups(self, model: nn.Module) -> list[dict]:
        """One group of every trainable parameter (fairseq adam decays all of them, biases and norms included)."""
        params = [p for p in model.parameters() if p.requires_grad]
        return [{"params": params, "lr": self.cfg.lr, "weight_decay": self.cfg.weight_decay}]

    def build_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        """AdamW (decoupled weight decay, as fairseq `adam`) over `param_groups(model)`."""
        return torch.optim.AdamW(self.param_groups(model), betas=self.cfg.betas, eps=self.cfg.eps)

    def batch_tensors(self, grids: list[Tensor], device: torch.device) -> tuple[Tensor, Tensor]:
        """Word grids -> (tokens float [B, D, S, S], targets int64 [B, L, L]); S = grid_size, L = label_size."""
        ids = torch.stack([grid_tokens(g.to(device), self.cfg.grid_size) for g in grids])  # [B, S, S]
        if int(ids.min()) < 0 or int(ids.max()) >= self.text_embeddings.shape[0]:
            raise ValueError(f"grid ids must lie in [0, {self.text_embeddings.shape[0]}), got {ids.min()}..{ids.max()}")
        tokens = self.text_embeddings.to(device)[ids].permute(0, 3, 1, 2)
        targets = torch.stack([grid_tokens(g.to(device), self.cfg.label_size) for g in grids])
        return tokens, targets

    def loss(self, model: nn.Module, batch: dict) -> tuple[Tensor, dict[str, float]]:
        """Pixel CE of bilinearly upsampled logits against the nearest-upsampled grid (§1.3 item 4).

        As in IFSeg, tokens (grid_size) and labels (label_size) are separate nearest upsamplings of the grid, so
        cell borders differ by up to half a token between them: `pixel_acc` stays below 1 even for a perfect
        token classifier (set label_size = grid_size to score tokens).

        Args:
            model: the decoder (possibly wrapped, e.g. DDP; only called, never inspected).
            batch: {"grids": list of int [U, V] category-id maps}, sizes may differ per grid.

        Returns:
            (scalar loss, {"loss": float, "pixel_acc": float at label_size}).
        """
        device = next(model.parameters()).device
        tokens, targets = self.batch_tensors(batch["grids"], device)
        logits = model(tokens)  # [B, M, S, S]
        size = (self.cfg.label_size, self.cfg.label_size)
        logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
        loss = F.cross_entropy(logits, targets)
        with torch.no_grad():
            accuracy = (logits.argmax(dim=1) == targets).float().mean().item()
        return loss, {"loss": loss.item(), "pixel_acc": accuracy}

    def predict_logits(self, model: nn.Module, features: Tensor) -> Tensor:
        """Args: features: float [B, D, h, w] CLIP dense patch features. Returns: float [B, M, h, w] logits."""
        return model(features)

    def postprocess(self, logits: Tensor, backbone_features: Tensor) -> Tensor:
        """K-NN propagation with the configured knobs; image-free models only (§6.1 item 7). Returns probs."""
        c = self.cfg
        return knn_postprocess(logits, backbone_features, c.knn_k, c.knn_iterations, c.knn_temperature)
