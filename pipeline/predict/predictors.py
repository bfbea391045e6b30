"""Predictors: what the eval stage scores. A predictor maps un-normalised pixels to class logits over a vocabulary.

The test-time protocol (resize, whole/slide, back to the original size, score transform, seen penalty) lives in
`pipeline.predict.engine`; a predictor only handles one whole image or one sliding-window crop, and owns its pixel
normalisation and any feature post-processing (IFSeg's K-NN).

Kinds (the `kind` of an eval method):
    maskclip  training-free baseline: dense CLIP features (MaskCLIP's value path, or the `clip.dense` backend)
              against the prompt-ensembled text embeddings of the vocabulary (`MaskClipPredictor`).
    trained   a model from a `train` stage output (`pipeline.predict.load_trained`).
    labels    not a predictor: the eval stage reads an upstream pseudolabel/selftrain stage's `label.png`.

`PREDICTOR_BUILDERS` maps each logits kind to its builder; tests register extra kinds (e.g. an oracle) there.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import torch

    from pipeline.data.vocab import Vocabulary
    from pipeline.models.clip import Clip
    from pipeline.models.configs import ClipConfig
    from pipeline.shards import StageOutput


class Predictor(Protocol):
    """A segmentation model seen by the eval stage.

    Attributes:
        name: method name (report column, prediction file stem).
        num_classes: C, the number of classes of the eval vocabulary; logits are in its train-id order.

    Optional attributes (read with getattr; `stages.evaluate.methods.effective_protocol`):
        seen_penalty: a float the trained model prescribes for its seen classes at test time (ZegCLIP: 0.1
            inductive, 0.0 transductive); the eval stage uses it instead of the protocol preset's unless
            `protocol_overrides` set one.
        knn: True when `logits` returns IFSeg-K-NN-propagated probabilities instead of logits; the engine then
            applies no score transform (absent: the protocol's `knn_postprocess` says).
    """

    name: str
    num_classes: int

    def logits(self, pixels: torch.Tensor) -> torch.Tensor:
        """[1, 3, h, w] float32 RGB in [0, 1], un-normalised -> [1, C, h', w'] float32 class logits."""
        ...


class PredictorOptions(Protocol):
    """What a builder reads from an eval method entry (the eval stage's typed method config).

    Attributes:
        name: method name.
        kind: the key of its builder in `PREDICTOR_BUILDERS`.
        input: upstream port (trained).
        knn: effective K-NN post-processing (trained, maskclip).
        clip, templates, name_variant, logit_scale: the MaskCLIP baseline's CLIP, prompt templates,
            vocabulary name variant and logit scale (maskclip).
    """

    name: str
    kind: str
    input: str | None
    knn: bool | None
    clip: ClipConfig
    templates: str
    name_variant: str | None
    logit_scale: float


class MaskClipPredictor:
    """Raw CLIP dense prediction, MaskCLIP style (Zhou et al. 2022): no training, no post-processing.

    For an input of h x w pixels: CLIP-normalise, zero-pad bottom/right (after normalisation, i.e. with the CLIP
    mean colour, as `Clip.sliding_dense` does) to multiples of the patch side p, take the dense patch features
    [1, D, ceil(h/p), ceil(w/p)] (unit norm) of the CLIP's backend (``clip.dense``: MaskCLIP's value path by default;
    SCLIP, ClearCLIP, NACLIP or ProxyCLIP, `pipeline.models.clip_dense`), and score them against the unit text
    embeddings: logits = logit_scale * cos(feature, text). The patch-grid logits are upsampled bilinearly
    (align_corners=False) to the padded size and cropped back to h x w.

    Choice (MaskCLIP is silent on a scale because it only takes the argmax): logit_scale = 100, CLIP's trained
    logit scale, so that softmax/sigmoid scores are CLIP's zero-shot probabilities. The argmax, and every
    softmax-protocol prediction, is independent of the scale; only sigmoid-protocol scores depend on it.

    With `knn` (IFSeg's MaskCLIP† baselines) the patch-grid logits go through IFSeg's K-NN propagation
    (`pipeline.methods.ifseg.knn_postprocess`, neighbours from the same dense features, K = 3, 25 iterations,
    temperature 1 by default) and the output is the propagated **probabilities**, upsampled bilinearly.

    Args:
        clip: a built `Clip` (frozen).
        text: [C, D] class embeddings (e.g. `clip.encode_text(names, templates)`); renormalised here.
        name: method name.
        logit_scale: multiplier of the cosine similarities.
        knn: apply K-NN post-processing (returns probabilities instead of logits).
        knn_k, knn_iterations, knn_temperature: its knobs (IFSeg's 3, 25, 1.0).
    """

    def __init__(self, clip: Clip, text: torch.Tensor, name: str = "maskclip", logit_scale: float = 100.0,
                 knn: bool = False, knn_k: int = 3, knn_iterations: int = 25, knn_temperature: float = 1.0) -> None:
        import torch.nn.functional as F

        self.clip = clip
        self.text = F.normalize(text.float(), dim=-1).to(clip.device)
        self.name = name
        self.num_classes = int(text.shape[0])
        self.logit_scale = float(logit_scale)
        self.knn, self.knn_knobs = bool(knn), (int(knn_k), int(knn_iterations), float(knn_temperature))

    def logits(self, pixels: torch.Tensor) -> torch.Tensor:
        """[1, 3, h, w] in [0, 1] -> [1, C, h, w] float32 logits, or probabilities with `knn`."""
        import torch

        from pipeline.methods.ifseg import knn_postprocess
        from pipeline.models.preprocess import normalize
        from pipeline.predict.engine import on_patch_grid

        def grid_scores(normalised: torch.Tensor) -> torch.Tensor:
            features, _ = self.clip.dense_features(normalised)
            logits = self.logit_scale * torch.einsum("bdhw,cd->bchw", features, self.text)
            return knn_postprocess(logits, features, *self.knn_knobs) if self.knn else logits

        normalised = normalize(pixels, self.clip.mean, self.clip.std)
        return on_patch_grid(normalised, self.clip.patch_size, grid_scores).to(pixels.device)


def build_maskclip(method: PredictorOptions, vocab: Vocabulary, upstream: Mapping[str, StageOutput],
                   device: str) -> MaskClipPredictor:
    """`MaskClipPredictor` of `method.clip` (device set to the stage's), scoring `vocab`'s prompts.

    The prompts are `vocab.prompt_names(method.name_variant)` (classes without that variant use their official
    name) in the `method.templates` set (MaskCLIP's 85 by default); `method.knn` turns K-NN post-processing on.
    """
    import dataclasses

    from pipeline.models.clip import Clip
    from pipeline.models.prompts import get_templates

    clip = Clip.build(dataclasses.replace(method.clip, device=device))
    text = clip.encode_text(vocab.prompt_names(method.name_variant), get_templates(method.templates))
    return MaskClipPredictor(clip, text, name=method.name, logit_scale=method.logit_scale, knn=bool(method.knn))


def build_trained(method: PredictorOptions, vocab: Vocabulary, upstream: Mapping[str, StageOutput],
                  device: str) -> Predictor:
    """The trained model of the upstream `train` output on port `method.input`, with K-NN when `method.knn`."""
    from pipeline.predict.load_trained import load_trained

    return load_trained(upstream[str(method.input)], vocab, device, bool(method.knn))


PredictorBuilder = Callable[[PredictorOptions, "Vocabulary", Mapping[str, "StageOutput"], str], Predictor]
PREDICTOR_BUILDERS: dict[str, PredictorBuilder] = {"maskclip": build_maskclip, "trained": build_trained}
LABEL_KINDS: tuple[str, ...] = ("labels",)


def method_kinds() -> Sequence[str]:
    """Every method kind the eval stage accepts (logits predictors and label readers)."""
    return (*PREDICTOR_BUILDERS, *LABEL_KINDS)


def build_predictor(method: PredictorOptions, vocab: Vocabulary, upstream: Mapping[str, StageOutput],
                    device: str) -> Predictor:
    """The predictor of one eval method, checked to score exactly `vocab`'s classes.

    Args:
        method: the method's typed entry (see `PredictorOptions`); `method.kind` selects the builder.
        vocab: the vocabulary to score; the predictor's logits follow its train ids.
        upstream: input port -> upstream stage output (for `trained`).
        device: torch device string.

    Raises:
        ValueError: for `labels` (read by the stage, not predicted), an unknown kind, or a predictor whose
            number of classes is not `vocab`'s.
    """
    if method.kind not in PREDICTOR_BUILDERS:
        raise ValueError(f"method {method.name!r}: kind {method.kind!r} has no predictor; "
                         f"predictor kinds: {sorted(PREDICTOR_BUILDERS)}")
    predictor = PREDICTOR_BUILDERS[method.kind](method, vocab, upstream, device)
    if predictor.num_classes != vocab.num_classes:
        raise ValueError(f"method {method.name!r}: the model predicts {predictor.num_classes} classes, "
                         f"the vocabulary {vocab.name!r} has {vocab.num_classes}")
    return predictor
