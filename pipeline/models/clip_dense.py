"""CLIP ViT forward passes on open_clip's own modules: pooled CLS embedding and training-free dense patch features.

MaskCLIP (Zhou et al. 2022; ``chongzhou96/MaskCLIP``, ``mmseg/models/backbones/vit.py``) makes CLIP's patch tokens
text-compatible by replacing the last block's self-attention with its value path: the query/key projections are
ignored, so every token only sees itself. Concretely, with ``x`` the *input* of the last block:

    v = out_proj(W_v · ln_1(x) + b_v)                      # value slice of in_proj, then the output projection
    residual_mlp=True  (MaskCLIP code, the default):  v = x + v;  v = v + mlp(ln_2(v))
    residual_mlp=False (Seifi et al. §3.1 wording, "value projection ... then LayerNorm, then the projection"): v
    patch = ln_post(v) @ proj

MaskCLIP's released ViT config (``configs/_base_/models/maskclip_vit16.py``: ``return_qkv=True``,
``final_norm=True``) runs the residual and the FFN on ``v`` before the final norm; Seifi et al. describe only the
value projection and the norm. The two differ, hence the knob. Layer scale (``ls_1``/``ls_2``, absent in CLIP
checkpoints) is applied wherever the block applies it. The CLS output is computed by the unmodified last block, so
it equals open_clip's ``encode_image``.

Position embeddings are interpolated bicubically (``align_corners=False``, no antialias, as MaskCLIP's mmseg
``resize``) when the input grid differs from the model's native grid, so any input whose sides are multiples of the
patch size works. open_clip's checkpoint ``resize_pos_embed`` defaults to ``antialias=True``, which differs slightly
(~1e-4) near the grid border even when upsampling.

Training-free successors rewire the same last block (``x`` its input, ``q, k, v`` the per-head projections of
``ln_1(x)`` over all tokens, CLS included, ``s = head_dim ** -0.5``, ``O`` = ``out_proj`` after merging heads):

    sclip     (Wang et al. 2024, ``wangf3014/SCLIP``): A = softmax(s q q^T) + softmax(s k k^T)  (a sum, rows sum to 2);
              y = x + O(A v);  y = y + mlp(ln_2(y))       (the official code keeps the residual and the FFN)
    clearclip (Lan et al. 2024, ``mc-lan/ClearCLIP``): A = softmax(s q q^T);  y = O(A v)   (no residual, no FFN)
    naclip    (Hajimiri et al. 2025, ``sinahmr/NACLIP``, arch "reduced"): A = softmax(s k k^T + G);  y = O(A v),
              G[i, j] = exp(-|p_i - p_j|^2 / (2 std^2)) over patch positions p (in patches), 0 in CLS rows/columns
    proxyclip (Lan et al. 2024, ``mc-lan/ProxyCLIP``): f = L2-normalised patch features of a vision foundation model
              on CLIP's patch grid; S = f f^T per image; S' = gamma (S - beta mean(S)), entries < 0 set to -inf
              (the diagonal kept);
              A = softmax(S') shared by all heads, over patch tokens only;  y = O(A v_patches)  (no residual, no FFN)

and the patch features are ``ln_post(y) @ proj``, L2-normalised. Layer scale ``ls_1`` multiplies ``O(.)`` and ``ls_2``
the FFN wherever the block has them. ProxyCLIP's official code resizes CLIP's values to the foundation model's grid;
here the foundation model's input is resized so that its grid equals CLIP's (`pipeline.models.clip.Clip` does it),
so no value resampling is needed and every backend returns features on CLIP's grid.
"""

from __future__ import annotations

import typing

import torch
import torch.nn.functional as F

from pipeline.models.configs import DenseBackend

DENSE_BACKENDS: tuple[str, ...] = typing.get_args(DenseBackend)


def check_supported(visual: torch.nn.Module) -> None:
    """Raise `NotImplementedError` unless `visual` is an open_clip ViT with CLS pooling and standard blocks."""
    from open_clip.transformer import ResidualAttentionBlock, VisionTransformer

    if not isinstance(visual, VisionTransformer):
        raise NotImplementedError(f"dense CLIP features need an open_clip VisionTransformer, got {type(visual)}")
    if visual.attn_pool is not None or visual.pool_type != "tok":
        raise NotImplementedError("dense CLIP features need CLS-token pooling (no attentional pooler)")
    if not isinstance(visual.transformer.resblocks[-1], ResidualAttentionBlock):
        raise NotImplementedError("dense CLIP features need standard ResidualAttentionBlocks (nn.MultiheadAttention)")


def interpolate_pos_embed(pos_embed: torch.Tensor, native_hw: tuple[int, int], hw: tuple[int, int]) -> torch.Tensor:
    """Resize a ViT position embedding table to a new patch grid.

    Args:
        pos_embed: [1 + gh*gw, W] table, CLS row first, patch rows in row-major (y, x) order.
        native_hw: (gh, gw) grid the table was trained for.
        hw: (h, w) target grid.

    Returns:
        [1 + h*w, W] table (the CLS row unchanged), same dtype as the input.
    """
    if tuple(native_hw) == tuple(hw):
        return pos_embed
    cls_row, grid = pos_embed[:1], pos_embed[1:]
    width = grid.shape[-1]
    grid = grid.reshape(1, native_hw[0], native_hw[1], width).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=hw, mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(hw[0] * hw[1], width).to(pos_embed.dtype)
    return torch.cat([cls_row, grid], dim=0)


def embed_tokens(visual: torch.nn.Module, pixels: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
    """Patchify, prepend CLS, add (interpolated) position embeddings and apply ``ln_pre``.

    Args:
        visual: open_clip VisionTransformer (eval mode, so patch dropout is off).
        pixels: [B, 3, H, W] CLIP-normalised, H and W multiples of the patch size.

    Returns:
        (tokens [B, 1 + h*w, W_model] batch-first, (h, w) patch grid).
    """
    patch_h, patch_w = visual.patch_size
    if pixels.shape[-2] % patch_h or pixels.shape[-1] % patch_w:
        raise ValueError(f"input {tuple(pixels.shape[-2:])} is not a multiple of the patch size {visual.patch_size}")
    x = visual.conv1(pixels.to(visual.conv1.weight.dtype))
    hw = (x.shape[-2], x.shape[-1])
    x = x.flatten(2).transpose(1, 2)
    cls = visual.class_embedding.to(x.dtype).view(1, 1, -1).expand(x.shape[0], -1, -1)
    x = torch.cat([cls, x], dim=1)
    x = x + interpolate_pos_embed(visual.positional_embedding, visual.grid_size, hw).to(x.dtype)
    x = visual.patch_dropout(x)
    return visual.ln_pre(x), hw


def run_blocks(transformer: torch.nn.Module, x: torch.Tensor, blocks: list[torch.nn.Module]) -> torch.Tensor:
    """Run `blocks` on batch-first tokens [B, L, W], honouring the transformer's ``batch_first`` layout."""
    batch_first = getattr(transformer, "batch_first", True)
    if not batch_first:
        x = x.transpose(0, 1)
    for block in blocks:
        x = block(x)
    return x if batch_first else x.transpose(0, 1)


def value_path(block: torch.nn.Module, x: torch.Tensor, residual_mlp: bool = True) -> torch.Tensor:
    """MaskCLIP value path of one ResidualAttentionBlock on batch-first tokens.

    Args:
        block: open_clip ResidualAttentionBlock (``ln_1``, ``attn`` = nn.MultiheadAttention, ``ln_2``, ``mlp``).
        x: [B, L, W] input of the block.
        residual_mlp: add the residual and the MLP branch (MaskCLIP code) or stop after the value/out projection.

    Returns:
        [B, L, W] per-token features (each token depends on itself only).
    """
    attn = block.attn
    width = x.shape[-1]
    values = F.linear(block.ln_1(x), attn.in_proj_weight[2 * width:], attn.in_proj_bias[2 * width:])
    v = block.ls_1(attn.out_proj(values))
    if not residual_mlp:
        return v
    v = x + v
    return v + block.ls_2(block.mlp(block.ln_2(v)))


def project(visual: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """``ln_post`` then ``proj``: [..., W] tokens -> [..., D] joint-space features (not normalised)."""
    out = visual.ln_post(tokens)
    return out @ visual.proj if visual.proj is not None else out


def head_projections(block: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v of ``ln_1(x)`` split into heads: x [B, L, W] -> three [B, H, L, W/H] tensors (biases included)."""
    attn = block.attn
    batch, length, width = x.shape
    qkv = F.linear(block.ln_1(x), attn.in_proj_weight, attn.in_proj_bias)
    q, k, v = qkv.view(batch, length, 3, attn.num_heads, width // attn.num_heads).permute(2, 0, 3, 1, 4)
    return q, k, v


def merge_heads(block: torch.nn.Module, weights: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``ls_1(out_proj(A v))``: weights [B or 1, H or 1, L', L], v [B, H, L, d] -> [B, L', H*d]."""
    out = (weights @ v).transpose(1, 2).flatten(2)
    return block.ls_1(block.attn.out_proj(out))


def self_attention(t: torch.Tensor, scale: float) -> torch.Tensor:
    """``softmax(scale * t t^T)`` over the last axis: t [B, H, L, d] -> [B, H, L, L] (q-q or k-k attention)."""
    return torch.softmax(scale * t @ t.transpose(-1, -2), dim=-1)


def gaussian_prior(grid_hw: tuple[int, int], std: float) -> torch.Tensor:
    """NACLIP's neighbourhood prior for CLS + h*w tokens.

    Returns:
        float32 [1 + h*w, 1 + h*w]: entry (i, j) between patches at (row, col) positions p_i, p_j is
        ``exp(-|p_i - p_j|^2 / (2 std^2))``; the CLS row and column are 0.
    """
    rows, cols = torch.meshgrid(torch.arange(grid_hw[0]), torch.arange(grid_hw[1]), indexing="ij")
    positions = torch.stack([rows.flatten(), cols.flatten()], dim=-1).float()
    prior = torch.exp(-torch.cdist(positions, positions).square() / (2.0 * std * std))
    return F.pad(prior, (1, 0, 1, 0))


def proxy_attention(features: torch.Tensor, beta: float, gamma: float) -> torch.Tensor:
    """ProxyCLIP's attention from foundation-model patch features.

    Args:
        features: [B, F, h, w] patch features on CLIP's patch grid (any scale; normalised here).
        beta: threshold as a multiple of each image's mean cosine similarity.
        gamma: sharpness applied before the softmax.

    Returns:
        float32 [B, 1, h*w, h*w] rows summing to 1 (one map shared by all heads). The diagonal is never masked, so
        a row whose similarities all fall below the threshold (nearly constant features, mean above 1/beta) attends
        to itself instead of becoming NaN as in the official code; elsewhere the two agree.
    """
    tokens = F.normalize(features.float().flatten(2), dim=1)  # [B, F, N]
    similarity = tokens.transpose(1, 2) @ tokens  # [B, N, N]
    logits = gamma * (similarity - beta * similarity.mean(dim=(1, 2), keepdim=True))
    below = (logits < 0) & ~torch.eye(logits.shape[-1], dtype=torch.bool, device=logits.device)
    logits = logits.masked_fill(below, float("-inf"))
    return torch.softmax(logits, dim=-1)[:, None]


def last_block_patches(
    block: torch.nn.Module, x: torch.Tensor, backend: str, grid_hw: tuple[int, int], *,
    residual_mlp: bool = True, naclip_std: float = 5.0, proxy_features: torch.Tensor | None = None,
    proxy_beta: float = 1.2, proxy_gamma: float = 3.0,
) -> torch.Tensor:
    """Patch-token outputs [B, h*w, W] of the rewired last block for `backend` (equations in the module docstring).

    Args:
        block: open_clip ResidualAttentionBlock.
        x: [B, 1 + h*w, W] input of the block, CLS first.
        backend: one of `DENSE_BACKENDS`.
        grid_hw: (h, w) patch grid.
        residual_mlp: `value_path` knob (maskclip only).
        naclip_std: Gaussian std in patches (naclip only).
        proxy_features: [B, F, h, w] foundation-model features (proxyclip only).
        proxy_beta, proxy_gamma: see `proxy_attention`.
    """
    if backend == "maskclip":
        return value_path(block, x[:, 1:], residual_mlp)
    q, k, v = head_projections(block, x)
    scale = q.shape[-1] ** -0.5
    if backend == "sclip":
        weights = self_attention(q, scale) + self_attention(k, scale)
        y = x + merge_heads(block, weights, v)
        return (y + block.ls_2(block.mlp(block.ln_2(y))))[:, 1:]
    if backend == "clearclip":
        return merge_heads(block, self_attention(q, scale), v)[:, 1:]
    if backend == "naclip":
        prior = gaussian_prior(grid_hw, naclip_std).to(k)
        return merge_heads(block, torch.softmax(scale * k @ k.transpose(-1, -2) + prior, -1), v)[:, 1:]
    if backend == "proxyclip":
        if proxy_features is None or tuple(proxy_features.shape[-2:]) != tuple(grid_hw):
            raise ValueError(f"proxyclip needs proxy features on the {grid_hw} patch grid")
        weights = proxy_attention(proxy_features, proxy_beta, proxy_gamma).to(v)
        return merge_heads(block, weights, v[:, :, 1:])
    raise ValueError(f"unknown dense backend {backend!r}; expected one of {DENSE_BACKENDS}")


def visual_forward(
    visual: torch.nn.Module, pixels: torch.Tensor, dense: bool, residual_mlp: bool = True,
    backend: str = "maskclip", **backend_knobs,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """CLS embedding and (optionally) dense patch features, both L2-normalised, float32.

    Args:
        visual: open_clip VisionTransformer accepted by `check_supported`.
        pixels: [B, 3, H, W] CLIP-normalised; H, W multiples of the patch size (any size; positions interpolated).
        dense: also compute patch features.
        residual_mlp: see `value_path` (maskclip only).
        backend: one of `DENSE_BACKENDS` (see `last_block_patches`).
        backend_knobs: `last_block_patches` keyword knobs (naclip_std, proxy_features, proxy_beta, proxy_gamma).

    Returns:
        (cls [B, D], patch [B, D, h, w] or None).
    """
    x, (h, w) = embed_tokens(visual, pixels)
    blocks = list(visual.transformer.resblocks)
    x = run_blocks(visual.transformer, x, blocks[:-1])
    last_out = run_blocks(visual.transformer, x, blocks[-1:])
    cls = F.normalize(project(visual, last_out[:, 0]).float(), dim=-1)
    if not dense:
        return cls, None
    tokens = last_block_patches(blocks[-1], x, backend, (h, w), residual_mlp=residual_mlp, **backend_knobs)
    patch = F.normalize(project(visual, tokens).float(), dim=-1)
    return cls, patch.transpose(1, 2).reshape(x.shape[0], -1, h, w)
