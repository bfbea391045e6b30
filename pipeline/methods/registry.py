"""Method name -> how to build it: its frozen backbone, the vocabulary's text classifier, the method and its network.

Training (`stages.train`) and test-time loading (`pipeline.predict.load_trained`) build a method the same way,
for any vocabulary (open vocabulary: the text classifier is recomputed for the vocabulary asked about):

    built = METHODS[cfg.method].build(cfg, vocab, device)      # cfg: pipeline.methods.configs.MethodConfig
    predictor = METHODS[cfg.method].predictor(built, knn)      # after loading the trained weights into built.model

A predictor maps un-normalised pixels to logits, `logits(pixels float [1, 3, h, w] in [0, 1]) -> float [1, C, h',
w']` (`pipeline.predict.predictors.Predictor`); it owns its pixel normalisation and any post-processing. Its
`knn` attribute says whether it applies IFSeg's K-NN, in which case it returns probabilities instead of logits.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from pipeline.data.vocab import Vocabulary
from pipeline.methods.configs import MethodConfig
from pipeline.models.preprocess import IMAGENET_MEAN, IMAGENET_STD, normalize
from pipeline.predict.engine import on_patch_grid


@dataclass
class BuiltMethod:
    """One method built for one vocabulary on one device.

    Attributes:
        method: the method object (`IFSegMethod`, `AlignMethod`, `ZegCLIPMethod`, `ZSSegMethod`): loss, optimiser,
            prediction.
        model: its trainable network on the device (fresh weights; load trained ones into it).
        backbone: the frozen feature extractor outside `model`: a `Clip` (ifseg, zsseg), a `Dinov2` (align), or
            None (zegclip: its CLIP tower is inside `model`).
    """

    method: Any
    model: torch.nn.Module
    backbone: Any = None


def build_clip(cfg: MethodConfig, device: torch.device) -> Any:
    """The method's CLIP (`cfg.clip`) on `device`."""
    from pipeline.models.clip import Clip

    return Clip.build(dataclasses.replace(cfg.clip, device=str(device)))


def text_classifier(clip: Any, vocab: Vocabulary, cfg: MethodConfig) -> torch.Tensor:
    """[C, D] prompt-ensembled CLIP text embeddings of `vocab`'s classes (name variant and templates of `cfg`)."""
    from pipeline.models.prompts import get_templates

    return clip.encode_text(vocab.prompt_names(cfg.name_variant), get_templates(cfg.prompt_templates))


def build_ifseg(cfg: MethodConfig, vocab: Vocabulary, device: torch.device) -> BuiltMethod:
    """IFSeg decoder over CLIP dense features, with the vocabulary's text embeddings as frozen tied classifier."""
    from pipeline.methods.ifseg import IFSegMethod

    clip = build_clip(cfg, device)
    method = IFSegMethod(cfg.ifseg, text_classifier(clip, vocab, cfg))
    return BuiltMethod(method, method.build_model().to(device), clip)


def build_align(cfg: MethodConfig, vocab: Vocabulary, device: torch.device) -> BuiltMethod:
    """Alignment module from frozen DINOv2 patch features into CLIP's text space (the vocabulary's prototypes)."""
    from pipeline.methods.align import AlignMethod
    from pipeline.models.dinov2 import Dinov2

    clip = build_clip(cfg, device)
    dinov2 = Dinov2.build(dataclasses.replace(cfg.dinov2, device=str(device)))
    method = AlignMethod(cfg.align, text_classifier(clip, vocab, cfg).to(device), dinov2.embed_dim, vocab.ignore_index)
    return BuiltMethod(method, method.build_model().to(device), dinov2)


def build_zegclip(cfg: MethodConfig, vocab: Vocabulary, device: torch.device) -> BuiltMethod:
    """ZegCLIP on CLIP's image tower; the vocabulary's seen/unseen split decides what is supervised."""
    from pipeline.methods.zegclip import ZegCLIPMethod

    clip = build_clip(cfg, device)
    method = ZegCLIPMethod(cfg.zegclip, clip.model, text_classifier(clip, vocab, cfg).to(device), vocab.seen_ids,
                           vocab.unseen_ids, vocab.ignore_index)
    return BuiltMethod(method, method.build_model().to(device))


def dinov2_features(dinov2: Any, pixels: torch.Tensor) -> torch.Tensor:
    """Frozen DINOv2 patch features [B, F, h, w] of pixels [B, 3, H, W] in [0, 1] (ImageNet-normalised here)."""
    with torch.no_grad():
        return dinov2.patch_features(normalize(pixels, IMAGENET_MEAN, IMAGENET_STD))


class IFSegPredictor:
    """CLIP dense (MaskCLIP) features -> IFSeg decoder -> logits; optional K-NN post-processing (§1.5).

    With `knn` the output is **probabilities**, not logits (the eval stage sets the protocol's `knn_postprocess`
    from `knn`, which tells the engine to resize them and apply no score transform):
    softmax of the decoder's patch-grid logits, propagated over the K nearest neighbours of the *backbone*
    features (the CLIP dense features the decoder reads, not its outputs), then bilinearly upsampled as
    probabilities (IFSeg: propagation on the token grid, then upsampling).
    """

    def __init__(self, built: BuiltMethod, knn: bool) -> None:
        self.clip, self.method, self.model, self.knn = built.backbone, built.method, built.model.eval(), knn
        self.name, self.num_classes = "ifseg", int(self.method.text_embeddings.shape[0])

    @torch.no_grad()
    def logits(self, pixels: torch.Tensor) -> torch.Tensor:
        """[1, 3, h, w] in [0, 1] -> [1, C, h, w] logits, or propagated probabilities with `knn`."""
        return on_patch_grid(normalize(pixels, self.clip.mean, self.clip.std), self.clip.patch_size, self._grid)

    def _grid(self, normalised: torch.Tensor) -> torch.Tensor:
        features, _ = self.clip.dense_features(normalised)
        logits = self.method.predict_logits(self.model, features)
        return self.method.postprocess(logits, features) if self.knn else logits


class AlignPredictor:
    """DINOv2 -> alignment module -> cosine similarity with the vocabulary's text prototypes (no K-NN)."""

    def __init__(self, built: BuiltMethod, knn: bool = False) -> None:
        self.dinov2, self.method, self.model = built.backbone, built.method, built.model.eval()
        self.knn = False  # K-NN is IFSeg's (image-free models): a request is ignored, and `knn` says so
        self.name, self.num_classes = "align", int(self.method.text_embeddings.shape[0])

    @torch.no_grad()
    def logits(self, pixels: torch.Tensor) -> torch.Tensor:
        normalised = normalize(pixels, IMAGENET_MEAN, IMAGENET_STD)
        return on_patch_grid(normalised, self.dinov2.patch_size,
                             lambda x: self.method.predict_logits(self.model, self.dinov2.patch_features(x)))


class ZegCLIPPredictor:
    """ZegCLIP mask logits for all classes of the vocabulary (the protocol applies sigmoid and seen penalty).

    `seen_penalty` is the model's own test-time penalty (`ZegCLIPMethod.eval_seen_penalty`: 0.1 after inductive,
    0.0 after transductive training); the eval stage scores with it instead of the protocol preset's.
    """

    def __init__(self, built: BuiltMethod, knn: bool = False) -> None:
        self.method, self.model = built.method, built.model.eval()
        self.knn = False  # K-NN is IFSeg's (image-free models): a request is ignored, and `knn` says so
        self.name, self.num_classes = "zegclip", int(self.method.text_embeddings.shape[0])
        self.seen_penalty = float(self.method.eval_seen_penalty)

    @torch.no_grad()
    def logits(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.method.predict_logits(self.model, self.method.normalise(pixels * 255.0))


@dataclass(frozen=True)
class MethodEntry:
    """How to build one method (`build`) and serve it at test time (`predictor(built, knn)`)."""

    build: Callable[[MethodConfig, Vocabulary, torch.device], BuiltMethod]
    predictor: Callable[[BuiltMethod, bool], Any]


# --- zsseg (methods-spec §2.1): learned prompts; its predictor classifies SAM proposals (zsseg_predict) ----------
def build_zsseg(cfg: MethodConfig, vocab: Vocabulary, device: torch.device) -> BuiltMethod:
    """ZSSeg's learned prompts (`PromptLearner`) over CLIP's frozen text tower; CLIP itself is the backbone."""
    from pipeline.methods.zsseg import ZSSegMethod

    clip = build_clip(cfg, device)
    method = ZSSegMethod(cfg.zsseg, clip.model, clip.tokenizer, vocab.prompt_names(cfg.name_variant),
                         vocab.seen_ids)
    return BuiltMethod(method, method.build_model().to(device), clip)


def zsseg_predictor(built: BuiltMethod, knn: bool = False) -> Any:
    """`pipeline.methods.zsseg_predict.ZSSegPredictor` (SAM proposals x learned-prompt crop classification)."""
    from pipeline.methods.zsseg_predict import ZSSegPredictor

    return ZSSegPredictor(built, knn)
# --- end zsseg -------------------------------------------------------------------------------------------------


METHODS: dict[str, MethodEntry] = {
    "ifseg": MethodEntry(build_ifseg, IFSegPredictor),
    "align": MethodEntry(build_align, AlignPredictor),
    "zegclip": MethodEntry(build_zegclip, ZegCLIPPredictor),
    "zsseg": MethodEntry(build_zsseg, zsseg_predictor),
}
