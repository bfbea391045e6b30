"""Pre-norm transformer block over a set of tokens, shared by the method decoders."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class DropPath(nn.Module):
    """Stochastic depth: zero a whole residual branch per sample with probability `rate` (training only).

    Surviving samples are scaled by 1 / (1 - rate) so the expectation is unchanged.
    """

    def __init__(self, rate: float = 0.0) -> None:
        super().__init__()
        self.rate = rate

    def forward(self, x: Tensor) -> Tensor:
        """Args: x: float [B, ...]. Returns: the same shape."""
        if not self.training or self.rate == 0.0:
            return x
        keep = 1.0 - self.rate
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep


class TransformerBlock(nn.Module):
    """Pre-norm block: x + DropPath(MHSA(LN(x))), then x + DropPath(MLP(LN(x))), MLP = Linear-GELU-Linear.

    Args:
        dim: token width.
        heads: attention heads (`dim` must be divisible by it).
        mlp_ratio: MLP hidden width = round(dim * mlp_ratio).
        dropout: dropout after the attention output projection and inside/after the MLP.
        attn_dropout: dropout on the attention weights.
        drop_path: stochastic-depth rate of both residual branches.
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
        attn_dropout: float = 0.0,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        hidden = round(dim * mlp_ratio)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, dropout=attn_dropout, batch_first=True)
        self.attn_drop = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(
            nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim), nn.Dropout(dropout)
        )
        self.drop_path = DropPath(drop_path)

    def forward(self, x: Tensor) -> Tensor:
        """Args: x: float [B, L, dim] tokens. Returns: float [B, L, dim]."""
        h = self.norm1(x)
        h, _ = self.attn(h, h, h, need_weights=False)
        x = x + self.drop_path(self.attn_drop(h))
        return x + self.drop_path(self.mlp(self.norm2(x)))


def flatten_tokens(feature_map: Tensor) -> Tensor:
    """Channel-first map [B, C, h, w] -> row-major token sequence [B, h*w, C]."""
    return feature_map.flatten(2).transpose(1, 2)


def unflatten_tokens(tokens: Tensor, height: int, width: int) -> Tensor:
    """Row-major token sequence [B, h*w, C] -> channel-first map [B, C, h, w]."""
    return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], height, width)


def drop_path_rates(max_rate: float, depth: int) -> list[float]:
    """Per-layer stochastic-depth rates rising linearly from 0 to `max_rate` (OFA / timm convention)."""
    return [float(r) for r in torch.linspace(0.0, max_rate, depth)] if depth > 0 else []
