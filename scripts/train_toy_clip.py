"""Train the toy CLIP (open_clip ``toy-vit``) contrastively on ToyWorld images with image-level captions only.

Each step takes random square crops (50-100 % of the side, random flip) of pre-rendered 128 px train scenes,
resized to the model's 64 px. A crop's caption lists, in random order, the classes covering at least
``--min-fraction`` of it ("a photo of grass, sky, a car and a dog."); masks are never used. Loss = symmetric
InfoNCE between crops and captions + cross-entropy between each crop and the 12 single-class prompts (a random
ZegCLIP template per step); both with soft targets (several crops of a batch may share a caption / classes).
Evaluation on toy val: zero-shot classification with "a photo of a {}." and MaskCLIP dense argmax segmentation.

    python scripts/train_toy_clip.py  # defaults below are the ones used for assets/models/toy_clip.pt
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from pipeline.data.toyworld import CLASS_NAMES, render_scene, split_seed
from pipeline.metrics import ConfusionMatrix, compute_metrics
from pipeline.models.clip import Clip, ClipConfig
from pipeline.models.clip_dense import visual_forward
from pipeline.models.prompts import SINGLE, ZEGCLIP_15

CAPTION_TEMPLATES = ("a photo of {}.", "a scene with {}.", "{}.")


def render_split(split: str, count: int, size: int) -> tuple[torch.Tensor, np.ndarray]:
    """(N, 3, size, size) uint8 images and (N, size, size) uint8 labels of ``count`` scenes of ``split``."""
    scenes = [render_scene(split_seed(split, i), size) for i in tqdm(range(count), desc=f"render {split}")]
    images = torch.from_numpy(np.stack([s.image for s in scenes])).permute(0, 3, 1, 2).contiguous()
    return images, np.stack([s.label for s in scenes])


def normalise(images: torch.Tensor, clip: Clip) -> torch.Tensor:
    """uint8 or [0, 255] float (B, 3, H, W) -> CLIP-normalised float."""
    mean, std = torch.tensor(clip.mean).view(1, 3, 1, 1), torch.tensor(clip.std).view(1, 3, 1, 1)
    return (images.float() / 255 - mean) / std


def sample_crops(images: torch.Tensor, labels: np.ndarray, rng: np.random.Generator, batch: int, out: int,
                 min_fraction: float) -> tuple[torch.Tensor, np.ndarray]:
    """Random crops resized to ``out`` px (float 0-255, (B, 3, out, out)) and their (B, 12) class presence."""
    from torchvision.ops import roi_align

    size = images.shape[-1]
    index = rng.integers(len(images), size=batch)
    side = rng.integers(size // 2, size + 1, size=batch)
    x0, y0 = rng.integers(0, size - side + 1), rng.integers(0, size - side + 1)
    boxes = torch.tensor(np.stack([np.arange(batch), x0, y0, x0 + side, y0 + side], 1), dtype=torch.float32)
    crops = roi_align(images[index].float(), boxes, out, spatial_scale=1.0, sampling_ratio=2, aligned=True)
    crops = torch.where(torch.from_numpy(rng.uniform(size=batch) < 0.5).view(-1, 1, 1, 1), crops.flip(-1), crops)
    presence = np.stack([np.bincount(labels[i, b:b + s, a:a + s].ravel(), minlength=len(CLASS_NAMES)) / s**2
                         for i, a, b, s in zip(index, x0, y0, side)]) >= min_fraction
    return crops, presence


def caption(present: np.ndarray, rng: np.random.Generator) -> str:
    """"a photo of grass, sky, a car and a dog." style caption: stuff without, things with an article."""
    words = [CLASS_NAMES[c] if c < 7 else f"a {CLASS_NAMES[c]}" for c in rng.permutation(np.flatnonzero(present))]
    listed = words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]
    return CAPTION_TEMPLATES[rng.integers(len(CAPTION_TEMPLATES))].format(listed)


def encode_text(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """open_clip text tower on tokens cut after the last end-of-text token, unit norm.

    The causal mask makes the end-of-text features independent of the padding after it, so this equals
    ``model.encode_text`` on the full 77 tokens at a fraction of the cost.
    """
    length = int(tokens.argmax(-1).max()) + 1
    tokens = tokens[:, :length]
    x = model.token_embedding(tokens) + model.positional_embedding[:length]
    x = model.ln_final(model.transformer(x, attn_mask=model.attn_mask[:length, :length]))
    return F.normalize(x[torch.arange(len(x)), tokens.argmax(-1)] @ model.text_projection, dim=-1)


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over rows of -sum(targets * log_softmax(logits)); rows of ``targets`` sum to 1."""
    return -(targets * logits.log_softmax(-1)).sum(-1).mean()


def train_step(clip: Clip, crops: torch.Tensor, presence: np.ndarray, rng: np.random.Generator) -> torch.Tensor:
    """Caption InfoNCE + class-prompt cross-entropy for one batch; returns the loss."""
    model = clip.model
    image, _ = visual_forward(model.visual, normalise(crops, clip), dense=False)
    captions = clip.tokenizer([caption(p, rng) for p in presence])
    template = ZEGCLIP_15[rng.integers(len(ZEGCLIP_15))]
    text = encode_text(model, torch.cat([captions, clip.tokenizer([template.format(n) for n in CLASS_NAMES])]))
    scale = model.logit_scale.exp().clamp(max=100)
    same = torch.from_numpy((presence[:, None] == presence[None]).all(-1)).float()
    pair_logits = scale * image @ text[: len(crops)].T
    has = torch.from_numpy(presence).float()
    contrastive = (soft_cross_entropy(pair_logits, same / same.sum(1, keepdim=True))
                   + soft_cross_entropy(pair_logits.T, same / same.sum(1, keepdim=True))) / 2
    classes = soft_cross_entropy(scale * image @ text[len(crops):].T, has / has.sum(1, keepdim=True).clamp(min=1))
    return contrastive + classes


def average_precision(scores: np.ndarray, positive: np.ndarray) -> float:
    """AP of one class: mean precision at the rank of each positive (scores descending)."""
    hits = positive[np.argsort(-scores, kind="stable")]
    return float((np.cumsum(hits) / np.arange(1, len(hits) + 1))[hits].mean()) if hits.any() else math.nan


@torch.no_grad()
def evaluate(clip: Clip, images: torch.Tensor, labels: np.ndarray, min_fraction: float) -> dict:
    """Zero-shot classification (top-1 of the dominant class, mAP, recall@#present) and dense mIoU at 64/128 px."""
    clip.model.eval()
    clip._text_cache.clear()
    text = clip.encode_text(CLASS_NAMES, SINGLE)
    fractions = np.stack([np.bincount(lab.ravel(), minlength=len(CLASS_NAMES)) / lab.size for lab in labels])
    present = fractions >= min_fraction
    small = F.interpolate(images.float(), size=clip.image_size, mode="bilinear", antialias=True)
    scores = (clip.encode_image(normalise(small, clip)) @ text.T).numpy()
    ranked = np.argsort(-scores, 1)
    recall = np.mean([present[i, ranked[i, :k]].mean() for i, k in enumerate(present.sum(1))])
    result = {"top1_dominant": float((ranked[:, 0] == fractions.argmax(1)).mean() * 100),
              "mAP": float(np.nanmean([average_precision(scores[:, c], present[:, c]) for c in range(12)]) * 100),
              "recall_at_present": float(recall * 100)}
    for name, pixels in (("dense64", small), ("dense128", images.float())):
        patch, _ = clip.dense_features(normalise(pixels, clip))
        logits = F.interpolate(torch.einsum("bdhw,cd->bchw", patch, text), size=labels.shape[-2:], mode="bilinear")
        matrix = ConfusionMatrix(len(CLASS_NAMES))
        matrix.update(logits.argmax(1).numpy().astype(np.uint8), labels)
        metrics = compute_metrics(matrix, CLASS_NAMES)
        result |= {f"{name}_mIoU": metrics["mIoU"], f"{name}_pAcc": metrics["pAcc"]}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--weight-decay", type=float, default=0.05)
    parser.add_argument("--train-images", type=int, default=2000)
    parser.add_argument("--val-images", type=int, default=200)
    parser.add_argument("--min-fraction", type=float, default=0.005)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)  # 2 threads on a shared 2-core box: 5-10x slower
    parser.add_argument("--init", type=str, default=None, help="checkpoint to continue from (default: random init)")
    parser.add_argument("--out", type=Path, default=Path("assets/models/toy_clip.pt"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    clip = Clip.build(ClipConfig(model_name="toy-vit", pretrained=args.init, init_seed=args.seed))
    train_images, train_labels = render_split("train", args.train_images, 128)
    val_images, val_labels = render_split("val", args.val_images, 128)
    report = {"init": evaluate(clip, val_images, val_labels, args.min_fraction)}
    print(json.dumps(report["init"]))
    clip.model.token_embedding.requires_grad_(False)  # word identity is already in the random rows; saves time
    trainable = [p for p in clip.model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=args.weight_decay)
    warmup = max(1, args.steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min((s + 1) / warmup, 0.5 + 0.5 * math.cos(
        math.pi * min(s, args.steps) / args.steps)))
    clip.model.train()
    for _ in (bar := tqdm(range(args.steps), desc="train clip")):
        crops, presence = sample_crops(train_images, train_labels, rng, args.batch, clip.image_size, args.min_fraction)
        loss = train_step(clip, crops, presence, rng)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.half() if v.is_floating_point() else v for k, v in clip.model.state_dict().items()}, args.out)
    trained = Clip.build(ClipConfig(model_name="toy-vit", pretrained=str(args.out)))  # fp16 file, as the demo loads it
    report["trained"] = evaluate(trained, val_images, val_labels, args.min_fraction)
    report["args"] = {k: str(v) for k, v in vars(args).items()}
    print(json.dumps(report["trained"]))
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
