"""Per-method training recipes: on a training worker, what each method trains, on which batches, with which loss.

A recipe turns `RecipeInputs` (the typed train config, vocabulary, upstream outputs, device) into a
`pipeline.train.loop.Recipe`: the network built by `pipeline.methods.registry`, its optimiser, the loss closure,
the batch stream and the learning-rate schedule. Batches of image methods are square crops
`{"pixels": float [B, 3, S, S] in [0, 1], "labels": int64 [B, S, S]}`; word-grid batches `{"grids": [B x int64
[U, V]]}`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from pipeline.data.vocab import Vocabulary
from pipeline.methods.configs import PIXEL_STATS
from pipeline.methods.registry import METHODS, BuiltMethod, dinov2_features
from pipeline.models.preprocess import normalize
from pipeline.shards import StageOutput
from pipeline.train.batches import ImageLabelDecoder, batches_from, decode_grid, stack_images
from pipeline.train.checkpoints import load_trainable_state, read_model
from pipeline.train.configs import AugmentConfig
from pipeline.train.loop import Recipe, lr_schedule

if TYPE_CHECKING:
    from stages.train.stage import TrainConfig


@dataclass
class RecipeInputs:
    """What a recipe needs on one training worker.

    Attributes:
        cfg: the node's typed config.
        vocab: the training vocabulary.
        upstream: input port -> upstream output (`grids`, `images`, optional `init`).
        seed: the run seed (data order and augmentation streams derive from it).
        device: this worker's device.
        per_rank_batch: samples per step on this worker (global batch / world size).
    """

    cfg: TrainConfig
    vocab: Vocabulary
    upstream: Mapping[str, StageOutput]
    seed: int
    device: torch.device
    per_rank_batch: int


def build(inputs: RecipeInputs) -> BuiltMethod:
    """The method of `inputs.cfg` for the training vocabulary, initialised from port `init` when given."""
    built = METHODS[inputs.cfg.method].build(inputs.cfg, inputs.vocab, inputs.device)
    if "init" in inputs.upstream:  # a previous train node of the same method
        load_trainable_state(built.model, read_model(inputs.upstream["init"])["trainable"])
    return built


def image_batches(inputs: RecipeInputs, augment: AugmentConfig, pad_rgb: tuple[float, float, float] = (0.0, 0.0, 0.0)
                  ) -> Callable[[int], Iterator[dict[str, torch.Tensor]]]:
    """Start step -> endless crops of port `images` (the method's `augment`, padding `pad_rgb`) on the device."""
    cfg, output = inputs.cfg, inputs.upstream["images"]
    decoder = ImageLabelDecoder(cfg.image_size, cfg.label_file, inputs.vocab.ignore_index, inputs.seed, augment,
                                pad_rgb)
    return lambda start: (stack_images(b, inputs.device) for b in batches_from(
        output, inputs.per_rank_batch, inputs.seed, start, output.num_samples, decoder))


def grid_batches(inputs: RecipeInputs) -> Callable[[int], Iterator[dict[str, list[torch.Tensor]]]]:
    """Start step -> endless word-grid batches of port `grids`."""
    grids = inputs.upstream["grids"]
    return lambda start: ({"grids": b} for b in batches_from(
        grids, inputs.per_rank_batch, inputs.seed, start, grids.num_samples, decode_grid))


def ifseg_recipe(inputs: RecipeInputs) -> Recipe:
    """Word grids (port `grids`, image-free) or real images with pseudo-labels (port `images`, self-training).

    On images the tokens are CLIP's dense MaskCLIP features and the loss is CE of the decoder's logits,
    bilinearly upsampled to the crop, against the label map (IFSeg Table 4 / IFSeg+).
    """
    built = build(inputs)
    method, clip, cfg = built.method, built.backbone, inputs.cfg
    lr = lr_schedule(cfg.ifseg.schedule, cfg.loop.steps, cfg.ifseg.warmup_steps)
    optimizer = method.build_optimizer(built.model)
    if "grids" in inputs.upstream:
        return Recipe(built.model, optimizer, lambda m, b, s: method.loss(m, b), grid_batches(inputs), lr,
                      cfg.ifseg.grad_clip)

    def image_loss(m: torch.nn.Module, batch: dict[str, torch.Tensor], step: int) -> tuple[torch.Tensor, dict]:
        features, _ = clip.dense_features(normalize(batch["pixels"], clip.mean, clip.std))
        logits = F.interpolate(m(features), size=batch["labels"].shape[-2:], mode="bilinear", align_corners=False)
        loss = F.cross_entropy(logits, batch["labels"], ignore_index=inputs.vocab.ignore_index)
        return loss, {"loss": loss.item()}

    return Recipe(built.model, optimizer, image_loss, image_batches(inputs, cfg.ifseg.augment), lr, cfg.ifseg.grad_clip)


def align_recipe(inputs: RecipeInputs) -> Recipe:
    """TSupCon on frozen DINOv2 patch features with patch labels voted from the pseudo-label maps."""
    built = build(inputs)
    method, dinov2 = built.method, built.backbone

    def loss(m: torch.nn.Module, batch: dict[str, torch.Tensor], step: int) -> tuple[torch.Tensor, dict]:
        features = dinov2_features(dinov2, batch["pixels"])
        labels = method.patch_targets(batch["labels"], tuple(features.shape[-2:]))
        return method.loss(m, {"features": features, "patch_labels": labels.to(inputs.device)})

    lr = lr_schedule(method.cfg.schedule, inputs.cfg.loop.steps)
    return Recipe(built.model, method.build_optimizer(built.model), loss, image_batches(inputs, method.cfg.augment),
                  lr, method.cfg.grad_clip)


def zegclip_recipe(inputs: RecipeInputs) -> Recipe:
    """NEL-loss training of prompts, queries and decoder on seen-class ground truth (`label_file: gt.png`).

    The release's recipe: mmseg crops (`zegclip.augment`, padding = the normalisation mean, i.e. 0 after
    normalising), AdamW without gradient clipping, poly lr with warmup; in transductive mode the optimiser state
    is cleared where self-training starts (the release's second run loads weights only) and the lr restarts.
    """
    built = build(inputs)
    method, steps = built.method, inputs.cfg.loop.steps
    base = method.cfg.lr * method.cfg.lr_mult
    mean = tuple(v / 255.0 for v in PIXEL_STATS[method.cfg.pixel_norm][0])
    reset = method.self_training_start_step(steps) if method.cfg.reset_optimizer_at_switch else None

    def loss(m: torch.nn.Module, batch: dict[str, torch.Tensor], step: int) -> tuple[torch.Tensor, dict]:
        batch = {"pixels": method.normalise(batch["pixels"] * 255.0), "labels": batch["labels"]}
        value, logs = method.loss(m, batch, step, steps)
        return value, {k: float(v) for k, v in logs.items()}

    return Recipe(built.model, torch.optim.AdamW(method.param_groups(built.model)), loss,
                  image_batches(inputs, method.cfg.augment, mean),
                  lambda step: method.learning_rate(step, steps, base) / base, method.cfg.grad_clip, reset)


# --- zsseg (methods-spec §2.1 Stage A) ----------------------------------------------------------------------------
def zsseg_recipe(inputs: RecipeInputs) -> Recipe:
    """Learned prompts on frozen CLIP features of masked seen-class GT crops (`label_file: gt.png`), 32 per class.

    The crops are encoded once (`pipeline.methods.zsseg_data`); each step runs the text tower over the seen classes'
    prompts and the CE of 100 · cos against a batch of crop features.
    """
    from pipeline.methods.zsseg_data import class_images, draw_pairs, encode_pairs, feature_batches
    from pipeline.train.fit import rank_and_world

    built = build(inputs)
    method, clip, cfg, output = built.method, built.backbone, inputs.cfg, inputs.upstream["images"]
    seen = list(inputs.vocab.seen_ids)
    pairs = draw_pairs(class_images(output, cfg.label_file, seen), cfg.zsseg.samples_per_class,
                       cfg.zsseg.sample_seed)
    if not pairs:
        raise ValueError(f"no seen class of {inputs.vocab.name!r} occurs in {cfg.label_file} of {output.path}")
    data = encode_pairs(output, pairs, clip, cfg.label_file, cfg.zsseg.flip, clip.cfg.image_batch_size)
    position = {c: i for i, c in enumerate(seen)}
    targets = torch.tensor([position[int(c)] for c in data.classes], dtype=torch.int64)
    stream_seed = f"{inputs.seed}-{rank_and_world()[0]}"

    def batches(start: int) -> Iterator[dict[str, torch.Tensor]]:
        for batch in feature_batches(data, targets, inputs.per_rank_batch, stream_seed, start):
            yield {k: v.to(inputs.device) for k, v in batch.items()}

    def loss(m: torch.nn.Module, batch: dict[str, torch.Tensor], step: int) -> tuple[torch.Tensor, dict]:
        return method.loss(m, batch["features"], batch["targets"])

    return Recipe(built.model, method.build_optimizer(built.model), loss, batches,
                  method.lr_factor(cfg.loop.steps))
# --- end zsseg -------------------------------------------------------------------------------------------------


RECIPES: dict[str, Callable[[RecipeInputs], Recipe]] = {
    "ifseg": ifseg_recipe, "align": align_recipe, "zegclip": zegclip_recipe, "zsseg": zsseg_recipe}
