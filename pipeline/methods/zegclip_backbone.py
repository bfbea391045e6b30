"""ZegCLIP deep prompt tuning (DPT) around a frozen open_clip `VisionTransformer` (ZegCLIP paper §3.3, Eq. 3).

The open_clip tower is composed, not forked: its `conv1`, `class_embedding`, `positional_embedding`,
`ln_pre`, `transformer.resblocks`, `ln_post` and `proj` are called in order, with learnable prompt tokens
spliced in between the [CLS] token and the patch tokens at the input of every prompted layer.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class DeepPromptViT(nn.Module):
    """CLIP ViT image encoder with deep visual prompts; returns dense and global embeddings.

    Token layout at the input of layer l: `[CLS, P^l (num_prompts tokens, if l is prompted), patches]`.
    The outputs at the prompt positions are discarded before the next layer, which receives fresh prompts
    (or none if it is not prompted). This matches the official `forward_deep_prompt` (all layers) and
    `forward_reverse_deep_prompt` (top layers only) for any set of prompted layers (paper Table 8).

    Every prompt passes one shared `prompt_proj` (Linear width→width, kaiming-normal fan_out) and
    `prompt_dropout` (p=0.1). After the last block an extra `prompt_norm` (LayerNorm, eps 1e-6) is applied to all
    tokens, then CLIP's `ln_post` and `proj`.

    Choices where the sources are silent or differ:
        * The official backbone uses drop-path 0.1 inside the frozen CLIP blocks; open_clip blocks have no
          drop-path, so none is applied here.
        * The position embedding is resized bilinearly (align_corners=False) from the stored grid to the input
          token grid on every forward, as the official code does; the CLS position is kept.
        * open_clip's patch dropout is not applied (the official backbone has none).

    Args:
        visual: an open_clip `VisionTransformer` (class-token pooling, no attentional pooler, with `proj`).
            It is used in place (the caller decides whether to copy it); its parameters are frozen here.
        num_prompts: prompt tokens per layer (10 VOC, 100 COCO, 35 Context in the paper).
        prompt_layers: 0-based indices of the layers that receive prompts; None = every layer (paper default).
        prompt_dropout: dropout probability applied to projected prompts.
        double_cls_embedding: add `class_embedding` to the CLS position too, as the release's encoder does
            (CLS input = 2·class_embedding + pos[0]); False = open_clip's CLS = class_embedding + pos[0].
    """

    def __init__(
        self,
        visual: nn.Module,
        num_prompts: int = 10,
        prompt_layers: Sequence[int] | None = None,
        prompt_dropout: float = 0.1,
        double_cls_embedding: bool = False,
    ) -> None:
        super().__init__()
        _check_visual(visual)
        self.visual = visual
        for param in self.visual.parameters():
            param.requires_grad_(False)
        num_layers = len(visual.transformer.resblocks)
        layers = list(range(num_layers)) if prompt_layers is None else sorted({int(i) for i in prompt_layers})
        if any(i < 0 or i >= num_layers for i in layers):
            raise ValueError(f"prompt_layers {list(prompt_layers or [])} must lie in [0, {num_layers - 1}]")
        self.num_prompts = int(num_prompts)
        self.prompt_layers = tuple(layers)
        self._prompt_slot = {layer: slot for slot, layer in enumerate(layers)}
        width = visual.conv1.out_channels
        patch_h, patch_w = visual.conv1.kernel_size
        bound = math.sqrt(6.0 / float(3 * patch_h * patch_w + width))
        self.prompt_embeddings = nn.Parameter(torch.empty(len(layers), self.num_prompts, width))
        nn.init.uniform_(self.prompt_embeddings, -bound, bound)
        self.prompt_proj = nn.Linear(width, width)
        nn.init.kaiming_normal_(self.prompt_proj.weight, a=0, mode="fan_out")
        nn.init.zeros_(self.prompt_proj.bias)
        self.prompt_dropout = nn.Dropout(prompt_dropout)
        self.prompt_norm = nn.LayerNorm(width, eps=1e-6)
        self.double_cls_embedding = bool(double_cls_embedding)

    @property
    def output_dim(self) -> int:
        """Dimension D of the returned embeddings (CLIP joint space)."""
        return int(self.visual.proj.shape[1])

    def forward(self, pixels: Tensor) -> tuple[Tensor, Tensor]:
        """Encode images.

        Args:
            pixels: float [B, 3, H, W], normalised; H and W multiples of the patch size.

        Returns:
            patch_embeddings: float32 [B, D, h, w], L2-normalised over D, h = H / patch, w = W / patch.
            global_embedding: float32 [B, D], L2-normalised ([CLS] token).

        The frozen tower runs in its own dtype (fp32/bf16/fp16 weights); prompts are cast to it, `prompt_norm`
        runs in float32 and the outputs are float32.
        """
        tokens, grid_h, grid_w = self._embed(pixels)
        num_patches = grid_h * grid_w
        for index, block in enumerate(self.visual.transformer.resblocks):
            cls_token, patches = tokens[:, :1], tokens[:, -num_patches:]
            if index in self._prompt_slot:
                prompts = self._projected_prompts(self._prompt_slot[index], tokens.shape[0]).to(tokens.dtype)
                tokens = torch.cat([cls_token, prompts, patches], dim=1)
            else:
                tokens = torch.cat([cls_token, patches], dim=1)
            tokens = self._run_block(block, tokens)
        tokens = self.visual.ln_post(self.prompt_norm(tokens.float()).to(tokens.dtype))
        tokens = (tokens.to(self.visual.proj.dtype) @ self.visual.proj).float()
        global_embedding = F.normalize(tokens[:, 0], dim=-1)
        patch_embeddings = tokens[:, -num_patches:].transpose(1, 2).reshape(tokens.shape[0], -1, grid_h, grid_w)
        return F.normalize(patch_embeddings, dim=1), global_embedding

    def _projected_prompts(self, slot: int, batch_size: int) -> Tensor:
        """Prompts of one layer after the shared projection and dropout: float [B, num_prompts, width]."""
        prompts = self.prompt_dropout(self.prompt_proj(self.prompt_embeddings[slot]))
        return prompts.unsqueeze(0).expand(batch_size, -1, -1)

    def _embed(self, pixels: Tensor) -> tuple[Tensor, int, int]:
        """Patchify, prepend CLS, add the resized position embedding, apply ln_pre: [B, 1 + h*w, width]."""
        visual = self.visual
        features = visual.conv1(pixels.to(visual.conv1.weight.dtype))
        batch_size, width, grid_h, grid_w = features.shape
        patches = features.flatten(2).transpose(1, 2)
        cls_token = visual.class_embedding.to(patches.dtype).reshape(1, 1, width).expand(batch_size, -1, -1)
        tokens = torch.cat([cls_token, patches], dim=1)
        position = resize_position_embedding(visual.positional_embedding, visual.grid_size, (grid_h, grid_w))
        if self.double_cls_embedding:  # the release's `cls_pos = pos[0] + class_embedding`
            position = torch.cat([position[:1] + visual.class_embedding.to(position.dtype), position[1:]], dim=0)
        tokens = tokens + position.to(tokens.dtype)
        return visual.ln_pre(tokens).to(tokens.dtype), grid_h, grid_w

    def _run_block(self, block: nn.Module, tokens: Tensor) -> Tensor:
        """Run one open_clip residual block on batch-first tokens, whatever layout the tower uses."""
        if getattr(self.visual.transformer, "batch_first", True):
            return block(tokens)
        return block(tokens.transpose(0, 1)).transpose(0, 1)


def resize_position_embedding(position_embedding: Tensor, stored_grid: Sequence[int], grid: Sequence[int]) -> Tensor:
    """Bilinearly resize a CLIP position table to a new token grid, keeping the CLS row.

    Args:
        position_embedding: float [1 + gh*gw, width] (row 0 = CLS).
        stored_grid: (gh, gw) of the table.
        grid: target (h, w).

    Returns:
        float [1 + h*w, width].
    """
    stored_h, stored_w = int(stored_grid[0]), int(stored_grid[1])
    if (stored_h, stored_w) == (int(grid[0]), int(grid[1])):
        return position_embedding
    width = position_embedding.shape[-1]
    spatial = position_embedding[1:].reshape(1, stored_h, stored_w, width).permute(0, 3, 1, 2)
    spatial = F.interpolate(spatial.float(), size=tuple(int(g) for g in grid), mode="bilinear", align_corners=False)
    spatial = spatial.to(position_embedding.dtype).flatten(2)[0].transpose(0, 1)
    return torch.cat([position_embedding[:1], spatial], dim=0)


def _check_visual(visual: nn.Module) -> None:
    """Fail early with a clear message when the tower is not a class-token open_clip ViT with a projection."""
    required = ("conv1", "class_embedding", "positional_embedding", "ln_pre", "transformer", "ln_post", "proj")
    missing = [name for name in required if getattr(visual, name, None) is None]
    if missing:
        raise TypeError(f"DeepPromptViT needs an open_clip VisionTransformer with a projection; missing {missing}")
    if getattr(visual, "attn_pool", None) is not None or getattr(visual, "pool_type", "tok") != "tok":
        raise TypeError("DeepPromptViT needs class-token pooling (pool_type='tok', no attentional pooler)")
