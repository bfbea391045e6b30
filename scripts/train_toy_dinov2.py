"""Train the toy DINOv2 (transformers ``Dinov2Model``, ``toy`` preset) self-supervised on ToyWorld: no labels.

DINO self-distillation (Caron et al. 2021) on the CLS token plus iBOT masked patch prediction (Zhou et al. 2022),
the two losses DINOv2 combines (Oquab et al. 2023, separate heads, as there):

* Multi-crop: 2 global crops (``--global-scale`` of the scene's area, resized to ``--global-size`` px, 8 x 8
  patches at 112) and ``--local-crops`` local crops (``--local-scale``, ``--local-size`` px). Every crop gets its
  own flip and colour augmentation: hue rotation about the grey axis, saturation, contrast and brightness factors,
  and greyscale with ``--grey-p``. ToyWorld's classes are colour-coded, so with weak colour augmentation a view's
  colour alone matches its partner and a random network already separates the classes; strong hue/greyscale
  forces the views to agree on texture, shape and layout instead.
* Teacher = EMA of the student (momentum cosine ``--momentum`` -> 1), sees the global crops unmasked; its
  outputs are centred (EMA centre, 0.9) and sharpened (``--teacher-temp``); student temperature 0.1.
* DINO loss: cross-entropy of each teacher global view's CLS distribution against every other student view.
* iBOT loss: the student sees each global crop with a random ``--mask-ratio`` of its patches replaced by the mask
  token (``bool_masked_pos``); cross-entropy of the teacher's patch distribution against the student's at the
  masked patches.
* Optional dense cross-view loss (``--dense-weight``, off for the committed checkpoint), a dense DINO between the
  two global crops: both crops' patch tokens are resampled (``roi_align``) on a 4 x 4 lattice over the crops'
  intersection (the correspondence is the crops' known geometry, as in Leopart), flipped crops turned back to
  scene orientation, and each crop's student patch distribution learns the other crop's centred, sharpened
  teacher distribution at the same scene points.
* Heads: MLP D -> 256 -> 256 -> 64, L2-normalised, then a weight-normalised linear layer to ``--prototypes``.

Evaluation (before and after, same protocol): a linear probe on frozen final-layer patch tokens (the features the
alignment module reads, 112 px input -> 8 x 8 grid for a 128 px scene), fitted on ``--probe-train`` train scenes
(each patch labelled with its majority class) and scored as mIoU on ``--probe-val`` val scenes (logits upsampled
bilinearly to 128 px); also on the same val scenes with their hues rotated 120 degrees (colour-shift probe). Saves
the backbone as a transformers-layout state dict (fp32), loadable with ``Dinov2Config(name="toy", weights=...)``.

    nice -n 10 python scripts/train_toy_dinov2.py  # defaults are the ones used for assets/models/toy_dinov2.pt

``--supervised-bound`` trains the same backbone on the scenes' patch labels instead (an upper bound for the probe;
it uses labels, so its output never goes into assets/).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.ops import roi_align
from tqdm import tqdm

from pipeline.data.toyworld import CLASS_NAMES, render_scene, split_seed
from pipeline.metrics import ConfusionMatrix, compute_metrics
from pipeline.models.configs import Dinov2Config
from pipeline.models.dinov2 import Dinov2
from pipeline.models.preprocess import IMAGENET_MEAN, IMAGENET_STD

DENSE_GRID = 4  # points per side sampled over two global crops' intersection for the dense cross-view loss
MEAN, STD = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)


def render_split(split: str, count: int, size: int = 128) -> tuple[torch.Tensor, np.ndarray]:
    """(N, 3, size, size) float [0, 1] images and (N, size, size) uint8 labels of ``count`` scenes of ``split``."""
    scenes = [render_scene(split_seed(split, i), size) for i in tqdm(range(count), desc=f"render {split}")]
    images = torch.from_numpy(np.stack([s.image for s in scenes])).permute(0, 3, 1, 2).float() / 255
    return images, np.stack([s.label for s in scenes])


def hue_rotate(images: torch.Tensor, angle: torch.Tensor) -> torch.Tensor:
    """Rotate RGB (B, 3, H, W) about the grey axis (1, 1, 1)/sqrt(3) by ``angle`` (B,) radians (Rodrigues)."""
    axis = torch.full((3,), 3 ** -0.5)
    cross = torch.tensor([[0.0, -axis[2], axis[1]], [axis[2], 0.0, -axis[0]], [-axis[1], axis[0], 0.0]])
    cos, sin = angle.cos().view(-1, 1, 1), angle.sin().view(-1, 1, 1)
    rotation = cos * torch.eye(3) + sin * cross + (1 - cos) * torch.outer(axis, axis)
    return torch.einsum("bij,bjhw->bihw", rotation, images)


def colour_augment(images: torch.Tensor, gen: torch.Generator, strength: float, grey_p: float) -> torch.Tensor:
    """Per-image hue rotation (+-pi*strength), saturation/contrast/brightness factors, greyscale; [0, 1] in and out."""
    batch = len(images)
    uniform = lambda low, high: low + (high - low) * torch.rand(batch, generator=gen)  # noqa: E731
    x = hue_rotate(images, uniform(-math.pi * strength, math.pi * strength))
    grey = (x * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
    x = grey + uniform(1 - strength, 1 + strength).view(-1, 1, 1, 1) * (x - grey)  # saturation
    mean = grey.mean((2, 3), keepdim=True)
    x = mean + uniform(1 - strength / 2, 1 + strength / 2).view(-1, 1, 1, 1) * (x - mean)  # contrast
    x = x * uniform(1 - strength / 2, 1 + strength / 2).view(-1, 1, 1, 1)  # brightness
    to_grey = (torch.rand(batch, generator=gen) < grey_p).view(-1, 1, 1, 1)
    x = torch.where(to_grey, (x * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True), x)
    return x.clamp(0, 1)


def random_crops(images: torch.Tensor, gen: torch.Generator, count: int, scale: tuple[float, float], out: int,
                 args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``count`` random square crops per image (area fraction in ``scale``), flipped and colour-augmented, ImageNet-
    normalised: (count * B, 3, out, out), crop-major; also each crop's box (count * B, 4) as x0, y0, x1, y1 in
    scene pixels and its flip flag (count * B,) bool."""
    batch, size = len(images), images.shape[-1]
    area = scale[0] + (scale[1] - scale[0]) * torch.rand(count * batch, generator=gen)
    side = (area.sqrt() * size).clamp(min=4)
    x0, y0 = (torch.rand(2, count * batch, generator=gen) * (size - side)).unbind()
    index = torch.arange(batch).repeat(count).float()
    boxes = torch.stack([x0, y0, x0 + side, y0 + side], 1)
    crops = roi_align(images, torch.cat([index[:, None], boxes], 1), out, spatial_scale=1.0, sampling_ratio=2,
                      aligned=True)
    flip = torch.rand(count * batch, generator=gen) < 0.5
    crops = colour_augment(torch.where(flip.view(-1, 1, 1, 1), crops.flip(-1), crops), gen, args.colour_strength,
                           args.grey_p)
    return (crops - MEAN) / STD, boxes, flip


def overlap_tokens(tokens: torch.Tensor, boxes: torch.Tensor, flip: torch.Tensor, region: torch.Tensor,
                   grid: int) -> torch.Tensor:
    """Patch tokens (C, N, D) of C crops resampled on a ``grid`` x ``grid`` lattice over ``region`` (C, 4), a box in
    scene pixels inside each crop's ``boxes`` (C, 4): (C, grid, grid, D), columns in scene orientation (a flipped
    crop's lattice is flipped back), so row c of two crops of one scene covering one region are the same points."""
    count, patches, dim = tokens.shape
    side = math.isqrt(patches)
    maps = tokens.transpose(1, 2).reshape(count, dim, side, side)
    scale = side / (boxes[:, 2] - boxes[:, 0])
    x0, x1 = (region[:, 0] - boxes[:, 0]) * scale, (region[:, 2] - boxes[:, 0]) * scale
    y0, y1 = (region[:, 1] - boxes[:, 1]) * scale, (region[:, 3] - boxes[:, 1]) * scale
    x0, x1 = torch.where(flip, side - x1, x0), torch.where(flip, side - x0, x1)
    rois = torch.stack([torch.arange(count, dtype=tokens.dtype), x0, y0, x1, y1], 1)
    sampled = roi_align(maps, rois, grid, spatial_scale=1.0, sampling_ratio=2, aligned=True)
    sampled = torch.where(flip.view(-1, 1, 1, 1), sampled.flip(-1), sampled)
    return sampled.permute(0, 2, 3, 1)


class Head(torch.nn.Module):
    """DINO/iBOT projection head: MLP D -> 256 -> 256 -> 64, L2 norm, weight-normalised linear -> K logits."""

    def __init__(self, dim: int, prototypes: int, norm_last_layer: bool = False) -> None:
        super().__init__()
        self.mlp = torch.nn.Sequential(torch.nn.Linear(dim, 256), torch.nn.GELU(), torch.nn.Linear(256, 256),
                                       torch.nn.GELU(), torch.nn.Linear(256, 64))
        self.last = torch.nn.utils.parametrizations.weight_norm(torch.nn.Linear(64, prototypes, bias=False))
        if norm_last_layer:  # DINO's norm_last_layer: prototype norms fixed at 1 (weight decay cannot shrink them)
            magnitude = self.last.parametrizations.weight.original0
            magnitude.data.fill_(1.0)
            magnitude.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., D) tokens -> (..., K) logits."""
        return self.last(F.normalize(self.mlp(x), dim=-1))


class Student(torch.nn.Module):
    """Backbone + CLS head (DINO) + patch head (iBOT)."""

    def __init__(self, backbone: torch.nn.Module, prototypes: int, norm_last_layer: bool = False) -> None:
        super().__init__()
        dim = backbone.config.hidden_size
        self.backbone = backbone
        self.cls_head, self.patch_head = (Head(dim, prototypes, norm_last_layer) for _ in range(2))

    def forward(self, pixels: torch.Tensor, mask: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, 3, H, W) -> CLS logits (B, K), patch logits (B, N, K) and the patch tokens (B, N, D); ``mask`` (B, N)
        bool = masked patches."""
        tokens = self.backbone(pixel_values=pixels, bool_masked_pos=mask).last_hidden_state
        return self.cls_head(tokens[:, 0]), self.patch_head(tokens[:, 1:]), tokens[:, 1:]


def sharpen(logits: torch.Tensor, center: torch.Tensor, temp: float) -> torch.Tensor:
    """Teacher targets: softmax((logits - center) / temp)."""
    return F.softmax((logits - center) / temp, dim=-1)


def cross_view_patch_loss(student: Student, teacher: Student, s_tokens: torch.Tensor, t_tokens: torch.Tensor,
                          boxes: torch.Tensor, flip: torch.Tensor, center: torch.Tensor, temp: float) -> torch.Tensor:
    """Dense DINO between the two global crops of each scene: the teacher's patch distribution of one crop against
    the student's of the other at the same scene points, a ``DENSE_GRID`` x ``DENSE_GRID`` lattice over the crops'
    intersection, both directions; scenes whose crops overlap by less than one patch are left out.

    ``s_tokens``, ``t_tokens``: (2B, N, D) crop-major (crop 1 of every scene, then crop 2); ``boxes`` (2B, 4) and
    ``flip`` (2B,) as ``random_crops`` returns them."""
    first, second = boxes.chunk(2)
    region = torch.cat([torch.maximum(first[:, :2], second[:, :2]), torch.minimum(first[:, 2:], second[:, 2:])], 1)
    patch_side = (first[:, 2] - first[:, 0]).minimum(second[:, 2] - second[:, 0]) / math.isqrt(s_tokens.shape[1])
    valid = (region[:, 2:] - region[:, :2]).amin(1) >= patch_side
    if not valid.any():
        return s_tokens.sum() * 0
    region = torch.cat([region, region])
    s_logits = student.patch_head(overlap_tokens(s_tokens, boxes, flip, region, DENSE_GRID)) / 0.1
    with torch.no_grad():
        targets = sharpen(teacher.patch_head(overlap_tokens(t_tokens, boxes, flip, region, DENSE_GRID)), center, temp)
    swapped = torch.cat(targets.chunk(2)[::-1])  # crop 1's student points learn from crop 2's teacher, and back
    per_point = -(swapped * s_logits.log_softmax(-1)).sum(-1).mean((1, 2))
    return (per_point * torch.cat([valid, valid])).sum() / (2 * valid.sum())


def ssl_loss(student: Student, teacher: Student, views: tuple, state: dict, args: argparse.Namespace,
             gen: torch.Generator) -> dict[str, torch.Tensor]:
    """DINO (CLS, cross-view) + iBOT (masked patches) + optional dense cross-view loss for one batch (the terms by
    name); updates the teacher centres in ``state``. ``views``: (global crops, their boxes, their flips, local
    crops) as ``random_crops`` returns them."""
    global_crops, boxes, flip, local_crops = views
    with torch.no_grad():
        t_cls, t_patch, t_tokens = teacher(global_crops)
    patches = t_patch.shape[1]
    mask = torch.rand(len(global_crops), patches, generator=gen) < args.mask_ratio
    s_cls, s_patch, s_tokens = student(global_crops, mask)
    s_local = student.cls_head(student.backbone(pixel_values=local_crops).last_hidden_state[:, 0])
    targets = sharpen(t_cls, state["cls_center"], args.teacher_temp).chunk(2)
    student_views = list((s_cls / 0.1).chunk(2)) + list((s_local / 0.1).chunk(args.local_crops))
    terms = [-(t * s.log_softmax(-1)).sum(-1).mean() for i, t in enumerate(targets)
             for j, s in enumerate(student_views) if j != i]
    losses = {"dino": torch.stack(terms).mean()}
    patch_targets = sharpen(t_patch, state["patch_center"], args.teacher_temp)
    per_patch = -(patch_targets * (s_patch / 0.1).log_softmax(-1)).sum(-1)
    losses["ibot"] = (per_patch * mask).sum() / mask.sum().clamp(min=1)
    if args.dense_weight > 0:
        losses["dense"] = args.dense_weight * cross_view_patch_loss(
            student, teacher, s_tokens, t_tokens, boxes, flip, state["patch_center"], args.teacher_temp)
    state["cls_center"] = 0.9 * state["cls_center"] + 0.1 * t_cls.mean(0)
    state["patch_center"] = 0.9 * state["patch_center"] + 0.1 * t_patch.mean((0, 1))
    return losses


def resized_pixels(images: torch.Tensor, size: int) -> torch.Tensor:
    """(B, 3, H, W) [0, 1] images -> (B, 3, size, size) bilinear (antialiased), ImageNet-normalised."""
    return (F.interpolate(images, size=size, mode="bilinear", antialias=True) - MEAN) / STD


@torch.no_grad()
def patch_features(backbone: torch.nn.Module, images: torch.Tensor, size: int) -> torch.Tensor:
    """Frozen final-layer patch tokens (B, D, size/14, size/14) of [0, 1] images resized to ``size`` px."""
    wrapper = Dinov2(backbone.eval(), Dinov2Config(name="toy"), identity="probe")
    pixels = resized_pixels(images, size)
    return torch.cat([wrapper.patch_features(chunk) for chunk in pixels.split(64)])


def patch_majority(labels: np.ndarray, grid: int) -> torch.Tensor:
    """(B, S, S) labels -> (B, grid, grid) majority class per patch cell."""
    b, s, _ = labels.shape
    cells = labels.reshape(b, grid, s // grid, grid, s // grid).transpose(0, 1, 3, 2, 4).reshape(b, grid, grid, -1)
    counts = np.stack([(cells == c).sum(-1) for c in range(len(CLASS_NAMES))], -1)
    return torch.from_numpy(counts.argmax(-1))


def probe_data(train_images: torch.Tensor, train_labels: np.ndarray, val_count: int) -> dict:
    """The linear probe's scenes: the given train scenes (images, labels) and the first ``val_count`` val scenes."""
    val_images, val_labels = render_split("val", val_count)
    return {"probe_images": train_images, "probe_labels": train_labels, "val_images": val_images,
            "val_labels": val_labels}


def linear_probe(backbone: torch.nn.Module, data: dict, args: argparse.Namespace) -> dict:
    """Fit a linear classifier on train patch tokens (majority labels); val mIoU/pAcc at 128 px, plain and hue-
    rotated by 120 degrees."""
    train = patch_features(backbone, data["probe_images"], args.global_size)
    grid = train.shape[-1]
    x = train.permute(0, 2, 3, 1).reshape(-1, train.shape[1])
    y = patch_majority(data["probe_labels"], grid).reshape(-1)
    mean, std = x.mean(0), x.std(0) + 1e-6
    probe = torch.nn.Linear(x.shape[1], len(CLASS_NAMES))
    optimizer = torch.optim.AdamW(probe.parameters(), lr=1e-2, weight_decay=1e-4)
    for _ in range(300):
        loss = F.cross_entropy(probe((x - mean) / std), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    result = {}
    shifted = hue_rotate(data["val_images"], torch.full((len(data["val_images"]),), 2 * math.pi / 3)).clamp(0, 1)
    for name, images in (("probe", data["val_images"]), ("probe_hue120", shifted)):
        feats = patch_features(backbone, images, args.global_size)
        with torch.no_grad():
            logits = probe((feats.permute(0, 2, 3, 1) - mean) / std).permute(0, 3, 1, 2)
        logits = F.interpolate(logits, size=data["val_labels"].shape[-2:], mode="bilinear")
        matrix = ConfusionMatrix(len(CLASS_NAMES))
        matrix.update(logits.argmax(1).numpy().astype(np.uint8), data["val_labels"])
        metrics = compute_metrics(matrix, CLASS_NAMES)
        result |= {f"{name}_mIoU": metrics["mIoU"], f"{name}_pAcc": metrics["pAcc"]}
    return result


def train(student: Student, images: torch.Tensor, args: argparse.Namespace) -> list[dict]:
    """The SSL loop; returns a loss log every ``--log-every`` steps."""
    teacher = copy.deepcopy(student).requires_grad_(False)
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.04)
    warmup = max(1, args.steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warmup, 0.5 * (1 + math.cos(math.pi * min(s, args.steps) / args.steps))))
    gen = torch.Generator().manual_seed(args.seed)
    prototypes = args.prototypes
    state = {"cls_center": torch.zeros(prototypes), "patch_center": torch.zeros(prototypes)}
    log, start = [], time.time()
    for step in (bar := tqdm(range(args.steps), desc="train dinov2")):
        batch = images[torch.randint(len(images), (args.batch,), generator=gen)]
        views = (*random_crops(batch, gen, 2, args.global_scale, args.global_size, args),
                 random_crops(batch, gen, args.local_crops, args.local_scale, args.local_size, args)[0])
        student.train()
        losses = ssl_loss(student, teacher, views, state, args, gen)
        optimizer.zero_grad(set_to_none=True)
        sum(losses.values()).backward()
        torch.nn.utils.clip_grad_norm_(params, 3.0)
        optimizer.step()
        schedule.step()
        momentum = 1 - (1 - args.momentum) * (1 + math.cos(math.pi * step / args.steps)) / 2
        with torch.no_grad():
            for t, s in zip(teacher.parameters(), student.parameters()):
                t.mul_(momentum).add_(s.detach(), alpha=1 - momentum)
        bar.set_postfix({name: f"{value.item():.3f}" for name, value in losses.items()})
        if (step + 1) % args.log_every == 0:
            log.append({"step": step + 1, **{n: v.item() for n, v in losses.items()}, "s": round(time.time() - start)})
    student.backbone.load_state_dict(teacher.backbone.state_dict())  # the teacher is the model DINO keeps
    return log


def train_supervised_bound(backbone: torch.nn.Module, images: torch.Tensor, labels: np.ndarray,
                           args: argparse.Namespace) -> list[dict]:
    """Upper bound, uses labels (never for assets/): the backbone + a 1x1 conv head trained end to end with
    cross-entropy on each patch's majority label, whole scenes at ``--global-size`` px, AdamW ``--lr``, ``--steps``
    steps of ``--batch`` scenes. Shows what the architecture's patch tokens can carry for the linear probe."""
    backbone.train()
    grid = args.global_size // backbone.config.patch_size
    head = torch.nn.Conv2d(backbone.config.hidden_size, len(CLASS_NAMES), 1)
    params = [*backbone.parameters(), *head.parameters()]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.04)
    targets = patch_majority(labels, grid)
    gen = torch.Generator().manual_seed(args.seed)
    log, start = [], time.time()
    for step in (bar := tqdm(range(args.steps), desc="train dinov2 (supervised bound)")):
        index = torch.randint(len(images), (args.batch,), generator=gen)
        tokens = backbone(pixel_values=resized_pixels(images[index], args.global_size)).last_hidden_state[:, 1:]
        logits = head(tokens.transpose(1, 2).reshape(len(index), -1, grid, grid))
        loss = F.cross_entropy(logits, targets[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        bar.set_postfix(ce=f"{loss.item():.3f}")
        if (step + 1) % args.log_every == 0:
            log.append({"step": step + 1, "ce": loss.item(), "s": round(time.time() - start)})
    return log


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--steps", type=int, default=400)
    add("--batch", type=int, default=24)
    add("--lr", type=float, default=2e-3)
    add("--prototypes", type=int, default=1024)
    add("--teacher-temp", type=float, default=0.04)
    add("--norm-last-layer", action="store_true",
        help="fix the heads' prototype norms at 1 (DINO's norm_last_layer); off for the committed checkpoint")
    add("--momentum", type=float, default=0.99, help="initial teacher EMA momentum (cosine to 1)")
    add("--mask-ratio", type=float, default=0.3)
    add("--dense-weight", type=float, default=0.0,
        help="weight of the dense cross-view patch loss (0: off, the committed checkpoint's recipe)")
    add("--global-size", type=int, default=112)
    add("--local-size", type=int, default=56)
    add("--global-scale", type=float, nargs=2, default=(0.35, 1.0))
    add("--local-scale", type=float, nargs=2, default=(0.08, 0.35))
    add("--local-crops", type=int, default=4)
    add("--colour-strength", type=float, default=0.8, help="hue +-pi*s; saturation 1+-s; contrast, brightness 1+-s/2")
    add("--grey-p", type=float, default=0.5)
    add("--train-images", type=int, default=1000)
    add("--probe-train", type=int, default=200)
    add("--probe-val", type=int, default=200)
    add("--log-every", type=int, default=100)
    add("--seed", type=int, default=0)
    add("--threads", type=int, default=1)
    add("--supervised-bound", action="store_true",
        help="train with the scenes' labels instead (an upper bound for the probe, uses labels; not for assets/)")
    add("--init", type=str, default=None, help="state dict to continue from (default: seeded random init)")
    add("--out", type=Path, default=Path("assets/models/toy_dinov2.pt"))
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    backbone = Dinov2.build(Dinov2Config(name="toy", weights=args.init, init_seed=args.seed, device="cpu")).model
    images, labels = render_split("train", args.train_images)
    data = probe_data(images[: args.probe_train], labels[: args.probe_train], args.probe_val)
    report = {"init": linear_probe(backbone, data, args)}
    print(json.dumps(report["init"]), flush=True)
    if args.supervised_bound:
        report["log"] = train_supervised_bound(backbone, images, labels, args)
    else:
        student = Student(backbone, args.prototypes, args.norm_last_layer)
        report["log"] = train(student, images, args)
        backbone = student.backbone
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.contiguous() for k, v in backbone.state_dict().items()}, args.out)
    trained = Dinov2.build(Dinov2Config(name="toy", weights=str(args.out), device="cpu")).model  # as the demo loads it
    report["trained"] = linear_probe(trained, data, args)
    report["args"] = {k: str(v) for k, v in vars(args).items()}
    print(json.dumps(report["trained"]), flush=True)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
