"""CLIP ViT forward passes on open_clip's own modules: pooled CLS embedding and MaskCLIP dense patch features.

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
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


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


def visual_forward(
    visual: torch.nn.Module, pixels: torch.Tensor, dense: bool, residual_mlp: bool = True
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """CLS embedding and (optionally) MaskCLIP patch features, both L2-normalised, float32.

    Args:
        visual: open_clip VisionTransformer accepted by `check_supported`.
        pixels: [B, 3, H, W] CLIP-normalised; H, W multiples of the patch size (any size; positions interpolated).
        dense: also compute patch features.
        residual_mlp: see `value_path`.

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
    patch = project(visual, value_path(blocks[-1], x[:, 1:], residual_mlp)).float()
    patch = F.normalize(patch, dim=-1).transpose(1, 2).reshape(x.shape[0], -1, h, w)
    return cls, patch
