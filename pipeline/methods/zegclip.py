"""ZegCLIP (Zhou et al., CVPR 2023): one-stage zero-shot segmentation on a frozen CLIP ViT.

Trainable: deep visual prompts (+ their shared projection and norm), the relationship-descriptor query
projection and the 3-layer decoder. Everything from CLIP is frozen and text embeddings are precomputed.

Training protocols (methods-spec §4.3):
    * inductive: labels of unseen classes become ignore (255) and the queries are the seen classes only, so unseen
      pixels act as negatives for every seen class in the focal term.
    * transductive: emulates the release, which starts the self-training run from the inductive checkpoint at half
      of the inductive schedule: steps < `st_start_fraction · total_steps` are inductive; from then on all classes
      are queries and unseen-GT pixels receive online, detached pseudo-labels (argmax over the unseen classes).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.methods.configs import PIXEL_STATS, ZegCLIPConfig
from pipeline.methods.zegclip_backbone import DeepPromptViT
from pipeline.methods.zegclip_decoder import RelationshipDescriptor, ZegDecoder, init_head_weights
from pipeline.methods.zegclip_loss import nel_loss


class ZegCLIPNet(nn.Module):
    """DPT backbone + relationship descriptor + decoder, with the class text embeddings as a buffer.

    Args:
        backbone: `DeepPromptViT` producing D-dimensional embeddings.
        text_embeddings: float [M, D] class embeddings (L2-normalised here), row i = global train id i.
        cfg: decoder knobs.
    """

    def __init__(self, backbone: DeepPromptViT, text_embeddings: Tensor, cfg: ZegCLIPConfig) -> None:
        super().__init__()
        dim = backbone.output_dim
        if text_embeddings.ndim != 2 or text_embeddings.shape[1] != dim:
            raise ValueError(f"text_embeddings must be [M, {dim}] to match the image tower, got "
                             f"{tuple(text_embeddings.shape)}")
        self.backbone = backbone
        self.register_buffer("text_embeddings", F.normalize(text_embeddings.detach().float(), dim=-1))
        self.relationship = RelationshipDescriptor(dim)
        self.decoder = ZegDecoder(dim, cfg.decoder_layers, cfg.decoder_heads, cfg.decoder_ffn_dim, cfg.decoder_dropout)
        init_head_weights(self.relationship)
        init_head_weights(self.decoder)

    def forward(self, pixels: Tensor, query_ids: Tensor | None = None) -> Tensor:
        """Mask logits of the queried classes.

        Args:
            pixels: float [B, 3, H, W], normalised.
            query_ids: int64 [M_q] global class ids to query; None = all M classes.

        Returns:
            float [B, M_q, h, w] logits on the token grid (h = H / patch).
        """
        patch_embeddings, global_embedding = self.backbone(pixels)
        text = self.text_embeddings if query_ids is None else self.text_embeddings[query_ids]
        queries = self.relationship(text.to(global_embedding.dtype), global_embedding)
        mask_logits, _ = self.decoder(queries, patch_embeddings)
        return mask_logits


class ZegCLIPMethod:
    """ZegCLIP as seen by the trainer: model factory, optimiser groups, loss, schedule and prediction.

    Args:
        cfg: knobs.
        clip_model: open_clip CLIP (or a wrapper exposing it as `.model`); its `.visual` is deep-copied and frozen.
        text_embeddings: float [M, D] class embeddings in global train-id order (all classes).
        seen_ids: global ids of seen classes (used in training).
        unseen_ids: global ids of unseen classes (never supervised by GT; pseudo-labelled in transductive mode).
        ignore_index: the label maps' unlabelled id, the vocabulary's (255 for uint8 maps, 65535 above 255
            classes, where 255 is a class).
    """

    Config = ZegCLIPConfig

    def __init__(self, cfg: ZegCLIPConfig, clip_model: nn.Module, text_embeddings: Tensor,
                 seen_ids: Sequence[int], unseen_ids: Sequence[int], ignore_index: int = 255) -> None:
        num_classes = int(text_embeddings.shape[0])
        seen, unseen = [int(i) for i in seen_ids], [int(i) for i in unseen_ids]
        if set(seen) & set(unseen):
            raise ValueError(f"seen_ids and unseen_ids overlap: {sorted(set(seen) & set(unseen))}")
        if any(i < 0 or i >= num_classes for i in seen + unseen):
            raise ValueError(f"seen/unseen ids must lie in [0, {num_classes - 1}] (rows of text_embeddings)")
        if not seen:
            raise ValueError("zegclip needs at least one seen class to train on")
        self.cfg = cfg
        self.ignore_index = ignore_index
        self.visual = _visual_tower(clip_model)
        self.text_embeddings = text_embeddings
        self.seen_ids = torch.tensor(seen, dtype=torch.long)
        self.unseen_ids = torch.tensor(unseen, dtype=torch.long)
        self.all_ids = torch.arange(num_classes, dtype=torch.long)

    def build_model(self) -> ZegCLIPNet:
        """A fresh trainable model around a private frozen copy of the CLIP image tower."""
        backbone = DeepPromptViT(copy.deepcopy(self.visual), self.cfg.num_prompts, self.cfg.prompt_layers,
                                 self.cfg.prompt_dropout, self.cfg.double_cls_embedding)
        return ZegCLIPNet(backbone, self.text_embeddings, self.cfg)

    def param_groups(self, model: nn.Module) -> list[dict]:
        """AdamW groups over the trainable parameters only (prompts, prompt proj/norm, q_proj, decoder).

        Returns:
            up to two groups {"name", "params", "lr", "weight_decay"}: LayerNorm parameters get
            weight_decay · norm_decay_mult, all others weight_decay; both use lr · lr_mult.
        """
        norm_ids = {id(p) for m in model.modules() if isinstance(m, nn.LayerNorm) for p in m.parameters()}
        trainable = [p for p in model.parameters() if p.requires_grad]
        lr = self.cfg.lr * self.cfg.lr_mult
        groups = [
            {"name": "zegclip", "params": [p for p in trainable if id(p) not in norm_ids], "lr": lr,
             "weight_decay": self.cfg.weight_decay},
            {"name": "zegclip_norm", "params": [p for p in trainable if id(p) in norm_ids], "lr": lr,
             "weight_decay": self.cfg.weight_decay * self.cfg.norm_decay_mult},
        ]
        return [group for group in groups if group["params"]]

    def self_training_start_step(self, total_steps: int) -> int | None:
        """First step with pseudo-labels (transductive), or None (inductive).

        The release restarts from a checkpoint here with a fresh optimiser; the recipe clears the optimiser state
        at this step when `reset_optimizer_at_switch` (default).
        """
        if self.cfg.mode != "transductive":
            return None
        return int(round(self.cfg.st_start_fraction * total_steps))

    def learning_rate(self, step: int, total_steps: int, base_lr: float) -> float:
        """mmcv poly schedule with linear warmup, restarted where self-training starts (transductive).

        Before the switch the inductive schedule over `total_steps` is followed (the release's ST run starts from
        the inductive run's mid-schedule checkpoint); from the switch, warmup and poly restart over the remaining
        steps, as the release's second run does.

        Args:
            step: 0-based optimiser step.
            total_steps: planned steps of the whole run.
            base_lr: the group's peak lr (e.g. its "lr" from `param_groups`).
        """
        start = self.self_training_start_step(total_steps)
        if start is not None and step >= start:
            step, total_steps = step - start, total_steps - start
        return poly_warmup_lr(step, total_steps, base_lr, self.cfg.min_lr, self.cfg.poly_power,
                              self.cfg.warmup_iters, self.cfg.warmup_ratio)

    def loss(self, model: nn.Module, batch: dict[str, Tensor], step: int,
             total_steps: int) -> tuple[Tensor, dict[str, Tensor]]:
        """NEL loss of one batch.

        Args:
            model: from `build_model`.
            batch: {"pixels": float [B, 3, H, W] normalised, "labels": int [B, H, W] global train ids, 255 ignore}.
            step: 0-based step (selects the transductive phase).
            total_steps: planned steps of the run.

        Returns:
            loss: scalar.
            logs: detached scalars "loss", "loss_focal", "loss_dice", "num_masks", "self_training" (0/1),
                "pixel_acc" (over labelled pixels, predicted among the queried classes).
        """
        pixels, labels = batch["pixels"], batch["labels"].long()
        start = self.self_training_start_step(total_steps)
        self_training = start is not None and step >= start
        query_ids = (self.all_ids if self_training else self.seen_ids).to(labels.device)
        labels = self.visible_labels(labels, keep_unseen=self_training)
        logits = model(pixels, query_ids)
        logits = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
        if self_training:
            labels = pseudo_label_unseen(logits.detach(), labels, query_ids, self.unseen_ids.to(labels.device),
                                         self.ignore_index)
        focal_weight = self.cfg.focal_weight
        if self_training and self.cfg.st_focal_weight is not None:
            focal_weight = self.cfg.st_focal_weight
        loss, parts = nel_loss(logits, labels, query_ids, self.ignore_index, focal_weight, self.cfg.dice_weight,
                               self.cfg.alpha, self.cfg.gamma)
        labelled = labels != self.ignore_index
        predicted = query_ids[logits.detach().argmax(dim=1)]
        pixel_acc = (predicted == labels)[labelled].float().mean() if labelled.any() else labels.new_zeros(())
        logs = {"loss": loss.detach(), "loss_focal": parts["focal"], "loss_dice": parts["dice"],
                "num_masks": parts["num_masks"], "self_training": torch.tensor(float(self_training)),
                "pixel_acc": pixel_acc.float()}
        return loss, logs

    def visible_labels(self, labels: Tensor, keep_unseen: bool) -> Tensor:
        """Labels the loss may see: seen ids kept; unseen ids kept only if `keep_unseen`; all else → ignore.

        Args:
            labels: int64 [B, H, W] global train ids.
            keep_unseen: True in the self-training phase (those pixels are then pseudo-labelled).
        """
        visible = self.seen_ids if not keep_unseen else torch.cat([self.seen_ids, self.unseen_ids])
        keep = torch.isin(labels, visible.to(labels.device))
        return torch.where(keep, labels, torch.full_like(labels, self.ignore_index))

    def predict_logits(self, model: nn.Module, pixels: Tensor) -> Tensor:
        """All-class mask logits resized to the input, for the evaluation engine (call `model.eval()` first).

        The release resizes logits bilinearly to the crop size before the sigmoid and seen penalty, so this
        returns them at pixel resolution; the engine applies sigmoid, subtracts `eval_seen_penalty` from the
        seen classes, slides and resizes to the original image.

        Args:
            pixels: float [B, 3, H, W], normalised.

        Returns:
            float [B, M_all, H, W] logits, channel i = global train id i.
        """
        with torch.no_grad():
            logits = model(pixels, None)
            return F.interpolate(logits, size=pixels.shape[-2:], mode="bilinear", align_corners=False)

    @property
    def eval_seen_penalty(self) -> float:
        """Seen-class sigmoid-score penalty at test time: 0.1 after inductive, 0.0 after transductive training."""
        return self.cfg.seen_penalty if self.cfg.mode == "inductive" else self.cfg.st_seen_penalty

    def normalise(self, images: Tensor) -> Tensor:
        """uint8/float [B, 3, H, W] RGB in 0..255 → float normalised with the configured mean/std."""
        mean, std = (torch.tensor(v, dtype=torch.float32, device=images.device).view(1, 3, 1, 1)
                     for v in PIXEL_STATS[self.cfg.pixel_norm])
        return (images.float() - mean) / std


def pseudo_label_unseen(logits: Tensor, labels: Tensor, query_ids: Tensor, unseen_ids: Tensor,
                        ignore_index: int = 255) -> Tensor:
    """Write online pseudo-labels into the pixels whose label is an unseen class (release's transductive "†").

    The pseudo-label is the argmax over the unseen classes of the (detached) logits, identical to the release's
    argmax of sigmoid scores with seen classes set to −1. No confidence threshold. Other pixels are unchanged.

    Args:
        logits: float [B, M_q, H, W], channel j = class query_ids[j].
        labels: int64 [B, H, W] global ids.
        query_ids: int64 [M_q].
        unseen_ids: int64 [U] unseen global ids (each must be in query_ids).
        ignore_index: unchanged label for unlabeled pixels.

    Returns:
        int64 [B, H, W] labels.
    """
    if unseen_ids.numel() == 0:
        return labels
    position = {int(c): j for j, c in enumerate(query_ids.tolist())}
    channels = torch.tensor([position[int(c)] for c in unseen_ids.tolist()], device=logits.device)
    pseudo = unseen_ids.to(labels.device)[logits.index_select(1, channels).argmax(dim=1)]
    on_unseen = torch.isin(labels, unseen_ids.to(labels.device)) & (labels != ignore_index)
    return torch.where(on_unseen, pseudo, labels)


def poly_warmup_lr(step: int, total_steps: int, base_lr: float, min_lr: float = 1e-6, power: float = 0.9,
                   warmup_iters: int = 1500, warmup_ratio: float = 1e-6) -> float:
    """mmcv `PolyLrUpdaterHook` with linear warmup, per iteration.

    regular = (base_lr − min_lr) · (1 − step / total_steps)^power + min_lr; during the first `warmup_iters` steps
    the lr is regular · (1 − (1 − step / warmup_iters) · (1 − warmup_ratio)).
    """
    progress = min(max(step, 0), total_steps) / max(total_steps, 1)
    regular = (base_lr - min_lr) * (1 - progress) ** power + min_lr
    if step < warmup_iters:
        return regular * (1 - (1 - step / warmup_iters) * (1 - warmup_ratio))
    return regular


def _visual_tower(clip_model: nn.Module) -> nn.Module:
    """The open_clip image tower of a CLIP model or of a wrapper holding one as `.model`."""
    visual = getattr(clip_model, "visual", None)
    if visual is None:
        visual = getattr(getattr(clip_model, "model", None), "visual", None)
    if visual is None:
        raise TypeError("clip_model must be an open_clip CLIP (with .visual) or a wrapper exposing it as .model")
    return visual
