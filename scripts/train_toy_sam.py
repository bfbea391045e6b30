"""Train the toy SAM (segment_anything architecture, ``model_type=toy``) for point-prompted masks on ToyWorld.

Targets are class-agnostic: every thing instance and every connected stuff region of a train scene. Each step
encodes ``--batch`` scenes (128 px, resized to the encoder's 256 px as at inference) and, per scene,
``--masks-per-image`` targets prompted by the same number (1-3, random) of foreground points drawn inside each
target. As in SAM, the three multimask outputs are scored and only the one with the lowest mask loss is trained
(focal x 20 + dice, at 128 px); the IoU head regresses the true IoU of all three outputs (MSE).
Evaluation on toy val: one point per segment (its most interior pixel), IoU of the best of the three masks and of
the mask SAM itself scores highest, for random init, the trained model, and a Felzenszwalb baseline.

    python scripts/train_toy_sam.py  # defaults below are the ones used for assets/models/toy_sam.pt
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from pipeline.data.toyworld import render_scene, split_seed
from pipeline.models.sam import Sam, SamConfig

MIN_SEGMENT_PIXELS = 24


def render_split(split: str, count: int, size: int) -> list[tuple[np.ndarray, list[np.ndarray]]]:
    """``count`` scenes of ``split`` as (HxWx3 uint8 image, segment masks bool HxW of >= MIN_SEGMENT_PIXELS)."""
    out = []
    for index in tqdm(range(count), desc=f"render {split}"):
        scene = render_scene(split_seed(split, index), size)
        out.append((scene.image, [m for _, m in scene.segments() if m.sum() >= MIN_SEGMENT_PIXELS]))
    return out


def interior_point(mask: np.ndarray) -> np.ndarray:
    """(x, y) pixel-centre coordinates of the mask pixel farthest from the mask's border, float [1, 2]."""
    from scipy import ndimage

    y, x = np.unravel_index(np.argmax(ndimage.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]), mask.shape)
    return np.array([[x + 0.5, y + 0.5]])


def mask_losses(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """20 x focal (alpha 0.25, gamma 2) + dice per output: logits [N, K, H, W], target [N, 1, H, W] -> [N, K]."""
    prob = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, target.expand_as(logits), reduction="none")
    p_t = prob * target + (1 - prob) * (1 - target)
    focal = (ce * (1 - p_t) ** 2 * (0.25 * target + 0.75 * (1 - target))).mean((-2, -1))
    dice = 1 - (2 * (prob * target).sum((-2, -1)) + 1) / (prob.sum((-2, -1)) + target.sum((-2, -1)) + 1)
    return 20 * focal + dice


def train_step(sam: Sam, batch: list, rng: np.random.Generator, masks_per_image: int) -> torch.Tensor:
    """Min-over-outputs mask loss + IoU-head MSE for a batch of (image, segments)."""
    model, size = sam.model, sam.image_size
    resized = [torch.from_numpy(sam.transform.apply_image(image)).permute(2, 0, 1) for image, _ in batch]
    pixels = model.preprocess(torch.stack(resized).float())  # same resize as at inference, then normalise and pad
    embeddings = model.image_encoder(pixels)
    losses = []
    for (image, segments), embedding in zip(batch, embeddings):
        chosen = rng.choice(len(segments), size=min(masks_per_image, len(segments)), replace=False)
        full = torch.from_numpy(np.stack([segments[k] for k in chosen])[:, None]).float()
        points_per_mask = int(rng.integers(1, 4))
        coords = [np.argwhere(segments[k])[rng.integers(segments[k].sum(), size=points_per_mask)] for k in chosen]
        coords = torch.tensor(np.stack(coords)[..., ::-1] + 0.5, dtype=torch.float32) * (size / image.shape[0])
        sparse, dense = model.prompt_encoder(points=(coords, torch.ones(coords.shape[:2])), boxes=None, masks=None)
        low_res, iou_pred = model.mask_decoder(image_embeddings=embedding[None],
                                               image_pe=model.prompt_encoder.get_dense_pe(),
                                               sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                               multimask_output=True)
        target = (F.interpolate(full, size=low_res.shape[-2:], mode="area") >= 0.5).float()
        logits = low_res
        with torch.no_grad():
            hard = (logits > 0).float()
            inter, union = (hard * target).sum((-2, -1)), ((hard + target) > 0).float().sum((-2, -1))
            true_iou = inter / union.clamp(min=1)
        losses.append(mask_losses(logits, target).min(1).values.mean() + F.mse_loss(iou_pred, true_iou))
    return torch.stack(losses).mean()


def iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two bool masks."""
    return float((a & b).sum() / max((a | b).sum(), 1))


def evaluate(sam: Sam, scenes: list) -> dict:
    """Mean IoU over val segments of SAM's best-of-3 mask and of its top-scored mask, one interior point each."""
    sam.model.eval()
    best, top = [], []
    for image, segments in scenes:
        results = sam.predict_points(image, [interior_point(m) for m in segments])
        for mask, (masks, scores) in zip(segments, results):
            ious = [iou(mask, m) for m in masks]
            best.append(max(ious))
            top.append(ious[int(np.argmax(scores))])
    return {"best_of_3_mIoU": float(np.mean(best) * 100), "top_score_mIoU": float(np.mean(top) * 100),
            "num_prompts": len(best)}


def felzenszwalb_baseline(scenes: list) -> dict:
    """Mean IoU of the Felzenszwalb segment (scale 100, sigma 0.5, min size 20) under each interior point."""
    from skimage.segmentation import felzenszwalb

    ious = []
    for image, segments in scenes:
        regions = felzenszwalb(image, scale=100, sigma=0.5, min_size=20)
        for mask in segments:
            x, y = interior_point(mask)[0].astype(int)
            ious.append(iou(mask, regions == regions[y, x]))
    return {"felzenszwalb_mIoU": float(np.mean(ious) * 100)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--masks-per-image", type=int, default=6)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--train-images", type=int, default=600)
    parser.add_argument("--val-images", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)  # 2 threads on a shared 2-core box: 5-10x slower
    parser.add_argument("--init", type=str, default=None, help="checkpoint to continue from (default: random init)")
    parser.add_argument("--out", type=Path, default=Path("assets/models/toy_sam.pt"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    sam = Sam.build(SamConfig(model_type="toy", checkpoint=args.init, init_seed=args.seed))
    train, val = render_split("train", args.train_images, 128), render_split("val", args.val_images, 128)
    report = {"init": evaluate(sam, val) | felzenszwalb_baseline(val)}
    print(json.dumps(report["init"]))
    optimizer = torch.optim.AdamW(sam.model.parameters(), lr=args.lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=args.lr, total_steps=args.steps, pct_start=0.05)
    sam.model.train()
    for _ in (bar := tqdm(range(args.steps), desc="train sam")):
        batch = [train[i] for i in rng.integers(len(train), size=args.batch)]
        loss = train_step(sam, batch, rng, args.masks_per_image)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(sam.model.state_dict(), args.out)
    report["trained"] = evaluate(Sam.build(SamConfig(model_type="toy", checkpoint=str(args.out))), val)
    report["args"] = {k: str(v) for k, v in vars(args).items()}
    print(json.dumps(report["trained"]))
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
