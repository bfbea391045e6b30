"""ZSSeg Stage A: learned text prompts for classifying masked crops (Xu et al. 2022; methods-spec §2.1).

A prompt is ``[SOS] + ctx_1..ctx_n + <class-name tokens> + "." + [EOS] + padding`` where ctx are n (16) learned
vectors in the text tower's token-embedding space, shared by all classes (ZSSeg `LearnablePromptExtractor`,
PROMPT_SHAPE (16, 0): no suffix vectors). The sequence runs through CLIP's frozen text transformer; the feature at
the [EOS] position, projected and L2-normalised, is the class's text feature. Only ctx is trained: on masked crops
of seen-class regions (`pipeline.methods.zsseg_crops`), logits = 100 · cos(frozen CLIP image feature, text
feature) over the seen classes, cross-entropy.

The learned features replace the hand-written templates wherever ZSSeg classifies crops: the eval predictor
(`pipeline.methods.zsseg_crops.ProposalClassifier`) and the pseudolabel stage's crop labeller.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from pipeline.methods.configs import ZSSegConfig


class PromptLearner(torch.nn.Module):
    """Learned context vectors through a frozen open_clip text tower.

    Args:
        clip_model: an open_clip ``CLIP`` (its text tower is used frozen: token_embedding, positional_embedding,
            transformer, ln_final, text_projection, attn_mask).
        tokenizer: its open_clip tokenizer (texts -> int64 [N, context_length]).
        n_ctx: number of context vectors.
        init_std: std of their N(0, std²) init.
    """

    def __init__(self, clip_model: torch.nn.Module, tokenizer: object, n_ctx: int = 16, init_std: float = 0.02) -> None:
        super().__init__()
        self.text = _TextTower(clip_model)
        for parameter in self.text.parameters():
            parameter.requires_grad_(False)
        self.tokenizer = tokenizer
        self.ctx = torch.nn.Parameter(torch.randn(n_ctx, self.text.width) * init_std)

    @property
    def n_ctx(self) -> int:
        return int(self.ctx.shape[0])

    def tokens(self, names: Sequence[str]) -> torch.Tensor:
        """int64 [M, L]: the tokens of ``"<name>."`` ([SOS] name . [EOS] pad), L = the tower's context length."""
        tokens = self.tokenizer([f"{name}." for name in names])
        if int(tokens.argmax(dim=-1).max()) + self.n_ctx >= tokens.shape[1]:
            raise ValueError(f"a class name is too long for {self.n_ctx} context vectors in {tokens.shape[1]} tokens")
        return tokens

    def embeddings(self, tokens: torch.Tensor) -> torch.Tensor:
        """float [M, L, W]: [SOS] embedding, the M-shared ctx, then the name tokens shifted right by n_ctx (the
        last n_ctx padding positions drop out)."""
        embedded = self.text.token_embedding(tokens.to(self.ctx.device))
        ctx = self.ctx.to(embedded.dtype)[None].expand(tokens.shape[0], -1, -1)
        return torch.cat([embedded[:, :1], ctx, embedded[:, 1:tokens.shape[1] - self.n_ctx]], dim=1)

    def forward(self, names: Sequence[str]) -> torch.Tensor:
        """float32 [M, D] L2-normalised text features of the M class names."""
        tokens = self.tokens(names)
        eos = tokens.argmax(dim=-1) + self.n_ctx  # [EOS] has the largest id; ctx shifts it right
        return F.normalize(self.text.encode(self.embeddings(tokens), eos.to(self.ctx.device)), dim=-1)


class _TextTower(torch.nn.Module):
    """The text half of an open_clip ``CLIP`` as submodules, fed embeddings instead of tokens."""

    def __init__(self, clip_model: torch.nn.Module) -> None:
        super().__init__()
        self.token_embedding = clip_model.token_embedding
        self.positional_embedding = clip_model.positional_embedding
        self.transformer = clip_model.transformer
        self.ln_final = clip_model.ln_final
        self.text_projection = clip_model.text_projection
        self.register_buffer("attn_mask", clip_model.attn_mask, persistent=False)
        self.width = int(self.token_embedding.weight.shape[1])

    def encode(self, embeddings: torch.Tensor, eos: torch.Tensor) -> torch.Tensor:
        """[M, L, W] token embeddings + [M] EOS positions -> float32 [M, D] projected EOS features (as
        open_clip's ``CLIP.encode_text`` after its token lookup).

        With a causal mask no position attends to a later one, so the positions after the last EOS cannot change
        any EOS feature and are cut off (exact; ~3x less work with 16 context vectors and short names).
        """
        mask, length = self.attn_mask, embeddings.shape[1]
        if mask is not None:
            length = int(eos.max()) + 1
            mask = mask[:length, :length]
        x = embeddings[:, :length] + self.positional_embedding[:length].to(embeddings.dtype)
        x = self.ln_final(self.transformer(x, attn_mask=mask))
        x = x[torch.arange(x.shape[0], device=x.device), eos]
        projection = self.text_projection
        if isinstance(projection, torch.nn.Linear):
            return projection(x).float()
        return (x @ projection).float() if projection is not None else x.float()


class ZSSegMethod:
    """The prompt-learning objective and optimiser (methods-spec §2.1 Stage A).

    Args:
        cfg: the method's knobs.
        clip_model: the open_clip model (both towers frozen).
        tokenizer: its tokenizer.
        names: the M prompt names of the vocabulary (train-id order).
        seen_ids: train ids of the seen classes (the CE's classes; all classes when the vocabulary has no split).
    """

    def __init__(self, cfg: ZSSegConfig, clip_model: torch.nn.Module, tokenizer: object, names: Sequence[str],
                 seen_ids: Sequence[int]) -> None:
        self.cfg, self.clip_model, self.tokenizer = cfg, clip_model, tokenizer
        self.names, self.seen_ids = list(names), list(seen_ids)

    def build_model(self) -> PromptLearner:
        return PromptLearner(self.clip_model, self.tokenizer, self.cfg.n_ctx, self.cfg.ctx_init_std)

    def loss(self, model: torch.nn.Module, features: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """CE of ``logit_scale · cos`` over the seen classes.

        Args:
            model: the `PromptLearner` (possibly DDP-wrapped).
            features: float [B, D] L2-normalised CLIP image features of the masked crops.
            targets: int64 [B] positions in `seen_ids` of each crop's class.
        """
        text = model([self.names[i] for i in self.seen_ids])
        logits = self.cfg.logit_scale * features.to(text) @ text.T
        loss = F.cross_entropy(logits, targets.to(logits.device))
        accuracy = (logits.argmax(dim=1) == targets.to(logits.device)).float().mean()
        return loss, {"loss": loss.item(), "accuracy": accuracy.item()}

    def build_optimizer(self, model: torch.nn.Module) -> torch.optim.Optimizer:
        params = [p for p in model.parameters() if p.requires_grad]
        return torch.optim.SGD(params, lr=self.cfg.lr, momentum=self.cfg.momentum,
                               weight_decay=self.cfg.weight_decay)

    def lr_factor(self, steps: int) -> object:
        """step -> lr multiplier: detectron2's WarmupCosineLR with a constant warm-up factor."""
        cfg = self.cfg

        def factor(step: int) -> float:
            cosine = 0.5 * (1.0 + math.cos(math.pi * step / max(1, steps)))
            return cosine * (cfg.warmup_factor if step < cfg.warmup_steps else 1.0)

        return factor
