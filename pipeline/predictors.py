"""Predictors: what the eval stage scores. A predictor maps un-normalised pixels to class logits over a vocabulary.

The test-time protocol (resize, whole/slide, back to the original size, score transform, seen penalty) lives in
`pipeline.inference`; a predictor only handles one whole image or one sliding-window crop, and owns its pixel
normalisation and any feature post-processing (IFSeg's K-NN).

Kinds (the `kind` of an eval method):
    maskclip  training-free baseline: MaskCLIP dense CLIP features (value path of the last block) against the
              prompt-ensembled text embeddings of the vocabulary (`MaskClipPredictor`).
    trained   a model from a `train` stage output, loaded by `stages.train.load_predictor`.
    labels    not a predictor: the eval stage reads an upstream pseudolabel/selftrain stage's `label.png`.

`PREDICTOR_BUILDERS` maps each logits kind to its builder; tests register extra kinds (e.g. an oracle) there.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import torch

    from pipeline.data.vocab import Vocabulary
    from pipeline.models.clip import Clip
    from pipeline.shards import StageOutput


class Predictor(Protocol):
    """A segmentation model seen by the eval stage.

    Attributes:
        name: method name (report column, prediction file stem).
        num_classes: C, the number of classes of the eval vocabulary; logits are in its train-id order.
    """

    name: str
    num_classes: int

    def logits(self, pixels: torch.Tensor) -> torch.Tensor:
        """[1, 3, h, w] float32 RGB in [0, 1], un-normalised -> [1, C, h', w'] float32 class logits."""
        ...


class MaskClipPredictor:
    """Raw CLIP dense prediction, MaskCLIP style (Zhou et al. 2022): no training, no post-processing.

    For an input of h x w pixels: CLIP-normalise, zero-pad bottom/right (after normalisation, i.e. with the CLIP
    mean colour, as `Clip.sliding_dense` does) to multiples of the patch side p, take the MaskCLIP value-path patch
    features [1, D, ceil(h/p), ceil(w/p)] (unit norm), and score them against the unit text embeddings:
    logits = logit_scale * cos(feature, text). The patch-grid logits are upsampled bilinearly
    (align_corners=False) to the padded size and cropped back to h x w.

    Choice (MaskCLIP is silent on a scale because it only takes the argmax): logit_scale = 100, CLIP's trained
    logit scale, so that softmax/sigmoid scores are CLIP's zero-shot probabilities. The argmax, and every
    softmax-protocol prediction, is independent of the scale; only sigmoid-protocol scores depend on it.

    Args:
        clip: a built `Clip` (frozen).
        text: [C, D] class embeddings (e.g. `clip.encode_text(names, templates)`); renormalised here.
        name: method name.
        logit_scale: multiplier of the cosine similarities.
    """

    def __init__(self, clip: Clip, text: torch.Tensor, name: str = "maskclip", logit_scale: float = 100.0) -> None:
        import torch.nn.functional as F

        self.clip = clip
        self.text = F.normalize(text.float(), dim=-1).to(clip.device)
        self.name = name
        self.num_classes = int(text.shape[0])
        self.logit_scale = float(logit_scale)

    def logits(self, pixels: torch.Tensor) -> torch.Tensor:
        """[1, 3, h, w] in [0, 1] -> [1, C, h, w] float32 logits (see the class docstring)."""
        import torch

        from pipeline.models.preprocess import normalize

        def grid_scores(normalised: torch.Tensor) -> torch.Tensor:
            features, _ = self.clip.dense_features(normalised)
            return self.logit_scale * torch.einsum("bdhw,cd->bchw", features, self.text)

        normalised = normalize(pixels, self.clip.mean, self.clip.std)
        return on_patch_grid(normalised, self.clip.patch_size, grid_scores).to(pixels.device)


def on_patch_grid(normalised: torch.Tensor, patch: int,
                  grid_logits: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Run a patch-grid model on any image size.

    Zero-pads the normalised pixels [1, 3, h, w] bottom/right to multiples of `patch` (zero = the mean colour
    after normalisation), calls `grid_logits` (-> [1, C, ceil(h/p), ceil(w/p)]), upsamples bilinearly
    (align_corners=False) to the padded size and crops back to [1, C, h, w].
    """
    import torch.nn.functional as F

    _, _, height, width = normalised.shape
    padded_h, padded_w = -(-height // patch) * patch, -(-width // patch) * patch
    scores = grid_logits(F.pad(normalised, (0, padded_w - width, 0, padded_h - height)))
    scores = F.interpolate(scores, size=(padded_h, padded_w), mode="bilinear", align_corners=False)
    return scores[:, :, :height, :width]


def build_maskclip(method: Mapping[str, Any], vocab: Vocabulary, upstream: Mapping[str, StageOutput],
                   device: str) -> MaskClipPredictor:
    """`MaskClipPredictor` from a method config.

    Method keys used: `name`, `clip` (`ClipConfig` fields; `device` is set to the stage's), `templates` (a
    `pipeline.models.prompts` set name, default "maskclip85", MaskCLIP's 85 templates), `name_variant` (vocabulary
    prompt-name variant, default "maskclip"; classes without one use their official name), `logit_scale` (100).
    """
    from pipeline.models.clip import Clip, ClipConfig
    from pipeline.models.prompts import get_templates

    clip = Clip.build(ClipConfig(**{**dict(method.get("clip") or {}), "device": device}))
    names = vocab.prompt_names(method.get("name_variant", "maskclip"))
    text = clip.encode_text(names, get_templates(method.get("templates", "maskclip85")))
    return MaskClipPredictor(clip, text, name=method["name"], logit_scale=float(method.get("logit_scale", 100.0)))


def build_trained(method: Mapping[str, Any], vocab: Vocabulary, upstream: Mapping[str, StageOutput],
                  device: str) -> Predictor:
    """A trained model from the upstream `train` output on port `method["input"]` (`stages.train.load_predictor`).

    `method["knn"]` (bool) switches IFSeg's K-NN post-processing; the eval stage resolves it from the protocol
    when the method does not set it.
    """
    from stages.train import load_predictor

    predictor = load_predictor(upstream[method["input"]], vocab, device, bool(method.get("knn", False)))
    if predictor.num_classes != vocab.num_classes:
        raise ValueError(f"method {method['name']!r}: the trained model predicts {predictor.num_classes} classes, "
                         f"the eval vocabulary {vocab.name!r} has {vocab.num_classes}")
    return predictor


PredictorBuilder = Callable[[Mapping[str, Any], "Vocabulary", Mapping[str, "StageOutput"], str], Predictor]
PREDICTOR_BUILDERS: dict[str, PredictorBuilder] = {"maskclip": build_maskclip, "trained": build_trained}
LABEL_KINDS: tuple[str, ...] = ("labels",)


def method_kinds() -> Sequence[str]:
    """Every method kind the eval stage accepts (logits predictors and label readers)."""
    return (*PREDICTOR_BUILDERS, *LABEL_KINDS)


def build_predictor(method_cfg: Mapping[str, Any], vocab: Vocabulary, upstream: Mapping[str, StageOutput],
                    device: str) -> Predictor:
    """The predictor of one eval method.

    Args:
        method_cfg: `{name, kind, ...}` with the kind's keys (see the builders).
        vocab: the eval vocabulary; the predictor's logits follow its train ids.
        upstream: input port -> upstream stage output (for `trained`).
        device: torch device string.

    Raises:
        ValueError: for `labels` (read by the stage, not predicted) or an unknown kind.
    """
    kind = method_cfg.get("kind")
    if kind not in PREDICTOR_BUILDERS:
        raise ValueError(f"method {method_cfg.get('name')!r}: kind {kind!r} has no predictor; "
                         f"predictor kinds: {sorted(PREDICTOR_BUILDERS)}")
    return PREDICTOR_BUILDERS[kind](method_cfg, vocab, upstream, device)
