"""Per-method recipes for the train stage and the predictors that serve trained models to eval and selftrain.

A recipe builds, on a training worker, the model, optimiser, loss closure, batch stream and lr schedule of one
method. A predictor rebuilds a trained model for any vocabulary (open vocabulary: the text classifier is
recomputed for the vocabulary it is asked about) and maps pixels to logits:
    `logits(pixels float [1, 3, h, w] in [0, 1]) -> float [1, C, h', w']`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from pipeline.data.vocab import Vocabulary
from pipeline.models.preprocess import normalize
from pipeline.predictors import on_patch_grid
from pipeline.shards import StageOutput
from pipeline.trainer import lr_schedule


@dataclass
class Recipe:
    """What one method contributes to the generic loop."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    loss: Callable[[torch.nn.Module, Any, int], tuple[torch.Tensor, dict[str, float]]]
    batches: Callable[[int], Iterator[Any]]
    lr_factor: Callable[[int], float]


# -- IFSeg ----------------------------------------------------------------------------------------------------
def _ifseg_method(stage: Any, clip: Any, vocab: Vocabulary | None = None) -> Any:
    from pipeline.methods.ifseg import IFSegConfig, IFSegMethod

    return IFSegMethod(IFSegConfig(**stage.cfg.ifseg), stage.text_embeddings(clip, vocab))


def ifseg_recipe(stage: Any, device: torch.device) -> Recipe:
    """Word grids (port `grids`) or real images with pseudo-labels (port `images`, self-training)."""
    from pipeline.train_data import batches_from, decode_grid

    clip = stage.build_clip(device)
    method = _ifseg_method(stage, clip)
    model = method.build_model().to(device)
    stage.load_init(model)
    icfg = method.cfg
    lr = lr_schedule(icfg.schedule, stage.cfg.loop.steps, icfg.warmup_steps)
    if "grids" in stage.context.upstream:
        grids = stage.upstream("grids")
        batches = lambda start: ({"grids": b} for b in batches_from(  # noqa: E731
            grids, stage.per_rank_batch(), stage.context.seed, start, grids.num_samples, decode_grid))
        return Recipe(model, method.build_optimizer(model), lambda m, b, s: method.loss(m, b), batches, lr)

    def image_loss(m: torch.nn.Module, batch: dict[str, torch.Tensor], step: int) -> tuple[torch.Tensor, dict]:
        features, _ = clip.dense_features(normalize(batch["pixels"], clip.mean, clip.std))
        logits = F.interpolate(m(features), size=batch["labels"].shape[-2:], mode="bilinear", align_corners=False)
        loss = F.cross_entropy(logits, batch["labels"], ignore_index=stage.vocab.ignore_index)
        return loss, {"loss": loss.item()}

    return Recipe(model, method.build_optimizer(model), image_loss, stage.image_batches(device), lr)


class IFSegPredictor:
    """CLIP dense (MaskCLIP) features -> IFSeg decoder -> logits; optional K-NN post-processing (§1.5)."""

    def __init__(self, clip: Any, method: Any, model: torch.nn.Module, knn: bool) -> None:
        self.clip, self.method, self.model, self.knn = clip, method, model.eval(), knn
        self.name, self.num_classes = "ifseg", int(method.text_embeddings.shape[0])

    @torch.no_grad()
    def logits(self, pixels: torch.Tensor) -> torch.Tensor:
        return on_patch_grid(normalize(pixels, self.clip.mean, self.clip.std), self.clip.patch_size, self._grid)

    def _grid(self, normalised: torch.Tensor) -> torch.Tensor:
        features, _ = self.clip.dense_features(normalised)
        logits = self.method.predict_logits(self.model, features)
        if self.knn:  # propagation acts on probabilities; log keeps softmax(logits) == propagated probs
            return torch.log(self.method.postprocess(logits, features).clamp_min(1e-8))
        return logits


# -- Alignment module (Seifi et al. stage 2) ----------------------------------------------------------------
def _align_parts(stage: Any, device: torch.device, vocab: Vocabulary | None = None) -> tuple[Any, Any]:
    from pipeline.methods.align import AlignMethod
    from pipeline.models.dinov2 import Dinov2, Dinov2Config

    clip = stage.build_clip(device)
    dinov2 = Dinov2.build(Dinov2Config(**{**stage.cfg.dinov2, "device": str(device)}))
    config = AlignMethod.Config(**stage.cfg.align)
    return dinov2, AlignMethod(config, stage.text_embeddings(clip, vocab).to(device), in_dim=dinov2.embed_dim)


def dinov2_features(dinov2: Any, pixels: torch.Tensor) -> torch.Tensor:
    from pipeline.models.preprocess import IMAGENET_MEAN, IMAGENET_STD

    with torch.no_grad():
        return dinov2.patch_features(normalize(pixels, IMAGENET_MEAN, IMAGENET_STD))


def align_recipe(stage: Any, device: torch.device) -> Recipe:
    """TSupCon on frozen DINOv2 patch features with patch labels voted from the pseudo-label maps."""
    from pipeline.methods.align import patch_labels

    dinov2, method = _align_parts(stage, device)
    model = method.build_model().to(device)
    stage.load_init(model)

    def loss(m: torch.nn.Module, batch: dict[str, torch.Tensor], step: int) -> tuple[torch.Tensor, dict]:
        features = dinov2_features(dinov2, batch["pixels"])
        grid = features.shape[-2:]
        labels = torch.stack([patch_labels(lab, tuple(grid), stage.vocab.ignore_index) for lab in batch["labels"]])
        return method.loss(m, {"features": features, "patch_labels": labels.to(device)})

    optimizer = (method.build_optimizer(model) if hasattr(method, "build_optimizer")
                 else torch.optim.SGD(method.param_groups(model), momentum=0.9))
    lr = lr_schedule(getattr(method.cfg, "schedule", "cosine"), stage.cfg.loop.steps)
    return Recipe(model, optimizer, loss, stage.image_batches(device), lr)


class AlignPredictor:
    """DINOv2 -> alignment module -> cosine similarity with the vocabulary's text prototypes."""

    def __init__(self, dinov2: Any, method: Any, model: torch.nn.Module) -> None:
        self.dinov2, self.method, self.model = dinov2, method, model.eval()
        self.name, self.num_classes = "align", int(method.text_embeddings.shape[0])

    @torch.no_grad()
    def logits(self, pixels: torch.Tensor) -> torch.Tensor:
        from pipeline.models.preprocess import IMAGENET_MEAN, IMAGENET_STD

        normalised = normalize(pixels, IMAGENET_MEAN, IMAGENET_STD)
        return on_patch_grid(normalised, self.dinov2.patch_size,
                             lambda x: self.method.predict_logits(self.model, self.dinov2.patch_features(x)))


# -- ZegCLIP --------------------------------------------------------------------------------------------------
def _zegclip_method(stage: Any, device: torch.device, vocab: Vocabulary | None = None) -> Any:
    from pipeline.methods.zegclip import ZegCLIPConfig, ZegCLIPMethod

    clip = stage.build_clip(device)
    vocab = vocab or stage.vocab
    config = ZegCLIPConfig(**stage.cfg.zegclip)
    return ZegCLIPMethod(config, clip.model, stage.text_embeddings(clip, vocab).to(device), vocab.seen_ids,
                         vocab.unseen_ids)


def zegclip_recipe(stage: Any, device: torch.device) -> Recipe:
    """NEL-loss training of prompts, queries and decoder on seen-class ground truth (`label_file: gt.png`)."""
    method = _zegclip_method(stage, device)
    model = method.build_model().to(device)
    stage.load_init(model)
    steps = stage.cfg.loop.steps
    optimizer = torch.optim.AdamW(method.param_groups(model))
    base = method.cfg.lr * method.cfg.lr_mult

    def loss(m: torch.nn.Module, batch: dict[str, torch.Tensor], step: int) -> tuple[torch.Tensor, dict]:
        batch = {"pixels": method.normalise(batch["pixels"] * 255.0), "labels": batch["labels"]}
        value, logs = method.loss(m, batch, step, steps)
        return value, {k: float(v) for k, v in logs.items()}

    return Recipe(model, optimizer, loss, stage.image_batches(device),
                  lambda step: method.learning_rate(step, steps, base) / base)


class ZegCLIPPredictor:
    """ZegCLIP mask logits for all classes of the vocabulary (the protocol applies sigmoid and seen penalty)."""

    def __init__(self, method: Any, model: torch.nn.Module) -> None:
        self.method, self.model = method, model.eval()
        self.name, self.num_classes = "zegclip", int(method.text_embeddings.shape[0])

    @torch.no_grad()
    def logits(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.method.predict_logits(self.model, self.method.normalise(pixels * 255.0))


RECIPES: dict[str, Callable[[Any, torch.device], Recipe]] = {
    "ifseg": ifseg_recipe, "align": align_recipe, "zegclip": zegclip_recipe}


def load_predictor(output: StageOutput, vocab: Vocabulary, device: str = "cpu", knn: bool = False) -> Any:
    """Rebuild a finished train node's model for `vocab` and return its predictor.

    Args:
        output: the train node's output (`open_stage(<root>/<train node>)`).
        vocab: the vocabulary to predict (any: the text classifier is recomputed for it).
        device: torch device string.
        knn: IFSeg's K-NN post-processing (image-free models only; ignored by other methods).
    """
    from pipeline.stage import StageContext
    from pipeline.trainer import load_trainable_state
    from stages.train import TrainStage, read_artifact

    artifact = read_artifact(output)
    config = json.loads(artifact["config"])
    stage = TrainStage(StageContext(node=output.manifest["node"], seed=0, config=config, upstream={}))
    dev = torch.device(device)
    if artifact["method"] == "ifseg":
        clip = stage.build_clip(dev)
        method = _ifseg_method(stage, clip, vocab)
        predictor: Any = IFSegPredictor(clip, method, method.build_model().to(dev), knn)
    elif artifact["method"] == "align":
        dinov2, method = _align_parts(stage, dev, vocab)
        predictor = AlignPredictor(dinov2, method, method.build_model().to(dev))
    else:
        method = _zegclip_method(stage, dev, vocab)
        predictor = ZegCLIPPredictor(method, method.build_model().to(dev))
    load_trainable_state(predictor.model, artifact["trainable"])
    return predictor
