"""ZegCLIP head: relationship-descriptor queries (paper Eq. 8) and the text-query→patch decoder (Eq. 1–2).

Mirrors the official `ATMSingleHeadSeg` with one stage and `use_proj=False`: the patch embeddings H enter the
decoder unprojected (the paper says both sides are projected; the release projects only the queries).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class RelationshipDescriptor(nn.Module):
    """Image-specific text queries q = Linear(2D → D)(concat[t ⊙ g, t]) (paper Eq. 8, official `get_qs`).

    Args:
        dim: embedding dimension D of text and image embeddings.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.q_proj = nn.Linear(2 * dim, dim)

    def forward(self, text_embeddings: Tensor, global_embedding: Tensor) -> Tensor:
        """Build the queries.

        Args:
            text_embeddings: float [M, D] class embeddings t.
            global_embedding: float [B, D] image embeddings g.

        Returns:
            float [B, M, D] queries.
        """
        text = text_embeddings.unsqueeze(0).expand(global_embedding.shape[0], -1, -1)
        relation = text * global_embedding.unsqueeze(1)
        return self.q_proj(torch.cat([relation, text], dim=-1))


class QueryPatchAttention(nn.Module):
    """Multi-head cross-attention (queries → patch tokens) that also returns its pre-softmax scores.

    Args:
        dim: model dimension d.
        num_heads: heads; d must be divisible by it.
        attn_dropout: dropout on the softmax weights (the returned scores are taken before it).
    """

    def __init__(self, dim: int, num_heads: int, attn_dropout: float = 0.1) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"decoder dim {dim} is not divisible by decoder_heads {num_heads}")
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.attn_drop = nn.Dropout(attn_dropout)
        self.proj = nn.Linear(dim, dim)

    def forward(self, queries: Tensor, memory: Tensor) -> tuple[Tensor, Tensor]:
        """Attend.

        Args:
            queries: float [B, M, d].
            memory: float [B, N, d] patch tokens.

        Returns:
            attended: float [B, M, d].
            scores: float [B, M, N], (q_h · k_h) / sqrt(d_h) averaged over heads, before softmax.
        """
        batch, num_queries, dim = queries.shape
        q = self._split(self.q(queries))
        k = self._split(self.k(memory))
        v = self._split(self.v(memory))
        logits = (q @ k.transpose(-2, -1)) * self.scale
        weights = self.attn_drop(logits.softmax(dim=-1))
        attended = (weights @ v).transpose(1, 2).reshape(batch, num_queries, dim)
        return self.proj(attended), logits.mean(dim=1)

    def _split(self, tokens: Tensor) -> Tensor:
        """[B, L, d] → [B, heads, L, d / heads]."""
        batch, length, dim = tokens.shape
        return tokens.reshape(batch, length, self.num_heads, dim // self.num_heads).transpose(1, 2)


class ZegDecoderLayer(nn.Module):
    """Post-norm decoder layer without query self-attention (official `TPN_DecoderLayer`).

    queries ← LN(queries + Dropout(CrossAttn(queries, patches))); queries ← LN(queries + Dropout(FFN(queries))),
    FFN = Linear(d, ffn) → ReLU → Dropout → Linear(ffn, d).
    """

    def __init__(self, dim: int, num_heads: int, ffn_dim: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.cross_attn = QueryPatchAttention(dim, num_heads, attn_dropout=dropout)
        self.attn_dropout = nn.Dropout(dropout)
        self.attn_norm = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(
            nn.Linear(dim, ffn_dim), nn.ReLU(), nn.Dropout(dropout), nn.Linear(ffn_dim, dim), nn.Dropout(dropout)
        )
        self.ffn_norm = nn.LayerNorm(dim)

    def forward(self, queries: Tensor, memory: Tensor) -> tuple[Tensor, Tensor]:
        """Update the queries; returns (queries [B, M, d], pre-softmax scores [B, M, N])."""
        attended, scores = self.cross_attn(queries, memory)
        queries = self.attn_norm(queries + self.attn_dropout(attended))
        queries = self.ffn_norm(queries + self.ffn(queries))
        return queries, scores


class ZegDecoder(nn.Module):
    """Stack of `ZegDecoderLayer`s; the mask logits are the LAST layer's head-averaged pre-softmax scores.

    The query update (residual + FFN) runs in every layer so that layer l+1 attends with refined queries,
    as in the official code; the final queries themselves are not used by the loss. Intermediate-layer scores are
    not supervised (the release emits no auxiliary outputs), so only the last layer's are returned.

    Linear weights are initialised trunc-normal (std 0.02, bias 0) and LayerNorms to (1, 0), as the official
    head's `init_weights`.

    Args:
        dim: d (= CLIP embedding dim D).
        num_layers: decoder layers (3).
        num_heads: attention heads (8).
        ffn_dim: FFN hidden width (2048 = 4·512).
        dropout: dropout in attention weights, residual branches and FFN (0.1).
    """

    def __init__(self, dim: int, num_layers: int = 3, num_heads: int = 8, ffn_dim: int = 2048,
                 dropout: float = 0.1) -> None:
        super().__init__()
        self.layers = nn.ModuleList(ZegDecoderLayer(dim, num_heads, ffn_dim, dropout) for _ in range(num_layers))

    def forward(self, queries: Tensor, patch_embeddings: Tensor) -> tuple[Tensor, Tensor]:
        """Decode class masks.

        Args:
            queries: float [B, M, D] class queries (from `RelationshipDescriptor`).
            patch_embeddings: float [B, D, h, w] patch tokens H.

        Returns:
            mask_logits: float [B, M, h, w] (pre-sigmoid) from the last layer.
            queries: float [B, M, D] after the last layer.
        """
        batch, dim, height, width = patch_embeddings.shape
        memory = patch_embeddings.flatten(2).transpose(1, 2)
        scores = queries.new_zeros(batch, queries.shape[1], height * width)
        for layer in self.layers:
            queries, scores = layer(queries, memory)
        return scores.reshape(batch, -1, height, width), queries


def init_head_weights(module: nn.Module) -> None:
    """Official head init: every Linear trunc-normal(std 0.02) with zero bias, every LayerNorm (1, 0)."""
    for child in module.modules():
        if isinstance(child, nn.Linear):
            nn.init.trunc_normal_(child.weight, std=0.02)
            if child.bias is not None:
                nn.init.zeros_(child.bias)
        elif isinstance(child, nn.LayerNorm):
            nn.init.ones_(child.weight)
            nn.init.zeros_(child.bias)
